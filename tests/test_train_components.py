"""Training components: weight-decay groups, the lr schedule, EMA, atomic checkpoints and RNG state."""

import math
import os
import random

import numpy as np
import pytest
import torch

from modeling.rear import ReAR
from utils.training.resume import (
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
from utils.training.ema import EMA
from utils.training.optim import build_optimizer, build_scheduler, learning_rate_at, param_groups

TINY = ["model.generator.hidden_size=32", "model.generator.num_hidden_layers=2",
        "model.generator.num_attention_heads=2",
        "model.generator.intermediate_size=64", "model.generator.image_seq_len=16", "model.generator.projection_dim=16",
        "model.generator.decode_align_layer_idx=1", "model.vq_model.codebook_size=32", "model.vq_model.token_size=8",
        "model.generator.transition_alignment=True", "model.generator.perturb_mode=switch"]


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
    from utils.errors import ConfigError

    with pytest.raises(ConfigError, match="'lr_scheduler.params.learning_rate' .* differs"):
        load_config(None, TINY + ["optimizer.params.learning_rate=1e-3"])  # scheduler keeps 4e-4


def test_ema_decay_warms_up_as_released():
    """The original's EMAModel(decay=0.999).get_decay(step), recorded from its code (fixture of the training step)."""
    import json

    from conftest import FIXTURES
    from utils.training.ema import ema_decay_at

    recorded = json.loads((FIXTURES / "original_training_step" / "original_training_step.json").read_text())["ema_decay"]
    ours = [ema_decay_at(step, 0.999) for step in recorded["steps"]]
    assert ours == pytest.approx(recorded["values"], abs=1e-12)
    assert ours[:3] == [0.0, 2 / 11, 0.25]


def test_ema_update_copies_first_then_averages_and_resumes():
    model = torch.nn.Linear(2, 2)
    ema = EMA(model, decay=0.999)
    with torch.no_grad():
        model.weight.add_(4.0)
    ema.update(model)  # d_1 = 0: the weights themselves
    torch.testing.assert_close(ema.state_dict()["weight"], model.weight)
    before = ema.state_dict()["weight"].clone()
    with torch.no_grad():
        model.weight.add_(11.0)
    ema.update(model)  # d_2 = 2/11
    torch.testing.assert_close(ema.state_dict()["weight"], before + (1 - 2 / 11) * 11.0)
    assert torch.equal(ema.model_state_dict(model)["bias"], model.bias)
    resumed = EMA(torch.nn.Linear(2, 2), decay=0.999)
    resumed.load_state_dict({k: v.clone() for k, v in ema.state_dict().items()})
    assert resumed.step == 2 and torch.equal(resumed.shadow[0], ema.shadow[0])


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


def test_damaged_newest_checkpoint_is_set_aside_and_the_previous_one_used(tmp_path):
    save(tmp_path, 10, "ten")
    newest = save(tmp_path, 20, "twenty")
    with open(os.path.join(newest, "model.txt"), "r+") as f:  # same size, other bytes: only the checksum tells
        f.write("TW")
    warnings = []
    assert latest_checkpoint(str(tmp_path), warn=warnings.append).endswith("checkpoint-00000010")
    assert len(warnings) == 1 and "checkpoint-00000020 is damaged (model.txt does not match" in warnings[0]
    assert os.path.isdir(newest + ".damaged") and not os.path.exists(newest)
    os.remove(os.path.join(list_checkpoints(str(tmp_path))[0], "rng_state_0.pt"))  # a deleted file
    warnings.clear()
    assert latest_checkpoint(str(tmp_path), warn=warnings.append) is None
    assert "rng_state_0.pt is missing" in warnings[0]


def test_disk_full_while_saving_keeps_the_previous_checkpoint(tmp_path):
    import errno

    from utils.errors import OutputError

    save(tmp_path, 10, "ten")

    def full_disk(directory):
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OutputError, match="the disk is full: could not save checkpoint .*checkpoint-00000020"):
        save_checkpoint(str(tmp_path), 20, {"samples_seen": 160}, full_disk, lambda: None, 0)
    assert os.listdir(tmp_path / "checkpoints") == ["checkpoint-00000010"]
    assert latest_checkpoint(str(tmp_path)).endswith("checkpoint-00000010")


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


def test_logged_parts_average_the_accumulation_micro_batches():
    from modeling.objective import LossParts
    from utils.training.logging import mean_terms

    a = LossParts(*(torch.tensor(v) for v in (1.0, 2.0, 3.0, 4.0, 0.5))).terms()
    b = LossParts(*(torch.tensor(v) for v in (3.0, 4.0, 5.0, 6.0, 0.25))).terms()
    mean = mean_terms([a, b])
    assert {k: v.item() for k, v in mean.items()} == {
        "loss": 2.0, "ce": 3.0, "encode_alignment": 4.0, "decode_alignment": 5.0, "token_accuracy": 0.375
    }


def test_fp16_is_refused_at_start_up():
    from utils.errors import ConfigError

    with pytest.raises(ConfigError, match=r"'training.mixed_precision'.*'fp16' is not one of \[bf16, no\]"):
        load_config(None, ["training.mixed_precision=fp16"])


def test_a_resume_with_no_intact_checkpoint_says_it_starts_from_step_0(tmp_path):
    older, newer = save(tmp_path, 10, "ten"), save(tmp_path, 20, "twenty")
    for checkpoint in (older, newer):
        os.truncate(os.path.join(checkpoint, "model.txt"), 1)
    warnings = []
    assert latest_checkpoint(str(tmp_path), warn=warnings.append) is None
    assert warnings == [
        f"warning: checkpoint {path} is damaged (model.txt has 1 bytes, {size} were written); moved it to "
        f"{path}.damaged and no intact checkpoint is left: starting from step 0"
        for path, size in ((newer, 6), (older, 3))
    ]
    assert list_checkpoints(str(tmp_path)) == []
