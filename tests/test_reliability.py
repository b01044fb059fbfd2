"""Fault campaigns: a run killed with SIGKILL at a chosen point (inside a checkpoint save, a prune, a final write,
a shard, the .npz ...) and rerun with the same command ends with exactly the bytes of the uninterrupted run, and no
complete checkpoint is ever lost; a full disk stops a save with one line and keeps the previous checkpoint; a
checkpoint damaged after it was written is set aside at resume with a warning naming it.

Each kill point is a fault of tests/faults.py installed in the script's own process (tests/script_runner.py): the
run is killed at that call, not at a random time. A few points of each campaign run by default; all of them with
`python -m pytest -m campaign tests/test_reliability.py` (several minutes).
"""

import json
import os
import shlex
from pathlib import Path

import pytest

from utils.files import changed_settings, read_record
from utils.training.resume import damage, list_checkpoints

TRAIN = (
    "scripts/train_rear.py config=configs/rear_toy.yaml experiment.output_dir={O} "
    "model.generator.hidden_size=32 model.generator.num_hidden_layers=2 model.generator.num_attention_heads=2 "
    "model.generator.intermediate_size=64 model.generator.decode_align_layer_idx=1 model.generator.projection_dim=32 "
    "dataset.toy.num_images=256 training.per_gpu_batch_size=8 sampling.num_samples=10 experiment.log_every=2 "
    # dropout, EMA, noisy context and sample grids on the way: every random stream must be restored
    "model.generator.dropout=0.1 training.use_ema=True training.ema_decay=0.9 model.generator.randomness_anneal_end=6 "
    "training.max_train_steps=6 experiment.save_every=2 experiment.generate_every=3 "
    "experiment.keep_last_checkpoints=2"
)
SAMPLE = (
    "scripts/sample_imagenet_rear.py config=configs/rear_tiny.yaml experiment.output_dir={O}/samples "
    "experiment.generator_checkpoint={W}/tiny_generator.safetensors "
    "experiment.tokenizer_checkpoint={W}/tiny_vqgan.safetensors sampling.num_samples=40 "
    "sampling.per_proc_batch_size=3 sampling.seed=7"  # 14 batches, the last of one image
)


def fault(target, action, match="", nth=1):
    return {"target": target, "action": action, "match": match, "nth": nth}


def checkpoint(step):
    return f"checkpoint-{step:08d}"


SAVING = f"{checkpoint(4)}.tmp-save"
# name: the faults of each killed run, in order (the last run goes through)
TRAIN_KILLS = {
    "after the first step": [[fault("utils.training.step:train_step", "after")]],
    "after step 3, before its grid": [[fault("utils.training.step:train_step", "after", nth=3)]],
    "after step 5": [[fault("utils.training.step:train_step", "after", nth=5)]],
    "mid-write of the step-3 grid": [[fault("PIL.Image:Image.save", "torn", "step_00000003")]],
    "mid-write of the first RNG state": [[fault("torch:save", "torn", "rng_state_0")]],
    "mid-write of model.safetensors": [[fault("utils.training.resume:save_file", "torn", f"{SAVING}/model")]],
    "mid-write of ema.safetensors": [[fault("utils.training.resume:save_file", "torn", f"{SAVING}/ema")]],
    "mid-write of optimizer.pt": [[fault("torch:save", "torn", f"{SAVING}/optimizer")]],
    "after scheduler.pt": [[fault("torch:save", "after", f"{SAVING}/scheduler")]],
    "mid-write of train_state.json": [[fault("json:dump", "torn", f"{SAVING}/train_state")]],
    "mid-write of manifest.json": [[fault("json:dump", "torn", f"{SAVING}/manifest")]],
    "at the fsync of a checkpoint file": [[fault("os:fsync", "before", nth=3)]],
    "before the checkpoint's rename": [[fault("os:rename", "before", SAVING)]],
    "after the last checkpoint's rename, before pruning": [[fault("os:rename", "after", f"{checkpoint(6)}.tmp-save")]],
    "after a prune's rename": [[fault("os:rename", "after", "tmp-delete")]],
    "mid-delete of a pruned checkpoint": [[fault("shutil:rmtree", "partial", "tmp-delete")]],
    "mid-write of generator.safetensors": [[fault("utils.training.resume:save_file", "torn", "generator.safetensors")]],
    "before generator.safetensors is renamed": [[fault("os:replace", "before", "generator.safetensors")]],
    "mid-write of tokenizer.safetensors": [[fault("utils.training.resume:save_file", "torn", "tokenizer.safetensors")]],
    "mid-write of final.png": [[fault("PIL.Image:Image.save", "torn", "final.png")]],
    "mid-write of summary.json": [[fault("json:dump", "torn", "summary.json")]],
    "after summary.json, before the process ends": [[fault("os:replace", "after", "summary.json")]],
    "while writing config.yaml at start-up": [[fault("os:replace", "before", "config.yaml")]],
    "three kills in a row (save, prune, final write)": [
        [fault("utils.training.resume:save_file", "torn", f"{SAVING}/model")],
        [fault("shutil:rmtree", "partial", "tmp-delete")],
        [fault("utils.training.resume:save_file", "torn", "generator.safetensors")],
    ],
}
TRAIN_SHORT = ["mid-write of model.safetensors", "mid-delete of a pruned checkpoint",
               "after the last checkpoint's rename, before pruning", "mid-write of summary.json"]

