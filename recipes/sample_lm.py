"""Sample audio from a trained prior: from nothing, from a text, or continuing an audio prompt.

    python recipes/sample_lm.py --prior runs/prior --out sample.wav --seconds 8
    python recipes/sample_lm.py --prior runs/tts --out hello.wav --text "hello there" --top-p 0.9
    python recipes/sample_lm.py --prior runs/prior --out cont.wav --prompt speech.wav --prompt-seconds 3 --seconds 8

The prompt is encoded with the prior's codec (the model its codes came from, or --codec: a model of
another architecture, or of other encoder and quantizer weights, is refused) and is part of the output.
Audio is written while it is generated, to a temporary name renamed to --out when the sample is
complete (a killed run leaves no partial file there). Exit status: 0 success, 2 a bad setting,
prior, codec or prompt, 4 the output could not be written (disk full, permission denied).
"""

import argparse
import sys
from pathlib import Path

from audiotok import DACConfig
from audiotok.lm.sampling import MIN_TEMPERATURE, check_sampling
from audiotok.utils.untrusted import number_arg, shown

#: Longest output (seconds): a day of audio.
MAX_SECONDS = 86400.0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prior", required=True, help="a prior folder or a training run folder")
    p.add_argument("--out", required=True, help="WAV file; with --num-samples N > 1, OUT-0.wav ... OUT-(N-1).wav")
    p.add_argument("--codec", help="the codec to decode with (default: the model id the prior records)")
    p.add_argument("--text", help="text for a text-conditioned prior")
    p.add_argument("--prompt", help="an audio file to continue")
    p.add_argument("--prompt-seconds", type=number_arg(above=0), default=None,
                   help="seconds of the prompt used (default 3)")
    p.add_argument("--seconds", type=number_arg(above=0, maximum=MAX_SECONDS), default=8.0,
                   help="longest output, prompt included (default 8)")
    p.add_argument("--temperature", type=number_arg(minimum=0), default=1.0,
                   help=f"0 for greedy, else at least {MIN_TEMPERATURE} (default 1)")
    p.add_argument("--top-k", type=number_arg(integer=True, minimum=0), default=0,
                   help="keep the k most likely ids (default 0: all)")
    p.add_argument("--top-p", type=number_arg(above=0, maximum=1), default=1.0,
                   help="nucleus sampling mass (default 1: off)")
    p.add_argument("--num-samples", type=number_arg(integer=True, minimum=1), default=1)
    p.add_argument("--seed", type=number_arg(integer=True, minimum=0), help="sampling seed (default: random)")
    p.add_argument("--device", help="cpu or cuda (default: cpu)")
    args = p.parse_args(argv)
    try:  # every setting before anything is loaded
        check_sampling(args.temperature, args.top_k, args.top_p)
    except ValueError as e:
        p.error(str(e))
    if args.prompt_seconds is not None and not args.prompt:
        p.error("--prompt-seconds needs --prompt")
    prompt_seconds = 3.0 if args.prompt_seconds is None else args.prompt_seconds
    if args.prompt and prompt_seconds > args.seconds:
        p.error(f"--prompt-seconds {prompt_seconds} is longer than the output (--seconds {args.seconds}), "
                "which includes the prompt")

    from audiotok.utils.io import StorageError

    try:
        _sample(args, prompt_seconds)
    except StorageError as e:  # the output's storage: run again once it works
        print(f"sample_lm: error: cannot write the output: {shown(e)}; run the same command again once the "
              "storage works", file=sys.stderr)
        return 4
    except (ValueError, OSError) as e:  # a bad prior folder, codec or prompt: one line
        print(f"sample_lm: error: {shown(e)}", file=sys.stderr)
        return 2
    return 0


def _sample(args: argparse.Namespace, prompt_seconds: float) -> None:
    from audiotok import AudioTokenizer
    from audiotok.audio import load_audio
    from audiotok.lm import CodePrior, sample_to_wav
    from audiotok.lm.prior import prior_folder, read_prior_config

    frame_rate = DACConfig.from_dict(read_prior_config(prior_folder(args.prior))["codec"]["config"]).frame_rate
    max_frames = round(args.seconds * frame_rate)
    if max_frames < 1:
        raise ValueError(f"--seconds {args.seconds} is less than one code frame ({1 / frame_rate:.4f} s)")
    prior = CodePrior.from_pretrained(args.prior, device=args.device)
    tok = AudioTokenizer.from_pretrained(args.codec or prior.codec.model_id, device=args.device)
    prior.check_codec(tok)
    prompt = None
    if args.prompt:
        audio, sr = load_audio(args.prompt)  # bounded, and a truncated prompt is warned about
        prompt = tok.encode(audio[:, : round(prompt_seconds * sr)], sr).codes[0]
    out = Path(args.out)
    for i in range(args.num_samples):
        path = out if args.num_samples == 1 else out.with_name(f"{out.stem}-{i}{out.suffix}")
        seed = None if args.seed is None else args.seed + i
        codes = sample_to_wav(prior, tok, path, text=args.text, prompt=prompt, max_frames=max_frames,
                              temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=seed)
        print(f"{path}: {codes.shape[1]} frames ({codes.shape[1] / tok.frame_rate:.2f} s)", flush=True)


if __name__ == "__main__":
    sys.exit(main())
