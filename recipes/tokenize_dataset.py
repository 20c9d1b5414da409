"""Tokenize a whole dataset into code shards (WebDataset tar or Parquet) with a manifest.

    python recipes/tokenize_dataset.py --input corpus/ --input-type folder --output codes/ --model descript/dac_44khz
    python recipes/tokenize_dataset.py --input saved_ds/ --input-type hf --split train --audio-column audio \\
        --output codes/ --model descript/dac_44khz --format parquet
    torchrun --nproc_per_node 8 recipes/tokenize_dataset.py --input 'data/train-{000..511}.tar' \\
        --input-type webdataset \\
        --audio-keys flac,wav --output codes/ --model descript/dac_44khz --device cuda --dtype bf16

Multi-node: run the same torchrun command on every node (--nnodes, --rdzv-endpoint) with --output on
a shared filesystem. Running the same command again resumes an interrupted job (same world size and
--num-workers) and does nothing for a finished one. The output format is described in audiotok/codedataset.py.
"""

import argparse
import logging
import os


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, nargs="+",
                   help="folder, Hugging Face dataset (saved folder, audio folder, hub id) or tar shards "
                        "(paths, globs, brace patterns; several allowed for webdataset)")
    p.add_argument("--input-type", required=True, choices=["hf", "webdataset", "folder"])
    p.add_argument("--output", required=True, help="output folder (shared by all ranks)")
    p.add_argument("--model", required=True, help="audiotok / transformers folder, .pth file or hub id")
    p.add_argument("--format", default="webdataset", choices=["webdataset", "parquet"])
    p.add_argument("--split", default="train", help="dataset split (hf)")
    p.add_argument("--audio-column", default="audio", help="column holding the audio (hf)")
    p.add_argument("--audio-keys", help="comma-separated extensions of the audio member (webdataset) "
                                        "or of the files to read (folder)")
    p.add_argument("--streaming", action="store_true", help="read the hf dataset as a stream")
    p.add_argument("--n-quantizers", type=int, help="codebooks to store (default: all)")
    p.add_argument("--per-channel", action="store_true", help="code each channel on its own (default: mono downmix)")
    p.add_argument("--batch-seconds", type=float, help="audio per forward pass, padding included (default per device)")
    p.add_argument("--chunk-seconds", type=float, help="longest audio per forward pass (default per device)")
    p.add_argument("--pool-seconds", type=float, help="audio sorted by length at a time (default 4 x batch)")
    p.add_argument("--num-workers", type=int, default=2, help="decoding workers per process (default 2)")
    p.add_argument("--shard-records", type=int, default=10000, help="records per shard at most")
    p.add_argument("--shard-frames", type=int, default=20_000_000, help="code frames per shard at most")
    p.add_argument("--min-seconds", type=float, default=0.0, help="skip shorter records (listed as 'short')")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--device", help="cpu or cuda (default: cuda when available; cuda:LOCAL_RANK under torchrun)")
    p.add_argument("--compile", action="store_true", help="fuse Snake activations with torch.compile")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from audiotok.bulk import BulkConfig, InputSpec, tokenize_dataset

    spec = InputSpec(args.input_type, args.input, split=args.split, audio_column=args.audio_column,
                     audio_keys=args.audio_keys, streaming=args.streaming)
    config = BulkConfig(
        spec, args.output, args.model, format=args.format, n_quantizers=args.n_quantizers,
        mono=not args.per_channel, batch_seconds=args.batch_seconds, chunk_seconds=args.chunk_seconds,
        pool_seconds=args.pool_seconds, num_workers=args.num_workers, shard_records=args.shard_records,
        shard_frames=args.shard_frames, min_seconds=args.min_seconds, dtype=args.dtype, device=args.device,
        compile=args.compile, progress=not args.no_progress,
    )
    summary = tokenize_dataset(config)
    if int(os.environ.get("RANK", 0)) == 0:
        print(summary, flush=True)


if __name__ == "__main__":
    main()
