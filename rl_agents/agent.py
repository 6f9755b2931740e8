"""The compiled agent, used: its card (``agent.json``) and ``Agent``, a task in, an answer out.

Every policy a run saves (``bc/policy``, ``dagger/policy``, ``rl/policy``, and the LoRA adapters beside them)
holds an agent card: the trajectory format version and its special tokens, the tokenizer's fingerprint, each
environment with its keyword arguments and its tools (name, description, JSON schema of the arguments), the
runtime settings it ran with (turns, new tokens per turn, context), and where it came from (stage, package
version, the run's config, a digest of the training data)::

    from rl_agents import Agent
    agent = Agent.from_pretrained("outputs/<run>/bc/policy")
    result = agent.run("What is 6097 * 4981 - 12?")      # the user's own task, not a seed
    result.answer, result.stop_reason, result.turns, result.latency_ms
    results = agent.run_batch(tasks)                      # batched on the runtime's slots

The tools are the card's environment's, given the user's task (``ToolEnv.user_task``), or the user's own:
``Agent.from_pretrained(path, tools={"calculator": my_function})`` replaces a tool the card declares (any
other name is refused). The environment stands between the model and every tool: an undeclared tool or
arguments that fail the tool's JSON schema become an error observation, not a call (the result's
``refused``), and a user's tool runs under ``tool_timeout_s``. Each run is bounded by the card's turns and
new tokens per turn (``max_turns``, ``max_new_tokens`` override them), the model's context and a wall time
(``max_wall_s``, checked at the end of each turn); the result says which ended it. A user's task has no
ground truth: its ``success`` is None.
"""

from __future__ import annotations

import importlib.metadata
import json
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gymnasium as gym
from omegaconf import DictConfig, OmegaConf
from transformers import AutoTokenizer

from envs.base import MALFORMED_KINDS, Answer, Task, Tool, ToolError, parse_turn
from rl_agents import rundir
from rl_agents.config import env_entries
from rl_agents.model import load_policy
from rl_agents.runtime import Feed, Runtime, RuntimeConfig
from rl_agents.trajectory import FORMAT_VERSION, SPECIAL_TOKENS, Trajectory, tokenizer_fingerprint

CARD = "agent.json"
CARD_VERSION = 1


class AgentCardError(ValueError):
    """A policy directory whose card is missing or does not match this package or its own tokenizer."""


# --- the card ------------------------------------------------------------------------------------
def agent_card(cfg: DictConfig, tokenizer, stage: str, data: Path | None = None) -> dict[str, Any]:
    """The card of a policy trained by ``cfg`` in ``stage`` on ``data``."""
    envs = {}
    for env_id, entry in env_entries(cfg).items():
        env = gym.make(env_id, **entry.kwargs)
        try:
            envs[env_id] = {"kwargs": entry.kwargs, "tools": [t.schema() for t in env.unwrapped.tools.values()]}
        finally:
            env.close()
    runtime = cfg.runtime
    return {
        "card_version": CARD_VERSION,
        "format_version": FORMAT_VERSION,
        "special_tokens": SPECIAL_TOKENS,
        "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
        "envs": envs,
        "runtime": {
            "max_turns": runtime.max_turns,
            "max_new_tokens": runtime.max_new_tokens,
            "max_context": runtime.max_context,
        },  # fmt: skip
        "provenance": {
            "stage": stage,
            "package_version": _version(),
            "training_data_digest": rundir.digest(data) if data is not None else None,
            "config": OmegaConf.to_container(cfg, resolve=True),
        },
    }


def _version() -> str:
    try:
        return importlib.metadata.version("rl_agents")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def write_card(policy_dir: Path, card: dict[str, Any]) -> None:
    rundir.write_text(Path(policy_dir) / CARD, json.dumps(card, indent=2, default=str))


def card_policy(cfg: DictConfig, stage: str, policy: Path, data: Path | None = None, tokenizer=None) -> None:
    """The agent card (``agent.json``) and model card (``README.md``, without the evaluation, which
    ``rl_agents.export`` adds) of a stage's policy and of its LoRA adapter, before the stage's record."""
    if tokenizer is None:
        tokenizer = AutoTokenizer.from_pretrained(policy, local_files_only=True)
    card = agent_card(cfg, tokenizer, stage, data)
    for directory in (policy, policy.parent / "adapter"):
        if directory.is_dir():
            write_card(directory, card)
            rundir.write_text(directory / "README.md", model_card(card, stage))


