"""scripts/benchmark.py: the model-FLOP count by hand, and a tiny run that writes the JSON it promises."""

import json

import torch

from conftest import FIXTURES, load_script
from modeling.rear import ReAR
from utils.config import load_config

ROOT = FIXTURES.parent.parent


def load_benchmark():
    return load_script("benchmark")


def test_forward_flops_of_rear_tiny_by_hand():
    benchmark = load_benchmark()
    with torch.device("meta"):
        model = ReAR(load_config(str(ROOT / "configs" / "rear_tiny.yaml")))
    d, layers, hidden, v, n, p, z = 64, 4, 256, 32, 16, 128, 16
    length = n + 2
    block = 3 * d * d + d * d + 2 * d * hidden + 6 * d * d  # qkv, proj, fc1 + fc2, adaLN
    attention = 2 * d * length * (length + 1) // 2  # QK^T and AV, position i sees i + 1 keys
    head = 2 * d * d + d * v
    alignment = 2 * (d * p + p * p + p * z)
    macs = layers * (block * length + attention) + head * n + alignment * length
    assert benchmark.forward_flops_per_sample(model) == 2 * macs == 13_036_544


def test_tiny_run_writes_its_json(tmp_path):
    benchmark = load_benchmark()
    out = tmp_path / "bench.json"
    benchmark.run(benchmark.SCRIPT, benchmark.main,
                  ["--device", "cpu", "--batch-size", "4", "--steps", "2", "--repeats", "1", "--json", str(out)])
    result = json.loads(out.read_text())
    assert result["meta"]["device"] == "cpu" and result["meta"]["batch_size"] == 4
    assert result["model"]["peak_flops"] is None
    training = result["training"]
    assert list(training) == ["original", "ours", "dense_fp32"]
    assert training["original"]["description"].startswith("original reAR: bf16 autocast, bool-mask SDPA")
    for entry in training.values():
        assert entry["mfu"] is None  # no peak FLOP/s for a CPU
        for key in ("samples_per_s", "tokens_per_s", "peak_memory_mb", "speedup"):
            assert entry[key] > 0, key
        assert entry["tokens_per_s"] == entry["samples_per_s"] * 16
    sampling = result["sampling"]
    assert list(sampling["variants"]) == ["plain", "kv_cache", "fast_eager"]
    for entry in sampling["variants"].values():
        assert entry["images_per_s"] > 0 and entry["speedup"] > 0
    assert sampling["variants"]["fast_eager"]["same_tokens_as_plain"] is True
    end_to_end = sampling["end_to_end"]
    assert end_to_end["vqgan"] == "tiny"
    assert end_to_end["plain"]["images_per_s"] > 0 and end_to_end["ours"]["images_per_s"] > 0
