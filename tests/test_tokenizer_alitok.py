"""AliTok against what the original (ali-vilab/alitok, modeling/alitok.py) computes: tests/fixtures/alitok/README.md."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import FIXTURES, prefixed
from modeling.tokenizers import build_tokenizer
from modeling.tokenizers.alitok import AliTok, AliTokConfig
from utils.config import validate

ALITOK = FIXTURES / "alitok"
SEEDS = ["seed0", "seed1"]
DRIVE_LINK = "https://drive.google.com/file/d/1Rir4QEJ_HTvZkhcnw9MTfWlSFemcGVIW"


@pytest.fixture(scope="module", params=SEEDS)
def case(request):
    """(tiny AliTok with the original's random weights, the fixture's tensors) for one seed."""
    config = AliTokConfig(**json.loads((ALITOK / "alitok.json").read_text())["configs"][request.param])
    tensors = load_file(str(ALITOK / f"{request.param}.safetensors"))
    model = AliTok(config)
    model.load_state_dict(prefixed(tensors, "model."), strict=True)
    return model, tensors


@pytest.fixture(scope="module")
def released_on_meta():
    """The released architecture without memory: names and shapes only."""
    with torch.device("meta"):
        return AliTok()


def test_encode_matches_original_tokens(case):
    model, t = case
    latents = model.encoder(t["input.images"], model.latent_tokens)
    torch.testing.assert_close(latents, t["expected.latents"], atol=1e-6, rtol=0)
    tokens = model.encode(t["input.images"])
    assert tokens.dtype == torch.long and tokens.shape == (2, model.num_tokens)
    assert torch.equal(tokens, t["expected.tokens"])


@pytest.mark.parametrize("tokens, expected", [("expected.tokens", "expected.decoded"),
                                              ("input.sampled_tokens", "expected.decoded_sampled")])
def test_decode_matches_original(case, tokens, expected):
    model, t = case
    decoded = model.decode_tokens(t[tokens])
    assert decoded.shape == (2, 3, model.image_size, model.image_size)
    torch.testing.assert_close(decoded, t[expected], atol=1e-5, rtol=0)


def test_quantized_states_match_original(case):
    model, t = case
    states = model.get_quantized_states(t["expected.tokens"])
    assert states.shape == (2, model.num_tokens, model.token_size)
    torch.testing.assert_close(states, t["expected.quantized_states"], atol=1e-6, rtol=0)


def test_sizes(case, released_on_meta):
    model, _ = case
    assert (model.codebook_size, model.token_size) == (64, 8)
    assert (model.num_tokens, model.image_size) in {(19, 16), (41, 36)}
    released = released_on_meta
    sizes = (released.codebook_size, released.token_size, released.num_tokens, released.image_size)
    assert sizes == (4096, 32, 273, 256)
    assert (released.config.num_prefix_tokens, released.config.grid_size) == (17, 16)


def test_frozen(case):
    model, _ = case
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    torch.nn.Sequential(model).train()
    assert not model.training


def test_state_dict_matches_released_manifest(released_on_meta):
    manifest = json.loads((ALITOK / "state_dict_manifest.json").read_text())
    assert {name: list(t.shape) for name, t in released_on_meta.state_dict().items()} == manifest


def save(state, path, wrap=False):
    state = {k: v.contiguous() for k, v in state.items()}
    if path.suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save(training_checkpoint(state) if wrap else state, path)


def training_checkpoint(state):
    """The layout of the original's train_tokenizer.py checkpoints (last.pth, vae_step_*.pth)."""
    scaler = {"scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2000}
    return {"restart_time": 0, "start_step": 7, "log_dir": "vae_test", "model_state": state,
            "criterion_state": {"discriminator.weight": torch.ones(2)}, "scaler_state": scaler}


@pytest.mark.parametrize("name, wrap", [("AliTok.pth", False), ("tok.bin", False), ("tok.pt", False),
                                        ("tok.safetensors", False), ("last.pth", True)])
def test_load_round_trip(case, tmp_path, name, wrap):
    model, t = case
    save(model.state_dict(), tmp_path / name, wrap)
    loaded = AliTok.from_pretrained(str(tmp_path / name), model.config)
    assert torch.equal(loaded.encode(t["input.images"]), t["expected.tokens"])
    torch.testing.assert_close(loaded.decode_tokens(t["expected.tokens"]), t["expected.decoded"], atol=1e-5, rtol=0)


def test_wrong_weights_list_the_keys(case, tmp_path):
    model, _ = case
    state = dict(model.state_dict())
    state["quantize.embedding.weight"] = torch.zeros(65, 8)
    del state["decoder.conv_out.bias"]
    save(state, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match=r"(?s)missing key: decoder.conv_out.bias.*quantize.embedding.weight"):
        AliTok.from_pretrained(str(tmp_path / "bad.pth"), model.config)


def test_missing_file_names_path_and_google_drive(tmp_path):
    path = tmp_path / "weights" / "AliTok.pth"
    with pytest.raises(FileNotFoundError) as err:
        AliTok.from_pretrained(str(path))
    assert str(path) in str(err.value) and DRIVE_LINK in str(err.value)


def alitok_config(**vq_model):
    """A project config with the `vq_model` section of the original's configs/alitok_b.yaml."""
    vq = {"model_type": "alitok", "codebook_size": 4096, "token_size": 32, "num_latent_tokens": 273} | vq_model
    return validate({"model": {"vq_model": vq, "generator": {"image_seq_len": vq["num_latent_tokens"]}}})


def test_builder_from_original_yaml_keys():
    with torch.device("meta"):
        tokenizer = build_tokenizer(alitok_config(pretrained_tokenizer_weight=None), random_weights=True)
    assert isinstance(tokenizer, AliTok) and tokenizer.config == AliTokConfig()


def test_builder_loads_the_checkpoint_strictly(case, tmp_path):
    """The builder hands the checkpoint to strict loading: tiny weights do not fit the released architecture."""
    model, _ = case
    save(model.state_dict(), tmp_path / "tiny.pth")
    with torch.device("meta"), pytest.raises(ValueError, match=r"AliTok weights .*tiny.pth does not fit"):
        build_tokenizer(alitok_config(pretrained_tokenizer_weight=str(tmp_path / "tiny.pth")))


def test_builder_missing_released_file_says_where_it_is_published():
    with pytest.raises(FileNotFoundError, match="AliTok.pth") as err:
        build_tokenizer(alitok_config(pretrained_tokenizer_weight="AliTok.pth"))
    assert DRIVE_LINK in str(err.value)


def test_bad_tokens_raise(case):
    model, t = case
    n = model.num_tokens
    with pytest.raises(ValueError, match=r"token 64 .*\[0, 64\)"):
        model.decode_tokens(torch.full((1, n), 64))
    with pytest.raises(ValueError, match=r"token -1 "):
        model.get_quantized_states(torch.full((1, n), -1))
    with pytest.raises(ValueError, match=f"all {n} tokens.*got {n - 1}"):
        model.decode_tokens(t["expected.tokens"][:, 1:])
    with pytest.raises(ValueError, match="integer tensor"):
        model.get_quantized_states(t["expected.tokens"].float())


def test_bad_images_raise(case):
    model, _ = case
    size = model.image_size
    with pytest.raises(ValueError, match="shape"):
        model.encode(torch.rand(1, 3, size + model.config.patch_size, size))
    with pytest.raises(ValueError, match="shape"):
        model.encode(torch.rand(3, size, size))
    with pytest.raises(ValueError, match="floats"):
        model.encode(torch.zeros(1, 3, size, size, dtype=torch.uint8))


@pytest.mark.parametrize("change, message", [({"num_latent_tokens": 255}, "at least the 256 patches"),
                                             ({"patch_size": 15}, "multiple of patch_size"),
                                             ({"decoder_heads": 5}, "decoder_width .* decoder_heads")])
def test_bad_config_raises(change, message):
    with pytest.raises(ValueError, match=message):
        AliTokConfig(**change)
