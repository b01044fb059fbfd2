"""The alitok_ar backbone against outputs of the original (ali-vilab/alitok modeling/ar.py; see
fixtures/alitok_ar/README.md): logits, tokens of the shared sampling loop, the plain-AR loss of the shared objective;
its released state-dict layout, its loading paths, and reAR's heads on it."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import FIXTURES, prefixed
from modeling.tokenizers.base import RandomCodebook
from modeling import build_generator, load_generator
from modeling.backbones.alitok_ar import AliTokAR, rotary_table
from modeling.objective import Objective
from utils.config import validate
from utils.errors import ConfigError, MissingWeightsError, WeightsError

FIXTURE_DIR = FIXTURES / "alitok_ar"
META = json.loads((FIXTURE_DIR / "alitok_ar_tiny.json").read_text())
TENSORS = load_file(str(FIXTURE_DIR / "alitok_ar_tiny.safetensors"))
# The generator keys of the original's configs/alitok_{b,l,xl}.yaml (hidden, layers, heads).
RELEASED_SIZES = {"alitok_b": (768, 24, 16), "alitok_l": (1024, 24, 16), "alitok_xl": (1280, 32, 16)}


def assert_close(actual, expected):
    """Parity with the original: the fixtures were computed in float32 on a CPU. Another CPU's kernels (AVX2 vs
    AVX-512, EPYC vs Xeon) sum in another order: 1.4e-5 apart at the last block here; a real bug is O(0.1)."""
    torch.testing.assert_close(actual, expected, atol=1e-4, rtol=1e-4)


def tiny_config(**generator):
    config = json.loads(json.dumps(META["generator_config"]))
    config["model"]["generator"].update(backbone="alitok_ar", **generator)
    return validate(config)


@pytest.fixture
def model():
    model = AliTokAR(tiny_config())
    model.load_state_dict(prefixed(TENSORS, "generator."), strict=True)
    return model.eval()


def released_config(name, **generator):
    hidden, layers, heads = RELEASED_SIZES[name]
    generator = dict(backbone="alitok_ar", hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                     image_seq_len=273, condition_num_classes=1000, **generator)
    return {"model": {"vq_model": {"codebook_size": 4096, "token_size": 32, "num_latent_tokens": 273},
                      "generator": generator}}


# --------------------------------------------------------------------------------------- teacher-forced parity
def test_logits_match_original(model):
    logits = model(TENSORS["input.tokens"], TENSORS["input.class_ids"]).logits
    assert logits.shape == (2, 273, 32)
    assert_close(logits, TENSORS["expected.logits"])
    null = torch.full_like(TENSORS["input.class_ids"], model.null_class)
    assert_close(model(TENSORS["input.tokens"], null).logits, TENSORS["expected.logits_null_class"])


def test_hidden_states_match_original(model):
    tokens, classes = TENSORS["input.tokens"], TENSORS["input.class_ids"]
    logits, hidden = model.hidden_states(tokens, classes, [0, 2])
    assert sorted(hidden) == [0, 2] and hidden[0].shape == (2, 274, 32)
    assert_close(hidden[0], TENSORS["expected.hidden_0"])
    assert_close(hidden[2], TENSORS["expected.hidden_2"])
    assert torch.equal(logits, model(tokens, classes).logits)
    with pytest.raises(ValueError, match="layer 3 is outside the 3 blocks"):
        model.hidden_states(tokens, classes, [3])


# --------------------------------------------------------------------------------------- decoding
def test_cached_next_token_logits_follow_forward(model):
    """Cached steps over all 273 tokens (the prefix and the 2-D grid positions) give the teacher-forced logits; the
    uncached recomputation agrees at the class, prefix/grid boundary and last positions."""
    tokens, classes = TENSORS["input.tokens"], TENSORS["input.class_ids"]
    expected = TENSORS["expected.logits"]
    caches = model.new_caches(len(tokens))
    with torch.no_grad():
        cached = torch.stack([model.next_token_logits(tokens[:, :i], classes, caches) for i in range(273)], dim=1)
        assert_close(cached, expected)
        for i in (0, 1, 17, 18, 272):
            assert_close(model.next_token_logits(tokens[:, :i], classes), expected[:, i])


# Each setting as the original ran it (the last without its cache), and one more without the cache: the original drew
# the same tokens both ways in all four.
SAMPLING_CASES = [(i, s["kv_cache"]) for i, s in enumerate(META["generate_settings"])] + [(1, False)]


@pytest.mark.parametrize("index,kv_cache", SAMPLING_CASES)
def test_shared_sampling_loop_draws_the_original_tokens(model, index, kv_cache):
    """`model.generate` (the loop every backbone shares) with AliTok's settings: RAR's leading uniform draw and
    cosine-power schedule, no top-k / top-p."""
    s = META["generate_settings"][index]
    torch.manual_seed(s["seed"])
    tokens = model.generate(TENSORS["sample_input.class_ids"], s["guidance_scale"], s["guidance_scale_pow"],
                            s["temperature"], kv_cache=kv_cache)
    assert torch.equal(tokens, TENSORS[f"expected.generate_{index}"])


# --------------------------------------------------------------------------------------- training step
@pytest.mark.parametrize("index", range(len(META["train_settings"])))
def test_objective_reproduces_original_training_loss(index):
    """The shared objective in its plain-AR form: its label dropout draw (one uniform a sample), then the train-mode
    forward whose dropouts draw in the original's order, then the mean cross-entropy over all B·N tokens."""
    s = META["train_settings"][index]
    config = tiny_config(dropout=s["dropout"], attn_drop=s["attn_drop"], tok_dropout=s["tok_dropout"],
                         class_label_dropout=s["class_label_dropout"])
    model = AliTokAR(config)
    model.load_state_dict(prefixed(TENSORS, "generator."), strict=True)
    tokens, classes = TENSORS["train_input.tokens"], TENSORS["train_input.class_ids"]
    torch.manual_seed(s["seed"])
    assert (torch.rand(classes.shape) < s["class_label_dropout"]).tolist() == s["dropped_labels"]  # what it drops
    torch.manual_seed(s["seed"])
    parts = Objective(config, tokenizer=None)(model.train(), tokens, classes, step=0)
    assert parts.loss.item() == pytest.approx(s["loss"], abs=1e-5)
    assert parts.accuracy.item() == pytest.approx(s["correct_tokens"], abs=1e-6)
    assert parts.encode_alignment.item() == parts.decode_alignment.item() == 0.0


