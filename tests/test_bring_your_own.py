"""A tokenizer and a backbone of your own go the whole way at tiny size, as every registered one does: train, then,
with the run folder moved and its config.yaml alone, sample, score, draw the demo grid, tokenize held-out images,
measure consistency and exposure bias, and compare. The default run takes the tokenizer and the backbone of
tests/fixtures/bring_your_own (the example of docs/models.md), added to the registries the way a module of the
package adds itself; `python -m pytest -m registry tests` runs the built-in ones through the same path."""

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from conftest import FIXTURES
from modeling import BACKBONES, build_generator
from modeling.objective import Objective
from modeling.tokenizers.base import RandomCodebook
from modeling.tokenizers.maskgit_vqgan import MaskGITVQGAN
from tiny_models import TINY_VQGAN
from utils.config import ConfigError, load_config

OWN = FIXTURES / "bring_your_own"
OWN_MODULES = [OWN / "colour_tokenizer.py", OWN / "tiny_gpt.py"]
TOY_16 = ["config=configs/rear_toy.yaml", "dataset.toy.image_size=16", "dataset.toy.num_images=256",
          "model.generator.hidden_size=32", "model.generator.num_hidden_layers=2",
          "model.generator.num_attention_heads=2", "model.generator.intermediate_size=64",
          "model.generator.decode_align_layer_idx=1", "model.generator.projection_dim=16",
          "model.generator.image_seq_len=16", "training.per_gpu_batch_size=8", "training.max_train_steps=12",
          "experiment.save_every=12", "experiment.generate_every=12", "sampling.num_samples=20"]
TOY_TOKENIZER = ["model.vq_model.codebook_size=16", "model.vq_model.num_latent_tokens=16"]
# name: the training command's config and overrides ({W}: the folder of weights the test writes)
CASES = {
    "own tokenizer and backbone": [f"config={OWN / 'rear_tiny_own.yaml'}"],
    "rar backbone": [*TOY_16, *TOY_TOKENIZER],
    "alitok_ar backbone": [*TOY_16, *TOY_TOKENIZER, "model.generator.backbone=alitok_ar"],
    "gpt1d backbone": [*TOY_16, *TOY_TOKENIZER, "model.generator.backbone=gpt1d"],
    "maskgit_vqgan tokenizer": [*TOY_16, "model.vq_model.model_type=maskgit_vqgan", "model.vq_model.codebook_size=32",
                                "model.vq_model.token_size=16", "model.vq_model.num_latent_tokens=16",
                                "experiment.tokenizer_checkpoint={W}/tiny_vqgan.safetensors"],
}


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    folder = tmp_path_factory.mktemp("weights")
    torch.manual_seed(0)
    save_file(MaskGITVQGAN(TINY_VQGAN).state_dict(), str(folder / "tiny_vqgan.safetensors"))
    return folder


def ok(server, *argv):
    result = server.run([str(a) for a in argv], imports=OWN_MODULES, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


@pytest.mark.parametrize("case", [pytest.param(name, marks=() if name.startswith("own") else pytest.mark.registry)
                                  for name in CASES])
def test_train_then_everything_from_the_run_config_alone(server, weights, tmp_path, case):
    trained = tmp_path / "trained"
    ok(server, "scripts/train_rear.py", *[a.replace("{W}", str(weights)) for a in CASES[case]],
       f"experiment.output_dir={trained}")
    run = tmp_path / "moved" / "run"  # the folder moves: its config names its files relative to itself
    shutil.copytree(trained, run)
    shutil.rmtree(trained)
    config = f"config={run}/config.yaml"
    assert str(trained) not in (run / "config.yaml").read_text()

    ok(server, "scripts/sample_imagenet_rear.py", config, "sampling.per_proc_batch_size=10")
    with np.load(run / "eval_samples.npz") as npz:
        images, tokens, labels = npz["arr_0"], npz["tokens"], npz["labels"]
    assert images.shape == (20, 16, 16, 3) and tokens.shape == (20, 16)
    assert np.array_equal(labels, np.arange(20) // 2) and 0 <= tokens.min() and tokens.max() < 32
    share = float(ok(server, "-m", "evaluator.toy", run / "eval_samples.npz", config).split("toy classifier: ")[1]
                  .split(" of 20")[0])
    assert 0.0 <= share <= 1.0
    ok(server, "scripts/demo.py", config, "--out", run / "grid.png", "--classes", "0", "1", "2")
    assert (run / "grid.png").stat().st_size > 0

    ok(server, "scripts/tokenize_toy.py", config, "--output", run / "held_out.jsonl", "--num-images", "20")
    printed = ok(server, "-m", "evaluator.consistency", run / "eval_samples.npz", config, "--reference",
                 run / "held_out.jsonl", "--device", "cpu")
    consistency = json.loads((run / "consistency.json").read_text())
    gap = consistency["gap"]
    assert f"token match {gap['token_match']:+.4f}, codebook distance {gap['codebook_distance']:+.4f}" in printed
    assert consistency["generated"]["num_sequences"] == 20 and consistency["dataset"]["num_sequences"] == 20
    for part in ("generated", "dataset"):
        assert 0.0 <= consistency[part]["token_match"]["mean"] <= 1.0
        assert len(consistency[part]["token_match"]["by_position"]) == 16
    ok(server, "-m", "evaluator.exposure", config, "--data", run / "held_out.jsonl", "--device", "cpu")
    exposure = json.loads((run / "exposure.json").read_text())
    assert exposure["rates"] == [0.0, 0.1, 0.3, 0.5] and exposure["num_sequences"] == 20
    for entry in exposure["by_rate"]:
        assert 0.0 <= entry["accuracy"]["mean"] <= 1.0 and np.isfinite(entry["nll"]["mean"])
    table = ok(server, "-m", "evaluator.compare", "--run", f"mine={run}")
    assert f"| mine | {consistency['generated']['token_match']['mean']:.4f} |" in table


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
