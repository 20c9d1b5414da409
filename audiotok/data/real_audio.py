"""The real-audio set: recorded speech, music and sound shipped in Debian (bookworm, main) packages.

:func:`fetch` downloads the packages of a tier with ``apt-get download`` (nothing is installed),
keeps only their audio files and their ``copyright`` files (each package's licence terms, kept next
to its audio), and :func:`write_manifest` indexes the tree into ``manifest.csv``, which the
``manifest`` source (:func:`audiotok.data.config.read_manifest`) reads::

    DEST/deb/PACKAGE/usr/share/.../*.ogg, .../copyright     audio and licence of each package
    DEST/pypi/pysptk_arctic/arctic_a0007.wav                one CMU ARCTIC utterance (eval)
    DEST/manifest.csv                                       split, category, source, license, path,
                                                            sr, channels, seconds, format, subtype

Train and eval never share a package, except ``festvox-ru`` (one Russian speaker), whose last 62
utterances are a same-speaker eval set, and ``tuxpaint-stamps-default``, split by the language of
its spoken descriptions (English and French are eval). Exact duplicates (same bytes) are kept once.

Tiers: ``ci`` (about 130 MB download, 3.3 h of audio), ``core`` (3.2 GB, 38 h; what the bundled
model was trained on) and ``full`` (core plus two game data packages, +2 GB download, 43 h).
"""

from __future__ import annotations

import collections
import csv
import hashlib
import logging
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
import zipfile
from collections.abc import Iterable
from pathlib import Path, PurePosixPath
from typing import IO

from .pack import MANIFEST_COLUMNS

log = logging.getLogger("audiotok.data")

CI_PACKAGES = ("sonic-pi-samples", "ufoai-sound", "fretsonfire-songs-sectoid", "fillets-ng-data-cs",
               "asterisk-core-sounds-en-wav")
CORE_PACKAGES = (
    # speech
    "festvox-ru", "tuxpaint-stamps-default", "fillets-ng-data", "fillets-ng-data-cs", "fillets-ng-data-nl",
    "klettres-data", "ktuberling-data", "hedgewars-data", "megaglest-data", "asterisk-core-sounds-en-wav",
    # music
    "wesnoth-1.16-music", "ufoai-music", "planetblupi-music-ogg", "naev-data", "supertux-data", "widelands-data",
    "nexuiz-music", "colobot-common-sounds", "marsshooter-data", "warzone2100-music", "fretsonfire-songs-sectoid",
    # environmental sound, effects, instruments
    "wesnoth-1.16-data", "ufoai-sound", "hydrogen-drumkits", "sonic-pi-samples", "lmms-common",
)
HEAVY_PACKAGES = ("0ad-data", "supertuxkart-data")
TIERS = {"ci": CI_PACKAGES, "core": CORE_PACKAGES, "full": CORE_PACKAGES + HEAVY_PACKAGES}

#: Extensions of the audio files kept (all read by libsndfile).
AUDIO_EXTENSIONS = (".wav", ".ogg", ".oga", ".opus", ".flac", ".aif", ".aiff", ".mp3")

#: Licence of each source, as its copyright file states it (per file where it says so).
LICENSES = {
    "festvox-ru": "BSD-like (N. Shmyrev)", "tuxpaint-stamps-default": "GPL-2",
    "fillets-ng-data": "GPL-2", "fillets-ng-data-cs": "GPL-2", "fillets-ng-data-nl": "GPL-2",
    "klettres-data": "GPL-2+", "ktuberling-data": "GPL-2+ (some CC0/CC-BY)",
    "hedgewars-data": "GPL-2 (mixed)", "megaglest-data": "CC-BY-SA-3.0",
    "asterisk-core-sounds-en-wav": "CC-BY-SA-3.0", "wesnoth-1.16-music": "GPL-2+",
    "wesnoth-1.16-data": "GPL-2+", "ufoai-music": "GPL-2+/CC-BY-SA-3.0/CC-BY-3.0/PD (per file)",
    "ufoai-sound": "GPL-2+/CC-BY-SA-3.0/CC-BY-3.0/PD (per file)", "planetblupi-music-ogg": "GPL-3+",
    "naev-data": "CC-BY-SA-3.0/CC-BY-3.0/PD/GPL (per file)", "supertux-data": "GPL-2+/GPL-3+/CC-BY-SA (per file)",
    "widelands-data": "GPL-2+/CC-BY-SA-3.0", "nexuiz-music": "GPL-2+",
    "colobot-common-sounds": "GPL-3+", "marsshooter-data": "GPL-3+/CC-BY-SA-3.0/CC-BY-3.0",
    "warzone2100-music": "GPL-2+/CC-BY-SA-3.0/CC0 (per file)", "fretsonfire-songs-sectoid": "GPL",
    "hydrogen-drumkits": "GPL-2+/CC-BY-3.0/CC-BY-SA-3.0/CC0 (per kit)",
    "sonic-pi-samples": "CC0 (mostly), CC-BY-SA-4.0", "lmms-common": "GPL-2+",
    "0ad-data": "CC-BY-SA-3.0 (Wildfire Games)", "supertuxkart-data": "CC-BY-SA-3.0/4.0, CC0, CC-BY (per file)",
    "pysptk_arctic": "CMU ARCTIC (BSD-like)",
}
MUSIC = {"wesnoth-1.16-music", "ufoai-music", "planetblupi-music-ogg", "nexuiz-music", "warzone2100-music",
         "fretsonfire-songs-sectoid"}