SHARD = "shards/batch_0000"
SAMPLE_KILLS = {
    "mid-write of sampling.json": [[fault("json:dump", "torn", "sampling.json")]],
    "mid-write of the first shard": [[fault("numpy:savez", "torn", f"{SHARD}00")]],
    "before a shard's rename": [[fault("os:replace", "before", f"{SHARD}05")]],
    "after the last shard's rename": [[fault("os:replace", "after", f"{SHARD}13")]],
    "mid-write of the .npz": [[fault("numpy.lib.format:write_array_header_1_0", "after", nth=2)]],
    "before the .npz's rename": [[fault("os:replace", "before", "samples.npz")]],
    "after the .npz's rename, before the shards are deleted": [[fault("os:replace", "after", "samples.npz")]],
    "mid-delete of the shards": [[fault("shutil:rmtree", "partial", "shards")]],
    "two kills in a row (a shard, the .npz)": [
        [fault("numpy:savez", "torn", f"{SHARD}03")],
        [fault("os:replace", "before", "samples.npz")],
    ],
}
SAMPLE_SHORT = ["before a shard's rename", "after the .npz's rename, before the shards are deleted"]


def campaign(kills, short):
    return [pytest.param(name, id=name, marks=() if name in short else pytest.mark.campaign) for name in kills]


# ------------------------------------------------------------------------------------------- helpers
def run(server, argv, out, weights="", faults=()):
    command = shlex.split(argv.replace("{O}", str(out)).replace("{W}", str(weights)))
    return server.run(command, faults=faults, timeout=300)


