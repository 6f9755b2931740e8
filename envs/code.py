"""Code-v0: write a small Python function that passes hidden unit tests; the code runs only in a sandbox.

## Description
Each seed draws a task from a family of small programming problems with random parameters ("Write a
Python function count_above(xs) that returns how many numbers in xs are greater than 7.") and a set of
hidden unit tests: inputs generated from the seed, expected outputs from a reference solution.

## Tools
- ``run_tests(code: str)``: runs the hidden tests on ``code``; returns the pass count and the first failure
  (its input, what came back, what was expected) or error.
- ``submit(code: str)``: grades ``code`` on the hidden tests and ends the episode.

Code runs only in ``envs.sandbox`` (a separate process with CPU, wall, memory, file-size and output limits,
no network, no processes, no files outside its own temporary directory); nothing the code does reaches
the trainer, which only sees the returned values.

## Rewards
The fraction of hidden tests ``submit``'s code passes; success when all pass. An ``<answer>`` without a
submission gives up (reward 0).

## Episode End
Terminated by ``submit`` (or an answer); truncated by the step budget (``max_episode_steps``, default 8).

## Seeds
``reset(seed=s)`` fixes the task, its parameters and the test inputs.

## Version History
- v0: initial version.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from envs.base import Finish, Task, Tool, ToolEnv
from envs.sandbox import SandboxLimits, run_calls
from envs.teacher import ScriptedTeacher, tool_call


@dataclass(frozen=True)
class Problem:
    """A task family: description, signature, solution and a typical bug as templates, an input generator."""

    name: str
    signature: str
    description: str
    solution: str
    bug: str
    params: Callable[[np.random.Generator], dict[str, Any]]
    inputs: Callable[[np.random.Generator, dict[str, Any]], list]


def _ints(rng: np.random.Generator, n: int | None = None, low: int = -20, high: int = 30) -> list[int]:
    return [int(x) for x in rng.integers(low, high, size=int(rng.integers(0, 9)) if n is None else n)]


def _words(rng: np.random.Generator) -> str:
    vocab = ["cat", "sun", "apple", "river", "a", "stone", "tree", "moon", "banana", "sky", "do", "garden"]
    return " ".join(str(w) for w in rng.choice(vocab, size=int(rng.integers(0, 7))))


PROBLEMS = [
    Problem(
        "sum_multiples", "sum_multiples(xs)", "returns the sum of the numbers in xs that are divisible by {k}",
        "def sum_multiples(xs):\n    return sum(x for x in xs if x % {k} == 0)",
        "def sum_multiples(xs):\n    return sum(x for x in xs if x % {k} != 0)",
        lambda rng: {"k": int(rng.integers(2, 8))}, lambda rng, p: [_ints(rng)],
    ),
    Problem(
        "count_above", "count_above(xs)", "returns how many numbers in xs are greater than {t}",
        "def count_above(xs):\n    return sum(1 for x in xs if x > {t})",
        "def count_above(xs):\n    return sum(1 for x in xs if x >= {t})",
        lambda rng: {"t": int(rng.integers(-5, 20))}, lambda rng, p: [_ints(rng) + [p["t"]]],
    ),
    Problem(
        "scale", "scale(xs)", "returns a list of the numbers in xs, each multiplied by {k}",
        "def scale(xs):\n    return [x * {k} for x in xs]",
        "def scale(xs):\n    return [x + {k} for x in xs]",
        lambda rng: {"k": int(rng.integers(2, 10))}, lambda rng, p: [_ints(rng)],
    ),
    Problem(
        "max_plus", "max_plus(xs)", "returns the largest number in xs plus {c}, or {c} when xs is empty",
        "def max_plus(xs):\n    return max(xs, default=0) + {c}",
        "def max_plus(xs):\n    return max(xs) + {c}",
        lambda rng: {"c": int(rng.integers(1, 50))}, lambda rng, p: [_ints(rng, low=0)],
    ),
    Problem(
        "repeat", "repeat(s)", "returns the string s repeated {n} times",
        "def repeat(s):\n    return s * {n}",
        "def repeat(s):\n    return s * {n} + s",
        lambda rng: {"n": int(rng.integers(2, 6))}, lambda rng, p: [_words(rng)[:12]],
    ),
    Problem(
        "long_words", "long_words(s)", "returns how many words of the string s have more than {n} letters",
        "def long_words(s):\n    return sum(1 for w in s.split() if len(w) > {n})",
        "def long_words(s):\n    return sum(1 for w in s.split() if len(w) >= {n})",
        lambda rng: {"n": int(rng.integers(2, 6))}, lambda rng, p: [_words(rng)],
    ),
    Problem(
        "replace_char", "replace_char(s)", "returns the string s with every '{a}' replaced by '{b}'",
        "def replace_char(s):\n    return s.replace('{a}', '{b}')",
        "def replace_char(s):\n    return s.replace('{a}', '{b}', 1)",
        lambda rng: dict(zip("ab", (str(c) for c in rng.choice(list("aeiounst"), size=2, replace=False)))),
        lambda rng, p: [_words(rng)],
    ),
    Problem(
        "last_reversed", "last_reversed(xs)", "returns the last {n} elements of xs in reverse order",
        "def last_reversed(xs):\n    return xs[::-1][:{n}]",
        "def last_reversed(xs):\n    return xs[-{n}:]",
        lambda rng: {"n": int(rng.integers(2, 5))}, lambda rng, p: [_ints(rng)],
    ),
]  # fmt: skip


def reference(problem: Problem, params: dict[str, Any]) -> Callable:
    """The trusted reference solution (our own template, run in this process to compute expected outputs)."""
    namespace: dict[str, Any] = {}
    exec(problem.solution.format(**params), namespace)  # noqa: S102 - our template, never model text
    return namespace[problem.name]


class CodeEnv(ToolEnv):
    """Programming tasks graded by hidden unit tests run in a sandbox (see the module docstring)."""

    def __init__(
        self,
        n_tests: int = 6,
        wall_s: float = 5.0,
        cpu_s: int = 2,
        memory_mb: int = 256,
        max_code_chars: int = 2000,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.n_tests = n_tests
        self.limits = SandboxLimits(wall_s=wall_s, cpu_s=cpu_s, memory_mb=memory_mb)
        self.max_code_chars = max_code_chars
        code_schema = {
            "type": "object",
            "properties": {"code": {"type": "string", "maxLength": max_code_chars}},
            "required": ["code"],
            "additionalProperties": False,
        }
        self.tools = {
            "run_tests": Tool(
                name="run_tests",
                description="Run the hidden unit tests on your code; returns the pass count and the first failure.",
                parameters=code_schema,
                fn=self._run_tests,
            ),
            "submit": Tool(
                name="submit",
                description="Submit your code for grading; ends the episode.",
                parameters=code_schema,
                fn=self._submit,
            ),
        }
        self.problem: Problem | None = None
        self.tests: list[tuple[list, Any]] = []

    def _new_task(self) -> Task:
        rng = self.np_random
        problem = PROBLEMS[int(rng.integers(len(PROBLEMS)))]
        params = problem.params(rng)
        solve = reference(problem, params)
        self.problem = problem
        self.tests = []
        for _ in range(self.n_tests):
            args = problem.inputs(rng, params)
            self.tests.append((args, solve(*args)))
        prompt = f"Write a Python function {problem.signature} that {problem.description.format(**params)}."
        return Task(prompt=prompt, answer="", extra={"problem": problem.name, "params": params})

    def grade(self, code: str) -> tuple[int, str]:
        """Run the hidden tests on ``code``: the number passed and a message about the first failure."""
        result = run_calls(code, self.problem.name, [args for args, _ in self.tests], self.limits)
        if result.load_error:
            return 0, f"error: {result.load_error}"
        passed, first = 0, None
        for i, (args, expected) in enumerate(self.tests):
            call = f"{self.problem.name}({', '.join(json.dumps(a) for a in args)})"
            if i >= len(result.outcomes):
                reason = "timed out" if result.killed == "timeout" else "did not finish"
                first = first or f"{call} {reason} (limits: {self.limits.cpu_s} s CPU, {self.limits.wall_s} s wall)"
                continue
            outcome = result.outcomes[i]
            if "value" in outcome and outcome["value"] == json.loads(json.dumps(expected)):
                passed += 1
            elif first is None:
                if "error" in outcome:
                    first = f"{call} raised {outcome['error']}"
                else:
                    got = json.dumps(outcome["value"]) if "value" in outcome else outcome.get("value_repr", "?")
                    first = f"{call} returned {got}, expected {json.dumps(expected)}"
        return passed, first or ""

    def _run_tests(self, code: str) -> str:
        passed, first = self.grade(code)
        text = f"passed {passed}/{len(self.tests)}"
        return f"{text}; first failure: {first}" if first else text

    def _submit(self, code: str) -> Finish:
        passed, _ = self.grade(code)
        n = len(self.tests)
        return Finish(f"Submitted: passed {passed}/{n} tests.", passed / n, passed == n)

    def _grade(self, answer: str) -> tuple[float, bool]:
        return 0.0, False  # the task is to submit code


class CodeTeacher(ScriptedTeacher):
    """Expert: write the solution, run the tests, submit. A lazy teacher writes the family's typical bug and
    either submits it untested or submits it although the tests fail."""

    def begin(self, env, rng) -> None:
        super().begin(env, rng)
        self.untested = bool(rng.random() < 0.5)

    def expert(self, env: CodeEnv, history: list[tuple[str, str]]) -> str:
        return self._act(env, history, env.problem.solution)

    def lazy_act(self, env: CodeEnv, history: list[tuple[str, str]]) -> str:
        if self.untested:
            return tool_call("submit", code=env.problem.bug.format(**env.task.extra["params"]))
        return self._act(env, history, env.problem.bug)

    def _act(self, env: CodeEnv, history: list[tuple[str, str]], template: str) -> str:
        code = template.format(**env.task.extra["params"])
        tested = [obs for _, obs in history if obs.startswith("passed")]
        if not tested:
            return self.thought("Write it and test it.") + tool_call("run_tests", code=code)
        return tool_call("submit", code=code)