INSTRUMENTS = {"hydrogen-drumkits", "sonic-pi-samples", "lmms-common"}
SPEECH = {"festvox-ru", "fillets-ng-data-cs", "fillets-ng-data-nl", "klettres-data", "ktuberling-data"}
EVAL = {"fretsonfire-songs-sectoid", "ufoai-sound"}
MUSIC_OR_GENERAL = {"naev-data", "supertux-data", "widelands-data", "colobot-common-sounds", "marsshooter-data",
                    "supertuxkart-data"}
#: festvox-ru's last utterances (in path order) form a same-speaker eval set.
FESTVOX_EVAL = 62
#: The one PyPI source: an sdist that carries a CMU ARCTIC utterance.
PYPI_CLIP = ("pysptk", "1.0.1", "arctic_a0007.wav", "pysptk_arctic")
PYPI_SIMPLE = "https://pypi.org/simple"


def classify(source: str, rel: str) -> tuple[str, str] | None:
    """``(split, category)`` of a file at ``rel`` (path inside its source) of ``source``; ``None`` to
    leave it out. Categories: speech, speech8k (telephone speech, eval only), music, instrument, general.
    festvox-ru is split by position instead (see :func:`manifest_rows`)."""
    r = "/" + rel
    low = r.lower()
    if source == "pysptk_arctic":
        return "eval", "speech"
    if source == "asterisk-core-sounds-en-wav":
        return "eval8k", "speech8k"
    if source == "tuxpaint-stamps-default":
        m = re.search(r"_desc(?:_([A-Za-z_@]+))?\.\w+$", r)
        if not m:
            return "eval", "general"  # the stamps' sound effects (animals, vehicles, ...)
        return ("eval" if (m.group(1) or "en") in ("fr", "en") else "train"), "speech"
    if source == "fillets-ng-data":
        if "/sound/" in r and "/en/" in r:
            return "eval", "speech"
        return "train", "music" if "/music/" in r else "general"
    if source == "hedgewars-data":
        return "train", "speech" if "/voices/" in low else "music" if "/music/" in low else "general"
    if source == "megaglest-data":
        if "/music/" in r:
            return "train", "music"
        return "train", "speech" if re.search(r"(select|ack|sel_|_ok|yes|order)[^/]*$", r) else "general"
    if source == "0ad-data":
        return "train", "music" if "/music/" in r else "speech" if "/voice/" in r else "general"
    if source in MUSIC_OR_GENERAL:
        return "train", "music" if "/music/" in r else "general"
    split = "eval" if source in EVAL else "train"
    if source in MUSIC:
        return split, "music"
    if source in INSTRUMENTS:
        return split, "instrument"
    if source in SPEECH:
        return split, "speech"
    return split, "general"


def _audio_files(folder: Path) -> list[Path]:
    found = (Path(d) / f for d, _, names in os.walk(folder) for f in names if f.lower().endswith(AUDIO_EXTENSIONS))
    return sorted(found, key=str)


