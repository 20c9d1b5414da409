"""How hard each training loss pulls: the gradient of each loss term on the decoder's weights, side by side.

A loss weight only means something next to the others: this prints, for one model on one batch of
training excerpts (the config's data, the trainer's excerpt processing), each term's value, its weight
in the config, and the norm of its weighted gradient on the decoder's parameters, relative to the mel
term's. Terms whose weight is 0 in the config are shown at weight 1.

    python benchmarks/bench_loss_gradients.py --model default --config recipes/configs/default-phase-cpu.yml
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine  # noqa: E402

from audiotok.data import DataConfig  # noqa: E402
from audiotok.nn.distances import ComplexSTFTLoss, MelSpectrogramLoss  # noqa: E402
from audiotok.train.config import load_config  # noqa: E402
from audiotok.train.trainer import build_generator  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default", help="any model AudioTokenizer.from_pretrained loads")
    p.add_argument("--config", default="recipes/configs/default-phase-cpu.yml", help="weights and data")
    p.add_argument("--batch", type=int, default=8, help="training excerpts in the batch")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("overrides", nargs="*", help="config overrides such as data.duration=1.0")
    args = p.parse_args(argv)

    config = load_config(args.config, args.overrides)
    weights = config.loss
    data = DataConfig.from_dict({**config.data, "sample_rate": config.model.sample_rate, "seed": args.seed})
    x = torch.stack(list(itertools.islice(iter(data.train_dataset()), args.batch)))  # [B, 1, N]
    torch.manual_seed(args.seed)
    generator = build_generator(config, args.model).train()
    y, _ = generator(x)
    mel = MelSpectrogramLoss(config.model.sample_rate, weights.mel_window_lengths, weights.mel_n_mels,
                             clamp_eps=weights.mel_clamp_eps, pow=weights.mel_pow, mag_weight=weights.mel_mag_weight)
    complex_stft = ComplexSTFTLoss(weights.complex_stft_window_lengths, weights.complex_stft_pow,
                                   weights.complex_stft_mag_weight)
    terms = {"mel": mel(y, x), "waveform": torch.nn.functional.l1_loss(y, x), "complex_stft": complex_stft(y, x)}
    params = list(generator.decoder.parameters())
    rows = []
    for name, value in terms.items():
        weight = getattr(weights, name) or 1.0
        grads = torch.autograd.grad(weight * value, params, retain_graph=True)
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
        rows.append((name, float(value.detach()), weight, float(norm)))
    reference = rows[0][3]
    print(f"Model {args.model}, config {args.config}, batch {args.batch} x {config.data.get('duration', 0.38)} s; "
          f"machine: {machine(torch.device('cpu'))}, torch {torch.__version__}\n")
    print("| term | value | weight | weighted gradient norm (decoder) | / mel's |")
    print("|---|---|---|---|---|")
    for name, value, weight, norm in rows:
        print(f"| {name} | {value:.4g} | {weight:g} | {norm:.4g} | {norm / reference:.3g} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