# --------------------------------------------------------------------------------------- reAR on AliTok's AR
def test_rear_heads_attach_and_train(tmp_path):
    config = tiny_config(transition_alignment=True, decode_align_layer_idx=2, projection_dim=16, z_dim=8,
                         perturb_mode="switch")
    torch.manual_seed(0)
    model = build_generator(config)
    assert isinstance(model, AliTokAR) and model.alignment_heads == {"encode_align_mlp": 0, "decode_align_mlp": 2}
    state = model.state_dict()
    assert state["encode_align_mlp.0.weight"].shape == (16, 32) and state["decode_align_mlp.4.weight"].shape == (8, 16)
    backbone = {k: v for k, v in state.items() if "align_mlp" not in k}
    assert set(backbone) == set(AliTokAR(tiny_config()).state_dict())  # the heads are the only addition
    parts = Objective(config, RandomCodebook(32, 8))(model.train(), TENSORS["train_input.tokens"],
                                                     TENSORS["train_input.class_ids"], step=0)
    assert parts.encode_alignment.abs().item() > 1e-4 and parts.decode_alignment.abs().item() > 1e-4
    parts.loss.backward()
    assert model.encode_align_mlp[0].weight.grad.abs().sum() > 0 and model.blocks[0].attn.qkv.weight.grad is not None
    # A released backbone (no heads) starts a reAR run: the heads stay as initialised, the rest loads strictly.
    save_file(backbone, str(tmp_path / "alitok_tiny.safetensors"))
    fresh = build_generator(config)
    heads_before = fresh.decode_align_mlp[0].weight.clone()
    fresh.load_weights_file(str(tmp_path / "alitok_tiny.safetensors"), "init", new_heads=True)
    assert torch.equal(fresh.output.weight, state["output.weight"])
    assert torch.equal(fresh.decode_align_mlp[0].weight, heads_before)


