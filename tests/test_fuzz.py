"""The fuzz test: hostile values for every key of the schema, through the real entry points.

For each key of the schema (utils/config.py) the values of its type a user gets wrong: 0, -1, nan, ±inf, a huge
number, an empty value, a value of another type, a folder where a file goes and a file where a folder goes. Each value
the schema refuses must end, through an entry point run as the user runs it (train, sample, pretokenize,
consistency, exposure, demo: tests/script_runner.py), with exit status 2, exactly one line on stderr (`error: ...`,
the line `check` gives, naming the key) and nothing new on disk. Some refusals do not depend on the domains the
schema declares, and are asserted as such (the values `hostile_values` marks True): no number accepts nan, ±inf or
2^63, no key a value of another type or an empty value unless it may be None, no path key a file where a folder goes
or the reverse.

By default every value of every key is classified in-process (milliseconds each), and every third key runs through
one entry point with one of its refused values, entry points and values taken in turn; `python -m pytest -m fuzz
tests/test_fuzz.py` runs the rest: every refused value of every key through every entry point. ISSUE_CASES are the
bad inputs of issue 20 that are not one key's value (a read-only folder, a batch too large for memory, evaluator
files ...), each through the entry point the issue names.
"""

import fnmatch
import functools
import shlex
import typing
from pathlib import Path
from typing import Dict, Optional

import numpy as np
import pytest
import torch

import modeling  # noqa: F401  (fills the registries: their keys' choices are checked too)
from script_runner import ROOT
from test_errors import Row, listing, matches, stderr_lines
from tiny_models import write_tiny_weights
from utils.config import (
    DATA_FILE,
    DOMAINS,
    FOLDER,
    REGISTERED_CHOICES,
    TOKENIZER_WEIGHTS,
    WEIGHTS,
    ConfigError,
    apply_overrides,
    check,
    load_config,
    schema_types,
)
from utils.errors import out_of_memory

TINY = str(ROOT / "configs" / "rear_tiny.yaml")
WEIGHT_FILES = "experiment.tokenizer_checkpoint={F}/tiny_vqgan.safetensors"
# Each runs in {O} (its working folder), with the value under test as {KV}, before the flags.
ENTRY_POINTS = {
    "train": f"{ROOT}/scripts/train_rear.py config={TINY} experiment.output_dir={{O}}/run {WEIGHT_FILES} {{KV}}",
    "sample": f"{ROOT}/scripts/sample_imagenet_rear.py config={TINY} experiment.output_dir={{O}}/samples "
              f"experiment.generator_checkpoint={{F}}/tiny_generator.safetensors {WEIGHT_FILES} {{KV}}",
    "pretokenize": f"{ROOT}/scripts/pretokenization.py config={TINY} {WEIGHT_FILES} {{KV}} --data {{F}}/images "
                   "--output {O}/tokens.jsonl --num_workers 0",
    "consistency": f"-m evaluator.consistency {{F}}/tokens.npz config={TINY} {WEIGHT_FILES} {{KV}} --output {{O}}/c",
    "exposure": f"-m evaluator.exposure config={TINY} experiment.generator_checkpoint={{F}}/tiny_generator.safetensors "
                "{KV} --data {F}/tokens.npz --output {O}/e",
    "demo": f"{ROOT}/scripts/demo.py config={TINY} {{KV}} --generator {{F}}/tiny_generator.safetensors "
            "--tokenizer {F}/tiny_vqgan.safetensors --out {O}/grid.png --classes 1",
}
HUGE = str(2**63)  # one past the largest 64-bit integer


