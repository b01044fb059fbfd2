"""The thread settings every entry point starts with: `use_thread_defaults()` runs first in each script (and in
the `evaluator` package, which `python -m evaluator...` imports first), before torch and numpy load their OpenMP
runtime, which reads them once.

OMP_WAIT_POLICY=PASSIVE: an OpenMP thread waiting for work sleeps instead of spinning. Spinning waiters make a CPU
run 10-50x slower when another process shares the cores, because each of the many small ops waits out a scheduler
slice (the 50k sampler on a busy 2-core machine: 300 toy samples in 180 s without it, 12.8 s with it; see
BENCHMARKS.md); sleeping waiters cost little on an idle machine. A value already in the environment is kept.
"""

from __future__ import annotations

import os

THREAD_DEFAULTS = {"OMP_WAIT_POLICY": "PASSIVE"}


def use_thread_defaults() -> None:
    """Set THREAD_DEFAULTS in the environment where the user has not set them (call before importing torch)."""
    for name, value in THREAD_DEFAULTS.items():
        os.environ.setdefault(name, value)


__all__ = ["THREAD_DEFAULTS", "use_thread_defaults"]
