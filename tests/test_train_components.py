"""Training components: weight-decay groups, the lr schedule, EMA, atomic checkpoints and RNG state."""

import math
import os
import random

import numpy as np
import pytest
import torch

from modeling.rear import ReAR
from utils.checkpointing import (
    NonFiniteError,
    latest_checkpoint,
    list_checkpoints,
    prune_checkpoints,
    rng_state,
    save_checkpoint,
    save_weights,
    set_rng_state,
)
from utils.config import load_config
from utils.ema import EMA
from utils.optim import build_optimizer, build_scheduler, learning_rate_at, param_groups

TINY = ["model.generator.hidden_size=32", "model.generator.num_hidden_layers=2",
        "model.generator.num_attention_heads=2",
        "model.generator.intermediate_size=64", "model.generator.image_seq_len=16", "model.generator.projection_dim=16",
        "model.generator.decode_align_layer_idx=1", "model.vq_model.codebook_size=32", "model.vq_model.token_size=8"]


def test_weight_decay_exclusions_follow_the_released_rule():
    model = ReAR(load_config(None, TINY))
    decay, no_decay = param_groups(model, 0.03)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    exempt = {names[id(p)] for p in no_decay["params"]}
    assert decay["weight_decay"] == 0.03 and no_decay["weight_decay"] == 0.0
    assert decayed | exempt == set(names.values()) and not decayed & exempt
    assert {"blocks.0.attn.qkv.weight", "blocks.1.mlp.fc1.weight", "lm_head.weight", "cls_token",
            "blocks.0.adaLN_modulation.1.weight", "encode_align_mlp.0.weight"} <= decayed
    assert {"pos_embed", "target_aware_pos_embed", "timesteps_embeddings", "embeddings.weight", "lm_head.bias",
            "blocks.0.norm1.weight", "blocks.0.attn.q_norm.weight",
            "adaln_before_head.adaLN_modulation.1.weight"} <= exempt  # the head's adaLN through "ln"
    assert len(decayed) == 2 * 5 + 2 * 3 + 2  # per block qkv, proj, fc1, fc2, adaLN; 3 per head; lm_head, cls_token


def test_released_learning_rate_schedule():
    lr = lambda step: learning_rate_at(step, 4e-4, 1e-5, 62_500, 250_000)  # noqa: E731
    assert lr(0) == 0.0
    assert lr(31_250) == pytest.approx(2e-4)
    assert lr(62_500) == pytest.approx(4e-4)
    assert lr(156_250) == pytest.approx(1e-5 + (4e-4 - 1e-5) / 2)
    assert lr(250_000) == pytest.approx(1e-5) and lr(300_000) == pytest.approx(1e-5)


def test_scheduler_counts_optimizer_steps():
    config = load_config(None, TINY + ["lr_scheduler.params.warmup_steps=4", "training.max_train_steps=12",
                                       "optimizer.params.learning_rate=1e-3", "lr_scheduler.params.learning_rate=1e-3",
                                       "lr_scheduler.params.end_lr=1e-4"])
    model = ReAR(config)
    optimizer = build_optimizer(model, config, torch.device("cpu"))
    scheduler = build_scheduler(optimizer, config)
    seen = []
    for _ in range(12):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert seen[:5] == pytest.approx([0.0, 2.5e-4, 5e-4, 7.5e-4, 1e-3])
    assert seen[8] == pytest.approx(1e-4 + 0.9e-3 * 0.5 * (1 + math.cos(math.pi * 4 / 8)))
    assert all(g["lr"] == optimizer.param_groups[0]["lr"] for g in optimizer.param_groups)


def test_mismatched_scheduler_learning_rate_is_an_error():
    config = load_config(None, TINY + ["optimizer.params.learning_rate=1e-3"])  # scheduler keeps 4e-4
    model = ReAR(config)
    with pytest.raises(ValueError, match="lr_scheduler.params.learning_rate"):
        build_scheduler(build_optimizer(model, config, torch.device("cpu")), config)


