"""The ``audiotok`` command line (:mod:`.main`) and its helpers: encoding and decoding files and
folder trees (:mod:`.files`), describing and converting models (:mod:`.modelinfo`)."""

from .main import build_parser, main

__all__ = ["build_parser", "main"]
