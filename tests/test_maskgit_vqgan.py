import json

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import save_file

from conftest import FIXTURES, prefixed
from modeling.tokenizers import build_tokenizer
from modeling.tokenizers.maskgit_vqgan import RELEASED_CONFIG, MaskGITVQGAN, config_from_state_dict
from utils.config import validate


@pytest.fixture(scope="module")
def tiny(golden):
    meta, tensors = golden
    model = MaskGITVQGAN(meta["vqgan_config"])
    model.load_state_dict(prefixed(tensors, "vqgan."), strict=True)
    return model


def test_encode_matches_original_tokens(tiny, golden):
    _, tensors = golden
    tokens = tiny.encode(tensors["vqgan_input.images"])
    assert tokens.dtype == torch.long
    assert torch.equal(tokens, tensors["vqgan_expected.tokens"])


def test_decode_matches_original(tiny, golden):
    _, tensors = golden
    decoded = tiny.decode_tokens(tensors["vqgan_expected.tokens"])
    torch.testing.assert_close(decoded, tensors["vqgan_expected.decoded"], atol=1e-5, rtol=0)
    assert decoded.min() >= 0 and decoded.max() <= 1


def test_quantized_states_match_original(tiny, golden):
    _, tensors = golden
    states = tiny.get_quantized_states(tensors["vqgan_expected.tokens"])
    torch.testing.assert_close(states, tensors["vqgan_expected.quantized_states"], atol=0, rtol=0)


def test_sizes(tiny):
    assert (tiny.codebook_size, tiny.token_size, tiny.downsample_factor) == (32, 16, 4)
    released = MaskGITVQGAN()
    assert (released.codebook_size, released.token_size, released.downsample_factor) == (1024, 256, 16)


def test_frozen(tiny):
    assert not tiny.training and not any(p.requires_grad for p in tiny.parameters())
    torch.nn.Sequential(tiny).train()
    assert not tiny.training


def test_state_dict_matches_released_manifest():
    manifest = json.loads((FIXTURES / "state_dict_manifest.json").read_text())["maskgit_vqgan_f16_256"]
    shapes = {name: list(t.shape) for name, t in MaskGITVQGAN().state_dict().items()}
    assert shapes == manifest


@pytest.mark.parametrize("suffix", [".bin", ".safetensors"])
def test_load_round_trip(tiny, golden, tmp_path, suffix):
    meta, tensors = golden
    path = tmp_path / f"vqgan{suffix}"
    state = {k: v.contiguous() for k, v in tiny.state_dict().items()}
    torch.save(state, path) if suffix == ".bin" else save_file(state, str(path))
    loaded = MaskGITVQGAN.from_pretrained(str(path), meta["vqgan_config"])
    assert torch.equal(loaded.encode(tensors["vqgan_input.images"]), tensors["vqgan_expected.tokens"])


def test_missing_file_names_path_and_hub_repo(tmp_path):
    path = tmp_path / "maskgit-vqgan-imagenet-f16-256.bin"
    with pytest.raises(FileNotFoundError) as err:
        MaskGITVQGAN.from_pretrained(str(path))
    assert str(path) in str(err.value) and "fun-research/TiTok" in str(err.value)


def test_wrong_shape_lists_key(tiny, golden, tmp_path):
    meta, _ = golden
    state = dict(tiny.state_dict())
    state["quantize.embedding.weight"] = torch.zeros(33, 16)
    path = tmp_path / "bad.safetensors"
    save_file(state, str(path))
    with pytest.raises(ValueError, match="quantize.embedding.weight"):
        MaskGITVQGAN.from_pretrained(str(path), meta["vqgan_config"])


def test_bad_tokens_raise(tiny):
    with pytest.raises(ValueError, match=r"token 32 .*\[0, 32\)"):
        tiny.decode_tokens(torch.full((1, 64), 32))
    with pytest.raises(ValueError, match=r"token -1 "):
        tiny.get_quantized_states(torch.full((1, 64), -1))
    with pytest.raises(ValueError, match="square"):
        tiny.decode_tokens(torch.zeros(1, 63, dtype=torch.long))


def test_bad_images_raise(tiny):
    with pytest.raises(ValueError, match="shape"):
        tiny.encode(torch.rand(1, 1, 32, 32))
    with pytest.raises(ValueError, match="shape"):
        tiny.encode(torch.rand(3, 32, 32))
    with pytest.raises(ValueError, match="multiples of 4"):
        tiny.encode(torch.rand(1, 3, 30, 32))


def test_unknown_config_key_raises():
    with pytest.raises(ValueError, match="hiden_channels"):
        MaskGITVQGAN({"hiden_channels": 64})


def test_factory_unknown_model_type():
    config = validate({"model": {"vq_model": {"model_type": "no_such_tokenizer"}}})
    with pytest.raises(ValueError, match="no_such_tokenizer.*maskgit_vqgan"):
        build_tokenizer(config)


def test_no_tokenizer_weights_is_an_error_unless_released_or_random():
    from utils.errors import MissingWeightsError

    titok = validate({"model": {"vq_model": {"model_type": "titok"}}})
    with pytest.raises(MissingWeightsError, match="no weights for the 'titok' tokenizer: set experiment.tokenizer_checkpoint"):
        build_tokenizer(titok)
    with pytest.raises(MissingWeightsError, match="maskgit-vqgan-imagenet-f16-256.bin"):  # its released file, offline
        build_tokenizer(validate({"model": {"vq_model": {"model_type": "maskgit_vqgan"}}}))


def test_factory_loads_tokenizer_checkpoint(tmp_path):
    path = tmp_path / "vq.safetensors"
    state = MaskGITVQGAN().state_dict()
    save_file(state, str(path))
    config = validate(OmegaConf.create({"experiment": {"tokenizer_checkpoint": str(path)}}))
    tokenizer = build_tokenizer(config)
    assert isinstance(tokenizer, MaskGITVQGAN)
    assert torch.equal(tokenizer.quantize.embedding.weight, state["quantize.embedding.weight"])


def test_from_pretrained_reads_architecture_from_weights(tiny, golden, tmp_path):
    meta, tensors = golden
    assert config_from_state_dict(MaskGITVQGAN().state_dict()) == {
        k: v for k, v in RELEASED_CONFIG.items() if k not in ("resolution", "dropout")
    }
    path = tmp_path / "tiny.safetensors"
    save_file(tiny.state_dict(), str(path))
    loaded = MaskGITVQGAN.from_pretrained(str(path))  # no config: the golden tiny sizes come from the shapes
    assert (loaded.codebook_size, loaded.token_size, loaded.downsample_factor) == (32, 16, 4)
    assert torch.equal(loaded.encode(tensors["vqgan_input.images"]), tensors["vqgan_expected.tokens"])
