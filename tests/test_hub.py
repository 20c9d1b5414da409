"""Hugging Face conventions: hub arguments, push_to_hub, and what a saved copy keeps."""

import json
import shutil

import pytest
import torch
from conftest import random_tokenizer

from audiotok import AudioTokenizer
from audiotok.cli.modelinfo import convert_model
from audiotok.weights.hub import DEFAULT_MODEL_ID, PRETRAINED_DIR, resolve

REVISION = "b" * 40


def _cache_with_model(cache, repo_id: str, revision: str):
    """A hub cache laid out as huggingface_hub writes it: refs/main -> snapshots/<revision>/."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    tok = random_tokenizer("tiny-16khz")
    tok.export_transformers(repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    return tok


@pytest.fixture
def offline(monkeypatch):
    import huggingface_hub.constants as c

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)


def test_hub_arguments_reach_the_hub_client(tmp_path, offline):
    tok = _cache_with_model(tmp_path, "someone/tiny-dac", REVISION)
    loaded = AudioTokenizer.from_pretrained("someone/tiny-dac", cache_dir=tmp_path, revision=REVISION,
                                            local_files_only=True, token=False)
    assert loaded.model_id == "someone/tiny-dac"
    assert all(torch.equal(a, b) for a, b in zip(tok.model.state_dict().values(), loaded.model.state_dict().values()))
    with pytest.raises(FileNotFoundError, match=f"revision {'c' * 40}.*local_files_only"):
        AudioTokenizer.from_pretrained("someone/tiny-dac", cache_dir=tmp_path, revision="c" * 40,
                                       local_files_only=True)
    with pytest.raises(FileNotFoundError, match="not in the local cache"):  # the default cache has no such model
        AudioTokenizer.from_pretrained("someone/tiny-dac", cache_dir=tmp_path / "empty")
    with pytest.raises(TypeError, match="unknown hub arguments"):
        resolve("someone/tiny-dac", revison="main")


def test_saved_copies_keep_model_card_notice_and_model_id(tmp_path):
    tok = AudioTokenizer.from_pretrained()
    card = (PRETRAINED_DIR / "default" / "README.md").read_text()
    tok.save_pretrained(tmp_path / "copy")
    assert (tmp_path / "copy" / "README.md").read_text() == card
    copy = AudioTokenizer.from_pretrained(tmp_path / "copy")
    assert (copy.model_id, copy.notice, copy.card) == (DEFAULT_MODEL_ID, tok.notice, card)
    # Converted copies (every format) keep the source's model_id unless told otherwise.
    for fmt, dst in (("transformers", tmp_path / "hf"), ("original", tmp_path / "w.pth")):
        convert_model(None, dst, fmt)
        assert AudioTokenizer.from_pretrained(dst).model_id == DEFAULT_MODEL_ID, fmt
    assert (tmp_path / "hf" / "README.md").read_text() == card
    convert_model(None, tmp_path / "renamed", "audiotok", model_id="my-fine-tune")
    renamed = json.loads((tmp_path / "renamed" / "config.json").read_text())
    assert renamed["model_id"] == "my-fine-tune" and renamed["notice"] == tok.notice


def test_push_to_hub_uploads_the_saved_folder(tmp_path, monkeypatch):
    from huggingface_hub import HfApi

    calls = {}

    def create_repo(self, repo_id, **kwargs):
        calls["create_repo"] = (repo_id, kwargs)

    def upload_folder(self, repo_id, folder_path, **kwargs):
        shutil.copytree(folder_path, tmp_path / "uploaded")  # what would reach the hub
        calls["upload_folder"] = (repo_id, kwargs)

        class Commit:
            commit_url = f"https://huggingface.co/{repo_id}/commit/{'d' * 40}"
        return Commit()

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    tok = random_tokenizer("tiny-16khz")
    tok.card = "# tiny\n"
    url = tok.push_to_hub("me/tiny", private=True, revision="dev")
    assert url.endswith("d" * 40)
    assert calls["create_repo"] == ("me/tiny", {"private": True, "exist_ok": True})
    assert calls["upload_folder"][1]["revision"] == "dev"
    pushed = AudioTokenizer.from_pretrained(tmp_path / "uploaded")
    assert pushed.model_id == "me/tiny" and pushed.card == "# tiny\n"
    assert all(torch.equal(a, b) for a, b in zip(tok.model.state_dict().values(), pushed.model.state_dict().values()))
