"""The gpt1d backbone (GigaTok / ReTok GPT-1D) against numbers computed by the original code
(tests/fixtures/gpt1d/README.md): logits, tokens of the shared sampling loop with GigaTok's guidance schedules and
top-k / top-p, the plain-AR loss of the shared objective; released layouts, loading, and reAR's heads on it."""

import argparse
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import FIXTURES, prefixed
from modeling.tokenizers.base import RandomCodebook
from modeling import build_generator, load_generator
from modeling.backbones.gpt1d import GPT1D, GPT_SIZES
from modeling.backbones.llamagen import ffn_hidden_size
from modeling.objective import Objective
from modeling.sampler import SamplingOptions, generate_tokens, why_not_fast
from utils.config import load_config, validate
from utils.errors import ConfigError, MissingWeightsError, WeightsError

FIXTURE = FIXTURES / "gpt1d"
META = json.loads((FIXTURE / "gpt1d_tiny.json").read_text())
TENSORS = load_file(str(FIXTURE / "gpt1d_tiny.safetensors"))
VARIANTS = sorted(META["variants"])


def project_config(args: dict, **generator):
    """The project config for the original's ModelArgs (the key mapping of modeling/backbones/gpt1d.py)."""
    assert args["resid_dropout_p"] == args["ffn_dropout_p"]  # one key, `dropout`, for both
    g = {
        "backbone": "gpt1d",
        "hidden_size": args["dim"],
        "num_hidden_layers": args["n_layer"],
        "num_attention_heads": args["n_head"],
        "image_seq_len": args["block_size"],
        "condition_num_classes": args["num_classes"],
        "class_label_dropout": args["class_dropout_prob"],
        "dropout": args["resid_dropout_p"],
        "attn_drop": args["attn_dropout_p"],
        "tok_dropout": args["token_dropout_p"],
        "drop_path_rate": args.get("drop_path_rate", 0.0),
        "use_adaLN": args.get("use_adaLN", False),
        "use_simple_adaLN": args.get("use_simple_adaLN", False),
        "use_qk_norm": args.get("use_qk_norm", False),
        **generator,
    }
    return validate({"model": {"generator": g, "vq_model": {"codebook_size": args["vocab_size"]}}})


def load_variant(name: str, **model_args) -> GPT1D:
    model = GPT1D(project_config({**META["variants"][name]["model_args"], **model_args}))
    model.load_state_dict(prefixed(TENSORS, f"{name}.weights."), strict=True)
    return model.eval()


def expected(name: str, key: str) -> torch.Tensor:
    return TENSORS[f"{name}.expected.{key}"]


