"""Several processes (``torchrun`` or ``accelerate launch``): one does the single-process work, all train.

Under a distributed launch every process runs ``rl_agents.train`` with the same config and run dir. The
main process (rank 0) collects the teacher data, builds the initial model, evaluates, writes the run's
files and logs to W&B; the others wait for it at barriers and then read what it wrote. The bc stage
(TRL's SFTTrainer) and the GRPO rl stage (TRL's GRPOTrainer) train data-parallel across all of them.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

log = logging.getLogger(__name__)


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def barrier() -> None:
    """Wait for every process (a no-op in a single process)."""
    if world_size() > 1:
        from accelerate import PartialState

        PartialState(cpu=not torch.cuda.is_available()).wait_for_everyone()


def cpu_budget(cpu_max: Path = Path("/sys/fs/cgroup/cpu.max")) -> int:
    """The CPUs this process may use: its affinity, capped by a cgroup v2 CPU quota (a container's ``--cpus``,
    in ``cpu_max``), which torch's default thread count does not see."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        quota, period = cpu_max.read_text().split()
        if quota != "max":
            cpus = min(cpus, max(1, int(quota) // int(period)))
    except (OSError, ValueError):
        pass
    return cpus


def process_settings(threads: int | None, progress: bool, parallel_jobs: int = 1) -> None:
    """Torch's threads (``threads``; else ``OMP_NUM_THREADS`` if set; else this process's share of the CPUs: a
    distributed launch's processes and a sweep's parallel jobs share them) and, with ``progress`` false, every
    library's progress bars off."""
    sharing = parallel_jobs * int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if threads or not os.environ.get("OMP_NUM_THREADS"):
        torch.set_num_threads(threads or max(1, cpu_budget() // sharing))
    source = (
        "threads"
        if threads
        else "OMP_NUM_THREADS"
        if os.environ.get("OMP_NUM_THREADS")
        else (f"{cpu_budget()} CPUs / {sharing} processes")
    )
    log.info("torch threads: %d (%s)", torch.get_num_threads(), source)
    if not progress:
        import datasets
        import huggingface_hub
        import transformers

        datasets.disable_progress_bars()
        huggingface_hub.utils.disable_progress_bars()
        transformers.utils.logging.disable_progress_bar()
