"""The generator against the golden fixture (outputs of the original implementation) and the manifest."""

import json

import pytest
import torch

from modeling.rear import ReAR
from modeling.sampler import cfg_scale_at, filter_logits
from conftest import FIXTURES
from utils.config import load_config

CONFIGS = FIXTURES.parent.parent / "configs"


def test_logits_match_original(golden_generator, golden):
    _, t = golden
    out = golden_generator(t["input.tokens"], t["input.class_ids"])
    assert out.logits.shape == (3, 16, 32)
    torch.testing.assert_close(out.logits, t["expected.logits"], atol=2e-5, rtol=1e-5)


def test_null_class_logits_match_original(golden_generator, golden):
    _, t = golden
    null = torch.full_like(t["input.class_ids"], golden_generator.null_class)
    torch.testing.assert_close(golden_generator(t["input.tokens"], null).logits, t["expected.logits_null_class"], atol=2e-5, rtol=1e-5)


def test_alignment_heads_match_original(golden_generator, golden):
    _, t = golden
    out = golden_generator(t["input.tokens"], t["input.class_ids"])
    torch.testing.assert_close(out.encode_z, t["expected.encode_z"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.decode_z, t["expected.decode_z"], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("index", [0, 1, 2])
@pytest.mark.parametrize("kv_cache", [True, False])
def test_generate_reproduces_original_tokens(golden_generator, golden, index, kv_cache):
    meta, t = golden
    settings = meta["generate_settings"][index]
    torch.manual_seed(settings["seed"])
    tokens = golden_generator.generate(
        t["input.class_ids"],
        guidance_scale=settings["guidance_scale"],
        guidance_scale_pow=settings["guidance_scale_pow"],
        temperature=settings["temperature"],
        kv_cache=kv_cache,
    )
    assert tokens.dtype == torch.long
    assert torch.equal(tokens, t[f"expected.generate_{index}"])


def test_kv_cache_equals_recomputation_on_many_seeds(golden_generator):
    classes = torch.arange(10)
    for seed in range(5):
        torch.manual_seed(seed)
        cached = golden_generator.generate(classes, 3.0, 1.0, 1.0, kv_cache=True)
        torch.manual_seed(seed)
        plain = golden_generator.generate(classes, 3.0, 1.0, 1.0, kv_cache=False)
        assert torch.equal(cached, plain)


def test_top_k_one_is_greedy(golden_generator):
    classes = torch.tensor([0, 5])
    tokens = golden_generator.generate(classes, 0.0, 1.0, 1.0, top_k=1)
    # greedy: every token is the argmax of the teacher-forced logits of its own prefix
    logits = golden_generator(tokens, classes).logits
    assert torch.equal(tokens, logits.argmax(-1))


def test_filter_logits():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    assert torch.isinf(filter_logits(logits, top_k=2)).tolist() == [[True, False, False, True]]
    probs = logits.softmax(-1)[0]  # 0.644 for 3.0, 0.237 for 2.0
    assert probs[1] > 0.6
    assert torch.isinf(filter_logits(logits, top_p=0.6)).tolist() == [[True, False, True, True]]
    assert torch.isinf(filter_logits(logits, top_p=0.7)).tolist() == [[True, False, False, True]]
    assert torch.equal(filter_logits(logits), logits)
    with pytest.raises(ValueError, match="top_p"):
        filter_logits(logits, top_p=0.0)


def test_cfg_scale_schedule():
    # s = (1 - cos(pi (t/N)^pow)) / 2 ; cfg = (g - 1) s + 1
    assert cfg_scale_at(0, 256, 22.0, 2.75).item() == pytest.approx(1.0)
    assert cfg_scale_at(128, 256, 22.0, 1.0).item() == pytest.approx(11.5, rel=1e-6)
    assert cfg_scale_at(128, 256, 22.0, 2.75).item() == pytest.approx(21 * (1 - torch.cos(torch.tensor(torch.pi * 0.5**2.75)).item()) / 2 + 1, rel=1e-6)
    assert cfg_scale_at(255, 256, 15.0, 2.5).item() == pytest.approx(14 * (1 - torch.cos(torch.tensor(torch.pi * (255 / 256) ** 2.5)).item()) / 2 + 1, rel=1e-6)
    assert cfg_scale_at(256, 256, 15.0, 2.5).item() == pytest.approx(15.0)


@pytest.mark.parametrize("name", ["rear_s", "rear_b", "rear_l"])
def test_state_dict_matches_released_manifest(name):
    manifest = json.loads((FIXTURES / "state_dict_manifest.json").read_text())[name]
    with torch.device("meta"):
        model = ReAR(load_config(str(CONFIGS / f"{name}.yaml")))
    assert {k: list(v.shape) for k, v in model.state_dict().items()} == manifest


def test_rar_checkpoint_loads_with_alignment_off(tmp_path, golden_generator):
    from safetensors.torch import save_file

    rar_state = {k: v for k, v in golden_generator.state_dict().items() if "align_mlp" not in k}
    save_file(rar_state, str(tmp_path / "rar.safetensors"))
    config = load_config(str(CONFIGS / "rear_tiny.yaml"), ["model.generator.transition_alignment=False"])
    model = ReAR.from_pretrained(config, str(tmp_path / "rar.safetensors"))
    assert not hasattr(model, "encode_align_mlp")
    t = torch.randint(0, 32, (2, 16))
    c = torch.tensor([1, 2])
    torch.testing.assert_close(model(t, c).logits, golden_generator(t, c).logits)
    with pytest.raises(ValueError, match="missing key: encode_align_mlp.0.weight"):
        ReAR.from_pretrained(load_config(str(CONFIGS / "rear_tiny.yaml")), str(tmp_path / "rar.safetensors"))


def test_wrong_shape_checkpoint_names_the_key(tmp_path, golden_generator):
    state = dict(golden_generator.state_dict())
    state["lm_head.weight"] = torch.zeros(33, 64)
    torch.save(state, tmp_path / "bad.bin")
    with pytest.raises(ValueError, match=r"shape mismatch: lm_head.weight: checkpoint \(33, 64\) vs model \(32, 64\)"):
        ReAR.from_pretrained(load_config(str(CONFIGS / "rear_tiny.yaml")), str(tmp_path / "bad.bin"))


def test_missing_released_checkpoint_says_where_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    config = load_config(str(CONFIGS / "rear_tiny.yaml"))
    with pytest.raises(FileNotFoundError, match=r"reAR-S.safetensors.*qyoo/reAR"):
        ReAR.from_pretrained(config, str(tmp_path / "reAR-S.safetensors"))


def test_out_of_range_ids_are_errors(golden_generator):
    with pytest.raises(ValueError, match="token id out of range"):
        golden_generator(torch.full((1, 16), 32), torch.tensor([0]))
    with pytest.raises(ValueError, match="class id out of range"):
        golden_generator(torch.zeros(1, 16, dtype=torch.long), torch.tensor([11]))
    with pytest.raises(ValueError, match="class id out of range"):
        golden_generator.generate(torch.tensor([-1]), 0.0, 1.0)


def test_init_follows_adaln_zero():
    model = ReAR(load_config(str(CONFIGS / "rear_tiny.yaml")))
    assert torch.count_nonzero(model.blocks[0].adaLN_modulation[-1].weight) == 0
    assert torch.count_nonzero(model.adaln_before_head.adaLN_modulation[-1].bias) == 0
    assert torch.count_nonzero(model.cls_token) == 0
    assert 0.015 < model.pos_embed.std().item() < 0.025
    assert 0.015 < model.lm_head.weight.std().item() < 0.025


@pytest.mark.parametrize("overrides, width", [([], 16), (["model.generator.z_dim=8"], 8), (["model.vq_model.token_size=12"], 12)])
def test_alignment_width_follows_tokenizer_unless_set(overrides, width):
    model = ReAR(load_config(str(CONFIGS / "rear_tiny.yaml"), overrides))
    assert model.encode_align_mlp[4].out_features == width
    assert model.decode_align_mlp[4].out_features == width
    assert model.encode_align_mlp[0].out_features == 128  # projection_dim