def tree(folder: Path) -> dict:
    """Every file's bytes by relative path (config.yaml names the output folder: compared without it)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != "config.yaml"}


def complete_checkpoints_damaged(out: Path) -> list:
    return [path for path in list_checkpoints(str(out)) if damage(path) is not None]


def killed_then_resumed(server, argv, out, runs, weights=""):
    """Run `argv` once per fault list in `runs`, each killed at its fault, then once through; returns the last
    result and how many complete checkpoints a kill left damaged (lost)."""
    lost = 0
    for faults in runs:
        killed = run(server, argv, out, weights, faults)
        assert killed.returncode == -9, f"the fault {faults} was never reached:\n{killed.stderr[-2000:]}"
        lost += len(complete_checkpoints_damaged(out))
    newest = list_checkpoints(str(out))[-1:]
    result = run(server, argv, out, weights)
    assert result.returncode == 0, result.stderr[-3000:]
    if newest:  # resumed from the newest checkpoint the kills left
        assert f"resumed from {newest[0]} at step" in result.stdout
    return result, lost


# ------------------------------------------------------------------------------------------- training
@pytest.fixture(scope="module")
def trained(server, tmp_path_factory):
    """The files of the uninterrupted training run."""
    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    result = run(server, TRAIN, out)
    assert result.returncode == 0, result.stderr[-3000:]
    files = tree(out)
    assert sorted(files) == [
        f"checkpoints/{checkpoint(step)}/{name}" for step in (4, 6) for name in (
            "ema.safetensors", "manifest.json", "model.safetensors", "optimizer.pt", "rng_state_0.pt",
            "scheduler.pt", "train_state.json")
    ] + ["generator.safetensors", "samples/final.png", "samples/step_00000003.png", "samples/step_00000006.png",
         "summary.json", "tokenizer.safetensors"]
    return files


@pytest.mark.parametrize("name", campaign(TRAIN_KILLS, TRAIN_SHORT))
def test_training_killed_and_resumed_ends_bit_exact(server, trained, tmp_path, name):
    out = tmp_path / "run"
    result, lost = killed_then_resumed(server, TRAIN, out, TRAIN_KILLS[name])
    assert lost == 0
    assert "damaged" not in result.stderr
    resumed = tree(out)
    assert sorted(resumed) == sorted(trained)  # nothing half-made left: no temporaries, no extra checkpoint
    assert [path for path in trained if resumed[path] != trained[path]] == []


def test_full_disk_while_saving_keeps_the_previous_checkpoint(server, trained, tmp_path):
    out = tmp_path / "run"
    full = run(server, TRAIN, out, faults=[fault("utils.training.resume:save_file", "enospc", f"{SAVING}/model")])
    assert full.returncode == 1
    saving = out / "checkpoints" / SAVING
    assert full.stderr.splitlines()[-1] == (
        f"error: the disk is full: could not save checkpoint {out}/checkpoints/{checkpoint(4)} ([Errno 28] No space "
        f"left on device: '{saving}/model.safetensors'); the earlier checkpoints are intact: free some space and "
        "rerun to resume")
    assert [Path(p).name for p in list_checkpoints(str(out))] == [checkpoint(2)]
    assert damage(str(out / "checkpoints" / checkpoint(2))) is None and not saving.exists()
    result = run(server, TRAIN, out)  # space is back
    assert f"resumed from {out}/checkpoints/{checkpoint(2)} at step 2" in result.stdout
    assert tree(out) == trained


CORRUPTIONS = {
    "truncated": lambda path: os.truncate(path, path.stat().st_size // 2),
    "4 KiB flipped": lambda path: flip(path, path.stat().st_size // 2, 4096),
    "deleted": lambda path: path.unlink(),
}
PROBLEMS = {
    "truncated": "model.safetensors has {half} bytes, {size} were written",
    "4 KiB flipped": "model.safetensors does not match the checksum it was written with",
    "deleted": "model.safetensors is missing",
}


def flip(path, offset, count):
    data = bytearray(path.read_bytes())
    data[offset : offset + count] = bytes(b ^ 0xFF for b in data[offset : offset + count])
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("corruption", CORRUPTIONS)
def test_a_checkpoint_damaged_after_it_was_written_is_set_aside(server, trained, tmp_path, corruption):
    out = tmp_path / "run"
    # killed as soon as checkpoint 4 is complete, which is then damaged (a disk error, a bad copy)
    killed = run(server, TRAIN, out, faults=[fault("os:rename", "after", f"{checkpoint(4)}.tmp-save")])
    assert killed.returncode == -9
    newest = out / "checkpoints" / checkpoint(4)
    weights = newest / "model.safetensors"
    size = weights.stat().st_size
    CORRUPTIONS[corruption](weights)
    result = run(server, TRAIN, out)
    assert result.returncode == 0, result.stderr[-3000:]
    problem = PROBLEMS[corruption].format(half=size // 2, size=size)
    assert (f"warning: checkpoint {newest} is damaged ({problem}); moved it to {newest}.damaged and resuming from "
            "the newest intact one") in result.stderr.splitlines()
    assert f"resumed from {out}/checkpoints/{checkpoint(2)} at step 2" in result.stdout
    resumed = tree(out)
    assert {path: data for path, data in resumed.items() if ".damaged/" not in path} == trained
    assert (out / "checkpoints" / f"{checkpoint(4)}.damaged" / "manifest.json").is_file()  # kept for inspection


# ------------------------------------------------------------------------------------------- the 50k sampler
@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    from tiny_models import write_tiny_weights

    folder = tmp_path_factory.mktemp("weights")
    write_tiny_weights(folder)
    return folder


@pytest.fixture(scope="module")
def sampled(server, weights, tmp_path_factory):
    """The .npz bytes of the uninterrupted sampling run."""
    out = tmp_path_factory.mktemp("uninterrupted")
    assert run(server, SAMPLE, out, weights).returncode == 0
    return (out / "samples.npz").read_bytes()


@pytest.mark.parametrize("name", campaign(SAMPLE_KILLS, SAMPLE_SHORT))
def test_sampler_killed_and_resumed_ends_with_the_same_npz(server, weights, sampled, tmp_path, name):
    killed_then_resumed(server, SAMPLE, tmp_path, SAMPLE_KILLS[name], weights)
    assert (tmp_path / "samples.npz").read_bytes() == sampled
    # nothing half-made left: the settings, the .npz, no shards, no temporaries beside the .npz
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == [
        "samples", "samples.npz", "samples/sampling.json"]


# ------------------------------------------------------------------------------------------- data preparation
PRETOKENIZE = ("scripts/pretokenization.py config=configs/rear_tiny.yaml experiment.tokenizer_checkpoint="
               "{W}/tiny_vqgan.safetensors --data {W}/images/train --output {O}/tokens.jsonl --augment flip "
               "--num_workers 0 --batch_size 2")
CONVERT = ("scripts/convert_imagenet_to_wds.py --imagenet_dir {W}/images --output_dir {O}/shards --maxcount 2 "
           "--splits train")


@pytest.fixture(scope="module")
def images(weights):
    import numpy as np
    from PIL import Image

    for synset in ("n01", "n02"):
        (weights / "images" / "train" / synset).mkdir(parents=True)
        for i in range(3):
            image = np.random.RandomState(i).randint(0, 256, (20, 20, 3), dtype=np.uint8)
            Image.fromarray(image).save(weights / "images" / "train" / synset / f"{i}.png")
    return weights


@pytest.mark.parametrize("faults", [
    pytest.param([fault("tqdm.std:tqdm.update", "before", nth=2)], id="after two batches"),
    pytest.param([fault("os:replace", "before", r"settings\.json")], id="before a part's settings are renamed"),
    pytest.param([fault("os:replace", "before", r"jsonl\.tmp-")], id="before the merged file's rename"),
])
def test_pretokenization_killed_and_resumed_writes_the_same_lines(server, images, tmp_path, faults):
    reference = tmp_path / "reference"
    assert run(server, PRETOKENIZE, reference, images).returncode == 0
    killed_then_resumed(server, PRETOKENIZE, tmp_path, [faults], images)
    assert (tmp_path / "tokens.jsonl").read_bytes() == (reference / "tokens.jsonl").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["reference", "tokens.jsonl"]


def test_conversion_killed_leaves_no_truncated_shard(server, images, tmp_path):
    import webdataset as wds

    killed = run(server, CONVERT, tmp_path, images, faults=[fault("webdataset:ShardWriter.write", "before", nth=4)])
    assert killed.returncode == -9
    assert not (tmp_path / "shards" / "train").exists()  # a split is complete or absent
    assert run(server, CONVERT, tmp_path, images).returncode == 0
    shards = sorted((tmp_path / "shards").rglob("*"))
    assert [str(p.relative_to(tmp_path)) for p in shards] == [
        "shards/train", *(f"shards/train/imagenet-train-000{i}.tar" for i in range(3))]
    samples = list(wds.DataPipeline(wds.SimpleShardList([str(p) for p in shards[1:]]), wds.tarfile_to_samples()))
    assert sorted(s["cls"] for s in samples) == [b"0"] * 3 + [b"1"] * 3
    assert json.dumps(sorted(s["__key__"] for s in samples)) == json.dumps([f"train_{i:08d}" for i in range(6)])


# ------------------------------------------------------------------------ settings records (sampler, pre-tokenization)
@pytest.mark.parametrize("damage_bytes, reason", [(b'{"seed": 7', "Expecting"), (b"\xff\xfe", "can't decode"),
                                                  (b"[7]", "it holds a list, not the settings")])
def test_a_damaged_settings_record_is_a_value_error_that_says_why(tmp_path, damage_bytes, reason):
    path = tmp_path / "settings.json"
    path.write_bytes(damage_bytes)
    with pytest.raises(ValueError, match=reason):
        read_record(str(path))
    path.write_text('{"seed": 7}')
    assert read_record(str(path)) == {"seed": 7}


def test_changed_settings_names_each_differing_key_once_in_order():
    assert changed_settings({"a": 1, "b": 2}, {"a": 1, "b": 2}) == ""
    assert changed_settings({"b": 2, "a": 1, "gone": "x"}, {"a": 1, "b": 3, "unset": None}) == (
        "b: 2 (there) vs 3 (now), gone: 'x' (there) vs None (now)"
    )
