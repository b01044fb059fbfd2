"""ReTok against the original code (zfu006/ReTok @ ffaa8a7) at tiny sizes; see tests/fixtures/retok/README.md."""

import argparse
import json
import math

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file

from conftest import FIXTURES
from modeling.tokenizers import build_tokenizer
from modeling.tokenizers.retok import RELEASED_CONFIG, ReTok, config_from_vq_model
from utils.config import validate
from utils.weights import load_checked

FIXTURE = FIXTURES / "retok"
META = json.loads((FIXTURE / "retok_tiny.json").read_text())
TINY = {**META["config"], **META["patched_sizes"]}  # the original's init_args + the sizes patched into its code
SEEDS = (0, 1)

# configs/vq/VQ_SB256.yaml `model.init_args`, verbatim.
ORIGINAL_YAML_INIT_ARGS = """
codebook_size: 16384
codebook_embed_dim: 8
codebook_l2_norm: True
codebook_show_usage: True
commit_loss_beta: 0.25
entropy_loss_ratio: 0.0
encoder_ch_mult: [1, 1, 2, 2, 4]
decoder_ch_mult: [1, 1, 2, 2, 4]
model_size: null
encoder_size: "small"
decoder_size: "base"
num_latent_tokens: 256
z_channels: 256
dropout_p: 0.0
multi_level_query_init: True
last_level_2d_query_init: False
multi_level_2d_query_init:  False
adaptive_gn: True
d2s_up: True
rot: True
use_attn: False
fea_rec_loss_type: "mse"
fea_rec_loss_weight: 1.0
distill_depth: 3
"""


def fixture_weights(manifest: dict, seed: int) -> dict:
    """The harness's recipe for the tiny weights (the fixture stores a fingerprint of them, not the weights)."""
    generator = torch.Generator().manual_seed(seed)
    weights = {}
    for name, shape in manifest.items():
        noise = torch.randn(shape, generator=generator)
        if len(shape) >= 2:
            weights[name] = noise / math.sqrt(math.prod(shape[1:]))
        elif name.endswith("bias"):
            weights[name] = 0.1 * noise
        else:
            weights[name] = 1.0 + 0.1 * noise
    # Decoded images in about [-1, 1], like real ones.
    for name in ("decoder.conv_out.weight", "decoder.conv_out.bias"):
        weights[name] = 0.2 * weights[name]
    return weights


@pytest.fixture(scope="module")
def expected():
    return load_file(str(FIXTURE / "retok_tiny.safetensors"))


@pytest.fixture(scope="module")
def weights():
    return {seed: fixture_weights(META["tiny_manifest"], seed) for seed in SEEDS}


@pytest.fixture(scope="module")
def tiny(weights):
    """The tiny tokenizers of both seeds, loaded strictly from weights named as the original's state dict."""
    return {seed: load_checked(ReTok(TINY), weights[seed], f"seed {seed}") for seed in SEEDS}


@pytest.mark.parametrize("seed", SEEDS)
def test_weights_are_the_harness_weights(weights, seed):
    total = sum(t.double().sum() for t in weights[seed].values())
    assert float(total) == pytest.approx(META["fingerprints"][str(seed)], rel=1e-12, abs=0)


@pytest.mark.parametrize("seed", SEEDS)
def test_encode_matches_original(tiny, expected, seed):
    images = expected[f"seed{seed}.images"]
    features = tiny[seed].encode_features(images)
    torch.testing.assert_close(features, expected[f"seed{seed}.features"], atol=1e-5, rtol=0)
    tokens = tiny[seed].encode(images)
    assert tokens.dtype == torch.long and tokens.shape == (2, 256)
    assert torch.equal(tokens, expected[f"seed{seed}.tokens"])


@pytest.mark.parametrize("seed", SEEDS)
def test_decode_of_all_tokens_and_of_prefixes_matches_original(tiny, expected, seed):
    tokens = expected[f"seed{seed}.tokens"]
    assert 256 in META["prefixes"][str(seed)] and min(META["prefixes"][str(seed)]) < 256
    for k in META["prefixes"][str(seed)]:
        raw = expected[f"seed{seed}.decoded_{k}"]
        torch.testing.assert_close(tiny[seed].decode_raw(tokens[:, :k]), raw, atol=1e-5, rtol=0)
        decoded = tiny[seed].decode_tokens(tokens[:, :k])
        torch.testing.assert_close(decoded, ((raw + 1) / 2).clamp(0, 1), atol=1e-5, rtol=0)
        assert decoded.shape == (2, 3, 64, 64)


@pytest.mark.parametrize("seed", SEEDS)
def test_quantized_states_match_original(tiny, expected, seed):
    states = tiny[seed].get_quantized_states(expected[f"seed{seed}.tokens"])
    torch.testing.assert_close(states, expected[f"seed{seed}.quantized_states"], atol=1e-6, rtol=0)
    torch.testing.assert_close(states.norm(dim=-1), torch.ones(2, 256))


def test_sizes(tiny):
    model = tiny[0]
    assert (model.codebook_size, model.token_size, model.num_tokens, model.image_size) == (512, 8, 256, 64)


def test_released_architecture_matches_original_state_dict():
    manifest = json.loads((FIXTURE / "released_manifest.json").read_text())["VQ_SB256"]
    with torch.device("meta"):
        model = ReTok()
    assert {name: list(t.shape) for name, t in model.state_dict().items()} == manifest
    assert (model.codebook_size, model.token_size, model.num_tokens, model.image_size) == (16384, 8, 256, 256)


