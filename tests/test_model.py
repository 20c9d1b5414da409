"""The generator: shapes, presets, weight norm, residual VQ and quantizer dropout."""

import math

import pytest
import torch
from conftest import randomize_

from audiotok import DAC, AudioTokenizer, DACConfig
from audiotok.nn.config import PRESETS

TINY = ["tiny-44khz", "tiny-24khz", "tiny-16khz"]


@pytest.mark.parametrize("preset", TINY)
@pytest.mark.parametrize("num_samples", [1, 319, 320, 513, 5000])
def test_exact_lengths(preset, num_samples):
    model = DAC(DACConfig.preset(preset)).eval()
    x = torch.randn(2, 1, num_samples)
    with torch.no_grad():
        q = model.encode(x)
        frames = math.ceil(num_samples / model.hop_length)
        assert q.codes.shape == (2, model.config.n_codebooks, frames)
        assert model.decode(q.z).shape == (2, 1, frames * model.hop_length)
        assert model.decode_codes(q.codes).shape == (2, 1, frames * model.hop_length)
        assert model(x)[0].shape == x.shape


def test_published_presets():
    expected = {  # hop, frames/s, kbps from the paper's table
        "44khz": (512, 86.13, 7.75), "44khz-16kbps": (512, 86.13, 15.5),
        "24khz": (320, 75.0, 24.0), "16khz": (320, 50.0, 6.0),
    }
    for name, (hop, fps, kbps) in expected.items():
        c = DACConfig.preset(name)
        assert c.hop_length == hop
        assert c.frame_rate == pytest.approx(fps, abs=0.01)
        assert c.bitrate() / 1000 == pytest.approx(kbps, abs=0.01)
    assert DACConfig.preset("44khz-16kbps").latent_dim == 128
    assert DACConfig.preset("44khz").latent_dim == 1024


def test_44khz_parameter_counts():
    # The paper's count is of the trainable model, weight-norm magnitudes included.
    model = DAC(DACConfig.preset("44khz"))
    count = lambda m: sum(p.numel() for p in m.parameters()) / 1e6  # noqa: E731
    assert count(model) == pytest.approx(76.65, abs=0.01)
    assert count(model.encoder) == pytest.approx(22.3, abs=0.1)
    assert count(model.quantizer) == pytest.approx(0.23, abs=0.01)
    assert count(model.decoder) == pytest.approx(54.1, abs=0.1)


@pytest.mark.parametrize("encoder_rates, decoder_rates", [
    ([2, 4, 4, 4], [4, 4, 2, 2, 2, 1]),    # the paper's 128x ablation: a stride-1 decoder stage
    ([2, 6, 8, 8], [6, 4, 4, 2, 2, 2]),    # 768x
    ([2, 8, 8, 12], [12, 4, 4, 2, 2, 2]),  # 1536x
    ([3, 5], [5, 3]),                      # odd strides only
])
def test_downsampling_ablation_lengths(encoder_rates, decoder_rates):
    config = DACConfig(encoder_dim=2, encoder_rates=encoder_rates, decoder_dim=64, decoder_rates=decoder_rates,
                       n_codebooks=2, codebook_size=16, codebook_dim=2)
    model = DAC(config).eval()
    x = torch.randn(1, 1, 3 * config.hop_length + 1)
    with torch.no_grad():
        assert model(x)[0].shape == x.shape
        assert model.decode(model.encode(x).z).shape[-1] == 4 * config.hop_length


def test_independent_decoder_rates():
    # The paper's downsampling ablations: six decoder stages against four encoder stages.
    config = DACConfig(encoder_dim=4, encoder_rates=[2, 4, 8, 8], decoder_dim=64, decoder_rates=[2, 2, 2, 4, 4, 4],
                       n_codebooks=2, codebook_size=16, codebook_dim=4)
    model = DAC(config).eval()
    assert len(model.decoder.block) == 6
    x = torch.randn(1, 1, 2048)
    with torch.no_grad():
        assert model(x)[0].shape == x.shape


@pytest.mark.parametrize("bad", [
    dict(encoder_rates=[2, 4], decoder_rates=[4, 4]),
    dict(n_codebooks=0),
    dict(quantizer_dropout=1.5),
    dict(decoder_dim=100, decoder_rates=[8, 8, 4, 2]),
])
def test_config_validation(bad):
    with pytest.raises(ValueError):
        DACConfig.from_dict({**PRESETS["tiny-44khz"], **bad})


