"""``.atok`` files: the codes of one encoded audio file, in a safe, documented container.

Format (``format_version`` 1)
=============================

An ``.atok`` file is a `safetensors <https://github.com/huggingface/safetensors>`_ file. Nothing in
it is executable (no pickle). Layout, as in every safetensors file:

1. 8 bytes: ``N``, the header length, an unsigned 64-bit little-endian integer.
2. ``N`` bytes: a UTF-8 JSON object (the header). Its ``"__metadata__"`` entry is an object of
   string keys to **string** values (listed below); every other entry describes one tensor as
   ``{"dtype": ..., "shape": [...], "data_offsets": [begin, end]}`` with offsets relative to the
   start of the data section.
3. The data section, from byte ``8 + N`` to the end of the file: the raw tensor bytes,
   little-endian, C (row-major) order. The file ends exactly where the last tensor ends.

The ``N`` header bytes may end with spaces (padding to a multiple of 8 bytes); JSON parsers skip them.

Metadata (all values are strings; integers are written in decimal ASCII):

======================== ======================================================================
key                      meaning
======================== ======================================================================
``format``               always ``"audiotok-codes"``
``format_version``       ``"1"``. A reader must refuse a version newer than it knows.
``model_id``             name of the model that wrote the codes (informational, may be ``"random"``;
                         a reader must not load a model by this name without the user's say-so)
``config_hash``          ``DACConfig.architecture_hash()`` of that model: 16 lowercase hex digits.
                         Codes are only meaningful to a model with the same hash.
``sample_rate``          the model's sample rate in Hz (decoded audio comes out at this rate)
``hop_length``           audio samples (at ``sample_rate``) per code frame
``n_codebooks``          ``K``, the number of codebooks stored (may be fewer than the model has:
                         residual codebooks are ordered, the first ``K`` are stored)
``codebook_size``        number of entries per codebook; every code is in ``[0, codebook_size)``
``num_samples``          length of the original audio in samples, at ``source_sample_rate``
``source_sample_rate``   sample rate in Hz of the original audio file
``channels``             channel count of the original audio file
``packing``              ``"none"`` or ``"10bit"`` (how the codes tensor is stored, see below)
``shape``                ``"C,K,F"``: the code array's shape as three comma-separated decimal integers
``codes_fingerprint``    optional: ``checkpoint.codes_fingerprint`` of the weights that wrote the
                         codes (16 lowercase hex digits). A model of the same architecture with
                         another fingerprint has other codebooks: a reader should refuse to decode
                         unless told otherwise.
``crc32``                optional (files written before audiotok recorded it have none and are read unchecked):
                         8 lowercase hex digits, the CRC-32 (``zlib.crc32``) of the other metadata
                         entries, each as the UTF-8 line ``key=value\n`` in sorted key order,
                         followed by the codes as ``uint16`` little-endian bytes in C order (the
                         ``[C, K, F]`` codes, whatever the packing). A reader must refuse a file
                         whose checksum does not match: it was damaged or edited.
======================== ======================================================================

A file's ``sample_rate``, ``hop_length`` and ``codebook_size`` must be those of the model its
``config_hash`` names: a reader refuses to decode a file that states other values (it was edited).

Readers must ignore metadata keys and tensors they do not know.

The codes form a ``[C, K, F]`` array of integers:

* ``C`` coded channels: 1 when the file's channels were averaged to mono before coding (the
  default), or ``channels`` when each channel was coded on its own.
* ``K`` codebooks, equal to ``n_codebooks``.
* ``F`` frames: ``ceil(T / hop_length)`` where ``T`` is the audio length after resampling to
  ``sample_rate``, i.e. ``T = round(num_samples * sample_rate / source_sample_rate)`` up to the
  resampler's rounding (this reader allows a difference of one frame).

``packing = "none"``: one tensor ``codes``, dtype ``U16``, shape ``[C, K, F]``.

``packing = "10bit"`` (only when ``codebook_size <= 1024``): one tensor ``codes_packed``, dtype
``U8``, shape ``[5 * ceil(C*K*F / 4)]``. Take the codes in C order (``c`` slowest, then ``k``, then
``f``), append zeros up to a multiple of 4, and write each group of four codes ``a, b, c, d`` as
the 40-bit integer ``a | b << 10 | c << 20 | d << 30`` in 5 bytes, least significant byte first
(equivalently: one little-endian bit stream, 10 bits per code, least significant bit first). The
padding codes must be zero. To read, reverse this and keep the first ``C*K*F`` codes.

The original duration in seconds is ``num_samples / source_sample_rate``; a decoder produces
``F * hop_length`` samples at ``sample_rate`` per channel and crops them to
``round(num_samples * sample_rate / source_sample_rate)`` (nearest integer, ties to even, as Python's
``round``).
"""

