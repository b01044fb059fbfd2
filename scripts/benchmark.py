"""How fast training and sampling run: the training code's own step and the samplers, next to the original's
configuration, measured in the same run.

    python scripts/benchmark.py                                   # CPU: configs/rear_tiny.yaml, in seconds
    python scripts/benchmark.py config=configs/rear_l.yaml --device cuda --batch-size 128 --compile --json l.json
    python scripts/benchmark.py config=configs/rear_b_alitok.yaml --device cuda   # any backbone

Training: `utils.training.step.train_step` (the step scripts/train_rear.py runs: the objective at r = 1, backward,
gradient clipping, AdamW, the lr schedule) on random tokens, with the optimizer of `build_optimizer`:
- original: the original reAR's real training configuration: bf16 autocast, each block under torch.compile, SDPA
  with a boolean causal mask, AdamW's default (foreach) implementation (on a CPU the blocks are compiled only with
  --compile, and the row says so);
- ours: SDPA with is_causal, autocast in --dtype, fused AdamW; with --compile also torch.compile of the model;
- extra: a dense float (L, L) mask in fp32, eager (rules out the flash kernel), for reference.
Reported: samples/s, image tokens/s, MFU (model FLOPs, counted from one forward of the backbone, over the device's
peak dense bf16 FLOP/s; n/a on a CPU) and peak memory (CUDA: max allocated; CPU: the process's max RSS so far).

Sampling, images/s at --batch-size with the config's guidance settings (CFG: 2 x batch rows):
- plain: `generate(kv_cache=False)`, the originals' recomputation of the whole prefix at every step, fp32;
- `generate` with its KV cache; `FastSampler` eager; on CUDA also replayed from a CUDA graph, and with
  --compile torch.compile'd (then captured); these in --dtype. The fast sampler serves the rar backbone (with
  RAR's guidance schedule) only: for the others the output says so, and the KV-cached loop is "ours";
- end to end, the tokens decoded to images by a random-weight MaskGIT-VQGAN (the released size on CUDA, a
  tiny one on a CPU): plain = plain tokens + one fp32 decode of the whole batch (timed separately and added);
  ours = the fastest sampler + `decode_in_batches` in --dtype, timed together (skipped, with the reason, where the
  stand-in cannot decode the config's tokens, e.g. AliTok's 273).
Every speed-up is a ratio of two numbers from this one run, on this one device. `--competing-processes N` runs
it beside N busy processes (a shared machine); the thread settings it ran with (--threads, OMP_WAIT_POLICY) and the
load average are in the report.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from functools import partial
from typing import Callable, Dict, List, Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a clone, uninstalled
from utils.threads import use_thread_defaults  # noqa: E402

use_thread_defaults()  # before torch loads

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from accelerate.state import AcceleratorState  # noqa: E402

from modeling import build_generator  # noqa: E402
from modeling.fast_sampler import FastSampler  # noqa: E402
from modeling.objective import Objective  # noqa: E402
from modeling.tokenizers.base import RandomCodebook  # noqa: E402
from modeling.sampler import SamplingOptions, decode_in_batches, why_not_fast  # noqa: E402
from modeling.tokenizers.maskgit_vqgan import MaskGITVQGAN  # noqa: E402
from utils.cli import Script, file_to_write, flag_parser, non_negative_int, positive_int, run, torch_device  # noqa: E402
from utils.files import atomic_open  # noqa: E402
from utils.training.optim import build_optimizer, build_scheduler  # noqa: E402
from utils.training.step import make_accelerator, train_step  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
# Peak dense bf16 tensor-core FLOP/s (no sparsity), from NVIDIA's data sheets; the first match wins.
PEAK_BF16_FLOPS = [("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("A100", 312e12)]


# ----------------------------------------------------------------------------------------- the device
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device, repeats: int = 1) -> float:
    """Median seconds of `repeats` calls of `fn`, each timed from an idle device to an idle device (the median:
    a shared machine's bursts of other work shift a mean)."""
    seconds = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux; never reset


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor() or "unknown CPU"
    return f"{model}, {os.cpu_count()} cores, {torch.get_num_threads()} threads"


@contextlib.contextmanager
def competing_processes(count: int):
    """`count` processes that keep one core each busy (a pure-Python loop) while the benchmark runs."""
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]
    try:
        yield
    finally:
        for process in busy:
            process.kill()
            process.wait()


