"""Run the entry points as the user does (`python scripts/X.py ...`, `python -m evaluator ...`) in separate
processes, fast: a server process imports torch and the project once, then forks one child per run.

A child runs the script's real `__main__` path (`runpy` with run_name "__main__") with its own argv, environment,
working folder, stdout and stderr, and ends the way the interpreter ends a script: status 0, the code of a
`SystemExit`, or the traceback and status 1 of an uncaught exception. A plain interpreter start costs ~3.5 s of
imports here; a fork, milliseconds. `faults` (see tests/faults.py) are installed in the child before the script
starts: that is how a campaign kills a run at a chosen point. `imports` (module files) are imported in the child
first: that is how a test adds a tokenizer or a backbone of its own to the registries, as a module in the package
would.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
PRELOAD = ("torch", "numpy", "safetensors.torch", "accelerate", "omegaconf", "webdataset", "PIL.Image",
           "modeling", "modeling.sampler", "modeling.objective", "utils.cli", "utils.training.resume",
           "utils.training.step", "utils.data.loader", "utils.fid_samples.run", "evaluator.evaluation")


@dataclass
class Result:
    returncode: int  # -9 for a child killed by SIGKILL, as subprocess reports it
    stdout: str
    stderr: str


class ScriptServer:
    def __init__(self):
        from utils.threads import THREAD_DEFAULTS

        env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", **THREAD_DEFAULTS}
        env.pop("REAR_DEBUG", None)
        self.process = subprocess.Popen([sys.executable, __file__], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        env=env, cwd=ROOT, text=True)
        self.folder = tempfile.mkdtemp(prefix="script_runner_")

    def run(self, argv: Sequence[str], env: Optional[dict] = None, cwd=ROOT, faults: Sequence[dict] = (),
            timeout: float = 120, imports: Sequence[str] = ()) -> Result:
        """`argv` as after `python`: ["scripts/train_rear.py", "config=..."] or ["-m", "evaluator", ...]."""
        out, err = os.path.join(self.folder, "stdout"), os.path.join(self.folder, "stderr")
        request = {"argv": [str(a) for a in argv], "env": env or {}, "cwd": str(cwd), "stdout": out, "stderr": err,
                   "faults": list(faults), "imports": [str(path) for path in imports]}
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        pid = json.loads(self.process.stdout.readline())["pid"]
        timer = _Timer(timeout, lambda: os.kill(pid, signal.SIGKILL))
        try:
            returncode = json.loads(self.process.stdout.readline())["returncode"]
        finally:
            timer.cancel()
        if timer.fired:
            raise TimeoutError(f"{argv} ran longer than {timeout} s")
        return Result(returncode, Path(out).read_text(), Path(err).read_text())

    def close(self):
        self.process.stdin.close()
        self.process.wait(timeout=30)


class _Timer:
    def __init__(self, seconds, action):
        import threading

        self.fired = False

        def fire():
            self.fired = True
            action()

        self.timer = threading.Timer(seconds, fire)
        self.timer.start()

    def cancel(self):
        self.timer.cancel()


# ------------------------------------------------------------------------------------------- the server side
def _serve() -> None:
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "tests"))
    import importlib

    for name in PRELOAD:
        importlib.import_module(name)
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            _child(request)  # never returns
        print(json.dumps({"pid": pid}), flush=True)
        _, status = os.waitpid(pid, 0)
        print(json.dumps({"returncode": os.waitstatus_to_exitcode(status)}), flush=True)


def _child(request: dict) -> None:
    import atexit
    import importlib.util
    import runpy

    os.chdir(request["cwd"])
    os.environ.update(request["env"])
    stdout, stderr = open(request["stdout"], "w"), open(request["stderr"], "w")
    os.dup2(stdout.fileno(), 1)
    os.dup2(stderr.fileno(), 2)
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)  # not the server's request pipe
    sys.stdout, sys.stderr, sys.stdin = stdout, stderr, open(os.devnull)
    argv = request["argv"]
    code = 0
    try:
        for path in request["imports"]:
            spec = importlib.util.spec_from_file_location(Path(path).stem, path)
            sys.modules[spec.name] = module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        if request["faults"]:
            import faults

            faults.install(request["faults"])
        if argv[0] == "-m":
            sys.argv = [argv[1], *argv[2:]]
            runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
        else:
            sys.argv = list(argv)
            runpy.run_path(argv[0], run_name="__main__")
    except SystemExit as exit_:  # as the interpreter ends on SystemExit
        if exit_.code is None or isinstance(exit_.code, int):
            code = exit_.code or 0
        else:
            print(exit_.code, file=sys.stderr)
            code = 1
    except BaseException:
        sys.excepthook(*sys.exc_info())
        code = 1
    finally:
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    _serve()