def test_builder_reads_the_original_yaml_keys():
    vq_model = {"model_type": "retok", "token_size": 8, "pretrained_tokenizer_weight": None}
    vq_model |= OmegaConf.to_container(OmegaConf.create(ORIGINAL_YAML_INIT_ARGS))
    config = validate({"model": {"vq_model": vq_model}})
    fixed_in_code = ("image_size", "ch", "vit_sizes")
    assert config_from_vq_model(config.model.vq_model) == {
        k: v for k, v in RELEASED_CONFIG.items() if k not in fixed_in_code
    }
    with torch.device("meta"):
        tokenizer = build_tokenizer(config, random_weights=True)
    manifest = json.loads((FIXTURE / "released_manifest.json").read_text())["VQ_SB256"]
    assert isinstance(tokenizer, ReTok)
    assert {name: list(t.shape) for name, t in tokenizer.state_dict().items()} == manifest


def test_builder_names_where_the_released_file_is_published():
    vq_model = {"model_type": "retok", "pretrained_tokenizer_weight": "VQ_SB256_e250.pt"}
    config = validate({"model": {"vq_model": vq_model}})
    with pytest.raises(FileNotFoundError, match=r"VQ_SB256_e250\.pt.*drive\.google\.com"):
        build_tokenizer(config)


def save_as(path, state):
    state = {k: v.contiguous() for k, v in state.items()}
    save_file(state, str(path)) if path.suffix == ".safetensors" else torch.save(state, path)


@pytest.mark.parametrize("suffix", [".safetensors", ".bin", ".pt"])
def test_loads_plain_state_dicts(weights, expected, tmp_path, suffix):
    path = tmp_path / f"retok{suffix}"
    save_as(path, weights[1])
    loaded = ReTok.from_pretrained(str(path), TINY)
    assert torch.equal(loaded.encode(expected["seed1.images"]), expected["seed1.tokens"])


@pytest.mark.parametrize("with_ema", [True, False])
def test_loads_the_released_training_checkpoint_layout(weights, expected, tmp_path, with_ema):
    # The layout of the original's vq_train.py checkpoints; the evaluation scripts take "ema" when it is there.
    checkpoint = {
        "model": weights[0] if with_ema else weights[1],
        "optimizer": {"state": {}, "param_groups": [{"lr": 1e-4}]},
        "discriminator": {"conv.weight": torch.zeros(2, 2)},
        "optimizer_disc": {"state": {}, "param_groups": []},
        "steps": 250,
        "args": argparse.Namespace(image_size=256, vq_model="VQVitModelPlus"),
    }
    if with_ema:
        checkpoint["ema"] = weights[1]
    path = tmp_path / "VQ_SB256_e250.pt"
    torch.save(checkpoint, path)
    loaded = ReTok.from_pretrained(str(path), TINY)
    assert torch.equal(loaded.encode(expected["seed1.images"]), expected["seed1.tokens"])


def test_missing_file_names_it_and_where_it_is_published(tmp_path):
    path = tmp_path / "VQ_SB256_e250.pt"
    with pytest.raises(FileNotFoundError) as err:
        ReTok.from_pretrained(str(path))
    assert str(path) in str(err.value) and "drive.google.com" in str(err.value)


def test_misfitting_weights_list_the_keys(weights, tmp_path):
    state = dict(weights[0])
    state["quantize.embedding.weight"] = torch.zeros(513, 8)
    del state["s1to2decoder.distill_mlp.4.bias"]
    path = tmp_path / "bad.safetensors"
    save_as(path, state)
    with pytest.raises(ValueError, match=r"(?s)missing key: s1to2decoder\.distill_mlp\.4\.bias.*quantize\.embedding"):
        ReTok.from_pretrained(str(path), TINY)


def test_bad_tokens_raise(tiny):
    model = tiny[0]
    with pytest.raises(ValueError, match=r"token 512 .*\[0, 512\)"):
        model.decode_tokens(torch.full((1, 16), 512))
    with pytest.raises(ValueError, match=r"token -1 "):
        model.get_quantized_states(torch.full((1, 16), -1))
    with pytest.raises(ValueError, match="1 to 256 tokens per image, got 257"):
        model.decode_tokens(torch.zeros(1, 257, dtype=torch.long))
    with pytest.raises(ValueError, match="got 0"):
        model.decode_tokens(torch.zeros(1, 0, dtype=torch.long))
    with pytest.raises(ValueError, match="integer tensor"):
        model.decode_tokens(torch.zeros(1, 16))


def test_bad_images_raise(tiny):
    with pytest.raises(ValueError, match=r"shape \(B, 3, 64, 64\)"):
        tiny[0].encode(torch.rand(1, 3, 32, 32))
    with pytest.raises(ValueError, match="floats"):
        tiny[0].encode(torch.zeros(1, 3, 64, 64, dtype=torch.uint8))


def test_config_errors_name_the_key():
    with pytest.raises(ValueError, match="use_attn=False"):
        ReTok({**TINY, "use_attn": True})
    with pytest.raises(ValueError, match="encoder_sise"):
        ReTok({**TINY, "encoder_sise": "small"})
    with pytest.raises(ValueError, match="decoder_size 'huge'"):
        ReTok({**TINY, "decoder_size": "huge"})


def test_frozen(tiny):
    model = tiny[0]
    torch.nn.Sequential(model).train()
    assert not model.training and not any(p.requires_grad for p in model.parameters())