def manifest_rows(dest: str | os.PathLike) -> list[dict[str, str]]:
    """One row per usable audio file under ``dest/deb`` and ``dest/pypi`` (columns
    :data:`~audiotok.data.pack.MANIFEST_COLUMNS`; ``path`` relative to ``dest``). Files libsndfile
    cannot read, empty files and exact duplicates of a file listed before are left out."""
    import soundfile as sf

    dest = Path(dest)
    rows, seen = [], set()
    for top in ("deb", "pypi"):
        base = dest / top
        for source in sorted(os.listdir(base)) if base.is_dir() else []:
            files = _audio_files(base / source)
            for k, path in enumerate(files):
                if source == "festvox-ru":
                    found: tuple[str, str] | None = ("eval" if k >= len(files) - FESTVOX_EVAL else "train", "speech")
                else:
                    found = classify(source, path.relative_to(base / source).as_posix())
                if found is None:
                    continue
                try:
                    info = sf.info(str(path))
                except Exception:  # not audio libsndfile reads
                    continue
                digest = hashlib.md5(path.read_bytes()).hexdigest()
                if digest in seen or info.frames <= 0:
                    continue
                seen.add(digest)
                rows.append({"split": found[0], "category": found[1], "source": source,
                             "license": LICENSES.get(source, "?"), "path": path.relative_to(dest).as_posix(),
                             "sr": str(info.samplerate), "channels": str(info.channels),
                             "seconds": str(round(info.frames / info.samplerate, 3)), "format": info.format,
                             "subtype": info.subtype})
    return rows


def write_manifest(dest: str | os.PathLike) -> list[dict[str, str]]:
    """Index ``dest`` into ``dest/manifest.csv`` (see :func:`manifest_rows`); returns the rows."""
    rows = manifest_rows(dest)
    with open(Path(dest) / "manifest.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=MANIFEST_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    return rows


def summary(rows: Iterable[dict[str, str]]) -> str:
    """Files, minutes and the commonest sample rates per split and category."""
    totals: dict[tuple[str, str], list] = collections.defaultdict(lambda: [0, 0.0, collections.Counter()])
    for row in rows:
        t = totals[row["split"], row["category"]]
        t[0] += 1
        t[1] += float(row["seconds"])
        t[2][int(row["sr"])] += float(row["seconds"])
    lines = [f"{'split':7s} {'category':11s} {'files':>6s} {'minutes':>8s}  top sample rates (minutes)"]
    for (split, category), (n, seconds, rates) in sorted(totals.items()):
        top = ", ".join(f"{sr / 1000:g}k:{s / 60:.0f}" for sr, s in rates.most_common(4))
        lines.append(f"{split:7s} {category:11s} {n:6d} {seconds / 60:8.1f}  {top}")
    files, hours = sum(t[0] for t in totals.values()), sum(t[1] for t in totals.values()) / 3600
    return "\n".join(lines + [f"total: {files} files, {hours:.1f} h"])


# ---------------------------------------------------------------------------------------------
# Fetching


def _safe_path(name: str) -> PurePosixPath | None:
    """An archive member's path if it stays inside the folder it is extracted to."""
    path = PurePosixPath(name.lstrip("/"))
    parts = [p for p in path.parts if p not in ("", ".")]
    return None if not parts or ".." in parts else PurePosixPath(*parts)


def _keep(name: str) -> bool:
    return name.lower().endswith(AUDIO_EXTENSIONS) or PurePosixPath(name).name == "copyright"


def extract_tar(stream: IO[bytes], out: Path) -> int:
    """Extract the audio files, ``copyright`` files and the audio inside ``.pk3`` (zip) archives
    of a tar stream into ``out``; returns the number of files written."""
    written = 0
    with tarfile.open(fileobj=stream, mode="r|*") as tar:
        for member in tar:
            path = _safe_path(member.name)
            data = tar.extractfile(member) if path is not None and member.isfile() else None
            if path is None or data is None:
                continue
            if path.suffix.lower() == ".pk3":  # Quake-style zip archives (ufoai-*, nexuiz-*)
                with tempfile.TemporaryFile() as tmp:
                    shutil.copyfileobj(data, tmp)
                    tmp.seek(0)
                    written += extract_zip(tmp, out / path.parent / f"{path.stem}_pk3")
            elif _keep(path.name):
                target = out / path
                target.parent.mkdir(parents=True, exist_ok=True)
                with open(target, "wb") as f:
                    shutil.copyfileobj(data, f)
                written += 1
    return written


def extract_zip(file: IO[bytes] | Path, out: Path, prefix: str = "") -> int:
    """Extract the audio files (under ``prefix``) of a zip archive into ``out``."""
    written = 0
    with zipfile.ZipFile(file) as archive:
        for info in archive.infolist():
            path = _safe_path(info.filename)
            if path is None or info.is_dir() or not info.filename.startswith(prefix) or not _keep(path.name):
                continue
            target = out / path
            target.parent.mkdir(parents=True, exist_ok=True)
            with archive.open(info) as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst)
            written += 1
    return written


