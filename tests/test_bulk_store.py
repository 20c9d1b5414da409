"""The store code datasets are read and written through (bulk jobs' output): atomic writes, publishing
staged files, listing, reading, names confined; on a local folder and on an S3-compatible server
(moto, see conftest.s3_server)."""

import os

import pytest

from audiotok.utils.store import FsspecStore, LocalStore, open_store


@pytest.fixture(params=["local", "s3"])
def store_and_root(request, tmp_path):
    """``(an empty store, the location it was opened at)``."""
    if request.param == "local":
        return open_store(tmp_path / "out"), tmp_path / "out"
    url, options = request.getfixturevalue("s3_bucket")
    return open_store(url + "/out", options), url + "/out"


def test_store_round_trip(store_and_root):
    store, root = store_and_root
    assert store.list() == [] and not store.exists("a.json")
    store.write_json(".bulk/a.json", {"x": 1})
    store.write_bytes("b.bin", b"123")
    staged = store.staging_path("sub/c.tar")
    staged.write_bytes(b"tar")
    assert store.list() == [".bulk/a.json", "b.bin"]  # a staged file is not listed until published
    assert not store.exists("sub/c.tar")
    store.put_file(staged, "sub/c.tar")
    assert not staged.exists()
    assert store.list() == [".bulk/a.json", "b.bin", "sub/c.tar"]
    assert store.list("sub") == ["sub/c.tar"] and store.list("nothing") == []
    assert store.read_json(".bulk/a.json", {"x": int}) == {"x": 1} and store.read_bytes("sub/c.tar") == b"tar"
    with store.open("sub/c.tar") as f:
        assert f.read() == b"tar"
    store.write_bytes("b.bin", b"new")
    assert store.read_bytes("b.bin") == b"new"
    store.delete("b.bin")
    store.delete("b.bin")  # missing: not an error
    assert not store.exists("b.bin")
    with pytest.raises(FileNotFoundError):
        store.read_bytes("b.bin")
    again = open_store(root, getattr(store, "storage_options", None))  # another process's view
    assert again.list() == [".bulk/a.json", "sub/c.tar"] and again.read_bytes("sub/c.tar") == b"tar"
    left = store.staging_path("sub/d.tar")  # a build a killed process never published
    left.write_bytes(b"half")
    removed = store.clean_staging()
    assert not left.exists() and [r.rsplit("/", 1)[-1] for r in removed] == [left.name]
    assert store.list() == [".bulk/a.json", "sub/c.tar"]


def test_store_listing_is_fresh(s3_bucket):
    """Files another process writes show up in the next listing (no stale fsspec listing cache)."""
    url, options = s3_bucket
    one, two = open_store(url + "/out", options), FsspecStore(url + "/out/", dict(options, default_block_size=2**20))
    assert one.list() == [] and not one.exists("x")
    two.write_bytes("x", b"1")
    assert one.list() == ["x"] and one.exists("x")
    two.delete("x")
    assert one.list() == [] and not one.exists("x")


def test_s3_multipart_upload_is_invisible_until_complete(s3_bucket):
    """What makes large uploads atomic: s3fs uploads a file above 2 x chunksize as a multipart
    upload, and S3 creates the object only when the upload is completed."""
    url, options = s3_bucket
    store = open_store(url + "/out", options)
    assert isinstance(store, FsspecStore)
    bucket, key = store.root.split("/", 1)[0], store.root.split("/", 1)[1] + "/big.tar"
    s3 = store.fs.call_s3
    upload = s3("create_multipart_upload", Bucket=bucket, Key=key)
    part = s3("upload_part", Bucket=bucket, Key=key, PartNumber=1, UploadId=upload["UploadId"], Body=b"x" * 1000)
    assert store.list() == [] and not store.exists("big.tar")
    s3("complete_multipart_upload", Bucket=bucket, Key=key, UploadId=upload["UploadId"],
       MultipartUpload={"Parts": [{"PartNumber": 1, "ETag": part["ETag"]}]})
    assert store.list() == ["big.tar"] and store.read_bytes("big.tar") == b"x" * 1000


def test_open_store_kinds(tmp_path, s3_bucket):
    assert isinstance(open_store(f"file://{tmp_path}/out"), LocalStore)
    assert open_store(f"file://{tmp_path}/out").root == tmp_path / "out"
    url, options = s3_bucket
    assert isinstance(open_store(url + "/codes", options), FsspecStore)


@pytest.mark.parametrize("name", ["../x", "/etc/x", "", "a/../../x", "a//b", "./x", "a/"])
def test_store_names_stay_inside(tmp_path, name):
    with pytest.raises(ValueError, match="relative paths inside"):
        open_store(tmp_path).write_bytes(name, b"x")
    with pytest.raises(ValueError, match="relative paths inside"):
        FsspecStore("memory://audiotok-test").write_bytes(name, b"x")


