import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import FIXTURES, prefixed
from modeling.tokenizers import build_tokenizer
from modeling.tokenizers.titok import RELEASED_CONFIGS, TiTok
from utils.config import validate
from utils.weights import is_model_folder

TITOK = FIXTURES / "titok"
CASES = ["legacy_seed0", "legacy_seed1", "single_stage_seed2"]
# The model.vq_model section of bytedance/1d-tokenizer's configs/infer/TiTok/titok_b64.yaml, unchanged.
TITOK_B64_YAML = {
    "codebook_size": 4096,
    "token_size": 12,
    "use_l2_norm": True,
    "commitment_cost": 0.25,
    "vit_enc_model_size": "base",
    "vit_dec_model_size": "base",
    "vit_enc_patch_size": 16,
    "vit_dec_patch_size": 16,
    "num_latent_tokens": 64,
    "finetune_decoder": True,
}


@pytest.fixture(scope="module")
def fixture():
    return json.loads((TITOK / "titok_tiny.json").read_text()), load_file(str(TITOK / "titok_tiny.safetensors"))


@pytest.fixture(scope="module")
def models(fixture):
    """The fixture's tiny TiTok models, loaded strictly with the original's state dicts."""
    meta, tensors = fixture
    built = {}
    for case in CASES:
        built[case] = TiTok(meta[case]["config"])
        built[case].load_state_dict(prefixed(tensors, f"{case}.weights."), strict=True)
    return built


def config_json(config: dict) -> dict:
    """What the original's save_pretrained writes: its whole config (here with a generator section too)."""
    vq = {k: v for k, v in config.items() if k != "image_size"} | {"commitment_cost": 0.25}
    return {
        "experiment": {"tokenizer_checkpoint": "tokenizer_titok_tiny.bin", "output_dir": "titok_tiny"},
        "model": {"vq_model": vq, "generator": {"model_type": "ViT", "hidden_size": 768}},
        "dataset": {"preprocessing": {"crop_size": config["image_size"]}},
    }


def yaml_config(config: dict, checkpoint=None):
    vq = {k: v for k, v in config.items() if k != "image_size"}
    return validate(
        {
            "experiment": {"tokenizer_checkpoint": checkpoint},
            "model": {"vq_model": {"model_type": "titok", "pretrained_tokenizer_weight": None, **vq},
                      "generator": {"image_seq_len": vq["num_latent_tokens"]}},
            "dataset": {"preprocessing": {"crop_size": config["image_size"]}},
        }
    )


@pytest.mark.parametrize("case", CASES)
def test_encode_matches_original(models, fixture, case):
    _, tensors = fixture
    model, images = models[case], tensors[f"{case}.images"]
    latents = model.encoder(images, model.latent_tokens)
    torch.testing.assert_close(latents, tensors[f"{case}.latents"], atol=1e-5, rtol=0)
    tokens = model.encode(images)
    assert tokens.dtype == torch.long
    assert torch.equal(tokens, tensors[f"{case}.tokens"])
    assert len({tuple(t) for t in tokens.tolist()}) == len(tokens)  # each image its own tokens: the image was read


@pytest.mark.parametrize("case", CASES)
def test_decode_matches_original(models, fixture, case):
    _, tensors = fixture
    for tokens, expected in (("tokens", "decoded"), ("random_tokens", "random_decoded")):
        decoded = models[case].decode_tokens(tensors[f"{case}.{tokens}"])
        # float32 through the pixel decoder's convolutions: 5e-5 apart between CPU kinds (EPYC vs Xeon kernels)
        torch.testing.assert_close(decoded, tensors[f"{case}.{expected}"], atol=2e-4, rtol=0)


@pytest.mark.parametrize("case", CASES)
def test_quantized_states_match_original(models, fixture, case):
    meta, tensors = fixture
    states = models[case].get_quantized_states(tensors[f"{case}.tokens"])
    torch.testing.assert_close(states, tensors[f"{case}.quantized_states"], atol=1e-6, rtol=0)
    if meta[case]["config"]["use_l2_norm"]:
        torch.testing.assert_close(states.norm(dim=-1), torch.ones(states.shape[:2]))


