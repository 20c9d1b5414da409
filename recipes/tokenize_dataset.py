"""Tokenize a whole dataset into code shards (WebDataset tar or Parquet) with a manifest.

    python recipes/tokenize_dataset.py --input corpus/ --input-type folder --output codes/
    python recipes/tokenize_dataset.py --input saved_ds/ --input-type hf --split train --audio-column audio \\
        --output codes/ --format parquet
    torchrun --nproc_per_node 8 recipes/tokenize_dataset.py --input 'data/train-{000..511}.tar' \\
        --input-type webdataset --audio-keys flac,wav --output codes/ --model descript/dac_44khz --device cuda \\
        --dtype bf16

    python recipes/tokenize_dataset.py --input 's3://corpus/train-{000..099}.tar' --input-type webdataset \\
        --output s3://codes/train --storage-options '{"profile": "research"}'
    python recipes/tokenize_dataset.py --input 'data/train-{000..511}.tar' --input-type webdataset \\
        --output /shared/codes --engine ray --ray-address auto --device cuda --dtype bf16

--input and --output take fsspec URLs (s3://, gs://, hf://; pip install 'audiotok[cloud]' for s3, gcsfs
for gs): a shard appears there only when complete and the manifest last, as on a local folder.
The model defaults to the one bundled with audiotok (offline). Multi-node: run the same torchrun
command on every node (--nnodes, --rdzv-endpoint), or launch the same command as independent
processes anywhere, with --output on a shared filesystem: processes claim parts of the input
(a tar shard, --part-records rows) through the output folder until all are done. Running the same
command again resumes an interrupted job, with any number of processes, nodes and --num-workers
(a dead process's parts are taken over once its claims lapse, after --lease-seconds; at once on
its own host), and does nothing for a finished one. --engine ray runs the same job on a Ray cluster
(one actor per GPU, parts read by Ray tasks) with the same output; either engine resumes the other's
job. The output format is described in audiotok/formats/codedataset/; the work split in
audiotok/bulk/__init__.py.

Exit status: 0 when every record was tokenized; 1 when some records failed (unreadable, empty,
NaN, too short: listed under "failures" in the output's manifest.json); 2 for errors that stop the
job (bad arguments, a missing input, model or package); 4 when the output's storage failed (disk
full, permission denied, object store unreachable): nothing is wrong with the input, and the same
command run again once the storage works resumes the job. Errors are printed as one line.
"""

import argparse
import importlib
import json
import logging
import os
import sys

log = logging.getLogger("audiotok.tokenize")

# Packages each input type and output format needs, with the extra that installs them.
_NEEDS = {"hf": ("datasets", "data"), "webdataset": ("webdataset", "data"), "parquet": ("pyarrow", "data"),
          "ray": ("ray", "ray")}


def json_object(text: str) -> dict:
    """An argparse type: a JSON object."""
    value = json.loads(text)
    if not isinstance(value, dict):
        raise ValueError(f"expected a JSON object, got {text!r}")
    return value


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, nargs="+",
                   help="folder, Hugging Face dataset (saved folder, audio folder, hub id) or tar shards "
                        "(paths, globs, brace patterns; several allowed for webdataset)")
    p.add_argument("--input-type", required=True, choices=["hf", "webdataset", "folder"])
    p.add_argument("--output", required=True, help="output folder (shared by all ranks) or fsspec URL (s3://...)")
    p.add_argument("--storage-options", type=json_object, default={},
                   help="JSON object of fsspec filesystem options (credentials, endpoint_url, ...) for a URL "
                        "--output and, unless --input-storage-options is given, a URL --input")
    p.add_argument("--input-storage-options", type=json_object, default=None,
                   help="JSON object of fsspec filesystem options for a URL --input")
    p.add_argument("--model", default=None,
                   help="audiotok / transformers folder, .pth file, hub id or alias (default: the bundled model, "
                        "alias 'default'; `audiotok info` names it)")
    p.add_argument("--format", default="webdataset", choices=["webdataset", "parquet"])
    p.add_argument("--layout", default="pooled", choices=["pooled", "sidecar"],
                   help="pooled: shards part-NNNNNN-NNNN; sidecar (webdataset input and format): one code shard "
                        "per input shard with its sample keys, NAME.tar -> NAME.codes.tar")
    p.add_argument("--split", default="train", help="dataset split (hf)")
    p.add_argument("--audio-column", default="audio", help="column holding the audio (hf)")
    p.add_argument("--audio-keys", help="comma-separated extensions of the audio member (webdataset) "
                                        "or of the files to read (folder); m4a needs audiotok[ffmpeg]")
    p.add_argument("--keep-columns", default="",
                   help="comma-separated fields stored with the codes as each record's metadata: columns (hf), "
                        "members such as txt,json (webdataset) or sidecar extensions such as txt (folder: "
                        "clip.txt next to clip.wav)")
    p.add_argument("--streaming", action="store_true", help="read the hf dataset as a stream")
    p.add_argument("--n-quantizers", type=int, help="codebooks to store (default: all)")
    p.add_argument("--per-channel", action="store_true", help="code each channel on its own (default: mono downmix)")
    p.add_argument("--batch-seconds", type=float, help="audio per forward pass, padding included (default per device)")
    p.add_argument("--chunk-seconds", type=float, help="longest audio per forward pass (default per device)")
    p.add_argument("--pool-seconds", type=float, help="audio sorted by length at a time (default 4 x batch)")
    p.add_argument("--num-workers", type=int,
                   help="decoding workers per process (default: its share of the machine's cores less one, at most 16)")
    p.add_argument("--part-records", type=int, default=1000,
                   help="rows per part of a folder or saved hf dataset (the unit of work claimed; tar shards "
                        "and streaming hf shards are parts of their own)")
    p.add_argument("--shard-records", type=int, default=10000, help="records per shard at most")
    p.add_argument("--shard-frames", type=int, default=20_000_000, help="code frames per shard at most")
    p.add_argument("--min-seconds", type=float, default=0.0, help="skip shorter records (listed as 'short')")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--device", help="cpu or cuda (default: cuda when available; cuda:LOCAL_RANK under torchrun)")
    p.add_argument("--compile", action="store_true", help="fuse Snake activations with torch.compile")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--lease-seconds", type=float, default=600.0,
                   help="a claim on a part lapses this long after its last renewal, and another process "
                        "takes the part over (default 600)")
    p.add_argument("--engine", default="torch", choices=["torch", "ray"],
                   help="torch: this process (one of any number, torchrun or not) with DataLoader workers; "
                        "ray: actors and read tasks on a Ray cluster (pip install 'audiotok[ray]'); same output")
    p.add_argument("--ray-actors", type=int,
                   help="encoding actors (ray; default: one per GPU with --device cuda, else half the CPUs); "
                        "--num-workers is then the read tasks per actor")
    p.add_argument("--ray-address",
                   help="Ray cluster to join, e.g. auto (default: RAY_ADDRESS or a running local cluster, else a "
                        "local instance for the job)")
    return p.parse_args(argv)


