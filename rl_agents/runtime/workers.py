"""The runtime's worker processes (``RuntimeConfig.processes``): each holds a copy of the model and runs the
episodes it takes from a counter shared with the others (``_Indices``)."""

from __future__ import annotations

import gymnasium as gym
import torch

from rl_agents.runtime.config import RuntimeConfig


class _Indices:
    """The episodes of a run still to start, handed out in order: counted here, or in a counter shared by the
    worker processes (``RuntimeConfig.processes``)."""

    def __init__(self, n: int, shared=None):
        self.n, self.shared, self.next = n, shared, 0

    def take(self) -> int | None:
        if self.shared is None:
            index, self.next = self.next, self.next + 1
        else:
            with self.shared.get_lock():
                index = self.shared.value
                self.shared.value = index + 1
        return index if index < self.n else None

    def empty(self) -> bool:
        return (self.next if self.shared is None else self.shared.value) >= self.n


def _worker(runtime_class, model, tokenizer, config: RuntimeConfig, seed: int, threads: int, counter, conn) -> None:
    """A worker process of a ``Runtime`` (``runtime_class``, given by the parent so that this module needs nothing
    of the engine): runs each job's episodes that it takes from ``counter``, and sends back
    ("ok", [(index, trajectory)], stats) or ("error", traceback)."""
    import traceback

    torch.set_num_threads(threads)
    runtime = runtime_class(model, tokenizer, config, seed)
    with torch.no_grad():  # the first forward pass pays for allocation and kernel selection
        model(input_ids=torch.zeros(1, 8, dtype=torch.long))
    conn.send(("ready",))
    while (job := conn.recv()) is not None:
        spec, seeds, env_kwargs, policy, forced, runs, first_index = job
        try:
            if spec.id not in gym.registry:  # registered in the parent only (not by an import)
                gym.registry[spec.id] = spec
            before = dict(runtime.stats)
            runtime.runs, runtime.first_index = runs, first_index
            done = runtime._episodes(spec.id, seeds, env_kwargs, policy, forced, _Indices(len(seeds), counter))
            stats = {k: v - before.get(k, 0) for k, v in runtime.stats.items() if k != "wall_s"}
            conn.send(("ok", done, stats))
        except Exception:  # noqa: BLE001  (sent to the parent, which raises it)
            conn.send(("error", traceback.format_exc()))
