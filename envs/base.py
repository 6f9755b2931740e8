"""Text tool environments: the Gymnasium contract for an agent that calls tools by writing text.

An agent turn is free text: optional reasoning in ``<think>...</think>``, then either one Hermes-style
tool call ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` or a final answer
``<answer>...</answer>``. ``ToolEnv.step`` parses the turn, runs the tool and returns the tool's output
(or an error message) as the next observation. Nothing the agent writes can crash an episode: every
malformed turn becomes an error observation with a named error kind, counted in ``info``.

Subclasses provide the task (``_new_task``), the tools (``tools``) and the answer check (``_grade``).
A tool whose call ends the episode (a purchase, a submission, a move into a hole) returns a ``Finish``
with the episode's reward and success instead of a string.

Tasks are split into train, validation and test *by task*, not by seed: ``task_key`` names what identifies
a task (Calculator: the expression; FrozenLake: the map), a hash of the key assigns it a split
(``task_split``), and an environment made with ``split="test"`` (or reset with ``options={"split": "test"}``)
draws from its seed until the task lands in that split. Training only ever sees ``train`` tasks.
"""

from __future__ import annotations

import hashlib
import json
import re
import string
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any

import gymnasium as gym
import jsonschema
from gymnasium import spaces

# Everything an observation or action may contain: printable ASCII. Observations are sanitised to it.
CHARSET = string.printable

# Error kinds an agent turn can produce, in the order they are checked.
ERROR_KINDS = (
    "action_too_long",  # the turn is longer than max_action_chars
    "no_action",  # neither a tool call nor an answer
    "malformed_json",  # the tool call's body is not JSON
    "malformed_call",  # JSON, but not {"name": str, "arguments": object}
    "unknown_tool",  # no tool of that name
    "bad_arguments",  # arguments do not match the tool's JSON schema
    "tool_error",  # the tool refused (bad expression, SQL error, ...)
    "tool_timeout",  # transient failure: the agent should retry
    "tool_exception",  # the tool itself crashed
)
# The kinds that are the agent's format mistakes (the rest are the tool's answer to a well-formed call).
MALFORMED_KINDS = ERROR_KINDS[:6]

# Task splits: a task's key hashes to a number in [0, 1); these are the upper bounds of each split's share.
SPLITS = {"train": 0.8, "val": 0.9, "test": 1.0}
MAX_TASK_DRAWS = 10_000  # draws ``reset`` makes to land in a split before it calls the task space too small

THINK_RE = re.compile(r"<think>(.*?)</think>", re.DOTALL)
TOOL_CALL_RE = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)
ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


class ToolError(Exception):
    """Raised by a tool to report an error to the agent (shown as ``ERROR: <message>``)."""

    def __init__(self, message: str, kind: str = "tool_error"):
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class Tool:
    """A tool the agent may call: name, description, JSON schema of its arguments, and the callable."""

    name: str
    description: str
    parameters: dict[str, Any]
    fn: Callable[..., str | Finish]
    validator: Any = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        # checked once here (a wrong schema fails when the tool is made), not at every call
        cls = jsonschema.validators.validator_for(self.parameters)
        cls.check_schema(self.parameters)
        object.__setattr__(self, "validator", cls(self.parameters))

    def schema(self) -> dict[str, Any]:
        """The OpenAI / Hermes function description of this tool."""
        return {
            "type": "function",
            "function": {"name": self.name, "description": self.description, "parameters": self.parameters},
        }


@dataclass(frozen=True)
class Finish:
    """Returned by a tool whose call ends the episode: the last observation, the reward and the success."""

    observation: str
    reward: float
    success: bool


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: dict[str, Any]


@dataclass(frozen=True)
class Answer:
    text: str


@dataclass(frozen=True)
class ParseError:
    kind: str
    message: str


def parse_turn(text: str, max_chars: int | None = None) -> ToolCall | Answer | ParseError:
    """Parse one agent turn into a tool call, a final answer, or a parse error (never raises).

    The first ``<tool_call>`` wins over an ``<answer>``: an agent that calls a tool and answers in the
    same turn has not seen the tool's result yet.
    """
    if max_chars is not None and len(text) > max_chars:
        return ParseError("action_too_long", f"the turn has {len(text)} characters; the limit is {max_chars}")
    body = THINK_RE.sub("", text)
    call = TOOL_CALL_RE.search(body)
    if call is not None:
        try:
            payload = json.loads(call.group(1))
        except (json.JSONDecodeError, RecursionError) as err:
            return ParseError("malformed_json", f"the tool call is not valid JSON ({err.__class__.__name__})")
        if not isinstance(payload, dict) or not isinstance(payload.get("name"), str):
            return ParseError("malformed_call", 'a tool call needs the form {"name": "...", "arguments": {...}}')
        arguments = payload.get("arguments", {})
        if not isinstance(arguments, dict):
            return ParseError("malformed_call", '"arguments" must be a JSON object')
        return ToolCall(payload["name"], arguments)
    answer = ANSWER_RE.search(body)
    if answer is not None:
        return Answer(answer.group(1).strip())
    return ParseError(
        "no_action", "no tool call or answer found; write <tool_call>{...}</tool_call> or <answer>...</answer>"
    )


