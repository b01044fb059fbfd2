"""How the global batch is split: processes x per-GPU micro-batch x accumulation steps.

Without `training.global_batch_size` the split is the config's: every process takes `per_gpu_batch_size` samples
`gradient_accumulation_steps` times, so the global batch grows with the number of processes. With it (DiT's
`--global-batch-size`), the global batch stays what the config says on any number of processes: each takes
global / processes samples per optimizer step, in the fewest micro-batches of at most `per_gpu_batch_size` (the
size that fits in memory). The released configs (global 2048) then run as 8 x 256 x 1 (reAR-S) or 8 x 128 x 2
(reAR-B/L) on 8 GPUs, as 16 x 128 x 1 on 16, and as 1 x 256 x 8 on one.
"""

from __future__ import annotations

from dataclasses import dataclass

from utils.errors import ConfigError


@dataclass(frozen=True)
class BatchPlan:
    processes: int
    per_gpu: int
    accumulation: int

    @property
    def micro_batch(self) -> int:
        """Samples one micro-step takes over all processes."""
        return self.processes * self.per_gpu

    @property
    def global_batch(self) -> int:
        return self.processes * self.per_gpu * self.accumulation

    def describe(self) -> str:
        processes = f"{self.processes} process" + ("es" if self.processes != 1 else "")
        return f"{processes} x {self.per_gpu} per GPU x {self.accumulation} accumulation = global batch {self.global_batch}"


def batch_plan(training, processes: int) -> BatchPlan:
    """The split of `training` (the config's `training` section) over `processes`; a global batch that does not
    divide among them is a ConfigError."""
    if training.global_batch_size is None:
        return BatchPlan(processes, training.per_gpu_batch_size, training.gradient_accumulation_steps)
    total = training.global_batch_size
    if total % processes:
        raise ConfigError(
            f"training.global_batch_size {total} does not divide among {processes} processes: choose a global batch "
            f"that is a multiple of the number of processes (e.g. {total - total % processes or processes}), or "
            "another number of processes"
        )
    share = total // processes
    accumulation = next(a for a in range(1, share + 1) if share % a == 0 and share // a <= training.per_gpu_batch_size)
    return BatchPlan(processes, share // accumulation, accumulation)


__all__ = ["BatchPlan", "batch_plan"]
