"""The fast paths against the plain ones, on a CPU in float32: the fast sampler draws the plain sampler's tokens,
the training forward without a dense mask (and with activation checkpointing) gives the same logits, loss and
gradients."""

import pytest
import torch

from conftest import prefixed
from modeling.fast_sampler import FastSampler
from modeling.objective import noisy_context, rear_loss
from modeling.sampler import cfg_scale_at, decode_in_batches
from modeling.tokenizers.maskgit_vqgan import MaskGITVQGAN
from test_benchmark import load_benchmark


# ----------------------------------------------------------------------------------------- sampling
@pytest.mark.parametrize("index", [0, 1, 2])
def test_reproduces_original_tokens(golden_generator, golden, index):
    meta, t = golden
    settings = meta["generate_settings"][index]
    sampler = FastSampler(golden_generator, batch_size=3, guidance=settings["guidance_scale"] != 0)
    torch.manual_seed(settings["seed"])
    tokens = sampler.generate(
        t["input.class_ids"],
        guidance_scale=settings["guidance_scale"],
        guidance_scale_pow=settings["guidance_scale_pow"],
        temperature=settings["temperature"],
    )
    assert tokens.dtype == torch.long
    assert torch.equal(tokens, t[f"expected.generate_{index}"])


@pytest.mark.parametrize(
    "settings",
    [
        dict(guidance_scale=3.0, guidance_scale_pow=1.0, temperature=1.0),
        dict(guidance_scale=0.0, guidance_scale_pow=1.0, temperature=1.0),
        dict(guidance_scale=4.0, guidance_scale_pow=2.75, temperature=0.7),
        dict(guidance_scale=4.0, guidance_scale_pow=2.75, temperature=1.0, top_k=5),
        dict(guidance_scale=1.5, guidance_scale_pow=1.0, temperature=1.3, top_p=0.8),
        dict(guidance_scale=0.0, guidance_scale_pow=1.0, temperature=1.0, top_k=8, top_p=0.9),
    ],
)
def test_equals_plain_sampler_on_many_seeds(golden_generator, settings):
    # One sampler for every seed: a call must not depend on what the previous one left in the cache.
    sampler = FastSampler(golden_generator, batch_size=10, guidance=settings["guidance_scale"] != 0)
    classes = torch.arange(10)
    for seed in range(4):
        torch.manual_seed(seed)
        fast = sampler.generate(classes, **settings)
        fast_state = torch.get_rng_state()
        torch.manual_seed(seed)
        plain = golden_generator.generate(classes, **settings, kv_cache=False)
        assert torch.equal(fast, plain), f"seed {seed}"
        assert torch.equal(fast_state, torch.get_rng_state())  # the same draws, so the stream stays in step


def test_greedy_tokens_are_the_argmax_of_teacher_forced_guided_logits(golden_generator):
    classes = torch.tensor([0, 5, 9])
    tokens = FastSampler(golden_generator, batch_size=3).generate(classes, 3.0, 1.0, top_k=1)
    cond = golden_generator(tokens, classes).logits
    uncond = golden_generator(tokens, torch.full_like(classes, golden_generator.null_class)).logits
    scales = torch.cat([cfg_scale_at(step, 16, 3.0, 1.0) for step in range(16)])
    assert torch.equal(tokens, (uncond + (cond - uncond) * scales[:, None]).argmax(-1))


def test_bf16_runs_on_a_copy(golden_generator):
    sampler = FastSampler(golden_generator, batch_size=4, dtype=torch.bfloat16)
    classes = torch.tensor([0, 3, 3, 9])
    torch.manual_seed(0)
    first = sampler.generate(classes, 4.0, 2.75)
    torch.manual_seed(0)
    assert torch.equal(sampler.generate(classes, 4.0, 2.75), first)
    assert first.shape == (4, 16) and 0 <= int(first.min()) and int(first.max()) < 32
    assert sampler.model is not golden_generator and sampler.model.lm_head.weight.dtype == torch.bfloat16
    assert golden_generator.lm_head.weight.dtype == torch.float32
    with torch.no_grad():  # weights changed in place (training between two sample grids): the copy follows
        golden_generator.lm_head.bias.add_(torch.linspace(-8, 8, 32))
    torch.manual_seed(0)
    assert not torch.equal(sampler.generate(classes, 4.0, 2.75), first)
    assert torch.equal(sampler.model.lm_head.bias, golden_generator.lm_head.bias.to(torch.bfloat16))