def _run(command: list[str], **kwargs) -> subprocess.CompletedProcess:
    if shutil.which(command[0]) is None:
        raise FileNotFoundError(f"{command[0]} is not installed; the real-audio set is fetched with apt-get and "
                                "dpkg-deb (Debian or Ubuntu)")
    return subprocess.run(command, check=True, **kwargs)


def _deb_file(cache: Path, package: str) -> Path | None:
    found = sorted(cache.glob(f"{package}_*.deb"))
    return found[0] if found else None


def _unpack_deb(deb: Path, out: Path) -> None:
    with subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE) as proc:
        assert proc.stdout is not None
        if deb.name.startswith("0ad-data_"):
            # The audio is inside public.zip (3.3 GB): unpack that zip to a temporary file first.
            with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
                with tarfile.open(fileobj=proc.stdout, mode="r|*") as tar:
                    for member in tar:
                        path = _safe_path(member.name)
                        if path is not None and member.isfile() and path.name in ("public.zip", "copyright"):
                            tar.extract(member, tmp, filter="data")
                extract_zip(Path(tmp) / "usr/share/games/0ad/mods/public/public.zip", out, prefix="audio/")
                (out / "doc").mkdir(exist_ok=True)
                shutil.copy(Path(tmp) / "usr/share/doc/0ad-data/copyright", out / "doc")
        else:
            extract_tar(proc.stdout, out)
    if proc.returncode:
        raise RuntimeError(f"dpkg-deb could not read {deb} (exit status {proc.returncode})")


def download_sdist(name: str, version: str, folder: Path, index: str = PYPI_SIMPLE) -> Path:
    """Download ``name``'s source archive of ``version`` from a PEP 503 index into ``folder`` and check
    its sha256 (given by the index); nothing is built (``pip download`` of an sdist builds its metadata,
    which fails where the build dependencies cannot be compiled). Kept: a second call downloads nothing."""
    import urllib.request

    filename = f"{name}-{version}.tar.gz"
    target = folder / filename
    if target.exists():
        return target
    with urllib.request.urlopen(f"{index.rstrip('/')}/{name}/", timeout=60) as page:
        html = page.read().decode("utf-8", "replace")
    match = re.search(r'href="([^"#]*/' + re.escape(filename) + r')#sha256=([0-9a-f]{64})"', html)
    if match is None:
        raise RuntimeError(f"{index}/{name}/ lists no {filename} with a sha256")
    with urllib.request.urlopen(match[1], timeout=300) as response:
        data = response.read()
    if hashlib.sha256(data).hexdigest() != match[2]:
        raise RuntimeError(f"{filename}: sha256 does not match the index's")
    folder.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".part")
    tmp.write_bytes(data)
    os.replace(tmp, target)
    return target


def fetch(dest: str | os.PathLike, tier: str = "core") -> Path:
    """Download the packages of ``tier`` into ``dest/.debs`` (kept: a second run downloads nothing),
    extract their audio and copyright files into ``dest/deb/PACKAGE`` and the ARCTIC clip into
    ``dest/pypi``; packages already extracted are left as they are. Needs ``apt-get`` with package
    lists (``apt-get update`` once), ``dpkg-deb`` and access to PyPI."""
    if tier not in TIERS:
        raise ValueError(f"unknown tier {tier!r}; choose one of {', '.join(TIERS)}")
    dest = Path(dest).resolve()
    cache = dest / ".debs"
    cache.mkdir(parents=True, exist_ok=True)
    missing = [p for p in TIERS[tier] if _deb_file(cache, p) is None]
    if missing:
        log.info("downloading %d packages into %s", len(missing), cache)
        _run(["apt-get", "download", *missing], cwd=cache)
    for package in TIERS[tier]:
        out = dest / "deb" / package
        if (out / ".done").exists():
            continue
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        log.info("extracting %s", package)
        _unpack_deb(_deb_file(cache, package), out)  # type: ignore[arg-type]
        (out / ".done").touch()
    name, version, clip, source = PYPI_CLIP
    out = dest / "pypi" / source
    if not (out / clip).exists():
        sdist = download_sdist(name, version, cache / "pypi")
        out.mkdir(parents=True, exist_ok=True)
        with tarfile.open(sdist) as tar:
            member = next(m for m in tar if m.isfile() and m.name.endswith("/" + clip))
            with tar.extractfile(member) as src, open(out / clip, "wb") as dst:  # type: ignore[union-attr]
                shutil.copyfileobj(src, dst)
    return dest
