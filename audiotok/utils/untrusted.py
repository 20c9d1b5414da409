"""What came from outside, checked before use: JSON of a known shape, text shown escaped, numbers in range.

One implementation of each rule, used by every reader:

* :func:`parse_json` / :func:`read_json`: JSON from a file (model and prior ``config.json``, dataset
  manifests, shard records, bulk job files). The size and the nesting depth are bounded before the
  text is parsed, ``NaN`` and ``Infinity`` are refused, and the value must have the expected
  :data:`Shape`; every failure is one ``ValueError`` that names the file and the entry.
* :func:`shown`: a string from a file (a model id, a notice, a shard path) as it may be printed:
  control, format and other non-printable characters escaped, so that a file cannot move the
  cursor, clear the screen or start a new line in a terminal or a log; :func:`one_line`: an error
  message the same way, as the one line a command prints.
* :func:`check_number` / :func:`number_arg`: a setting or command-line argument that must be a
  finite number (an integer where it counts) within bounds, checked before anything is allocated.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: Largest JSON text read (bytes); far above any manifest, config or job file audiotok writes.
MAX_JSON_BYTES = 64 << 20
#: Deepest nesting of arrays and objects read; audiotok's own files nest 5 deep at most.
MAX_JSON_DEPTH = 64

# A JSON string (the closing quote optional, so the pattern never fails and never backtracks), and
# runs of characters other than brackets: what is left of a JSON text after removing both is its
# bracket structure.
_STRING = re.compile(r'"(?:[^"\\]+|\\.)*"?')
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")


# ---------------------------------------------------------------------------------------------
# Text


def shown(text: object) -> str:
    """``str(text)`` with every non-printable character (control characters such as ESC, CR and
    newline, Unicode format characters such as bidirectional overrides, lone surrogates) written as
    its Python escape (``\\x1b``, ``\\n``, ``\\u202e``): safe to print. Printable text is unchanged,
    so ``shown(shown(s)) == shown(s)``."""
    text = str(text)
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def one_line(error: BaseException) -> str:
    """The message of ``error`` as one printable line (:func:`shown`): its lines joined with `` | ``, or,
    when it carries a traceback (an error re-raised from a DataLoader worker or a Ray task), its last
    line, the original error."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if any("Traceback (most recent call last)" in line for line in lines):
        lines = lines[-1:]
    return shown(" | ".join(lines) or type(error).__name__)


# ---------------------------------------------------------------------------------------------
# JSON


@dataclass(frozen=True)
class OptionalEntry:
    """An entry of an object :data:`Shape` that may be missing (``None`` only if ``shape`` allows it)."""

    shape: Shape


#: The expected shape of a JSON value: a type or tuple of types (``int`` excludes ``bool``; ``float``
#: takes integers too; ``type(None)`` is ``null``; ``object`` is anything), ``[shape]`` (an array of
#: values of ``shape``) or ``{"key": shape, "other": OptionalEntry(shape)}`` (an object with those entries;
#: other keys are allowed and not checked).
Shape = Any

_NAMES = {dict: "an object", list: "an array", str: "a string", int: "an integer", float: "a number",
          bool: "true or false", type(None): "null", object: "any value"}


def json_depth(text: str) -> int:
    """The deepest nesting of arrays and objects in a JSON text (brackets inside strings do not
    count), found without parsing it."""
    brackets = _NOT_BRACKET.sub("", _STRING.sub("", text))
    return max(itertools.accumulate(1 if c in "[{" else -1 for c in brackets), default=0)


def _refuse_constant(name: str) -> float:
    raise ValueError(f"{name} is not a number JSON allows")


def _infinity(name: str) -> float:
    if name == "NaN":
        _refuse_constant(name)
    return float(name)


def parse_json(data: bytes | str, where: str | os.PathLike, shape: Shape, *, infinity: bool = False) -> Any:
    """The JSON value of ``data``, checked: ``ValueError`` naming ``where`` (the file) if it is larger
    than :data:`MAX_JSON_BYTES`, nested deeper than :data:`MAX_JSON_DEPTH`, not JSON (``NaN`` and
    ``Infinity`` included) or not of ``shape`` (see :data:`Shape`). ``infinity`` takes ``Infinity`` and
    ``-Infinity``, which Python's ``json`` writes for infinite floats (files audiotok wrote before it wrote
    ``null`` instead)."""
    if len(data) > MAX_JSON_BYTES:
        raise ValueError(f"{where}: {len(data)} bytes of JSON, more than the {MAX_JSON_BYTES} this reader takes")
    try:
        text = data.decode("utf-8") if isinstance(data, bytes) else data
    except UnicodeDecodeError as e:
        raise ValueError(f"{where}: not UTF-8 text ({e})") from None
    depth = json_depth(text)
    if depth > MAX_JSON_DEPTH:
        raise ValueError(f"{where}: JSON nested {depth} deep, more than the {MAX_JSON_DEPTH} this reader takes")
    try:
        value = json.loads(text, parse_constant=_infinity if infinity else _refuse_constant)
    except ValueError as e:  # JSONDecodeError is a ValueError
        raise ValueError(f"{where}: not valid JSON ({shown(e)})") from None
    check_shape(value, shape, where)
    return value