def peak_flops(device: torch.device, override_tflops: Optional[float]) -> Optional[float]:
    if override_tflops:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_BF16_FLOPS if key in name), None)


def autocast(device: torch.device, dtype: torch.dtype):
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


# ----------------------------------------------------------------------------------------- model FLOPs
def forward_flops_per_sample(model: nn.Module) -> int:
    """Model FLOPs of one sample's teacher-forced forward, as training runs it (any backbone): 2 per
    multiply-accumulate of every Linear at every position it runs on, plus causal attention's QK^T and AV (position
    i attends to i+1 keys). Counted while the model runs once on the meta device (`model` must be there: no memory,
    no arithmetic), so each backbone's layout counts as it runs. Embedding look-ups and norms count 0."""
    macs = 0
    sdpa = F.scaled_dot_product_attention

    def count_linear(module: nn.Linear, inputs, output) -> None:
        nonlocal macs
        macs += inputs[0].numel() // module.in_features * module.in_features * module.out_features

    def counted_attention(q, k, v, *args, is_causal=False, **kwargs):
        nonlocal macs
        length, keys = q.shape[-2], k.shape[-2]
        pairs = length * (length + 1) // 2 if is_causal else length * keys
        macs += 2 * q.shape[:-2].numel() * q.shape[-1] * pairs
        return sdpa(q, k, v, *args, is_causal=is_causal, **kwargs)

    hooks = [m.register_forward_hook(count_linear) for m in model.modules() if isinstance(m, nn.Linear)]
    F.scaled_dot_product_attention = counted_attention
    try:
        tokens = torch.zeros(1, model.image_seq_len, dtype=torch.long, device="meta")
        model.train()(tokens, torch.zeros(1, dtype=torch.long, device="meta"))  # train: no id check on meta
    finally:
        F.scaled_dot_product_attention = sdpa
        for hook in hooks:
            hook.remove()
    return 2 * macs


# ----------------------------------------------------------------------------------------- the originals' attention
@contextlib.contextmanager
def masked_attention(kind: str):
    """The original's causal attention through an explicit (L, L) mask instead of `is_causal`: `bool` (what the
    original reAR trains with: a boolean mask) or `float` (-inf above the diagonal, which rules out the flash
    kernel). Swaps the SDPA that modeling.rear calls."""
    sdpa = F.scaled_dot_product_attention

    def with_mask(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, **kwargs):
        if is_causal:
            ones = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device)
            attn_mask = ones.tril() if kind == "bool" else torch.zeros_like(ones, dtype=q.dtype).masked_fill(
                ~ones.tril(), float("-inf"))
        return sdpa(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=False, **kwargs)

    F.scaled_dot_product_attention = with_mask
    try:
        yield
    finally:
        F.scaled_dot_product_attention = sdpa


# ----------------------------------------------------------------------------------------- training
@dataclass(frozen=True)
class TrainingVariant:
    key: str
    description: str
    precision: str  # training.mixed_precision
    attention: str  # is_causal | bool | float
    fused: bool  # fused AdamW (CUDA)
    compile: str  # none | blocks (the original: @torch.compile on Block.forward) | model


def training_variants(args, device: torch.device) -> List[TrainingVariant]:
    ours = "no" if args.dtype == "fp32" else "bf16"
    compile_original = "blocks" if device.type == "cuda" or args.compile else "none"
    original = "original reAR: bf16 autocast, bool-mask SDPA, AdamW, " + (
        "compiled blocks" if compile_original == "blocks" else "blocks NOT compiled (CPU; --compile compiles them)")
    variants = [
        TrainingVariant("original", original, "bf16", "bool", False, compile_original),
        TrainingVariant("ours", f"ours: is_causal SDPA, {args.dtype}, fused AdamW", ours, "is_causal", True, "none"),
    ]
    if args.compile:
        variants.append(TrainingVariant("ours_compiled", "ours + torch.compile", ours, "is_causal", True, "model"))
    variants.append(TrainingVariant("dense_fp32", "extra: dense float mask, fp32, AdamW, eager", "no", "float",
                                    False, "none"))
    return variants