def test_refuses_what_its_buffers_do_not_fit(golden_generator):
    sampler = FastSampler(golden_generator, batch_size=2)
    with pytest.raises(ValueError, match="batches of 2"):
        sampler.generate(torch.tensor([1, 2, 3]), 4.0, 1.0)
    with pytest.raises(ValueError, match="guidance=False"):
        sampler.generate(torch.tensor([1, 2]), 0.0, 1.0)
    with pytest.raises(ValueError, match="class id out of range"):
        sampler.generate(torch.tensor([1, 11]), 4.0, 1.0)
    golden_generator.train()
    try:
        with pytest.raises(ValueError, match="training mode"):
            sampler.generate(torch.tensor([1, 2]), 4.0, 1.0)
    finally:
        golden_generator.eval()


def test_decode_in_batches_equals_one_decode(golden):
    meta, t = golden
    vqgan = MaskGITVQGAN(meta["vqgan_config"])
    vqgan.load_state_dict(prefixed(t, "vqgan."), strict=True)
    tokens = t["vqgan_expected.tokens"]
    torch.testing.assert_close(decode_in_batches(vqgan, tokens, 1), t["vqgan_expected.decoded"], atol=1e-5, rtol=1e-5)
    tokens = torch.cat([tokens, tokens[:1].flip(1)])  # three rows: batches of 2 leave a remainder
    torch.testing.assert_close(decode_in_batches(vqgan, tokens, 2), vqgan.decode_tokens(tokens), atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------- training
def loss_and_gradients(model, golden, seed=0):
    _, t = golden
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    tokens = t["input.tokens"]
    inputs, noise = noisy_context(tokens, 0.5, "switch", model.codebook_size)
    output = model(inputs, t["input.class_ids"])
    loss = rear_loss(output, tokens, t["loss_input.features"], noise).loss
    loss.backward()
    return output.logits.detach(), loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_dense_float_mask_equals_is_causal(golden_generator, golden):
    masked_attention = load_benchmark().masked_attention
    logits, loss, grads = loss_and_gradients(golden_generator, golden)
    with masked_attention("float"):
        dense_logits, dense_loss, dense_grads = loss_and_gradients(golden_generator, golden)
    torch.testing.assert_close(dense_logits, logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dense_loss, loss, atol=1e-6, rtol=1e-6)
    for name, grad in grads.items():
        torch.testing.assert_close(dense_grads[name], grad, atol=1e-6, rtol=1e-4, msg=name)


def test_dense_float_mask_really_masks(golden_generator, golden):
    # Without a mask at all the logits would change: the emulation must put the causal mask back.
    _, t = golden
    masked_attention = load_benchmark().masked_attention
    with masked_attention("float"):
        dense = golden_generator(t["input.tokens"], t["input.class_ids"]).logits
    torch.testing.assert_close(dense, t["expected.logits"], atol=2e-5, rtol=1e-5)


def test_activation_checkpointing_gives_identical_loss_and_gradients(golden_generator, golden):
    golden_generator.train()  # dropout on: checkpointing must replay the same dropout masks
    try:
        _, loss, grads = loss_and_gradients(golden_generator, golden)
        golden_generator.use_checkpoint = True
        _, checkpointed_loss, checkpointed_grads = loss_and_gradients(golden_generator, golden)
    finally:
        golden_generator.use_checkpoint = False
        golden_generator.eval()
    assert torch.equal(checkpointed_loss, loss)
    for name, grad in grads.items():
        torch.testing.assert_close(checkpointed_grads[name], grad, atol=0, rtol=0, msg=name)


# ----------------------------------------------------------------------------------------- the call site
@pytest.mark.parametrize("sampler", ["fast", "plain"])
def test_the_call_site_draws_the_plain_tokens_for_every_batch_size(golden_generator, sampler):
    """`generate_tokens` (what every script calls): the fast sampler, one per batch shape (the last batch of a run
    is smaller), or the readable loop with sampling.sampler=plain; the same tokens as `ReAR.generate`."""
    from modeling.sampler import SamplingOptions, generate_tokens

    options = SamplingOptions(3.0, 1.0, 1.0, sampler=sampler)
    for size in (5, 5, 2, 1):  # a full batch twice (the same sampler again), then two smaller last batches
        classes = torch.arange(size) % 10
        torch.manual_seed(size)
        tokens = generate_tokens(golden_generator, classes, options)
        torch.manual_seed(size)
        assert torch.equal(tokens, golden_generator.generate(classes, 3.0, 1.0, 1.0))
    built = sorted(key[0] for key in golden_generator.__dict__.get("_fast_samplers", {}))
    assert built == ([1, 2, 5] if sampler == "fast" else [])
