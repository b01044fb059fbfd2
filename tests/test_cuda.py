"""Every CUDA path, for a user with a GPU: `python -m pytest -m cuda tests` (minutes on one GPU).

Deselected without `-m cuda` (see conftest.py), and failing, not skipping, when asked for on a machine without
CUDA. Covered: a bf16 training step with fused AdamW and torch.compile that never waits for the host; 20 steps of
the toy run on CUDA and its exact resume; the CUDA-graph sampler against the plain sampler (fp32, TF32 off); the
50k sampler's shards and npz on CUDA; the evaluator's Inception on CUDA against its CPU output.
"""

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import load_script
from modeling import build_generator
from modeling.fast_sampler import FastSampler
from modeling.objective import Objective
from modeling.tokenizers.base import RandomCodebook
from tiny_models import TINY_CONFIG, write_tiny_weights
from utils.config import load_config
from utils.training.logging import MetricWindow
from utils.training.optim import build_optimizer, build_scheduler
from utils.training.step import make_accelerator, train_step

pytestmark = pytest.mark.cuda
CUDA = torch.device("cuda")
TOY = "configs/rear_toy.yaml"
SMALL_TOY = ["dataset.toy.num_images=2000", "sampling.num_samples=20", "experiment.log_every=5",
             "experiment.generate_every=10", "experiment.save_every=10", "experiment.tracker=none"]


@pytest.fixture(autouse=True)
def needs_cuda():
    assert torch.cuda.is_available(), "these tests need a CUDA GPU"
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield


@pytest.mark.parametrize("compile", [False, True])
def test_bf16_step_with_fused_adamw_never_waits_for_the_host(compile):
    config = load_config(str(TINY_CONFIG), ["training.mixed_precision=bf16"])
    accelerator = make_accelerator(config)
    model = build_generator(config).to(CUDA).train()
    optimizer = build_optimizer(model, config, CUDA)
    assert optimizer.defaults["fused"] is True
    scheduler = build_scheduler(optimizer, config)
    step_model = torch.compile(model) if compile else model
    objective = Objective(config, RandomCodebook(32, 16).to(CUDA))
    tokens = torch.randint(0, 32, (8, 16), device=CUDA)
    classes = torch.randint(0, 10, (8,), device=CUDA)
    before = model.lm_head.weight.detach().clone()
    for step in range(3):  # compilation and warm-up happen in the first steps
        terms, _, _ = train_step(accelerator, step_model, objective, lambda: (tokens, classes), optimizer, scheduler, step)
    window = MetricWindow(CUDA)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any host sync in the step or its metrics raises
    try:
        terms, _, _ = train_step(accelerator, step_model, objective, lambda: (tokens, classes), optimizer, scheduler, 3)
        window.add(terms, 4)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(terms["loss"]).item() and not torch.equal(model.lm_head.weight, before)


def test_twenty_toy_steps_on_cuda_resume_exactly(tmp_path):
    def train(run, steps):
        overrides = [*SMALL_TOY, "training.mixed_precision=no", "model.generator.dropout=0.0",
                     "model.generator.attn_drop=0.0", f"experiment.output_dir={tmp_path / run}",
                     f"training.max_train_steps={steps}"]
        return load_script("train_rear").main(load_config(TOY, overrides))

    assert train("a", 20)["step"] == 20
    train("b", 10)
    assert train("b", 20)["step"] == 20
    a, b = (load_file(tmp_path / run / "generator.safetensors") for run in ("a", "b"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_cuda_graph_sampler_draws_the_plain_samplers_tokens(golden_generator):
    model = golden_generator.to(CUDA)
    classes = torch.arange(10, device=CUDA)
    sampler = FastSampler(model, batch_size=10, guidance=True)
    assert sampler.use_graph
    agree = 0
    for seed in range(4):
        torch.manual_seed(seed)
        fast = sampler.generate(classes, 3.0, 1.0, 1.0)
        torch.manual_seed(seed)
        plain = model.generate(classes, 3.0, 1.0, 1.0, kv_cache=False)
        agree += int((fast == plain).sum())
    print(f"CUDA graph vs plain sampler, fp32, TF32 off: {agree} of {4 * 10 * 16} tokens agree")
    assert agree == 4 * 10 * 16


def test_sampler_writes_its_shards_and_npz_on_cuda(tmp_path):
    generator, tokenizer = write_tiny_weights(tmp_path)
    script = load_script("sample_imagenet_rear")
    out = tmp_path / "samples"
    script.main(load_config(str(TINY_CONFIG), [f"experiment.generator_checkpoint={generator}",
                                                f"experiment.tokenizer_checkpoint={tokenizer}",
                                                f"experiment.output_dir={out}", "sampling.num_samples=30",
                                                "sampling.per_proc_batch_size=7"]))
    with np.load(tmp_path / "samples.npz") as npz:
        assert npz["arr_0"].shape == (30, 16, 16, 3) and npz["tokens"].shape == (30, 16)
        assert np.array_equal(npz["labels"], np.arange(30) // 3)


def test_inception_features_on_cuda_equal_the_cpu_ones(random_inception_weights):
    from evaluator.features import InceptionFeatures

    images = np.random.default_rng(0).integers(0, 256, (4, 64, 64, 3), dtype=np.uint8)
    cpu = InceptionFeatures(random_inception_weights, "cpu")(images)
    cuda = InceptionFeatures(random_inception_weights, "cuda")(images)
    for name in ("pool", "spatial", "softmax"):
        np.testing.assert_allclose(cuda[name], cpu[name], atol=1e-3, rtol=0, err_msg=name)