# ------------------------------------------------------------------------------------------- the values, from the schema
@functools.lru_cache(maxsize=None)
def hostile_values(key: str) -> Dict[str, bool]:
    """The values to try for `key` (as typed after `key=`), each with whether it must be refused whatever the key's
    domain (False: the domain decides, e.g. 0 for a count or for a seed)."""
    hint, domain = schema_types()[key], DOMAINS.get(key)
    optional = type(None) in typing.get_args(hint)
    kind = typing.get_args(hint)[0] if optional else hint
    values = {"": not optional}  # `key=`: None, the default of an optional key
    if kind in (int, float):
        values.update({"0": False, "-1": False, "nan": True, "inf": True, "-inf": True, "abc": True, "[1]": True})
        values.update({"1e308": False} if kind is float else {HUGE: True, "1.5": True})
    elif kind is bool:
        values["maybe"] = True
    elif typing.get_origin(kind) is list:
        values.update({"[]": False, "[-1]": False, "[nan]": True, "abc": True, "{a: 1}": True})
    elif typing.get_origin(kind) is dict:
        values.update({"abc": True, "[1]": True})
    elif typing.get_origin(kind) is typing.Literal or key in REGISTERED_CHOICES:
        values["bogus"] = True
    elif domain is FOLDER:
        values.update({"{F}/a_file.txt": True, "''": True})
    elif domain in (DATA_FILE, WEIGHTS, TOKENIZER_WEIGHTS):
        values.update({"{F}/a_folder": True, "''": True})
    return values


CASES = [(key, value, must) for key in schema_types() for value, must in hostile_values(key).items()]


@functools.lru_cache(maxsize=None)
def refusal(key: str, value: str, inputs: str) -> Optional[str]:
    """The error line loading the tiny config with `key=value` gives (None: the value is accepted)."""
    try:
        overridden = apply_overrides(base_config(), [f"{key}={value.replace('{F}', inputs)}"], TINY)
        check(overridden, f"{TINY} and the command line")  # as load_config(TINY, overrides) says it
    except ConfigError as err:
        return str(err)
    return None


@functools.lru_cache(maxsize=None)
def base_config():
    return load_config(TINY)


