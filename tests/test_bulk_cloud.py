"""Bulk tokenization from and to object storage: inputs and outputs at s3:// URLs on a local
S3-compatible server (moto, conftest.s3_server; s3fs talks to it over HTTP), file:// URLs, and code
datasets read from a URL."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import test_bulk
from test_bulk import GOOD, _recipe, check_against_direct, config, direct_codes, read_output, write_tars

from audiotok.bulk import InputSpec, tokenize_dataset
from audiotok.data import AudioFolderSource, DecodeError, HFDatasetSource, URLFolderSource, WebDatasetSource
from audiotok.lm import CodeDataset

pytest.importorskip("s3fs")

# test_bulk's fixtures: the corpus, the tiny model, one torch thread
corpus, model_dir, tok, one_thread = test_bulk.corpus, test_bulk.model_dir, test_bulk.tok, test_bulk.one_thread


def upload(local: Path, url: str, options: dict) -> None:
    """Every file under the folder ``local`` to the same relative names under ``url``."""
    import fsspec

    fs, base = fsspec.core.url_to_fs(url, **options)
    for path in sorted(local.rglob("*")):
        if path.is_file():
            fs.put_file(str(path), f"{base}/{path.relative_to(local).as_posix()}")


def same_items(a, b) -> None:
    """Two sources' ``records()`` give the same keys, reasons and audio."""
    a, b = list(a), list(b)
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert type(x) is type(y) and x.key == y.key
        if isinstance(x, DecodeError):
            assert x.reason == y.reason
        else:
            np.testing.assert_array_equal(x.audio, y.audio)
            assert (x.sample_rate, x.metadata) == (y.sample_rate, y.metadata)


def test_folder_source_at_a_url(corpus, s3_bucket, tmp_path):
    url, options = s3_bucket
    upload(corpus, url + "/corpus", options)
    fs_hidden = tmp_path / "hidden"
    (fs_hidden / ".cache").mkdir(parents=True)
    (fs_hidden / ".cache/x.wav").write_bytes((corpus / "a/mono16k.wav").read_bytes())
    (fs_hidden / "._x.wav").write_bytes(b"resource fork")
    upload(fs_hidden, url + "/corpus", options)  # hidden files and folders are not listed
    source = URLFolderSource(url + "/corpus/", storage_options=options)
    local = AudioFolderSource(corpus)
    assert source.name == "corpus" and len(source) == len(local) == len(GOOD) + 5
    assert [source.key(i) for i in range(len(source))] == [local.key(i) for i in range(len(local))]
    same_items(source.records(), local.records())
    same_items(source.records(1, 3, start=1), local.records(1, 3, start=1))
    spec = InputSpec("folder", url + "/corpus", storage_options=options)
    assert spec.unread_extensions() == InputSpec("folder", str(corpus)).unread_extensions() == {".txt": 1}
    assert "testing" not in repr(spec) and "storage_options" not in spec.to_dict()

    # sidecar files to keep, read from the bucket too
    import fsspec

    fsspec.filesystem("s3", **options).pipe_file(url + "/corpus/a/mono16k.txt", b"caption")
    kept = URLFolderSource(url + "/corpus/a", keep=["txt"], storage_options=options)
    items = list(kept.records())
    assert [x.key for x in items] == ["mono16k.wav", "stereo44k.flac"]
    assert items[0].metadata == {"txt": "caption"}
    assert isinstance(items[1], DecodeError) and items[1].reason == "metadata"
    with pytest.raises(FileNotFoundError, match="no such folder"):
        URLFolderSource(url + "/nothing", storage_options=options)


