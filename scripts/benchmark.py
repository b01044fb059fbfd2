"""How fast training and sampling run, with the plain (original) way and ours measured in the same run.

    python scripts/benchmark.py                                  # CPU: configs/rear_tiny.yaml, in seconds
    python scripts/benchmark.py --config configs/rear_l.yaml --device cuda --batch-size 128 --compile --json l.json

Training, one full step (noisy context, forward, loss, backward, gradient clipping, AdamW) on random data:
- plain: causal attention through a dense float (L, L) mask (rules out the flash kernel), fp32, AdamW's default
  implementation, eager. With --dtype bf16 the same again in bf16, so that the ratios separate the two changes.
- ours: SDPA with is_causal, autocast in --dtype, fused AdamW; with --compile also torch.compile.
Reported: samples/s, image tokens/s, MFU (model FLOPs, counted from the architecture, over the device's peak
dense bf16 FLOP/s; n/a on a CPU) and peak memory (CUDA: max allocated; CPU: the process's max RSS so far).

Sampling, images/s at --batch-size with the config's guidance scale (CFG: 2 x batch rows):
- plain: `ReAR.generate(kv_cache=False)`, the original's recomputation of the whole prefix at every step, fp32;
- `ReAR.generate` with its KV cache; `FastSampler` eager; on CUDA also replayed from a CUDA graph, and with
  --compile torch.compile'd (then captured); these in --dtype;
- end to end, the tokens decoded to images by a random-weight MaskGIT-VQGAN (the released size on CUDA, a
  tiny one on a CPU): plain = plain tokens + one fp32 decode of the whole batch (timed separately and added);
  ours = the fastest FastSampler + `decode_in_batches` in --dtype, timed together.
Every speed-up is a ratio of two numbers from this one run, on this one device.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import platform
import resource
import statistics
import sys
import time
from typing import Callable, Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a clone, uninstalled

from modeling.fast_sampler import FastSampler, decode_in_batches  # noqa: E402
from modeling.losses import drop_class_labels, noisy_context, rear_loss  # noqa: E402
from modeling.rear import ReAR  # noqa: E402
from modeling.tokenizers.maskgit_vqgan import MaskGITVQGAN  # noqa: E402
from utils.config import load_config  # noqa: E402

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
def linear_macs(module: nn.Module) -> int:
    return sum(m.in_features * m.out_features for m in module.modules() if isinstance(m, nn.Linear))


def forward_flops_per_sample(model: ReAR) -> int:
    """Model FLOPs of one teacher-forced forward over the N+2 positions of a sample: 2 per multiply-accumulate
    of every Linear at every position it runs on (the head on the N predicting positions), plus causal
    attention's QK^T and AV (position i attends to i+1 keys). Embedding look-ups and norms count 0."""
    n = model.image_seq_len
    length = n + 2
    blocks = sum(linear_macs(block) for block in model.blocks) * length
    attention = len(model.blocks) * 2 * model.hidden_size * length * (length + 1) // 2
    head = (linear_macs(model.adaln_before_head) + linear_macs(model.lm_head)) * n
    alignment = sum(linear_macs(getattr(model, name)) * length
                    for name in ("encode_align_mlp", "decode_align_mlp") if hasattr(model, name))
    return 2 * (blocks + attention + head + alignment)


# ----------------------------------------------------------------------------------------- the plain paths
@contextlib.contextmanager
def dense_mask_attention():
    """The original's attention: causal through an explicit float (L, L) mask of -inf above the diagonal,
    which materialises the scores and rules out the flash kernel. Swaps the SDPA that modeling.rear calls."""
    sdpa = F.scaled_dot_product_attention

    def with_dense_mask(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, **kwargs):
        if is_causal:
            attn_mask = torch.full((q.shape[-2], k.shape[-2]), float("-inf"), dtype=q.dtype, device=q.device).triu(1)
        return sdpa(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=False, **kwargs)

    F.scaled_dot_product_attention = with_dense_mask
    try:
        yield
    finally:
        F.scaled_dot_product_attention = sdpa


# ----------------------------------------------------------------------------------------- training
def random_batch(config, batch_size: int, device: torch.device):
    vq, g = config.model.vq_model, config.model.generator
    tokens = torch.randint(0, vq.codebook_size, (batch_size, g.image_seq_len), device=device)
    classes = torch.randint(0, g.condition_num_classes, (batch_size,), device=device)
    z_dim = g.z_dim if g.z_dim is not None else vq.token_size
    features = torch.randn(batch_size, g.image_seq_len, z_dim, device=device)  # stand-in codebook vectors
    return tokens, classes, features


