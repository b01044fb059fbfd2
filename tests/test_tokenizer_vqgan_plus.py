"""VQGAN+ against what MaskBit's own ConvVQModel computes (tests/fixtures/vqgan_plus/README.md)."""

import json

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file

from conftest import FIXTURES, prefixed
from modeling.tokenizers import TOKENIZERS, build_tokenizer
from modeling.tokenizers.vqgan_plus import RELEASED_CONFIG, VQGANPlus, config_from_state_dict
from utils.config import REGISTERED_CHOICES, canonical_choice, validate

FIXTURE = FIXTURES / "vqgan_plus"
META = json.loads((FIXTURE / "fixture.json").read_text())
SEEDS = sorted(META["cases"])

# The `model.vq_model` section of the reAR release's configs/rear_vqplus.yaml, verbatim.
REAR_VQPLUS_YAML = """
model_type: "vqplus"
quantizer_type: "lookup"
codebook_size: 4096
token_size: 64
commitment_cost: 0.25
entropy_loss_weight: 0.0
entropy_loss_temperature: 0.01
entropy_gamma: 1.0
num_channels: 3  # rgb
hidden_channels: 128
channel_mult: [1,1,2,2,4]
num_resolutions: 5
num_res_blocks: 2
sample_with_conv: True
"""


def architecture(case):
    """The fixture's MaskBit config without the keys a frozen tokenizer does not read."""
    return {k: v for k, v in META["cases"][case].items() if k in RELEASED_CONFIG}


def original_state(tensors):
    """The original's weights (stored as bf16, which holds them exactly) in float32."""
    return {k: v.float() for k, v in prefixed(tensors, "model.").items()}


@pytest.fixture(scope="module", params=SEEDS)
def case(request):
    tensors = load_file(str(FIXTURE / f"{request.param}.safetensors"))
    model = VQGANPlus(architecture(request.param), image_size=META["image_size"])
    model.load_state_dict(original_state(tensors), strict=True)
    return request.param, model, tensors


def test_encode_matches_original_tokens(case):
    _, model, tensors = case
    tokens = model.encode(tensors["input.images"])
    assert tokens.dtype == torch.long
    assert torch.equal(tokens, tensors["expected.tokens"])


def test_decode_matches_original(case):
    _, model, tensors = case
    raw = tensors["expected.decoded"]  # the original's decode_tokens, before the [0, 1] clamp its callers apply
    decoded = model.decode_tokens(tensors["expected.tokens"])
    torch.testing.assert_close(decoded, raw.clamp(0, 1), atol=1e-5, rtol=0)
    inside = (raw > 0) & (raw < 1)
    assert inside.float().mean() > 0.9  # the clamp hides little: most pixels are compared unclamped


def test_quantized_states_match_original_lookup(case):
    _, model, tensors = case
    states = model.get_quantized_states(tensors["expected.tokens"])
    assert states.shape == (*tensors["expected.tokens"].shape, model.token_size)
    torch.testing.assert_close(states, tensors["expected.quantized_states"], atol=1e-6, rtol=0)


def test_architecture_read_off_the_weights(case):
    name, _, tensors = case
    assert config_from_state_dict(original_state(tensors)) == architecture(name)


@pytest.mark.parametrize("suffix", [".bin", ".pt", ".safetensors"])
def test_weights_files_load_strictly(case, tmp_path, suffix):
    _, _, tensors = case
    path = tmp_path / f"vqgan_plus{suffix}"
    state = original_state(tensors)
    save_file(state, str(path)) if suffix == ".safetensors" else torch.save(state, path)
    loaded = VQGANPlus.from_pretrained(str(path), image_size=META["image_size"])  # sizes from the shapes
    assert torch.equal(loaded.encode(tensors["input.images"]), tensors["expected.tokens"])


def test_released_architecture_matches_the_original_state_dict():
    manifest = json.loads((FIXTURE / "state_dict_manifest.json").read_text())
    with torch.device("meta"):
        twelve_bit = VQGANPlus()
        paper = VQGANPlus({"codebook_size": 1024, "token_size": 256})
    assert {k: list(v.shape) for k, v in twelve_bit.state_dict().items()} == manifest["vqgan_plus_12bit"]
    assert {k: list(v.shape) for k, v in paper.state_dict().items()} == manifest["vqgan_plus_paper"]
    assert (twelve_bit.codebook_size, twelve_bit.token_size, twelve_bit.num_tokens, twelve_bit.image_size) == (
        4096, 64, 256, 256
    )


