"""Several processes (``torchrun`` or ``accelerate launch``): one does the single-process work, all train.

Under a distributed launch every process runs ``rl_agents.train`` with the same config and run dir. The
main process (rank 0) collects the teacher data, builds the initial model, evaluates, writes the run's
files and logs to W&B; the others wait for it at barriers and then read what it wrote. The bc stage
(TRL's SFTTrainer) and the GRPO rl stage (TRL's GRPOTrainer) train data-parallel across all of them.
"""

from __future__ import annotations

import os

import torch


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def barrier() -> None:
    """Wait for every process (a no-op in a single process)."""
    if world_size() > 1:
        from accelerate import PartialState

        PartialState(cpu=not torch.cuda.is_available()).wait_for_everyone()
