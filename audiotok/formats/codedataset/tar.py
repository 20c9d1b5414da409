"""WebDataset tar shards of a code dataset: the writer and the reader (see :mod:`audiotok.formats.codedataset`)."""

from __future__ import annotations

import io
import json
import os
import tarfile
import zlib
from collections.abc import Iterator
from typing import IO, Any

import numpy as np

from ...utils.untrusted import parse_json
from .records import RECORD_FIELDS, CodeRecord, ShardWriter, check_record, damaged

#: Tar member suffixes of a record: ``{key}.codes.npy``, ``{key}.meta.json`` (kept metadata, format 3)
#: and ``{key}.json`` (matched in this order: ``.meta.json`` also ends in ``.json``).
MEMBER_SUFFIXES = {"codes": ".codes.npy", "metadata": ".meta.json", "json": ".json"}
#: Tar member of a sidecar shard's sample that has no codes: ``{key}.failure.txt`` (``reason: detail``).
FAILURE_SUFFIX = ".failure.txt"


class TarShardWriter(ShardWriter):
    """WebDataset tar: members ``{key}.codes.npy`` (``np.save`` of the uint16 codes) and ``{key}.json``
    (the record fields, and the ``codes_fingerprint`` of ``metadata``; the manifest holds the rest).
    Members have mtime 0, so the same records give the same bytes."""

    suffix = ".tar"

    def __init__(self, path: str | os.PathLike, metadata: dict[str, Any] | None = None,
                 kept_fields: tuple[str, ...] = (), staged: bool = False):
        super().__init__(path, metadata, kept_fields, staged)
        self._file = open(self.tmp, "wb")
        self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.PAX_FORMAT)

    def _member(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = len(data), 0, 0o644
        self._tar.addfile(info, io.BytesIO(data))

    def add_failure(self, key: str, reason: str, detail: str = "") -> None:
        """Member ``{key}``:data:`FAILURE_SUFFIX` (text ``reason: detail``) for a sample that has no
        codes (sidecar shards; readers of records pass it over)."""
        self._member(key + FAILURE_SUFFIX, (f"{reason}: {detail}" if detail else reason).encode())

    def _add(self, meta: dict[str, Any], codes: np.ndarray) -> None:
        buf = io.BytesIO()
        np.save(buf, np.ascontiguousarray(codes.astype("<u2", copy=False)), allow_pickle=False)
        self._member(meta["key"] + MEMBER_SUFFIXES["codes"], buf.getvalue())
        fields = {k: meta[k] for k in RECORD_FIELDS}
        if self.metadata.get("codes_fingerprint") is not None:
            fields["codes_fingerprint"] = self.metadata["codes_fingerprint"]
        self._member(meta["key"] + MEMBER_SUFFIXES["json"], json.dumps(fields).encode())
        if self.kept_fields:
            kept = {k: meta["metadata"][k] for k in self.kept_fields}
            self._member(meta["key"] + MEMBER_SUFFIXES["metadata"], json.dumps(kept).encode())

    def _finish(self) -> None:
        if not self._file.closed:
            self._tar.close()
            self._file.flush()
            self._file.close()


def _split_member(name: str) -> tuple[str, str] | None:
    """``(key, "codes" | "metadata" | "json")`` for a record's tar member, ``None`` for any other member."""
    for kind, suffix in MEMBER_SUFFIXES.items():
        if name.endswith(suffix):
            return name[: -len(suffix)], kind
    return None


def read_tar(path: str | os.PathLike, fileobj: IO[bytes] | None = None,
             expected: dict[str, Any] | None = None) -> Iterator[CodeRecord]:
    """The records of the tar shard ``path`` (read from ``fileobj`` when given), each checked
    (:func:`~audiotok.formats.codedataset.records.check_record`)."""
    with damaged(path, (tarfile.TarError, EOFError, zlib.error)):
        yield from _tar_records(path, fileobj, expected)


def _tar_records(path: str | os.PathLike, fileobj: IO[bytes] | None,
                 expected: dict[str, Any] | None) -> Iterator[CodeRecord]:
    members: dict[str, bytes] = {}
    key: str | None = None

    def record(key: str) -> CodeRecord:
        missing = {"codes", "json"} - set(members)
        if missing:
            raise ValueError(f"{path}: record {key!r} has no {' or '.join(sorted(missing))} member")
        where = f"{path}: member {key!r}"
        try:
            codes = np.load(io.BytesIO(members["codes"]), allow_pickle=False)
        except (ValueError, EOFError, OSError) as e:
            raise ValueError(f"{where}{MEMBER_SUFFIXES['codes']}: not a readable .npy array ({e})") from None
        kept = {}
        if "metadata" in members:
            kept = parse_json(members["metadata"], where + MEMBER_SUFFIXES["metadata"], dict)
        meta = parse_json(members["json"], where + MEMBER_SUFFIXES["json"], dict)
        return check_record(CodeRecord(key, codes, meta, kept), path, expected)

    with tarfile.open(path if fileobj is None else None, mode="r|*", fileobj=fileobj) as tar:
        for member in tar:
            split = _split_member(member.name) if member.isfile() else None
            if split is None:
                continue
            name, kind = split
            if key is not None and name != key:
                yield record(key)
                members = {}
            key = name
            data = tar.extractfile(member)  # a regular file (isfile above): never None
            members[kind] = data.read() if data is not None else b""
    if key is not None:
        yield record(key)
