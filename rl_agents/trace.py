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


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>rl_agents trace: __TITLE__</title>
<style>
body { font-family: system-ui, sans-serif; margin: 0; display: flex; height: 100vh; }
#side { width: 340px; overflow-y: auto; border-right: 1px solid #ccc; padding: 8px; box-sizing: border-box; }
#main { flex: 1; overflow-y: auto; padding: 12px 20px; }
.ep { padding: 4px 6px; cursor: pointer; border-radius: 4px; font-size: 13px; }
.ep:hover { background: #eef; } .ep.active { background: #dde; }
.ok { color: #060; } .fail { color: #a00; }
.turn { border: 1px solid #ddd; border-radius: 6px; margin: 10px 0; padding: 8px; }
.agent { font-family: monospace; white-space: pre-wrap; word-break: break-all; }
.obs { font-family: monospace; white-space: pre-wrap; background: #f6f6f6; padding: 6px; margin-top: 6px; }
.tok { border-radius: 2px; }
.meta { color: #555; font-size: 12px; }
select { margin: 2px 0 6px; }
</style></head><body>
<div id="side">
  <div><b>__TITLE__</b></div>
  <label>outcome <select id="outcome"><option value="all">all</option><option value="success">success</option>
  <option value="failure">failure</option></select></label><br>
  <label>policy <select id="policy"></select></label>
  <label>env <select id="env"></select></label>
  <div id="count" class="meta"></div>
  <div id="list"></div>
</div>
<div id="main"><p class="meta">Pick an episode. Agent tokens are shaded by the probability the policy gave them
(white: certain, dark red: unlikely); hover a token for its probability.</p></div>
<script>
const DATA = __DATA__;
const $ = (id) => document.getElementById(id);
function esc(s) { return String(s ?? "").replace(/[&<>"]/g, c => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;"}[c])); }
function options(select, values) {
  select.innerHTML = ["all", ...values].map(v => `<option value="${esc(v)}">${esc(v)}</option>`).join("");
}
options($("policy"), [...new Set(DATA.episodes.map(e => e.policy))]);
options($("env"), [...new Set(DATA.episodes.map(e => e.env))]);
function visible() {
  const o = $("outcome").value, p = $("policy").value, e = $("env").value;
  return DATA.episodes.map((ep, i) => [ep, i]).filter(([ep]) =>
    (o === "all" || (o === "success") === ep.success) && (p === "all" || ep.policy === p) && (e === "all" || ep.env === e));
}
function renderList() {
  const rows = visible();
  $("count").textContent = `${rows.length} of ${DATA.episodes.length} episodes`;
  $("list").innerHTML = rows.map(([ep, i]) =>
    `<div class="ep" data-index="${i}"><span class="${ep.success ? "ok" : "fail"}">${ep.success ? "\u2713" : "\u2717"}</span>
     ${esc(ep.policy)} \u00b7 ${esc(ep.env)} \u00b7 seed ${esc(ep.seed)} \u00b7 ${ep.turns.length} turns</div>`).join("");
  document.querySelectorAll(".ep").forEach(el => el.addEventListener("click", () => show(+el.dataset.index)));
}
function tokens(turn) {
  if (!turn.tokens) return esc(turn.agent);
  return turn.tokens.map(([text, p]) =>
    `<span class="tok" title="p=${p.toFixed(3)}" style="background: rgba(200,0,0,${(1 - p).toFixed(3)})">${esc(text)}</span>`).join("");
}
function show(index) {
  const ep = DATA.episodes[index];
  document.querySelectorAll(".ep").forEach(el => el.classList.toggle("active", +el.dataset.index === index));
  $("main").innerHTML = `<h3 class="${ep.success ? "ok" : "fail"}">${ep.success ? "success" : "failure"} \u00b7
      ${esc(ep.policy)} \u00b7 ${esc(ep.env)} \u00b7 seed ${esc(ep.seed)}</h3>
    <div class="meta">reward ${ep.reward} \u00b7 truncation ${esc(ep.truncation ?? "none")}</div>
    <div class="obs" id="task">${esc(ep.task)}</div>` +
    ep.turns.map((t, k) => `<div class="turn"><div class="meta">turn ${k + 1} \u00b7 tool ${esc(t.tool ?? "-")}
      ${t.error ? "\u00b7 <span class=fail>error " + esc(t.error) + "</span>" : ""} \u00b7 reward ${t.reward}
      ${t.latency_ms != null ? "\u00b7 " + t.latency_ms.toFixed(1) + " ms" : ""}</div>
      <div class="agent">${tokens(t)}</div><div class="obs">${esc(t.observation)}</div></div>`).join("");
}
["outcome", "policy", "env"].forEach(id => $(id).addEventListener("change", renderList));
renderList();
</script></body></html>
"""


def render(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write the run's trace report; returns its path."""
    run_dir = Path(run_dir)
    files = episode_files(run_dir)
    if not files:
        raise FileNotFoundError(f"{run_dir} holds no evaluation episodes (eval/episodes_*.jsonl): run the eval stage")
    episodes = []
    for policy, path in files.items():
        tokenizer = policy_tokenizer(run_dir, policy)
        episodes += [episode_record(policy, t, tokenizer) for t in read_jsonl(path)]
    data = json.dumps({"run": str(run_dir), "episodes": episodes}).replace("</", "<\\/")
    page = PAGE.replace("__TITLE__", html.escape(run_dir.name)).replace("__DATA__", data)
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