def close(actual, wanted):
    torch.testing.assert_close(actual, wanted, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------- teacher forcing
@pytest.mark.parametrize("name", VARIANTS)
def test_logits_and_hidden_states_match_original(name):
    model = load_variant(name)
    tokens, classes = TENSORS[f"{name}.input.tokens"], TENSORS[f"{name}.input.class_ids"]
    layers = list(range(len(model.layers)))
    with torch.no_grad():
        logits = model(tokens, classes).logits
        null_logits = model(tokens, torch.full_like(classes, model.null_class)).logits
        tf_logits, hidden = model.hidden_states(tokens, classes, layers)
    assert logits.shape == (4, model.image_seq_len, model.codebook_size)
    close(logits, expected(name, "logits"))
    close(null_logits, expected(name, "logits_null_class"))
    close(tf_logits, expected(name, "logits"))  # all N tokens fed: the first N positions are unchanged
    for k in layers:
        assert hidden[k].shape == (4, model.prefix_len + model.image_seq_len, model.hidden_size)
        close(hidden[k], expected(name, f"hidden.{k}"))


@pytest.mark.parametrize("name", VARIANTS)
def test_next_token_logits_cached_and_uncached_agree_with_forward(name):
    model = load_variant(name)
    tokens, classes = TENSORS[f"{name}.input.tokens"], TENSORS[f"{name}.input.class_ids"]
    rows = torch.cat([classes, torch.full_like(classes, model.null_class)])  # as under classifier-free guidance
    prefix_all = torch.cat([tokens, tokens])
    reference = torch.cat([expected(name, "logits"), expected(name, "logits_null_class")])
    caches = model.new_caches(len(rows))
    with torch.no_grad():
        for t in range(model.image_seq_len):
            close(model.next_token_logits(prefix_all[:, :t], rows, caches), reference[:, t])
            close(model.next_token_logits(prefix_all[:, :t], rows), reference[:, t])
    assert caches[0].length == model.image_seq_len  # the class position and tok_0..tok_{N-2}


# ------------------------------------------------------------------------------------------- sampling
def sampling_arguments(s: dict) -> dict:
    """The original generate()'s settings as the shared loop's arguments: top_k 0 and top_p 1.0 are 'off'."""
    window = s["cfg_schedule_kwargs"]
    return dict(guidance_scale=s["cfg_scale"], guidance_scale_pow=1.0, temperature=s["temperature"],
                top_k=s["top_k"] or None, top_p=s["top_p"], guidance_schedule=s["cfg_schedule"],
                guidance_window=(window.get("window_start", 0.05), window.get("window_end", 1.0)),
                cfg_interval=s["cfg_interval"])


SAMPLING_CASES = [(name, i) for name in VARIANTS for i in range(len(META["variants"][name]["generate_settings"]))]


@pytest.mark.parametrize("name,index", SAMPLING_CASES)
def test_shared_sampling_loop_draws_the_original_tokens(name, index):
    """Every fixture setting through `model.generate`: guidance only above 1, token 0 at the raw scale, GigaTok's
    schedules at t / (N - 1), cfg_interval, temperature, top-k then top-p; no draw before the first token."""
    model = load_variant(name)
    s = META["variants"][name]["generate_settings"][index]
    torch.manual_seed(s["seed"])
    tokens = model.generate(TENSORS[f"{name}.input.class_ids"], **sampling_arguments(s))
    assert torch.equal(tokens, expected(name, f"generate_{index}"))


def test_retok_readme_settings_from_the_config_draw_the_original_tokens():
    """ReTok's README: step schedule from 0.18 at scale 1.5 (fixture setting 1), through the config keys and the
    scripts' call site, which samples gpt1d with the readable loop."""
    s = META["variants"]["plain"]["generate_settings"][1]
    assert (s["cfg_schedule"], s["cfg_scale"], s["cfg_schedule_kwargs"]) == ("step", 1.5, {"window_start": 0.18})
    args = META["variants"]["plain"]["model_args"]
    config = load_config(None, [f"{key}={value}" for key, value in {
        "model.generator.backbone": "gpt1d", "model.generator.hidden_size": args["dim"],
        "model.generator.num_hidden_layers": args["n_layer"], "model.generator.num_attention_heads": args["n_head"],
        "model.generator.image_seq_len": args["block_size"], "model.generator.condition_num_classes": 10,
        "model.vq_model.codebook_size": 32, "model.generator.guidance_scale": 1.5,
        "model.generator.guidance_schedule": "step", "model.generator.guidance_window": "[0.18,1.0]"}.items()])
    model = load_variant("plain")
    options = SamplingOptions.from_config(config)
    assert "rar backbone only" in why_not_fast(model, options)
    torch.manual_seed(s["seed"])
    tokens = generate_tokens(model, TENSORS["plain.input.class_ids"], options)
    assert torch.equal(tokens, expected("plain", "generate_1"))


# ------------------------------------------------------------------------------------------- training step
@pytest.mark.parametrize("run", sorted(META["train"]["runs"]))
def test_objective_reproduces_original_training_loss(run):
    """The shared objective in its plain-AR form: its label dropout draw (first, as the original's), then the
    train-mode forward over [class, tok_0..tok_{N-2}] with the original's dropout draws, then the mean CE."""
    spec = META["train"]["runs"][run]
    args = {**META["variants"]["plain"]["model_args"], **spec["dropouts"]}
    model = load_variant("plain", **spec["dropouts"]).train()
    # no_dropout: the table keeps its null row (class_dropout_prob 0.1) while no label drops (label_dropout 0)
    objective = Objective(project_config({**args, "class_dropout_prob": spec["label_dropout"]}), tokenizer=None)
    tokens, classes = TENSORS["plain.train.tokens"], TENSORS["plain.train.class_ids"]
    torch.manual_seed(META["train"]["seed"])
    assert (torch.rand(classes.shape) < spec["label_dropout"]).tolist() == spec["dropped_labels"]  # what it drops
    torch.manual_seed(META["train"]["seed"])
    parts = objective(model, tokens, classes, step=0)
    assert parts.loss.item() == pytest.approx(spec["loss"], abs=1e-5)


# ------------------------------------------------------------------------------------------- reAR on GPT-1D
def test_rear_heads_attach_and_train():
    args = META["variants"]["plain"]["model_args"]
    config = project_config(args, transition_alignment=True, decode_align_layer_idx=2, projection_dim=16, z_dim=8,
                            perturb_mode="switch")
    torch.manual_seed(0)
    model = build_generator(config)
    assert isinstance(model, GPT1D) and sorted(model.alignment_heads) == ["decode_align_mlp", "encode_align_mlp"]
    assert model.state_dict()["decode_align_mlp.0.weight"].shape == (16, 32)
    output = model.eval()(TENSORS["plain.input.tokens"], TENSORS["plain.input.class_ids"])
    assert output.encode_z.shape == (4, 17, 8)  # every position, the last token's reading position included
    close(output.logits, model(TENSORS["plain.input.tokens"], TENSORS["plain.input.class_ids"]).logits)
    parts = Objective(config, RandomCodebook(32, 8))(model.train(), TENSORS["plain.train.tokens"],
                                                     TENSORS["plain.train.class_ids"], step=0)
    assert parts.encode_alignment.abs().item() > 1e-4 and parts.decode_alignment.abs().item() > 1e-4
    parts.loss.backward()
    assert model.encode_align_mlp[0].weight.grad.abs().sum() > 0


# ------------------------------------------------------------------------------------------- init and sizes
@pytest.mark.parametrize("name", VARIANTS)
def test_initial_weights_equal_the_originals_for_the_same_seed(name):
    """The modules are built and initialised in the original's order, so a seed gives the same weights."""
    variant = META["variants"][name]
    torch.manual_seed(variant["init_seed"])
    model = GPT1D(project_config(variant["model_args"]))
    state = model.state_dict()
    assert sorted(state) == sorted(META["init_sums"][name])
    for key, (total, squares) in META["init_sums"][name].items():
        assert state[key].double().sum().item() == pytest.approx(total, rel=1e-9, abs=1e-12), key
        assert state[key].double().pow(2).sum().item() == pytest.approx(squares, rel=1e-9, abs=1e-12), key
    assert torch.count_nonzero(model.output.weight) == 0  # the model starts uniform


@pytest.mark.parametrize("size", ["GPT-B", "GPT-XL", "GPT-XXL"])
def test_state_dict_names_and_shapes_match_released_sizes(size):
    released = json.loads((FIXTURE / "released_state_dicts.json").read_text())
    layers, heads, dim = GPT_SIZES[size]
    config = validate({"model": {
        "generator": {"backbone": "gpt1d", "gpt_model": size, "hidden_size": dim, "num_hidden_layers": layers,
                      "num_attention_heads": heads, "image_seq_len": 256, "condition_num_classes": 1000},
        "vq_model": {"codebook_size": 16384}}})
    with torch.device("meta"):
        model = build_generator(config)
    assert {k: list(v.shape) for k, v in model.state_dict().items()} == released[size]
    assert model.num_parameters() == released[f"{size} params"]
    assert ffn_hidden_size(1280) == 3584


def test_gpt_model_name_must_agree_with_the_sizes():
    args = META["variants"]["plain"]["model_args"]
    with pytest.raises(ConfigError, match="gpt_model' GPT-XL is num_hidden_layers=36"):
        GPT1D(project_config(args, gpt_model="GPT-XL"))
    with pytest.raises(ConfigError, match="'GPT-XS', not one of GPT-B"):
        GPT1D(project_config(args, gpt_model="GPT-XS"))
    with pytest.raises(ConfigError, match="exclude each other"):
        GPT1D(project_config(args, use_adaLN=True, use_simple_adaLN=True))


# ------------------------------------------------------------------------------------------- ids and loading
def test_check_ids_names_the_problem():
    model = load_variant("plain")
    tokens = TENSORS["plain.input.tokens"]
    with pytest.raises(ValueError, match="class id out of range"):
        model(tokens, torch.tensor([0, 1, 2, 11]))
    with pytest.raises(ValueError, match="token id out of range"):
        model(tokens.clamp(max=31) + 1, torch.tensor([0, 1, 2, 3]))
    no_null_row = GPT1D(project_config({**META["variants"]["plain"]["model_args"], "class_dropout_prob": 0.0})).eval()
    assert no_null_row.cls_embedding.embedding_table.num_embeddings == 10
    with pytest.raises(ValueError, match="null class.*class_label_dropout > 0"):
        no_null_row(tokens, torch.tensor([0, 1, 2, 10]))


@pytest.mark.parametrize("wrapping", ["model", "module", "state_dict", None])
def test_released_training_checkpoints_load(tmp_path, wrapping):
    """What the original training script saves: the run's argparse.Namespace rides along with the weights, and with
    --ema an "ema" copy, which the original sampler ignores in favour of "model"."""
    state = load_variant("plain").state_dict()
    checkpoint = state if wrapping is None else {
        wrapping: state, "optimizer": {"state": {}, "param_groups": []}, "steps": 5,
        "args": argparse.Namespace(gpt_model="GPT-B", lr=1e-4, ema=True, vq_ckpt=None),
        "ema": {k: torch.zeros_like(v) for k, v in state.items()},
    }
    torch.save(checkpoint, tmp_path / "GPT_tiny.pt")
    loaded = load_generator(project_config(META["variants"]["plain"]["model_args"]), str(tmp_path / "GPT_tiny.pt"))
    assert isinstance(loaded, GPT1D) and not loaded.training
    with torch.no_grad():
        logits = loaded(TENSORS["plain.input.tokens"], TENSORS["plain.input.class_ids"]).logits
    close(logits, expected("plain", "logits"))


def test_strict_loading_and_where_the_released_file_is(tmp_path):
    config = project_config(META["variants"]["plain"]["model_args"])
    state = dict(load_variant("plain").state_dict())
    save_file(state, str(tmp_path / "gpt.safetensors"))
    GPT1D.from_pretrained(config, str(tmp_path / "gpt.safetensors"))
    state["output.weight"] = torch.zeros(33, 32)
    state["layers.0.attention.wqkv.bias"] = torch.zeros(96)
    torch.save({"model": state}, tmp_path / "bad.pt")
    with pytest.raises(WeightsError, match=r"unexpected key: layers.0.attention.wqkv.bias.*shape mismatch: output"):
        GPT1D.from_pretrained(config, str(tmp_path / "bad.pt"))
    with pytest.raises(MissingWeightsError, match=r"GPT_XL256_e300_VQ_SB.pt.*drive.google.com.*3.1 GB"):
        load_generator(config, "GPT_XL256_e300_VQ_SB.pt")
