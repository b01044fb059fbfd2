"""The original release's own YAML files (tests/fixtures/original_configs/, verbatim) load, mean what the original
code made of them, and train and sample with the original launcher's overrides; the original's switches (trackers,
EMA, the on-the-fly image transform) behave as released."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from conftest import FIXTURES, load_script
from modeling import build_generator, build_tokenizer
from tiny_models import ROOT, TINY_VQGAN, one_thread
from utils.config import canonical_choice, load_config
from utils.data.images import training_transform
from utils.errors import UsageError
from utils.training.logging import tracker_name

ORIGINALS = FIXTURES / "original_configs"
REAR_FILES = ["rear_s", "rear_b", "rear_l", "rear_vqplus"]
LAUNCHER = ["experiment.entity=my-team", "training.enable_swanlab=False"]  # scripts_bash/rear_train.sh, README


@pytest.mark.parametrize("name", [*REAR_FILES, "rar"])
def test_every_original_file_loads_unchanged(name):
    config = load_config(str(ORIGINALS / f"{name}.yaml"), LAUNCHER)
    assert config.experiment.entity == "my-team" and config.training.enable_swanlab is False
    assert tracker_name(config) == "wandb"  # they all set training.enable_wandb: True


@pytest.mark.parametrize("name, decode_idx, tokenizer", [("rear_s", 15, "maskgit_vqgan"), ("rear_b", 18, "maskgit_vqgan"),
                                                         ("rear_l", 18, "maskgit_vqgan"), ("rear_vqplus", 18, "vqgan_plus")])
def test_rear_files_mean_rear(name, decode_idx, tokenizer):
    config = load_config(str(ORIGINALS / f"{name}.yaml"))
    g = config.model.generator
    assert (g.perturb_mode, g.transition_alignment, g.encode_align, g.decode_align) == ("switch", True, True, True)
    assert (g.encode_align_layer_idx, g.decode_align_layer_idx, g.projection_dim, g.order) == (0, decode_idx, 2048, "raster")
    assert canonical_choice(config, "model.vq_model.model_type") == tokenizer  # maskgitvq / vqplus: the original's names
    with torch.device("meta"):
        heads = build_generator(config).alignment_heads
    assert heads == {"encode_align_mlp": 0, "decode_align_mlp": decode_idx}


def test_rar_file_trains_a_plain_ar_model_as_the_original_code_would():
    """RAR's YAML has no perturb_mode / transition_alignment / order: the original reAR code trains plain AR on it."""
    config = load_config(str(ORIGINALS / "rar.yaml"))
    g = config.model.generator
    assert (g.perturb_mode, g.transition_alignment, g.order, g.backbone) == ("none", False, "raster", "rar")
    with torch.device("meta"):
        model = build_generator(config)
    assert model.alignment_heads == {} and not any("align_mlp" in k for k in model.state_dict())
    rar = load_config(str(ORIGINALS / "rar.yaml"), ["model.generator.order=random"])  # the README's one override
    assert rar.model.generator.order == "random"


def test_swanlab_switch_needs_the_package(monkeypatch):
    config = load_config(str(ORIGINALS / "rear_s.yaml"), ["training.enable_swanlab=True"])
    monkeypatch.setitem(sys.modules, "swanlab", None)  # not installed: importing it fails
    with pytest.raises(UsageError, match="logging to swanlab needs the `swanlab` package: `pip install swanlab`"):
        tracker_name(config)
    monkeypatch.setitem(sys.modules, "swanlab", object())  # installed
    assert tracker_name(config) == "swanlab"
    assert tracker_name(load_config(str(ORIGINALS / "rear_s.yaml"), ["training.enable_swanlab=False"])) == "wandb"


# ----------------------------------------------------------------------------------------- training them
TINY = [
    "model.generator.hidden_size=32", "model.generator.num_hidden_layers=2", "model.generator.num_attention_heads=2",
    "model.generator.intermediate_size=64", "model.generator.projection_dim=16", "model.generator.image_seq_len=16",
    "model.generator.decode_align_layer_idx=1", "model.vq_model.codebook_size=32", "model.vq_model.token_size=16",
    "model.vq_model.num_latent_tokens=16", "dataset.preprocessing.crop_size=16", "dataset.params.num_workers_per_gpu=0",
    "training.per_gpu_batch_size=4", "training.gradient_accumulation_steps=1", "training.max_train_steps=2",
    "training.mixed_precision=no", "experiment.save_every=2", "experiment.generate_every=2", "experiment.log_every=1",
    "training.num_generated_images=2",
]
TINY_VQGAN_PLUS = ["model.vq_model.hidden_channels=32", "model.vq_model.channel_mult=[1,1,2]",
                   "model.vq_model.num_resolutions=3", "model.vq_model.num_res_blocks=1"]


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    """A pre-tokenized JSONL of 16 random lines (V = 32, N = 16), and tiny random tokenizers for both kinds."""
    folder = tmp_path_factory.mktemp("original_configs")
    rng = np.random.default_rng(0)
    with open(folder / "tokens.jsonl", "w") as f:
        for i in range(16):
            f.write(json.dumps({"class_id": int(i % 1000), "tokens": rng.integers(0, 32, 16).tolist()}) + "\n")
    torch.manual_seed(0)
    from modeling.tokenizers.maskgit_vqgan import MaskGITVQGAN

    save_file(MaskGITVQGAN(TINY_VQGAN).state_dict(), str(folder / "maskgitvq.safetensors"))
    vqplus = build_tokenizer(load_config(str(ORIGINALS / "rear_vqplus.yaml"),
                                         TINY + TINY_VQGAN_PLUS + ["experiment.tokenizer_checkpoint=null"]),
                             random_weights=True)
    save_file(vqplus.state_dict(), str(folder / "vqplus.safetensors"))
    return folder