def test_builder_takes_the_rear_vqplus_yaml_keys_unchanged():
    config = validate({"model": {"vq_model": OmegaConf.create(REAR_VQPLUS_YAML)}})
    assert REGISTERED_CHOICES["model.vq_model.model_type"]["vqplus"] == "vqgan_plus"  # the original's name
    with torch.device("meta"):  # released size, no weights needed: only the architecture is compared
        tokenizer = TOKENIZERS[canonical_choice(config, "model.vq_model.model_type")](config, None)
    manifest = json.loads((FIXTURE / "state_dict_manifest.json").read_text())["vqgan_plus_12bit"]
    assert {k: list(v.shape) for k, v in tokenizer.state_dict().items()} == manifest


def test_build_tokenizer_loads_the_checkpoint(tmp_path):
    tensors = load_file(str(FIXTURE / "seed0.safetensors"))
    path = tmp_path / "vqplus.bin"
    torch.save(original_state(tensors), path)  # as reAR's get_vqplus_tokenizer reads it: a plain torch state dict
    vq_model = {"model_type": "vqplus", **architecture("seed0")}
    config = validate(
        {
            "experiment": {"tokenizer_checkpoint": str(path)},
            "model": {"vq_model": vq_model},
            "dataset": {"preprocessing": {"crop_size": META["image_size"]}},
        }
    )
    tokenizer = build_tokenizer(config)
    assert isinstance(tokenizer, VQGANPlus) and tokenizer.num_tokens == tensors["expected.tokens"].shape[1]
    assert torch.equal(tokenizer.encode(tensors["input.images"]), tensors["expected.tokens"])


def test_builder_refuses_lookup_free():
    config = validate({"model": {"vq_model": {"model_type": "vqgan_plus", "quantizer_type": "lookup-free"}}})
    with pytest.raises(ValueError, match="quantizer_type' is 'lookup-free': VQGAN\\+ needs 'lookup'"):
        TOKENIZERS["vqgan_plus"](config, None)


def test_missing_file_names_path_and_hub_repo(tmp_path):
    path = tmp_path / "vqgan_plus_12bit.bin"
    with pytest.raises(FileNotFoundError) as err:
        VQGANPlus.from_pretrained(str(path))
    assert str(path) in str(err.value) and "markweber/vqgan_plus_12bit" in str(err.value)


def test_wrong_shape_lists_key(case, tmp_path):
    name, _, tensors = case
    state = original_state(tensors)
    state["quantize.embedding.weight"] = torch.zeros(65, 8)
    path = tmp_path / "bad.safetensors"
    save_file(state, str(path))
    with pytest.raises(ValueError, match="quantize.embedding.weight"):
        VQGANPlus.from_pretrained(str(path), architecture(name), META["image_size"])


def test_frozen(case):
    _, model, _ = case
    torch.nn.Sequential(model).train()
    assert not model.training and not any(p.requires_grad for p in model.parameters())


def test_bad_input_raises(case):
    _, model, _ = case
    side = META["image_size"] // model.downsample_factor
    with pytest.raises(ValueError, match=r"token 64 .*\[0, 64\)"):
        model.decode_tokens(torch.full((1, side * side), 64))
    with pytest.raises(ValueError, match="token -1 "):
        model.get_quantized_states(torch.full((1, 4), -1))
    with pytest.raises(ValueError, match="square"):
        model.decode_tokens(torch.zeros(1, side * side - 1, dtype=torch.long))
    with pytest.raises(ValueError, match="shape"):
        model.encode(torch.rand(1, 1, 32, 32))
    with pytest.raises(ValueError, match=f"multiples of {model.downsample_factor}"):
        model.encode(torch.rand(1, 3, 31, 32))


def test_bad_config_raises():
    with pytest.raises(ValueError, match="hiden_channels"):
        VQGANPlus({"hiden_channels": 64})
    with pytest.raises(ValueError, match=r"num_resolutions \(4\) must equal len\(channel_mult\) \(5\)"):
        VQGANPlus({"num_resolutions": 4})