def test_sizes(models, fixture):
    meta, _ = fixture
    for case in CASES:
        c, model = meta[case]["config"], models[case]
        assert (model.codebook_size, model.token_size, model.num_tokens, model.image_size) == (
            c["codebook_size"],
            c["token_size"],
            c["num_latent_tokens"],
            c["image_size"],
        )
    with torch.device("meta"):
        released = TiTok(RELEASED_CONFIGS["titok_l32"])
    sizes = (released.codebook_size, released.token_size, released.num_tokens, released.image_size)
    assert sizes == (4096, 12, 32, 256)


def test_frozen(models):
    model = models["legacy_seed0"]
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    torch.nn.Sequential(model).train()
    assert not model.training


def test_released_state_dicts_match_original():
    """TiTok-L-32, B-64, S-128 (and the single-stage BL-64 VQ-8k) built here have the original's names and shapes."""
    manifest = json.loads((TITOK / "titok_released_manifest.json").read_text())
    assert set(manifest) == {*RELEASED_CONFIGS, "titok_bl64_vq8k"}
    for name, released in manifest.items():
        if name in RELEASED_CONFIGS:
            ours = RELEASED_CONFIGS[name]
            assert {k: v for k, v in released["config"].items() if k in ours} == ours
        with torch.device("meta"):
            shapes = {k: list(v.shape) for k, v in TiTok(released["config"]).state_dict().items()}
        assert shapes == released["state_dict"], name


def test_builder_reads_original_yaml_keys():
    config = yaml_config({**TITOK_B64_YAML, "image_size": 256})
    manifest = json.loads((TITOK / "titok_released_manifest.json").read_text())["titok_b64"]["state_dict"]
    with torch.device("meta"):
        tokenizer = build_tokenizer(config, random_weights=True)
    assert isinstance(tokenizer, TiTok)
    assert (tokenizer.num_tokens, tokenizer.token_size, tokenizer.codebook_size) == (64, 12, 4096)
    assert {k: list(v.shape) for k, v in tokenizer.state_dict().items()} == manifest


def test_builder_loads_tokenizer_checkpoint(models, fixture, tmp_path):
    meta, tensors = fixture
    path = tmp_path / "titok.safetensors"
    save_file(models["legacy_seed0"].state_dict(), str(path))
    tokenizer = build_tokenizer(yaml_config(meta["legacy_seed0"]["config"], str(path)))
    images = tensors["legacy_seed0.images"]
    assert torch.equal(tokenizer.encode(images), tensors["legacy_seed0.tokens"])


@pytest.mark.parametrize("suffix", [".bin", ".pt", ".pth", ".safetensors"])
def test_load_weights_file(models, fixture, tmp_path, suffix):
    meta, tensors = fixture
    path = tmp_path / f"titok{suffix}"
    state = {k: v.contiguous() for k, v in models["legacy_seed1"].state_dict().items()}
    save_file(state, str(path)) if suffix == ".safetensors" else torch.save(state, path)
    loaded = TiTok.from_pretrained(str(path), meta["legacy_seed1"]["config"])
    assert torch.equal(loaded.encode(tensors["legacy_seed1.images"]), tensors["legacy_seed1.tokens"])


@pytest.mark.parametrize("weights", ["model.safetensors", "pytorch_model.bin"])
def test_load_hub_mixin_folder(models, fixture, tmp_path, weights):
    """A folder as PyTorchModelHubMixin writes it (the yucornetto/tokenizer_titok_* repos): config.json + weights."""
    meta, tensors = fixture
    config = meta["single_stage_seed2"]["config"]
    (tmp_path / "config.json").write_text(json.dumps(config_json(config)))
    state = models["single_stage_seed2"].state_dict()
    path = tmp_path / weights
    save_file(state, str(path)) if weights.endswith(".safetensors") else torch.save(state, path)
    images, expected = tensors["single_stage_seed2.images"], tensors["single_stage_seed2.tokens"]
    assert torch.equal(TiTok.from_pretrained(str(tmp_path)).encode(images), expected)
    # through the builder too: a folder is passed on, not taken for a weights file
    assert torch.equal(build_tokenizer(yaml_config(config, str(tmp_path))).encode(images), expected)


