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


# ----------------------------------------------------------------------------------------- the sampling files
# The per-token primitives (modeling/next_token.py) are a leaf that the loop (generator.py), the fast sampler, the
# call site (sampler.py) and the backbones all use; none of these files imports another in a cycle.
SAMPLING_FILES = ["modeling/next_token.py", "modeling/sampler.py", "modeling/fast_sampler.py", "modeling/generator.py",
                  "modeling/rear.py", "modeling/objective.py",
                  *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "modeling" / "backbones").glob("[!_]*.py"))]


def module_of(path: str) -> str:
    return path.removesuffix(".py").removesuffix("/__init__").replace("/", ".")


def imported_modules(root: Path, path: str) -> set:
    """The project modules a file imports (function-level imports included), relative imports resolved; an imported
    name that is itself a module (`from modeling import sampler`) counts as that module."""
    package = module_of(path).rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse((root / path).read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join([*parts[: len(parts) - node.level + 1], *filter(None, [base])])
            found.add(base)
            found |= {f"{base}.{alias.name}" for alias in node.names}
    return {name for name in found if (root / (name.replace(".", "/") + ".py")).is_file()}


def import_cycles(root: Path, files) -> list:
    """Cycles of imports among `files` (module paths relative to `root`), each as the list of its modules."""
    modules = {module_of(f): f for f in files}
    edges = {m: sorted(imported_modules(root, f) & modules.keys()) for m, f in modules.items()}
    cycles, done = [], set()

    def visit(module, path):
        if module in path:
            cycles.append(path[path.index(module):] + [module])
            return
        if module in done:
            return
        for target in edges[module]:
            visit(target, path + [module])
        done.add(module)

    for module in modules:
        visit(module, [])
    return cycles


def test_the_sampling_files_import_no_cycle_and_next_token_is_a_leaf():
    assert import_cycles(ROOT, SAMPLING_FILES) == []
    assert imported_modules(ROOT, "modeling/next_token.py") == {"utils.config"}  # and torch: no other modeling file
    users = [f for f in SAMPLING_FILES if "modeling.next_token" in imported_modules(ROOT, f)]
    assert {"modeling/sampler.py", "modeling/fast_sampler.py", "modeling/generator.py",
            "modeling/backbones/gpt1d.py"} <= set(users)


def test_the_cycle_check_finds_a_cycle(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "a.py").write_text("from pkg.b import f\n")
    (tmp_path / "pkg" / "b.py").write_text("def f():\n    from pkg import c\n")
    (tmp_path / "pkg" / "c.py").write_text("from . import a\n")
    assert import_cycles(tmp_path, ["pkg/a.py", "pkg/b.py", "pkg/c.py"]) == [["pkg.a", "pkg.b", "pkg.c", "pkg.a"]]


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
