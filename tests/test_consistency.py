"""The consistency and exposure-bias measurements (evaluator/consistency.py, evaluator/exposure.py): on cases whose
answer is known by hand, through every tokenizer and backbone of the registries, and end to end on tiny files."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file

from conftest import FIXTURES, load_script
from evaluator import compare, consistency, exposure
from evaluator.measurement import position_bands
from evaluator.token_sets import TokenSet, evenly_spaced, load_token_set
from modeling import BACKBONES, TOKENIZERS, build_generator
from modeling.generator import Generator
from modeling.tokenizers import AliTok, MaskGITVQGAN, ReTok, TiTok, VQGANPlus
from modeling.tokenizers.alitok import AliTokConfig
from modeling.tokenizers.toy import PatchKMeansTokenizer
from modeling.tokenizers.vqgan_plus import RELEASED_CONFIG as VQGAN_PLUS_KEYS
from tiny_models import ROOT, TINY_CONFIG, TINY_VQGAN, one_thread, write_tiny_weights
from utils.cli import run
from utils.config import load_config, to_container

LEVELS = 16  # the level tokenizer's codes: constant 4x4 RGB patches at k / 15, k < 16
TOY_CONFIG = ROOT / "configs" / "rear_toy.yaml"
LEVEL_CONFIG = ["model.vq_model.codebook_size=16", "model.vq_model.num_latent_tokens=16",
                "model.generator.image_seq_len=16", "dataset.toy.image_size=16"]


# ----------------------------------------------------------------------------------------- tokenizers
def level_tokenizer(codebook=None) -> PatchKMeansTokenizer:
    """A 16x16-image, 16-token toy tokenizer whose code k is the flat patch of grey level k / 15: decoding then
    encoding gives every token back (its 8-bit image is within 1/255 of the level, the next code 17/255 away)."""
    tokenizer = PatchKMeansTokenizer(LEVELS, patch_size=4, image_size=16)
    with torch.no_grad():
        tokenizer.codebook.copy_(level_codebook() if codebook is None else codebook)
    return tokenizer


def level_codebook() -> torch.Tensor:
    return (torch.arange(LEVELS) / (LEVELS - 1))[:, None].expand(LEVELS, 48).clone()


class PlantedPermutation(PatchKMeansTokenizer):
    """The level tokenizer, but token t decodes to the image of π(t): decode then re-encode maps t to π(t)."""

    def __init__(self, permutation: torch.Tensor):
        super().__init__(LEVELS, patch_size=4, image_size=16)
        self.permutation = permutation
        with torch.no_grad():
            self.codebook.copy_(level_codebook())

    def decode_tokens(self, tokens):
        return super().decode_tokens(self.permutation[tokens])


def random_tokens(count, length=16, high=LEVELS, seed=0):
    return torch.randint(high, (count, length), generator=torch.Generator().manual_seed(seed)).numpy()


@pytest.mark.parametrize("rounding", ["truncate", "nearest"])
def test_8bit_images_are_the_bytes_the_sampler_saves(rounding):
    images = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 1.2 - 0.1
    tokenizer = level_tokenizer()
    tokenizer.pixel_rounding = rounding
    again = (consistency.as_8bit(images, tokenizer) * 255).round().permute(0, 2, 3, 1).to(torch.uint8)
    expected = (images.clamp(0, 1) * 255 + (0.5 if rounding == "nearest" else 0)).clamp(max=255).floor()
    assert torch.equal(again, expected.permute(0, 2, 3, 1).to(torch.uint8))


def test_identity_like_tokenizer_gives_consistency_one():
    tokens = TokenSet(random_tokens(10), None, "random")
    result = consistency.measure(level_tokenizer(), tokens, batch_size=4, device=torch.device("cpu"))
    match, distance = result["token_match"], result["codebook_distance"]
    assert match["mean"] == match["first_quarter"] == match["middle_half"] == match["last_quarter"] == 1.0
    assert match["by_position"] == [1.0] * 16
    assert distance["mean"] == 0.0 and distance["by_position"] == [0.0] * 16
    assert result["num_sequences"] == 10


def test_planted_permutation_gives_the_expected_share():
    # π: the cycle 3 -> 5 -> 9 -> 3 and the swap 12 <-> 13; every other token maps to itself.
    permutation = torch.arange(LEVELS)
    permutation[[3, 5, 9, 12, 13]] = torch.tensor([5, 9, 3, 13, 12])
    tokens = random_tokens(12)
    tokens[:, :12] = np.where(np.isin(tokens[:, :12], [3, 5, 9, 12, 13]), 0, tokens[:, :12])  # moved: last quarter only
    result = consistency.measure(PlantedPermutation(permutation), TokenSet(tokens, None, "planted"), 5,
                                 torch.device("cpu"))
    moved = np.isin(tokens, [3, 5, 9, 12, 13])
    assert moved[:, 12:].sum() > 5  # the seed plants enough moved tokens to tell the shares apart
    match = result["token_match"]
    assert match["mean"] == pytest.approx(1 - moved.mean(), abs=1e-12)
    assert match["first_quarter"] == match["middle_half"] == 1.0
    assert match["last_quarter"] == pytest.approx(1 - moved[:, 12:].mean(), abs=1e-12)
    assert match["by_position"] == pytest.approx(list(1 - moved.mean(0)), abs=1e-12)
    # Code k is the constant level k/15 in 48 dimensions: ||c_t - c_π(t)|| = |t - π(t)| / 15 * sqrt(48).
    expected = np.abs(tokens - permutation.numpy()[tokens]) / 15 * np.sqrt(48)
    assert result["codebook_distance"]["mean"] == pytest.approx(expected.mean(), rel=1e-5)
    assert result["codebook_distance"]["by_position"] == pytest.approx(list(expected.mean(0)), rel=1e-5)


def test_position_bands_are_the_first_quarter_middle_half_and_last_quarter():
    assert position_bands(np.arange(8.0)) == {"first_quarter": 0.5, "middle_half": 3.5, "last_quarter": 6.5}


def tiny_tokenizers():
    """A tiny random-weight instance of every registered tokenizer (the sizes of their fixtures)."""
    titok = json.loads((FIXTURES / "titok" / "titok_tiny.json").read_text())["legacy_seed0"]["config"]
    vqgan_plus = json.loads((FIXTURES / "vqgan_plus" / "fixture.json").read_text())
    alitok = json.loads((FIXTURES / "alitok" / "alitok.json").read_text())["configs"]["seed0"]
    retok = json.loads((FIXTURES / "retok" / "retok_tiny.json").read_text())
    return {
        "toy": level_tokenizer,
        "maskgit_vqgan": lambda: MaskGITVQGAN(TINY_VQGAN),
        "titok": lambda: TiTok(titok),
        "vqgan_plus": lambda: VQGANPlus({k: v for k, v in vqgan_plus["cases"]["seed0"].items() if k in VQGAN_PLUS_KEYS},
                                        image_size=vqgan_plus["image_size"]),
        "alitok": lambda: AliTok(AliTokConfig(**alitok)),
        "retok": lambda: ReTok({**retok["config"], **retok["patched_sizes"]}),
    }


def test_every_registered_tokenizer_is_measured():
    """Through the tokenizer interface alone: whatever the tokenizer, one batch or many give the same figures,
    of the right length and in range."""
    builders = tiny_tokenizers()
    assert set(builders) == set(TOKENIZERS), "give every registered tokenizer a tiny instance here"
    torch.manual_seed(0)
    with one_thread():
        for name, build in builders.items():
            tokenizer = build().eval()
            tokens = TokenSet(random_tokens(3, tokenizer.num_tokens, tokenizer.codebook_size), None, name)
            whole = consistency.measure(tokenizer, tokens, 3, torch.device("cpu"))
            one_by_one = consistency.measure(tokenizer, tokens, 1, torch.device("cpu"))
            for metric in consistency.METRICS:
                assert whole[metric]["by_position"] == pytest.approx(one_by_one[metric]["by_position"], abs=1e-5), name
                assert len(whole[metric]["by_position"]) == tokenizer.num_tokens, name
            assert 0.0 <= whole["token_match"]["mean"] <= 1.0 and whole["codebook_distance"]["mean"] >= 0.0, name
            if getattr(tokenizer, "decodes_prefixes", False):  # sequences of its first k tokens (ReTok)
                prefix = consistency.measure(tokenizer, TokenSet(tokens.tokens[:, :5], None, name), 3,
                                             torch.device("cpu"))
                assert len(prefix["token_match"]["by_position"]) == 5


# ----------------------------------------------------------------------------------------- exposure bias
class Successor(Generator):
    """A generator computed by hand: it predicts tok_0 = the class and tok_i = tok_{i-1} + 1 (mod V), with logit
    `margin` on that token and 0 on every other."""

    def __init__(self, codebook_size=8, seq_len=6, num_classes=4, margin=3.0):
        super().__init__({"model": {"vq_model": {"codebook_size": codebook_size},
                                    "generator": {"image_seq_len": seq_len, "condition_num_classes": num_classes}}})
        self.margin = margin

    def hidden_states(self, input_ids, class_ids, layers, orders=None):
        previous = torch.cat([class_ids[:, None] - 1, input_ids[:, :-1]], dim=1)
        return self.margin * F.one_hot((previous + 1) % self.codebook_size, self.codebook_size).float(), {}


def least_squares_slope(x, y):
    x, y = np.asarray(x), np.asarray(y)
    return ((x - x.mean()) * (y - y.mean())).sum() / ((x - x.mean()) ** 2).sum()


def test_exposure_matches_a_hand_computation():
    model, count, seed = Successor(), 40, 3
    v, n, m = model.codebook_size, model.image_seq_len, model.margin
    labels = np.arange(count) % model.num_classes
    tokens = (labels[:, None] + np.arange(n)) % v  # the sequences the model predicts exactly
    result = exposure.measure(model, TokenSet(tokens, labels, "successor"), (0.1, 0.3, 0.5), seed, 16,
                              torch.device("cpu"))
    noise = exposure.context_noise((count, n), v, seed)
    right, wrong = np.log(1 + (v - 1) * np.exp(-m)), np.log(np.exp(m) + v - 1)  # NLL of the target
    accuracies = []
    for entry, rate in zip(result["by_rate"], (0.0, 0.1, 0.3, 0.5)):
        # Position i is predicted from token i-1 alone: wrong exactly where that token was switched (never to itself).
        switched = (noise.uniform < rate).numpy()
        correct = np.concatenate([np.ones((count, 1)), 1 - switched[:, :-1]], axis=1)
        assert entry["rate"] == rate
        assert entry["accuracy"]["by_position"] == pytest.approx(list(correct.mean(0)), abs=1e-12)
        assert entry["accuracy"]["mean"] == pytest.approx(correct.mean(), abs=1e-12)
        assert entry["accuracy"]["last_quarter"] == pytest.approx(correct[:, -1].mean(), abs=1e-12)
        nll = np.where(correct == 1, right, wrong)
        assert entry["nll"]["by_position"] == pytest.approx(list(nll.mean(0)), rel=1e-5)
        accuracies.append(correct.mean())
    assert accuracies[0] == 1.0 and accuracies[1] > accuracies[2] > accuracies[3]
    assert result["slopes"]["accuracy"]["mean"] == pytest.approx(least_squares_slope([0, 0.1, 0.3, 0.5], accuracies))


def test_corruption_switches_exactly_the_drawn_tokens_to_other_tokens_nested_across_rates():
    tokens = torch.randint(0, 32, (200, 64), generator=torch.Generator().manual_seed(0))
    noise = exposure.context_noise(tuple(tokens.shape), 32, seed=1)
    switched = {rate: exposure.corrupt(tokens, rate, noise.uniform, noise.offset, 32) != tokens for rate in (0.1, 0.5)}
    assert torch.equal(switched[0.1], noise.uniform < 0.1)  # every drawn token changes (none to itself)
    assert bool((switched[0.1] <= switched[0.5]).all())  # switched at 0.1, switched at 0.5 too
    assert switched[0.5].float().mean().item() == pytest.approx(0.5, abs=0.01)
    replaced = exposure.corrupt(tokens, 1.0, noise.uniform, noise.offset, 32)
    assert 0 <= int(replaced.min()) and int(replaced.max()) < 32
    assert torch.equal(exposure.corrupt(tokens, 0.0, noise.uniform, noise.offset, 32), tokens)


def stepwise(model, tokens, class_ids):
    """Logits (B, N, V) from `next_token_logits` of each prefix, without a cache: the sampling path, not forward."""
    return torch.stack([model.next_token_logits(tokens[:, :i], class_ids) for i in range(tokens.shape[1])], dim=1)


def check_against_stepwise(model, seed=5):
    """exposure.measure at rates 0 and 0.5 equals NLL and accuracy computed from the sampling path."""
    v, n = model.codebook_size, model.image_seq_len
    labels = np.array([0, 3, 7, 2, 9])
    tokens = random_tokens(len(labels), n, v, seed=seed)
    result = exposure.measure(model, TokenSet(tokens, labels, "tiny"), (0.5,), seed, 2, torch.device("cpu"))
    noise = exposure.context_noise(tokens.shape, v, seed)
    targets, class_ids = torch.from_numpy(tokens), torch.from_numpy(labels)
    for entry in result["by_rate"]:
        context = exposure.corrupt(targets, entry["rate"], noise.uniform, noise.offset, v)
        with torch.no_grad():
            logits = stepwise(model, context, class_ids)
        nll = -logits.log_softmax(-1).gather(-1, targets[..., None])[..., 0]
        assert entry["nll"]["by_position"] == pytest.approx(nll.double().mean(0).tolist(), abs=1e-5)
        assert entry["accuracy"]["by_position"] == pytest.approx(
            (logits.argmax(-1) == targets).double().mean(0).tolist(), abs=1e-12)
    return result


def test_exposure_of_the_golden_generator_matches_its_sampling_path(golden_generator):
    with one_thread():
        result = check_against_stepwise(golden_generator)
    assert result["by_rate"][0]["nll"]["mean"] < result["by_rate"][1]["nll"]["mean"]


@pytest.mark.parametrize("backbone", sorted(BACKBONES))
def test_every_registered_backbone_is_measured(backbone):
    torch.manual_seed(0)
    model = build_generator(load_config(str(TINY_CONFIG), [f"model.generator.backbone={backbone}"]))
    with torch.no_grad():  # away from the zero inits (adaLN-Zero, ...): every part shapes the logits
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    with one_thread():
        check_against_stepwise(model.eval())


# ----------------------------------------------------------------------------------------- the commands
@pytest.fixture
def level_checkpoint(tmp_path):
    """The level tokenizer's weights, with code 7 a copy of code 6: token 7 re-encodes to 6 (the first nearest)."""
    codebook = level_codebook()
    codebook[7] = codebook[6]
    path = tmp_path / "levels.safetensors"
    save_file(level_tokenizer(codebook).state_dict(), str(path))
    return str(path)


