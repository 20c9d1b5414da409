"""The output store of bulk jobs: atomic writes, publishing staged files, listing, names confined."""

import pytest

from audiotok.bulk.store import LocalStore, open_store


def test_local_store_round_trip(tmp_path):
    store = open_store(tmp_path / "out")
    assert isinstance(store, LocalStore)
    assert store.list() == [] and not store.exists("a.json")
    store.write_json(".bulk/a.json", {"x": 1})
    store.write_bytes("b.bin", b"123")
    staged = store.staging_path("sub/c.tar")
    staged.write_bytes(b"tar")
    assert store.list() == [".bulk/a.json", "b.bin"]  # a staged file is not listed until published
    store.put_file(staged, "sub/c.tar")
    assert not staged.exists()
    assert store.list() == [".bulk/a.json", "b.bin", "sub/c.tar"]
    assert store.list("sub") == ["sub/c.tar"]
    assert store.read_json(".bulk/a.json") == {"x": 1} and store.read_bytes("sub/c.tar") == b"tar"
    store.write_bytes("b.bin", b"new")
    assert store.read_bytes("b.bin") == b"new"
    store.delete("b.bin")
    store.delete("b.bin")  # missing: not an error
    assert not store.exists("b.bin")
    assert store.local_path("sub/c.tar") == tmp_path / "out" / "sub" / "c.tar"
    left = store.staging_path("sub/d.tar")  # a build a killed process never published
    left.write_bytes(b"half")
    assert store.clean_staging() == (f"sub/{left.name}",) and not left.exists()
    assert store.list() == [".bulk/a.json", "sub/c.tar"]


@pytest.mark.parametrize("name", ["../x", "/etc/x", "", "a/../../x"])
def test_local_store_names_stay_inside(tmp_path, name):
    with pytest.raises(ValueError, match="relative paths inside"):
        open_store(tmp_path).write_bytes(name, b"x")
