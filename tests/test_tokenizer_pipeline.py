"""The whole pipeline on each tokenizer of the paper, at tiny sizes with random weights: pre-tokenize images
(scripts/pretokenization.py) -> train reAR 2 steps on the JSONL (noisy context + alignment heads, so the tokenizer's
`get_quantized_states` sets the loss) with a sample grid -> sample the 50k sampler's .npz -> the demo's grid.
Generator vocabulary, sequence length and alignment width all come from the tokenizer."""

import json
import math
import os

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from safetensors.torch import load_file

from conftest import load_script
from modeling import load_generator
from modeling.tokenizers import build_tokenizer
from tiny_models import TINY_CONFIG, TINY_TOKENIZERS, one_thread, random_weights
from utils.config import load_config
from utils.data.images import center_crop_arr, to_tensor

# A generator over ReTok's first 48 tokens: the data keeps all 256, training reads 48, decoding takes 48.
TOKENIZERS = {**TINY_TOKENIZERS, "retok_first_48": {**TINY_TOKENIZERS["retok"], "generator_tokens": 48}}
GENERATOR = dict(num_hidden_layers=2, decode_align_layer_idx=1, condition_num_classes=2)


def original_bytes(tokenizer, tokens: torch.Tensor) -> np.ndarray:
    """uint8 (B, H, W, 3) as each tokenizer's original evaluation writes its decoded images: ReTok's (and LlamaGen's)
    clamp(127.5 x + 128, 0, 255) of the [-1, 1] output; RAR's (x * 255).to(uint8) of the [0, 1] output for the rest."""
    with torch.no_grad(), one_thread():  # the scripts' float sums: a rounding-level change can flip a byte
        if type(tokenizer).__name__ == "ReTok":
            pixels = torch.clamp(127.5 * tokenizer.decode_raw(tokens) + 128.0, 0, 255)
        else:
            pixels = tokenizer.decode_tokens(tokens).clamp(0, 1) * 255.0
    return pixels.permute(0, 2, 3, 1).to(torch.uint8).numpy()