def through_entry_points():
    """(key, value, entry point) of every value: by default one refused value of every third key, the entry points
    and values taken in turn; the rest under the `fuzz` marker."""
    names, params = list(ENTRY_POINTS), []
    for index, key in enumerate(schema_types()):
        refused = [value for value, must in hostile_values(key).items() if must]
        for value in hostile_values(key):  # the values the domain refuses are known only when run
            for entry in names:
                default = index % 3 == 0 and refused and value == refused[index // 3 % len(refused)] and \
                    entry == names[index // 3 % len(names)]
                params.append(pytest.param(key, value, entry, id=f"{entry}: {key}={value}",
                                           marks=() if default else pytest.mark.fuzz))
    return params


# ------------------------------------------------------------------------------------------- inputs
@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """{F}: the tiny weights, tokens for the measurements, images to pre-tokenize, and a file and a folder."""
    folder = tmp_path_factory.mktemp("fuzz_inputs")
    write_tiny_weights(folder)
    np.savez(folder / "tokens.npz", tokens=np.arange(64).reshape(4, 16) % 32, labels=np.arange(4))
    from PIL import Image

    (folder / "images" / "n01").mkdir(parents=True)
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(folder / "images" / "n01" / "0.png")
    (folder / "a_file.txt").write_text("a file\n")
    (folder / "a_folder").mkdir()
    return folder


def run_in_empty_folder(server, argv: str, inputs: Path, out: Path, **kwargs):
    """The entry point's result, run in the empty folder `out`; asserts it leaves nothing there or in `inputs`."""
    out.mkdir()
    before = listing(inputs)
    result = server.run(shlex.split(argv.replace("{F}", str(inputs)).replace("{O}", str(out))), cwd=out, **kwargs)
    assert listing(out) == {} and listing(inputs) == before, "nothing new on disk"
    return result


# ------------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("key", schema_types())
def test_every_hostile_value_of_a_key_is_refused_in_one_line_naming_it(key, inputs):
    for value, must in hostile_values(key).items():
        line = refusal(key, value, str(inputs))
        assert line is not None or not must, f"{key}={value} is accepted"
        if line is not None:
            assert "\n" not in line and f"'{key}" in line, line


def test_the_sweep_covers_every_key_with_values_of_its_type():
    keys = schema_types()
    assert len(keys) == len({key for key, _, _ in CASES}) >= 150
    assert len(CASES) >= 900 and sum(must for _, _, must in CASES) >= 700


@pytest.mark.parametrize("key, value, entry", through_entry_points())
def test_a_refused_value_through_an_entry_point(server, inputs, tmp_path, key, value, entry):
    line = refusal(key, value, str(inputs))
    if line is None:  # in the key's domain: loading it is the check (running it is other tests' work)
        assert not hostile_values(key)[value]
        return
    argv = ENTRY_POINTS[entry].replace("{KV}", shlex.quote(f"{key}={value}"))
    result = run_in_empty_folder(server, argv, inputs, tmp_path / "out")
    assert (result.returncode, result.stderr) == (2, f"error: {line}\n")


# ------------------------------------------------------------------------------------------- issue 20's cases
TOY = (f"{ROOT}/scripts/train_rear.py config={ROOT}/configs/rear_toy.yaml experiment.output_dir={{O}}/run "
       "model.generator.hidden_size=32 model.generator.num_hidden_layers=2 model.generator.num_attention_heads=2 "
       "model.generator.intermediate_size=64 model.generator.decode_align_layer_idx=1 "
       "model.generator.projection_dim=32 dataset.toy.num_images=64 training.per_gpu_batch_size=8 "
       "sampling.num_samples=10 training.max_train_steps=4 lr_scheduler.params.warmup_steps=2 experiment.save_every=2")
SAMPLE = ENTRY_POINTS["sample"].replace(" {KV}", "") + " sampling.num_samples=10 sampling.per_proc_batch_size=5"
BAD_TOY = f"bad config value in {ROOT}/configs/rear_toy.yaml and the command line: "
BAD_TINY = f"bad config value in {TINY} and the command line: "
OOM = "CUDA out of memory. Tried to allocate 20.00 GiB (injected)"
ISSUE_CASES = [
    # tracebacks
    Row("train: dataset.toy.num_images=0", TOY + " dataset.toy.num_images=0", 2,
        BAD_TOY + "'dataset.toy.num_images' is 0 (must be > 0)"),
    Row("train: learning rate -1", TOY + " optimizer.params.learning_rate=-1", 2,
        BAD_TOY + "'optimizer.params.learning_rate' is -1.0 (must be > 0)"),
    Row("train: no attention heads", TOY + " model.generator.num_attention_heads=0", 2,
        BAD_TOY + "'model.generator.num_attention_heads' is 0 (must be > 0)"),
    Row("train: guidance scale nan", TOY + " sampling.guidance_scale=nan", 2,
        BAD_TOY + "'sampling.guidance_scale' is nan (must be finite and >= 0)"),
    Row("train: guidance scale inf", TOY + " model.generator.guidance_scale=inf", 2,
        BAD_TOY + "'model.generator.guidance_scale' is inf (must be finite and >= 0)"),
    Row("sample: guidance scale nan", SAMPLE + " sampling.guidance_scale=nan", 2,
        BAD_TINY + "'sampling.guidance_scale' is nan (must be finite and >= 0)"),
    Row("sample: seed -1", SAMPLE + " sampling.seed=-1", 2, BAD_TINY + "'sampling.seed' is -1 (must be in [0, 2^31))"),
    Row("train: output folder an existing file", TOY + " experiment.output_dir={F}/a_file.txt", 2,
        BAD_TOY + "'experiment.output_dir' is '{F}/a_file.txt' (must be a folder, made if missing; not a file)"),
    Row("sample: output folder an existing file", SAMPLE + " experiment.output_dir={F}/a_file.txt", 2,
        BAD_TINY + "'experiment.output_dir' is '{F}/a_file.txt' (must be a folder, made if missing; not a file)"),
    Row("sample: DIR.npz a folder", SAMPLE + " experiment.output_dir={F}/a", 2,
        "experiment.output_dir={F}/a writes {F}/a.npz, which is a folder; choose another experiment.output_dir"),
    Row("train: a read-only output folder", TOY, 1,
        "{O}/run: Read-only file system (a read-only folder?); choose another path, or change its permissions",
        faults=({"target": "os:makedirs", "match": "{O}/run$", "action": "erofs"},)),
    Row("sample: a read-only output folder", SAMPLE, 1,
        "{O}/samples: Read-only file system (a read-only folder?); choose another path, or change its permissions",
        faults=({"target": "os:makedirs", "match": "{O}/samples$", "action": "erofs"},)),
    Row("train: a batch too large for memory", TOY, 1,
        f"out of memory at step 1 with training.per_gpu_batch_size=8 on cpu ({OOM}); use a smaller "
        "training.per_gpu_batch_size (with a larger training.gradient_accumulation_steps for the same global batch), "
        "or model.generator.use_checkpoint=True",
        faults=({"target": "utils.training.step:train_step", "action": "oom"},)),
    Row("sample: a batch too large for memory", SAMPLE, 1,
        f"out of memory sampling a batch of sampling.per_proc_batch_size=5 images on cpu ({OOM}); use a smaller "
        "sampling.per_proc_batch_size (the samples depend on it)",
        faults=({"target": "modeling.sampler:sample", "action": "oom"},)),
    Row("train: init_weight a text file", TOY + " experiment.init_weight={F}/a_file.txt", 1,
        "{F}/a_file.txt is not a weights file: neither a .safetensors file nor one torch.save writes (it begins "
        "with b'a fi')"),
    Row("evaluator: sample batch of the wrong shape", "-m evaluator {F}/ref.npz {F}/gray.npz", 1,
        "{F}/gray.npz: 'arr_0' must be uint8 images of shape (N, H, W, 3), got uint8 (4, 16, 16, 1)"),
    Row("evaluator: images of no pixels", "-m evaluator {F}/ref.npz {F}/no_pixels.npz", 1,
        "{F}/no_pixels.npz: 'arr_0' must be uint8 images of shape (N, H, W, 3), got uint8 (4, 0, 0, 3)"),
    Row("evaluator: a truncated sample batch", "-m evaluator {F}/ref.npz {F}/truncated.npz", 1,
        "{F}/truncated.npz is not an .npz file (not a zip archive)"),
    Row("evaluator: sample batch a folder", "-m evaluator {F}/ref.npz {F}/a_folder", 1,
        "{F}/a_folder: a folder, not a file"),
    Row("evaluator: Inception weights a folder",
        "-m evaluator {F}/ref.npz {F}/ref.npz --allow-few-samples --inception-weights {F}/a_folder", 1,
        "Inception weights {F}/a_folder: a folder, not a file"),
    Row("consistency: tokens a folder", ENTRY_POINTS["consistency"].replace(" {KV}", "").replace(
        "{F}/tokens.npz", "{F}/a_folder"), 1,
        "{F}/a_folder: a folder, not a file (expected .npz (tokens, labels), .npy (tokens) or .jsonl (pre-tokenized))"),
    Row("exposure: --data a folder", ENTRY_POINTS["exposure"].replace(" {KV}", "").replace(
        "{F}/tokens.npz", "{F}/a_folder"), 1,
        "{F}/a_folder: a folder, not a file (expected .npz (tokens, labels), .npy (tokens) or .jsonl (pre-tokenized))"),
    Row("evaluator: --json a folder", "-m evaluator {F}/ref.npz {F}/ref.npz --json {F}/a_folder", 2,
        "argument --json: {F}/a_folder is a folder, not a file to write (see --help)"),
    Row("pretokenize: --output a folder", ENTRY_POINTS["pretokenize"].replace(" {KV}", "").replace(
        "{O}/tokens.jsonl", "{F}/a_folder"), 2,
        "argument --output: {F}/a_folder is a folder, not a file to write (see --help)"),
    # accepted
    Row("train: max_grad_norm nan", TOY + " training.max_grad_norm=nan", 2,
        BAD_TOY + "'training.max_grad_norm' is nan (must be finite)"),
    Row("train: warm-up -10", TOY + " lr_scheduler.params.warmup_steps=-10", 2,
        BAD_TOY + "'lr_scheduler.params.warmup_steps' is -10 (must be >= 0)"),
    Row("sample: temperature inf", SAMPLE + " sampling.temperature=inf", 2,
        BAD_TINY + "'sampling.temperature' is inf (must be finite and > 0)"),
    Row("sample: guidance scale -1", SAMPLE + " sampling.guidance_scale=-1", 2,
        BAD_TINY + "'sampling.guidance_scale' is -1.0 (must be >= 0)"),
    # misleading
    Row("train: learning rate nan", TOY + " optimizer.params.learning_rate=nan", 2,
        BAD_TOY + "'optimizer.params.learning_rate' is nan (must be finite and > 0)"),
    Row("train: config a folder", f"{ROOT}/scripts/train_rear.py config={{F}}/a_folder", 2,
        "config file {F}/a_folder is a folder, not a YAML file"),
    Row("sample: checkpoint a folder", SAMPLE + " experiment.generator_checkpoint={F}/a_folder", 2,
        BAD_TINY + "'experiment.generator_checkpoint' is '{F}/a_folder' (must be a weights file or a released name, "
        "not a folder)"),
    Row("demo: --generator a folder", ENTRY_POINTS["demo"].replace(" {KV}", "").replace(
        "{F}/tiny_generator.safetensors", "{F}/a_folder"), 1,
        "{F}/a_folder is a folder, not a weights file; pass the file with --generator PATH"),
    Row("train: an empty config file", f"{ROOT}/scripts/train_rear.py config={{F}}/empty.yaml", 2,
        "config file {F}/empty.yaml is empty: it sets no section (experiment:, model:, ...)"),
    Row("train: output_dir empty", TOY + " experiment.output_dir=", 2,
        "bad value for config key 'experiment.output_dir' in the command line: it is empty, but it needs a value of "
        "type str"),
    # a write
    Row("train: the file-size limit at the tail of optimizer.pt (torch's error names no limit)", TOY, 1,
        "the file-size limit (ulimit -f: 990000 bytes) is reached: could not save checkpoint "
        "{O}/run/checkpoints/checkpoint-00000002 ({O}/run/checkpoints/checkpoint-00000002.tmp-save/optimizer.pt: …); "
        "the earlier checkpoints are intact: raise the limit (ulimit -f unlimited) and rerun to resume",
        faults=({"fsize_limit": 990_000},), left=("run", "run/config.yaml", "run/tokenizer.safetensors", "run/checkpoints")),
]


@pytest.fixture(scope="module")
def issue_inputs(inputs):
    """{F} with the evaluator's bad files and an empty config."""
    np.savez(inputs / "ref.npz", arr_0=np.zeros((4, 16, 16, 3), np.uint8))
    np.savez(inputs / "gray.npz", arr_0=np.zeros((4, 16, 16, 1), np.uint8))
    np.savez(inputs / "no_pixels.npz", arr_0=np.zeros((4, 0, 0, 3), np.uint8))
    data = (inputs / "ref.npz").read_bytes()
    (inputs / "truncated.npz").write_bytes(data[: len(data) // 2])
    (inputs / "empty.yaml").write_text("")
    (inputs / "a.npz").mkdir()
    return inputs


@pytest.mark.parametrize("row", ISSUE_CASES, ids=[row.id for row in ISSUE_CASES])
def test_an_input_of_issue_20_is_one_line(server, issue_inputs, tmp_path, row):
    out = tmp_path / "out"
    out.mkdir()
    fill = lambda text: text.replace("{F}", str(issue_inputs)).replace("{O}", str(out))  # noqa: E731
    before = listing(issue_inputs)
    faults = [{k: fill(v) if isinstance(v, str) else v for k, v in fault.items()} for fault in row.faults]
    result = server.run(shlex.split(fill(row.argv)), cwd=out, faults=faults)
    lines = stderr_lines(result.stderr)
    assert result.returncode == row.code, result.stderr
    assert "Traceback" not in result.stderr
    assert [line for line in lines if line.startswith("error:")] == [lines[-1]]
    assert matches(fill(row.line), lines[-1].removeprefix("error: ")), lines[-1]
    left = [path for path in listing(out) if not any(fnmatch.fnmatch(path, pattern) for pattern in row.left)]
    assert left == [] and listing(issue_inputs) == before, "nothing new on disk"


@pytest.mark.parametrize("error, is_oom", [
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"), True),
    (RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: you "
                  "tried to allocate 40000000000000 bytes. Error code 12 (Cannot allocate memory)"), True),
    (MemoryError(), True),
    (RuntimeError("mat1 and mat2 shapes cannot be multiplied (2x3 and 4x5)"), False),  # a bug: its traceback
])
def test_out_of_memory_on_a_gpu_or_a_cpu_is_told_from_other_errors(error, is_oom):
    assert out_of_memory(error) == is_oom