def write_jsonl(path, tokens, labels):
    path.write_text("".join(json.dumps({"class_id": int(c), "tokens": t.tolist()}) + "\n"
                            for c, t in zip(labels, tokens)))


def command(module, argv):
    """Run a command's __main__ in this process; returns its exit status (0 when it returned)."""
    try:
        with one_thread():
            run(module.SCRIPT, module.main, argv)
    except SystemExit as exit:
        return exit.code
    return 0


def test_consistency_command_end_to_end(tmp_path, level_checkpoint, capsys):
    tokens, labels = random_tokens(8, seed=1), np.arange(8) // 2
    np.savez(tmp_path / "samples.npz", arr_0=np.zeros((8, 16, 16, 3), np.uint8), tokens=tokens.astype(np.int32),
             labels=labels)
    reference = random_tokens(6, seed=2)
    reference[reference == 7] = 6  # dataset tokens the tokenizer itself would produce
    write_jsonl(tmp_path / "held_out.jsonl", reference, np.arange(6))
    argv = [str(tmp_path / "samples.npz"), f"config={TOY_CONFIG}", *LEVEL_CONFIG,
            f"experiment.tokenizer_checkpoint={level_checkpoint}", f"experiment.output_dir={tmp_path / 'run'}",
            "--reference", str(tmp_path / "held_out.jsonl"), "--batch-size", "3", "--device", "cpu"]
    assert command(consistency, argv) == 0
    results = json.loads((tmp_path / "run" / "consistency.json").read_text())
    expected = 1 - (tokens == 7).mean()
    assert (tokens == 7).any() and results["generated"]["token_match"]["mean"] == pytest.approx(expected, abs=1e-12)
    assert results["dataset"]["token_match"]["mean"] == 1.0 and results["dataset"]["num_sequences"] == 6
    assert results["gap"]["token_match"] == pytest.approx(1 - expected, abs=1e-12)
    assert results["gap"]["codebook_distance"] == 0.0  # codes 6 and 7 are the same vector
    assert results["tokenizer"] == "toy" and results["image_bits"] == 8
    with Image.open(tmp_path / "run" / "consistency.png") as png:
        assert png.format == "PNG" and png.size[0] > 2 * png.size[1]
    printed = capsys.readouterr().out
    assert f"{expected:.4f} of tokens come back" in printed
    assert f"token match {1 - expected:+.4f}, codebook distance +0.0000" in printed

    assert command(consistency, [*argv, "--limit", "4", "--output", str(tmp_path / "four")]) == 0
    four = json.loads((tmp_path / "four.json").read_text())
    assert four["generated"]["num_sequences"] == 4 and four["dataset"]["num_sequences"] == 4
    kept = tokens[evenly_spaced(8, 4)]
    assert four["generated"]["token_match"]["mean"] == pytest.approx(1 - (kept == 7).mean(), abs=1e-12)


