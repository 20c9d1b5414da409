"""The repository's own data recipes: the real-audio set (recipes/fetch_real_audio.py) and the
public Hugging Face datasets config; and that nothing in the repository refers to files outside it."""

import csv
import inspect
import io
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from audiotok.data.config import read_manifest, sources_from_manifest
from audiotok.data.pack import MANIFEST_COLUMNS
from audiotok.data.real_audio import FESTVOX_EVAL, classify, extract_tar, write_manifest

REPO = Path(__file__).resolve().parents[1]


def _wav(path: Path, seed: int, sr: int = 16000, seconds: float = 0.05) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    sf.write(path, (0.1 * rng.standard_normal(int(sr * seconds))).astype(np.float32), sr)


def test_manifest_rows_split_by_source(tmp_path):
    deb = tmp_path / "deb"
    festvox = [deb / "festvox-ru" / "usr/share/festival/ru" / f"utt{i:03d}.wav" for i in range(FESTVOX_EVAL + 3)]
    for i, path in enumerate(festvox):
        _wav(path, i)
    stamps = deb / "tuxpaint-stamps-default" / "usr/share/tuxpaint/stamps/animals"
    _wav(stamps / "cat_desc_fr.ogg", 100)  # English and French descriptions: eval speech
    _wav(stamps / "cat_desc_de.ogg", 101)  # other languages: train speech
    _wav(stamps / "cat.ogg", 102)  # the stamp's sound: eval general
    _wav(deb / "wesnoth-1.16-music" / "usr/share/games/wesnoth/music/battle.ogg", 103, sr=44100)
    _wav(deb / "ufoai-sound" / "usr/share/games/ufoai/base/sound/door.wav", 104)
    _wav(deb / "sonic-pi-samples" / "usr/share/sonic-pi/samples/drum.flac", 105)
    _wav(deb / "sonic-pi-samples" / "usr/share/sonic-pi/samples/drum_copy.flac", 105)  # same bytes: kept once
    (deb / "sonic-pi-samples" / "usr/share/sonic-pi/samples/broken.wav").write_bytes(b"RIFF....")
    (deb / "sonic-pi-samples" / "usr/share/doc/sonic-pi-samples").mkdir(parents=True)
    (deb / "sonic-pi-samples" / "usr/share/doc/sonic-pi-samples/copyright").write_text("CC0")
    _wav(tmp_path / "pypi" / "pysptk_arctic" / "arctic_a0007.wav", 106)

    rows = write_manifest(tmp_path)
    with open(tmp_path / "manifest.csv", newline="") as f:
        assert next(csv.reader(f)) == MANIFEST_COLUMNS
    assert read_manifest(tmp_path) == rows
    got = {row["path"].rsplit("/", 1)[1]: (row["split"], row["category"]) for row in rows}
    assert [got[p.name] for p in festvox] == [("train", "speech")] * 3 + [("eval", "speech")] * FESTVOX_EVAL
    assert got["cat_desc_fr.ogg"] == ("eval", "speech") and got["cat_desc_de.ogg"] == ("train", "speech")
    assert got["cat.ogg"] == ("eval", "general") and got["battle.ogg"] == ("train", "music")
    assert got["door.wav"] == ("eval", "general") and got["drum.flac"] == ("train", "instrument")
    assert got["arctic_a0007.wav"] == ("eval", "speech")
    assert "drum_copy.flac" not in got and "broken.wav" not in got and "copyright" not in got
    battle = next(r for r in rows if r["path"].endswith("battle.ogg"))
    assert (battle["sr"], battle["channels"], battle["format"], battle["license"]) == ("44100", "1", "OGG", "GPL-2+")
    # The manifest source reads it: instruments are music, eval sources stay out of training.
    train = sources_from_manifest(tmp_path, "train")
    assert {g: len(s) for g, s in train.items()} == {"music": 2, "speech": 4}
    assert classify("megaglest-data", "usr/share/games/megaglest/units/archer/sounds/archer_select1.wav") == \
        ("train", "speech")


