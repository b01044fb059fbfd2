"""Every bad input a user can give an entry point ends in one line on stderr (`error: ...`), exit status 2 for a bad
command line or configuration and 1 for the rest, no traceback, and nothing left behind in the output folder;
`--debug` (or REAR_DEBUG=1) shows the traceback, and a bug of ours keeps its traceback.

The scripts run as the user runs them (their `__main__`, each in its own process: tests/script_runner.py). ROWS is
the table of docs/reliability.md, "What you see when something is wrong"; "…" in a line stands for text that varies
(a process id, a file size, a library's wording).
"""

import fnmatch
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Callable, Optional, Tuple

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from script_runner import ROOT
from tiny_models import write_tiny_weights
from utils.config import DOMAINS, schema_fields

TOY = ("scripts/train_rear.py config=configs/rear_toy.yaml experiment.output_dir={O}/run "
       "model.generator.hidden_size=32 model.generator.num_hidden_layers=2 model.generator.num_attention_heads=2 "
       "model.generator.intermediate_size=64 model.generator.decode_align_layer_idx=1 "
       "model.generator.projection_dim=32 dataset.toy.num_images=256 training.per_gpu_batch_size=8 "
       "sampling.num_samples=10 training.max_train_steps=4 lr_scheduler.params.warmup_steps=2 experiment.save_every=2")
TINY = ("scripts/train_rear.py config=configs/rear_tiny.yaml experiment.output_dir={O}/run "
        "experiment.tokenizer_checkpoint={F}/tiny_vqgan.safetensors")
SAMPLE = ("scripts/sample_imagenet_rear.py config=configs/rear_tiny.yaml experiment.output_dir={O}/samples "
          "experiment.tokenizer_checkpoint={F}/tiny_vqgan.safetensors sampling.num_samples=10 "
          "sampling.per_proc_batch_size=5 experiment.generator_checkpoint={F}/tiny_generator.safetensors")
PRETOK = ("scripts/pretokenization.py config=configs/rear_tiny.yaml "
          "experiment.tokenizer_checkpoint={F}/tiny_vqgan.safetensors --output {O}/tokens.jsonl --augment center "
          "--num_workers 0 --data {F}/clean/train")
CONVERT = "scripts/convert_imagenet_to_wds.py --imagenet_dir {F}/clean --output_dir {O}/shards"
DEMO = ("scripts/demo.py config=configs/rear_tiny.yaml --generator {F}/tiny_generator.safetensors "
        "--tokenizer {F}/tiny_vqgan.safetensors --out {O}/grid.png --classes 1 2")
EVAL = "-m evaluator {F}/ref.npz"
TOKENS_LINE = '{"class_id": int, "tokens": [int, ...]}'
REAR_S = "https://huggingface.co/qyoo/reAR/resolve/main/reAR-S.safetensors (≈0.92 GB (230.99M float32 parameters))"
VQGAN = ("https://huggingface.co/fun-research/TiTok/resolve/main/maskgit-vqgan-imagenet-f16-256.bin "
         "(≈0.22 GB (54.5M float32 parameters))")
PICKLE = ("refusing to load {F}/evil.pt for safety: it holds pickled Python objects other than tensors (GLOBAL "
          "posix.system); only weights-only files are loaded. If you made this file, save its state dict instead "
          "(torch.save(model.state_dict(), path) or a .safetensors file)")
TRUNCATED = ("weights file {F}/truncated.safetensors is unreadable (truncated or corrupt?): Error while deserializing "
             "header: incomplete metadata, file not fully covered")


# ------------------------------------------------------------------------------------------- set-ups
def interrupted_sampling(server, inputs, out):
    """A run of the sampler into {O}/samples with the tiny generator, killed after its first shard."""
    killed = run(server, SAMPLE, inputs, out, faults=[{"target": "os:replace", "match": "batch_000000",
                                                       "action": "after"}])
    assert killed.returncode == -9 and [p.name for p in (out / "samples" / "shards").iterdir()] == ["batch_000000.npz"]


def interrupted_pretokenization(server, inputs, out):
    """A pre-tokenization killed after its first batch (of 2 images), with the tiny tokenizer."""
    killed = run(server, PRETOK + " --batch_size 2", inputs, out,
                 faults=[{"target": "tqdm.std:tqdm.update", "action": "before"}])
    assert killed.returncode == -9 and len((out / "tokens.jsonl.part-0-of-1").read_text().splitlines()) == 2


def checkpoint_folder(server, inputs, out):
    (out / "run" / "checkpoints" / "checkpoint-00000002").mkdir(parents=True)


