"""A tokenizer and a backbone of your own go the whole way at tiny size, as every registered one does: train, then,
with the run folder moved and its config.yaml alone, sample, score, draw the demo grid, tokenize held-out images,
measure consistency and exposure bias, and compare. The default run takes the tokenizer and the backbone of
tests/fixtures/bring_your_own (the example of docs/models.md), added to the registries the way a module of the
package adds itself; `python -m pytest -m registry tests` runs every registered backbone and tokenizer through the
same path, and a default test fails when one is registered without a case here."""

import json
import shutil
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Optional, Tuple

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from conftest import FIXTURES
from modeling import BACKBONES, TOKENIZERS, build_generator
from modeling.objective import Objective
from modeling.tokenizers.base import RandomCodebook
from modeling.tokenizers.maskgit_vqgan import MaskGITVQGAN
from tiny_models import TINY_TOKENIZERS, TINY_VQGAN, TOY_CONFIG, random_weights, tokenizer_overrides
from utils.config import ConfigError, canonical_choice, load_config, merged_config

OWN = FIXTURES / "bring_your_own"
OWN_MODULES = [OWN / "colour_tokenizer.py", OWN / "tiny_gpt.py"]


def toy_run(image_size: int, num_tokens: int) -> Tuple[str, ...]:
    """A tiny reAR trained 12 steps on 256 toy images of `image_size`, modelling `num_tokens` tokens of each."""
    return (f"dataset.toy.image_size={image_size}", "dataset.toy.num_images=256", "model.generator.hidden_size=32",
            "model.generator.num_hidden_layers=2", "model.generator.num_attention_heads=2",
            "model.generator.intermediate_size=64", "model.generator.decode_align_layer_idx=1",
            "model.generator.projection_dim=16", f"model.generator.image_seq_len={num_tokens}",
            "training.per_gpu_batch_size=8", "training.max_train_steps=12", "experiment.save_every=12",
            "experiment.generate_every=12", "sampling.num_samples=20")


def write_tiny_vqgan(path: Path) -> None:
    torch.manual_seed(0)
    save_file(MaskGITVQGAN(TINY_VQGAN).state_dict(), str(path))


@dataclass(frozen=True)
class Case:
    """The training command's config and overrides; the sizes of its samples (image side, N tokens, codebook V);
    and what writes the random tokenizer weights it is trained with (experiment.tokenizer_checkpoint), or None for
    a tokenizer fitted at start-up."""

    config: Path
    overrides: Tuple[str, ...]
    image_size: int = 16
    num_tokens: int = 16
    codebook_size: int = 16
    write_tokenizer: Optional[Callable[[Path], object]] = None


def tokenizer_case(name: str) -> Case:
    """The tiny tokenizer `name` of tests/tiny_models.py at its own crop size, its N tokens modelled."""
    tiny = TINY_TOKENIZERS[name]
    overrides = (*toy_run(tiny["crop"], tiny["tokens"]), *tokenizer_overrides(name))
    return Case(TOY_CONFIG, overrides, tiny["crop"], tiny["tokens"], tiny["vq_model"]["codebook_size"],
                partial(random_weights, TOY_CONFIG, overrides=overrides))


TOY_TOKENIZER = ("model.vq_model.codebook_size=16", "model.vq_model.num_latent_tokens=16")
CASES = {
    "own tokenizer and backbone": Case(OWN / "rear_tiny_own.yaml", ()),
    "rar backbone": Case(TOY_CONFIG, (*toy_run(16, 16), *TOY_TOKENIZER)),
    "alitok_ar backbone": Case(TOY_CONFIG, (*toy_run(16, 16), *TOY_TOKENIZER, "model.generator.backbone=alitok_ar")),
    "gpt1d backbone": Case(TOY_CONFIG, (*toy_run(16, 16), *TOY_TOKENIZER, "model.generator.backbone=gpt1d")),
    "maskgit_vqgan tokenizer": Case(TOY_CONFIG, (*toy_run(16, 16), "model.vq_model.model_type=maskgit_vqgan",
                                                 "model.vq_model.codebook_size=32", "model.vq_model.token_size=16",
                                                 "model.vq_model.num_latent_tokens=16"),
                                    codebook_size=32, write_tokenizer=write_tiny_vqgan),
    "titok tokenizer": tokenizer_case("titok"),
    "vqgan_plus tokenizer": tokenizer_case("vqplus"),  # under the reAR release's name for it
    "alitok tokenizer": tokenizer_case("alitok"),
    "retok tokenizer": tokenizer_case("retok"),
}


