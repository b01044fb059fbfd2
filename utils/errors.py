"""Errors a user can cause, and how an entry point reports them: one line, no traceback.

A `UserError` says what is wrong and what to do about it; the scripts print it as `error: <message>` and exit with
status 1 (2 for a `UsageError`: a bad command line or configuration). Anything else is a bug of ours and keeps its
traceback. `--debug` or `REAR_DEBUG=1` shows the traceback of a user error too.
"""

from __future__ import annotations


class UserError(Exception):
    """Something the user can fix: a missing or damaged file, bad data, a value out of range."""

    exit_code = 1


class UsageError(UserError):
    """A bad command line or configuration value."""

    exit_code = 2


class ConfigError(UsageError, ValueError):
    """A configuration key or value that the schema does not accept."""


class WeightsError(UserError, ValueError):
    """A weights file that is missing, unreadable, unsafe or does not fit the model."""


class MissingWeightsError(WeightsError, FileNotFoundError):
    """A weights file that is neither local nor obtainable."""


class DataError(UserError, ValueError):
    """Training or evaluation data that cannot be used as it is: the message names the file and the line."""


class OutputError(UserError):
    """An output folder or file that a run must not overwrite or mix with, or a full disk."""


class ResourceError(UserError):
    """A setting the machine cannot hold: a batch that does not fit in memory."""


def out_of_memory(err: BaseException) -> bool:
    """Whether `err` says memory ran out: CUDA's torch.OutOfMemoryError, the CPU allocator's RuntimeError, a
    MemoryError."""
    return (type(err).__name__ == "OutOfMemoryError" or isinstance(err, MemoryError)
            or "can't allocate memory" in str(err))


__all__ = ["ConfigError", "DataError", "MissingWeightsError", "OutputError", "ResourceError", "UsageError", "UserError",
           "WeightsError", "out_of_memory"]