@dataclass
class Row:
    id: str
    argv: str  # after `python`; {F}: the folder of inputs, {O}: the output folder
    code: int
    line: str  # what follows "error: " on the last line of stderr ("warning: " when code is 0)
    setup: Optional[Callable] = None  # what was in {O} before
    faults: Tuple[dict, ...] = ()  # tests/faults.py
    left: Tuple[str, ...] = ()  # what the failed run may leave in {O} (globs), beyond what was there


ROWS = [
    # ------------------------------------------------------------------ configuration and command line
    Row("train: no arguments", "scripts/train_rear.py", 2,
        "missing config=FILE.yaml (e.g. python scripts/train_rear.py config=configs/rear_toy.yaml "
        "training.max_train_steps=300); see --help"),
    Row("train: config file missing", "scripts/train_rear.py config={F}/missing.yaml", 2,
        "config file not found: {F}/missing.yaml"),
    Row("train: malformed YAML", "scripts/train_rear.py config={F}/malformed.yaml", 2,
        "config file {F}/malformed.yaml line 4 is not valid YAML: did not find expected ',' or ']'"),
    Row("train: YAML that is a list", "scripts/train_rear.py config={F}/list.yaml", 2,
        "config file {F}/list.yaml does not hold a mapping of sections (experiment:, model:, ...)"),
    Row("train: unknown key in the YAML", "scripts/train_rear.py config={F}/unknown_key.yaml", 2,
        "unknown config key 'experiment.nmae' in {F}/unknown_key.yaml; did you mean 'experiment.name'?"),
    Row("train: unknown key on the command line", TOY + " training.max_train_stepz=3", 2,
        "unknown config key 'training.max_train_stepz' in the command line; did you mean 'training.max_train_steps'?"),
    Row("train: value of the wrong type", TOY + " training.max_train_steps=abc", 2,
        "bad value for config key 'training.max_train_steps' in the command line: Value 'abc' of type 'str' could "
        "not be converted to Integer"),
    Row("train: negative step count", TOY + " training.max_train_steps=-5", 2,
        "bad config value in configs/rear_toy.yaml and the command line: 'training.max_train_steps' is -5 "
        "(must be > 0)"),
    Row("train: value not among the choices", TOY + " model.generator.perturb_mode=bogus", 2,
        "bad value for config key 'model.generator.perturb_mode' in the command line: 'bogus' is not one of "
        "[switch, mask, none]"),
    Row("train: argument without '='", TOY + " training", 2,
        "command-line argument 'training' is not of the form key.sub=value (or config=FILE.yaml)"),
    Row("train: unknown flag", TOY + " --frobnicate", 2, "unknown flag --frobnicate (see --help)"),
    Row("train: mask noise on a backbone without a mask token",
        TOY + " model.generator.backbone=gpt1d model.generator.perturb_mode=mask", 2,
        "'model.generator.perturb_mode' is 'mask', but the 'gpt1d' backbone has no mask token (its token table holds "
        "the V image tokens only, as its released weights do); use 'switch'"),
    Row("train: a fitted tokenizer without the toy data", TINY + " model.vq_model.model_type=toy "
        "experiment.tokenizer_checkpoint=null model.vq_model.num_latent_tokens=16", 2,
        "the 'toy' tokenizer is fitted on the toy images at start-up: with dataset.name=imagenet give it weights "
        "(experiment.tokenizer_checkpoint=PATH)"),
    Row("sample: no generator checkpoint", SAMPLE + " experiment.generator_checkpoint=", 2,
        "set experiment.generator_checkpoint=PATH (a local file or a released name, e.g. reAR-S.safetensors)"),
    Row("sample: sample count not a multiple of the classes", SAMPLE + " sampling.num_samples=7", 2,
        "bad config value in configs/rear_tiny.yaml and the command line: 'sampling.num_samples' (7) is not a "
        "multiple of the 10 classes ('model.generator.condition_num_classes'): every class gets the same number of "
        "samples"),
    Row("sample: top_p out of range", SAMPLE + " sampling.top_p=2", 2,
        "bad config value in configs/rear_tiny.yaml and the command line: 'sampling.top_p' is 2.0 (must be in (0, 1])"),
    Row("pretokenize: no --data/--output", "scripts/pretokenization.py config=configs/rear_tiny.yaml", 2,
        "the following arguments are required: --data, --output (see --help)"),
    Row("pretokenize: bad --augment", PRETOK + " --augment bogus", 2,
        "argument --augment: invalid choice: 'bogus' (choose from 'center', 'flip', 'ten_crop') (see --help)"),
    Row("pretokenize: --batch_size 0", PRETOK + " --batch_size 0", 2,
        "argument --batch_size: must be at least 1, got 0 (see --help)"),
    Row("pretokenize: --batch_size abc", PRETOK + " --batch_size abc", 2,
        "argument --batch_size: invalid positive_int value: 'abc' (see --help)"),
    Row("pretokenize: --num_workers -1", PRETOK + " --num_workers -1", 2,
        "argument --num_workers: must be at least 0, got -1 (see --help)"),
    Row("convert: no flags", "scripts/convert_imagenet_to_wds.py", 2,
        "the following arguments are required: --imagenet_dir, --output_dir (see --help)"),
    Row("convert: --maxcount 0", CONVERT + " --maxcount 0", 2,
        "argument --maxcount: must be at least 1, got 0 (see --help)"),
    Row("convert: a config argument", CONVERT + " config=configs/rear_s.yaml", 2,
        "unexpected argument config=configs/rear_s.yaml: this script takes --flags only (see --help)"),
    Row("demo: class id out of range", DEMO + " --classes 1 5000", 2,
        "--classes: 5000 is not a class id of this model (0..9)"),
    Row("demo: unknown --model", "scripts/demo.py --model bogus", 2,
        "argument --model: invalid choice: 'bogus' (choose from 'reAR-B', 'reAR-L', 'reAR-S') (see --help)"),
    Row("demo: unknown --device", DEMO + " --device bogus", 2,
        "argument --device: 'bogus' is not a torch device (cpu, cuda, cuda:1, ...) (see --help)"),
    Row("demo: --device cuda without CUDA", DEMO + " --device cuda", 2,
        "argument --device: 'cuda': CUDA is not available on this machine (use cpu) (see --help)"),
    Row("benchmark: --batch-size 0", "scripts/benchmark.py --batch-size 0", 2,
        "argument --batch-size: must be at least 1, got 0 (see --help)"),
    Row("benchmark: --steps 0", "scripts/benchmark.py --steps 0", 2,
        "argument --steps: must be at least 1, got 0 (see --help)"),
    Row("benchmark: unknown key", "scripts/benchmark.py training.per_gpu_batch_sise=3", 2,
        "unknown config key 'training.per_gpu_batch_sise' in the command line; did you mean "
        "'training.per_gpu_batch_size'?"),
    Row("evaluator: no arguments", "-m evaluator", 2,
        "the following arguments are required: ref_batch, sample_batch (see --help)"),
    Row("evaluator: --batch-size 0", EVAL + " {F}/ref.npz --batch-size 0", 2,
        "argument --batch-size: must be at least 1, got 0 (see --help)"),
    # ------------------------------------------------------------------ weights
    Row("train: released tokenizer not downloaded (offline)", "scripts/train_rear.py config=configs/rear_tiny.yaml "
        "experiment.output_dir={O}/run", 1,
        "weights file not found: maskgit-vqgan-imagenet-f16-256.bin is not a local file and the Hugging Face Hub "
        f"cannot be reached (offline?); download {VQGAN} where you have internet and pass a local copy with "
        "experiment.tokenizer_checkpoint=PATH"),
    Row("train: init_weight missing", TOY + " experiment.init_weight={F}/missing.safetensors", 1,
        "weights file not found: {F}/missing.safetensors; pass a local copy with experiment.init_weight=PATH"),
    Row("train: init_weight truncated (.safetensors)", TOY + " experiment.init_weight={F}/truncated.safetensors", 1,
        TRUNCATED),
    Row("train: init_weight empty", TOY + " experiment.init_weight={F}/empty.safetensors", 1,
        "weights file {F}/empty.safetensors is empty (0 bytes): an interrupted download? fetch it again"),
    Row("train: init_weight truncated (.bin)", TOY + " experiment.init_weight={F}/truncated.bin", 1,
        "weights file {F}/truncated.bin is unreadable (truncated or corrupt?): PytorchStreamReader failed reading "
        "zip archive: failed finding central directory"),
    Row("train: init_weight of another shape", TINY + " experiment.init_weight={F}/wrong_shape.safetensors", 1,
        "experiment.init_weight {F}/wrong_shape.safetensors does not fit the model (1 problem: shape mismatch: "
        "lm_head.weight: checkpoint (31, 64) vs model (32, 64)): are the config's sizes those of the checkpoint?"),
    Row("train: init_weight a pickle that runs a command", TOY + " experiment.init_weight={F}/evil.pt", 1, PICKLE),
    Row("sample: generator missing", SAMPLE + " experiment.generator_checkpoint={F}/missing.safetensors", 1,
        "weights file not found: {F}/missing.safetensors; pass a local copy with experiment.generator_checkpoint=PATH"),
    Row("sample: released generator not downloaded (offline)",
        SAMPLE + " experiment.generator_checkpoint=reAR-S.safetensors", 1,
        "weights file not found: reAR-S.safetensors is not a local file and the Hugging Face Hub cannot be reached "
        f"(offline?); download {REAR_S} where you have internet and pass a local copy with "
        "experiment.generator_checkpoint=PATH"),
    Row("sample: generator truncated", SAMPLE + " experiment.generator_checkpoint={F}/truncated.safetensors", 1,
        TRUNCATED),
    Row("sample: generator of another shape", SAMPLE + " experiment.generator_checkpoint={F}/wrong_shape.safetensors",
        1, "generator checkpoint {F}/wrong_shape.safetensors does not fit the model (1 problem: shape mismatch: "
        "lm_head.weight: checkpoint (31, 64) vs model (32, 64)): are the config's sizes those of the checkpoint?"),
    Row("sample: generator a pickle that runs a command", SAMPLE + " experiment.generator_checkpoint={F}/evil.pt", 1,
        PICKLE),
    Row("sample: tokenizer truncated", SAMPLE + " experiment.tokenizer_checkpoint={F}/truncated.safetensors", 1,
        TRUNCATED),
    Row("pretokenize: released tokenizer not downloaded (offline)", PRETOK + " experiment.tokenizer_checkpoint=", 1,
        "weights file not found: maskgit-vqgan-imagenet-f16-256.bin is not a local file and the Hugging Face Hub "
        f"cannot be reached (offline?); download {VQGAN} where you have internet and pass a local copy with "
        "experiment.tokenizer_checkpoint=PATH"),
    Row("demo: released weights not downloaded (offline)", "scripts/demo.py --out {O}/grid.png", 1,
        "the demo needs two weight files; generator: weights file not found: reAR-S.safetensors is not a local file "
        f"and the Hugging Face Hub cannot be reached (offline?); download {REAR_S} where you have internet and pass "
        "a local copy with --generator PATH | tokenizer: weights file not found: maskgit-vqgan-imagenet-f16-256.bin "
        f"is not a local file and the Hugging Face Hub cannot be reached (offline?); download {VQGAN} where you have "
        "internet and pass a local copy with --tokenizer PATH"),
    Row("app: released weights not downloaded (offline), before the server starts", "scripts/app.py "
        "config=configs/rear_l.yaml", 1,
        "the demo needs two weight files; generator: weights file not found: reAR-L.safetensors is not a local file "
        "and the Hugging Face Hub cannot be reached (offline?); download "
        "https://huggingface.co/qyoo/reAR/resolve/main/reAR-L.safetensors (≈1.90 GB (…M float32 parameters)) where "
        "you have internet and pass a local copy with --generator PATH | tokenizer: weights file not found: "
        f"maskgit-vqgan-imagenet-f16-256.bin is not a local file and the Hugging Face Hub cannot be reached "
        f"(offline?); download {VQGAN} where you have internet and pass a local copy with --tokenizer PATH"),
    Row("demo: generator truncated", DEMO + " --generator {F}/truncated.safetensors", 1, TRUNCATED),
    Row("demo: generator a pickle that runs a command", DEMO + " --generator {F}/evil.pt", 1, PICKLE),
    Row("evaluator: too few samples for FID", EVAL + " {F}/ref.npz", 2,
        "FID needs ≥ 2048 samples (got 4 in {F}/ref.npz): with fewer images than its 2048 feature dimensions the "
        "covariance is singular and the distance means nothing; sample more (ADM's protocol: 50,000), or pass "
        "--allow-few-samples to compute it anyway"),
    Row("evaluator: Inception weights missing",
        EVAL + " {F}/ref.npz --allow-few-samples --inception-weights {F}/missing.pth", 1,
        "Inception weights {F}/missing.pth: no such file"),
    Row("evaluator: Inception weights truncated",
        EVAL + " {F}/ref.npz --allow-few-samples --inception-weights {F}/truncated.bin", 1,
        "Inception weights {F}/truncated.bin are unreadable (truncated or corrupt?): PytorchStreamReader failed "
        "reading zip archive: failed finding central directory; fetch https://github.com/toshas/torch-fidelity/"
        "releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth again"),
    # ------------------------------------------------------------------ data
    Row("train: JSONL missing", TINY + " dataset.params.pretokenization={F}/missing.jsonl", 1,
        "pre-tokenized data not found: {F}/missing.jsonl (dataset.params.pretokenization)"),
    Row("train: JSONL with a corrupt line", TINY + " dataset.params.pretokenization={F}/corrupt_line.jsonl", 1,
        "{F}/corrupt_line.jsonl:6: corrupt line, expected " + TOKENS_LINE
        + " (Expecting ',' delimiter: line 1 column 32 (char 31))"),
    Row("train: JSONL class id out of range", TINY + " dataset.params.pretokenization={F}/class_range.jsonl", 1,
        "{F}/class_range.jsonl line 8: class id 12 >= num_classes 10"),
    Row("train: JSONL negative class id", TINY + " dataset.params.pretokenization={F}/negative_class.jsonl", 1,
        "{F}/negative_class.jsonl:4: class_id must be a non-negative integer, got -1"),
    Row("train: JSONL token id out of range", TINY + " dataset.params.pretokenization={F}/token_range.jsonl", 1,
        "{F}/token_range.jsonl line 9: token id 40 >= codebook size 32"),
    Row("train: JSONL with a short line", TINY + " dataset.params.pretokenization={F}/short_line.jsonl", 1,
        "{F}/short_line.jsonl:4: 15 tokens, but the first line has 16"),
    Row("train: JSONL empty", TINY + " dataset.params.pretokenization={F}/empty.jsonl", 1,
        "{F}/empty.jsonl holds no lines of data"),
    Row("train: shards missing", TINY + " dataset.params.train_shards_path_or_url={F}/shard-{0000..0003}.tar", 1,
        "2 of 4 training shards not found, e.g. {F}/shard-0002.tar (dataset.params.train_shards_path_or_url)"),
    Row("train: a corrupt shard member (skipped, named)", TINY + " dataset.params.train_shards_path_or_url="
        "{F}/shard-{0000..0001}.tar dataset.params.num_workers_per_gpu=0 training.max_train_steps=2 "
        "training.per_gpu_batch_size=2 dataset.params.shuffle_buffer_size=1", 0,
        "skipping shard {F}/shard-0001.tar member s0003: UnidentifiedImageError: cannot identify image file",
        left=("run*",)),
    Row("train: a shard with a class id the model lacks (read by a worker)", TINY + " dataset.params."
        "train_shards_path_or_url={F}/bad_class.tar dataset.params.num_workers_per_gpu=1 training.per_gpu_batch_size=1 "
        "dataset.params.shuffle_buffer_size=1", 1,
        "shard {F}/bad_class.tar member s0004: class id 12, outside [0, 10) (model.generator.condition_num_classes)",
        left=("run", "run/config.yaml")),
    Row("pretokenize: --data missing", PRETOK + " --data {F}/missing", 1,
        "--data {F}/missing: no such image folder (root/<class>/<image>) or .tar shard pattern"),
    Row("pretokenize: a corrupt image", PRETOK + " --data {F}/corrupt/train", 1,
        "{F}/corrupt/train/n02/bad.png: cannot decode the image (UnidentifiedImageError: cannot identify image file)"),
    Row("pretokenize: a corrupt image, read by workers", PRETOK + " --data {F}/corrupt/train --num_workers 2", 1,
        "{F}/corrupt/train/n02/bad.png: cannot decode the image (UnidentifiedImageError: cannot identify image file)"),
    Row("pretokenize: a corrupt shard member", PRETOK + " --data {F}/shard-{0000..0001}.tar", 1,
        "shard {F}/shard-0001.tar member s0003: cannot decode (UnidentifiedImageError: cannot identify image file)"),
    Row("convert: ImageNet folder missing", CONVERT + " --imagenet_dir {F}/missing", 1,
        "image folder not found: {F}/missing/train"),
    Row("convert: split missing", CONVERT + " --splits val", 1, "image folder not found: {F}/clean/val"),
    Row("evaluator: sample batch missing", EVAL + " {F}/missing.npz", 1, "{F}/missing.npz: no such file"),
    Row("evaluator: sample batch of floats", EVAL + " {F}/float.npz", 1,
        "{F}/float.npz: 'arr_0' must be uint8 images of shape (N, H, W, 3), got float32 (4, 16, 16, 3)"),
    Row("evaluator: sample batch not an .npz", EVAL + " {F}/not_zip.npz", 1,
        "{F}/not_zip.npz is not an .npz file (not a zip archive)"),
    # ------------------------------------------------------------------ output folders and full disks
    Row("train: output folder with checkpoints, resume off", TOY + " experiment.resume=False", 1,
        "{O}/run already holds checkpoints and experiment.resume is False: choose another experiment.output_dir, "
        "or remove them", setup=checkpoint_folder),
    Row("sample: rerun with another checkpoint into a folder with shards",
        SAMPLE + " experiment.generator_checkpoint={F}/other_generator.safetensors", 1,
        "{O}/samples holds samples made with other settings (generator_checkpoint: '{F}/tiny_generator.safetensors "
        "(… bytes)' (there) vs '{F}/other_generator.safetensors (… bytes)' (now)); use another "
        "experiment.output_dir, or delete that folder to start again", setup=interrupted_sampling),
    Row("pretokenize: rerun with another tokenizer into an interrupted part",
        PRETOK + " experiment.tokenizer_checkpoint={F}/other_vqgan.safetensors", 1,
        "{O}/tokens.jsonl.part-0-of-1 holds images made with other settings (tokenizer_checkpoint: "
        "'{F}/tiny_vqgan.safetensors (… bytes)' (there) vs '{F}/other_vqgan.safetensors (… bytes)' (now)); rerun "
        "with those, or delete it (and its .settings.json) to tokenize again", setup=interrupted_pretokenization),
    Row("train: disk full while saving a checkpoint", TOY, 1,
        "the disk is full: could not save checkpoint {O}/run/checkpoints/checkpoint-00000002 ([Errno 28] No space "
        "left on device: '{O}/run/checkpoints/checkpoint-00000002.tmp-save/model.safetensors'); the earlier "
        "checkpoints are intact: free some space and rerun to resume",
        faults=({"target": "utils.training.resume:save_file", "action": "enospc", "match": "checkpoint"},),
        left=("run", "run/config.yaml", "run/tokenizer.safetensors", "run/checkpoints")),
    Row("train: file-size limit while saving (a real failed write)", TOY, 1,
        "the file-size limit (ulimit -f: 50000 bytes) is reached: could not save checkpoint "
        "{O}/run/checkpoints/checkpoint-00000002 ({O}/run/checkpoints/checkpoint-00000002.tmp-save/model.safetensors: "
        "Error while serializing: I/O error: File too large (os error 27)); the earlier checkpoints are intact: raise "
        "the limit (ulimit -f unlimited) and rerun to resume",
        faults=({"fsize_limit": 50_000},),
        left=("run", "run/config.yaml", "run/tokenizer.safetensors", "run/checkpoints")),
    Row("sample: disk full while writing a shard", SAMPLE, 1,
        "the disk is full: could not write {O}/samples/shards/batch_000001.npz ([Errno 28] No space left on device: "
        "'{O}/samples/shards/batch_000001.npz.tmp-…'); free some space and rerun",
        faults=({"target": "numpy:savez", "match": "batch_000001", "action": "enospc"},),
        left=("samples", "samples/sampling.json", "samples/shards", "samples/shards/batch_000000.npz")),
    Row("pretokenize: file-size limit while writing", PRETOK + " --batch_size 2 --augment ten_crop", 1,
        "the file-size limit (ulimit -f: 2500 bytes) is reached: could not write {O}/tokens.jsonl.part-0-of-1 "
        "([Errno 27] File too large); raise the limit (ulimit -f unlimited) and rerun",
        faults=({"fsize_limit": 2_500},), left=("tokens.jsonl.part-0-of-1", "tokens.jsonl.part-0-of-1.settings.json")),
]