def train_step(model: ReAR, optimizer, batch, config, dtype: torch.dtype) -> None:
    """One step of reAR training at the start of the schedule (r = 1), as the training loop runs it."""
    g = config.model.generator
    tokens, classes, features = batch
    inputs, noise = noisy_context(tokens, 1.0, g.perturb_mode, model.codebook_size)
    classes = drop_class_labels(classes, g.class_label_dropout, model.null_class)
    with autocast(tokens.device, dtype):
        output = model(inputs, classes)
        loss = rear_loss(output, tokens, features, noise, g.transition_alignment_weight).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), config.training.max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def measure_training(config, args, device, dtype, dense_mask: bool, fused: bool, compile: bool,
                     batch_size: int) -> Dict:
    torch.manual_seed(0)
    model = ReAR(config).to(device).train()
    o = config.optimizer.params
    optimizer = torch.optim.AdamW(model.parameters(), lr=o.learning_rate, betas=(o.beta1, o.beta2),
                                  weight_decay=o.weight_decay, fused=fused or None)
    step_model = torch.compile(model) if compile else model
    batch = random_batch(config, batch_size, device)
    reset_peak_memory(device)
    with dense_mask_attention() if dense_mask else contextlib.nullcontext():
        for _ in range(3 if compile else 2):  # warm-up: allocator, kernels, compilation
            train_step(step_model, optimizer, batch, config, dtype)
        seconds = timed(lambda: train_step(step_model, optimizer, batch, config, dtype), device, args.steps)
    samples_per_s = batch_size / seconds
    peak = peak_flops(device, args.peak_tflops)
    flops_per_s = 3 * forward_flops_per_sample(model) * samples_per_s  # backward = 2 x forward
    return {
        "batch_size": batch_size,
        "seconds_per_step": seconds,
        "samples_per_s": samples_per_s,
        "tokens_per_s": samples_per_s * model.image_seq_len,
        "model_tflops_per_s": flops_per_s / 1e12,
        "mfu": flops_per_s / peak if peak else None,
        "peak_memory_mb": peak_memory_mb(device),
    }


def measure_training_fitting(config, args, device, dtype, *variant) -> Dict:
    """`measure_training` at --batch-size, or at the largest half of it that fits in memory (the plain path's
    dense mask and fp32 activations may not fit where ours does; samples/s stay comparable)."""
    batch_size = args.batch_size
    while True:
        try:
            return measure_training(config, args, device, dtype, *variant, batch_size=batch_size)
        except torch.cuda.OutOfMemoryError:
            if batch_size == 1:
                raise
            print(f"out of memory at batch {batch_size}; trying {batch_size // 2}", file=sys.stderr)
            batch_size //= 2
            torch.cuda.empty_cache()


def training_variants(args, dtype_name: str):
    """(key, description, dtype, dense_mask, fused AdamW, compile)."""
    variants = [("plain", "plain: dense float mask, fp32, AdamW", "fp32", True, False, False)]
    if dtype_name != "fp32":
        description = f"dense float mask, {dtype_name} autocast, AdamW"
        variants.append((f"dense_mask_{dtype_name}", description, dtype_name, True, False, False))
    variants.append(("ours", f"ours: is_causal SDPA, {dtype_name}, fused AdamW", dtype_name, False, True, False))
    if args.compile:
        variants.append(("ours_compiled", f"ours + torch.compile", dtype_name, False, True, True))
    return variants


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
    g = config.model.generator
    settings = dict(guidance_scale=g.guidance_scale, guidance_scale_pow=g.guidance_scale_pow,
                    temperature=g.randomize_temperature)
    torch.manual_seed(0)
    model = ReAR(config).to(device).eval()
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

    with autocast(device, dtype):
        run("kv_cache", f"ReAR.generate: KV cache, {args.dtype}", lambda: model.generate(classes, **settings))
    fastest = None  # (key, sampler): only the fastest sampler is kept, each holds its own buffers
    for key, description, compile, graph in fast_sampler_variants(args, device):
        sampler = FastSampler(model, args.batch_size, g.guidance_scale != 0, dtype, compile=compile, cuda_graph=graph)
        run(key, description, lambda: sampler.generate(classes, **settings))
        if fastest is None or results[key]["images_per_s"] > results[fastest[0]]["images_per_s"]:
            fastest = key, sampler
        del sampler
    run("plain", "plain: no KV cache (recomputes the prefix), fp32",
        lambda: model.generate(classes, **settings, kv_cache=False), warmup=False, repeats=args.plain_repeats)
    for key, entry in results.items():
        entry["speedup"] = entry["images_per_s"] / results["plain"]["images_per_s"]
        if key.startswith("fast"):  # the same seed: the same tokens, where both ran in fp32
            same = bool(torch.equal(tokens[key], tokens["plain"]))
            entry["same_tokens_as_plain"] = same if args.dtype == "fp32" else None
    order = ["plain", "kv_cache"] + [key for key, *_ in fast_sampler_variants(args, device)]
    end_to_end = measure_end_to_end(config, args, device, dtype, results["plain"]["seconds_per_batch"], tokens["plain"],
                                    lambda: fastest[1].generate(classes, **settings), fastest[0])
    return {"settings": settings, "variants": {key: results[key] for key in order}, "end_to_end": end_to_end}


