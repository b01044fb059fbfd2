"""Writing files so that a crash never leaves a half-written one: the one atomic-write helper every writer uses.

A file (or folder) is written under a temporary name beside its destination, flushed to disk, given the permissions
the umask allows (as a plain `open` would: libraries that write through a private temporary make it 0600), and
renamed into place; a reader (or a rerun after a kill) sees the whole file or none of it. A write stopped by a full
disk, a disk quota or the file-size limit (`ulimit -f`) is one error that says which and names the file, and the
temporary is removed.
"""

from __future__ import annotations

import errno
import glob
import json
import os
import resource
import shutil
import socket
from contextlib import contextmanager
from typing import IO, Any, Iterator, Optional

from utils.errors import OutputError

TEMPORARY_MARK = ".tmp-"
LIBRARY_TEMPORARY = ".tmp??????"  # what safetensors writes before its own rename (Rust's tempfile, in the same folder)
# errno (and the text libraries that drop it say) -> what stopped the write, what to do about it
LIMITS = {
    errno.ENOSPC: ("the disk is full", "free some space", ("No space left", "os error 28")),
    errno.EDQUOT: ("the disk quota is exceeded", "free some space or raise the quota", ("Disk quota", "os error 122")),
    errno.EFBIG: ("the file-size limit (ulimit -f{size}) is reached", "raise the limit (ulimit -f unlimited)",
                  ("File too large", "os error 27")),
}
ALMOST_FULL_BYTES = 1 << 20  # a write that failed with less free space than this failed for lack of it


def temporary_name(path: str) -> str:
    return f"{path}{TEMPORARY_MARK}{os.getpid()}"


def _file_size_limit() -> Optional[int]:
    soft, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
    return None if soft == resource.RLIM_INFINITY else soft


def _files_under(path: str) -> list:
    if os.path.isfile(path):
        return [path]
    return [os.path.join(d, name) for d, _, names in os.walk(path) for name in names]


def _limit_errno(err: BaseException, path: Optional[str]) -> Optional[int]:
    """The errno of the limit that stopped a write to `path` (a file, or a folder being filled), or None. A library
    that drops the errno (torch's 'unexpected pos', 'iostream error') is diagnosed from the file-size limit and
    the free space left."""
    code = getattr(err, "errno", None)
    if code in LIMITS:
        return code
    for code, (_, _, texts) in LIMITS.items():
        if any(text in str(err) for text in texts):
            return code
    if path is None or not os.path.exists(path):
        return None
    limit = _file_size_limit()
    if limit is not None and any(os.path.getsize(f) >= limit for f in _files_under(path)):
        return errno.EFBIG
    stat = os.statvfs(path)
    return errno.ENOSPC if stat.f_bavail * stat.f_frsize < ALMOST_FULL_BYTES else None


def _file_written(err: BaseException, written: Optional[str]) -> Optional[str]:
    """The file a failed write was writing, if known: named by the error, or the one at the file-size limit."""
    if getattr(err, "filename", None):
        return err.filename
    limit = _file_size_limit()
    at_limit = [f for f in _files_under(written) if os.path.getsize(f) >= limit] if written and limit else []
    return at_limit[0] if at_limit else None


class WriteStopped(OutputError):
    """A write that a full disk, a disk quota or the file-size limit stopped: which of them, and the file."""

    def __init__(self, what: str, file: Optional[str], error: str, remedy: str):
        self.what, self.file, self.error, self.remedy = what, file, error, remedy
        target = f": could not write {file}" if file else ""
        super().__init__(f"{what}{target} ({error}); {remedy} and rerun")

    @property
    def detail(self) -> str:
        """The error, with the file it was writing when the error does not name it."""
        return self.error if not self.file or self.file in self.error else f"{self.file}: {self.error}"


def write_stopped(err: BaseException, path: Optional[str], written: Optional[str] = None) -> Optional[WriteStopped]:
    """`err` as a WriteStopped when a full disk, a quota or the file-size limit stopped the write of `path` (under
    the name `written`: its temporary, or the folder being filled); None for any other error."""
    written = written or path
    code = _limit_errno(err, written)
    if code is None:
        return None
    what, remedy, _ = LIMITS[code]
    limit = _file_size_limit()
    inner = _file_written(err, written)
    return WriteStopped(what.format(size=f": {limit} bytes" if limit is not None else ""),
                        path if inner in (None, written) else inner,
                        str(err).splitlines()[0] if str(err) else type(err).__name__, remedy)


@contextmanager
def writing(path: str, temporary: Optional[str] = None) -> Iterator[None]:
    """Around a write of `path` (under the name `temporary` if given): a full disk, a quota or the file-size limit
    is one WriteStopped that says which and names the file."""
    try:
        yield
    except Exception as err:
        stopped = None if isinstance(err, WriteStopped) else write_stopped(err, path, temporary)
        if stopped is None:
            raise
        raise stopped from None


def _umask() -> int:
    """The process's umask: read from /proc (Linux), which leaves it as it is; elsewhere set and restored at once."""
    try:
        with open("/proc/self/status") as f:
            return int(next(line for line in f if line.startswith("Umask:")).split()[1], 8)
    except (OSError, StopIteration):
        umask = os.umask(0o022)
        os.umask(umask)
        return umask


def follow_umask(path: str) -> None:
    """Give `path` (a file, or a folder and all it holds) the permissions a plain `open` or `mkdir` would: a colleague
    on a shared cluster reads a run's weights as they read its logs."""
    umask = _umask()
    for folder, _, names in os.walk(path) if os.path.isdir(path) else ():
        os.chmod(folder, 0o777 & ~umask)
        for name in names:
            os.chmod(os.path.join(folder, name), 0o666 & ~umask)
    if os.path.isfile(path):
        os.chmod(path, 0o666 & ~umask)


def not_a_file(path: str) -> Optional[str]:
    """Why `path` cannot be read as a file ("no such file", "a folder, not a file"), or None when it can."""
    if os.path.isdir(path):
        return "a folder, not a file"
    return None if os.path.isfile(path) else "no such file"


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
    is flushed and renamed to `path`, on any error removed. A path has one writer at a time: the temporaries of
    `path` a killed writer left are removed first."""
    tmp = temporary_name(path)
    remove_temporaries_of(path)
    try:
        with writing(path, tmp):
            yield tmp
            for name in [tmp] if os.path.isfile(tmp) else [os.path.join(tmp, n) for n in os.listdir(tmp)]:
                fsync_path(name)
        follow_umask(tmp)
        os.replace(tmp, path)
    finally:
        _remove(tmp)  # gone once renamed: only a failed write's is left


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
    leftovers += glob.glob(os.path.join(glob.escape(directory), LIBRARY_TEMPORARY))
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


__all__ = ["WriteStopped", "atomic_open", "atomic_path", "changed_settings", "check_shared", "follow_umask", "not_a_file",
           "read_record", "remove_temporaries", "remove_temporaries_of", "temporary_name", "write_json",
           "write_stopped", "writing"]
