"""Data preparation scripts: ImageNet folder → WebDataset shards, images → pre-tokenized JSONL (resumable), and
training on shards tokenized on the fly. All with the toy tokenizer on 32×32 crops."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import load_script
from modeling.tokenizers import build_tokenizer
from utils.cli import parse
from utils.config import load_config
from utils.data.images import center_crop_arr, ten_crops, to_tensor
from utils.files import write_json

ROOT = Path(__file__).resolve().parents[1]
TOY = str(ROOT / "configs" / "rear_toy.yaml")
SMALL = ["dataset.toy.num_images=300", "dataset.preprocessing.crop_size=32"]


def call(name, args):
    """scripts/<name>.py run with `args`, as its __main__ does (a user error becomes SystemExit)."""
    script = load_script(name)
    script.run(script.SCRIPT, script.main, args)


@pytest.fixture(scope="module", autouse=True)
def fitted_toy_tokenizer(tmp_path_factory):
    """The toy tokenizer fitted once, as training saves it; every script here loads it (SMALL)."""
    from safetensors.torch import save_file

    from utils.data.toy import tokenizer_fit_images

    path = tmp_path_factory.mktemp("toy_tokenizer") / "tokenizer.safetensors"
    config = load_config(TOY, SMALL)
    save_file(build_tokenizer(config, fit_images=tokenizer_fit_images(config)).state_dict(), str(path))
    SMALL.append(f"experiment.tokenizer_checkpoint={path}")
    yield
    SMALL.pop()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """root/train/<class>/<image>: 2 classes × 3 images of odd sizes, PNG and JPEG."""
    root = tmp_path_factory.mktemp("imagenet")
    rng = np.random.default_rng(0)
    for c, name in enumerate(["n001", "n002"]):
        os.makedirs(root / "train" / name)
        for i in range(3):
            pixels = rng.integers(0, 256, (40 + 7 * i, 36 + 5 * c, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / "train" / name / f"img{i}.{'png' if i == 0 else 'jpg'}")
    return root


def test_pretokenization_writes_ten_crops_and_resumes(folder, tmp_path):
    output = tmp_path / "tokens.jsonl"
    args = ["--data", str(folder / "train"), "--output", str(output), "--augment", "ten_crop",
            "--batch_size", "2", "--num_workers", "0", f"config={TOY}", *SMALL]
    call("pretokenization", args)
    lines = output.read_text().splitlines()
    assert len(lines) == 6 * 10
    records = [json.loads(line) for line in lines]
    assert [r["class_id"] for r in records] == [0] * 30 + [1] * 30
    tokenizer = build_tokenizer(load_config(TOY, SMALL))
    image = Image.open(folder / "train" / "n002" / "img1.jpg").convert("RGB")
    expected = tokenizer.encode(torch.stack([to_tensor(c) for c in ten_crops(image, 32)]))
    assert [r["tokens"] for r in records[40:50]] == expected.tolist()

    # interrupted after two images and a torn line: the rerun skips what is there and writes the same file
    full = output.read_bytes()
    output.unlink()
    torn = b"".join(full.splitlines(keepends=True)[:25]) + b'{"class_id": 0, "tok'
    part = tmp_path / "tokens.jsonl.part-0-of-1"
    part.write_bytes(torn)
    with pytest.raises(SystemExit):  # a part whose settings are unknown is not continued
        call("pretokenization", args)
    pretokenization = load_script("pretokenization")
    settings = pretokenization.settings_of(*parse(args, pretokenization.SCRIPT))
    write_json(pretokenization.record_path(str(part)), settings)
    call("pretokenization", args)
    assert output.read_bytes() == full
    assert sorted(os.listdir(tmp_path)) == ["tokens.jsonl"]


def test_pretokenization_center_and_flip(folder, tmp_path):
    output = tmp_path / "flip.jsonl"
    call("pretokenization", ["--data", str(folder / "train"), "--output", str(output), "--augment", "flip",
                 "--batch_size", "4", "--num_workers", "0", f"config={TOY}", *SMALL])
    records = [json.loads(line) for line in output.read_text().splitlines()]
    assert len(records) == 12
    tokenizer = build_tokenizer(load_config(TOY, SMALL))
    center = to_tensor(center_crop_arr(Image.open(folder / "train" / "n001" / "img0.png").convert("RGB"), 32))
    assert records[0]["tokens"] == tokenizer.encode(center[None])[0].tolist()
    assert records[1]["tokens"] == tokenizer.encode(center.flip(-1)[None])[0].tolist()


def test_shards_round_trip_and_train_on_the_fly(folder, tmp_path):
    call(
        "convert_imagenet_to_wds", ["--imagenet_dir", str(folder), "--output_dir", str(tmp_path / "shards"), "--splits", "train",
         "--maxcount", "4"]
    )
    assert sorted(os.listdir(tmp_path / "shards" / "train")) == ["imagenet-train-0000.tar", "imagenet-train-0001.tar"]
    pattern = str(tmp_path / "shards" / "train" / "imagenet-train-{0000..0001}.tar")
    config = load_config(TOY, SMALL + [f"dataset.params.train_shards_path_or_url={pattern}", "dataset.name=imagenet",
                                       "training.per_gpu_batch_size=3", "dataset.params.shuffle_buffer_size=2"])
    from utils.data.loader import shard_loader

    batch_images, batch_labels = next(iter(shard_loader(config, step=0)))
    assert batch_images.shape == (3, 3, 32, 32) and batch_images.dtype == torch.float32
    assert set(batch_labels.tolist()) <= {0, 1}

    # shards → JSONL by the pre-tokenization script, equal as a multiset to the folder's
    common = ["--augment", "center", "--batch_size", "4", "--num_workers", "0", f"config={TOY}", *SMALL]
    call("pretokenization", ["--data", pattern, "--output", str(tmp_path / "a.jsonl"), *common])
    call("pretokenization", ["--data", str(folder / "train"), "--output", str(tmp_path / "b.jsonl"), *common])
    from_shards, from_folder = ((tmp_path / name).read_text().splitlines() for name in ("a.jsonl", "b.jsonl"))
    assert sorted(from_shards) == sorted(from_folder)

    train_rear = load_script("train_rear")
    torch.set_num_threads(1)
    summary = train_rear.main(load_config(TOY, [*SMALL, f"dataset.params.train_shards_path_or_url={pattern}",
                               "dataset.name=imagenet", "training.per_gpu_batch_size=3", "training.max_train_steps=2",
                               "dataset.params.shuffle_buffer_size=2", "model.generator.hidden_size=32",
                               "model.generator.num_hidden_layers=2", "model.generator.intermediate_size=64",
                               "model.generator.num_attention_heads=2", "model.generator.decode_align_layer_idx=1",
                               f"experiment.output_dir={tmp_path / 'run'}"]))
    assert summary["step"] == 2 and (tmp_path / "run" / "generator.safetensors").is_file()


def test_pretokenization_on_two_processes_merges_their_parts(folder, tmp_path):
    """torchrun with 2 (gloo) processes: each writes its share, rank 0 merges; same lines as one process."""
    import subprocess
    import sys

    common = ["--data", str(folder / "train"), "--augment", "flip", "--batch_size", "2", "--num_workers", "0",
              f"config={TOY}", *SMALL]
    call("pretokenization", ["--output", str(tmp_path / "one.jsonl"), *common])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29519",
         str(ROOT / "scripts/pretokenization.py"), "--output", str(tmp_path / "two.jsonl"), *common],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=240,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    one, two = ((tmp_path / name).read_text().splitlines() for name in ("one.jsonl", "two.jsonl"))
    assert len(two) == 12 and sorted(two) == sorted(one)
    assert two != one  # rank 0's images (every other one) first: the parts were really split
    assert sorted(os.listdir(tmp_path)) == ["one.jsonl", "two.jsonl"]