def _tar_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def test_extract_keeps_audio_copyright_and_the_audio_of_pk3_archives(tmp_path):
    pk3 = io.BytesIO()
    with zipfile.ZipFile(pk3, "w") as z:
        z.writestr("sound/weapons/shot.ogg", b"ogg")
        z.writestr("maps/level.bsp", b"map")
        z.writestr("../escape.wav", b"no")
    stream = io.BytesIO()
    with tarfile.open(fileobj=stream, mode="w") as tar:
        _tar_member(tar, "./usr/share/games/x/music/theme.OGG", b"music")
        _tar_member(tar, "./usr/share/doc/x/copyright", b"GPL-2+")
        _tar_member(tar, "./usr/games/x", b"\x7fELF")
        _tar_member(tar, "../outside.wav", b"no")
        _tar_member(tar, "./usr/share/games/x/base/0sounds.pk3", pk3.getvalue())
    stream.seek(0)
    assert extract_tar(stream, tmp_path / "out") == 3
    written = sorted(p.relative_to(tmp_path / "out").as_posix() for p in (tmp_path / "out").rglob("*") if p.is_file())
    assert written == ["usr/share/doc/x/copyright", "usr/share/games/x/base/0sounds_pk3/sound/weapons/shot.ogg",
                       "usr/share/games/x/music/theme.OGG"]
    assert not (tmp_path / "outside.wav").exists() and not (tmp_path / "out" / "escape.wav").exists()


def test_missing_data_is_one_line_that_says_what_to_run(tmp_path):
    with pytest.raises(FileNotFoundError, match="python recipes/fetch_real_audio.py .*nowhere core"):
        read_manifest(tmp_path / "nowhere")
    proc = subprocess.run([sys.executable, str(REPO / "recipes" / "train.py"), "--config",
                           str(REPO / "recipes" / "configs" / "tiny.yml"), "--save-path", str(tmp_path / "run"),
                           "--max-steps", "1"], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    assert errors == ["train: error: data/real-audio/manifest.csv: no such manifest; fetch the real-audio set with: "
                      "python recipes/fetch_real_audio.py data/real-audio core"]
    assert "Traceback" not in proc.stderr


def test_hf_datasets_config_names_loadable_public_datasets():
    import datasets

    from audiotok.data import DataConfig
    from audiotok.data.sources import HFDatasetSource
    from audiotok.train.config import load_config

    config = load_config(REPO / "recipes" / "configs" / "hf-datasets.yml")
    data = DataConfig.from_dict({**config.data, "sample_rate": config.model.sample_rate})  # as the trainer reads it
    assert sorted(data.groups) == sorted(data.val_groups) == ["general", "music", "speech"]
    assert [data.groups[g].weight for g in ("speech", "music", "general")] == pytest.approx([1 / 2, 1 / 3, 1 / 6])
    for group in (*data.groups.values(), *data.val_groups.values()):
        for spec in group.sources:
            spec = dict(spec)
            assert spec.pop("type") == "hf"
            path = spec.pop("path")
            assert "/" in path  # a hub dataset id
            inspect.signature(HFDatasetSource).bind(path, **spec)
            # What HFDatasetSource passes on to load_dataset: a call load_dataset accepts.
            config_name = spec.pop("config", None)
            inspect.signature(datasets.load_dataset).bind(path, config_name, **spec)


def test_the_repository_refers_to_no_files_outside_it():
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    needles = ("../" + "shared", "/" + "work/")  # spelled apart, so that this file does not match itself
    offenders = []
    for name in tracked:
        path = REPO / name
        if path.suffix not in (".py", ".md", ".yml", ".yaml", ".sh", ".toml", ".txt", ".cfg") or not path.is_file():
            continue
        text = path.read_text(errors="replace")
        offenders += [f"{name}: {needle}" for needle in needles if needle in text]
    assert offenders == []
