"""Writing files so that a crash never leaves a half-written one: the one atomic-write helper every writer uses.

A file (or folder) is written under a temporary name beside its destination, flushed to disk, and renamed into
place; a reader (or a rerun after a kill) sees the whole file or none of it. A full disk is reported as such,
naming the file, and the temporary is removed.
"""

from __future__ import annotations

import errno
import glob
import json
import os
import shutil
import socket
from contextlib import contextmanager
from typing import IO, Any, Iterator

from utils.errors import OutputError

TEMPORARY_MARK = ".tmp-"
DISK_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
DISK_FULL_TEXTS = ("No space left", "os error 28", "os error 27", "File too large", "Disk quota")


def temporary_name(path: str) -> str:
    return f"{path}{TEMPORARY_MARK}{os.getpid()}"


def is_disk_full(err: BaseException) -> bool:
    """A write that failed for lack of space (libraries such as safetensors report it only in their message)."""
    if isinstance(err, OSError) and err.errno in DISK_FULL_ERRNOS:
        return True
    return any(text in str(err) for text in DISK_FULL_TEXTS)


def fsync_path(path: str) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _remove(path: str) -> None:
    if os.path.isdir(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.exists(path):
        os.remove(path)


@contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """Yield a temporary path to write `path`'s contents to (a file, or a folder the caller creates); on success it
    is flushed and renamed to `path`, on any error removed."""
    tmp = temporary_name(path)
    _remove(tmp)  # left by an earlier process with our pid
    try:
        yield tmp
        for name in [tmp] if os.path.isfile(tmp) else [os.path.join(tmp, n) for n in os.listdir(tmp)]:
            fsync_path(name)
        os.replace(tmp, path)
    except BaseException as err:
        _remove(tmp)
        if is_disk_full(err):
            raise OutputError(f"the disk is full: could not write {path} ({err}); free some space and rerun") from None
        raise


@contextmanager
def atomic_open(path: str, mode: str = "w") -> Iterator[IO]:
    """`open(path, mode)` for writing, atomically."""
    with atomic_path(path) as tmp, open(tmp, mode) as f:
        yield f


def write_json(path: str, data: Any) -> None:
    with atomic_open(path) as f:
        json.dump(data, f, indent=2, sort_keys=True)


def read_record(path: str) -> dict:
    """The JSON object a run recorded in `path`; ValueError saying what is wrong for a file that holds none (a
    damaged record: not UTF-8, not JSON, or JSON of another kind)."""
    with open(path, encoding="utf-8") as f:
        value = json.load(f)  # UnicodeDecodeError and JSONDecodeError are ValueErrors
    if not isinstance(value, dict):
        raise ValueError(f"it holds a {type(value).__name__}, not the settings")
    return value


def changed_settings(recorded: dict, now: dict) -> str:
    """"key: old (there) vs new (now), ..." for each key whose value differs between two records; "" for none."""
    differ = sorted(k for k in now.keys() | recorded.keys() if now.get(k) != recorded.get(k))
    return ", ".join(f"{k}: {recorded.get(k)!r} (there) vs {now.get(k)!r} (now)" for k in differ)


def remove_temporaries(directory: str) -> int:
    """Delete the temporaries an interrupted writer left in `directory` (not recursively); returns how many."""
    leftovers = glob.glob(os.path.join(glob.escape(directory), f"*{TEMPORARY_MARK}*"))
    leftovers += glob.glob(os.path.join(glob.escape(directory), f".*{TEMPORARY_MARK}*"))
    for path in leftovers:
        _remove(path)
    return len(leftovers)


def remove_temporaries_of(path: str) -> int:
    """Delete the temporaries an interrupted writer of `path` left (not those of other files in its folder, which
    another run may be writing right now); returns how many."""
    leftovers = glob.glob(f"{glob.escape(path)}{TEMPORARY_MARK}*")
    for leftover in leftovers:
        _remove(leftover)
    return len(leftovers)


def check_shared(path: str, rank: int) -> None:
    """`path`, which process 0 has just written, must be visible to process `rank`: on several machines every process
    writes into one output folder, which must be on a file system they all share."""
    if not os.path.exists(path):
        raise OutputError(f"process {rank} on {socket.gethostname()} does not see {path}, which process 0 wrote: the "
                          "output folder must be on a file system that every machine shares")


__all__ = ["atomic_open", "check_shared", "atomic_path", "changed_settings", "is_disk_full", "read_record", "remove_temporaries",
           "remove_temporaries_of", "temporary_name", "write_json"]