def measure_training(config, args, device, variant: TrainingVariant, batch_size: int) -> Dict:
    """The training code's own step (`utils.training.step.train_step`: the objective at r = 1, backward, clip,
    AdamW, schedule) on random tokens, with the variant's precision, attention, optimizer and compilation."""
    config = copy.deepcopy(config)  # the variant's settings stay its own
    config.training.mixed_precision = variant.precision
    AcceleratorState._reset_state(reset_partial_state=True)
    accelerator = make_accelerator(config)
    torch.manual_seed(0)
    model = build_generator(config).to(device).train()
    optimizer = build_optimizer(model, config, device, fused=variant.fused)
    scheduler = build_scheduler(optimizer, config)
    if variant.compile == "blocks":
        for block in model.transformer_blocks:
            block.compile()
    step_model = torch.compile(model) if variant.compile == "model" else model
    vq, g = config.model.vq_model, config.model.generator
    objective = Objective(config, RandomCodebook(vq.codebook_size, g.z_dim or vq.token_size).to(device))
    tokens = torch.randint(0, vq.codebook_size, (batch_size, g.image_seq_len), device=device)
    classes = torch.randint(0, g.condition_num_classes, (batch_size,), device=device)

    def step():
        train_step(accelerator, step_model, objective, lambda: (tokens, classes), optimizer, scheduler, 0,
                   max_grad_norm=config.training.max_grad_norm)

    reset_peak_memory(device)
    with masked_attention(variant.attention) if variant.attention != "is_causal" else contextlib.nullcontext():
        for _ in range(3 if variant.compile != "none" else 2):  # warm-up: allocator, kernels, compilation
            step()
        seconds = timed(step, device, args.steps)
    samples_per_s = batch_size / seconds
    peak = peak_flops(device, args.peak_tflops)
    flops_per_s = 3 * forward_flops_per_sample(model) * samples_per_s  # backward = 2 x forward
    return {
        "description": variant.description,
        "batch_size": batch_size,
        "seconds_per_step": seconds,
        "samples_per_s": samples_per_s,
        "tokens_per_s": samples_per_s * model.image_seq_len,
        "model_tflops_per_s": flops_per_s / 1e12,
        "mfu": flops_per_s / peak if peak else None,
        "peak_memory_mb": peak_memory_mb(device),
    }


def measure_training_fitting(config, args, device, variant: TrainingVariant) -> Dict:
    """`measure_training` at --batch-size, or at the largest half of it that fits in memory (the dense-mask row's
    fp32 activations may not fit where ours do; samples/s stay comparable)."""
    batch_size = args.batch_size
    while True:
        try:
            return measure_training(config, args, device, variant, batch_size=batch_size)
        except torch.cuda.OutOfMemoryError:
            if batch_size == 1:
                raise
            print(f"out of memory at batch {batch_size}; trying {batch_size // 2}", file=sys.stderr)
            batch_size //= 2
            torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------- sampling
def tiny_vqgan_config(config) -> dict:
    """A small f4 MaskGIT-VQGAN for the config's codebook: CPU timings of the decode path, not of the real decoder."""
    vq, n = config.model.vq_model, config.model.generator.image_seq_len
    return {"channel_mult": [1, 1, 2], "num_resolutions": 3, "hidden_channels": 32, "num_res_blocks": 1,
            "resolution": 4 * math.isqrt(n), "z_channels": vq.token_size, "codebook_size": vq.codebook_size,
            "token_size": vq.token_size}


def fast_sampler_variants(args, device: torch.device):
    """(key, description, compile, CUDA graph) of the FastSampler configurations this device runs."""
    variants = [("fast_eager", f"FastSampler: static cache, eager, {args.dtype}", False, False)]
    if device.type == "cuda":
        variants.append(("fast_cuda_graph", f"FastSampler: CUDA graph, {args.dtype}", False, True))
    if args.compile:
        graph = " + CUDA graph" if device.type == "cuda" else ""
        variants.append(("fast_compiled", f"FastSampler: torch.compile{graph}, {args.dtype}", True, True))
    return variants


