"""The regularisers and the total loss against the golden fixture and their definitions."""

import pytest
import torch

from modeling.losses import (
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


def test_no_noise_after_the_window_and_in_none_mode():
    tokens = torch.randint(0, 32, (8, 16))
    for ratio, mode in [(0.0, "switch"), (1.0, "none")]:
        noisy, mask = noisy_context(tokens, ratio, mode, 32)
        assert torch.equal(noisy, tokens) and not mask.any()
    with pytest.raises(ValueError, match="perturb_mode"):
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