def test_consistency_command_errors_are_one_line(tmp_path, level_checkpoint, capsys):
    np.savez(tmp_path / "images.npz", arr_0=np.zeros((2, 16, 16, 3), np.uint8))
    np.save(tmp_path / "long.npy", np.zeros((2, 20), np.int64))
    base = [f"config={TOY_CONFIG}", *LEVEL_CONFIG, f"experiment.tokenizer_checkpoint={level_checkpoint}"]
    cases = [
        ([str(tmp_path / "images.npz"), *base], 1, "has no 'tokens' array"),
        ([str(tmp_path / "long.npy"), *base], 1, "20 tokens a sequence, but the model has 16"),
        ([str(tmp_path / "missing.npz"), *base], 1, "missing.npz: no such file"),
        ([*base], 2, "expected one TOKENS argument, got 0"),
        ([str(tmp_path / "long.npy"), *base, "--batch-size", "0"], 2, "--batch-size: must be at least 1, got 0"),
    ]
    for argv, status, message in cases:
        assert command(consistency, argv) == status
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_a_call_without_weights_fails_before_reading_the_token_files(tmp_path, capsys):
    """The toy tokenizer has no weights outside its run: one line, and no cache made of the held-out file."""
    write_jsonl(tmp_path / "held_out.jsonl", random_tokens(4, 16, 16), np.arange(4))
    argv = [str(tmp_path / "held_out.jsonl"), f"config={TOY_CONFIG}", *LEVEL_CONFIG, "--reference",
            str(tmp_path / "held_out.jsonl"), f"experiment.output_dir={tmp_path / 'run'}"]
    assert command(consistency, argv) == 1
    assert "the 'toy' tokenizer has no weights" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["held_out.jsonl"]


