"""Gymnasium tasks with a discrete action space, played through tools: FrozenLakeText-v0 and TaxiText-v0.

``GymTextEnv`` wraps a Gymnasium environment whose actions are ``Discrete(n)``: each action becomes a tool
call (``move(direction)``, ``pickup()``, ...), the state is rendered as text, and the episode ends when
the wrapped environment terminates. Each environment is documented on its class.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium.envs.toy_text.frozen_lake import generate_random_map

from envs.base import Finish, Task, Tool, ToolEnv, ToolError
from envs.teacher import ScriptedTeacher, tool_call


def _no_arguments() -> dict[str, Any]:
    return {"type": "object", "properties": {}, "additionalProperties": False}


def _direction_schema(directions: list[str]) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {"direction": {"type": "string", "enum": directions}},
        "required": ["direction"],
        "additionalProperties": False,
    }


class GymTextEnv(ToolEnv):
    """A discrete-action Gymnasium environment as a text tool environment (FrozenLakeText-v0, TaxiText-v0).

    Subclasses set ``directions`` (move direction -> action index), ``commands`` (argument-less tool name ->
    action index), and implement ``_make_inner``, ``_describe`` and ``_render_state``; ``_success`` and
    ``_illegal`` refine the outcome of a step.
    """

    directions: dict[str, int] = {}
    commands: dict[str, int] = {}

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.inner: gym.Env | None = None
        self.state: int = 0
        self.env_return = 0.0
        self.tools = {}
        if self.directions:
            self.tools["move"] = Tool(
                name="move",
                description=f"Move one step: {', '.join(self.directions)}.",
                parameters=_direction_schema(list(self.directions)),
                fn=lambda direction: self._act(self.directions[direction]),
            )
        for name, action in self.commands.items():
            self.tools[name] = Tool(
                name=name, description=f"{name.capitalize()}.", parameters=_no_arguments(), fn=self._command(action)
            )

    def _command(self, action: int):
        return lambda: self._act(action)

    # --- to implement -------------------------------------------------------------------------
    def _make_inner(self, seed: int) -> gym.Env:
        """The wrapped environment of a task (it is reset with ``seed``); may return ``self.inner`` again."""
        raise NotImplementedError

    def _describe(self) -> str:
        """The task prompt: goal, map, the starting state."""
        raise NotImplementedError

    def _render_state(self) -> str:
        raise NotImplementedError

    def _success(self, reward: float, terminated: bool) -> bool:
        return terminated and reward > 0

    def _illegal(self, previous: int, reward: float) -> str | None:
        """An error message when the action was illegal (the wrapped env ignored it), else None."""
        return None

    # --- the wrapper --------------------------------------------------------------------------
    def _new_task(self) -> Task:
        seed = int(self.np_random.integers(2**31 - 1))
        inner = self._make_inner(seed)
        if self.inner is not None and self.inner is not inner:
            self.inner.close()
        self.inner = inner
        self.state, _ = self.inner.reset(seed=seed)
        self.env_return = 0.0
        return Task(prompt=self._describe(), answer="", extra={"seed": seed})

    def _act(self, action: int) -> str | Finish:
        previous = self.state
        self.state, reward, terminated, truncated, _ = self.inner.step(action)
        self.env_return += float(reward)
        illegal = self._illegal(previous, float(reward))
        if illegal:
            raise ToolError(illegal)
        if terminated:
            success = self._success(float(reward), terminated)
            return Finish(self._render_state(), 1.0 if success else 0.0, success)
        return self._render_state()

    def _grade(self, answer: str) -> tuple[float, bool]:
        return 0.0, False  # an answer gives up: the task is solved by acting

    def step(self, action: str):
        observation, reward, terminated, truncated, info = super().step(action)
        info["env_return"] = self.env_return
        return observation, reward, terminated, truncated, info

    def close(self) -> None:
        if self.inner is not None:
            self.inner.close()
            self.inner = None
        super().close()


class FrozenLakeTextEnv(GymTextEnv):
    """FrozenLakeText-v0: ``FrozenLake-v1`` on a random map per seed, played with ``move(direction)``.

    ## Description
    Each seed draws a map (``generate_random_map``, not slippery by default); the map is in the task prompt
    and each observation gives the position and what lies in each direction. Tool: ``move(direction)`` with
    left / down / right / up. A task is its map (``task_key``: the map's rows); ``split=...`` keeps one split.

    ## Arguments
    ```python
    gymnasium.make("FrozenLakeText-v0", size=4, frozen_prob=0.8, is_slippery=False, max_action_chars=1000,
                   max_observation_chars=2000, render_mode=None, split=None, max_episode_steps=16)
    ```
    - ``size=4``: the map's side.
    - ``frozen_prob=0.8``: probability that a cell is ice (``generate_random_map``'s ``p``).
    - ``is_slippery=False``: FrozenLake's slippery ice (a move may go sideways).
    - ``max_action_chars=1000``, ``max_observation_chars=2000``, ``render_mode=None`` (or ``"ansi"``),
      ``split=None`` (``"train"``, ``"val"``, ``"test"``): :class:`envs.base.ToolEnv`'s, as in every tool env.
    - ``max_episode_steps``: Gymnasium's step budget (a ``TimeLimit``).

    ## Action Space / Observation Space
    ``Text``, as in :mod:`envs.base`.

    ## Information
    :class:`envs.base.ToolEnv`'s keys (``tools``, ``task_key``, ``split`` from ``reset``; ``tool``, ``error``,
    ``success``, ``error_counts`` and ``answer`` from ``step``), and ``env_return``: the wrapped environment's
    own return so far.

    ## Rewards
    1.0 when the wrapped task succeeds (the goal is reached), 0.0 otherwise.

    ## Episode End
    Terminated when the wrapped environment terminates (or by an ``<answer>``, which gives up: reward 0);
    truncated by the step budget (``max_episode_steps``, default 16).

    ## Teacher
    ``PlannerTeacher`` runs value iteration on the wrapped environment's transition table ``P`` (privileged
    access) and takes the greedy action; when lazy it takes a random action in half of its turns.

    ## Version History
    - v0: initial version.
    """

    directions = {"left": 0, "down": 1, "right": 2, "up": 3}
    _offsets = {"left": (0, -1), "down": (1, 0), "right": (0, 1), "up": (-1, 0)}

    def __init__(self, size: int = 4, frozen_prob: float = 0.8, is_slippery: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.size, self.frozen_prob, self.is_slippery = size, frozen_prob, is_slippery

    def _make_inner(self, seed: int) -> gym.Env:
        desc = generate_random_map(size=self.size, p=self.frozen_prob, seed=seed)
        return gym.make("FrozenLake-v1", desc=desc, is_slippery=self.is_slippery).unwrapped

    @property
    def grid(self) -> list[str]:
        return ["".join(c.decode() for c in row) for row in self.inner.desc]

    def _position(self) -> tuple[int, int]:
        return divmod(int(self.state), self.size)

    def _describe(self) -> str:
        rows = "\n".join(self.grid)
        return (
            "Walk on the frozen lake from S to the goal G without stepping into a hole H "
            f"(F is frozen ice). Map, row 0 at the top:\n{rows}\n{self._render_state()}"
        )

    def task_key(self, task: Task) -> str:
        return "\n".join(self.grid)  # the map (the start is always its top-left corner)

    def _render_state(self) -> str:
        r, c = self._position()
        cell = self.grid[r][c]
        if cell == "H":
            return f"You fell into the hole at row {r}, column {c}."
        if cell == "G":
            return f"You reached the goal at row {r}, column {c}."
        around = []
        for name, (dr, dc) in self._offsets.items():
            rr, cc = r + dr, c + dc
            inside = 0 <= rr < self.size and 0 <= cc < self.size
            around.append(f"{name} {self.grid[rr][cc] if inside else 'wall'}")
        return f"You are at row {r}, column {c}; " + ", ".join(around) + "."


TAXI_MAP = [
    "+---------+",
    "|R: | : :G|",
    "| : | : : |",
    "| : : : : |",
    "| | : | : |",
    "|Y| : |B: |",
    "+---------+",
]
TAXI_STANDS = ["R", "G", "Y", "B"]


class TaxiTextEnv(GymTextEnv):
    """TaxiText-v0: ``Taxi-v4`` from a random start per seed: fetch the passenger, drop them at the destination.

    ## Description
    The fixed map is in the prompt. Tools: ``move(direction)`` with north / south / east / west, ``pickup()``,
    ``dropoff()``; an illegal pickup or drop-off is a ``tool_error`` observation. A task is its start state
    (taxi position, passenger and destination: 300 tasks, so its test split holds about 30).

    ## Arguments
    ```python
    gymnasium.make("TaxiText-v0", max_action_chars=1000, max_observation_chars=2000, render_mode=None,
                   split=None, max_episode_steps=24)
    ```
    - ``max_action_chars=1000``, ``max_observation_chars=2000``, ``render_mode=None`` (or ``"ansi"``),
      ``split=None`` (``"train"``, ``"val"``, ``"test"``): :class:`envs.base.ToolEnv`'s, as in every tool env.
    - ``max_episode_steps``: Gymnasium's step budget (a ``TimeLimit``).

    ## Action Space / Observation Space
    ``Text``, as in :mod:`envs.base`.

    ## Information
    :class:`envs.base.ToolEnv`'s keys (``tools``, ``task_key``, ``split`` from ``reset``; ``tool``, ``error``,
    ``success``, ``error_counts`` and ``answer`` from ``step``), and ``env_return``: the wrapped environment's
    own return so far.

    ## Rewards
    1.0 when the wrapped task succeeds (the passenger is dropped at the destination), 0.0 otherwise.

    ## Episode End
    Terminated when the wrapped environment terminates (or by an ``<answer>``, which gives up: reward 0);
    truncated by the step budget (``max_episode_steps``, default 24).

    ## Teacher
    ``PlannerTeacher`` runs value iteration on the wrapped environment's transition table ``P`` (privileged
    access) and takes the greedy action; when lazy it takes a random action in half of its turns.

    ## Version History
    - v0: initial version.
    """

    directions = {"south": 0, "north": 1, "east": 2, "west": 3}
    commands = {"pickup": 4, "dropoff": 5}

    def _make_inner(self, seed: int) -> gym.Env:
        return self.inner or gym.make("Taxi-v4").unwrapped  # one map: built once (its table P), reset per task

    def task_key(self, task: Task) -> str:
        return f"taxi-start-{int(self.state)}"  # the map is fixed: the start state is the task

    def _decode(self) -> tuple[int, int, int, int]:
        return tuple(int(x) for x in self.inner.decode(int(self.state)))

    def _describe(self) -> str:
        _, _, _, destination = self._decode()
        return (
            "Drive the taxi to the passenger, pick them up and drop them off at the destination. "
            "Map (| is a wall; R, G, Y, B are stands; row 0 at the top, 5 columns):\n"
            + "\n".join(TAXI_MAP)
            + f"\nDestination: {TAXI_STANDS[destination]}.\n"
            + self._render_state()
        )

    def _render_state(self) -> str:
        row, col, passenger, destination = self._decode()
        where = "in the taxi" if passenger == 4 else f"at {TAXI_STANDS[passenger]}"
        if passenger == destination:
            return f"The passenger was dropped off at {TAXI_STANDS[destination]}."
        return f"Taxi at row {row}, column {col}; passenger {where}."

    def _success(self, reward: float, terminated: bool) -> bool:
        return terminated  # Taxi terminates only on a correct drop-off

    def _illegal(self, previous: int, reward: float) -> str | None:
        if reward <= -10:  # the wrapped env's penalty for an illegal pickup or drop-off
            return "there is no passenger to pick up or drop off here"
        return None


class PlannerTeacher(ScriptedTeacher):
    """Expert: value iteration on the wrapped environment's transition table, then the greedy action."""

    def __init__(self, noise: float = 0.0, think: bool = True, gamma: float = 0.95):
        super().__init__(noise=noise, think=think)
        self.gamma = gamma
        self._q: np.ndarray | None = None
        self._q_key: Any = None

    def q_values(self, env: GymTextEnv) -> np.ndarray:
        """Q[s, a] of the wrapped environment (cached per map: FrozenLake maps change per seed, Taxi's not)."""
        inner = env.inner
        key = (type(env), str(getattr(inner, "desc", "")))
        if self._q_key != key:
            n_s, n_a = inner.observation_space.n, inner.action_space.n
            prob, nxt, rew, done = (
                np.zeros((n_s, n_a, 4)),
                np.zeros((n_s, n_a, 4), int),
                np.zeros((n_s, n_a, 4)),
                np.zeros((n_s, n_a, 4)),
            )
            for s in range(n_s):
                for a in range(n_a):
                    for k, (p, s2, r, d) in enumerate(inner.P[s][a]):
                        prob[s, a, k], nxt[s, a, k], rew[s, a, k], done[s, a, k] = p, s2, r, d
            v = np.zeros(n_s)
            for _ in range(500):
                q = (prob * (rew + self.gamma * v[nxt] * (1 - done))).sum(-1)
                new_v = q.max(-1)
                if np.abs(new_v - v).max() < 1e-9:
                    break
                v = new_v
            self._q, self._q_key = q, key
        return self._q

    def _call_for(self, env: GymTextEnv, action: int) -> str:
        for name, index in env.directions.items():
            if index == action:
                return tool_call("move", direction=name)
        name = next(n for n, index in env.commands.items() if index == action)
        return tool_call(name)

    def expert(self, env: GymTextEnv, history: list[tuple[str, str]]) -> str:
        q = self.q_values(env)[int(env.state)]
        return self._call_for(env, int(np.flatnonzero(q >= q.max() - 1e-9)[0]))

    def perturbation(self, env: GymTextEnv, history: list[tuple[str, str]], rng: np.random.Generator) -> str:
        """``collect.perturb``: any of the environment's actions, uniformly."""
        return self._call_for(env, int(rng.integers(env.inner.action_space.n)))

    def lazy_act(self, env: GymTextEnv, history: list[tuple[str, str]]) -> str:
        """A lazy teacher moves at random in half of its turns."""
        if self.rng.random() < 0.5:
            return self._call_for(env, int(self.rng.integers(env.inner.action_space.n)))
        return self.expert(env, history)