def sanitize(text: str, max_chars: int) -> str:
    """Keep observations inside the observation space: printable ASCII, at most ``max_chars``."""
    text = "".join(ch if ch in CHARSET else "?" for ch in text)
    if len(text) > max_chars:
        marker = "...[truncated]"
        text = text[: max_chars - len(marker)] + marker
    return text


def answers_match(given: str, expected: str, rel_tol: float = 0.0) -> bool:
    """Compare a final answer with the ground truth: as numbers when both are numbers, else as text.

    Numbers are compared exactly (``4908601`` is not ``4908600``; ``12.0`` is ``12``); ``rel_tol`` is for a
    task that declares a float answer (``Task.tolerance``), within ``rel_tol * max(1, |expected|)``.
    """

    def norm(s: str) -> str:
        return s.strip().strip(".").strip("'\"").strip().lower().replace(",", "")

    a, b = norm(given), norm(expected)
    try:
        x, y = Decimal(a), Decimal(b)
    except InvalidOperation:
        return a == b
    if not (x.is_finite() and y.is_finite()):
        return a == b
    if rel_tol == 0:
        return x == y
    return abs(x - y) <= Decimal(str(rel_tol)) * max(Decimal(1), abs(y))


def task_split(key: str) -> str:
    """The split of a task: ``train`` (80%), ``val`` (10%) or ``test`` (10%), from a hash of its key."""
    u = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2**64
    return next(name for name, upper in SPLITS.items() if u < upper)


@dataclass
class Task:
    """One episode's task: the prompt shown to the agent, its ground truth, and anything the expert needs."""

    prompt: str
    answer: str | None
    """the ground truth; None for a task a user gave (``reset(options={"task": ...})``): its success is unknown"""
    extra: dict[str, Any] = field(default_factory=dict)
    tolerance: float = 0.0
    """relative tolerance of a float answer; 0: the answer must be exact"""


