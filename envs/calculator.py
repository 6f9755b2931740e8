"""Calculator-v0: integer arithmetic through a flaky calculator tool (documented on ``CalculatorEnv``)."""

from __future__ import annotations

import ast
import operator

from envs.base import Task, Tool, ToolEnv, ToolError, answers_match
from envs.teacher import ScriptedTeacher, answer, tool_call

_BINOPS = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}
MAX_EXPRESSION_CHARS = 200
MAX_MAGNITUDE = 10**30


def evaluate_arithmetic(expression: str) -> int | float:
    """Evaluate an arithmetic expression safely; raise ToolError on anything else."""
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise ToolError(f"expression longer than {MAX_EXPRESSION_CHARS} characters")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except (SyntaxError, ValueError):
        raise ToolError(f"cannot parse {expression!r} as arithmetic") from None

    def ev(node: ast.AST) -> int | float:
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            return node.value
        if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
            return _UNARY[type(node.op)](ev(node.operand))
        if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
            left, right = ev(node.left), ev(node.right)
            if isinstance(node.op, ast.Pow) and (abs(right) > 64 or abs(left) > 10**6):
                raise ToolError("exponent too large")
            try:
                value = _BINOPS[type(node.op)](left, right)
            except ZeroDivisionError:
                raise ToolError("division by zero") from None
            if isinstance(value, complex) or abs(value) > MAX_MAGNITUDE:
                raise ToolError("result out of range")
            return value
        raise ToolError(f"only numbers and + - * / // % ** ( ) are allowed, not {type(node).__name__}")

    return ev(tree)


def format_number(value: int | float) -> str:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value) if isinstance(value, int) else f"{value:.6g}"


class CalculatorEnv(ToolEnv):
    """Calculator-v0: arithmetic a small model cannot do in its head, with a flaky calculator tool.

    ## Description
    Each episode asks for the value of an integer expression of two or three 2-4 digit operands joined by
    ``+``, ``-`` and ``*`` (for example "What is 4821 * 37 - 905?"). A small model cannot multiply four-digit
    numbers reliably in its weights; it must call the calculator, read the result and answer with it.

    ## Tools
    ``calculator(expression: str)``: evaluates arithmetic only (numbers, ``+ - * / // % **`` and
    parentheses, parsed with :mod:`ast`, never ``eval``). With probability ``fail_prob`` a call fails
    transiently with ``ERROR: timeout, try again`` (kind ``tool_timeout``): the agent must retry.

    ## Action Space
    ``Text(max_length=max_action_chars)``: the agent's turn (see :mod:`envs.base`).

    ## Observation Space
    ``Text(max_length=max_observation_chars)``: the question after ``reset``, then tool results or errors.

    ## Arguments
    ```python
    gymnasium.make("Calculator-v0", fail_prob=0.2, max_operands=3, max_action_chars=1000,
                   max_observation_chars=2000, render_mode=None, split=None, max_episode_steps=8)
    ```
    - ``fail_prob=0.2``: probability that a calculator call fails with a transient timeout; in [0, 1).
    - ``max_operands=3``: expressions have 2 to ``max_operands`` operands.
    - ``max_action_chars=1000``, ``max_observation_chars=2000``, ``render_mode=None`` (or ``"ansi"``),
      ``split=None`` (``"train"``, ``"val"``, ``"test"``): :class:`envs.base.ToolEnv`'s, as in every tool env.
    - ``max_episode_steps``: Gymnasium's step budget (a ``TimeLimit``).

    ## Information
    :class:`envs.base.ToolEnv`'s keys (``tools``, ``task_key``, ``split`` from ``reset``; ``tool``, ``error``,
    ``success``, ``error_counts`` and ``answer`` from ``step``).

    ## Rewards
    1.0 for a final answer equal to the expression's value (exactly: an integer off by one is wrong), 0.0
    otherwise.

    ## Episode End
    Terminated by a final answer; truncated by the step budget (``max_episode_steps``, default 8).

    ## Seeds and splits
    ``reset(seed=s)`` fixes the question and the sequence of transient failures. A task is its expression
    (``task_key``); ``split="test"`` draws only expressions whose hash lands in the test split.

    ## Version History
    - v0: initial version.
    """

    def __init__(self, fail_prob: float = 0.2, max_operands: int = 3, **kwargs):
        super().__init__(**kwargs)
        if not 0.0 <= fail_prob < 1.0:
            raise ValueError(f"fail_prob must be in [0, 1), got {fail_prob}")
        self.fail_prob = fail_prob
        self.max_operands = max_operands
        self.tools = {
            "calculator": Tool(
                name="calculator",
                description="Evaluate an arithmetic expression (numbers, + - * / // % ** and parentheses).",
                parameters={
                    "type": "object",
                    "properties": {"expression": {"type": "string", "description": "e.g. '12 * (3 + 4)'"}},
                    "required": ["expression"],
                    "additionalProperties": False,
                },
                fn=self._calculator,
            )
        }

    def _calculator(self, expression: str) -> str:
        if self.np_random.random() < self.fail_prob:
            raise ToolError("timeout, try again", kind="tool_timeout")
        return format_number(evaluate_arithmetic(expression))

    def _new_task(self) -> Task:
        rng = self.np_random
        n = int(rng.integers(2, self.max_operands + 1))
        numbers = [int(rng.integers(10, 10 ** int(rng.integers(2, 5)))) for _ in range(n)]
        ops = [str(rng.choice(["+", "-", "*"], p=[0.3, 0.3, 0.4])) for _ in range(n - 1)]
        expression = str(numbers[0]) + "".join(f" {op} {x}" for op, x in zip(ops, numbers[1:]))
        template = str(rng.choice(["What is {}?", "Compute {}.", "Calculate {}.", "What is the value of {}?"]))
        value = format_number(evaluate_arithmetic(expression))
        return Task(prompt=template.format(expression), answer=value, extra={"expression": expression})

    def user_task(self, prompt: str) -> Task:
        """Any prompt: the calculator evaluates whatever expression the agent sends."""
        return Task(prompt=prompt, answer=None)

    def task_key(self, task: Task) -> str:
        return task.extra.get("expression", task.prompt)  # the template is surface; a user task: its prompt


class CalculatorTeacher(ScriptedTeacher):
    """Expert: call the calculator on the expression, retry after a timeout, answer with the result."""

    def expert(self, env: CalculatorEnv, history: list[tuple[str, str]]) -> str:
        """From any state (DAgger labels the policy's): answer once the last observation is the expression's
        value, else call the calculator on the expression (again, after a timeout or a wrong call)."""
        expression = env.task.extra["expression"]
        if history and answers_match(history[-1][1].strip(), env.task.answer, env.task.tolerance):
            return answer(history[-1][1].strip())
        thought = "The tool failed; retry." if history and history[-1][1].startswith("ERROR") else "Use the calculator."
        return self.thought(thought) + tool_call("calculator", expression=expression)

    def lazy_act(self, env: CalculatorEnv, history: list[tuple[str, str]]) -> str:
        """A lazy teacher guesses, drops an operand, or gives up after an error."""
        expression = env.task.extra["expression"]
        mode = self.rng.integers(3)
        if mode == 0 or (history and history[-1][1].startswith("ERROR")):
            guess = int(float(env.task.answer) * (1 + self.rng.uniform(-0.2, 0.2)))
            return self.thought("Estimate it.") + answer(str(guess))
        if not history:
            truncated = expression.rsplit(" ", 2)[0] if mode == 1 else expression
            return self.thought("Use the calculator.") + tool_call("calculator", expression=truncated)
        return answer(history[-1][1].strip())