def test_folder_without_weights(tmp_path):
    config = config_json({**RELEASED_CONFIGS["titok_s128"], "image_size": 256})
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(FileNotFoundError, match="model.safetensors.*pytorch_model.bin"):
        TiTok.from_pretrained(str(tmp_path))


def test_missing_released_file_names_path_and_hub_repo(tmp_path):
    path = tmp_path / "tokenizer_titok_l32.bin"
    with pytest.raises(FileNotFoundError) as err:
        TiTok.from_pretrained(str(path))
    assert str(path) in str(err.value) and "fun-research/TiTok" in str(err.value)


def test_missing_hub_folder_names_repo():
    assert is_model_folder("yucornetto/tokenizer_titok_l32_imagenet")
    assert not is_model_folder("weights/titok.bin") and not is_model_folder("tokenizer_titok_l32.bin")
    with pytest.raises(FileNotFoundError, match="config.json.*yucornetto/tokenizer_titok_l32_imagenet"):
        TiTok.from_pretrained("yucornetto/tokenizer_titok_l32_imagenet")


def test_unreleased_file_needs_config(tmp_path):
    with pytest.raises(ValueError, match="needs a config"):
        TiTok.from_pretrained(str(tmp_path / "titok.bin"))


def test_wrong_state_dict_lists_keys(models, fixture, tmp_path):
    meta, _ = fixture
    state = dict(models["legacy_seed0"].state_dict())
    state["quantize.embedding.weight"] = torch.zeros(65, 6)
    state["encoder.transformer.0.attn.in_proj.weight"] = state.pop("encoder.transformer.0.attn.in_proj_weight")
    path = tmp_path / "bad.safetensors"
    save_file(state, str(path))
    with pytest.raises(ValueError) as err:
        TiTok.from_pretrained(str(path), meta["legacy_seed0"]["config"])
    for key in ("quantize.embedding.weight", "in_proj_weight", "in_proj.weight"):
        assert key in str(err.value)


def test_bad_tokens_and_images_raise(models):
    model = models["legacy_seed0"]  # codebook 64, 8 tokens, 16x16 images
    with pytest.raises(ValueError, match=r"token 64 .*\[0, 64\)"):
        model.decode_tokens(torch.full((1, 8), 64))
    with pytest.raises(ValueError, match=r"token -1 "):
        model.get_quantized_states(torch.full((1, 8), -1))
    with pytest.raises(ValueError, match="needs 8 tokens"):
        model.decode_tokens(torch.zeros(1, 7, dtype=torch.long))
    with pytest.raises(ValueError, match="integer"):
        model.decode_tokens(torch.zeros(1, 8))
    with pytest.raises(ValueError, match=r"\(B, 3, 16, 16\)"):
        model.encode(torch.rand(1, 3, 32, 32))
    with pytest.raises(ValueError, match=r"\(B, 3, 16, 16\)"):
        model.encode(torch.rand(3, 16, 16))


@pytest.mark.parametrize(
    "change, message",
    [
        ({"vit_enc_model_size": "huge"}, "unknown vit_enc_model_size 'huge'"),
        ({"vit_dec_model_size": None}, "missing.*vit_dec_model_size"),
        ({"quantize_mode": "vae"}, "no discrete tokens"),
        ({"finetune_decoder": False}, "does not decode to images"),
        ({"vit_dec_patch_size": 8}, "pixel decoder's upsampling"),
        ({"vit_enc_patch_size": 12}, "not a multiple of vit_enc_patch_size"),
        ({"pixel_decoder_config": {"hiden_channels": 32}}, "hiden_channels"),
        ({"vit_enc_width": 32}, "unknown TiTok config keys"),
        ({"vit_model_sizes": {"tiny": [16, 2]}}, r"must be \[width, num_layers, num_heads\]"),
    ],
)
def test_bad_config_raises(change, message):
    with pytest.raises(ValueError, match=message):
        TiTok({**RELEASED_CONFIGS["titok_l32"], **change})


def test_stage1_yaml_is_refused():
    """The original's stage-1 config (decoder predicting MaskGIT-VQGAN codes, no pixel decoder) has no images."""
    with pytest.raises(ValueError, match="finetune_decoder"):
        build_tokenizer(yaml_config({**TITOK_B64_YAML, "finetune_decoder": False, "image_size": 256}), random_weights=True)
