"""The backbone configs end to end at tiny sizes on a CPU: each trains 2 steps and samples its grid
(scripts/train_rear.py); the 50k sampler (scripts/sample_imagenet_rear.py) and the demo run on a non-rar backbone.

Each config keeps its own backbone and tokenizer; only sizes are overridden. The AliTok and ReTok builders fix their
released architectures (390M and 170M+ parameters), so the tests register tiny ones under the same names: the same
classes at the sizes of their parity fixtures, loaded from random weights written here."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from conftest import FIXTURES, load_script
from modeling import load_generator
from modeling.backbones.alitok_ar import AliTokAR
from modeling.backbones.gpt1d import GPT1D
from modeling.tokenizers import TOKENIZERS
from modeling.tokenizers.alitok import AliTok, AliTokConfig
from modeling.tokenizers.retok import ReTok
from tiny_models import ROOT, one_thread
from utils.cli import parse
from utils.config import config_from_cli
from utils.fid_samples.run import batch_seed

TINY_ALITOK = AliTokConfig(**json.loads((FIXTURES / "alitok" / "alitok.json").read_text())["configs"]["seed0"])
RETOK_FIXTURE = json.loads((FIXTURES / "retok" / "retok_tiny.json").read_text())
TINY_RETOK = {**RETOK_FIXTURE["config"], **RETOK_FIXTURE["patched_sizes"]}
CLASSES = 2
GENERATOR = [
    "model.generator.hidden_size=32",
    "model.generator.num_hidden_layers=2",
    "model.generator.num_attention_heads=2",
    f"model.generator.condition_num_classes={CLASSES}",
    "model.generator.decode_align_layer_idx=1",
    "model.generator.projection_dim=16",
    "model.generator.gpt_model=null",
]
TOKENIZER_SIZES = {  # (tokenizer, its tiny class and config, the config keys that describe it)
    "alitok": (AliTok, TINY_ALITOK, ["model.vq_model.codebook_size=64", "model.vq_model.token_size=8",
                                     "model.vq_model.num_latent_tokens=19", "model.generator.image_seq_len=19"]),
    "retok": (ReTok, TINY_RETOK, ["model.vq_model.codebook_size=512", "model.vq_model.token_size=8",
                                  "model.generator.image_seq_len=256"]),
}
CONFIGS = {"ar_b_alitok": ("alitok", AliTokAR), "rear_b_alitok": ("alitok", AliTokAR),
           "rear_xl_retok_gpt1d": ("retok", GPT1D)}


@pytest.fixture(scope="module")
def tiny_tokenizers(tmp_path_factory):
    """{name: weights file} of tiny random tokenizers, registered under the released ones' names."""
    folder = tmp_path_factory.mktemp("tokenizers")
    saved = dict(TOKENIZERS)
    paths = {}
    for name, (cls, architecture, _) in TOKENIZER_SIZES.items():
        torch.manual_seed(0)
        paths[name] = str(folder / f"{name}_tiny.safetensors")
        save_file(cls(architecture).state_dict(), paths[name])
        TOKENIZERS[name] = lambda config, checkpoint, cls=cls, architecture=architecture: cls.from_pretrained(
            checkpoint, architecture)
    yield paths
    TOKENIZERS.update(saved)


def pretokenized(path, tokens_per_image, codebook_size, lines=8):
    rng = np.random.default_rng(0)
    with open(path, "w") as f:
        for i in range(lines):
            tokens = rng.integers(0, codebook_size, tokens_per_image).tolist()
            f.write(json.dumps({"class_id": i % CLASSES, "tokens": tokens}) + "\n")
    return str(path)


def tiny_overrides(name, tiny_tokenizers, tmp_path):
    tokenizer = CONFIGS[name][0]
    sizes = TOKENIZER_SIZES[tokenizer][2]
    length = int(sizes[-1].split("=")[1])
    codebook = int(sizes[0].split("=")[1])
    return [f"config={ROOT / 'configs' / f'{name}.yaml'}", *GENERATOR, *sizes,
            f"model.vq_model.pretrained_tokenizer_weight={tiny_tokenizers[tokenizer]}",
            f"dataset.params.pretokenization={pretokenized(tmp_path / 'data.jsonl', length, codebook)}",
            "dataset.params.num_workers_per_gpu=0"]


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_config_trains_two_steps_and_samples(name, tiny_tokenizers, tmp_path):
    out = tmp_path / "run"
    argv = [*tiny_overrides(name, tiny_tokenizers, tmp_path), f"experiment.output_dir={out}",
            "experiment.tracker=none", "experiment.resume=True", "training.max_train_steps=2",
            "training.per_gpu_batch_size=2", "training.gradient_accumulation_steps=1", "training.global_batch_size=null",
            "training.mixed_precision='no'",
            "lr_scheduler.params.warmup_steps=1", "experiment.generate_every=2", "experiment.log_every=1"]
    config = config_from_cli(argv)
    with one_thread():
        summary = load_script("train_rear").main(config)
    assert summary["step"] == 2
    assert (out / "samples" / "step_00000002.png").is_file()  # sampled through the shared call site
    generator = load_generator(config, str(out / "generator.safetensors"))
    assert isinstance(generator, CONFIGS[name][1])
    assert bool(generator.alignment_heads) == name.startswith("rear")