class ToolEnv(gym.Env):
    """Base class of the text tool environments (see the module docstring for the turn format).

    Subclasses set ``tools`` in ``__init__`` and implement ``_new_task`` (draw a task from ``self.np_random``)
    and, optionally, ``_grade`` and ``task_key``; a tool may keep what the expert needs in ``Task.extra``.
    A step after the episode terminated raises ``gymnasium.error.ResetNeeded``: an episode pays its reward once.

    ## Arguments
    Every tool environment accepts these keywords besides its own:

    - ``max_action_chars=1000``: the longest agent turn; a longer one is an ``action_too_long`` error.
    - ``max_observation_chars=2000``: observations are cut to this length (and to printable ASCII).
    - ``render_mode=None``: or ``"ansi"`` (``render()`` returns the last observation).
    - ``split=None``: ``"train"``, ``"val"`` or ``"test"`` restricts the tasks ``reset`` draws to one split
      (None: any task); ``reset(options={"split": ...})`` overrides it for one episode.

    ``gymnasium.make``'s ``max_episode_steps`` is the step budget (a ``TimeLimit``).

    ## Information
    The keys the runtime, the collector and the evaluation read (an environment may add its own):

    - ``reset``: ``tools`` (the tools' JSON schemas, as in the prompt), ``task_key`` (what identifies the
      task) and ``split`` (the task's split).
    - ``step``: ``tool`` (the called tool's name, or None), ``error`` (an ``ERROR_KINDS`` entry, or None),
      ``success`` (the episode's outcome once terminated, else False), ``error_counts`` (error kind -> count
      so far this episode) and, after an ``<answer>``, ``answer`` (its text).
    """

    metadata = {"render_modes": ["ansi"], "render_fps": 1}

    def __init__(
        self,
        max_action_chars: int = 1000,
        max_observation_chars: int = 2000,
        render_mode: str | None = None,
        split: str | None = None,
    ):
        if split is not None and split not in SPLITS:
            raise ValueError(f"split must be one of {', '.join(SPLITS)} (or None: any task), got {split!r}")
        self.split = split
        self.max_action_chars = max_action_chars
        self.max_observation_chars = max_observation_chars
        self.render_mode = render_mode
        self.action_space = spaces.Text(max_length=max_action_chars, charset=CHARSET)
        self.observation_space = spaces.Text(max_length=max_observation_chars, charset=CHARSET)
        self.tools: dict[str, Tool] = {}
        self.task: Task | None = None
        self.error_counts: Counter[str] = Counter()
        self.steps = 0
        self.terminated = False
        self._last = ""

    # --- to implement -------------------------------------------------------------------------
    def _new_task(self) -> Task:
        """Draw a task from ``self.np_random`` (seeded by ``reset``)."""
        raise NotImplementedError

    def _grade(self, answer: str) -> tuple[float, bool]:
        """Reward and success of a final answer."""
        ok = answers_match(answer, self.task.answer, self.task.tolerance)
        return float(ok), ok

    def user_task(self, prompt: str) -> Task:
        """The task of a user's own prompt (``reset(options={"task": prompt})``), whose answer nobody knows.

        The default refuses: an environment whose tools need the task's state (a database, a catalogue) cannot
        serve an arbitrary prompt. One whose tools work for any prompt returns ``Task(prompt, answer=None)``.
        """
        raise NotImplementedError(
            f"{type(self).__name__} cannot take a task of yours: its tools depend on the task it draws (override "
            "ToolEnv.user_task where they do not, or give the agent tools of your own)"
        )

    def task_key(self, task: Task) -> str:
        """What identifies ``task``: two draws with the same key are the same task to a policy.

        The default is the prompt; override it when the prompt varies for one task (Calculator's templates
        around one expression) or does not show all of it (SQL's database).
        """
        return task.prompt

    # --- Gymnasium API ------------------------------------------------------------------------
    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[str, dict]:
        """A task drawn from ``seed`` (in ``split``, or ``options["split"]``), or the user's own prompt,
        ``options={"task": prompt}`` (``user_task``: its answer is unknown, so is the episode's success)."""
        super().reset(seed=seed)
        if (options or {}).get("task") is not None:
            self.task = self.user_task(str(options["task"]))
            return self._begin(self.task_key(self.task), None)
        split = (options or {}).get("split", self.split)
        if split is not None and split not in SPLITS:
            raise ValueError(f"options['split'] must be one of {', '.join(SPLITS)}, got {split!r}")
        for _ in range(MAX_TASK_DRAWS):
            self.task = self._new_task()
            key = self.task_key(self.task)
            if split is None or task_split(key) == split:
                break
        else:
            raise RuntimeError(
                f"{type(self).__name__}: no {split} task in {MAX_TASK_DRAWS} draws; its task space is too small "
                "to split"
            )
        return self._begin(key, task_split(key))

    def _begin(self, key: str, split: str | None) -> tuple[str, dict]:
        self.error_counts = Counter()
        self.steps = 0
        self.terminated = False
        self._last = sanitize(self.task.prompt, self.max_observation_chars)
        info = {"tools": [tool.schema() for tool in self.tools.values()], "task_key": key, "split": split}
        return self._last, info

    def step(self, action: str) -> tuple[str, float, bool, bool, dict]:
        if self.task is None:
            raise gym.error.ResetNeeded("call reset() before step()")
        if self.terminated:
            raise gym.error.ResetNeeded("the episode has terminated (its reward was paid); call reset()")
        self.steps += 1
        info: dict[str, Any] = {"tool": None, "error": None, "success": False}
        parsed = parse_turn(str(action), self.max_action_chars)
        reward, terminated = 0.0, False
        if isinstance(parsed, Answer) and self.task.answer is None:  # a user's task: nothing to grade it against
            info.update(answer=parsed.text, success=None)
            observation, terminated = "Answered.", True
        elif isinstance(parsed, Answer):
            reward, success = self._grade(parsed.text)
            info.update(answer=parsed.text, success=success)
            observation, terminated = ("Correct." if success else "Incorrect."), True
        elif isinstance(parsed, ParseError):
            observation = self._error(info, parsed.kind, parsed.message)
        else:
            observation = self._call(parsed, info)
            if isinstance(observation, Finish):
                reward, terminated = float(observation.reward), True
                info["success"] = bool(observation.success)
                observation = observation.observation
        info["error_counts"] = dict(self.error_counts)
        self.terminated = terminated
        self._last = sanitize(observation, self.max_observation_chars)
        return self._last, reward, terminated, False, info

    def render(self) -> str | None:
        if self.render_mode == "ansi":
            return self._last
        return None

    # --- helpers ------------------------------------------------------------------------------
    def _error(self, info: dict, kind: str, message: str) -> str:
        info["error"] = kind
        self.error_counts[kind] += 1
        return f"ERROR: {message}"

    def _call(self, call: ToolCall, info: dict) -> str | Finish:
        tool = self.tools.get(call.name)
        info["tool"] = call.name
        if tool is None:
            return self._error(info, "unknown_tool", f"unknown tool {call.name!r}; available: {', '.join(self.tools)}")
        error = jsonschema.exceptions.best_match(tool.validator.iter_errors(call.arguments))
        if error is not None:  # what jsonschema.validate would raise
            return self._error(info, "bad_arguments", f"bad arguments for {tool.name}: {error.message}")
        try:
            result = tool.fn(**call.arguments)
            return result if isinstance(result, Finish) else str(result)
        except ToolError as err:
            return self._error(info, err.kind, str(err))
        except Exception as err:  # a crashing tool is the episode's problem, never the trainer's
            return self._error(info, "tool_exception", f"{tool.name} failed: {err.__class__.__name__}: {err}")