def measure_sampling(config, args, device, dtype) -> Dict:
    g, options = config.model.generator, SamplingOptions.from_config(config)
    settings = dict(guidance_scale=options.guidance_scale, guidance_scale_pow=options.guidance_scale_pow,
                    temperature=options.temperature)
    loop_settings = {**settings, **options.guidance()}
    torch.manual_seed(0)
    model = build_generator(config).to(device).eval()
    classes = torch.arange(args.batch_size, device=device) % g.condition_num_classes
    results: Dict[str, Dict] = {}
    tokens: Dict[str, torch.Tensor] = {}

    def run(key: str, description: str, sample: Callable, warmup: bool = True, repeats: int = args.repeats):
        reset_peak_memory(device)
        if warmup:  # allocations, graph capture, compilation
            sample()

        def seeded():
            torch.manual_seed(0)
            tokens[key] = sample()

        seconds = timed(seeded, device, repeats)
        results[key] = {"description": description, "seconds_per_batch": seconds,
                        "images_per_s": args.batch_size / seconds, "peak_memory_mb": peak_memory_mb(device)}

    def cached_loop():
        with autocast(device, dtype):
            return model.generate(classes, **loop_settings)

    run("kv_cache", f"generate: KV cache, {args.dtype}", cached_loop)
    # The backbone's (and these settings') fast sampler, or why there is none.
    not_fast = why_not_fast(model, replace(options, sampler="fast", kv_cache=True))
    fast_variants = fast_sampler_variants(args, device) if not_fast is None else []
    fastest = ("kv_cache", cached_loop)  # only the fastest sampler is kept: each holds its own buffers
    for key, description, compile, graph in fast_variants:
        sampler = FastSampler(model, args.batch_size, g.guidance_scale != 0, dtype, compile=compile, cuda_graph=graph)
        run(key, description, lambda: sampler.generate(classes, **settings))
        if results[key]["images_per_s"] > results[fastest[0]]["images_per_s"]:
            fastest = key, partial(sampler.generate, classes, **settings)
    run("plain", "plain: no KV cache (recomputes the prefix), fp32",
        lambda: model.generate(classes, **loop_settings, kv_cache=False), warmup=False, repeats=args.plain_repeats)
    for key, entry in results.items():
        entry["speedup"] = entry["images_per_s"] / results["plain"]["images_per_s"]
        if key.startswith("fast"):  # the same seed: the same tokens, where both ran in fp32
            same = bool(torch.equal(tokens[key], tokens["plain"]))
            entry["same_tokens_as_plain"] = same if args.dtype == "fp32" else None
    order = ["plain", "kv_cache"] + [key for key, *_ in fast_variants]
    end_to_end = measure_end_to_end(config, args, device, dtype, results["plain"]["seconds_per_batch"], tokens["plain"],
                                    *fastest[::-1])
    return {"settings": loop_settings, "fast_sampler": not_fast, "variants": {key: results[key] for key in order},
            "end_to_end": end_to_end}


def stand_in_decoder_misfit(config, kind: str) -> Optional[str]:
    """Why the MaskGIT-VQGAN stand-in cannot decode this config's tokens (None when it can)."""
    vq, n = config.model.vq_model, config.model.generator.image_seq_len
    if kind == "released" and (n, vq.codebook_size) != (256, 1024):
        return f"the released MaskGIT-VQGAN decodes 256 tokens of 1024 codes, not {n} of {vq.codebook_size}"
    if math.isqrt(n) ** 2 != n:
        return f"the MaskGIT-VQGAN stand-in decodes a square grid of tokens, not {n}"
    return None


