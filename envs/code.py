"""Code-v0: a small Python function that passes hidden unit tests, run in a sandbox (documented on ``CodeEnv``)."""

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


LETTERS = list("aeioulnrst")
PROBLEMS = [
    Problem(
        "sum_multiples", "sum_multiples(xs)", "returns the sum of the numbers in xs that are divisible by {k}",
        "def sum_multiples(xs):\n    return sum(x for x in xs if x % {k} == 0)",
        "def sum_multiples(xs):\n    return sum(x for x in xs if x % {k} != 0)",
        lambda rng: {"k": int(rng.integers(2, 21))}, lambda rng, p: [_ints(rng, low=-60, high=100)],
    ),
    Problem(
        "count_above", "count_above(xs)", "returns how many numbers in xs are greater than {t}",
        "def count_above(xs):\n    return sum(1 for x in xs if x > {t})",
        "def count_above(xs):\n    return sum(1 for x in xs if x >= {t})",
        lambda rng: {"t": int(rng.integers(-20, 81))},
        lambda rng, p: [_ints(rng, low=p["t"] - 25, high=p["t"] + 25) + [p["t"]]],
    ),
    Problem(
        "scale", "scale(xs)", "returns a list of the numbers in xs, each multiplied by {k}",
        "def scale(xs):\n    return [x * {k} for x in xs]",
        "def scale(xs):\n    return [x + {k} for x in xs]",
        lambda rng: {"k": int(rng.integers(2, 51))}, lambda rng, p: [_ints(rng)],
    ),
    Problem(
        "max_plus", "max_plus(xs)", "returns the largest number in xs plus {c}, or {c} when xs is empty",
        "def max_plus(xs):\n    return max(xs, default=0) + {c}",
        "def max_plus(xs):\n    return max(xs) + {c}",
        lambda rng: {"c": int(rng.integers(1, 201))}, lambda rng, p: [_ints(rng, low=0)],
    ),
    Problem(
        "repeat", "repeat(s)", "returns the string s repeated {n} times",
        "def repeat(s):\n    return s * {n}",
        "def repeat(s):\n    return s * {n} + s",
        lambda rng: {"n": int(rng.integers(2, 10))}, lambda rng, p: [_words(rng)[:12]],
    ),
    Problem(
        "long_words", "long_words(s)", "returns how many words of the string s have more than {n} letters",
        "def long_words(s):\n    return sum(1 for w in s.split() if len(w) > {n})",
        "def long_words(s):\n    return sum(1 for w in s.split() if len(w) >= {n})",
        lambda rng: {"n": int(rng.integers(1, 7))}, lambda rng, p: [_words(rng)],
    ),
    Problem(
        "replace_char", "replace_char(s)", "returns the string s with every '{a}' replaced by '{b}'",
        "def replace_char(s):\n    return s.replace('{a}', '{b}')",
        "def replace_char(s):\n    return s.replace('{a}', '{b}', 1)",
        lambda rng: dict(zip("ab", (str(c) for c in rng.choice(LETTERS, size=2, replace=False)))),
        lambda rng, p: [_words(rng)],
    ),
    Problem(
        "last_reversed", "last_reversed(xs)", "returns the last {n} elements of xs in reverse order",
        "def last_reversed(xs):\n    return xs[::-1][:{n}]",
        "def last_reversed(xs):\n    return xs[-{n}:]",
        lambda rng: {"n": int(rng.integers(1, 7))}, lambda rng, p: [_ints(rng)],
    ),
    Problem(
        "below", "below(xs)", "returns the numbers in xs that are less than {t}, in their order",
        "def below(xs):\n    return [x for x in xs if x < {t}]",
        "def below(xs):\n    return [x for x in xs if x <= {t}]",
        lambda rng: {"t": int(rng.integers(-20, 81))},
        lambda rng, p: [_ints(rng, low=p["t"] - 25, high=p["t"] + 25) + [p["t"]]],
    ),
    Problem(
        "count_char", "count_char(s)", "returns how many times the letter '{a}' occurs in the string s",
        "def count_char(s):\n    return s.count('{a}')",
        "def count_char(s):\n    return s.count('{a}') + 1",
        lambda rng: {"a": str(rng.choice(LETTERS))}, lambda rng, p: [_words(rng)],
    ),
    Problem(
        "cap", "cap(xs)", "returns a list of the numbers in xs, each one above {c} replaced by {c}",
        "def cap(xs):\n    return [min(x, {c}) for x in xs]",
        "def cap(xs):\n    return [max(x, {c}) for x in xs]",
        lambda rng: {"c": int(rng.integers(-20, 81))},
        lambda rng, p: [_ints(rng, low=p["c"] - 25, high=p["c"] + 25)],
    ),
]  # fmt: skip


def reference(problem: Problem, params: dict[str, Any]) -> Callable:
    """The trusted reference solution (our own template, run in this process to compute expected outputs)."""
    namespace: dict[str, Any] = {}
    exec(problem.solution.format(**params), namespace)  # noqa: S102 - our template, never model text
    return namespace[problem.name]