def ok(server, *argv):
    result = server.run([str(a) for a in argv], imports=OWN_MODULES, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


@pytest.mark.parametrize("name", [pytest.param(name, marks=() if name.startswith("own") else pytest.mark.registry)
                                  for name in CASES])
def test_train_then_everything_from_the_run_config_alone(server, tmp_path, name):
    case, trained = CASES[name], tmp_path / "trained"
    size, n, v = case.image_size, case.num_tokens, case.codebook_size
    tokenizer = []
    if case.write_tokenizer:
        case.write_tokenizer(tmp_path / "tokenizer.safetensors")
        tokenizer = [f"experiment.tokenizer_checkpoint={tmp_path / 'tokenizer.safetensors'}"]
    ok(server, "scripts/train_rear.py", f"config={case.config}", *case.overrides, *tokenizer,
       f"experiment.output_dir={trained}")
    run = tmp_path / "moved" / "run"  # the folder moves: its config names its files relative to itself
    shutil.copytree(trained, run)
    shutil.rmtree(trained)
    config = f"config={run}/config.yaml"
    assert str(trained) not in (run / "config.yaml").read_text()

    ok(server, "scripts/sample_imagenet_rear.py", config, "sampling.per_proc_batch_size=10")
    with np.load(run / "eval_samples.npz") as npz:
        images, tokens, labels = npz["arr_0"], npz["tokens"], npz["labels"]
    assert images.shape == (20, size, size, 3) and tokens.shape == (20, n)
    assert np.array_equal(labels, np.arange(20) // 2) and 0 <= tokens.min() and tokens.max() < v
    share = float(ok(server, "-m", "evaluator.toy", run / "eval_samples.npz", config).split("toy classifier: ")[1]
                  .split(" of 20")[0])
    assert 0.0 <= share <= 1.0
    ok(server, "scripts/demo.py", config, "--out", run / "grid.png", "--classes", "0", "1", "2")
    assert (run / "grid.png").stat().st_size > 0

    ok(server, "scripts/tokenize_toy.py", config, "--output", run / "held_out.jsonl", "--num-images", "20")
    held_out = [json.loads(line) for line in (run / "held_out.jsonl").read_text().splitlines()]
    assert [len(record["tokens"]) for record in held_out] == [n] * 20
    assert 0 <= min(min(record["tokens"]) for record in held_out) and max(max(r["tokens"]) for r in held_out) < v
    printed = ok(server, "-m", "evaluator.consistency", run / "eval_samples.npz", config, "--reference",
                 run / "held_out.jsonl", "--device", "cpu")
    consistency = json.loads((run / "consistency.json").read_text())
    gap = consistency["gap"]
    assert f"token match {gap['token_match']:+.4f}, codebook distance {gap['codebook_distance']:+.4f}" in printed
    assert consistency["generated"]["num_sequences"] == 20 and consistency["dataset"]["num_sequences"] == 20
    for part in ("generated", "dataset"):
        assert 0.0 <= consistency[part]["token_match"]["mean"] <= 1.0
        assert len(consistency[part]["token_match"]["by_position"]) == n
    ok(server, "-m", "evaluator.exposure", config, "--data", run / "held_out.jsonl", "--device", "cpu")
    exposure = json.loads((run / "exposure.json").read_text())
    assert exposure["rates"] == [0.0, 0.1, 0.3, 0.5] and exposure["num_sequences"] == 20
    for entry in exposure["by_rate"]:
        assert 0.0 <= entry["accuracy"]["mean"] <= 1.0 and np.isfinite(entry["nll"]["mean"])
        assert len(entry["accuracy"]["by_position"]) == len(entry["nll"]["by_position"]) == n
    table = ok(server, "-m", "evaluator.compare", "--run", f"mine={run}")
    assert f"| mine | {consistency['generated']['token_match']['mean']:.4f} |" in table


def test_every_registered_tokenizer_and_backbone_has_a_case():
    """The generic test above covers any registered model: a tokenizer or a backbone registered without a case in
    CASES fails here. A case counts for the model its config names, an alias for the name it stands for."""
    covered = {"model.vq_model.model_type": set(), "model.generator.backbone": set()}
    for case in CASES.values():
        # not checked: the own case's models are registered only in the scripts' processes
        config = merged_config(str(case.config), case.overrides)
        for key, names in covered.items():
            names.add(canonical_choice(config, key))
    assert sorted(set(TOKENIZERS) - covered["model.vq_model.model_type"]) == []
    assert sorted(set(BACKBONES) - covered["model.generator.backbone"]) == []


# ----------------------------------------------------------------------------------------- the contract
@pytest.mark.parametrize("backbone", sorted(BACKBONES))
def test_the_mask_token_is_embedded_or_refused_at_start_up(backbone):
    """`perturb_mode: mask` feeds the backbone the mask token V: a backbone with a row for it trains on fully masked
    input; one without (gpt1d, whose released token table holds V rows) is refused when it is built."""
    config = load_config("configs/rear_tiny.yaml", [f"model.generator.backbone={backbone}",
                                                    "model.generator.perturb_mode=mask"])
    if not BACKBONES[backbone].has_mask_token:
        with pytest.raises(ConfigError, match=f"^'model.generator.perturb_mode' is 'mask', but the '{backbone}' "
                                              "backbone has no mask token"):
            build_generator(config)
        return
    torch.manual_seed(0)
    model = build_generator(config).train()
    objective = Objective(config, RandomCodebook(32, 16))
    tokens, classes = torch.randint(32, (2, 16)), torch.tensor([1, 2])
    assert torch.isfinite(objective(model, tokens, classes, step=0).loss)  # r = 1: up to every input token masked
    assert torch.isfinite(model(torch.full_like(tokens, 32), classes).logits).all()
