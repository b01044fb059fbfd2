"""scripts/demo.py: a labelled grid from tiny local weights, and the offline error that names both files."""

import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import load_script
from modeling.rear import ReAR
from modeling.tokenizers.maskgit_vqgan import MaskGITVQGAN
from tiny_models import ROOT, TINY_CONFIG, one_thread, write_tiny_weights
from utils.config import load_config
from utils.grids import class_caption, class_names, imagenet_class_names, labelled_grid

DEMO = ROOT / "scripts" / "demo.py"


def run_demo(argv):
    demo = load_script("demo")
    demo.run(demo.SCRIPT, demo.main, argv)


def test_imagenet_class_names():
    names = imagenet_class_names()
    assert len(names) == len(set(names)) == 1000
    assert (names[0], names[1], names[7], names[282], names[999]) == (
        "tench", "goldfish", "cock", "tiger cat", "toilet tissue"
    )
    assert class_caption(282, 1000) == "282 tiger cat"
    assert class_caption(3, 10) == "class 3"
    assert class_names(load_config(str(TINY_CONFIG)))[3] == "class 3"
    assert class_names(load_config(str(ROOT / "configs" / "rear_toy.yaml")))[3] == "3 red cross"
    assert class_names(load_config(str(ROOT / "configs" / "rear_s.yaml")))[282] == "282 tiger cat"


def test_grid_keeps_pixels_exact_and_writes_captions():
    images = np.random.default_rng(0).integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
    grid = np.asarray(labelled_grid(images, ["a", "b", "c"], columns=2))
    assert grid.shape[1] == 2 * 128 and grid.shape[0] > 2 * 128  # 2 columns x 2 rows of 128 px + captions
    cell_h = grid.shape[0] // 2
    assert np.array_equal(grid[cell_h : cell_h + 128 : 8, 0:128:8], images[2])  # nearest x8: each pixel exact
    caption = grid[128:cell_h, 0:128]
    assert (caption < 128).any() and (grid[cell_h + 128 :, 128:] == 255).all()  # text under c, none in the gap


def test_demo_writes_the_samples_of_the_seed(tmp_path):
    generator_path, tokenizer_path = write_tiny_weights(tmp_path)
    out = tmp_path / "grid.png"
    argv = [f"config={TINY_CONFIG}", "--generator", generator_path, "--tokenizer", tokenizer_path,
            "--classes", "1", "7", "3", "--seed", "3", "--out", str(out), "--device", "cpu"]
    with one_thread():
        run_demo(argv)
        generator = ReAR.from_pretrained(load_config(str(TINY_CONFIG)), generator_path)
        tokenizer = MaskGITVQGAN.from_pretrained(tokenizer_path)
        torch.manual_seed(3)
        tokens = generator.generate(torch.tensor([1, 7, 3]), guidance_scale=4.0, guidance_scale_pow=2.75)
        expected = (tokenizer.decode_tokens(tokens).clamp(0, 1) * 255).permute(0, 2, 3, 1).to(torch.uint8).numpy()
    grid = np.asarray(Image.open(out).convert("RGB"))
    assert grid.shape[1] == 3 * 128
    for i in range(3):
        assert np.array_equal(grid[0:128:8, i * 128 : (i + 1) * 128 : 8], expected[i])


def test_a_tokenizer_folder_or_hub_repo_goes_to_the_builder_as_is(tmp_path):
    """TiTok publishes config.json + weights (yucornetto/tokenizer_titok_*): --tokenizer takes the folder or repo id
    and leaves it to the tokenizer's builder, rather than looking for a weights file of that name."""
    demo = load_script("demo")
    generator_path, _ = write_tiny_weights(tmp_path)
    folder = tmp_path / "titok"
    folder.mkdir()
    for tokenizer in (str(folder), "yucornetto/tokenizer_titok_b64_imagenet"):
        assert demo.fetch_weights(generator_path, tokenizer) == (generator_path, tokenizer)


@pytest.mark.parametrize("model", ["reAR-L"])
def test_offline_error_names_both_files_and_the_local_options(tmp_path, model):
    """Without a network (and without HF_HUB_OFFLINE set) the demo fails fast, in one line, with the way out."""
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    env |= {"HF_HOME": str(tmp_path / "hf"), "OMP_NUM_THREADS": "1", "HF_ENDPOINT": "https://huggingface.invalid"}
    start = time.time()
    result = subprocess.run(
        [sys.executable, str(DEMO), "--model", model, "--out", str(tmp_path / "grid.png")],
        env=env, capture_output=True, text=True, timeout=120,
    )
    assert time.time() - start < 10
    assert result.returncode == 1 and len(result.stderr.strip().splitlines()) == 1
    for needed in ("reAR-L.safetensors", "qyoo/reAR", "maskgit-vqgan-imagenet-f16-256.bin", "fun-research/TiTok",
                   "--generator PATH", "--tokenizer PATH", "https://huggingface.co/qyoo/reAR/resolve/main/reAR-L.safetensors",
                   "1.90 GB"):
        assert needed in result.stderr
    assert not (tmp_path / "grid.png").exists()