@pytest.mark.parametrize("name", REAR_FILES)
def test_original_rear_files_train_and_sample_with_the_launchers_overrides(name, tiny_data, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    tokenizer = tiny_data / ("vqplus.safetensors" if name == "rear_vqplus" else "maskgitvq.safetensors")
    overrides = [*LAUNCHER, f"experiment.output_dir={tmp_path / 'run'}", *TINY,
                 *(TINY_VQGAN_PLUS if name == "rear_vqplus" else []),
                 f"experiment.tokenizer_checkpoint={tokenizer}",
                 f"dataset.params.pretokenization={tiny_data / 'tokens.jsonl'}"]
    config = load_config(str(ORIGINALS / f"{name}.yaml"), overrides)
    logged = {}
    if name == "rear_s":  # the tracker: the real wandb package, offline; record what reaches its Run.log
        import wandb

        log = wandb.Run.log
        monkeypatch.setattr(wandb.Run, "log", lambda run, data, *args, **kwargs: (
            logged.update(data), log(run, data, *args, **kwargs))[-1])
    with one_thread():
        summary = load_script("train_rear").main(config)
        assert summary["step"] == 2
        sample = load_script("sample_imagenet_rear")
        sample.main(load_config(str(ORIGINALS / f"{name}.yaml"), overrides + [
            f"experiment.generator_checkpoint={tmp_path / 'run' / 'generator.safetensors'}",
            f"experiment.output_dir={tmp_path / 'samples'}", "sampling.num_samples=1000",
            "sampling.per_proc_batch_size=500", "model.generator.guidance_scale=3.0"]))
    with np.load(tmp_path / "samples.npz") as npz:
        assert npz["arr_0"].shape == (1000, 16, 16, 3) and npz["tokens"].shape == (1000, 16)
    if name == "rear_s":  # wandb got the original's names as well as ours, in its offline run folder
        assert len(list((tmp_path / "run" / "wandb").glob("offline-run-*/run-*.wandb"))) == 1
        for key in ("train/loss", "train/ar_loss", "train/proj_loss", "train/correct_tokens", "lr", "lr/random_ratio",
                    "loss", "ce", "encode_alignment", "decode_alignment", "noise_rate"):
            assert key in logged, key
        assert logged["train/proj_loss"] == pytest.approx(logged["encode_alignment"] + logged["decode_alignment"])
        assert logged["lr/random_ratio"] == pytest.approx(1.0 - 1 / 187_500)  # r of the last update, step 1


def test_the_swanlab_launcher_override_stops_at_start_up_with_one_line(tmp_path):
    """The original launcher passes training.enable_swanlab=True: without the package, one line and nothing made."""
    blocker = tmp_path / "no_swanlab"
    blocker.mkdir()
    (blocker / "swanlab.py").write_text("raise ImportError('No module named swanlab')\n")  # as if not installed
    out = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "train_rear.py"), f"config={ORIGINALS / 'rear_l.yaml'}",
         "experiment.entity=my-team", f"experiment.output_dir={out}", "training.enable_swanlab=True"],
        capture_output=True, text=True, timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(blocker)},
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: logging to swanlab needs the `swanlab` package: `pip install swanlab`, or choose another tracker "
        "(experiment.tracker=tensorboard|none, training.enable_swanlab=False)"
    ]
    assert not out.exists()


# ----------------------------------------------------------------------------------------- the image transform
def image(width=40, height=28):
    pixels = np.random.default_rng(1).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def test_transform_is_the_originals_resize_center_crop_to_tensor():
    config = load_config(None, ["dataset.preprocessing.resize_shorter_edge=20", "dataset.preprocessing.crop_size=16",
                                "dataset.preprocessing.random_flip=False"])
    out = training_transform(config.dataset.preprocessing)(image())
    # by hand with PIL: shorter edge 28 -> 20 (bicubic; PIL always antialiases), width 40 -> int(20 * 40 / 28) = 28
    resized = np.asarray(image().resize((28, 20), Image.Resampling.BICUBIC), dtype=np.float32) / 255
    top, left = round((20 - 16) / 2), round((28 - 16) / 2)
    expected = torch.from_numpy(resized[top : top + 16, left : left + 16]).permute(2, 0, 1)
    assert out.shape == (3, 16, 16)
    torch.testing.assert_close(out, expected, atol=0, rtol=0)


def test_transform_random_crop_and_flip_are_honoured():
    config = load_config(None, ["dataset.preprocessing.resize_shorter_edge=20", "dataset.preprocessing.crop_size=16",
                                "dataset.preprocessing.random_crop=True", "dataset.preprocessing.random_flip=True"])
    transform = training_transform(config.dataset.preprocessing)
    resized = torch.from_numpy(np.asarray(image().resize((28, 20), Image.Resampling.BICUBIC), dtype=np.float32) / 255)
    crops = {(t, l, f) for t in range(5) for l in range(13) for f in (0, 1)}
    seen = set()
    torch.manual_seed(0)
    for _ in range(40):
        out = transform(image())
        found = [(t, l, f) for t, l, f in crops
                 if torch.equal(out, (resized[t : t + 16, l : l + 16].permute(2, 0, 1).flip(-1) if f else
                                      resized[t : t + 16, l : l + 16].permute(2, 0, 1)))]
        assert found, "every output is a crop of the resized image, flipped or not"
        seen.update(found)
    assert len({(t, l) for t, l, _ in seen}) > 5 and {f for *_, f in seen} == {0, 1}