# --------------------------------------------------------------------------------------- positions, init, layout
def test_rotary_table_layout():
    d = 16
    table = rotary_table(d)
    assert table.shape == (1 + 17 + 256, d // 2, 2)
    assert not table[0].any()  # the class position: query and key zeroed
    theta = [10000 ** (-2 * k / d) for k in range(d // 2)]
    phi = [10000 ** (-2 * k / (d // 2)) for k in range(d // 4)]
    for j in (0, 5, 16):  # prefix token j: 1-D angle j·θ_k
        torch.testing.assert_close(table[1 + j, :, 0], torch.tensor([math.cos(j * th) for th in theta]))
    r, c = 3, 11  # grid token (r, c): rows then columns, both counted from 17
    row = table[1 + 17 + 16 * r + c]
    torch.testing.assert_close(row[: d // 4, 1], torch.tensor([math.sin((17 + r) * f) for f in phi]))
    torch.testing.assert_close(row[d // 4 :, 1], torch.tensor([math.sin((17 + c) * f) for f in phi]))


def test_initialisation_matches_original():
    torch.manual_seed(0)
    state = AliTokAR(tiny_config()).state_dict()
    expected = META["init_seed0_sum_and_sumsq"]
    assert sorted(state) == sorted(expected)
    for name, (total, squares) in expected.items():
        tensor = state[name].double()
        assert tensor.sum().item() == pytest.approx(total, abs=1e-9), name
        assert tensor.square().sum().item() == pytest.approx(squares, rel=1e-9, abs=1e-12), name
    assert not state["output.weight"].any()


@pytest.mark.parametrize("name", sorted(RELEASED_SIZES))
def test_state_dict_matches_released_layout(name):
    manifest = json.loads((FIXTURE_DIR / "alitok_ar_state_dict_manifest.json").read_text())[name]
    with torch.device("meta"):
        model = build_generator(validate(released_config(name)))
    assert {k: list(v.shape) for k, v in model.state_dict().items()} == manifest


def test_alitok_b_has_177m_parameters_and_rear_adds_the_heads():
    with torch.device("meta"):
        plain = AliTokAR(released_config("alitok_b"))
        rear = AliTokAR(released_config("alitok_b", transition_alignment=True, decode_align_layer_idx=18))
    assert plain.num_parameters() == 177_048_064  # the AliTok / reAR papers' "177M"
    assert rear.num_parameters(exclude_alignment=True) == 177_048_064
    # two heads 768 -> 2048 -> 2048 -> 32 (AliTok's codebook width)
    assert rear.num_parameters() - 177_048_064 == 2 * (768 * 2048 + 2048 + 2048 * 2048 + 2048 + 2048 * 32 + 32)


# --------------------------------------------------------------------------------------- loading and errors
@pytest.mark.parametrize("suffix", [".bin", ".safetensors"])
def test_released_layout_loads_strictly(tmp_path, model, suffix):
    """The released files are plain state dicts (`alitok_b.bin`); `load_generator` reads them weights-only."""
    path = tmp_path / f"alitok_tiny{suffix}"
    state = model.state_dict()
    save_file(state, str(path)) if suffix == ".safetensors" else torch.save(state, path)
    loaded = load_generator(tiny_config(), str(path))
    assert isinstance(loaded, AliTokAR) and not loaded.training
    assert_close(loaded(TENSORS["input.tokens"], TENSORS["input.class_ids"]).logits, TENSORS["expected.logits"])


def test_missing_released_file_says_where_it_is_published():
    link = r"https://drive\.google\.com/file/d/1PNVX9wqePxRjuOKpt4iw6CpIYLlyJWlX"
    with pytest.raises(MissingWeightsError, match=rf"alitok_b\.bin.*{link}.*experiment\.generator_checkpoint=PATH"):
        load_generator(tiny_config(), "alitok_b.bin")


def test_checkpoint_of_another_size_names_the_key(tmp_path, model):
    state = dict(model.state_dict())
    state["output.weight"] = torch.zeros(33, 32)
    del state["norm.weight"]
    torch.save(state, tmp_path / "bad.bin")
    with pytest.raises(WeightsError, match=r"missing key: norm.weight.*shape mismatch: output.weight: checkpoint \(33"):
        AliTokAR.from_pretrained(tiny_config(), str(tmp_path / "bad.bin"))


def test_out_of_range_ids_are_errors(model):
    tokens = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(ValueError, match=r"class id out of range: got \[11, 11\], expected \[0, 10\]"):
        model(tokens, torch.tensor([11]))
    with pytest.raises(ValueError, match=r"token id out of range: got \[0, 32\], expected \[0, 32\)"):
        model(torch.tensor([[0, 32]]), torch.tensor([1]))
    with pytest.raises(ValueError, match="274 tokens > image_seq_len 273"):
        model.check_ids(torch.zeros(1, 274, dtype=torch.long), torch.tensor([1]))


def test_sizes_the_rotary_layout_cannot_hold_are_config_errors():
    with pytest.raises(ConfigError, match="image_seq_len 274 > 273"):
        AliTokAR(tiny_config(image_seq_len=274))
    with pytest.raises(ConfigError, match="must be a multiple of 4"):
        AliTokAR(tiny_config(num_attention_heads=16))
