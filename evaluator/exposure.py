"""Exposure bias: how much a generator leans on a clean context, for any backbone of the registry.

On held-out pre-tokenized data: the teacher-forced NLL (nats per token) and token accuracy (argmax = target) by
position, with the context clean and corrupted at rates ρ (0.1, 0.3, 0.5 by default); the targets stay clean. The
least-squares slope of accuracy (and of NLL) against ρ over {0} ∪ rates says how fast the predictions degrade as
the context drifts from the data, as it does in a model's own samples (exposure bias). reAR's noisy context trains
for exactly this (arXiv 2510.04450).

The corruption is the training's `switch` (`modeling.objective.noisy_context`) at a fixed rate, with two changes so
that ρ is the share of context tokens that differ from the data: each token is corrupted with probability exactly ρ
(training draws a per-sample rate u·r, u ~ U(0, 1), a mix of nearly clean and heavily corrupted sequences), and its
replacement is uniform over the V − 1 *other* tokens (training's is uniform over all V, so it keeps the token with
probability 1/V). One uniform and one replacement are drawn per token from `--seed` and shared by every rate: a
token corrupted at 0.1 is corrupted at 0.3 and 0.5 too, with the same replacement, so the curves differ by the rate
alone, and two models measured on the same data with the same seed see the same corrupted contexts.

    python -m evaluator.exposure config=configs/rear_s.yaml experiment.generator_checkpoint=reAR-S.safetensors \\
        --data data/val_center.jsonl --limit 10000
    python -m evaluator.exposure config=runs/rear_toy/config.yaml --data runs/rear_toy/held_out.jsonl

The report goes to experiment.output_dir/exposure.{json,png}: with a run's own config, its run folder.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from evaluator.measurement import (
    PositionMeans,
    measurement_flags,
    new_figure,
    plot_by_position,
    resolve_device,
    write_report,
)
from evaluator.token_sets import TokenSet, load_token_set
from modeling import load_generator
from modeling.tokenizers import decodes_prefixes
from utils.cli import Script, run
from utils.config import canonical_choice
from utils.errors import UsageError

RATES = (0.1, 0.3, 0.5)
METRICS = ("accuracy", "nll")
SUMMARIES = ("mean", "first_quarter", "middle_half", "last_quarter")
CORRUPTION = ("switch at a fixed rate: each context token replaced, with probability exactly the rate, by a uniform "
              "random other token; targets clean; the draws are shared by every rate")


def rates_argument(text: str) -> Tuple[float, ...]:
    """'0.1,0.3,0.5' → (0.1, 0.3, 0.5): distinct rates in (0, 1], in increasing order."""
    try:
        rates = sorted({float(part) for part in text.split(",")})
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a comma-separated list of rates, e.g. 0.1,0.3,0.5")
    if not all(0.0 < rate <= 1.0 for rate in rates):
        raise argparse.ArgumentTypeError(f"rates must be in (0, 1], got {text}")
    return tuple(rates)


FLAGS = measurement_flags()
FLAGS.add_argument("--data", required=True, help="held-out pre-tokenized data (.jsonl, or a sampler .npz)")
FLAGS.add_argument("--rates", type=rates_argument, default=RATES, help="corruption rates (default 0.1,0.3,0.5)")
FLAGS.add_argument("--seed", type=int, default=0, help="seed of the corruption draws")

SCRIPT = Script(
    usage="python -m evaluator.exposure config=FILE.yaml experiment.generator_checkpoint=W --data DATA.jsonl "
          "[--rates 0.1,0.3,0.5] [--seed S] [--limit N] [--batch-size B] [--device D] [--output PREFIX]",
    summary="Exposure bias: the generator's teacher-forced NLL and token accuracy on DATA, by position, with a "
            "clean context and with the context corrupted at each rate (targets clean), and the slope of accuracy "
            "against the rate. Writes PREFIX.json and PREFIX.png (default PREFIX: experiment.output_dir/exposure, "
            "the run folder with config=RUN/config.yaml, which also names the generator).",
    example="python -m evaluator.exposure config=configs/rear_s.yaml experiment.generator_checkpoint="
            "reAR-S.safetensors --data data/val_center.jsonl --limit 10000",
    sections=("experiment.generator_checkpoint", "experiment.output_dir", "model.generator.backbone"),
    flags=FLAGS,
)


# ----------------------------------------------------------------------------------------- the corruption
@dataclass
class ContextNoise:
    uniform: Tensor  # (N, L) in [0, 1): the token is corrupted at rate ρ when uniform < ρ
    offset: Tensor  # (N, L) in [1, V): its replacement is (token + offset) mod V, never the token itself


def context_noise(shape: Tuple[int, int], codebook_size: int, seed: int) -> ContextNoise:
    """The draws of every token of a data set, made at once on the CPU: the same for any batch size and device."""
    generator = torch.Generator().manual_seed(seed)
    uniform = torch.rand(shape, generator=generator)
    offset = torch.randint(1, codebook_size, shape, generator=generator, dtype=torch.int32)
    return ContextNoise(uniform, offset)


def corrupt(tokens: Tensor, rate: float, uniform: Tensor, offset: Tensor, codebook_size: int) -> Tensor:
    """`tokens` with those whose uniform is below `rate` switched to another token."""
    return torch.where(uniform < rate, (tokens + offset) % codebook_size, tokens)


# ----------------------------------------------------------------------------------------- the measurement
def slope(rates: Sequence[float], values: Sequence[float]) -> float:
    """Least-squares slope of `values` against `rates`."""
    return float(np.polyfit(rates, values, 1)[0])


def slopes(by_rate: List[dict]) -> Dict[str, Dict[str, float]]:
    """{metric: {summary: slope against the rate}} for accuracy and NLL, overall and by band."""
    rates = [entry["rate"] for entry in by_rate]
    return {metric: {name: slope(rates, [entry[metric][name] for entry in by_rate]) for name in SUMMARIES}
            for metric in METRICS}


@torch.no_grad()
def measure(model: nn.Module, data: TokenSet, rates: Sequence[float], seed: int, batch_size: int,
            device: torch.device) -> dict:
    """Teacher-forced NLL and accuracy of `model` on `data` for a clean context and each corruption rate."""
    all_rates = (0.0, *rates)
    codebook_size = model.codebook_size
    noise = context_noise(data.tokens.shape, codebook_size, seed)
    means = {rate: PositionMeans() for rate in all_rates}
    progress = tqdm(total=len(data), unit="seq", desc=f"teacher forcing at rates {', '.join(map(str, all_rates))}")
    for start in range(0, len(data), batch_size):
        rows = slice(start, start + batch_size)
        tokens = torch.from_numpy(data.tokens[rows]).to(device)
        class_ids = torch.from_numpy(data.labels[rows]).to(device)
        uniform, offset = noise.uniform[rows].to(device), noise.offset[rows].to(device)
        for rate in all_rates:
            logits = model(corrupt(tokens, rate, uniform, offset, codebook_size), class_ids).logits.float()
            nll = F.cross_entropy(logits.transpose(1, 2), tokens, reduction="none")
            means[rate].add(accuracy=logits.argmax(dim=-1) == tokens, nll=nll)
        progress.update(len(tokens))
    progress.close()
    by_rate = [{"rate": rate, **{metric: means[rate].summary(metric) for metric in METRICS}} for rate in all_rates]
    return {"num_sequences": len(data), "rates": list(all_rates), "by_rate": by_rate, "slopes": slopes(by_rate)}


# ----------------------------------------------------------------------------------------- the report
def figure_of(results: dict):
    figure, (accuracy, nll, trend) = new_figure(3)
    by_rate = results["by_rate"]
    plot_by_position(accuracy, {f"rate {e['rate']}": e["accuracy"]["by_position"] for e in by_rate}, "token accuracy")
    plot_by_position(nll, {f"rate {e['rate']}": e["nll"]["by_position"] for e in by_rate}, "NLL (nats)")
    rates = np.asarray(results["rates"])
    for name in SUMMARIES:
        values = [e["accuracy"][name] for e in by_rate]
        label = f"{name.replace('_', ' ')} (slope {results['slopes']['accuracy'][name]:.3f})"
        trend.plot(rates, values, marker="o", linewidth=1.2, label=label)
    trend.set_xlabel("context corruption rate")
    trend.set_ylabel("token accuracy")
    trend.grid(alpha=0.3)
    trend.legend(fontsize=8)
    figure.suptitle(f"exposure bias, {results['backbone']} generator, {results['num_sequences']} sequences",
                    fontsize=10)
    return figure


def main(config, flags) -> dict:
    checkpoint = config.experiment.generator_checkpoint
    if not checkpoint:
        raise UsageError("set experiment.generator_checkpoint=PATH (a local file or a released name)")
    device = resolve_device(flags.device)
    # The generator first: a run without weights fails before the token file is read (and cached).
    model = load_generator(config, checkpoint).to(device)
    data = load_token_set(flags.data, flags.limit)
    g = config.model.generator
    if decodes_prefixes(config) and data.tokens.shape[1] > g.image_seq_len:  # as training reads a prefix model's data
        data.tokens = data.tokens[:, : g.image_seq_len]
    data.check(config.model.vq_model.codebook_size, g.image_seq_len, g.condition_num_classes)
    results = {
        "backbone": canonical_choice(config, "model.generator.backbone"),
        "generator_checkpoint": checkpoint,
        "data": flags.data,
        "corruption": CORRUPTION,
        "seed": flags.seed,
        **measure(model, data, flags.rates, flags.seed, flags.batch_size, device),
    }
    for entry in results["by_rate"]:
        print(f"rate {entry['rate']}: accuracy {entry['accuracy']['mean']:.4f}, NLL {entry['nll']['mean']:.4f}")
    print(f"accuracy slope {results['slopes']['accuracy']['mean']:.4f} per unit of corruption rate")
    write_report(flags.output or os.path.join(config.experiment.output_dir, "exposure"), results, figure_of(results))
    return results


if __name__ == "__main__":
    run(SCRIPT, main)