def test_config_rejects_unknown_fields_and_round_trips():
    c = DACConfig.preset("tiny-24khz")
    assert DACConfig.from_dict(c.to_dict()) == c
    with pytest.raises(ValueError, match="unknown"):
        DACConfig.from_dict({**c.to_dict(), "hop": 3})
    assert c.architecture_hash() == DACConfig.preset("tiny-24khz", quantizer_dropout=0.5).architecture_hash()
    assert c.architecture_hash() != DACConfig.preset("tiny-16khz").architecture_hash()


def test_weight_norm_is_trainable_then_folds_exactly():
    torch.manual_seed(0)
    model = DAC(DACConfig.preset("tiny-44khz"))
    keys = list(model.state_dict())
    assert any(k.endswith("parametrizations.weight.original0") for k in keys)
    names = [n for n, _ in model.named_parameters()]
    assert "encoder.conv1.parametrizations.weight.original0" in names  # g is trained
    with torch.no_grad():  # make g differ from ||v|| so that folding has something to do
        for n, p in model.named_parameters():
            if n.endswith("original0"):
                p.mul_(1.7)
    model.eval()
    x = torch.randn(1, 1, 4096)
    with torch.no_grad():
        before = model(x)[0]
        assert not model.is_folded
        model.fold_weight_norm()
        assert model.is_folded
        after = model(x)[0]
    assert not any("parametrizations" in k for k in model.state_dict())
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-6)


def test_initialisation_is_the_references_effective_one():
    """Default PyTorch conv weights (uniform in +-1/sqrt(fan_in)), zero Conv1d biases, default
    ConvTranspose1d biases: what the reference trains from, since its trunc_normal init runs after
    weight norm and is overwritten. A real std-0.02 init would fail the spread check below."""
    torch.manual_seed(0)
    model = DAC(DACConfig.preset("tiny-44khz"))
    convs = [m for m in model.modules() if isinstance(m, (torch.nn.Conv1d, torch.nn.ConvTranspose1d))]
    assert convs
    for conv in convs:
        weight = conv.weight.detach()
        fan_in = weight.shape[1] * weight.shape[2]  # PyTorch's rule, for transposed convs too
        bound = 1 / math.sqrt(fan_in)
        assert weight.abs().max() <= bound * (1 + 1e-5)
        if weight.numel() >= 200:  # uniform(-b, b) has std b / sqrt(3)
            assert weight.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.25)
        if isinstance(conv, torch.nn.ConvTranspose1d):
            assert conv.bias.abs().max() > 0
        else:
            assert torch.all(conv.bias == 0)


def _partial_sums(model, x):
    """z for each depth 1..N in eval mode, [N, B, D, F]."""
    with torch.no_grad():
        return torch.stack([model.encode(x, n).z for n in range(1, model.config.n_codebooks + 1)])


def test_n_quantizers_in_eval_and_training():
    model = randomize_(DAC(DACConfig.preset("tiny-44khz")).fold_weight_norm())
    x = torch.randn(3, 1, 4096)
    model.eval()
    with torch.no_grad():
        full = model.encode(x)
        two = model.encode(x, 2)
    assert two.codes.shape[1] == 2
    assert torch.equal(two.codes, full.codes[:, :2])
    partial = _partial_sums(model, x)
    torch.testing.assert_close(two.z, partial[1])
    model.train()  # the reference ignores n_quantizers in training; we do not
    with torch.no_grad():
        train_two = model.encode(x, 2)
    assert train_two.codes.shape[1] == 2
    torch.testing.assert_close(train_two.z, partial[1])
    with pytest.raises(ValueError):
        model.encode(x, 5)


def test_quantizer_dropout_gives_random_depths_per_item():
    config = DACConfig.preset("tiny-44khz", quantizer_dropout=0.5)
    model = randomize_(DAC(config).fold_weight_norm())
    torch.manual_seed(1)
    x = torch.randn(16, 1, 2048)
    partial = _partial_sums(model.eval(), x)  # [N, B, D, F]
    model.train()
    seen = set()
    for _ in range(6):
        with torch.no_grad():
            z = model.encode(x).z
        for b in range(16):
            depths = [d + 1 for d in range(config.n_codebooks) if torch.allclose(z[b], partial[d, b], atol=1e-5)]
            assert len(depths) == 1, "each item must be coded at exactly one depth"
            seen.add(depths[0])
            if b >= 8:  # the second half of the batch keeps every codebook
                assert depths[0] == config.n_codebooks
    assert len(seen) > 2