def measure_end_to_end(config, args, device, dtype, plain_seconds: float, plain_tokens, fastest: Callable,
                       fastest_key: str) -> Dict:
    """Images/s from class labels to images: plain = the plain sampler's time + one fp32 decode of the whole batch;
    ours = the fastest sampler and `decode_in_batches` in --dtype, timed together."""
    kind = args.vqgan or ("released" if device.type == "cuda" else "tiny")
    misfit = stand_in_decoder_misfit(config, kind)
    if misfit:
        return {"vqgan": kind, "skipped": misfit}
    tokenizer = MaskGITVQGAN(None if kind == "released" else tiny_vqgan_config(config)).to(device)
    tokenizer.decode_tokens(plain_tokens[:1])  # warm-up
    plain = plain_seconds + timed(lambda: tokenizer.decode_tokens(plain_tokens), device)

    def ours_end_to_end():
        tokens = fastest()
        with autocast(device, dtype):
            return decode_in_batches(tokenizer, tokens, args.decode_batch_size)

    ours_end_to_end()  # warm-up
    reset_peak_memory(device)
    ours = timed(ours_end_to_end, device, args.repeats)
    return {
        "vqgan": kind,
        "plain": {"description": "plain tokens + one fp32 decode of the batch (timed apart, added)",
                  "seconds_per_batch": plain, "images_per_s": args.batch_size / plain},
        "ours": {"description": f"{fastest_key} + decode_in_batches({args.decode_batch_size}), {args.dtype}",
                 "seconds_per_batch": ours, "images_per_s": args.batch_size / ours,
                 "peak_memory_mb": peak_memory_mb(device)},
        "speedup": plain / ours,
    }


# ----------------------------------------------------------------------------------------- report
def report(result: Dict) -> str:
    """The results as a plain-text table."""
    m, meta = result["model"], result["meta"]
    peak = f"{m['peak_flops'] / 1e12:.0f} TFLOP/s" if m["peak_flops"] else "unknown (MFU n/a)"
    lines = [
        f"reAR benchmark {meta['date']}: {meta['config']} ({meta['backbone']} backbone), batch {meta['batch_size']}, "
        f"ours in {meta['dtype']}",
        f"device: {meta['device']} ({meta['device_name']}), torch {meta['torch']}, python {meta['python']}",
        f"threads: OMP_WAIT_POLICY={meta['omp_wait_policy']}, beside {meta['competing_processes']} busy processes, "
        f"load average {meta['load_average']:.2f} at the start",
        f"model: {m['parameters'] / 1e6:.2f}M parameters; model FLOPs per image token: forward "
        f"{m['forward_flops_per_token'] / 1e6:.2f}M, training step {m['training_flops_per_token'] / 1e6:.2f}M; "
        f"peak dense bf16: {peak}",
    ]
    if "training" in result:
        steps = meta["steps"]
        lines += ["", f"training: the training code's step (objective, backward, clip, AdamW; {steps} timed); "
                  "speed-up over the original's configuration",
                  f"  {'variant':<44}{'batch':>6}{'samples/s':>11}{'tokens/s':>11}{'MFU':>7}{'peak MB':>9}"
                  f"{'speed-up':>10}"]
        for v in result["training"].values():
            mfu = "n/a" if v["mfu"] is None else f"{100 * v['mfu']:.1f}%"
            lines.append(f"  {v['description']:<44}{v['batch_size']:>6}{v['samples_per_s']:>11.1f}"
                         f"{v['tokens_per_s']:>11.0f}"
                         f"{mfu:>7}{v['peak_memory_mb']:>9.0f}{v['speedup']:>9.2f}x")
    if "sampling" in result:
        s, e = result["sampling"], result["sampling"]["end_to_end"]
        settings = ", ".join(f"{k} {v}" for k, v in s["settings"].items())
        lines += ["", f"sampling, tokens only ({settings})",
                  f"  {'variant':<52}{'images/s':>10}{'peak MB':>9}{'speed-up':>10}  same tokens as plain"]
        for v in s["variants"].values():
            same = {True: "yes", False: "NO", None: ""}[v.get("same_tokens_as_plain")]
            lines.append(f"  {v['description']:<52}{v['images_per_s']:>10.1f}{v['peak_memory_mb']:>9.0f}"
                         f"{v['speedup']:>9.2f}x  {same}")
        if s["fast_sampler"]:
            lines.append(f"  (no fast sampler: {s['fast_sampler']})")
        lines += ["", f"sampling, end to end (tokens + {e['vqgan']} MaskGIT-VQGAN decode)"]
        if "skipped" in e:
            lines.append(f"  skipped: {e['skipped']}")
        else:
            for key in ("plain", "ours"):
                lines.append(f"  {e[key]['description']:<71}{e[key]['images_per_s']:>10.1f}")
            lines.append(f"  speed-up {e['speedup']:.2f}x")
    return "\n".join(lines)