def test_help_lists_flags_and_config_keys(capsys):
    assert command(consistency, ["--help"]) == 0
    text = capsys.readouterr().out
    assert "--reference" in text and "model.vq_model.model_type=maskgit_vqgan" in text
    assert command(exposure, ["--help"]) == 0
    text = capsys.readouterr().out
    assert "--rates" in text and "experiment.generator_checkpoint=None" in text


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory):
    return write_tiny_weights(tmp_path_factory.mktemp("weights"))


def test_exposure_command_end_to_end(tmp_path, tiny_weights, capsys):
    write_jsonl(tmp_path / "held_out.jsonl", random_tokens(6, 16, 32, seed=4), np.arange(6))
    argv = [f"config={TINY_CONFIG}", f"experiment.generator_checkpoint={tiny_weights[0]}",
            f"experiment.output_dir={tmp_path / 'run'}", "--data", str(tmp_path / "held_out.jsonl"),
            "--rates", "0.5,0.25", "--batch-size", "4"]
    assert command(exposure, argv) == 0
    results = json.loads((tmp_path / "run" / "exposure.json").read_text())
    assert results["rates"] == [0.0, 0.25, 0.5] and results["backbone"] == "rar" and results["num_sequences"] == 6
    accuracies = [entry["accuracy"]["mean"] for entry in results["by_rate"]]
    assert all(0.0 <= a <= 1.0 for a in accuracies) and all(e["nll"]["mean"] > 0 for e in results["by_rate"])
    assert results["slopes"]["accuracy"]["mean"] == pytest.approx(least_squares_slope(results["rates"], accuracies))
    with Image.open(tmp_path / "run" / "exposure.png") as png:
        assert png.format == "PNG"
    assert "accuracy slope" in capsys.readouterr().out

    assert command(exposure, [*argv[:3], "--data", str(tmp_path / "held_out.jsonl"), "--rates", "0,0.5"]) == 2
    assert "rates must be in (0, 1]" in capsys.readouterr().err
    np.save(tmp_path / "unlabelled.npy", random_tokens(2, 16, 32))
    assert command(exposure, [*argv[:3], "--data", str(tmp_path / "unlabelled.npy")]) == 1
    assert "has no class labels" in capsys.readouterr().err


