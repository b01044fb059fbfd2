"""reAR's objective (modeling/objective.py): the regularisers and the loss against the golden fixture and their
definitions, and one training step against the original's own step, random stream included."""

import json

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from conftest import FIXTURES, prefixed
from modeling.rear import ReAR
from utils.config import load_config, validate

from modeling.objective import (
    Objective,
    alignment_loss,
    drop_class_labels,
    noisy_context,
    random_orders,
    randomness_ratio,
    rear_loss,
)


def test_loss_matches_original(golden, golden_generator):
    _, t = golden
    out = golden_generator(t["input.tokens"], t["input.class_ids"])
    parts = rear_loss(out, t["input.tokens"], t["loss_input.features"], t["loss_input.noise_mask"].bool(), 1.0)
    torch.testing.assert_close(parts.ce, t["expected.ar_loss"][0], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(parts.encode_alignment + parts.decode_alignment, t["expected.proj_loss"][0], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(parts.loss, t["expected.loss"][0], atol=1e-6, rtol=1e-6)
    assert parts.accuracy.item() == pytest.approx((out.logits.argmax(-1) == t["input.tokens"]).float().mean().item())


def test_alignment_weight_scales_only_the_alignment_terms(golden, golden_generator):
    _, t = golden
    out = golden_generator(t["input.tokens"], t["input.class_ids"])
    parts = rear_loss(out, t["input.tokens"], t["loss_input.features"], None, 0.5)
    expected = parts.ce + 0.5 * (parts.encode_alignment + parts.decode_alignment)
    torch.testing.assert_close(parts.loss, expected)


@pytest.mark.parametrize(
    "step, expected", [(-5, 1.0), (0, 1.0), (25, 0.75), (50, 0.5), (100, 0.0), (1000, 0.0)]
)
def test_randomness_ratio(step, expected):
    assert randomness_ratio(step, 0, 100) == pytest.approx(expected)


def test_randomness_ratio_with_late_window():
    assert randomness_ratio(125_000, 125_000, 187_500) == 1.0
    assert randomness_ratio(156_250, 125_000, 187_500) == pytest.approx(0.5)
    assert randomness_ratio(187_500, 125_000, 187_500) == 0.0


@pytest.mark.parametrize("ratio", [1.0, 0.5, 0.1])
def test_noise_rate_matches_schedule(ratio):
    # each token is corrupted with probability u * r, u ~ U(0,1): expected rate r / 2
    torch.manual_seed(0)
    tokens = torch.randint(0, 1024, (4000, 256))
    noisy, mask = noisy_context(tokens, ratio, "mask", 1024)
    assert mask.float().mean().item() == pytest.approx(ratio / 2, abs=0.01)
    assert torch.equal(noisy[mask], torch.full_like(noisy[mask], 1024))
    assert torch.equal(noisy[~mask], tokens[~mask])
    # per-sample rates are u*r, u ~ U(0,1): Var = r^2/12 plus the binomial spread E[p(1-p)]/N
    per_sample = mask.float().mean(1)
    expected_var = ratio**2 / 12 + (ratio / 2 - ratio**2 / 3) / 256
    assert per_sample.var().item() == pytest.approx(expected_var, rel=0.1)


def test_switch_noise_draws_uniform_tokens():
    torch.manual_seed(0)
    tokens = torch.zeros(2000, 256, dtype=torch.long)
    noisy, mask = noisy_context(tokens, 1.0, "switch", 16)
    replaced = noisy[mask]
    assert replaced.min() >= 0 and replaced.max() < 16
    counts = torch.bincount(replaced, minlength=16).float()
    assert (counts / counts.sum() - 1 / 16).abs().max() < 0.005


def test_no_noise_after_the_window_but_the_same_draws():
    tokens = torch.randint(0, 32, (8, 16))
    for mode in ("switch", "mask"):
        torch.manual_seed(0)
        noisy, mask = noisy_context(tokens, 0.0, mode, 32)
        after_zero = torch.rand(3)
        assert torch.equal(noisy, tokens) and not mask.any()
        torch.manual_seed(0)
        noisy_context(tokens, 0.7, mode, 32)
        assert torch.equal(torch.rand(3), after_zero)  # r = 0 draws what r > 0 draws, as the original does
    with pytest.raises(ValueError, match="mode"):
        noisy_context(tokens, 1.0, "swap", 32)


def test_alignment_loss_definition():
    h = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]])
    e = torch.tensor([[[3.0, 0.0], [1.0, 0.0]]])
    # cos = [1, 0]: mean of -cos = -0.5; with the first position masked out: (0 + 0) / 2
    assert alignment_loss(h, e).item() == pytest.approx(-0.5)
    assert alignment_loss(h, e, torch.tensor([[0.0, 1.0]])).item() == pytest.approx(0.0)


