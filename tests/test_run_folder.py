"""A run folder keeps describing the model it holds: its config.yaml names the run's own files relative to the
folder; training into it again continues the run with what may change on a resume (a longer schedule, logging,
output cadence, sampling) and refuses, in one line naming each setting and before anything on disk changes, what
would make another model (model, objective, data, optimizer, seed) or a schedule shorter than the steps made."""

import os
import shutil
from pathlib import Path

import pytest
import yaml

from utils.config import MODEL_SETTINGS, RESUMABLE_SETTINGS, load_config, paths_for_folder, schema_fields

TRAIN = ["scripts/train_rear.py", "config=configs/rear_toy.yaml", "model.generator.hidden_size=32",
         "model.generator.num_hidden_layers=2", "model.generator.num_attention_heads=2",
         "model.generator.intermediate_size=64", "model.generator.decode_align_layer_idx=1",
         "model.generator.projection_dim=32", "dataset.toy.num_images=256", "training.per_gpu_batch_size=8",
         "sampling.num_samples=10", "training.max_train_steps=4", "experiment.save_every=2"]


def tree(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished(server, tmp_path_factory):
    out = tmp_path_factory.mktemp("finished") / "run"
    result = server.run([*TRAIN, f"experiment.output_dir={out}"])
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def test_every_setting_is_classed_once():
    keys = [key for key, _, _ in schema_fields()]
    for key in keys:
        classes = [e for e in MODEL_SETTINGS + RESUMABLE_SETTINGS if key == e or key.startswith(e + ".")]
        assert len(classes) == 1, f"{key}: put it in MODEL_SETTINGS or RESUMABLE_SETTINGS (utils/config.py)"
    for entry in MODEL_SETTINGS + RESUMABLE_SETTINGS:
        assert any(key == entry or key.startswith(entry + ".") for key in keys), f"{entry} names no key"


def test_the_run_config_names_its_folder_and_weights_relative_to_itself(finished):
    recorded = yaml.safe_load((finished / "config.yaml").read_text())["experiment"]
    assert (recorded["output_dir"], recorded["generator_checkpoint"], recorded["tokenizer_checkpoint"]) == (
        ".", "./generator.safetensors", "./tokenizer.safetensors")
    assert {"generator.safetensors", "tokenizer.safetensors"} <= set(os.listdir(finished))


def test_paths_in_a_file_are_relative_to_it_and_recorded_relative_to_the_folder(tmp_path):
    (tmp_path / "w.bin").write_bytes(b"x")
    folder = tmp_path / "runs" / "a"
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text("experiment:\n  output_dir: .\n  generator_checkpoint: ./g.safetensors\n"
                                        "  tokenizer_checkpoint: ../../w.bin\n  init_weight: reAR-S.safetensors\n")
    config = load_config(str(folder / "config.yaml"), [f"experiment.logging_dir={tmp_path}/logs"])
    e = config.experiment
    assert (e.output_dir, e.generator_checkpoint, e.tokenizer_checkpoint, e.init_weight, e.logging_dir) == (
        str(folder), str(folder / "g.safetensors"), str(tmp_path / "w.bin"), "reAR-S.safetensors",
        f"{tmp_path}/logs")
    e = paths_for_folder(config, str(folder)).experiment  # a local file elsewhere absolute, a released name as is
    assert (e.output_dir, e.generator_checkpoint, e.tokenizer_checkpoint, e.init_weight, e.logging_dir) == (
        ".", "./g.safetensors", str(tmp_path / "w.bin"), "reAR-S.safetensors", f"{tmp_path}/logs")


# one setting of each class that makes the model what it is
CHANGES = {
    "model": ("model.generator.perturb_mode=none", "model.generator.perturb_mode: 'switch' (there) vs 'none' (now)"),
    "objective": ("model.generator.transition_alignment_weight=0.5",
                  "model.generator.transition_alignment_weight: 1.0 (there) vs 0.5 (now)"),
    "data": ("dataset.toy.seed=3", "dataset.toy.seed: 0 (there) vs 3 (now)"),
    "optimizer": ("optimizer.params.weight_decay=0.1", "optimizer.params.weight_decay: 0.03 (there) vs 0.1 (now)"),
    "seed": ("training.seed=1", "training.seed: 0 (there) vs 1 (now)"),
}


@pytest.mark.parametrize("what", CHANGES)
def test_a_change_of_what_the_model_is_is_refused_and_nothing_changes(server, finished, what):
    override, named = CHANGES[what]
    before = tree(finished)
    result = server.run([*TRAIN, f"experiment.output_dir={finished}", override])
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr == (
        f"error: {finished} holds a run of another model ({named}): resuming it with these settings would relabel "
        "its weights; train into another experiment.output_dir, or rerun with the recorded values (what may change "
        "on a resume: docs/training.md#resuming-and-changing-settings)\n")
    assert tree(finished) == before


def test_what_may_change_on_a_resume_is_taken_and_recorded(server, finished, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    changed = ["training.max_train_steps=6", "experiment.log_every=1", "experiment.save_every=3",
               "experiment.keep_last_checkpoints=1", "sampling.num_samples=20", "experiment.name=longer"]
    result = server.run([*TRAIN, f"experiment.output_dir={out}", *changed])
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resumed from {out}/checkpoints/checkpoint-00000004 at step 4 (32 samples): 2 steps to go, to step 6" in (
        result.stdout)
    recorded = load_config(str(out / "config.yaml"))
    assert (recorded.training.max_train_steps, recorded.experiment.log_every, recorded.experiment.name,
            recorded.sampling.num_samples) == (6, 1, "longer", 20)
    assert sorted(os.listdir(out / "checkpoints")) == ["checkpoint-00000006"]

    before = tree(out)
    shorter = server.run([*TRAIN, f"experiment.output_dir={out}", "training.max_train_steps=6",
                          "training.stop_steps=5"])
    assert shorter.returncode == 1 and shorter.stderr == (
        f"error: {out} holds a run at step 6, past training.stop_steps=5: its config would record fewer steps than "
        "its weights have; ask for 6 or more, or train into another experiment.output_dir\n")
    assert tree(out) == before


def test_a_run_resumed_from_its_own_config_is_the_same_run(server, finished, tmp_path):
    out = tmp_path / "elsewhere" / "run"
    shutil.copytree(finished, out)
    result = server.run(["scripts/train_rear.py", f"config={out}/config.yaml", "training.max_train_steps=5"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resumed from {out}/checkpoints/checkpoint-00000004 at step 4" in result.stdout
    assert load_config(str(out / "config.yaml")).experiment.output_dir == str(out)