# ------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Every bad (and the few good) inputs of the rows: {F}."""
    folder = tmp_path_factory.mktemp("inputs")
    generator, tokenizer = write_tiny_weights(folder)
    shutil.copy(generator, folder / "other_generator.safetensors")
    shutil.copy(tokenizer, folder / "other_vqgan.safetensors")
    data = Path(generator).read_bytes()
    (folder / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    (folder / "empty.safetensors").write_bytes(b"")
    weights = load_file(generator)
    save_file({k: v[:-1] if k == "lm_head.weight" else v for k, v in weights.items()},
              folder / "wrong_shape.safetensors")
    torch.save(weights, folder / "generator.bin")
    pickled = (folder / "generator.bin").read_bytes()
    (folder / "truncated.bin").write_bytes(pickled[: len(pickled) // 2])
    torch.save({"state_dict": weights, "payload": RunsACommand(folder / "PWNED")}, folder / "evil.pt")

    (folder / "malformed.yaml").write_text("experiment:\n  name: x\n  output_dir: [unclosed\nmodel: {\n")
    (folder / "unknown_key.yaml").write_text("experiment:\n  nmae: x\n")
    (folder / "list.yaml").write_text("- a\n- b\n")

    good = [json.dumps({"class_id": i % 10, "tokens": [j % 32 for j in range(16)]}) for i in range(20)]
    lines = {
        "corrupt_line": good[:5] + ['{"class_id": 3, "tokens": [1, 2'] + good[5:],
        "class_range": good[:7] + [json.dumps({"class_id": 12, "tokens": [0] * 16})] + good[7:],
        "negative_class": good[:3] + [json.dumps({"class_id": -1, "tokens": [1] * 16})] + good[3:],
        "token_range": good[:8] + [json.dumps({"class_id": 1, "tokens": [40] * 16})] + good[8:],
        "short_line": good[:3] + [json.dumps({"class_id": 1, "tokens": [1] * 15})] + good[3:],
        "empty": [],
    }
    for name, content in lines.items():
        (folder / f"{name}.jsonl").write_text("".join(line + "\n" for line in content))

    for kind in ("clean", "corrupt"):
        for synset in ("n01", "n02"):
            (folder / kind / "train" / synset).mkdir(parents=True)
            for i in range(3):
                image = np.random.RandomState(i).randint(0, 256, (20, 20, 3), dtype=np.uint8)
                Image.fromarray(image).save(folder / kind / "train" / synset / f"{i}.png")
    (folder / "corrupt" / "train" / "n02" / "bad.png").write_bytes(b"\x89PNG, but not really")
    png = BytesIO()
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(png, format="PNG")
    write_tar(folder / "shard-0000.tar", {"s0000.png": png.getvalue(), "s0000.cls": b"1",
                                         "s0001.png": png.getvalue(), "s0001.cls": b"2"})
    write_tar(folder / "shard-0001.tar", {"s0002.png": png.getvalue(), "s0002.cls": b"1",
                                         "s0003.png": b"garbage", "s0003.cls": b"2"})
    write_tar(folder / "bad_class.tar", {"s0004.png": png.getvalue(), "s0004.cls": b"12"})

    np.savez(folder / "ref.npz", arr_0=np.zeros((4, 16, 16, 3), np.uint8))
    np.savez(folder / "float.npz", arr_0=np.zeros((4, 16, 16, 3), np.float32))
    (folder / "not_zip.npz").write_bytes(b"hello")
    return folder


class RunsACommand:
    """A pickled object that would create a file if it were ever unpickled."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return os.system, (f"touch {self.path}",)


def write_tar(path, members):
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, BytesIO(data))


# ------------------------------------------------------------------------------------------- helpers
def fill(text, inputs, out):
    return text.replace("{F}", str(inputs)).replace("{O}", str(out))


def run(server, argv, inputs, out, **kwargs):
    return server.run(shlex.split(fill(argv, inputs, out)), **kwargs)


def matches(template: str, text: str) -> bool:
    return re.fullmatch(".*".join(re.escape(part) for part in template.split("…")), text) is not None


def stderr_lines(stderr: str):
    return [line for line in re.split(r"[\r\n]", stderr) if line.strip()]


def listing(folder: Path) -> dict:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) if p.is_file() else None
            for p in folder.rglob("*")}


# ------------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("row", ROWS, ids=[row.id for row in ROWS])
def test_bad_input_is_one_line(row, server, inputs, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    if row.setup:
        row.setup(server, inputs, out)
    before = listing(out)
    result = run(server, row.argv, inputs, out, faults=row.faults)
    expected = fill(row.line, inputs, out)
    lines = stderr_lines(result.stderr)
    assert result.returncode == row.code, result.stderr
    assert "Traceback" not in result.stderr
    if row.code:
        assert matches(expected, lines[-1].removeprefix("error: ")) and lines[-1].startswith("error: "), lines[-1]
        assert sum(line.startswith("error:") for line in lines) == 1
    else:
        assert any(matches("warning: " + expected, line) for line in lines), result.stderr
    after = listing(out)
    assert all(after.get(path) == state for path, state in before.items()), "what was there must stay as it was"
    new = sorted(set(after) - set(before))
    assert all(any(fnmatch.fnmatch(path, pattern) for pattern in row.left) for path in new), new
    assert not [path for path in after if ".tmp-" in path]
    assert not (inputs / "PWNED").exists()


def test_a_fresh_interpreter_shows_the_same_line(server):
    """The forked runs above behave as `python scripts/X.py` does."""
    command = ["scripts/train_rear.py"]  # the example: was a traceback
    fresh = subprocess.run([sys.executable, *command], cwd=ROOT, capture_output=True, text=True, timeout=120)
    forked = server.run(command)
    assert (fresh.returncode, fresh.stderr) == (forked.returncode, forked.stderr)
    assert fresh.stderr.count("\n") == 1 and fresh.stderr.startswith("error: ")


@pytest.mark.parametrize("how", ["--debug", "REAR_DEBUG=1"])
def test_debug_shows_the_traceback(server, inputs, tmp_path, how):
    argv = "scripts/train_rear.py config={F}/missing.yaml" + (" --debug" if how == "--debug" else "")
    result = run(server, argv, inputs, tmp_path, env={"REAR_DEBUG": "1"} if how != "--debug" else None)
    assert result.returncode == 1
    assert result.stderr.startswith("Traceback")
    assert stderr_lines(result.stderr)[-1] == f"utils.errors.ConfigError: config file not found: {inputs}/missing.yaml"


def test_a_bug_of_ours_keeps_its_traceback(server, inputs, tmp_path):
    result = run(server, TOY, inputs, tmp_path, faults=[{"target": "utils.training.step:train_step", "action": "bug"}])
    assert result.returncode == 1
    assert "Traceback" in result.stderr
    assert stderr_lines(result.stderr)[-1] == "RuntimeError: injected bug"
    assert "error:" not in result.stderr


ENTRY_POINTS = {
    "scripts/train_rear.py": ("training", "model.generator.perturb_mode", "experiment.save_every"),
    "scripts/sample_imagenet_rear.py": ("sampling", "experiment.generator_checkpoint"),
    "scripts/pretokenization.py": ("model.vq_model", "dataset.preprocessing.crop_size"),
    "scripts/demo.py": ("sampling.guidance_scale", "sampling.temperature"),
    "scripts/app.py": ("sampling.guidance_scale", "sampling.top_p"),
    "scripts/convert_imagenet_to_wds.py": (),
    "scripts/benchmark.py": (),
    "-m evaluator": (),
    "-m evaluator.consistency": ("model.vq_model.model_type", "experiment.tokenizer_checkpoint"),
    "-m evaluator.exposure": ("experiment.generator_checkpoint", "model.generator.backbone"),
    "-m evaluator.compare": (),
    "scripts/tokenize_toy.py": ("dataset.toy", "experiment.tokenizer_checkpoint"),
    "scripts/guidance_search.py": ("sampling", "experiment.generator_checkpoint"),
    "-m evaluator.reconstruction": ("model.vq_model.model_type", "experiment.tokenizer_checkpoint"),
    "-m evaluator.report": ("experiment.generator_checkpoint", "model.generator.backbone"),
    "-m evaluator.toy": ("dataset.toy",),
}


def test_every_entry_point_has_its_help_tested():
    scripts = {f"scripts/{path.name}" for path in (ROOT / "scripts").glob("*.py")}
    modules = {f"-m evaluator{'' if path.stem == '__main__' else '.' + path.stem}"
               for path in (ROOT / "evaluator").glob("*.py") if "\nSCRIPT = Script(" in path.read_text()
               or path.stem == "__main__"}
    assert scripts | modules == set(ENTRY_POINTS)


BASH_SCRIPTS = sorted(p.name for p in (ROOT / "scripts_bash").glob("*.sh") if p.read_text().startswith("#!"))


def test_bash_files_are_scripts_or_sourced_parts():
    """A file without `#!` is a part the scripts source (it says so), not a command with a --help."""
    parts = {p.name for p in (ROOT / "scripts_bash").glob("*.sh")} - set(BASH_SCRIPTS)
    assert parts == {"slurm_tasks.sh", "train_options.sh"}
    assert all((ROOT / "scripts_bash" / name).read_text().startswith("# Sourced by ") for name in parts)


@pytest.mark.parametrize("script", BASH_SCRIPTS)
def test_bash_scripts_print_their_usage(script):
    result = subprocess.run(["bash", f"scripts_bash/{script}", "--help"], cwd=ROOT, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0 and result.stderr == ""
    assert result.stdout.startswith("usage: ") and script in result.stdout.splitlines()[0]
    assert "example:" in result.stdout and "set -" not in result.stdout and "$(" not in result.stdout


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_help_lists_the_schema_keys_with_their_defaults(server, entry):
    result = server.run([*entry.split(), "--help"])
    assert result.returncode == 0 and result.stderr == ""
    text = result.stdout
    assert text.startswith("usage: ") and "\nexample:\n" in text and "--debug" in text
    listed = [(key, default) for key, default, _ in schema_fields()
              if any(key == s or key.startswith(s + ".") for s in ENTRY_POINTS[entry])]
    assert len(listed) >= len(ENTRY_POINTS[entry])
    for key, default in listed:
        domain = rf".* \[{re.escape(DOMAINS[key].text)}\]$" if key in DOMAINS else ""  # e.g. [> 0]
        assert re.search(rf"^  {re.escape(f'{key}={default}')}  +\S{domain}", text, re.MULTILINE), key