from __future__ import annotations

import math
import os
import re
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..codes import PACKED_10BIT_CODEBOOK_SIZE, check_10bit, check_frames, check_uint16, is_integer_dtype
from ..identity import CodecIdentity
from ..utils.io import atomic_write

if TYPE_CHECKING:
    from ..tokenizer import AudioTokenizer, EncodedAudio

FORMAT_NAME = "audiotok-codes"
FORMAT_VERSION = 1
SUFFIX = ".atok"
PACKINGS = ("none", "10bit")

_INT_FIELDS = ("sample_rate", "hop_length", "n_codebooks", "codebook_size", "num_samples",
               "source_sample_rate", "channels")
_STR_FIELDS = ("model_id", "config_hash", "packing")
REQUIRED_METADATA = ("format", "format_version", *_STR_FIELDS, *_INT_FIELDS, "shape")
_CRC32 = re.compile(r"[0-9a-f]{8}")


class DisagreeingFields(ValueError):
    """A code file states a ``sample_rate``, ``hop_length`` or ``codebook_size`` other than the model its
    ``config_hash`` names has: the file was edited or damaged (not a file of another model)."""


def checksum(meta: dict[str, str], codes: np.ndarray) -> str:
    """The ``crc32`` metadata entry of a file with metadata ``meta`` (its own ``crc32`` left out) and
    codes ``[C, K, F]`` (see the module docstring)."""
    text = "".join(f"{k}={v}\n" for k, v in sorted(meta.items()) if k != "crc32")
    crc = zlib.crc32(text.encode("utf-8", "surrogatepass"))
    crc = zlib.crc32(np.ascontiguousarray(codes, dtype="<u2").tobytes(), crc)
    return f"{crc:08x}"


# ---------------------------------------------------------------------------------------------
# 10-bit packing


