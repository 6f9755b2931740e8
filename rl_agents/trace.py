"""``python -m rl_agents.trace RUN_DIR``: one self-contained HTML report of a run's evaluation episodes.

Every evaluation episode is saved by the eval stage (``eval/episodes_<policy>.jsonl``; ``episodes_<policy>.jsonl``
for ``rl_agents.evaluate``) with each turn's text, tool, error kind, observation, reward, token ids and
per-token log-probabilities. The report (``RUN_DIR/trace.html``, no external files or network) lists the
episodes with a policy / environment / success filter; opening one shows its turns, the agent's tokens
shaded by the probability the policy gave them (dark red: unlikely), tool calls and observations.
"""

from __future__ import annotations

import html
import json
import math
import sys
from pathlib import Path
from typing import Any

from rl_agents.trajectory import Trajectory, read_jsonl


def episode_files(run_dir: Path) -> dict[str, Path]:
    """The policy name -> episodes file of a train run (eval/) or an evaluate run (top level)."""
    files = sorted(run_dir.glob("eval/episodes_*.jsonl")) + sorted(run_dir.glob("episodes_*.jsonl"))
    return {path.stem.removeprefix("episodes_"): path for path in files}


def policy_tokenizer(run_dir: Path, policy: str):
    """The tokenizer of a policy's checkpoint, to cut its turns into tokens (None if not found)."""
    candidates = [run_dir / policy / "policy"]
    config = run_dir / "config.yaml"
    if config.is_file():
        import yaml

        checkpoint = (yaml.safe_load(config.read_text()) or {}).get("checkpoint")
        if checkpoint:
            candidates.append(Path(checkpoint))
    for path in candidates:
        if (path / "tokenizer.json").is_file() or (path / "tokenizer_config.json").is_file():
            from transformers import AutoTokenizer

            return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    return None


def turn_record(turn, tokenizer) -> dict[str, Any]:
    record = {
        "agent": turn.agent,
        "observation": turn.observation,
        "tool": turn.tool,
        "error": turn.error,
        "reward": turn.reward,
        "latency_ms": turn.latency_ms,
        "tokens": None,
    }
    if tokenizer is not None and turn.token_ids and turn.logprobs and len(turn.token_ids) == len(turn.logprobs):
        record["tokens"] = [
            [tokenizer.decode([token_id], skip_special_tokens=False), round(math.exp(logprob), 4)]
            for token_id, logprob in zip(turn.token_ids, turn.logprobs)
        ]
    return record


def episode_record(policy: str, trajectory: Trajectory, tokenizer) -> dict[str, Any]:
    meta = trajectory.metadata
    return {
        "policy": policy,
        "env": meta.get("env_id"),
        "seed": meta.get("seed"),
        "success": bool(trajectory.success),
        "reward": trajectory.reward,
        "truncation": meta.get("truncation"),
        "task": trajectory.task,
        "turns": [turn_record(turn, tokenizer) for turn in trajectory.turns],
    }


TEMPLATE = Path(__file__).with_name("trace.html")  # the page: styles and script inline, data filled in


def render(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write the run's trace report; returns its path."""
    run_dir = Path(run_dir)
    files = episode_files(run_dir)
    if not files:
        raise FileNotFoundError(f"{run_dir} holds no evaluation episodes (eval/episodes_*.jsonl): run the eval stage")
    summary = run_dir / "eval.json"
    counts = {name: p.get("episodes") for name, p in json.loads(summary.read_text())["policies"].items()} if (
        summary.is_file()) else {}  # fmt: skip
    episodes = []
    for policy, path in files.items():
        tokenizer = policy_tokenizer(run_dir, policy)
        trajectories = read_jsonl(path)
        if counts.get(policy) is not None and len(trajectories) != counts[policy]:
            raise ValueError(
                f"{path} holds {len(trajectories)} episodes and eval.json counts {counts[policy]} for {policy}: "
                "an incomplete or replaced file (an interrupted evaluation?); evaluate again"
            )
        episodes += [episode_record(policy, t, tokenizer) for t in trajectories]
    data = json.dumps({"run": str(run_dir), "episodes": episodes}).replace("</", "<\\/")
    page = TEMPLATE.read_text().replace("__TITLE__", html.escape(run_dir.name)).replace("__DATA__", data)
    out = Path(out) if out else run_dir / "trace.html"
    out.write_text(page)
    return out


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if len(args) not in (1, 2):
        raise SystemExit("usage: python -m rl_agents.trace RUN_DIR [OUT.html]")
    try:
        path = render(*args)
    except FileNotFoundError as err:
        raise SystemExit(str(err)) from None
    print(path)


if __name__ == "__main__":
    main()
