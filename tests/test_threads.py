"""Every entry point starts with the same thread defaults (utils/threads.py), set before torch is imported: each
script calls `use_thread_defaults()` before its first import of anything outside the standard library, and the
`evaluator` package (which `python -m evaluator...` imports first) does it on import. Nothing else sets them."""

import ast
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENTRY_POINTS = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "scripts").glob("*.py")) + ["evaluator/__init__.py"]


def first_call_and_first_import(path: Path):
    """(line of the module-level `use_thread_defaults()` call or None, line of the first module-level import of a
    module outside the standard library other than utils.threads)."""
    call, imported = None, None
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Call) and getattr(
                node.value.func, "id", None) == "use_thread_defaults":
            call = call or node.lineno
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
            [node.module] if isinstance(node, ast.ImportFrom) and node.module else [])
        if any(n.split(".")[0] not in sys.stdlib_module_names and n not in ("__future__", "utils.threads")
               for n in names):
            imported = imported or node.lineno
    return call, imported


@pytest.mark.parametrize("path", ENTRY_POINTS)
def test_each_entry_point_sets_the_thread_defaults_before_its_imports(path):
    call, imported = first_call_and_first_import(ROOT / path)
    assert call is not None, f"{path} does not call use_thread_defaults()"
    assert imported is None or call < imported, f"{path}: line {imported} imports before the defaults (line {call})"


def test_the_check_sees_an_import_before_the_defaults(tmp_path):
    script = tmp_path / "x.py"
    script.write_text("import os\nimport torch\nfrom utils.threads import use_thread_defaults\nuse_thread_defaults()\n")
    assert first_call_and_first_import(script) == (4, 2)


def test_every_evaluator_command_is_in_the_package_and_nothing_else_sets_them():
    commands = [p for p in (ROOT / "evaluator").glob("*.py") if '__name__ == "__main__"' in p.read_text()]
    assert {p.name for p in commands} >= {"__main__.py", "consistency.py", "exposure.py", "compare.py", "toy.py"}
    setting = re.compile(r"environ(\.setdefault\(|\[)\s*[\"']OMP_|[\"']OMP_WAIT_POLICY[\"']\s*:")
    setters = [str(p.relative_to(ROOT)) for package in ("modeling", "utils", "evaluator", "scripts")
               for p in (ROOT / package).rglob("*.py") if setting.search(p.read_text())]
    assert setters == ["utils/threads.py"]
    assert setting.search('os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")')
    assert not setting.search('os.environ.get("OMP_WAIT_POLICY")')  # reading it (benchmark.py's report) is fine


def test_the_sampler_has_them_when_torch_loads():
    """The 50k sampler run as a user runs it, with nothing set: OMP_WAIT_POLICY as torch is first imported."""
    probe = (
        "import builtins, json, os, runpy, sys\n"
        "seen, real_import = {}, builtins.__import__\n"
        "def spy(name, *args, **kwargs):\n"
        "    if name.split('.')[0] == 'torch' and 'torch' not in seen:\n"
        "        seen['torch'] = os.environ.get('OMP_WAIT_POLICY')\n"
        "    return real_import(name, *args, **kwargs)\n"
        "builtins.__import__ = spy\n"
        "sys.argv = ['scripts/sample_imagenet_rear.py', '--help']\n"
        "try:\n"
        "    runpy.run_path(sys.argv[0], run_name='__main__')\n"
        "except SystemExit:\n"
        "    pass\n"
        "print(json.dumps(seen))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    result = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=120)
    assert json.loads(result.stdout.splitlines()[-1]) == {"torch": "PASSIVE"}