def test_vq_losses_and_straight_through_gradients():
    model = DAC(DACConfig.preset("tiny-44khz"))
    model.train()
    x = torch.randn(2, 1, 2048)
    y, q = model(x)
    assert q.commitment_loss.item() > 0
    torch.testing.assert_close(q.commitment_loss, q.codebook_loss)  # same value, different gradients
    ((y - x).abs().mean() + 0.25 * q.commitment_loss + q.codebook_loss).backward()
    assert model.encoder.conv1.parametrizations.weight.original1.grad.abs().sum() > 0  # straight-through
    assert model.quantizer.quantizers[0].codebook.weight.grad.abs().sum() > 0


def test_codebook_lookup_is_nearest_normalized_code():
    model = randomize_(DAC(DACConfig.preset("tiny-44khz")).fold_weight_norm())
    vq = model.quantizer.quantizers[0]
    latents = torch.randn(2, vq.codebook_dim, 50)
    codes = vq.lookup(latents)
    cos = torch.nn.functional.normalize(latents.transpose(1, 2), dim=-1) @ torch.nn.functional.normalize(
        vq.codebook.weight, dim=-1).t()
    assert torch.equal(codes, cos.argmax(-1))


def test_fused_snake_matches_eager_forward_and_backward():
    """The compiled Snake (one kernel, any shape) gives eager's values and gradients."""
    from audiotok.nn.layers import fused_snake, snake

    for shape in [(2, 8, 37), (1, 16, 101)]:  # two shapes: one dynamic-shape kernel serves both
        x = torch.randn(*shape, requires_grad=True)
        alpha = (torch.rand(1, shape[1], 1) + 0.5).requires_grad_()
        grads = []
        for fn in (snake, fused_snake()):
            y = fn(x, alpha)
            g = torch.autograd.grad((y * torch.cos(y)).sum(), (x, alpha))
            grads.append((y.detach(), *g))
        for eager, fused in zip(*grads):
            torch.testing.assert_close(fused, eager, rtol=1e-5, atol=1e-5)


def test_fused_snake_writes_into_the_spent_buffer_without_autograd():
    """Without autograd the compiled Snake writes into ``out`` when given, as eager Snake does (a
    fresh buffer per call costs page faults), else into fresh memory of x's layout, in either layout."""
    from audiotok.nn.layers import Snake1d, snake, to_channels_last, use_fused_snake

    layer = Snake1d(16)
    use_fused_snake(layer)
    with torch.no_grad():
        layer.alpha.uniform_(0.5, 2.0)
    for x in (torch.randn(2, 16, 8192), to_channels_last(torch.randn(2, 16, 8192))):  # 2^18: fused
        with torch.inference_mode():
            out = torch.empty_like(x)
            y, fresh = layer(x, out=out), layer(x)
        assert y.data_ptr() == out.data_ptr() and fresh.stride() == x.stride()
        assert torch.equal(y, fresh)
        torch.testing.assert_close(y, snake(x, layer.alpha.detach()), rtol=1e-5, atol=1e-5)


