"""The command line every script shares: `config=FILE.yaml a.b=c ... [--flags]`, `--help` generated from the config
schema, and errors a user causes printed as one line.

`run(script, main)` is each script's `__main__`: it parses the arguments, calls `main(config, flags)`, and turns a
`UserError` into `error: <message>` on stderr with exit status 1 (2 for usage errors). A bug of ours keeps its
traceback; `--debug` (or `REAR_DEBUG=1`) shows the traceback of a user error too.
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
import warnings
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence, Tuple

from omegaconf import DictConfig

from utils.config import DOMAINS, load_config, schema_fields, split_cli
from utils.errors import ConfigError, OutputError, UsageError, UserError
from utils.files import write_stopped

DEBUG_ENV = "REAR_DEBUG"


@dataclass
class Script:
    """What `--help` says about a script: its usage, summary, example and the config sections it reads."""

    usage: str  # e.g. "python scripts/train_rear.py config=FILE.yaml [key.sub=value ...]"
    summary: str
    example: str
    sections: Sequence[str] = ()  # dotted prefixes of the config keys it lists, e.g. ("training", "model.generator")
    flags: Optional[argparse.ArgumentParser] = None  # the script's own --flags
    config_required: bool = True
    takes_config: bool = True  # False: the script has flags only
    default_config: Optional[Callable[[argparse.Namespace], Optional[str]]] = None  # config when none is given
    positional: Optional[str] = None  # one plain argument (a file, no '='), kept as flags.<positional>
    notes: List[str] = field(default_factory=list)


def flag_parser(description: str = "") -> argparse.ArgumentParser:
    """An argparse parser for a script's own flags (`--help` and errors are handled by `parse`)."""
    return argparse.ArgumentParser(description=description, add_help=False, allow_abbrev=False,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)


class _FlagError(Exception):
    pass


def _raise_flag_error(message: str) -> None:
    raise _FlagError(message)


def help_text(script: Script) -> str:
    lines = [f"usage: {script.usage}", "", script.summary.strip(), "", "example:", f"  {script.example}"]
    if script.flags is not None and script.flags._actions:
        lines += ["", "flags:"]
        body = script.flags.format_help().split("\n\n", 1)[1]  # without argparse's usage paragraph
        lines += ["  " + line for line in body.splitlines() if line.strip()]
    if script.sections:
        rows = [(key, default, text + (f" [{DOMAINS[key].text}]" if key in DOMAINS else ""))
                for key, default, text in schema_fields()
                if any(key == s or key.startswith(s + ".") for s in script.sections)]
        width = max(len(f"{key}={default}") for key, default, _ in rows)
        lines += ["", "main config keys (key=default  what it does [its domain]; any schema key can be set, see "
                  "docs/configuration.md):"]
        lines += [f"  {f'{key}={default}':<{width}}  {text}" for key, default, text in rows]
    lines += ["", "  --debug  show the full traceback of an error (or set REAR_DEBUG=1)", *script.notes]
    return "\n".join(lines)


def parse(argv: Sequence[str], script: Script) -> Tuple[DictConfig, argparse.Namespace]:
    """(config, flags) from `config=FILE a.b=c ... --flag value ...`; `--help` prints the help and exits."""
    argv = list(argv)
    if "-h" in argv or "--help" in argv:
        print(help_text(script))
        raise SystemExit(0)
    argv = [a for a in argv if a != "--debug"]
    flags = argparse.Namespace()
    if script.flags is not None:
        script.flags.error = _raise_flag_error  # one line, not argparse's usage dump and exit
        try:
            flags, argv = script.flags.parse_known_args(argv)
        except _FlagError as err:
            raise UsageError(f"{err} (see --help)") from None
    unknown = [a for a in argv if a.startswith("-")]
    if unknown:
        raise UsageError(f"unknown flag {unknown[0]} (see --help)")
    if script.positional is not None:
        plain = [a for a in argv if "=" not in a]
        if len(plain) != 1:
            raise UsageError(f"expected one {script.positional.upper()} argument, got {len(plain)} (see --help)")
        setattr(flags, script.positional, plain[0])
        argv = [a for a in argv if "=" in a]
    if not script.takes_config:
        if argv:
            raise UsageError(f"unexpected argument {argv[0]}: this script takes --flags only (see --help)")
        return load_config(None), flags
    path, overrides = split_cli(argv)
    if path is None and script.default_config is not None:
        path = script.default_config(flags)
    if path is None and script.config_required:
        raise UsageError(f"missing config=FILE.yaml (e.g. {script.example}); see --help")
    return load_config(path, overrides), flags