FLAGS = flag_parser()
FLAGS.add_argument("--batch-size", type=positive_int, default=128,
                   help="training and sampling batch (CFG: twice the rows)")
FLAGS.add_argument("--steps", type=positive_int, default=10, help="timed training steps per variant")
FLAGS.add_argument("--repeats", type=positive_int, default=3, help="timed sampling batches per variant")
FLAGS.add_argument("--plain-repeats", type=positive_int, default=1, help="timed batches of the (slow) plain sampler")
FLAGS.add_argument("--device", type=torch_device, default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu or cuda")
FLAGS.add_argument("--threads", type=positive_int, default=None, help="CPU threads (torch.set_num_threads)")
FLAGS.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="ours: default bf16 on CUDA, fp32 on CPU")
FLAGS.add_argument("--compile", action="store_true", help="also torch.compile (training, decode step)")
FLAGS.add_argument("--skip-training", action="store_true", help="sampling only")
FLAGS.add_argument("--skip-sampling", action="store_true", help="training only")
FLAGS.add_argument("--vqgan", choices=["released", "tiny"], help="default: released on CUDA, tiny on CPU")
FLAGS.add_argument("--decode-batch-size", type=positive_int, default=32, help="VQGAN decode chunk")
FLAGS.add_argument("--peak-tflops", type=float, default=None, help="peak dense bf16 TFLOP/s of an unlisted GPU")
FLAGS.add_argument("--competing-processes", type=non_negative_int, default=0,
                   help="run beside this many busy processes (one core each), as on a shared machine")
FLAGS.add_argument("--json", type=file_to_write, default=None, help="write the results here")

SCRIPT = Script(
    usage="python scripts/benchmark.py [config=FILE.yaml] [key.sub=value ...] [--device cuda] [--batch-size 128] "
          "[--compile] [--json OUT]",
    summary="Training and sampling speed of the training code's own step and of the samplers, next to the "
            "original's configuration, in one run (default config: configs/rear_tiny.yaml, seconds on a CPU).",
    example="python scripts/benchmark.py config=configs/rear_l.yaml --device cuda --batch-size 128 --compile "
            "--json l.json",
    flags=FLAGS,
    default_config=lambda flags: DEFAULT_CONFIG,
)
DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "rear_tiny.yaml")


def main(config, args, argv=None) -> Dict:
    if args.dtype is None:
        args.dtype = "bf16" if args.device.startswith("cuda") else "fp32"
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cuda":  # as the training script does; plain fp32 matmuls run in TF32 too
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = config.training.enable_tf32
    with torch.device("meta"):
        model = build_generator(config)
    forward = forward_flops_per_sample(model) / model.image_seq_len
    result: Dict = {
        "meta": {
            "date": datetime.date.today().isoformat(),
            "command": " ".join(["scripts/benchmark.py", *(sys.argv[1:] if argv is None else argv)]),
            "config": f"{config.experiment.name}", "backbone": config.model.generator.backbone,
            "batch_size": args.batch_size, "steps": args.steps,
            "dtype": args.dtype,
            "device": str(device), "device_name": device_name(device), "torch": torch.__version__,
            "python": platform.python_version(), "tf32": device.type == "cuda" and config.training.enable_tf32,
            "peak_memory": "torch.cuda.max_memory_allocated" if device.type == "cuda" else "process max RSS so far",
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "competing_processes": args.competing_processes,
            "load_average": os.getloadavg()[0],
        },
        "model": {"parameters": model.num_parameters(), "forward_flops_per_token": forward,
                  "training_flops_per_token": 3 * forward, "peak_flops": peak_flops(device, args.peak_tflops)},
    }
    with competing_processes(args.competing_processes):
        if not args.skip_training:
            training = {v.key: measure_training_fitting(config, args, device, v)
                        for v in training_variants(args, device)}
            for entry in training.values():
                entry["speedup"] = entry["samples_per_s"] / training["original"]["samples_per_s"]
            result["training"] = training
        if not args.skip_sampling:
            result["sampling"] = measure_sampling(config, args, device, dtype)
    print(report(result))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with atomic_open(args.json) as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    run(SCRIPT, main)