def check_packages(args: argparse.Namespace) -> None:
    """Every package the job needs, before any work: a missing one is an ImportError naming the extra
    (or, for a URL, the package of its scheme)."""
    from audiotok.utils.urls import check_scheme

    for location in (*args.input, args.output):
        check_scheme(location)
    for need in (args.input_type, args.format, args.engine):
        if need in _NEEDS:
            package, extra = _NEEDS[need]
            try:
                importlib.import_module(package)
            except ImportError:
                raise ImportError(f"{need} needs the {package} package: pip install 'audiotok[{extra}]'") from None


#: Exit status when the output's storage failed (see the docstring).
EXIT_STORAGE = 4


def main(argv=None) -> int:
    from audiotok.utils.io import StorageError
    from audiotok.utils.untrusted import shown

    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        check_packages(args)
        from audiotok.bulk import BulkConfig, InputSpec, tokenize_dataset

        spec = InputSpec(args.input_type, args.input, split=args.split, audio_column=args.audio_column,
                         audio_keys=args.audio_keys, streaming=args.streaming, keep=args.keep_columns,
                         storage_options=args.storage_options if args.input_storage_options is None
                         else args.input_storage_options)
        unread = spec.unread_extensions()
        if unread:
            log.warning("not read (extensions not in --audio-keys): %s",
                        shown(", ".join(f"{n} {ext}" for ext, n in unread.items())))
        config = BulkConfig(
            spec, args.output, args.model, format=args.format, layout=args.layout, n_quantizers=args.n_quantizers,
            mono=not args.per_channel, batch_seconds=args.batch_seconds, chunk_seconds=args.chunk_seconds,
            pool_seconds=args.pool_seconds, part_records=args.part_records,
            shard_records=args.shard_records,
            shard_frames=args.shard_frames, min_seconds=args.min_seconds, dtype=args.dtype, device=args.device,
            compile=args.compile, progress=not args.no_progress, lease_seconds=args.lease_seconds,
            storage_options=args.storage_options, engine=args.engine, ray_actors=args.ray_actors,
            ray_address=args.ray_address, **({} if args.num_workers is None else {"num_workers": args.num_workers}),
        )
        summary = tokenize_dataset(config)
    except StorageError as e:
        print(f"tokenize_dataset: error: the output's storage failed: {shown(e)}; run the same command again "
              "once it works (the job resumes)", file=sys.stderr)
        return EXIT_STORAGE
    except (ValueError, OSError, ImportError) as e:  # FileNotFoundError (input, model), hub errors, bad settings
        print(f"tokenize_dataset: error: {shown(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("tokenize_dataset: interrupted (run the same command again to resume)", file=sys.stderr)
        return 130
    if int(os.environ.get("RANK", 0)) == 0:
        print(summary, flush=True)
    return 1 if summary.failures else 0


if __name__ == "__main__":
    sys.exit(main())
