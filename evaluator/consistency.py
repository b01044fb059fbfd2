"""Generator–tokenizer consistency by re-tokenization, for any tokenizer of the registry.

Decode a token sequence into an image, encode the image again with the same tokenizer, and compare: the share of
tokens that come back the same (overall, by position, and over the first quarter / middle half / last quarter of the
positions) and the mean L2 distance between the codebook vectors (`get_quantized_states`) of each token and of its
re-encoding. On dataset tokens this measures the tokenizer alone (its baseline: a decoder and an encoder that are
not exact inverses); on generated tokens it also measures how far the generator strays from sequences the
tokenizer would itself produce, the embedding unawareness reAR names (arXiv 2510.04450). The gap between the two
is the generator–tokenizer inconsistency:
    gap.token_match = dataset − generated, gap.codebook_distance = generated − dataset (positive: generated worse).

The decoded image is re-encoded as the 8-bit image the sampler saves (`modeling.tokenizers.decoded_to_uint8`: the
bytes the tokenizer's original writes), for generated and dataset tokens alike: what FID sees and what a real image
is. A tokenizer that decodes prefixes (ReTok) takes sequences of its first k tokens; they are compared with the
first k tokens of the re-encoding.

    python -m evaluator.consistency runs/samples/rear_s.npz config=configs/rear_s.yaml --reference data/val.jsonl
    python -m evaluator.consistency runs/rear_toy/eval_samples.npz config=runs/rear_toy/config.yaml \\
        --reference runs/rear_toy/held_out.jsonl

The report goes to experiment.output_dir/consistency.{json,png}: with a run's own config, its run folder, where
`python -m evaluator.compare` reads it beside the exposure report.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
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
from evaluator.token_sets import FORMATS, TokenSet, load_token_set
from modeling import build_tokenizer
from modeling.tokenizers import decoded_to_uint8
from utils.cli import Script, run
from utils.config import canonical_choice

METRICS = ("token_match", "codebook_distance")

FLAGS = measurement_flags()
FLAGS.add_argument("--reference", default=None,
                   help="held-out dataset tokens (.jsonl pre-tokenized with this tokenizer): the tokenizer's baseline")

SCRIPT = Script(
    usage="python -m evaluator.consistency TOKENS config=FILE.yaml [experiment.tokenizer_checkpoint=W] "
          "[--reference DATA.jsonl] [--limit N] [--batch-size B] [--device D] [--output PREFIX]",
    summary="Re-tokenization consistency: decode TOKENS (" + FORMATS + ") with the config's tokenizer, encode the "
            "8-bit images again, and report the share of tokens that come back (overall, by position) and the "
            "codebook distance to their re-encodings; with --reference, the same for dataset tokens and the gap. "
            "Writes PREFIX.json and PREFIX.png (default PREFIX: experiment.output_dir/consistency, the run folder "
            "with config=RUN/config.yaml).",
    example="python -m evaluator.consistency runs/samples/rear_s.npz config=configs/rear_s.yaml "
            "--reference data/val_center.jsonl --limit 10000",
    sections=("model.vq_model.model_type", "model.vq_model.pretrained_tokenizer_weight",
              "experiment.tokenizer_checkpoint", "experiment.output_dir", "dataset.preprocessing.crop_size"),
    flags=FLAGS,
    positional="tokens",
)


def as_8bit(images: Tensor, tokenizer: nn.Module) -> Tensor:
    """Decoded images (B, 3, H, W) as the bytes the sampler saves for this tokenizer, back in [0, 1]."""
    saved = torch.from_numpy(decoded_to_uint8(images, tokenizer)).to(images.device)
    return saved.permute(0, 3, 1, 2).float() / 255.0


@torch.no_grad()
def retokenize(tokenizer: nn.Module, tokens: Tensor) -> Tensor:
    """The tokens of the 8-bit images that `tokens` (B, k) decode to: the first k of them."""
    return tokenizer.encode(as_8bit(tokenizer.decode_tokens(tokens), tokenizer))[:, : tokens.shape[1]]


@torch.no_grad()
def measure(tokenizer: nn.Module, token_set: TokenSet, batch_size: int, device: torch.device,
            what: str = "tokens") -> dict:
    """Token match and codebook distance of every sequence of `token_set` and its re-encoding."""
    means = PositionMeans()
    progress = tqdm(total=len(token_set), unit="seq", desc=f"re-tokenizing {what}")
    for start in range(0, len(token_set), batch_size):
        tokens = torch.from_numpy(token_set.tokens[start : start + batch_size]).to(device)
        again = retokenize(tokenizer, tokens)
        moved = tokenizer.get_quantized_states(tokens).float() - tokenizer.get_quantized_states(again).float()
        means.add(token_match=again == tokens, codebook_distance=moved.norm(dim=-1))
        progress.update(len(tokens))
    progress.close()
    return {"source": token_set.source, "num_sequences": len(token_set),
            **{name: means.summary(name) for name in METRICS}}


def gap(generated: dict, dataset: dict) -> dict:
    """How much worse generated tokens come back than dataset tokens (positive: worse)."""
    return {
        "token_match": dataset["token_match"]["mean"] - generated["token_match"]["mean"],
        "codebook_distance": generated["codebook_distance"]["mean"] - dataset["codebook_distance"]["mean"],
    }


def figure_of(results: dict):
    figure, (match, distance) = new_figure(2)
    parts = {key: results[key] for key in ("generated", "dataset") if key in results}
    plot_by_position(match, {k: v["token_match"]["by_position"] for k, v in parts.items()}, "share of tokens back")
    plot_by_position(distance, {k: v["codebook_distance"]["by_position"] for k, v in parts.items()},
                     "codebook distance to re-encoding")
    figure.suptitle(f"re-tokenization consistency, {results['tokenizer']} tokenizer", fontsize=10)
    return figure


def print_summary(results: dict) -> None:
    for key in ("generated", "dataset"):
        if key in results:
            part = results[key]
            print(f"{key}: {part['token_match']['mean']:.4f} of tokens come back, codebook distance "
                  f"{part['codebook_distance']['mean']:.4f} ({part['num_sequences']} sequences)")
    if "gap" in results:
        gap_ = results["gap"]
        print(f"gap (generator-tokenizer inconsistency; positive: generated tokens come back worse): token match "
              f"{gap_['token_match']:+.4f}, codebook distance {gap_['codebook_distance']:+.4f}")


def main(config, flags) -> dict:
    device = resolve_device(flags.device)
    # The tokenizer first: a run without weights fails before the token files are read (and cached).
    tokenizer = build_tokenizer(config).to(device).eval()
    generated = load_token_set(flags.tokens, flags.limit)
    dataset: Optional[TokenSet] = load_token_set(flags.reference, flags.limit) if flags.reference else None
    for token_set in filter(None, (generated, dataset)):
        token_set.check(tokenizer.codebook_size, tokenizer.num_tokens,
                        prefixes=getattr(tokenizer, "decodes_prefixes", False))
    results = {
        "tokenizer": canonical_choice(config, "model.vq_model.model_type"),
        "tokenizer_checkpoint": config.experiment.tokenizer_checkpoint
        or config.model.vq_model.pretrained_tokenizer_weight,
        "image_bits": 8,
        "generated": measure(tokenizer, generated, flags.batch_size, device, "generated tokens"),
    }
    if dataset is not None:
        results["dataset"] = measure(tokenizer, dataset, flags.batch_size, device, "dataset tokens")
        results["gap"] = gap(results["generated"], results["dataset"])
    print_summary(results)
    write_report(flags.output or os.path.join(config.experiment.output_dir, "consistency"), results,
                 figure_of(results))
    return results


if __name__ == "__main__":
    run(SCRIPT, main)