def test_token_files_of_each_format_read_alike(tmp_path):
    tokens, labels = random_tokens(5, seed=6), np.arange(5)
    np.savez(tmp_path / "s.npz", tokens=tokens.astype(np.int32), labels=labels)
    np.save(tmp_path / "s.npy", tokens)
    write_jsonl(tmp_path / "s.jsonl", tokens, labels)
    for name in ("s.npz", "s.npy", "s.jsonl"):
        token_set = load_token_set(str(tmp_path / name), limit=3)
        assert token_set.tokens.dtype == np.int64 and np.array_equal(token_set.tokens, tokens[[0, 1, 3]])
        if name != "s.npy":
            assert np.array_equal(token_set.labels, [0, 1, 3])


def test_held_out_toy_tokens_are_the_tokenizers_tokens_of_fresh_toy_images(tmp_path, level_checkpoint):
    from utils.data.toy import toy_images

    script = load_script("tokenize_toy")
    argv = [f"config={TOY_CONFIG}", *LEVEL_CONFIG, f"experiment.tokenizer_checkpoint={level_checkpoint}",
            "--output", str(tmp_path / "held_out.jsonl"), "--num-images", "7"]
    assert command(script, argv) == 0
    lines = [json.loads(line) for line in (tmp_path / "held_out.jsonl").read_text().splitlines()]
    images, labels = toy_images(7, 10, 16, seed=100)  # dataset.toy.seed 0 + 100
    codebook = level_codebook()
    codebook[7] = codebook[6]
    assert [line["class_id"] for line in lines] == labels.tolist()
    assert [line["tokens"] for line in lines] == level_tokenizer(codebook).encode(images).tolist()
    assert command(script, [*argv, "--seed", "0"]) == 2


