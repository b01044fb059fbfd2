"""Stopping cleanly when a cluster asks, and saving often enough that a stop loses little.

Clusters end jobs with a signal: SIGTERM before a preemption, at `scancel` and at the time limit (SIGKILL follows
after a grace period); SIGUSR1 ahead of the time limit when a SLURM job asks for it (`--signal=USR1@120`); SIGINT
from Ctrl-C. While a run holds `StopSignals`, these signals only set a flag: nothing is interrupted, so a second
signal during a save is harmless. The training loop and the 50k sampler read the flag after each optimizer step or
batch, all processes agree through one small all-reduce (`RankVote`: the signal may reach one process or all),
the work so far is saved, and the process exits with `STOPPED_EXIT_CODE`. Running the same command again continues.

75 is EX_TEMPFAIL of sysexits.h ("temporary failure; the user is invited to retry"): not 0, so a wrapper can tell
"stopped, run me again" from "finished", and none of 1 (an error), 2 (a bad command line or config) or 128 + N (a
process killed by signal N). scripts_bash/slurm_*.sh requeue the job when the run stopped this way.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from typing import Optional, Sequence, Tuple

import torch
import torch.distributed as dist

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
STOPPED_EXIT_CODE = 75


class StopSignals:
    """While entered, SIGTERM, SIGINT and SIGUSR1 set `received` (the first one's name) instead of ending the
    process. The handler does nothing else: it may run in the middle of any Python code, a save included."""

    def __init__(self):
        self.received: Optional[str] = None
        self._previous = {}

    def _record(self, signum, frame) -> None:
        if self.received is None:
            self.received = signal.Signals(signum).name

    @property
    def requested(self) -> bool:
        return self.received is not None

    def __enter__(self) -> "StopSignals":
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._record)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def keep_worker_through_stop_signals(worker_id: int = 0) -> None:
    """`worker_init_fn` of data loader workers. A cluster signals every process of a job (and Ctrl-C the whole
    process group), and a worker killed by the signal would stop the main process with an error before it could
    save. So workers ignore SIGINT and SIGUSR1, and a SIGTERM ends one only when it comes from its main process,
    which is how the main process ends its workers (the rule of torch's own handler, which this replaces)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    main_process = os.getppid()
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # taken by the thread below, whoever sent it

    def end_when_the_main_process_says_so():
        while signal.sigwaitinfo({signal.SIGTERM}).si_pid != main_process:
            pass
        os._exit(0)

    threading.Thread(target=end_when_the_main_process_says_so, daemon=True).start()


class RankVote:
    """`any(flags)`: each flag OR-ed over all processes, in one all-reduce of a few integers on the CPU (gloo), so that
    every process takes the same decision and nothing waits for a GPU. One process: the flags as they are."""

    def __init__(self):
        self.group = None
        if dist.is_available() and dist.is_initialized() and dist.get_backend() != "gloo":
            self.group = dist.new_group(backend="gloo")  # collective: every process makes it at the same point

    def any(self, flags: Sequence[bool]) -> Tuple[bool, ...]:
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return tuple(bool(f) for f in flags)
        votes = torch.tensor([int(f) for f in flags], dtype=torch.int32)
        dist.all_reduce(votes, op=dist.ReduceOp.MAX, group=self.group)
        return tuple(bool(v) for v in votes.tolist())


class SaveClock:
    """Time-based checkpoints: due once `minutes` have passed since the last save (or the start); None: never."""

    def __init__(self, minutes: Optional[float]):
        self.seconds = None if minutes is None else 60.0 * minutes
        self.reset()

    def reset(self) -> None:
        self.since = time.monotonic()

    @property
    def due(self) -> bool:
        return self.seconds is not None and time.monotonic() - self.since >= self.seconds


def exit_stopped(message: str, main_process: bool = True) -> None:
    """End the process after a stop signal, once its work is saved: `message` (what was saved, how to continue) on
    stderr from the main process, and `STOPPED_EXIT_CODE`."""
    if main_process:
        print(message, file=sys.stderr, flush=True)
    raise SystemExit(STOPPED_EXIT_CODE)


__all__ = ["RankVote", "STOPPED_EXIT_CODE", "STOP_SIGNALS", "SaveClock", "StopSignals", "exit_stopped",
           "keep_worker_through_stop_signals"]