def read_json(path: str | os.PathLike, shape: Shape) -> Any:
    """:func:`parse_json` of a local file (its size checked before it is read)."""
    path = Path(path)
    size = path.stat().st_size
    if size > MAX_JSON_BYTES:
        raise ValueError(f"{path}: {size} bytes of JSON, more than the {MAX_JSON_BYTES} this reader takes")
    return parse_json(path.read_bytes(), path, shape)


def _describe(shape: Shape) -> str:
    if isinstance(shape, tuple):
        return " or ".join(_describe(s) for s in shape)
    if isinstance(shape, list):
        return f"an array of {_describe(shape[0]).removeprefix('a ').removeprefix('an ')}s"
    if isinstance(shape, dict):
        return "an object"
    return _NAMES.get(shape, shape.__name__)


def _is(value: Any, kind: type) -> bool:
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, kind)


def check_shape(value: Any, shape: Shape, where: str | os.PathLike, entry: str = "") -> None:
    """``ValueError`` naming ``where`` and the entry (``shards[3].path``) unless ``value`` has
    ``shape`` (see :data:`Shape`)."""
    name = entry or "the top level"
    if isinstance(shape, dict):
        if not isinstance(value, dict):
            raise ValueError(f"{where}: {name} must be an object, got {_kind(value)}")
        for key, sub in shape.items():
            if isinstance(sub, OptionalEntry):
                if key not in value:
                    continue
                sub = sub.shape
            elif key not in value:
                raise ValueError(f"{where}: {name if entry else 'the file'} has no {key!r} entry")
            check_shape(value[key], sub, where, f"{entry}.{key}" if entry else key)
    elif isinstance(shape, list):
        if not isinstance(value, list):
            raise ValueError(f"{where}: {name} must be {_describe(shape)}, got {_kind(value)}")
        for i, item in enumerate(value):
            check_shape(item, shape[0], where, f"{entry}[{i}]")
    elif not any(_is(value, kind) for kind in (shape if isinstance(shape, tuple) else (shape,))):
        raise ValueError(f"{where}: {name} must be {_describe(shape)}, got {_kind(value)}")


def _kind(value: Any) -> str:
    """A short description of a JSON value for an error message (its type, and a scalar's value)."""
    if isinstance(value, (dict, list)):
        return _NAMES[type(value)]
    text = repr(value)  # repr escapes control characters
    return text if len(text) <= 40 else text[:37] + "..."


# ---------------------------------------------------------------------------------------------
# Numbers


def check_number(value: object, name: str, *, minimum: float | None = None, maximum: float | None = None,
                 above: float | None = None, integer: bool = False) -> Any:
    """``value`` unless it is not a finite number (an ``int``, not a ``bool``, when ``integer``) with
    ``minimum <= value <= maximum`` and ``value > above`` (each bound when given): then ``ValueError``
    naming the setting ``name``."""
    kind = "an integer" if integer else "a number"
    numeric = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not numeric or not math.isfinite(value):  # type: ignore[arg-type]
        raise ValueError(f"{name} must be {kind}, got {value!r}")
    number: float = value  # type: ignore[assignment]
    if ((minimum is not None and number < minimum) or (above is not None and not number > above)
            or (maximum is not None and number > maximum)):
        bounds = [f"{op} {b}" for op, b in ((">=", minimum), (">", above), ("<=", maximum)) if b is not None]
        raise ValueError(f"{name} must be {kind} {' and '.join(bounds)}, got {value!r}")
    return value


def number_arg(integer: bool = False, **bounds: float) -> Callable[[str], Any]:
    """An ``argparse`` ``type`` for a number argument: the text as an ``int`` (``integer``) or a
    ``float``, checked by :func:`check_number` with ``bounds`` (``minimum``, ``maximum``, ``above``)."""

    def parse(text: str) -> Any:
        try:
            value = int(text) if integer else float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not {'an integer' if integer else 'a number'}: {text!r}") from None
        try:
            return check_number(value, "the value", integer=integer, **bounds)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    parse.__name__ = "integer" if integer else "number"  # argparse names the type in some messages
    return parse
