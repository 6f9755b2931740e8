"""Scripted teachers: expert policies with privileged access to the task, and a noise level.

A teacher sees the environment (unwrapped, so it may read ``env.task``), the task prompt and the history
of ``(agent_text, observation)`` pairs, and writes the next agent turn. ``noise`` is the fraction of
episodes in which it acts lazily or wrongly, as real teachers do; the choice is made once per episode
in ``begin`` from the collector's generator, so a run is reproducible from its seed.

A teacher may also define ``perturbation(env, history, rng)``: an action taken *instead of* its own, for
``collect.perturb`` (noise injected into the expert's rollouts, DART: Laskey et al., 2017). Such a turn is context
only; the teacher's next turns, labelled as usual, show how to recover from the state it led to.
"""

from __future__ import annotations

import json

import numpy as np

from envs.base import ToolEnv


def tool_call(name: str, **arguments) -> str:
    """The Hermes-style tool call text."""
    return f"<tool_call>{json.dumps({'name': name, 'arguments': arguments})}</tool_call>"


def answer(text: str) -> str:
    return f"<answer>{text}</answer>"


class ScriptedTeacher:
    """Base class: subclasses implement ``expert`` (and optionally ``lazy``) for their environment."""

    kind = "scripted"

    def __init__(self, noise: float = 0.0, think: bool = True):
        if not 0.0 <= noise <= 1.0:
            raise ValueError(f"teacher.noise must be in [0, 1], got {noise}")
        self.noise = noise
        self.think = think
        self.lazy = False
        self.rng = np.random.default_rng(0)

    @property
    def name(self) -> str:
        return f"{type(self).__name__}(noise={self.noise})"

    def begin(self, env: ToolEnv, rng: np.random.Generator) -> None:
        """Start an episode: decide whether the teacher is lazy this time."""
        self.rng = rng
        self.lazy = bool(rng.random() < self.noise)

    def act(self, env: ToolEnv, task: str, history: list[tuple[str, str]]) -> str:
        return self.lazy_act(env, history) if self.lazy else self.expert(env, history)

    def thought(self, text: str) -> str:
        return f"<think>{text}</think>" if self.think else ""

    def expert(self, env: ToolEnv, history: list[tuple[str, str]]) -> str:
        raise NotImplementedError

    def lazy_act(self, env: ToolEnv, history: list[tuple[str, str]]) -> str:
        raise NotImplementedError