def test_only_activations_large_enough_to_pay_run_the_compiled_snake(monkeypatch):
    from audiotok.nn import layers

    calls = []
    monkeypatch.setattr(layers, "fused_snake", lambda: lambda x, alpha, out=None: calls.append(x.numel()) or x)
    layer = layers.Snake1d(16)
    layers.use_fused_snake(layer)
    small, large = torch.randn(1, 16, layers.FUSED_SNAKE_MIN_ELEMENTS // 16 - 1), torch.randn(2, 16, 8192)
    with torch.inference_mode():
        layer(small), layer(large)
    assert calls == [large.numel()]


def test_snake_inference_path_is_bit_identical_to_the_autograd_path():
    """Without autograd Snake works in place on one buffer; values equal the reference order bit for
    bit, and the input is left untouched."""
    from audiotok.nn.layers import snake

    x = torch.randn(2, 8, 1001) * 3
    alpha = torch.rand(1, 8, 1) + 0.05
    reference = snake(x.clone().requires_grad_(), alpha).detach()  # the out-of-place, autograd path
    before = x.clone()
    with torch.inference_mode():
        fast = snake(x, alpha)
    assert torch.equal(fast, reference)
    assert torch.equal(x, before)
    with torch.no_grad():
        assert torch.equal(snake(x, alpha), reference)


def test_decoder_tail_stays_float32_under_autocast():
    """bf16 autocast runs the decoder's body in bf16, its last block and output layer in float32."""
    model = DAC(DACConfig.preset("tiny-44khz"))
    seen = {}

    def record(name):
        return lambda module, inputs, output: seen.__setitem__(name, output.dtype)

    model.decoder.conv1.register_forward_hook(record("first"))
    model.decoder.block[-1].conv_t1.register_forward_hook(record("last block"))
    model.decoder.conv2.register_forward_hook(record("output"))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, _ = model(torch.randn(1, 1, 2048))
    assert seen == {"first": torch.bfloat16, "last block": torch.float32, "output": torch.float32}
    assert y.dtype == torch.float32
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # inference reuses no buffers here
        assert model(torch.randn(1, 1, 2048))[0].dtype == torch.float32


def test_residual_unit_inference_path_is_bit_identical_to_the_autograd_path():
    """Without autograd a residual unit writes into its spent buffers, in either layout: the same bits."""
    from audiotok.nn.layers import fold_weight_norm, use_channels_last
    from audiotok.nn.model import ResidualUnit

    torch.manual_seed(0)
    unit = fold_weight_norm(ResidualUnit(16, 3))
    with torch.no_grad():
        unit.snake1.alpha.uniform_(0.5, 2.0)
    for channels_last in (False, True):
        use_channels_last(unit, channels_last)
        x = torch.randn(2, 16, 301)
        reference = unit(x.clone().requires_grad_(), [301, 200]).detach()
        with torch.inference_mode():
            assert torch.equal(unit(x, [301, 200]), reference)


@pytest.mark.parametrize("decoder_rates", [[4, 4, 2, 2, 2, 1], [5, 3]])  # with a stride-1 stage; odd strides
def test_channels_last_decoder_matches_channels_first(decoder_rates):
    """In channels-last mode every decoder convolution reads and writes [B, T, C] memory (one copy, of
    the latents), and the audio equals the channels-first decoder's within float rounding, padded
    batches included. A CPU tokenizer uses it for the decoder only: the encoder and quantizer keep
    their channels-first path (their codes must equal the reference's bit for bit)."""
    from audiotok.nn.layers import use_channels_last

    def is_channels_last(x):  # [B, C, T] stored as [B, T, C]
        return x.shape[1] > 1 and x.shape[2] > 1 and x.stride(1) == 1

    config = DACConfig(encoder_dim=4, encoder_rates=[2, 4, 4, 4] if len(decoder_rates) > 2 else [3, 5],
                       decoder_dim=64, decoder_rates=decoder_rates, n_codebooks=2, codebook_size=16, codebook_dim=2)
    torch.manual_seed(0)
    model = randomize_(DAC(config).fold_weight_norm().eval())
    z = torch.randn(2, config.latent_dim, 9)
    layouts = []
    for module in model.decoder.modules():
        if isinstance(module, (torch.nn.Conv1d, torch.nn.ConvTranspose1d)) and module.out_channels > 1:
            module.register_forward_hook(lambda m, inputs, out: layouts.append((is_channels_last(inputs[0]),
                                                                                is_channels_last(out))))
    with torch.inference_mode():
        channels_first = model.decode(z.clone(), lengths=[9, 6])
        assert not any(i or o for i, o in layouts)
        layouts.clear()
        use_channels_last(model.decoder)
        channels_last = model.decode(z.clone(), lengths=[9, 6])
    assert [o for _, o in layouts] == [True] * len(layouts)
    assert [i for i, _ in layouts] == [False] + [True] * (len(layouts) - 1)  # one copy, at the input
    assert channels_first.abs().mean() > 0.05
    torch.testing.assert_close(channels_last, channels_first, rtol=0, atol=1e-5)
    use_channels_last(model, False)
    AudioTokenizer(model)
    modes = {(name.split(".")[0], m.channels_last) for name, m in model.named_modules() if hasattr(m, "channels_last")}
    assert modes == {("encoder", False), ("quantizer", False), ("decoder", True)}
