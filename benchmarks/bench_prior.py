"""A small prior on real speech codes: per-codebook validation loss against a unigram baseline, and how
likely the prior finds the true continuation of held-out prompts against random legal codes.

1. ``tokenize``: a seeded subset of the speech files of the real-audio manifest (``--train-minutes`` of the
   train split, ``--eval-minutes`` of the eval split, which shares no package with train) is coded with
   the bundled default model by ``audiotok.bulk`` (symlinks in ``WORK/audio``, codes in ``WORK/codes``).
2. ``train``: ``recipes/configs/prior/small.yml`` (or ``--config``) for ``--steps`` steps with
   ``audiotok.lm.trainer.train_prior`` (run in ``WORK/run``; running again resumes).
3. ``evaluate``:
   * validation loss per codebook (nats per code) of the prior's best checkpoint on the first
     ``data.valid_blocks`` eval blocks, and of a unigram model of the train codes (per codebook code
     frequencies, add-one smoothed) on exactly the same targets;
   * continuation: for eval records of at least ``--prompt-seconds + --continuation-seconds``, the
     prior's negative log-likelihood (nats per code) of the true next ``--continuation-seconds`` given
     the prompt, against the same for uniformly random codes in their place (as likely as any legal
     continuation is under a uniform model: ``ln 1024`` nats) and the unigram's NLL of the true
     continuation. A prior that models speech puts its mass near the truth: its NLL of the true
     continuation is below the unigram's, and far below its NLL of random codes. This scores the
     prior's predictive distribution directly and exactly, without the noise of decoding samples.

    python benchmarks/bench_prior.py --manifest data/real-audio --work runs/bench-prior --steps 2000
    python benchmarks/bench_prior.py --manifest data/real-audio --work runs/tiny --train-minutes 1 \\
        --eval-minutes 0.5 --steps 20 prior.backbone.n_layer=1
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def pick_files(manifest: Path, split: str, minutes: float, seed: int) -> list[tuple[Path, float]]:
    """A seeded random subset of the split's speech files, up to ``minutes`` of audio."""
    from audiotok.data import read_manifest

    rows = [r for r in read_manifest(manifest) if r["split"] == split and r["category"] == "speech"]
    random.Random(seed).shuffle(rows)
    picked, total = [], 0.0
    for row in rows:
        if total >= minutes * 60:
            break
        picked.append((manifest / row["path"], float(row["seconds"])))
        total += float(row["seconds"])
    return picked


def tokenize(args, work: Path) -> None:
    from audiotok.bulk import BulkConfig, InputSpec, tokenize_dataset
    from audiotok.weights.hub import DEFAULT_MODEL_ID

    for split, minutes in (("train", args.train_minutes), ("eval", args.eval_minutes)):
        out = work / "codes" / split
        if (out / "manifest.json").exists():
            continue
        folder = work / "audio" / split
        folder.mkdir(parents=True, exist_ok=True)
        files = pick_files(args.manifest, split, minutes, args.seed)
        for i, (path, _) in enumerate(files):
            link = folder / f"{i:05d}{path.suffix}"
            if not link.exists():
                link.symlink_to(path.resolve())
        start = time.perf_counter()
        job = BulkConfig(InputSpec("folder", str(folder)), str(out), DEFAULT_MODEL_ID, num_workers=1, progress=False)
        summary = tokenize_dataset(job)
        print(f"tokenized {split}: {sum(s for _, s in files) / 60:.1f} min of audio in "
              f"{time.perf_counter() - start:.0f} s; {summary}", flush=True)


def unigram(codes, n_codebooks: int, codebook_size: int) -> torch.Tensor:
    """Per-codebook log-probabilities ``[K, S]`` of the train codes, add-one smoothed."""
    counts = np.ones((n_codebooks, codebook_size))
    for record in codes:
        for k in range(n_codebooks):
            counts[k] += np.bincount(record.channel_codes[0][k], minlength=codebook_size)
    return torch.from_numpy(np.log(counts / counts.sum(axis=1, keepdims=True))).float()