def test_compare_prints_both_tables(tmp_path, capsys):
    for name, match in (("ar", 0.9), ("rear", 0.95)):
        folder = tmp_path / name
        folder.mkdir()
        summary = {"mean": match, "first_quarter": 1.0, "middle_half": match, "last_quarter": 0.8}
        part = {"token_match": summary, "codebook_distance": {"mean": 0.5}}
        (folder / "consistency.json").write_text(json.dumps(
            {"generated": part, "dataset": {"token_match": {"mean": 1.0}, "codebook_distance": {"mean": 0.0}},
             "gap": {"token_match": 1.0 - match, "codebook_distance": 0.5}}))
        by_rate = [{"rate": r, "accuracy": {"mean": 0.8 - r}, "nll": {"mean": 1.0 + r}} for r in (0.0, 0.5)]
        slopes = {"mean": -1.0, "first_quarter": -0.5, "middle_half": -1.0, "last_quarter": -1.5}
        (folder / "exposure.json").write_text(json.dumps(
            {"rates": [0.0, 0.5], "by_rate": by_rate, "slopes": {"accuracy": slopes}}))
    assert command(compare, ["--run", f"ar={tmp_path / 'ar'}", "--run", f"rear={tmp_path / 'rear'}"]) == 0
    text = capsys.readouterr().out
    assert "| rear | 0.9500 | 1.0000 | +0.0500 | 1.0000/0.9500/0.8000 | 0.5000 | 0.0000 |" in text
    assert "| ar | 0.8000 | 0.3000 | 1.0000 | 1.5000 | -1.0000 | -0.500/-1.000/-1.500 |" in text
    assert command(compare, ["--run", f"x={tmp_path}"]) == 1
    assert "consistency.json: no such file" in capsys.readouterr().err