def test_random_orders_are_permutations_and_raster_after_window():
    torch.manual_seed(0)
    orders = random_orders(64, 16, 1.0)
    assert torch.equal(orders.sort(dim=1).values, torch.arange(16).expand(64, 16))
    assert (orders != torch.arange(16)).any(dim=1).float().mean() > 0.9
    assert torch.equal(random_orders(64, 16, 0.0), torch.arange(16).expand(64, 16))
    half = random_orders(4000, 16, 0.5)
    shuffled = (half != torch.arange(16)).any(dim=1).float().mean().item()
    assert shuffled == pytest.approx(0.5, abs=0.03)


def test_random_order_forward_permutes_positions_consistently(golden, golden_generator):
    _, t = golden
    model = golden_generator
    tokens, classes = t["input.tokens"], t["input.class_ids"]
    raster = torch.arange(16).expand(3, 16)
    torch.testing.assert_close(model(tokens, classes, orders=raster).logits, t["expected.logits"], atol=2e-5, rtol=1e-5)
    # Reversing the order is a different model of the same tokens: the logits change.
    reverse = raster.flip(1)
    assert not torch.allclose(model(tokens, classes, orders=reverse).logits, t["expected.logits"], atol=1e-3)


def test_class_label_dropout_rate():
    torch.manual_seed(0)
    labels = torch.randint(0, 1000, (100_000,))
    dropped = drop_class_labels(labels, 0.1, 1000)
    assert (dropped == 1000).float().mean().item() == pytest.approx(0.1, abs=0.005)
    assert torch.equal(dropped[dropped != 1000], labels[dropped != 1000])


TINY = ["model.generator.hidden_size=32", "model.generator.num_hidden_layers=2", "model.generator.num_attention_heads=2",
        "model.generator.intermediate_size=64", "model.generator.image_seq_len=16", "model.generator.projection_dim=16",
        "model.generator.decode_align_layer_idx=1", "model.vq_model.codebook_size=32", "model.vq_model.token_size=8",
        "model.generator.transition_alignment=True", "model.generator.perturb_mode=switch"]


def objective_setup(*overrides):
    from modeling.tokenizers.toy import PatchKMeansTokenizer

    config = load_config(None, TINY + ["model.vq_model.token_size=48", "model.generator.randomness_anneal_end=10",
                                       "model.generator.dropout=0.0", "model.generator.attn_drop=0.0", *overrides])
    torch.manual_seed(0)
    model = ReAR(config).train()
    tokenizer = PatchKMeansTokenizer(32, 4, 16)
    tokenizer.codebook.data = torch.randn(32, 48)
    tokens, class_ids = torch.randint(0, 32, (4, 16)), torch.tensor([0, 3, 5, 9])
    return config, model, tokenizer, tokens, class_ids


def test_objective_without_noise_is_the_plain_loss():
    from modeling.objective import rear_loss
    
    config, model, tokenizer, tokens, class_ids = objective_setup(
        "model.generator.perturb_mode=none", "model.generator.class_label_dropout=0.0")
    parts = Objective(config, tokenizer)(model, tokens, class_ids, 0)
    expected = rear_loss(model(tokens, class_ids), tokens, tokenizer.codebook[tokens], None, 1.0)
    assert torch.equal(parts.loss, expected.loss) and torch.equal(parts.encode_alignment, expected.encode_alignment)


def test_objective_noise_follows_r_of_step():
    
    config, model, tokenizer, tokens, class_ids = objective_setup("model.generator.class_label_dropout=0.0")
    clean = Objective(config, tokenizer)(model, tokens, class_ids, 10)  # r(10) = 0: no noise (but the draws)
    torch.manual_seed(1)
    noisy = Objective(config, tokenizer)(model, tokens, class_ids, 0)
    assert not torch.equal(clean.loss, noisy.loss)
    config_none, *_ = objective_setup("model.generator.class_label_dropout=0.0", "model.generator.perturb_mode=none")
    torch.manual_seed(1)
    assert torch.equal(Objective(config_none, tokenizer)(model, tokens, class_ids, 0).loss, clean.loss)


def test_rar_order_is_raster_once_r_reaches_zero():
    
    rar = ["model.generator.order=random", "model.generator.perturb_mode=none",
           "model.generator.class_label_dropout=0.0"]
    config, model, tokenizer, tokens, class_ids = objective_setup(*rar)
    raster_config, *_ = objective_setup(*rar[1:])
    raster = Objective(raster_config, tokenizer)(model, tokens, class_ids, 10)
    assert torch.equal(Objective(config, tokenizer)(model, tokens, class_ids, 10).loss, raster.loss)
    assert not torch.equal(Objective(config, tokenizer)(model, tokens, class_ids, 0).loss, raster.loss)