def test_ema_update():
    model = torch.nn.Linear(2, 2)
    ema = EMA(model, decay=0.75)
    before = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(4.0)
    ema.update(model)
    torch.testing.assert_close(ema.state_dict()["weight"], before + 1.0)
    assert torch.equal(ema.model_state_dict(model)["bias"], model.bias)


def write_shared_file(content):
    def write(directory):
        with open(os.path.join(directory, "model.txt"), "w") as f:
            f.write(content)
    return write


def save(tmp_path, step, content="ok"):
    return save_checkpoint(str(tmp_path), step, {"samples_seen": step * 8}, write_shared_file(content), lambda: None, 0)


def test_crash_while_saving_keeps_the_previous_checkpoint(tmp_path):
    save(tmp_path, 10, "ten")

    def crash(directory):
        with open(os.path.join(directory, "model.txt"), "w") as f:
            f.write("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(str(tmp_path), 20, {"samples_seen": 160}, crash, lambda: None, 0)
    latest = latest_checkpoint(str(tmp_path))
    assert latest.endswith("checkpoint-00000010")
    assert open(os.path.join(latest, "model.txt")).read() == "ten"
    save(tmp_path, 20, "twenty")  # the leftover temporary directory is replaced
    assert open(os.path.join(latest_checkpoint(str(tmp_path)), "model.txt")).read() == "twenty"
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["checkpoint-00000010", "checkpoint-00000020"]


def test_prune_keeps_the_newest(tmp_path):
    for step in (5, 100, 20, 7):
        save(tmp_path, step)
    prune_checkpoints(str(tmp_path), keep=2)
    kept = [os.path.basename(p) for p in list_checkpoints(str(tmp_path))]
    assert kept == ["checkpoint-00000020", "checkpoint-00000100"]


def test_rng_state_round_trip(tmp_path):
    state = rng_state()
    torch.save(state, tmp_path / "rng.pt")
    expected = (random.random(), np.random.rand(), torch.rand(3))
    random.random(), np.random.rand(), torch.rand(5)  # move on
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert (random.random(), np.random.rand()) == expected[:2] and torch.equal(torch.rand(3), expected[2])


def test_non_finite_weights_are_never_written(tmp_path):
    path = tmp_path / "generator.safetensors"
    save_weights(str(path), {"w": torch.ones(2)})
    with pytest.raises(NonFiniteError, match="non-finite"):
        save_weights(str(path), {"w": torch.tensor([1.0, float("nan")])})
    from safetensors.torch import load_file

    assert torch.equal(load_file(path)["w"], torch.ones(2))
    assert os.listdir(tmp_path) == ["generator.safetensors"]


def objective_setup(*overrides):
    from modeling.tokenizers.toy import PatchKMeansTokenizer

    config = load_config(None, TINY + ["model.vq_model.token_size=48", "model.generator.randomness_anneal_end=10",
                                       "model.generator.dropout=0.0", "model.generator.attn_drop=0.0", *overrides])
    torch.manual_seed(0)
    model = ReAR(config).train()
    tokenizer = PatchKMeansTokenizer(32, 4, 16)
    tokenizer.codebook.data = torch.randn(32, 48)
    tokens, class_ids = torch.randint(0, 32, (4, 16)), torch.tensor([0, 3, 5, 9])
    return config, model, tokenizer, tokens, class_ids


def test_objective_without_noise_is_the_plain_loss():
    from modeling.losses import rear_loss
    from utils.training import rear_objective

    config, model, tokenizer, tokens, class_ids = objective_setup(
        "model.generator.perturb_mode=none", "model.generator.class_label_dropout=0.0")
    parts = rear_objective(model, tokenizer, tokens, class_ids, 0, config)
    expected = rear_loss(model(tokens, class_ids), tokens, tokenizer.codebook[tokens], None, 1.0)
    assert torch.equal(parts.loss, expected.loss) and torch.equal(parts.encode_alignment, expected.encode_alignment)


def test_objective_noise_follows_r_of_step():
    from utils.training import rear_objective

    config, model, tokenizer, tokens, class_ids = objective_setup("model.generator.class_label_dropout=0.0")
    clean = rear_objective(model, tokenizer, tokens, class_ids, 10, config)  # r(10) = 0: no noise, no draw
    torch.manual_seed(1)
    noisy = rear_objective(model, tokenizer, tokens, class_ids, 0, config)
    assert not torch.equal(clean.loss, noisy.loss)
    config_none, *_ = objective_setup("model.generator.class_label_dropout=0.0", "model.generator.perturb_mode=none")
    torch.manual_seed(1)
    assert torch.equal(rear_objective(model, tokenizer, tokens, class_ids, 0, config_none).loss, clean.loss)


def test_rar_order_is_raster_once_r_reaches_zero():
    from utils.training import rear_objective

    rar = ["model.generator.order=random", "model.generator.perturb_mode=none",
           "model.generator.class_label_dropout=0.0"]
    config, model, tokenizer, tokens, class_ids = objective_setup(*rar)
    raster_config, *_ = objective_setup(*rar[1:])
    raster = rear_objective(model, tokenizer, tokens, class_ids, 10, raster_config)
    assert torch.equal(rear_objective(model, tokenizer, tokens, class_ids, 10, config).loss, raster.loss)
    assert not torch.equal(rear_objective(model, tokenizer, tokens, class_ids, 0, config).loss, raster.loss)


def test_rar_targets_and_features_follow_the_order(monkeypatch):
    import utils.training as training

    config, model, tokenizer, tokens, class_ids = objective_setup(
        "model.generator.order=random", "model.generator.class_label_dropout=0.0")
    order = torch.stack([torch.randperm(16, generator=torch.Generator().manual_seed(i)) for i in range(4)])
    seen = {}
    monkeypatch.setattr(training, "random_orders", lambda batch, length, ratio, device=None: order)
    monkeypatch.setattr(training, "rear_loss", lambda output, targets, features, noise, weight: seen.update(
        targets=targets, features=features, noise=noise, logits=output.logits))
    torch.manual_seed(0)
    training.rear_objective(model, tokenizer, tokens, class_ids, 0, config)
    rows = torch.arange(4)[:, None]
    assert torch.equal(seen["targets"], tokens[rows, order])
    assert torch.equal(seen["features"], tokenizer.codebook[tokens[rows, order]])
    torch.manual_seed(0)
    training.drop_class_labels(class_ids, 0.0, 10)  # the same draws as the objective: labels, then noise
    inputs, noise = training.noisy_context(tokens, 1.0, "switch", 32)
    assert torch.equal(seen["noise"], noise[rows, order])
    torch.testing.assert_close(seen["logits"], model(inputs, class_ids, orders=order).logits)


def test_logged_parts_average_the_accumulation_micro_batches():
    from modeling.losses import LossParts
    from utils.metrics import mean_parts

    a = LossParts(*(torch.tensor(v) for v in (1.0, 2.0, 3.0, 4.0, 0.5)))
    b = LossParts(*(torch.tensor(v) for v in (3.0, 4.0, 5.0, 6.0, 0.25)))
    mean = mean_parts([a, b])
    assert [getattr(mean, k).item() for k in ("loss", "ce", "encode_alignment", "decode_alignment", "accuracy")] == [
        2.0, 3.0, 4.0, 5.0, 0.375
    ]


def test_fp16_is_refused_at_start_up():
    from utils.training import make_accelerator

    with pytest.raises(ValueError, match=r"training.mixed_precision must be one of \('bf16', 'no'\), got 'fp16'"):
        make_accelerator(load_config(None, ["training.mixed_precision=fp16"]))