def model_card(card: dict[str, Any], stage: str) -> str:
    """A Hugging Face model card: YAML header (with model-index results), the evaluation, how to run it."""
    envs = list(card["envs"])
    tools = sorted({t["function"]["name"] for env in card["envs"].values() for t in env["tools"]})
    evaluation = card.get("eval", {})
    mine = evaluation.get("policies", {}).get(stage, {})
    results = "".join(
        f"      - task: {{type: tool-use, name: {env}}}\n"
        f"        dataset: {{type: {env}, name: {env} {evaluation.get('split')} tasks}}\n"
        f"        metrics:\n          - {{type: success_rate, value: {mine.get('success_rate')}}}\n"
        for env in envs
        if mine
    )
    header = "---\nlibrary_name: transformers\ntags: [rl_agents, agent, tool-use]\n"
    if results:
        header += f"model-index:\n  - name: {stage}-policy\n    results:\n{results}"
    header += "---\n"
    rows = (
        "".join(
            f"| {name} | {m.get('success_rate')} | {m.get('episodes')} | {m.get('mean_turns')} |\n"
            for name, m in evaluation.get("policies", {}).items()
        )
        or "| (not evaluated) | | | |\n"
    )
    return (
        f"{header}\n# A compiled agent ({stage} policy)\n\n"
        f"Compiled by rl_agents {card['provenance']['package_version']} for {', '.join(envs)} "
        f"(tools: {', '.join(tools)}). Trajectory format version {card['format_version']}.\n\n"
        f"## Evaluation ({evaluation.get('split')} tasks, {evaluation.get('decoding')} decoding)\n\n"
        "| policy | success rate | episodes | mean turns |\n| --- | --- | --- | --- |\n"
        f"{rows}\n"
        "## Run it\n\n```python\nfrom rl_agents import Agent\n"
        'agent = Agent.from_pretrained("<this directory>")\nprint(agent.run("<your task>").answer)\n```\n\n'
        "```bash\npython -m rl_agents.serve agent=<this directory>\n```\n"
    )


def read_card(policy_dir: str | Path, tokenizer) -> dict[str, Any]:
    """The card of ``policy_dir``, checked against this package's format and the directory's tokenizer."""
    path = Path(policy_dir) / CARD
    if not path.is_file():
        raise AgentCardError(f"{policy_dir} has no {CARD}: it was not saved by a run of this package (or an older one)")
    card = json.loads(path.read_text())
    if card.get("format_version") != FORMAT_VERSION:
        raise AgentCardError(
            f"{path}: trajectory format version {card.get('format_version')}, this package speaks {FORMAT_VERSION}"
        )
    if card.get("special_tokens") != SPECIAL_TOKENS:
        raise AgentCardError(f"{path}: special tokens {card.get('special_tokens')}; this package's: {SPECIAL_TOKENS}")
    if card.get("tokenizer_fingerprint") != tokenizer_fingerprint(tokenizer):
        raise AgentCardError(
            f"{path}: the card's tokenizer fingerprint {card.get('tokenizer_fingerprint')} is not the directory's "
            f"tokenizer's ({tokenizer_fingerprint(tokenizer)}): the model files and the card do not belong together"
        )
    return card


# --- results -------------------------------------------------------------------------------------
@dataclass
class AgentTurn:
    text: str
    """the model's turn, as it wrote it"""
    tool: str | None
    observation: str | None
    error: str | None
    latency_ms: float | None

    @classmethod
    def of(cls, turn) -> AgentTurn:
        """The result's view of a runtime ``Turn``."""
        return cls(turn.agent, turn.tool, turn.observation, turn.error, turn.latency_ms)


@dataclass
class AgentResult:
    task: str
    answer: str | None
    """the final answer, or None when the run ended without one"""
    stop_reason: str
    """answer; max_turns (the agent's turn budget), context_length (the model's), max_steps (the environment's),
    wall_time (``max_wall_s``), malformed (with end_on_malformed), ended (the environment ended it without an
    answer), cancelled (``Feed.cancel``: a server's client left)"""
    turns: list[AgentTurn]
    latency_ms: float
    success: bool | None = None
    """None for the user's own task (nothing to compare with)"""
    refused: list[str] = field(default_factory=list)
    """what the guard refused: each malformed turn, undeclared tool or bad arguments, with its kind"""


def _turn_hook(on_turn: Callable[[int, AgentTurn, bool], None] | None):
    """The runtime's ``on_turn`` for a caller's, each turn given as an ``AgentTurn``."""
    if on_turn is None:
        return None
    return lambda index, turn, done: on_turn(index, AgentTurn.of(turn), done)