def test_fsspec_store_staging_folder_is_removed_with_the_store():
    store = FsspecStore("memory://audiotok-staging-test")
    staged = store.staging_path("a/b.tar")
    staged.write_bytes(b"x")
    folder = staged.parent
    del store
    assert not folder.exists()


def test_a_store_only_read_from_stages_nothing(tmp_path, monkeypatch):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # TMPDIR
    FsspecStore("memory://audiotok-read-only").write_bytes("a.bin", b"abc")
    reader = FsspecStore("memory://audiotok-read-only")
    with reader.open("a.bin") as f:
        assert f.read() == b"abc"
    with pytest.raises(FileNotFoundError):
        reader.open("missing.bin")
    assert not (tmp_path / "audiotok-staging").exists()  # a staging folder is made for writing only
    reader.staging_path("b.bin")
    assert (tmp_path / "audiotok-staging").is_dir()


def test_fsspec_store_works_in_a_forked_child(s3_bucket):
    """A store made (and used) before a fork works in the child: each process has its own client."""
    import multiprocessing

    url, options = s3_bucket
    store = open_store(url + "/out", options)
    store.write_bytes("parent", b"0")
    child = multiprocessing.get_context("fork").Process(target=store.write_bytes, args=("child", b"1"))
    child.start()
    child.join(60)
    assert child.exitcode == 0 and store.list() == ["child", "parent"]


def test_fsspec_store_cleans_staging_left_by_gone_processes(tmp_path, monkeypatch):
    """A killed process's staged files (on this machine, for this store's URL) are removed; a live
    process's and another URL's are kept."""
    import socket
    import subprocess
    import sys
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # TMPDIR
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    store, other = FsspecStore("memory://audiotok-clean"), FsspecStore("memory://audiotok-clean-other")
    root = store.staging_path("x").parent.parent
    prefix = store.staging_path("x").parent.name.rsplit("-", 2)[0]  # {url hash}-{host}
    assert prefix.endswith("-" + socket.gethostname())
    left, alive = root / f"{prefix}-{gone.stdout.strip()}-abc", root / f"{prefix}-{os.getppid()}-abc"
    for folder in (left, alive):
        folder.mkdir()
        (folder / "part.tar").write_bytes(b"half")
    mine, theirs = store.staging_path("a.tar"), other.staging_path("b.tar")
    mine.write_bytes(b"half")
    theirs.write_bytes(b"half")
    assert sorted(store.clean_staging()) == sorted([str(left / "part.tar"), str(mine)])
    assert not left.exists() and not mine.exists() and (alive / "part.tar").exists() and theirs.exists()
    store.staging_path("c.tar").write_bytes(b"next")  # the store stages again
    assert root == tmp_path / "audiotok-staging"


@pytest.mark.parametrize("location, scheme, url, local", [
    ("s3://b/x", "s3", True, "s3://b/x"), ("hf://datasets/u/r", "hf", True, "hf://datasets/u/r"),
    ("simplecache::s3://b/x", "simplecache::s3", True, "simplecache::s3://b/x"),
    ("file:///tmp/x", "file", False, "/tmp/x"), ("/tmp/a", None, False, "/tmp/a"), ("rel/dir", None, False, "rel/dir"),
    ("pipe:curl -s https://x/a.tar", None, False, "pipe:curl -s https://x/a.tar"),
])
def test_urls_tell_paths_and_urls_apart(location, scheme, url, local):
    from audiotok.utils import urls

    assert (urls.scheme(location), urls.is_url(location), urls.local_path(location)) == (scheme, url, local)


def test_job_files_of_the_wrong_shape_are_one_error_naming_the_file(tmp_path):
    from audiotok.bulk.claims import Claims, state_path
    from audiotok.bulk.job import PLAN_NAME, load_plan
    from audiotok.bulk.writer import PartWriter

    store = open_store(tmp_path / "out")
    for text, message in (("[1]", "the top level must be an object"), ("{" * 3000, "nested 3000 deep"),
                          ('{"part": 0, "position": "3", "shards": [], "failures": []}', "position must be an integer"),
                          ('{"part": 0, "position": 3, "failures": []}', "has no 'shards' entry")):
        store.write_bytes(state_path("progress", 0), text.encode())
        with pytest.raises(ValueError, match=f"out/.bulk/progress/part-000000.json: .*{message}"):
            PartWriter(store, 0, "webdataset", 10, 10, {})
    store.write_bytes(PLAN_NAME, b'{"job": [], "parts": []}')
    with pytest.raises(ValueError, match="plan.json: job must be an object, got an array"):
        load_plan(store, {"job": {}, "parts": []})
    store.write_bytes(state_path("claims", 0), b'{"owner": "x", "expires": "soon"}')
    assert Claims(store, "me", 60).read(0) is None  # a malformed claim is no claim