def test_toy_ar_is_the_toy_rear_run_without_its_regularisers():
    def leaves(config, prefix=""):
        for key, value in config.items():
            yield from leaves(value, f"{prefix}{key}.") if isinstance(value, dict) else [(f"{prefix}{key}", value)]

    ar, rear = (dict(leaves(to_container(load_config(str(ROOT / "configs" / f"{name}.yaml")))))
                for name in ("ar_toy", "rear_toy"))
    assert {key: (ar[key], rear[key]) for key in ar if ar[key] != rear[key]} == {
        "experiment.name": ("ar_toy", "rear_toy"),
        "experiment.output_dir": ("runs/ar_toy", "runs/rear_toy"),
        "model.generator.perturb_mode": ("none", "switch"),
        "model.generator.transition_alignment": (False, True),
    }


@pytest.mark.slow
def test_toy_ablation_script_runs_end_to_end(tmp_path):
    """scripts_bash/toy_ablation.sh at a tiny size: both runs trained, sampled and measured, every figure in range."""
    out = tmp_path / "ablation"
    overrides = ["training.max_train_steps=6", "training.per_gpu_batch_size=8", "dataset.toy.num_images=200",
                 "sampling.num_samples=20", "model.generator.randomness_anneal_end=6",
                 "lr_scheduler.params.warmup_steps=2"]
    # The script runs `python` from PATH: this interpreter's.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HELD_OUT_IMAGES": "100",
           "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")}
    done = subprocess.run(["bash", str(ROOT / "scripts_bash" / "toy_ablation.sh"), str(out), *overrides], env=env,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    for run_name in ("ar_toy", "rear_toy"):
        results = json.loads((out / run_name / "consistency.json").read_text())
        for part in ("generated", "dataset"):
            assert results[part]["num_sequences"] == (20 if part == "generated" else 100)
            assert 0.0 <= results[part]["token_match"]["mean"] <= 1.0
            assert results[part]["codebook_distance"]["mean"] >= 0.0
        exposure_results = json.loads((out / run_name / "exposure.json").read_text())
        assert exposure_results["rates"] == [0.0, 0.1, 0.3, 0.5]
        for entry in exposure_results["by_rate"]:
            assert 0.0 <= entry["accuracy"]["mean"] <= 1.0 and entry["nll"]["mean"] > 0.0
        assert np.isfinite(exposure_results["slopes"]["accuracy"]["mean"])
        assert (out / run_name / "consistency.png").is_file() and (out / run_name / "exposure.png").is_file()
    table = (out / "table.md").read_text()
    assert "| ar_toy |" in table and "| rear_toy |" in table and "nan" not in table


def test_exposure_of_a_prefix_generator_reads_the_first_tokens_as_training_does(tmp_path, tiny_weights, capsys):
    """Over ReTok (which decodes any first k tokens) a generator of k tokens is measured on the first k tokens of
    longer held-out lines, as training reads them; over a tokenizer without prefixes longer lines are an error."""
    long_tokens = random_tokens(6, 24, 32, seed=5)
    write_jsonl(tmp_path / "long.jsonl", long_tokens, np.arange(6))
    write_jsonl(tmp_path / "first16.jsonl", long_tokens[:, :16], np.arange(6))
    common = [f"config={TINY_CONFIG}", f"experiment.generator_checkpoint={tiny_weights[0]}", "--rates", "0.5"]
    for name, data, tokenizer in (("long", "long.jsonl", "retok"), ("first16", "first16.jsonl", "maskgit_vqgan")):
        argv = [*common, f"model.vq_model.model_type={tokenizer}", f"experiment.output_dir={tmp_path / name}",
                "--data", str(tmp_path / data)]
        assert command(exposure, argv) == 0
    long_result, first16 = (json.loads((tmp_path / name / "exposure.json").read_text())["by_rate"]
                            for name in ("long", "first16"))
    assert long_result == first16
    argv = [*common, f"experiment.output_dir={tmp_path / 'refused'}", "--data", str(tmp_path / "long.jsonl")]
    assert command(exposure, argv) == 1
    assert "24 tokens a sequence, but the model has 16" in capsys.readouterr().err