def measure_end_to_end(config, args, device, dtype, plain_seconds: float, plain_tokens, fastest: Callable,
                       fastest_key: str) -> Dict:
    """Images/s from class labels to images: plain = the plain sampler's time + one fp32 decode of the whole batch;
    ours = the fastest FastSampler and `decode_in_batches` in --dtype, timed together."""
    kind = args.vqgan or ("released" if device.type == "cuda" else "tiny")
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
        f"reAR benchmark {meta['date']}: {meta['config']}, batch {meta['batch_size']}, ours in {meta['dtype']}",
        f"device: {meta['device']} ({meta['device_name']}), torch {meta['torch']}, python {meta['python']}",
        f"model: {m['parameters'] / 1e6:.2f}M parameters; model FLOPs per image token: forward "
        f"{m['forward_flops_per_token'] / 1e6:.2f}M, training step {m['training_flops_per_token'] / 1e6:.2f}M; "
        f"peak dense bf16: {peak}",
    ]
    if "training" in result:
        steps = meta["steps"]
        lines += ["", f"training: one step = noisy context, forward, loss, backward, clip, AdamW ({steps} timed)",
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
        lines += ["", f"sampling, end to end (tokens + {e['vqgan']} MaskGIT-VQGAN decode)"]
        for key in ("plain", "ours"):
            lines.append(f"  {e[key]['description']:<71}{e[key]['images_per_s']:>10.1f}")
        lines.append(f"  speed-up {e['speedup']:.2f}x")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/rear_tiny.yaml")
    parser.add_argument("overrides", nargs="*", help="config overrides a.b=c, as the other scripts take them")
    parser.add_argument("--batch-size", type=int, default=128, help="training and sampling batch (CFG: twice the rows)")
    parser.add_argument("--steps", type=int, default=10, help="timed training steps per variant")
    parser.add_argument("--repeats", type=int, default=3, help="timed sampling batches per variant")
    parser.add_argument("--plain-repeats", type=int, default=1, help="timed batches of the (slow) plain sampler")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="ours: default bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--compile", action="store_true", help="also torch.compile (training, decode step)")
    parser.add_argument("--skip-training", action="store_true")
    parser.add_argument("--skip-sampling", action="store_true")
    parser.add_argument("--vqgan", choices=["released", "tiny"], help="default: released on CUDA, tiny on CPU")
    parser.add_argument("--decode-batch-size", type=int, default=32)
    parser.add_argument("--peak-tflops", type=float, default=None, help="peak dense bf16 TFLOP/s of an unlisted GPU")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args(argv)
    if args.dtype is None:
        args.dtype = "bf16" if args.device.startswith("cuda") else "fp32"
    return args


def main(argv=None) -> Dict:
    args = parse_args(argv)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    if args.threads:
        torch.set_num_threads(args.threads)
    config = load_config(args.config, args.overrides)
    if device.type == "cuda":  # as the training script does; plain fp32 matmuls run in TF32 too
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = config.training.enable_tf32
    with torch.device("meta"):
        model = ReAR(config)
    forward = forward_flops_per_sample(model) / model.image_seq_len
    result: Dict = {
        "meta": {
            "date": datetime.date.today().isoformat(),
            "command": " ".join(["scripts/benchmark.py", *(sys.argv[1:] if argv is None else argv)]),
            "config": " ".join([args.config, *args.overrides]), "batch_size": args.batch_size, "steps": args.steps,
            "dtype": args.dtype,
            "device": str(device), "device_name": device_name(device), "torch": torch.__version__,
            "python": platform.python_version(), "tf32": device.type == "cuda" and config.training.enable_tf32,
            "peak_memory": "torch.cuda.max_memory_allocated" if device.type == "cuda" else "process max RSS so far",
        },
        "model": {"parameters": model.num_parameters(), "forward_flops_per_token": forward,
                  "training_flops_per_token": 3 * forward, "peak_flops": peak_flops(device, args.peak_tflops)},
    }
    if not args.skip_training:
        training = {}
        for key, description, dtype_name, dense_mask, fused, compile in training_variants(args, args.dtype):
            dtype_of_variant = DTYPES[dtype_name]
            training[key] = measure_training_fitting(config, args, device, dtype_of_variant, dense_mask, fused, compile)
            training[key]["description"] = description
        for entry in training.values():
            entry["speedup"] = entry["samples_per_s"] / training["plain"]["samples_per_s"]
        result["training"] = training
    if not args.skip_sampling:
        result["sampling"] = measure_sampling(config, args, device, dtype)
    print(report(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
