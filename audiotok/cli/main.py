"""The ``audiotok`` command line: encode, decode, info and convert.

Exit status: 0 on success; 1 when inputs failed (a folder run skipped some files, listed in the
summary); 2 for errors the user can fix (bad arguments, missing files, a model that does not fit the
codes, a device that cannot run); 3 for an internal error (a bug: please report it); 4 when an output
could not be written (disk full, permission denied: the run stops there; run it again once the storage
works, and the files already written are kept). Every failure is one line on stderr,
``audiotok: error: ...`` (``-vv`` adds the traceback of an internal error). Inputs and outputs are
checked before a model loads.

Output: ``encode`` and ``decode`` of one file print one line (duration, frames, codebooks, bitrate,
speed), of a folder a summary listing the skipped files. ``-q``: no progress bars and no line of a
single file; warnings (skipped files, partly read inputs, a model's notice) stay. ``-qq``: errors only.
A model's notice (the bundled model is an early checkpoint) is shown once, when it encodes;
``AUDIOTOK_NO_NOTICE=1`` silences it alone.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from .. import __version__
from ..utils.io import StorageError
from ..utils.untrusted import number_arg, one_line, shown

if TYPE_CHECKING:
    from ..tokenizer import AudioTokenizer
    from .files import BatchReport

_EPILOG = ("exit status: 0 success, 1 some files in a folder were skipped (see the summary), "
           "2 usage or input error, 3 internal error, 4 an output could not be written (disk full, permission "
           "denied): run again once the storage works. AUDIOTOK_NO_NOTICE=1: no notice of the model (the bundled "
           "model is an early checkpoint)")
EXIT_OK, EXIT_SKIPPED, EXIT_USAGE, EXIT_INTERNAL, EXIT_STORAGE = 0, 1, 2, 3, 4
_QUIET_HELP = ("-q: no progress bars, no line for a single file (warnings such as skipped files stay); "
               "-qq: errors only")


class _Parser(argparse.ArgumentParser):
    """Usage errors in one line (the usage text stays behind ``--help``)."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"audiotok: error: {message} (see {self.prog} --help)\n")