def positive_int(text: str) -> int:
    """argparse `type` of a count that must be at least 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    """argparse `type` of a count that may be 0."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be at least 0, got {value}")
    return value


def file_to_write(text: str) -> str:
    """argparse `type` of a file a script writes: refused at once if it names a folder, not after the work."""
    if os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text} is a folder, not a file to write")
    return text


def torch_device(text: str) -> str:
    """argparse `type` of a torch device (cpu, cuda, cuda:1), checked before any work."""
    import torch

    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a torch device (cpu, cuda, cuda:1, ...)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text!r}: CUDA is not available on this machine (use cpu)")
    return text


def debug_requested(argv: Sequence[str]) -> bool:
    return "--debug" in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0")


def one_line(err: BaseException) -> str:
    """The message of `err` on one line. An error re-raised from a DataLoader worker carries the worker's traceback
    in its message: only the original message (its last line) is kept."""
    message = str(err) or type(err).__name__
    if "Original Traceback" in message:
        message = message.rstrip().splitlines()[-1].split(": ", 1)[-1]
    return " ".join(message.split("\n"))


def report(err: UserError) -> int:
    """`error: <message>` on stderr, one line (a config error: one line per problem it found)."""
    _close_progress_bars()
    for message in str(err).split("\n") if isinstance(err, ConfigError) else [one_line(err)]:
        print(f"error: {message}", file=sys.stderr)
    return err.exit_code


def _close_progress_bars() -> None:
    """End the line of every open progress bar, so that the error is the last line (and not the bar, redrawn
    after it when the bar is garbage-collected)."""
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """A warning in one line, written past any progress bar (which would otherwise share its line)."""
    from tqdm import tqdm

    tqdm.write(f"warning: {message}", file=file or sys.stderr)


def os_problem(err: OSError) -> Optional[str]:
    """What the user can do about an OSError met outside the writers that name their files, or None (a bug)."""
    stopped = write_stopped(err, err.filename)
    if stopped is not None:
        return str(stopped)
    if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"{err.filename}: {err.strerror} (a read-only folder?); choose another path, or change its permissions"
    return None


def run(script: Script, main: Callable[[DictConfig, argparse.Namespace], object],
        argv: Optional[Sequence[str]] = None) -> None:
    """The `__main__` of a script: parse, run, and report a user error in one line (see the module docstring)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    showwarning = warnings.showwarning
    if not debug_requested(argv):
        warnings.showwarning = _show_warning  # a warning is one line too; --debug shows where it came from
    try:
        config, flags = parse(argv, script)
        main(config, flags)
    except UserError as err:
        if debug_requested(argv):
            raise
        raise SystemExit(report(err)) from None
    except OSError as err:  # a full disk or a folder we may not write, wherever it is met, is the user's to fix
        problem = None if debug_requested(argv) else os_problem(err)
        if problem is None:
            raise
        raise SystemExit(report(OutputError(problem))) from None
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    except Exception:  # a bug of ours: its traceback, after the progress bars
        _close_progress_bars()
        raise
    finally:
        warnings.showwarning = showwarning


__all__ = ["Script", "file_to_write", "flag_parser", "help_text", "non_negative_int", "parse", "positive_int", "report",
           "run", "torch_device"]