def write_config(path, name: str, **extra) -> str:
    """rear_tiny (reAR on: noisy context `switch`, both alignment heads) around the tiny tokenizer `name`."""
    case = TOKENIZERS[name]
    generator = {**GENERATOR, "image_seq_len": case.get("generator_tokens", case["tokens"])}
    config = OmegaConf.merge(OmegaConf.load(TINY_CONFIG), {
        "model": {"vq_model": {**case["vq_model"], "pretrained_tokenizer_weight": None}, "generator": generator},
        "dataset": {"preprocessing": {"crop_size": case["crop"]}}}, extra)
    OmegaConf.save(config, path)
    return str(path)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """root/<class>/<image>: 2 classes x 2 images of odd sizes, larger than every crop."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for c, name in enumerate(["n001", "n002"]):
        os.makedirs(root / name)
        for i in range(2):
            pixels = rng.integers(0, 256, (70 + 9 * i, 67 + 5 * c, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"img{i}.png")
    return root


def run_script(name, argv):
    script = load_script(name)
    with one_thread():
        script.run(script.SCRIPT, script.main, argv)


@pytest.mark.parametrize("name", list(TOKENIZERS))
def test_pretokenize_train_sample_and_demo(name, folder, tmp_path, monkeypatch):
    case = TOKENIZERS[name]
    size, n, k = case["crop"], case["tokens"], case.get("generator_tokens", case["tokens"])
    config_path = write_config(tmp_path / "config.yaml", name)
    weights = random_weights(config_path, tmp_path / "tokenizer.safetensors")
    tokenizer_option = f"experiment.tokenizer_checkpoint={weights}"
    tokenizer = build_tokenizer(load_config(config_path, [tokenizer_option]))
    z, vocabulary = tokenizer.token_size, tokenizer.codebook_size

    # pre-tokenization: every token of each center crop, in the folder's order
    data = tmp_path / "tokens.jsonl"
    run_script("pretokenization", [f"config={config_path}", tokenizer_option, "--data", str(folder),
                                   "--output", str(data), "--augment", "center", "--batch_size", "3",
                                   "--num_workers", "0"])
    records = [json.loads(line) for line in data.read_text().splitlines()]
    crops = torch.stack([to_tensor(center_crop_arr(Image.open(folder / c / f"img{i}.png").convert("RGB"), size))
                         for c in ("n001", "n002") for i in range(2)])
    assert [r["class_id"] for r in records] == [0, 0, 1, 1]
    assert [r["tokens"] for r in records] == tokenizer.encode(crops).tolist()
    assert len(records[0]["tokens"]) == n

    # training: the memory-mapped JSONL, reAR's objective with this tokenizer's codebook vectors, a grid at step 2
    train_rear = load_script("train_rear")
    train_step, terms = train_rear.train_step, []

    def recorded_step(*args, **kwargs):
        result = train_step(*args, **kwargs)
        terms.append({key: float(value) for key, value in result[0].items()})
        return result

    monkeypatch.setattr(train_rear, "train_step", recorded_step)
    run = tmp_path / "run"
    with one_thread():
        summary = train_rear.main(load_config(config_path, [
            tokenizer_option, f"dataset.params.pretokenization={data}", "dataset.params.num_workers_per_gpu=0",
            f"experiment.output_dir={run}", "training.max_train_steps=2", "training.per_gpu_batch_size=2",
            "experiment.generate_every=2", "training.num_generated_images=2"]))
    assert summary["step"] == 2 and len(terms) == 2
    for step in terms:  # the heads were compared with the tokenizer's vectors (a head switched off logs 0.0)
        assert step["encode_alignment"] != 0.0 and step["decode_alignment"] != 0.0 and math.isfinite(step["loss"])
    weights_out = load_file(str(run / "generator.safetensors"))
    assert weights_out["lm_head.weight"].shape == (vocabulary, 64)
    assert weights_out["pos_embed"].shape == (1, k + 1024, 64)
    assert weights_out["encode_align_mlp.4.weight"].shape == weights_out["decode_align_mlp.4.weight"].shape == (z, 128)
    assert Image.open(run / "samples" / "step_00000002.png").size == (2 * size, size)

    # the 50k sampler's .npz: tokens, labels, and the images the tokenizer's original would write for those tokens
    samples = tmp_path / "samples"
    run_script("sample_imagenet_rear", [f"config={config_path}", tokenizer_option,
                                        f"experiment.generator_checkpoint={run / 'generator.safetensors'}",
                                        f"experiment.output_dir={samples}", "sampling.num_samples=2",
                                        "sampling.per_proc_batch_size=2"])
    with np.load(f"{samples}.npz") as npz:
        images, tokens, labels = npz["arr_0"], npz["tokens"], npz["labels"]
    assert images.shape == (2, size, size, 3) and images.dtype == np.uint8
    assert tokens.shape == (2, k) and 0 <= tokens.min() and tokens.max() < vocabulary
    assert labels.tolist() == [0, 1]
    assert np.array_equal(images, original_bytes(tokenizer, torch.from_numpy(tokens).long()))

    # the demo: a labelled grid, each cell the tokens of `torch.manual_seed(seed); generate(...)` decoded
    grid_path = tmp_path / "grid.png"
    run_script("demo", [f"config={config_path}", "--generator", str(run / "generator.safetensors"),
                        "--tokenizer", weights, "--classes", "1", "0", "--seed", "3", "--out", str(grid_path),
                        "--device", "cpu"])
    config = load_config(config_path, [tokenizer_option])
    with one_thread():
        generator = load_generator(config, str(run / "generator.safetensors"))
        torch.manual_seed(3)
        demo_tokens = generator.generate(torch.tensor([1, 0]), guidance_scale=4.0, guidance_scale_pow=2.75)
    expected = original_bytes(tokenizer, demo_tokens)
    scale = math.ceil(128 / size)
    grid = np.asarray(Image.open(grid_path).convert("RGB"))
    assert grid.shape[1] == 2 * size * scale
    for i in range(2):
        cell = grid[: size * scale : scale, i * size * scale : (i + 1) * size * scale : scale]
        assert np.array_equal(cell, expected[i])


def test_every_entry_point_refuses_a_config_that_does_not_describe_its_tokenizer(folder, tmp_path, capsys):
    """image_seq_len 9 for a TiTok of 8 tokens: one line, exit status 2, before any folder is made."""
    weights = random_weights(write_config(tmp_path / "good.yaml", "titok"), tmp_path / "tokenizer.safetensors")
    config_path = write_config(tmp_path / "config.yaml", "titok", model={"generator": {"image_seq_len": 9}},
                               experiment={"tokenizer_checkpoint": weights})
    out = tmp_path / "out"
    commands = {
        "pretokenization": ["--data", str(folder), "--output", str(out / "tokens.jsonl")],
        "train_rear": [f"experiment.output_dir={out}", "dataset.params.pretokenization=missing.jsonl"],
        "sample_imagenet_rear": [f"experiment.output_dir={out}", "experiment.generator_checkpoint=missing.safetensors"],
        "demo": ["--generator", weights, "--out", str(out / "grid.png"), "--classes", "0"],
    }
    for script, argv in commands.items():
        with pytest.raises(SystemExit) as exit_status:
            run_script(script, [f"config={config_path}", *argv])
        assert exit_status.value.code == 2, script
        message = capsys.readouterr().err.strip()
        assert message == "error: 'model.generator.image_seq_len' is 9 but the 'titok' tokenizer has 8", script
        assert not out.exists(), script