class _StderrHandler(logging.Handler):
    """Log lines on the current ``sys.stderr``, without breaking a tqdm progress bar."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(f"audiotok: {record.levelname.lower()}: {shown(self.format(record))}", file=sys.stderr)
        except Exception:
            self.handleError(record)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    logging.getLogger("audiotok").warning("%s", message)


def _setup_logging(verbose: int, quiet: int = 0) -> None:
    """Warnings and errors on stderr, one line each; ``quiet`` 2 or more: errors only; ``verbose``: info, debug."""
    warnings.showwarning = _show_warning  # one line each, like the log lines
    logger = logging.getLogger("audiotok")
    if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
        logger.addHandler(_StderrHandler())
    level = (logging.ERROR if quiet > 1 else logging.DEBUG if verbose > 1 else logging.INFO if verbose
             else logging.WARNING)
    logger.setLevel(level)


def _add_runtime_options(p: argparse.ArgumentParser) -> None:
    from ..tokenizer import DTYPES

    p.add_argument("--device", default=None, help="torch device, e.g. cpu or cuda (default: cuda when available, "
                                                  "else cpu)")
    p.add_argument("--dtype", default="fp32", choices=list(DTYPES),
                   help="fp32 (exact codes) or bf16 / fp16 (faster on GPUs and bf16 CPUs; some codes differ)")
    p.add_argument("--compile", action="store_true",
                   help="fuse the Snake activations with torch.compile (faster after seconds of compiling)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("-q", "--quiet", action="count", default=argparse.SUPPRESS, help=_QUIET_HELP)


def build_parser() -> argparse.ArgumentParser:
    from ..audio import AUDIO_EXTENSIONS, AUDIO_SUBTYPES
    from ..weights.checkpoint import STORAGE_DTYPES
    from ..weights.hub import describe_names
    from .modelinfo import CONVERT_FORMATS

    parser = _Parser(
        prog="audiotok", description="Audio to discrete DAC codes and back.",
        epilog=f"model names: {describe_names()}. {_EPILOG}")
    parser.add_argument("--version", action="version", version=f"audiotok {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output")
    parser.add_argument("-q", "--quiet", action="count", default=0, help=_QUIET_HELP)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)

    model_help = (f"model source: a model folder, an original DAC .pth file, a hub id or a name ({describe_names()}). "
                  "Default: the bundled model")

    p = sub.add_parser("encode", help="audio file or folder -> .atok code files", epilog=_EPILOG,
                       description="Encode an audio file to an .atok file, or every audio file under a folder "
                                   "to a mirrored tree of .atok files.")
    p.add_argument("input", type=Path, metavar="INPUT", help="audio file or folder")
    p.add_argument("output", type=Path, metavar="OUTPUT", help=".atok file (or existing folder) for a file; "
                                                               "output folder for a folder")
    p.add_argument("--model", default=None, metavar="SRC", help=model_help)
    p.add_argument("--n-quantizers", type=_positive_int, default=None, metavar="K",
                   help="store only the first K codebooks (default: all)")
    _add_runtime_options(p)
    p.add_argument("--pack-10bit", action="store_true",
                   help="bit-pack the codes, 10 bits each (codebook_size <= 1024)")
    p.add_argument("--per-channel", action="store_true",
                   help="code each channel separately instead of averaging them to mono")
    p.add_argument("--extensions", default=",".join(e.lstrip(".") for e in AUDIO_EXTENSIONS), metavar="LIST",
                   help="comma-separated audio extensions to pick up in folders (default: %(default)s)")
    p.add_argument("--overwrite", action="store_true",
                   help="in a folder, encode every file again (default: keep the outputs an earlier run wrote with "
                        "the same model and settings, newer than their input)")
    p.set_defaults(func=_cmd_encode)

    p = sub.add_parser("decode", help=".atok file or folder -> audio", epilog=_EPILOG,
                       description="Decode an .atok file, or every .atok file under a folder, to audio "
                                   "cropped to the original duration.")
    p.add_argument("input", type=Path, metavar="INPUT", help=".atok file or folder")
    p.add_argument("output", type=Path, metavar="OUTPUT", help="audio file (or existing folder) for a file; "
                                                               "output folder for a folder")
    p.add_argument("--model", default=None, metavar="SRC",
                   help="model source (default: the model that ships with audiotok; the model a code file names "
                        "is never loaded from it)")
    p.add_argument("--allow-other-weights", action="store_true",
                   help="decode codes written by a model of the same architecture with other weights")
    _add_runtime_options(p)
    p.add_argument("--format", choices=("wav", "flac"), default=None,
                   help="output format (default: the output file's extension; wav for folders)")
    p.add_argument("--subtype", type=str.upper, choices=AUDIO_SUBTYPES, default=None,
                   help="sample format (default: PCM_16 for WAV, PCM_24 for FLAC; FLOAT keeps the model's output "
                        "exactly)")
    p.add_argument("--sample-rate", type=_sample_rate, default=None, metavar="HZ|source",
                   help="write at this rate, or 'source' for the rate of the audio that was encoded "
                        "(default: the model's rate)")
    p.set_defaults(func=_cmd_decode)

    p = sub.add_parser("info", help="describe a model, an .atok file or a code dataset", epilog=_EPILOG,
                       description="Describe a model, an .atok file or a code dataset (a folder with manifest.json: "
                                   "its token rate and per-codebook usage, as a language model will see it). "
                                   f"Model names: {describe_names()}.")
    p.add_argument("source", metavar="SRC", nargs="?", default=None,
                   help="model source, .atok file or code dataset folder (default: the bundled model)")
    p.add_argument("--max-records", type=int, default=2000, metavar="N",
                   help="code datasets: per-codebook statistics over the first N records (default 2000)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser("convert", help="convert a model between checkpoint formats", epilog=_EPILOG)
    p.add_argument("source", metavar="SRC", help="model source")
    p.add_argument("dst", type=Path, metavar="DST", help="output folder (audiotok, transformers) or .pth file")
    p.add_argument("--to", required=True, choices=CONVERT_FORMATS, help="target format")
    p.add_argument("--model-id", default=None, help="the id the copy records (default: the source's)")
    p.add_argument("--dtype", choices=list(STORAGE_DTYPES), default=None,
                   help="store the weights in this precision (default: as loaded, fp32); fp16 halves the file and "
                        "the copy still decodes code files of the source (see 'info': decodes_codes_of)")
    p.set_defaults(func=_cmd_convert)
    return parser


_positive_int = number_arg(integer=True, minimum=1)


def _sample_rate(text: str) -> int | str:
    return "source" if text == "source" else _positive_int(text)


def _progress(args: argparse.Namespace) -> bool | None:
    """``False`` when asked for no bars, ``None`` (bars on a terminal) otherwise."""
    return False if args.no_progress or args.quiet else None


def _load_options(args: argparse.Namespace) -> dict:
    from ..tokenizer import DTYPES

    return {"dtype": DTYPES[args.dtype], "compile": args.compile}


def _model_loader(args: argparse.Namespace) -> Callable[[], AudioTokenizer]:
    """What loads ``--model`` with the runtime options, called once the inputs and outputs passed their checks."""
    from ..tokenizer import AudioTokenizer
    from ..utils.distributed import rank_device

    device = rank_device(args.device)
    return lambda: AudioTokenizer.from_pretrained(args.model, device=device, **_load_options(args))


def _finish(report: BatchReport, verb: str, single: bool, quiet: int) -> int:
    if not single:
        print(report.summary(verb))
    elif not quiet:
        print(_file_line(report, verb))
    return EXIT_OK if report.ok else EXIT_SKIPPED


def _file_line(report: BatchReport, verb: str) -> str:
    """``encoded a.flac -> a.atok: 3.20 s of audio, 240 frames x 10 codebooks (7.50 kbps), Nx real time``
    for a run on one file (and its code file's ``x C channels`` when coded per channel)."""
    from ..formats.codefile import read_header
    from ..nn.config import bitrate

    src, dst = report.done[0]
    header = read_header(dst if verb == "encoded" else src)
    channels, codebooks, frames = header.shape
    kbps = channels * bitrate(header.sample_rate / header.hop_length, codebooks, header.codebook_size) / 1000
    coded = f"{frames} frames x {codebooks} codebooks" + (f" x {channels} channels" if channels > 1 else "")
    speed = header.duration / max(report.seconds, 1e-9)
    return (f"{verb} {shown(src)} -> {shown(dst)}: {header.duration:.2f} s of audio, {coded} ({kbps:.2f} kbps), "
            f"{speed:.3g}x real time")


def _cmd_encode(args: argparse.Namespace) -> int:
    from .files import encode_path

    report = encode_path(_model_loader(args), args.input, args.output, n_quantizers=args.n_quantizers,
                         per_channel=args.per_channel, pack_10bit=args.pack_10bit, extensions=args.extensions,
                         progress=_progress(args), overwrite=args.overwrite)
    return _finish(report, "encoded", args.input.is_file(), args.quiet)


def _cmd_decode(args: argparse.Namespace) -> int:
    from ..utils.distributed import rank_device
    from .files import decode_path

    loader = None if args.model is None else _model_loader(args)
    report = decode_path(args.input, args.output, loader, format=args.format, device=rank_device(args.device),
                         progress=_progress(args), sample_rate=args.sample_rate, subtype=args.subtype,
                         allow_other_weights=args.allow_other_weights, **_load_options(args))
    return _finish(report, "decoded", args.input.is_file(), args.quiet)


def _cmd_info(args: argparse.Namespace) -> int:
    from ..formats.codedataset import is_code_dataset
    from ..formats.codefile import SUFFIX
    from ..weights.hub import describe_names
    from .modelinfo import code_dataset_info, code_file_info, model_info

    path = Path(args.source or "").expanduser()
    is_code_file = args.source is not None and path.is_file() and path.suffix == SUFFIX
    is_dataset = args.source is not None and is_code_dataset(path)
    if is_code_file:
        info = code_file_info(path)
    elif is_dataset:
        info = code_dataset_info(path, args.max_records)
    else:
        info = model_info(args.source)
        if not args.json:
            info["model_names"] = describe_names()  # every name --model takes besides paths and hub ids
    if args.json:
        print(json.dumps(info, indent=2))  # escapes every control character
    else:
        width = max(len(k) for k in info)
        for key, value in info.items():
            if isinstance(value, list):  # a shape, or one value per codebook
                value = (" x " if key.endswith("shape") else " ").join(str(v) for v in value)
            print(f"{key:<{width}}  {shown(value)}")
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    from .modelinfo import convert_model

    dst = convert_model(args.source, args.dst, args.to, model_id=args.model_id, dtype=args.dtype)
    print(f"wrote {args.to} checkpoint to {shown(dst)}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (argparse usage errors exit with 2)."""
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose, args.quiet)
    try:
        return args.func(args)
    except StorageError as e:
        print(f"audiotok: error: cannot write the output: {one_line(e)}; run the same command again once "
              "the storage works (files already written are kept)", file=sys.stderr)
        return EXIT_STORAGE
    except (ValueError, OSError) as e:  # FileNotFoundError, PermissionError, ... are OSErrors
        print(f"audiotok: error: {one_line(e)}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("audiotok: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a bug: one line, the traceback with -vv
        logging.getLogger("audiotok").debug("internal error", exc_info=True)
        print(f"audiotok: error: internal error ({type(e).__name__}: {one_line(e)}); please report it",
              file=sys.stderr)
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
