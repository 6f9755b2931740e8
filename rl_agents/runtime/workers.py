"""The runtime's worker processes (``RuntimeConfig.processes``): each holds a copy of the model and runs the
episodes it takes from a counter shared with the others (``_Indices``)."""

from __future__ import annotations

import contextlib
import importlib
from dataclasses import dataclass
from typing import Any

import gymnasium as gym
import torch

from rl_agents.runtime.config import RuntimeConfig


def env_spec(env_id: str) -> gym.envs.registration.EnvSpec:
    """The spec of a registered id or of gymnasium's ``"my_pkg.module:MyEnv-v0"`` form (whose module, imported
    here, registers it): ``gym.spec`` alone does not take the module prefix."""
    module, _, name = env_id.rpartition(":")
    if module:
        importlib.import_module(module)
    return gym.spec(name)


# --- the messages between the runtime and its workers (a None job stops a worker) ------------------
@dataclass
class Job:
    """Parent -> worker: run these episodes (the worker takes their indices from the shared counter)."""

    spec: gym.envs.registration.EnvSpec
    """the environment's spec (sent whole: a user env registered in the parent only is registered from it)"""
    seeds: list[int]
    env_kwargs: dict | None
    policy: str
    forced: Any
    """teacher-forced turns per episode, or None"""
    runs: int
    """the parent's run counter and the run's first global episode index: the sampling streams depend on them"""
    first_index: int


@dataclass
class Ready:
    """Worker -> parent: the model is loaded and warmed up."""


@dataclass
class Done:
    """Worker -> parent: the episodes this worker ran, as (index in the job, trajectory), and its stats."""

    episodes: list
    stats: dict[str, float]


@dataclass
class Failed:
    """Worker -> parent: the job raised; the parent raises it, with this traceback."""

    traceback: str


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

    def refuse(self, index: int, error: Exception) -> None:
        """An episode that could not start (its ``reset`` raised) ends the run."""
        raise error


class Feed:
    """Episodes that arrive while a run goes on (a server's requests): ``add`` one and the run (``Runtime.stream``)
    starts it in the next free slot, beside the episodes already running (continuous batching). An episode whose
    ``reset`` raises is left out, its error in ``refused``; the others go on."""

    def __init__(self):
        self.seeds: list[int] = []
        self.options: list[dict | None] = []
        self.next = 0
        self.refused: dict[int, Exception] = {}
        self.cancelled: set[int] = set()

    def add(self, options: dict | None = None, seed: int | None = None) -> int:
        """Queue an episode (``reset``'s options and seed; the seed defaults to its index); returns its index."""
        self.options.append(options)
        self.seeds.append(len(self.seeds) if seed is None else seed)
        return len(self.seeds) - 1

    def take(self) -> int | None:
        while not self.empty():
            self.next += 1
            if self.next - 1 not in self.cancelled:
                return self.next - 1
            self.refused[self.next - 1] = RuntimeError("cancelled before it started")
        return None

    def cancel(self, index: int) -> None:
        """End this episode at the next forward pass (truncation ``cancelled``), or never start it."""
        self.cancelled.add(index)

    def empty(self) -> bool:
        return self.next >= len(self.seeds)

    def waiting(self) -> int:
        return len(self.seeds) - self.next

    def refuse(self, index: int, error: Exception) -> None:
        self.refused[index] = error


def _worker(runtime_class, model, tokenizer, config: RuntimeConfig, seed: int, threads: int, counter, conn) -> None:
    """A worker process of a ``Runtime`` (``runtime_class``, given by the parent so that this module needs nothing
    of the engine): runs each job's episodes that it takes from ``counter``, and sends back
    ``Done`` or ``Failed`` for each ``Job``."""
    import traceback

    torch.set_num_threads(threads)
    runtime = runtime_class(model, tokenizer, config, seed)
    with torch.no_grad():  # the first forward pass pays for allocation and kernel selection
        model(input_ids=torch.zeros(1, 8, dtype=torch.long))
    conn.send(Ready())
    while (job := conn.recv()) is not None:
        try:
            if job.spec.id not in gym.registry and isinstance(job.spec.entry_point, str):
                with contextlib.suppress(ImportError):  # the module that registers it, as the parent's import did
                    importlib.import_module(job.spec.entry_point.partition(":")[0])
            if job.spec.id not in gym.registry:  # registered in the parent only (not by an import)
                gym.registry[job.spec.id] = job.spec
            before = dict(runtime.stats)
            runtime.runs, runtime.first_index = job.runs, job.first_index
            indices = _Indices(len(job.seeds), counter)
            done = runtime._episodes(job.spec.id, job.seeds, job.env_kwargs, job.policy, job.forced, indices)
            stats = {k: v - before.get(k, 0) for k, v in runtime.stats.items() if k != "wall_s"}
            conn.send(Done(done, stats))
        except Exception:  # noqa: BLE001  (sent to the parent, which raises it)
            conn.send(Failed(traceback.format_exc()))