def pack_codes_10bit(codes: np.ndarray | torch.Tensor) -> np.ndarray:
    """Integer codes in ``[0, 1024)`` (any shape, read in C order) -> ``uint8`` bytes, 4 codes in 5 bytes."""
    flat = np.asarray(codes).reshape(-1).astype(np.int64)
    if flat.size and (flat.min() < 0 or flat.max() >= PACKED_10BIT_CODEBOOK_SIZE):
        raise ValueError(f"10-bit packing needs codes in [0, {PACKED_10BIT_CODEBOOK_SIZE}), "
                         f"found range [{flat.min()}, {flat.max()}]")
    padded = np.zeros(-(-flat.size // 4) * 4, dtype=np.uint64)
    padded[: flat.size] = flat
    groups = padded.reshape(-1, 4)
    word = groups[:, 0] | groups[:, 1] << np.uint64(10) | groups[:, 2] << np.uint64(20) | groups[:, 3] << np.uint64(30)
    shifts = np.arange(0, 40, 8, dtype=np.uint64)
    return ((word[:, None] >> shifts) & np.uint64(0xFF)).astype(np.uint8).reshape(-1)


def unpack_codes_10bit(packed: np.ndarray, count: int) -> np.ndarray:
    """Inverse of :func:`pack_codes_10bit`: the first ``count`` codes as ``int64``.

    Raises ``ValueError`` if ``packed`` has the wrong length or non-zero padding.
    """
    packed = np.asarray(packed)
    if packed.dtype != np.uint8 or packed.ndim != 1:
        raise ValueError(f"packed codes must be a 1-D uint8 array, got {packed.dtype} with shape {packed.shape}")
    expected = 5 * -(-count // 4)
    if packed.size != expected:
        raise ValueError(f"packed codes have {packed.size} bytes; {count} codes need {expected}")
    rows = packed.reshape(-1, 5).astype(np.uint64)
    word = np.zeros(rows.shape[0], dtype=np.uint64)
    for i in range(5):
        word |= rows[:, i] << np.uint64(8 * i)
    shifts = np.arange(0, 40, 10, dtype=np.uint64)
    codes = ((word[:, None] >> shifts) & np.uint64(0x3FF)).astype(np.int64).reshape(-1)
    if codes[count:].any():
        raise ValueError("packed codes have non-zero padding after the last code (corrupt data)")
    return codes[:count]


# ---------------------------------------------------------------------------------------------
# Header


@dataclass
class _CodeInfo:
    """What an ``.atok`` file records besides its codes (see the module docstring): ``codec`` is
    stored as ``model_id``, ``config_hash`` and ``codes_fingerprint``."""

    codec: CodecIdentity
    sample_rate: int
    hop_length: int
    n_codebooks: int
    codebook_size: int
    num_samples: int
    source_sample_rate: int
    channels: int

    @property
    def duration(self) -> float:
        """Duration of the original audio in seconds."""
        return self.num_samples / self.source_sample_rate

    def check_compatible(self, tokenizer: AudioTokenizer, allow_other_weights: bool = False) -> None:
        """Raise ``ValueError`` (naming both models) unless ``tokenizer`` has the architecture these codes
        were written with and, unless ``allow_other_weights``, the same encoder and quantizer weights
        (:meth:`AudioTokenizer.check_codec <audiotok.tokenizer.AudioTokenizer.check_codec>`; when the
        file records their fingerprint); :class:`DisagreeingFields` if the file states rates or
        codebooks other than those of the model its ``config_hash`` names."""
        from ..tokenizer import ALLOW_OTHER_WEIGHTS

        tokenizer.check_codec(self.codec, "the file holds", allow_other_weights, ALLOW_OTHER_WEIGHTS)
        stated = {"sample_rate": (self.sample_rate, tokenizer.sample_rate),
                  "hop_length": (self.hop_length, tokenizer.hop_length),
                  "codebook_size": (self.codebook_size, tokenizer.codebook_size)}
        wrong = [f"{k}={ours} (the model has {theirs})" for k, (ours, theirs) in stated.items() if ours != theirs]
        if self.n_codebooks > tokenizer.n_codebooks:
            wrong.append(f"n_codebooks={self.n_codebooks} (the model has {tokenizer.n_codebooks})")
        if wrong:
            raise DisagreeingFields(f"the codes state {', '.join(wrong)}, yet their config_hash "
                                    f"{self.codec.config_hash} is that of {tokenizer.model_id!r}: the file was "
                                    f"edited or damaged")


@dataclass
class CodeHeader(_CodeInfo):
    """The metadata of an ``.atok`` file (see the module docstring), without the codes."""

    packing: str
    shape: tuple[int, int, int]
    format_version: int = FORMAT_VERSION
    crc32: str | None = None  # the checksum the file records (checked when the codes are read)

    @property
    def output_samples(self) -> int:
        """Samples per channel that decoding yields, at the model's ``sample_rate``."""
        return round(self.num_samples * self.sample_rate / self.source_sample_rate)


def _parse_metadata(meta: dict[str, str] | None, where: str) -> CodeHeader:
    meta = meta or {}
    if meta.get("format") != FORMAT_NAME:
        raise ValueError(f"{where}: not an audiotok codes file (format={meta.get('format')!r}, "
                         f"expected {FORMAT_NAME!r})")
    try:
        version = int(meta.get("format_version", ""))
    except ValueError:
        raise ValueError(f"{where}: invalid format_version {meta.get('format_version')!r}") from None
    if version > FORMAT_VERSION:
        raise ValueError(f"{where}: written by a newer audiotok (format_version {version}); this version reads "
                         f"format_version {FORMAT_VERSION} and older. Upgrade audiotok")
    if version < 1:
        raise ValueError(f"{where}: invalid format_version {version}")
    missing = [k for k in REQUIRED_METADATA if k not in meta]
    if missing:
        raise ValueError(f"{where}: metadata is missing required fields: {', '.join(missing)}")
    values: dict[str, object] = {"packing": meta["packing"]}
    for key in _INT_FIELDS:
        try:
            value = int(meta[key])
        except ValueError:
            raise ValueError(f"{where}: metadata field {key}={meta[key]!r} is not an integer") from None
        if value <= 0:
            raise ValueError(f"{where}: metadata field {key}={value} must be positive")
        values[key] = value
    try:
        shape = tuple(int(s) for s in meta["shape"].split(","))
    except ValueError:
        shape = ()
    if len(shape) != 3 or min(shape) <= 0:
        raise ValueError(f"{where}: metadata shape={meta['shape']!r} is not three positive integers 'C,K,F'")
    codec = CodecIdentity.from_dict(meta, f"{where}: metadata")
    crc32 = meta.get("crc32")
    if crc32 is not None and not _CRC32.fullmatch(crc32):
        raise ValueError(f"{where}: metadata crc32={crc32!r} is not 8 lowercase hex digits")
    header = CodeHeader(codec, **values, shape=shape, format_version=version, crc32=crc32)  # type: ignore[arg-type]
    if header.packing not in PACKINGS:
        raise ValueError(f"{where}: unknown packing {header.packing!r}; expected one of {PACKINGS}")
    c, k, f = shape
    if k != header.n_codebooks:
        raise ValueError(f"{where}: codes have {k} codebooks but the metadata says n_codebooks={header.n_codebooks}")
    if c != 1 and c != header.channels:
        raise ValueError(f"{where}: codes have {c} coded channels; expected 1 (mono mix) or channels={header.channels}")
    check_frames(f, header.num_samples, header.source_sample_rate, header.sample_rate, header.hop_length, where)
    return header


def _open(path: Path):
    from safetensors import safe_open

    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        return safe_open(str(path), framework="np")
    except Exception as e:  # SafetensorError for truncated or corrupt files, OSError, ...
        raise ValueError(f"{path}: not a readable {SUFFIX} file (truncated or corrupt): {e}") from e


def read_header(path: str | os.PathLike) -> CodeHeader:
    """Read and check only the metadata of an ``.atok`` file (cheap; the codes are not read)."""
    path = Path(path)
    with _open(path) as f:
        return _parse_metadata(f.metadata(), str(path))


# ---------------------------------------------------------------------------------------------
# CodeFile


@dataclass
class CodeFile(_CodeInfo):
    """The codes of one audio file plus what is needed to decode them (see the module docstring).

    ``codes`` is an int64 tensor ``[C, K, F]``. ``packing`` records how the file was stored when it
    was loaded; :meth:`save` decides the packing by its own argument.
    """

    codes: torch.Tensor
    packing: str = "none"

    def __post_init__(self) -> None:
        codes = self.codes
        if isinstance(codes, np.ndarray):
            codes = torch.from_numpy(codes)
        if not isinstance(codes, torch.Tensor) or not is_integer_dtype(codes.dtype):
            raise ValueError("CodeFile.codes must be an integer tensor [C, K, F]")
        if codes.ndim != 3 or 0 in codes.shape:
            raise ValueError(f"CodeFile.codes must be a non-empty [C, K, F] tensor, got shape {tuple(codes.shape)}")
        self.codes = codes.to(torch.int64).cpu()
        lo, hi = int(self.codes.min()), int(self.codes.max())
        if lo < 0 or hi >= self.codebook_size:
            raise ValueError(f"code values must be in [0, {self.codebook_size}), found range [{lo}, {hi}]")
        check_uint16(self.codebook_size)
        if self.packing not in PACKINGS:
            raise ValueError(f"packing must be one of {PACKINGS}, got {self.packing!r}")
        # Checks the remaining fields exactly as a reader would.
        _parse_metadata(self._metadata(self.packing), "CodeFile")

    # -- construction ----------------------------------------------------------------------------

    @classmethod
    def from_encoded(cls, tokenizer: AudioTokenizer, encoded: EncodedAudio, index: int | Sequence[int] = 0,
                     channels: int | None = None) -> CodeFile:
        """The codes of item ``index`` of ``encoded`` (cropped to its valid frames).

        ``encoded.codes`` is ``[B, K, F]`` (one coded channel per item) or ``[B, C, K, F]`` (channels
        coded one by one). With ``[B, K, F]``, ``index`` may also be a list of items of equal length,
        one per coded channel (for audio whose channels were encoded as a batch of clips).
        ``channels`` is the channel count of the original audio file (default: the number of items in
        ``index`` when it lists several, else what ``encoded.channels`` records for the item, else 1).
        """
        tokenizer.check_encoded(encoded, allow_other_weights=True)
        tokenizer.identity.check_codes_of(encoded.codec, "EncodedAudio holds")  # the file names its writer: this one
        indices = [index] if isinstance(index, (int, np.integer)) else list(index)
        batch = encoded.codes.shape[0]
        if not indices or any(not 0 <= int(i) < batch for i in indices):
            raise ValueError(f"index {index} out of range for a batch of {batch}")
        frames = {int(encoded.lengths[i]) for i in indices}
        samples = {int(encoded.num_samples[i]) for i in indices}
        if len(frames) != 1 or len(samples) != 1:
            raise ValueError("items coded as channels of one file must have equal lengths")
        if encoded.codes.ndim == 4:
            if len(indices) != 1:
                raise ValueError("with per-channel codes [B, C, K, F], index must be a single item")
            codes = encoded.codes[int(indices[0]), :, :, : frames.pop()]
        else:
            codes = encoded.codes[[int(i) for i in indices], :, : frames.pop()]
        if channels is None:
            known = encoded.channels is not None and len(indices) == 1
            channels = int(encoded.channels[int(indices[0])]) if known else len(indices)  # type: ignore[index]
        config = tokenizer.config
        return cls(
            codes=codes, codec=tokenizer.identity, sample_rate=config.sample_rate, hop_length=config.hop_length,
            n_codebooks=codes.shape[1], codebook_size=config.codebook_size, num_samples=samples.pop(),
            source_sample_rate=int(encoded.sample_rate), channels=int(channels),
        )

    def to_encoded(self) -> EncodedAudio:
        """An :class:`~audiotok.tokenizer.EncodedAudio` with one batch item per coded channel."""
        from ..tokenizer import EncodedAudio

        c, _, f = self.codes.shape
        return EncodedAudio(self.codes.clone(), torch.full((c,), f), torch.full((c,), self.num_samples),
                            self.source_sample_rate, self.codec, torch.full((c,), 1 if c > 1 else self.channels))

    # -- properties ------------------------------------------------------------------------------

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.codes.shape)  # type: ignore[return-value]

    @property
    def header(self) -> CodeHeader:
        return _parse_metadata(self._metadata(self.packing), "CodeFile")

    # -- I/O ---------------------------------------------------------------------------------------

    def _metadata(self, packing: str) -> dict[str, str]:
        meta = {"format": FORMAT_NAME, "format_version": str(FORMAT_VERSION), "packing": packing,
                "shape": ",".join(str(s) for s in self.codes.shape)}
        meta.update((k, v) for k, v in self.codec.to_dict().items() if v is not None)
        for f in fields(self):
            if f.name not in ("codes", "packing", "codec"):
                meta[f.name] = str(getattr(self, f.name))
        return {**meta, "crc32": checksum(meta, self.codes.numpy())}

    def to_bytes(self, pack_10bit: bool = False) -> bytes:
        """The file's contents (see the module docstring)."""
        from safetensors.numpy import save

        if pack_10bit:
            check_10bit(self.codebook_size)
            tensors = {"codes_packed": pack_codes_10bit(self.codes.numpy())}
        else:
            tensors = {"codes": self.codes.numpy().astype(np.uint16)}
        return save(tensors, metadata=self._metadata("10bit" if pack_10bit else "none"))

    def save(self, path: str | os.PathLike, pack_10bit: bool = False) -> Path:
        """Write the file atomically (:func:`audiotok.utils.io.atomic_write`).

        Parent folders are created. A crash leaves either the old file or the new one, never a
        partial file at ``path``. Returns the path.
        """
        path = Path(path)
        data = self.to_bytes(pack_10bit)
        with atomic_write(path) as f:
            f.write(data)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> CodeFile:
        """Read an ``.atok`` file.

        Raises ``FileNotFoundError`` if it does not exist and ``ValueError`` if it is truncated or
        corrupt, is not an audiotok codes file, has a newer ``format_version``, lacks metadata, or
        holds codes that disagree with its metadata.
        """
        path = Path(path)
        where = str(path)
        with _open(path) as f:
            meta = f.metadata() or {}
            header = _parse_metadata(meta, where)
            name = "codes" if header.packing == "none" else "codes_packed"
            if name not in f.keys():
                raise ValueError(f"{where}: packing={header.packing!r} but the file has no {name!r} tensor")
            try:
                data = f.get_tensor(name)
            except Exception as e:
                raise ValueError(f"{where}: cannot read tensor {name!r}: {e}") from e
        if header.packing == "none":
            if data.dtype != np.uint16:
                raise ValueError(f"{where}: codes must be uint16, found {data.dtype}")
            if tuple(data.shape) != header.shape:
                raise ValueError(f"{where}: codes have shape {tuple(data.shape)} but the metadata says {header.shape}")
            codes = data.astype(np.int64)
        else:
            try:
                check_10bit(header.codebook_size)
            except ValueError as e:
                raise ValueError(f"{where}: {e}") from None
            try:
                codes = unpack_codes_10bit(data, math.prod(header.shape)).reshape(header.shape)
            except ValueError as e:
                raise ValueError(f"{where}: {e} (metadata shape {header.shape})") from None
        if codes.max() >= header.codebook_size:
            raise ValueError(f"{where}: code value {codes.max()} out of range for codebook_size {header.codebook_size}")
        if header.crc32 is not None and checksum(meta, codes) != header.crc32:
            raise ValueError(f"{where}: checksum mismatch (crc32 {header.crc32} recorded, {checksum(meta, codes)} "
                             f"computed): the codes or the metadata were damaged or edited")
        return cls(
            codes=torch.from_numpy(codes), codec=header.codec, sample_rate=header.sample_rate,
            hop_length=header.hop_length, n_codebooks=header.n_codebooks, codebook_size=header.codebook_size,
            num_samples=header.num_samples, source_sample_rate=header.source_sample_rate, channels=header.channels,
            packing=header.packing,
        )
