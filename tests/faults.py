"""Faults at chosen points of a run, for the reliability campaigns (installed in a script's process by
tests/script_runner.py before the script starts; nothing in the project knows about them).

A fault is a dict:
    target  "module:attribute" of the function to wrap, e.g. "os:rename", "torch:save",
            "utils.training.resume:save_file", "shutil:rmtree" (wrapped where the code looks it up)
    match   a regex searched in the call's path-like arguments (default: any call)
    nth     which matching call (default 1)
    action  before   SIGKILL instead of the call
            after    the call, then SIGKILL
            torn     the call, then the file it wrote cut to half its size, then SIGKILL (a kill mid-write)
            partial  half the files of the folder it was given deleted, then SIGKILL (a kill mid-rmtree)
            enospc   the call, the file cut to half, then OSError(ENOSPC) raised (a disk that fills mid-write)
            bug      RuntimeError raised instead of the call (a bug of ours)
            replace  every call answered by the function `with` names ("module:attribute") instead: a stand-in
                     for a slow computation the campaign does not test (`match` and `nth` do not apply)
            signal   the process sends `signal` (a name, default "SIGTERM") to itself, with "to": "launcher" to its
                     parent (torchrun, which passes it on to every process), or with "to": "group" from another
                     process to its whole process group (data loader workers included, as a cluster signals every
                     process of a job), then makes the call (a stop signal arriving at that point; the run goes on)
            oom      torch.OutOfMemoryError raised instead of the call (a batch too large for the GPU)
            erofs    OSError(EROFS) naming the call's path raised instead of the call (a read-only folder: as root,
                     a folder's mode bits do not stop a write)
    rank    only in the process of this RANK (under torchrun; default: every process)
or {"fsize_limit": bytes}: a real limit on the size of any file the process writes (writes past it fail with
EFBIG, "File too large", as on a full disk).
"""

from __future__ import annotations

import errno
import importlib
import os
import re
import resource
import signal
import subprocess
from functools import partial
from typing import Callable, Dict, Sequence


def install(faults: Sequence[Dict]) -> None:
    for fault in faults:
        if "rank" in fault and fault["rank"] != int(os.environ.get("RANK", 0)):
            continue
        if "fsize_limit" in fault:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a failed write, not a killed process
            resource.setrlimit(resource.RLIMIT_FSIZE, (fault["fsize_limit"], resource.RLIM_INFINITY))
            continue
        module_name, attribute = fault["target"].split(":")
        owner = importlib.import_module(module_name)
        *path, name = attribute.split(".")
        for part in path:
            owner = getattr(owner, part)
        setattr(owner, name, _wrapped(getattr(owner, name), fault))


def _wrapped(original: Callable, fault: Dict) -> Callable:
    if fault["action"] == "replace":
        module_name, attribute = fault["with"].split(":")
        return getattr(importlib.import_module(module_name), attribute)
    pattern, nth = re.compile(fault.get("match", "")), fault.get("nth", 1)
    if fault["action"] == "signal":
        action = partial(_signal, getattr(signal, fault.get("signal", "SIGTERM")), fault.get("to", "self"))
    else:
        action = ACTIONS[fault["action"]]
    seen = 0

    def wrapper(*args, **kwargs):
        nonlocal seen
        if pattern.search(" ".join(_path_of(a) or "" for a in args)):
            seen += 1
            if seen == nth:
                return action(original, args, kwargs)
        return original(*args, **kwargs)

    return wrapper


def _path_of(arg) -> str | None:
    if isinstance(arg, (str, os.PathLike)):
        return os.fspath(arg)
    name = getattr(arg, "name", None)  # an open file
    return name if isinstance(name, str) else None


def _written_file(args) -> str:
    """The file a writer wrote: its last path or open-file argument (flushed)."""
    for arg in reversed(args):
        if _path_of(arg) is not None:
            if hasattr(arg, "flush"):
                arg.flush()
            return _path_of(arg)
    raise ValueError("no path-like argument to tear")


def _kill() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _before(original, args, kwargs):
    _kill()


def _after(original, args, kwargs):
    original(*args, **kwargs)
    _kill()


def _torn(original, args, kwargs):
    original(*args, **kwargs)
    _cut_to_half(_written_file(args))
    _kill()


def _partial(original, args, kwargs):
    files = sorted(os.path.join(d, f) for d, _, names in os.walk(args[0]) for f in names)
    for path in files[::2]:
        os.remove(path)
    _kill()


def _enospc(original, args, kwargs):
    original(*args, **kwargs)
    path = _written_file(args)
    _cut_to_half(path)
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)


def _bug(original, args, kwargs):
    raise RuntimeError("injected bug")


def _signal(sig, to, original, args, kwargs):
    if to == "group":  # sent by `kill`, not by this process (which its data loader workers obey)
        subprocess.run(["kill", f"-{sig.name}", "--", f"-{os.getpgrp()}"])
    else:
        os.kill(os.getppid() if to == "launcher" else os.getpid(), sig)
    return original(*args, **kwargs)


def _oom(original, args, kwargs):
    import torch

    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (injected)")


def _erofs(original, args, kwargs):
    raise OSError(errno.EROFS, os.strerror(errno.EROFS), _path_of(args[0]))


def _cut_to_half(path: str) -> None:
    os.truncate(path, os.path.getsize(path) // 2)


ACTIONS = {"before": _before, "after": _after, "torn": _torn, "partial": _partial, "enospc": _enospc, "bug": _bug,
           "oom": _oom, "erofs": _erofs}