class CodeEnv(ToolEnv):
    """Code-v0: write a small Python function that passes hidden unit tests; the code runs only in a sandbox.

    ## Description
    Each seed draws a task from a family of small programming problems with random constants ("Write a
    Python function count_above(xs) that returns how many numbers in xs are greater than 7."), a few visible
    example tests and a set of hidden tests: inputs generated from the seed, expected outputs from a reference
    solution. No hidden input is also an example, and no observation ever shows a hidden input.

    ## Tools
    - ``run_tests(code: str)``: runs the *example* tests on ``code``; returns the pass count and the first
      failing example in full (its input, what came back, what was expected), as a problem statement's
      examples would show it.
    - ``submit(code: str)``: grades ``code`` on the *hidden* tests and ends the episode; the observation gives
      only the pass count.

    A policy that hard-codes what ``run_tests`` reveals learns the examples, not the hidden tests: the reward
    comes only from code that computes the function. Code runs only in ``envs.sandbox`` (a separate process
    with CPU, wall, memory, file-size and output limits, no network, no processes, no files outside its own
    temporary directory); nothing the code does reaches the trainer, which only sees the returned values.

    ## Arguments
    ```python
    gymnasium.make("Code-v0", n_tests=6, n_examples=3, wall_s=5.0, cpu_s=2, memory_mb=256, max_code_chars=2000,
                   max_action_chars=1000, max_observation_chars=2000, render_mode=None, split=None,
                   max_episode_steps=8)
    ```
    - ``n_tests=6``: hidden tests ``submit`` grades; ``n_examples=3``: example tests ``run_tests`` runs.
    - ``wall_s=5.0``, ``cpu_s=2``, ``memory_mb=256``: the sandbox's limits for one ``run_tests`` or ``submit``.
    - ``max_code_chars=2000``: the longest ``code`` argument accepted.
    - ``max_action_chars=1000``, ``max_observation_chars=2000``, ``render_mode=None`` (or ``"ansi"``),
      ``split=None`` (``"train"``, ``"val"``, ``"test"``): :class:`envs.base.ToolEnv`'s, as in every tool env.
    - ``max_episode_steps``: Gymnasium's step budget (a ``TimeLimit``).

    ## Information
    :class:`envs.base.ToolEnv`'s keys (``tools``, ``task_key``, ``split`` from ``reset``; ``tool``, ``error``,
    ``success``, ``error_counts`` and ``answer`` from ``step``).

    ## Rewards
    The fraction of hidden tests ``submit``'s code passes; success when all pass. An ``<answer>`` without a
    submission gives up (reward 0).

    ## Episode End
    Terminated by ``submit`` (or an answer); truncated by the step budget (``max_episode_steps``, default 8).

    ## Seeds and splits
    ``reset(seed=s)`` fixes the task, its constants and the test inputs. A task is the problem with its
    constants (``task_key``: 691 of them, in 11 families), and ``split=...`` keeps the tasks of one split.

    ## Version History
    - v0: initial version; examples apart from hidden tests, and wider constants, since the task split.
    """

    def __init__(
        self,
        n_tests: int = 6,
        n_examples: int = 3,
        wall_s: float = 5.0,
        cpu_s: int = 2,
        memory_mb: int = 256,
        max_code_chars: int = 2000,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if n_tests < 1 or n_examples < 1:
            raise ValueError(f"n_tests and n_examples must be >= 1, got {n_tests} and {n_examples}")
        self.n_tests, self.n_examples = n_tests, n_examples
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
                description="Run the example tests on your code; returns the pass count and the first failing example.",
                parameters=code_schema,
                fn=self._run_tests,
            ),
            "submit": Tool(
                name="submit",
                description="Submit your code for grading on the hidden tests; ends the episode.",
                parameters=code_schema,
                fn=self._submit,
            ),
        }
        self.problem: Problem | None = None
        self.examples: list[tuple[list, Any]] = []  # shown by run_tests
        self.tests: list[tuple[list, Any]] = []  # hidden: graded by submit, never shown

    def draw_problem(self, rng: np.random.Generator) -> tuple[Problem, dict[str, Any]]:
        """The task's problem and constants; a subclass may draw others (``docs/examples/code_letters.py``)."""
        problem = PROBLEMS[int(rng.integers(len(PROBLEMS)))]
        return problem, problem.params(rng)

    def _new_task(self) -> Task:
        rng = self.np_random
        problem, params = self.draw_problem(rng)
        solve = reference(problem, params)
        self.problem = problem
        cases, seen = [], set()
        for _ in range(100 * (self.n_examples + self.n_tests)):  # distinct inputs: no hidden test is an example
            args = problem.inputs(rng, params)
            if json.dumps(args) not in seen:
                seen.add(json.dumps(args))
                cases.append((args, solve(*args)))
            if len(cases) == self.n_examples + self.n_tests:
                break
        else:
            raise RuntimeError(f"Code-v0: {problem.name} has too few distinct inputs for its tests")
        self.examples, self.tests = cases[: self.n_examples], cases[self.n_examples :]
        prompt = f"Write a Python function {problem.signature} that {problem.description.format(**params)}."
        return Task(prompt=prompt, answer="", extra={"problem": problem.name, "params": params})

    def task_key(self, task: Task) -> str:
        return f"{task.extra['problem']}:{json.dumps(task.extra['params'], sort_keys=True)}"

    def grade(self, code: str, tests: list[tuple[list, Any]] | None = None) -> tuple[int, str]:
        """Run ``tests`` (default: the hidden ones) on ``code``: the number passed and the first failure."""
        tests = self.tests if tests is None else tests
        result = run_calls(code, self.problem.name, [args for args, _ in tests], self.limits)
        if result.load_error:
            return 0, f"error: {result.load_error}"
        passed, first = 0, None
        for i, (args, expected) in enumerate(tests):
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
        passed, first = self.grade(code, self.examples)
        text = f"passed {passed}/{len(self.examples)} examples"
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