@pytest.fixture
def alitok_weights(tiny_tokenizers, tmp_path):
    """(tiny AliTok-B config arguments, a random alitok_ar generator at those sizes, its weights file)."""
    base = tiny_overrides("ar_b_alitok", tiny_tokenizers, tmp_path)
    torch.manual_seed(0)
    generator = AliTokAR(config_from_cli(base))
    with torch.no_grad():
        generator.output.weight.normal_(std=2.0)  # the released init's zero output would sample uniform tokens
    path = str(tmp_path / "alitok_ar_tiny.safetensors")
    save_file(generator.state_dict(), path)
    return base, generator.eval(), path


def test_sampler_script_on_a_non_rar_backbone(alitok_weights, tmp_path):
    """scripts/sample_imagenet_rear.py, one process, with the released AliTok-B config at tiny sizes."""
    base, generator, path = alitok_weights
    out = tmp_path / "samples"
    script = load_script("sample_imagenet_rear")
    with one_thread():
        script.main(*parse([*base, f"experiment.generator_checkpoint={path}", f"experiment.output_dir={out}",
                            "sampling.num_samples=4", "sampling.per_proc_batch_size=2", "sampling.seed=3"],
                           script.SCRIPT))
        with np.load(tmp_path / "samples.npz") as npz:
            images, tokens, labels = npz["arr_0"], npz["tokens"], npz["labels"]
        assert images.shape == (4, 16, 16, 3) and images.dtype == np.uint8
        assert tokens.shape == (4, 19) and tokens.dtype == np.int32
        assert labels.tolist() == [0, 0, 1, 1]
        torch.manual_seed(batch_seed(3, 1))  # batch 1: classes 1, 1 at AliTok-B's guidance 16.0 / 1.8
        expected = generator.generate(torch.tensor([1, 1]), 16.0, 1.8)
    assert np.array_equal(tokens[2:], expected.numpy())
    assert json.loads((out / "sampling.json").read_text())["backbone"] == "alitok_ar"


def test_demo_takes_any_backbone_config(alitok_weights, tiny_tokenizers, tmp_path, capsys):
    base, generator, path = alitok_weights
    demo = load_script("demo")
    out = tmp_path / "grid.png"
    with one_thread():
        demo.run(demo.SCRIPT, demo.main, [*base, "--generator", path, "--tokenizer", tiny_tokenizers["alitok"],
                                          "--classes", "1", "0", "--seed", "5", "--out", str(out), "--device", "cpu"])
        torch.manual_seed(5)
        tokens = generator.generate(torch.tensor([1, 0]), 16.0, 1.8)
        images = AliTok.from_pretrained(tiny_tokenizers["alitok"], TINY_ALITOK).decode_tokens(tokens)
    expected = (images.clamp(0, 1) * 255).permute(0, 2, 3, 1).to(torch.uint8).numpy()
    grid = np.asarray(Image.open(out).convert("RGB"))
    for i in range(2):  # each 16x16 image shown 8x enlarged
        assert np.array_equal(grid[0:128:8, i * 128 : (i + 1) * 128 : 8], expected[i])
    # a config whose generator has no released weights says what to pass, instead of falling back to reAR-S
    with pytest.raises(SystemExit) as exit_code:
        demo.run(demo.SCRIPT, demo.main, [f"config={ROOT / 'configs' / 'rear_b_alitok.yaml'}", "--out", str(out)])
    assert exit_code.value.code == 2
    assert "alitok_ar generator has no weights named: pass --generator PATH" in capsys.readouterr().err


def test_benchmark_counts_any_backbone_and_says_it_has_no_fast_sampler(tiny_tokenizers, tmp_path, capsys):
    benchmark = load_script("benchmark")
    base = tiny_overrides("ar_b_alitok", tiny_tokenizers, tmp_path)
    with torch.device("meta"):
        model = AliTokAR(config_from_cli(base))
    d, layers, ffn, v, n = 32, 2, 256, 64, 19
    length = n + 1  # [class, tok_0..tok_{N-1}]
    block = 3 * d * d + d * d + 3 * d * ffn  # qkv, proj, SwiGLU's w1, w3, w2
    attention = 2 * d * length * (length + 1) // 2  # QK^T and AV, position i sees i + 1 keys
    macs = layers * (block * length + attention) + d * v * n  # the output layer on the N predicting positions
    assert benchmark.forward_flops_per_sample(model) == 2 * macs == 2_425_344
    out = tmp_path / "bench.json"
    with one_thread():
        benchmark.run(benchmark.SCRIPT, benchmark.main, [*base, "--device", "cpu", "--batch-size", "2", "--steps",
                                                         "1", "--repeats", "1", "--json", str(out)])
    result = json.loads(out.read_text())
    assert result["meta"]["backbone"] == "alitok_ar" and result["model"]["parameters"] == model.num_parameters()
    assert result["model"]["forward_flops_per_token"] == 2 * macs / n
    assert list(result["training"]) == ["original", "ours", "dense_fp32"]
    sampling = result["sampling"]
    assert list(sampling["variants"]) == ["plain", "kv_cache"]
    assert "fast sampler serves the rar backbone only" in sampling["fast_sampler"]
    assert sampling["end_to_end"]["skipped"] == "the MaskGIT-VQGAN stand-in decodes a square grid of tokens, not 19"
    assert "(no fast sampler: the fast sampler serves the rar backbone only" in capsys.readouterr().out
