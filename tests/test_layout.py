"""The layout holds: imports run one way (scripts/evaluator → modeling → utils), and every wrong setting is refused at
start-up, in one line that names the key, the value and the allowed values, before any folder is made."""

import ast
import os
import subprocess
import sys
import time
import typing
from pathlib import Path

import pytest

import modeling  # noqa: F401  (the registries declare their choices on import)
from utils.config import REGISTERED_CHOICES, ReARConfig, load_config, schema_fields
from utils.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("modeling", "utils", "evaluator", "scripts")
# Who may import whom: utils imports no project package; modeling imports utils only for the config, weights and
# errors; the evaluator and the scripts wire things together.
ALLOWED = {
    "utils": set(),
    "modeling": {"utils.config", "utils.weights", "utils.errors"},
    "evaluator": {"utils", "modeling"},
    "scripts": {"utils", "modeling", "evaluator"},
}


def project_imports(path: Path):
    """(line, imported module) for every import of a project package in a file, function-level ones included."""
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            if name.split(".")[0] in PACKAGES[:3]:
                yield node.lineno, name


def allowed(package: str, imported: str) -> bool:
    top = imported.split(".")[0]
    if top == package:
        return True
    return any(imported == rule or imported.startswith(rule + ".") for rule in ALLOWED[package])


def test_imports_run_one_way():
    wrong = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            for line, imported in project_imports(path):
                if not allowed(package, imported):
                    wrong.append(f"{path.relative_to(ROOT)}:{line} imports {imported}")
    assert wrong == []


def test_the_import_check_catches_a_backward_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from modeling.rear import ReAR\n    return ReAR\n")
    assert list(project_imports(bad)) == [(2, "modeling.rear.ReAR")]
    assert not allowed("utils", "modeling.rear") and allowed("modeling", "utils.config") and not allowed(
        "modeling", "utils.data.toy")


# ----------------------------------------------------------------------------------------- choices at start-up
def literal_keys():
    """(dotted key, allowed values) of every schema key typed as a fixed set of values."""
    hints = {}

    def walk(cls, prefix):
        for name, hint in typing.get_type_hints(cls).items():
            if isinstance(hint, type) and hasattr(hint, "__dataclass_fields__"):
                walk(hint, f"{prefix}{name}.")
            elif typing.get_origin(hint) is typing.Literal:
                hints[f"{prefix}{name}"] = typing.get_args(hint)

    walk(ReARConfig, "")
    return sorted(hints.items())


CHOICE_KEYS = literal_keys() + sorted((key, tuple(names)) for key, names in REGISTERED_CHOICES.items())


def test_every_fixed_choice_is_typed_in_the_schema():
    keys = {key for key, _ in CHOICE_KEYS}
    assert {"model.generator.perturb_mode", "model.generator.order", "experiment.tracker", "training.mixed_precision",
            "model.vq_model.model_type", "model.generator.backbone", "sampling.precision", "sampling.sampler",
            "dataset.name", "optimizer.name", "lr_scheduler.scheduler"} <= keys
    assert len(keys) == len(CHOICE_KEYS) and all(key in {k for k, *_ in schema_fields()} for key in keys)


@pytest.mark.parametrize("key, choices", CHOICE_KEYS, ids=[key for key, _ in CHOICE_KEYS])
def test_a_bad_choice_is_one_line_naming_key_value_and_choices(key, choices):
    with pytest.raises(ConfigError) as err:
        load_config(None, [f"{key}=bogus_value"])
    message = str(err.value)
    assert "\n" not in message and f"'{key}'" in message and "bogus_value" in message
    assert all(str(choice) in message for choice in choices), message


def test_a_bad_value_stops_the_training_script_in_seconds_and_leaves_nothing(tmp_path):
    out = tmp_path / "run"
    start = time.time()
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "train_rear.py"), "config=configs/rear_toy.yaml",
         f"experiment.output_dir={out}", "model.generator.perturb_mode=swap"],
        cwd=ROOT, capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert time.time() - start < 30
    assert result.returncode == 2
    assert result.stderr.strip() == ("error: bad value for config key 'model.generator.perturb_mode' in the command "
                                     "line: 'swap' is not one of [switch, mask, none]")
    assert not out.exists()