def test_rar_targets_and_features_follow_the_order(monkeypatch):
    import modeling.objective as objective

    config, model, tokenizer, tokens, class_ids = objective_setup(
        "model.generator.order=random", "model.generator.class_label_dropout=0.0")
    order = torch.stack([torch.randperm(16, generator=torch.Generator().manual_seed(i)) for i in range(4)])
    seen = {}
    monkeypatch.setattr(objective, "random_orders", lambda batch, length, ratio, device=None: order)
    monkeypatch.setattr(objective, "rear_loss", lambda output, targets, features, noise, weight: seen.update(
        targets=targets, features=features, noise=noise, logits=output.logits))
    torch.manual_seed(0)
    objective.Objective(config, tokenizer)(model, tokens, class_ids, 0)
    rows = torch.arange(4)[:, None]
    assert torch.equal(seen["targets"], tokens[rows, order])
    assert torch.equal(seen["features"], tokenizer.codebook[tokens[rows, order]])
    torch.manual_seed(0)
    objective.drop_class_labels(class_ids, 0.0, 10)  # the same draws as the objective: labels, then noise
    inputs, noise = objective.noisy_context(tokens, 1.0, "switch", 32)
    assert torch.equal(seen["noise"], noise[rows, order])
    torch.testing.assert_close(seen["logits"], model(inputs, class_ids, orders=order).logits)




# ----------------------------------------------------------------------------------------- the original's step
STEP = FIXTURES / "original_training_step"


@pytest.fixture(scope="module")
def original_step():
    return json.loads((STEP / "original_training_step.json").read_text()), load_file(str(STEP / "original_training_step.safetensors"))


class Codebook:
    """The golden VQGAN's codebook as a tokenizer's `get_quantized_states`."""

    def __init__(self, weight):
        self.weight = weight

    def get_quantized_states(self, tokens):
        return self.weight[tokens]


def run_case(name, meta, tensors, golden):
    """Our objective at the case's step, from the case's config (keys it removes take our schema's defaults) and
    the golden weights, after the fixture's seed; returns the parts and the next torch.rand(4)."""
    case = meta["cases"][name]
    config = validate(OmegaConf.create(case["config"]))
    model = ReAR(config)
    weights = {k: v for k, v in prefixed(golden[1], "generator.").items() if k not in case["weights_dropped_from_golden"]}
    model.load_state_dict(weights, strict=True)
    objective = Objective(config, Codebook(golden[1]["vqgan.quantize.embedding.weight"]))
    torch.manual_seed(meta["seed"])
    parts = objective(model.train(), tensors["input.tokens"], tensors["input.class_ids"], case["global_step"])
    return case, parts, torch.rand(4)


EXACT_CASES = [f"{case}_{drop}" for case in ("switch_step0", "switch_step50", "switch_step100", "switch_step150",
                                              "mask_step50", "mask_step150", "noperturbkey_step50",
                                              "noalignkey_step50") for drop in ("drop", "nodrop")]


@pytest.mark.parametrize("name", EXACT_CASES)
def test_one_step_equals_the_originals_step_and_random_stream(name, original_step, golden):
    """Loss, CE, alignment and accuracy of one step, and the random stream after it, equal the original's, for
    r = 1, 0.5 and 0 (where the original still draws its noise), mask and switch, the keys' original defaults
    (no `perturb_mode`: no noise; no `transition_alignment`: no heads), with and without dropout."""
    meta, tensors = original_step
    case, parts, rand_after = run_case(name, meta, tensors, golden)
    assert parts.ce.item() == pytest.approx(case["ar_loss"], abs=2e-6)
    assert (parts.encode_alignment + parts.decode_alignment).item() == pytest.approx(case["proj_loss"], abs=2e-6)
    assert parts.loss.item() == pytest.approx(case["loss"], abs=2e-6)
    assert parts.accuracy.item() == pytest.approx(case["correct_tokens"], abs=1e-7)
    assert torch.equal(rand_after, tensors[f"{name}.rand_after"])


@pytest.mark.parametrize("name, head", [("noencodealign_step50_nodrop", "decode_z"),
                                        ("nodecodealign_step50_nodrop", "encode_z")])
def test_a_head_that_is_off_is_not_built_and_adds_no_term(name, head, original_step, golden):
    """EN-only / DE-only: the head that is off is absent from the state dict and contributes nothing. (The
    original substitutes the other head's output for the missing one and so counts that one twice; the CE and
    the random stream still equal the original's.)"""
    meta, tensors = original_step
    case, parts, rand_after = run_case(name, meta, tensors, golden)
    assert parts.ce.item() == pytest.approx(case["ar_loss"], abs=2e-6)
    assert torch.equal(rand_after, tensors[f"{name}.rand_after"])
    z = tensors[f"{name}.{head}"]
    features, keep = tensors["input.features"], 1.0 - tensors[f"{name}.perturb_mask"].float()
    if head == "decode_z":
        expected_off, expected_on = parts.encode_alignment, -torch.cosine_similarity(z[:, 1:-1], features, dim=-1).mean()
        on = parts.decode_alignment
    else:
        expected_off = parts.decode_alignment
        expected_on = (-torch.cosine_similarity(z[:, 2:], features, dim=-1) * keep).mean()
        on = parts.encode_alignment
    assert expected_off.item() == 0.0
    assert on.item() == pytest.approx(expected_on.item(), abs=2e-6)
    config = validate(OmegaConf.create(case["config"]))
    names = ReAR(config).state_dict().keys()
    off = "encode_align_mlp" if head == "decode_z" else "decode_align_mlp"
    assert not any(k.startswith(off) for k in names) and any(k.startswith(head[:6] + "_align_mlp") for k in names)
