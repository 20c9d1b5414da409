"""Shared test helpers: tiny models with weights that give O(1) signals, and short test audio."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from audiotok import DAC, AudioTokenizer, DACConfig
from audiotok.nn.layers import Snake1d


def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give a model weights whose decoded output is audible (mean |y| around 0.3) while staying
    non-chaotic: small numeric differences are not amplified by more than ~30x. The default init
    decodes to near silence, which would make any tolerance check trivially true; unit-gain
    weights make the network chaotic, which would make exact comparisons meaningless."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, Snake1d):
                m.alpha.copy_(torch.rand(m.alpha.shape, generator=g) * 1.5 + 0.5)
            elif isinstance(m, (nn.Conv1d, nn.ConvTranspose1d)):
                w = m.weight
                if isinstance(m, nn.ConvTranspose1d):
                    fan_in = w.shape[0] * w.shape[2] / m.stride[0]
                else:
                    fan_in = w.shape[1] * w.shape[2]
                w.copy_(torch.randn(w.shape, generator=g) * 0.6 / math.sqrt(fan_in))
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.01)
            elif isinstance(m, nn.Embedding):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g))
        # Bring the output to an audible level, below tanh saturation.
        model.decoder.conv2.weight.mul_(3.0)
    return model


def random_tokenizer(preset: str | DACConfig, seed: int = 0) -> AudioTokenizer:
    """``AudioTokenizer.from_config(preset, seed=seed)`` with :func:`randomize_` weights (set before the
    tokenizer is made, so its ``codes_fingerprint`` is theirs)."""
    config = DACConfig.preset(preset) if isinstance(preset, str) else preset
    torch.manual_seed(seed)
    model = DAC(config)
    model.fold_weight_norm()
    return AudioTokenizer(randomize_(model, seed), "random")


def make_audio(num_samples: int, channels: int = 1, batch: int | None = None, seed: int = 0) -> np.ndarray:
    """Noise plus tones, float32 [C, T] (or [B, C, T] with ``batch``)."""
    rng = np.random.default_rng(seed)
    shape = (channels, num_samples) if batch is None else (batch, channels, num_samples)
    t = np.arange(num_samples) / 16000.0
    x = 0.3 * np.sin(2 * np.pi * 440 * t) + 0.1 * rng.standard_normal(shape)
    return x.astype(np.float32)


@pytest.fixture
def tiny_tokenizer() -> AudioTokenizer:
    return random_tokenizer("tiny-44khz")


@pytest.fixture(scope="session")
def s3_server():
    """A local S3-compatible server (moto's server mode, in a thread, on a free port) for the
    object-storage tests: ``(endpoint_url, storage_options)`` with fake credentials for s3fs."""
    pytest.importorskip("s3fs")
    server_module = pytest.importorskip("moto.server")
    import logging

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request
    server = server_module.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    options = {"key": "testing", "secret": "testing", "client_kwargs": {"endpoint_url": endpoint}}
    yield endpoint, options
    server.stop()


@pytest.fixture
def s3_bucket(s3_server):
    """A fresh, empty bucket on :func:`s3_server`: ``(url "s3://NAME", storage_options)``."""
    import uuid

    import fsspec

    _, options = s3_server
    url = f"s3://test-{uuid.uuid4().hex[:16]}"
    fsspec.filesystem("s3", **options).mkdir(url)
    return url, options