# --- the agent -----------------------------------------------------------------------------------
class Agent:
    """A compiled agent: a policy directory with its card, run on the user's tasks."""

    def __init__(
        self,
        model,
        tokenizer,
        card: dict[str, Any],
        env_id: str | None = None,
        tools: dict[str, Callable[..., Any]] | None = None,
        env_kwargs: dict[str, Any] | None = None,
        max_turns: int | None = None,
        max_new_tokens: int | None = None,
        tool_timeout_s: float = 30.0,
        batch_size: int = 16,
        max_wall_s: float | None = 120.0,
        env_workers: int = 4,
    ):
        self.model, self.tokenizer, self.card = model, tokenizer, card
        if env_id is None:
            if len(card["envs"]) != 1:
                raise ValueError(f"this agent knows several environments ({', '.join(card['envs'])}): name env_id")
            env_id = next(iter(card["envs"]))
        if env_id not in card["envs"]:
            raise ValueError(f"env_id {env_id!r} is not in the agent's card: {', '.join(card['envs'])}")
        self.env_id = env_id
        self.env_kwargs = {**card["envs"][env_id]["kwargs"], **(env_kwargs or {})}
        declared = {t["function"]["name"]: t["function"] for t in card["envs"][env_id]["tools"]}
        unknown = sorted(set(tools or {}) - set(declared))
        if unknown:
            raise ValueError(f"tools {unknown} are not declared in the agent's card; it knows {sorted(declared)}")
        self.declared, self.tools, self.tool_timeout_s = declared, dict(tools or {}), tool_timeout_s
        runtime = card["runtime"]
        self.config = RuntimeConfig(
            max_turns=max_turns or runtime["max_turns"],
            max_new_tokens=max_new_tokens or runtime["max_new_tokens"],
            max_context=runtime.get("max_context"),
            batch_size=batch_size,
            max_episode_s=max_wall_s,
            env_workers=env_workers,  # a slow tool holds back its own episode only
        )
        self.runtime = Runtime(model, tokenizer, self.config)
        self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="agent-tool") if self.tools else None

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: str = "float32", **kwargs) -> Agent:
        """Load a saved policy (a ``<stage>/policy`` or adapter directory) and its card; ``kwargs`` go to
        ``Agent`` (``tools``, ``env_id``, ``env_kwargs``, ``max_turns``, ``max_new_tokens``, ``tool_timeout_s``,
        ``batch_size``, ``max_wall_s``, ``env_workers``)."""
        model, tokenizer = load_policy(path, dtype, local_files_only=True)
        return cls(model, tokenizer, read_card(path, tokenizer), **kwargs)

    def run(self, task: str) -> AgentResult:
        return self.run_batch([task])[0]

    def run_batch(
        self, tasks: Sequence[str], on_turn: Callable[[int, AgentTurn, bool], None] | None = None
    ) -> list[AgentResult]:
        """The tasks' episodes, batched on the runtime's slots (greedy, as evaluated); ``on_turn(i, turn, done)``
        hears each turn of task ``i`` as it ends."""
        start = time.perf_counter()
        hook = _turn_hook(on_turn)
        trajectories = self.runtime.run(
            self.env_id,
            list(range(len(tasks))),
            options=[{"task": str(t)} for t in tasks],
            make_env=self._make_env,
            on_turn=hook,
        )
        wall = (time.perf_counter() - start) * 1000
        return [self._result(t, wall) for t in trajectories]

    def stream(
        self,
        feed: Feed,
        poll: Callable[[], None],
        on_turn: Callable[[int, AgentTurn, bool], None] | None = None,
    ) -> Iterator[tuple[int, AgentResult]]:
        """Continuous batching (a server's requests): the tasks of ``feed`` (``feed.add({"task": text})``, also from
        ``poll``, called before every forward pass) run on the runtime's slots as they arrive; yields
        ``(index, result)`` as each ends (``Runtime.stream``). A task whose environment refuses it is left out,
        its error in ``feed.refused``."""
        hook = _turn_hook(on_turn)
        for index, trajectory in self.runtime.stream(self.env_id, feed, poll, make_env=self._make_env, on_turn=hook):
            yield index, self._result(trajectory, 0.0)

    # --- helpers ------------------------------------------------------------------------------
    def _make_env(self) -> gym.Env:
        env = gym.make(self.env_id, **self.env_kwargs)
        inner = env.unwrapped
        for name, fn in self.tools.items():
            spec = self.declared[name]
            inner.tools[name] = Tool(name, spec.get("description", ""), spec["parameters"], self._guarded(name, fn))
        if self.tools and set(self.tools) >= set(self.declared):  # every tool is the user's: any prompt will do
            inner.user_task = lambda prompt: Task(prompt=prompt, answer=None)
        return env

    def _guarded(self, name: str, fn: Callable[..., Any]) -> Callable[..., str]:
        def call(**arguments) -> str:
            future = self._pool.submit(fn, **arguments)
            try:
                return str(future.result(timeout=self.tool_timeout_s))
            except FutureTimeout:
                raise ToolError(f"{name} did not answer within {self.tool_timeout_s} s", kind="tool_timeout") from None

        return call

    @staticmethod
    def _result(trajectory: Trajectory, wall_ms: float) -> AgentResult:
        turns = [AgentTurn.of(t) for t in trajectory.turns]
        last = parse_turn(trajectory.turns[-1].agent) if trajectory.turns else None
        answer = last.text.strip() if isinstance(last, Answer) else None
        truncation = trajectory.metadata.get("truncation")
        stop = truncation or ("answer" if answer is not None else "ended")
        refused = [f"turn {i + 1}: {t.error}" for i, t in enumerate(trajectory.turns) if t.error in MALFORMED_KINDS]
        latency = sum(t.latency_ms or 0.0 for t in trajectory.turns) or wall_ms
        return AgentResult(trajectory.task, answer, stop, turns, latency, None, refused)