def test_webdataset_shards_at_a_url(corpus, s3_bucket, tmp_path):
    url, options = s3_bucket
    write_tars(tmp_path, corpus)
    upload(tmp_path, url + "/shards", options)
    local = WebDatasetSource(str(tmp_path / "in-*.tar"))
    for pattern in ("/shards/in-{00..01}.tar", "/shards/in-*.tar"):
        source = WebDatasetSource(url + pattern, storage_options=options)
        assert source.shards == [f"{url}/shards/in-00.tar", f"{url}/shards/in-01.tar"]
        for part, parts in ((0, 1), (1, 2), (2, 3)):
            items, want = list(source.records(part, parts)), list(local.records(part, parts))
            assert [x.key.replace(url + "/shards", str(tmp_path)) for x in items] == [x.key for x in want]
            for x, y in zip(items, want):
                assert type(x) is type(y)
                if not isinstance(x, DecodeError):
                    np.testing.assert_array_equal(x.audio, y.audio)
    with pytest.raises(FileNotFoundError, match="no files match"):
        WebDatasetSource(url + "/shards/none-*.tar", storage_options=options)
    missing = list(WebDatasetSource(url + "/shards/gone.tar", storage_options=options).records())
    assert [(type(x), x.reason) for x in missing] == [(DecodeError, "shard")]


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
def test_tokenize_from_s3_inputs(corpus, model_dir, tok, s3_bucket, tmp_path):
    """WebDataset shards (a glob, read by two DataLoader workers, each with its own s3fs client) and
    a folder in a bucket: the codes are those of AudioTokenizer.encode; run again, nothing is done."""
    url, options = s3_bucket
    (tmp_path / "tars").mkdir()
    where = write_tars(tmp_path / "tars", corpus)
    upload(tmp_path / "tars", url + "/shards", options)
    spec = InputSpec("webdataset", url + "/shards/in-*.tar", storage_options=options)
    out = tmp_path / "out"
    summary = tokenize_dataset(config(spec, out, model_dir, num_workers=2))
    manifest, records = read_output(out)
    names = check_against_direct(records, tok, lambda k: where[k.rsplit(":", 1)[1]])
    assert names == sorted(os.path.basename(f) for f in GOOD) and summary.run_records == len(GOOD)
    assert sorted(f["reason"] for f in manifest["failures"]) == ["decode", "noaudio"]
    assert manifest["input"] == {"type": "webdataset", "path": url + "/shards/in-*.tar"}
    assert tokenize_dataset(config(spec, out, model_dir, num_workers=2)).run_records == 0

    upload(corpus / "a", url + "/folder", options)
    out = tmp_path / "out-folder"
    args = ["--input", url + "/folder", "--input-type", "folder", "--output", str(out), "--model", str(model_dir),
            "--num-workers", "1", "--no-progress", "--batch-seconds", "1", "--chunk-seconds", "0.5",
            "--input-storage-options", json.dumps(options)]
    assert _recipe().main(args) == 0
    manifest, records = read_output(out)
    assert check_against_direct(records, tok, lambda k: corpus / "a" / k) == ["mono16k.wav", "stereo44k.flac"]

    # the code dataset, uploaded, reads back from its URL as from its folder
    upload(out, url + "/codes", options)
    remote, local = CodeDataset(url + "/codes", storage_options=options), CodeDataset(out)
    assert remote.root == url + "/codes" and len(remote) == len(local) == 2
    for a, b in zip(remote, local, strict=True):
        assert (a.key, a.meta) == (b.key, b.meta)
        np.testing.assert_array_equal(a.codes, b.codes)


def test_saved_hf_dataset_at_a_url(corpus, s3_bucket, tmp_path):
    from datasets import Audio, Dataset

    url, options = s3_bucket
    files = [str(corpus / f) for f in sorted(GOOD)]
    ds = Dataset.from_dict({"audio": files, "text": [f"t{i}" for i in range(len(files))]}).cast_column("audio", Audio())
    ds.save_to_disk(str(tmp_path / "saved"))
    ds.save_to_disk(url + "/saved", storage_options=options)
    local = HFDatasetSource(str(tmp_path / "saved"), keep=["text"])
    same_items(HFDatasetSource(url + "/saved", keep=["text"], storage_options=options).records(), local.records())
    spec = InputSpec("hf", f"file://{tmp_path}/saved", keep=["text"])
    same_items(spec.build().records(), local.records())
    with pytest.raises(ValueError, match="not a dataset saved with save_to_disk"):
        HFDatasetSource(url + "/nothing", storage_options=options)


def test_tokenize_to_s3_output(corpus, model_dir, tok, s3_bucket, tmp_path, monkeypatch):
    """Shards and manifest written to a bucket: read back, the codes are those of
    AudioTokenizer.encode; run again, no object is written."""
    monkeypatch.chdir(tmp_path)  # a job that does not know URLs would write to ./s3:/...
    url, options = s3_bucket
    out = url + "/codes"
    args = ["--input", str(corpus / "c"), "--input-type", "folder", "--output", out, "--model", str(model_dir),
            "--num-workers", "1", "--no-progress", "--batch-seconds", "1", "--chunk-seconds", "0.5",
            "--shard-records", "1", "--storage-options", json.dumps(options)]
    assert _recipe().main(args) == 0
    codes = CodeDataset(out, storage_options=options)
    assert len(codes) == len([f for f in GOOD if f.startswith("c/")]) == len(codes.shards)
    for record in codes:
        np.testing.assert_array_equal(record.codes, direct_codes(tok, corpus / "c" / record.meta["source_key"]))

    import fsspec

    fs = fsspec.filesystem("s3", **options)
    names = [n for n in fs.find(out) if "/.bulk/" not in n]
    assert sorted(n.rsplit("/", 1)[1] for n in names) == sorted([s.path for s in codes.shards] + ["manifest.json"])
    written = {n: fs.info(n)["LastModified"] for n in names}
    cfg = config(InputSpec("folder", str(corpus / "c")), out, model_dir, num_workers=1, shard_records=1,
                 storage_options=options)
    again = tokenize_dataset(cfg)
    assert again.run_records == 0 and again.records == len(codes)
    fs.invalidate_cache()
    assert {n: fs.info(n)["LastModified"] for n in fs.find(out) if "/.bulk/" not in n} == written


def test_recipe_url_errors(tmp_path, capsys):
    """An unknown scheme or bad options: exit status 2, one line, before any work."""
    recipe = _recipe()
    common = ["--input-type", "folder", "--no-progress"]
    assert recipe.main(["--input", str(tmp_path), "--output", "nosuch://bucket/codes", *common]) == 2
    assert capsys.readouterr().err.startswith("tokenize_dataset: error: Protocol not known: nosuch")
    with pytest.raises(SystemExit):
        recipe.main(["--input", str(tmp_path), "--output", str(tmp_path / "o"), *common, "--storage-options", "[1]"])
    assert "invalid json_object value" in capsys.readouterr().err
