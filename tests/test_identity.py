"""One codec identity (audiotok.identity): the rule that codes fit a codec, its one message, and every
carrier of codes (encoded batch, code file, code dataset, prior) checked by it."""

from __future__ import annotations

import dataclasses
import re

import numpy as np
import pytest
from conftest import random_tokenizer

from audiotok import CodecIdentity, CodeDataset, CodeFile
from audiotok.formats.codedataset import Manifest, ShardEntry
from audiotok.identity import CodecMismatch
from audiotok.utils.store import LocalStore

A, B, C = "0123456789abcdef", "fedcba9876543210", "00000000ffffffff"
MESSAGE = re.compile(r"(?P<holds>.+) the codes of model '(?P<writer>[^']*)' \(config hash \w+, weights fingerprint "
                     r"[\w ]+\), not those of model '(?P<reader>[^']*)' \(config hash \w+, weights fingerprint "
                     r"[\w ]+\): (?P<why>[^.]+)\. Use the model that wrote them(?P<override> \(.+\))?")


def test_the_rule():
    reader = CodecIdentity("reader", A, B)
    for writer in (None, CodecIdentity("any name", A, B), CodecIdentity("x", A, None)):
        reader.check_codes_of(writer, "x holds")  # the same codec, or nothing recorded to tell
    CodecIdentity("old prior", A, None).check_codes_of(CodecIdentity("x", A, C), "x holds")
    reader.check_codes_of(CodecIdentity("rounded from", A, C), "x holds", reads=(C,))
    reader.check_codes_of(CodecIdentity("x", A, C), "x holds", weights=False)
    with pytest.raises(CodecMismatch, match="another architecture"):
        reader.check_codes_of(CodecIdentity("x", C, B), "x holds", weights=False)
    with pytest.raises(CodecMismatch, match="same architecture with other weights") as err:
        reader.check_codes_of(CodecIdentity("x", A, C), "x holds", reads=(A,), override="--force decodes anyway")
    assert isinstance(err.value, ValueError) and str(err.value).endswith("wrote them (--force decodes anyway)")
    with pytest.raises(CodecMismatch) as err:  # no override for another architecture: nothing decodes them
        reader.check_codes_of(CodecIdentity("x", C, B), "x holds", override="--force decodes anyway")
    assert "--force" not in str(err.value)


def test_from_dict_reads_what_to_dict_wrote_and_refuses_what_is_no_identity():
    codec = CodecIdentity("m", A, B)
    assert CodecIdentity.from_dict(codec.to_dict(), "here") == codec
    assert CodecIdentity.from_dict({"model_id": "m", "config_hash": A}, "here") == CodecIdentity("m", A)
    for data, message in (({"config_hash": A}, "here: model_id=None is not a string"),
                          ({"model_id": "m"}, "here: config_hash is missing"),
                          ({"model_id": "m", "config_hash": "../x"}, "here: config_hash='../x' is not 16 lowercase"),
                          ({"model_id": "m", "config_hash": A, "codes_fingerprint": 5}, "here: codes_fingerprint=5")):
        with pytest.raises(ValueError, match=re.escape(message)):
            CodecIdentity.from_dict(data, "here")


@pytest.fixture(scope="module")
def tok():
    return random_tokenizer("tiny-16khz")


@pytest.fixture(scope="module")
def twin():
    """The same architecture with other weights."""
    return random_tokenizer("tiny-16khz", seed=1)


def test_every_carrier_is_checked_by_the_one_rule_with_the_one_message(tmp_path, tok, twin):
    from audiotok.lm import CodePrior, PriorConfig

    encoded = tok.encode(np.zeros(3200, np.float32), 16000)
    code_file = CodeFile.from_encoded(tok, encoded)
    Manifest(tok.identity, tok.config, (ShardEntry("none.tar", 0, 0),)).write(LocalStore(tmp_path))
    (tmp_path / "none.tar").write_bytes(b"\0" * 1024)
    backbone = {"model_type": "gpt2", "n_layer": 1, "n_head": 1, "n_embd": 8, "n_positions": 32}
    prior = CodePrior(PriorConfig(backbone=backbone), tok.identity, tok.config)
    assert encoded.codec == code_file.codec == CodeDataset(tmp_path).codec == prior.codec == tok.identity
    checks = [("EncodedAudio holds", True, lambda: twin.decode(encoded)),  # (holds, has an override, check)
              ("the file holds", True, lambda: code_file.check_compatible(twin)),
              (f"code dataset {tmp_path} holds", False, lambda: CodeDataset(tmp_path).check_codec(twin)),
              ("this prior models", False, lambda: prior.check_codec(twin)),
              ("EncodedAudio holds", False, lambda: CodeFile.from_encoded(twin, encoded))]
    for holds, override, check in checks:
        with pytest.raises(CodecMismatch) as err:
            check()
        found = MESSAGE.fullmatch(str(err.value))
        assert found is not None, str(err.value)
        assert found["holds"] == holds and (found["writer"], found["reader"]) == ("random", "random")
        assert found["why"] == "the same architecture with other weights, whose codes mean other sounds"
        assert (found["override"] is not None) == override, holds
    twin.decode(encoded, allow_other_weights=True)  # the override does what it says
    assert str(tok.identity) in str(err.value) and str(twin.identity) in str(err.value)


def test_the_tokenizer_reads_the_codes_of_weights_it_was_rounded_from(tok, twin):
    rounded = random_tokenizer("tiny-16khz", seed=1)
    rounded.decodes_codes_of = (tok.codes_fingerprint,)
    rounded.check_codec(tok.identity, "x holds")
    with pytest.raises(CodecMismatch):
        twin.check_codec(tok.identity, "x holds")
    twin.check_codec(dataclasses.replace(tok.identity, codes_fingerprint=None), "x holds")  # not recorded