def code_targets(prior, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(codebook, code) of every code target of ``labels`` (next-token targets, so the first step is
    left out), as flat tensors."""
    labels = labels[..., 1:]
    codebook = prior.codebook_of(labels)
    keep = codebook >= 0
    offsets = torch.from_numpy(prior.vocab.codebook_offsets(prior.n_codebooks))
    return codebook[keep], labels[keep] - offsets[codebook[keep]]


def frame_map(prior, n_frames: int) -> torch.Tensor:
    """The frame index of every id of an encoded ``[K, n_frames]`` sequence (-1 on bos, eos, pads)."""
    from audiotok.lm import apply_pattern

    frames = np.broadcast_to(np.arange(n_frames), (prior.n_codebooks, n_frames))
    laid = np.asarray(apply_pattern(frames, prior.pattern, pad_value=-1))
    edge = np.full(laid.shape[:-1] + (1,), -1)
    return torch.from_numpy(np.concatenate([edge, laid, edge], axis=-1))


@torch.no_grad()
def continuation_nll(prior, codes: torch.Tensor, n_prompt: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed NLL ``[K]`` and count ``[K]`` of the codes of frames ``n_prompt:`` given the ones before."""
    from audiotok.lm import IGNORE_INDEX

    ids = prior.vocab.encode(codes, prior.pattern)
    labels = ids.masked_fill(frame_map(prior, codes.shape[1]) < n_prompt, IGNORE_INDEX)
    logits, _ = prior(ids[None])
    _, sums, counts = prior.loss(logits, labels[None])
    return sums, counts


def evaluate(args, work: Path, config) -> dict:
    from audiotok.lm import CodeDataset, CodePrior
    from audiotok.lm.trainer import examples, validate

    run = work / "run"
    prior = CodePrior.from_pretrained(run / "best" if (run / "best").exists() else run)
    k_all, size = prior.n_codebooks, prior.vocab.codebook_size
    logp = unigram(CodeDataset(work / "codes" / "train"), k_all, size)

    eval_codes = CodeDataset(work / "codes" / "eval")
    prior.check_dataset(eval_codes)  # the codes of the codec the prior was trained on
    blocks = list(iter(examples(config, prior, eval_codes)))[: config.data.valid_blocks]
    val = validate(prior, blocks, torch.device("cpu"))
    uni_sum, uni_count = torch.zeros(k_all), torch.zeros(k_all)
    for block in blocks:
        codebook, code = code_targets(prior, block["labels"][None])
        uni_sum.index_add_(0, codebook, -logp[codebook, code])
        uni_count.index_add_(0, codebook, torch.ones(len(code)))

    frame_rate = prior.codec_config.frame_rate
    n_prompt, n_cont = round(args.prompt_seconds * frame_rate), round(args.continuation_seconds * frame_rate)
    rng = torch.Generator().manual_seed(args.seed)
    totals = {name: torch.zeros(k_all) for name in ("true", "random", "unigram", "count")}
    n_prompts = 0
    for record in eval_codes:
        codes = torch.from_numpy(record.channel_codes[0][:k_all, : n_prompt + n_cont].astype(np.int64))
        if codes.shape[1] < n_prompt + n_cont or n_prompts >= args.max_prompts:
            continue
        n_prompts += 1
        sums, counts = continuation_nll(prior, codes, n_prompt)
        noise = codes.clone()
        noise[:, n_prompt:] = torch.randint(0, size, (k_all, n_cont), generator=rng)
        totals["random"] += continuation_nll(prior, noise, n_prompt)[0]
        totals["true"] += sums
        totals["count"] += counts
        cont = codes[:, n_prompt:]
        totals["unigram"] += -logp.gather(1, cont).sum(dim=1)
    per = {name: (totals[name] / totals["count"].clamp(min=1)).tolist() for name in ("true", "random", "unigram")}
    return {
        "validation": {"prior": [val[f"loss/cb{k}"] for k in range(k_all)],
                       "unigram": (uni_sum / uni_count).tolist(), "blocks": len(blocks),
                       "targets": int(uni_count.sum())},
        "continuation": {**per, "prompts": n_prompts, "prompt_frames": n_prompt, "continuation_frames": n_cont},
    }


def table(results: dict) -> str:
    val, cont = results["validation"], results["continuation"]
    k_all = len(val["prior"])
    head = "| | " + " | ".join(f"cb{k}" for k in range(k_all)) + " | mean |\n|---|" + "---|" * (k_all + 1) + "\n"

    def row(name: str, values: list[float]) -> str:
        return f"| {name} | " + " | ".join(f"{v:.3f}" for v in values) + f" | {np.mean(values):.3f} |\n"

    return (f"Validation loss, nats per code ({val['blocks']} blocks, {val['targets']} code targets):\n\n" + head
            + row("prior", val["prior"]) + row("unigram", val["unigram"])
            + f"\nContinuation NLL, nats per code ({cont['prompts']} held-out prompts, {cont['prompt_frames']} "
              f"frames of prompt, {cont['continuation_frames']} continued):\n\n" + head
            + row("prior, true continuation", cont["true"]) + row("prior, random codes", cont["random"])
            + row("unigram, true continuation", cont["unigram"]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--manifest", type=Path, required=True, help="real-audio folder holding manifest.csv")
    p.add_argument("--work", type=Path, required=True, help="folder for audio links, codes, the run, results")
    p.add_argument("--config", type=Path, default=REPO / "recipes" / "configs" / "prior" / "small.yml")
    p.add_argument("--train-minutes", type=float, default=20.0)
    p.add_argument("--eval-minutes", type=float, default=5.0)
    p.add_argument("--steps", type=int, default=2000, help="training steps (0: tokenize only)")
    p.add_argument("--prompt-seconds", type=float, default=1.0)
    p.add_argument("--continuation-seconds", type=float, default=1.0)
    p.add_argument("--max-prompts", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    p.add_argument("overrides", nargs="*", help="prior config overrides such as prior.pattern=flatten")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from audiotok.lm.config import load_prior_config
    from audiotok.lm.trainer import train_prior

    work = args.work
    tokenize(args, work)
    if args.steps == 0:
        return
    codes = work / "codes"
    config = load_prior_config(args.config, [f"data.train={codes / 'train'}", f"data.valid={codes / 'eval'}",
                                             f"train.num_iters={args.steps}", *args.overrides])
    start = time.perf_counter()
    train_prior(config, work / "run", device="cpu")
    seconds = time.perf_counter() - start
    results = evaluate(args, work, config)
    results.update(machine=machine(torch.device("cpu")), train_seconds=round(seconds), steps=args.steps,
                   config=config.to_dict())
    (work / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"{results['machine']}; {args.steps} steps in {seconds / 60:.1f} min\n")
    print(table(results))


if __name__ == "__main__":
    main()
