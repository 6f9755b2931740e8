"""A bounded load test of ``rl_agents.serve``: ``python -m rl_agents.loadtest agent=<policy dir>``.

In one process: the server on 127.0.0.1 (uvicorn in a thread) and, for each concurrency level, that many
client threads (the openai SDK) sending agent-mode requests, ``requests`` in all, the Calculator-style tasks of
``tasks`` (cycled). Then the same tasks through the in-process runtime (``Agent.run_batch``, the whole list as
one batch, and one task at a time): the serving overhead is the ratio of the two, measured in the same run.
Tool-calling mode is measured per request after a conversation's first, with and without the prefix cache.
Writes ``loadtest.json`` in the run dir: per level, requests/s and p50 / p99 latency, and the ratios.
"""

import json
import logging
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import hydra
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from omegaconf import MISSING, DictConfig

log = logging.getLogger(__name__)


@dataclass
class LoadTestConfig:
    agent: str = MISSING
    levels: list[int] = field(default_factory=lambda: [1, 8, 32])
    """concurrent clients"""
    requests: int = 64
    """requests per level (the test stops by itself)"""
    tasks: list[str] = field(
        default_factory=lambda: [f"What is {a} * {b} - {c}?" for a, b, c in
                                 [(6097, 4981, 12), (123, 456, 7), (9001, 77, 3), (42, 4242, 424), (5, 31, 1000)]]
    )  # fmt: skip
    env_kwargs: dict = field(default_factory=lambda: {"fail_prob": 0.0})
    conversation_steps: int = 6
    """tool-calling mode: requests per conversation, measured with and without the prefix cache"""
    prefix_cache: int = 32
    batch_size: int = 32


ConfigStore.instance().store(name="loadtest_schema", node=LoadTestConfig)


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def load_test(cfg) -> dict:
    import openai

    from rl_agents.agent import Agent
    from rl_agents.serve import AgentServer, Background, PrefixCache

    agent = Agent.from_pretrained(cfg.agent, env_kwargs=dict(cfg.env_kwargs), batch_size=cfg.batch_size)
    server = AgentServer(agent, "agent")
    background = Background(server.app)
    client = openai.OpenAI(base_url=f"{background.__enter__()}/v1", api_key="unused", max_retries=0, timeout=600)
    tasks = [cfg.tasks[i % len(cfg.tasks)] for i in range(cfg.requests)]

    def ask(task: str) -> float:
        start = time.perf_counter()
        client.chat.completions.create(model="agent", messages=[{"role": "user", "content": task}])
        return time.perf_counter() - start

    def conversation(task: str, steps: int) -> list[float]:
        """Tool-calling mode: ``steps`` requests of one conversation (each tool answers with a transient error, so
        the history grows); each request's latency."""
        tools = [{"type": "function", "function": spec} for spec in agent.declared.values()]
        messages, latencies = [{"role": "user", "content": task}], []
        for _ in range(steps):
            start = time.perf_counter()
            reply = client.chat.completions.create(model="agent", messages=messages, tools=tools)
            latencies.append(time.perf_counter() - start)
            message = reply.choices[0].message
            messages.append(message.model_dump(exclude_none=True))
            call_id = message.tool_calls[0].id if message.tool_calls else None
            messages.append({"role": "tool", "tool_call_id": call_id, "content": "ERROR: timeout, try again"})
        return latencies

    report = {"requests": cfg.requests, "levels": {}, "tool_calling": {}}
    try:
        ask(tasks[0])  # warm-up
        for entries in (0, cfg.prefix_cache):
            server.prefix_cache = PrefixCache(entries)
            later = [t for task in cfg.tasks for t in conversation(task, cfg.conversation_steps)[1:]]
            report["tool_calling"]["cache" if entries else "no_cache"] = {
                "step_p50_ms": 1000 * statistics.median(later), "steps": len(later),
                "reused_tokens": server.prefix_cache.reused_tokens}  # fmt: skip
        report["tool_calling"]["p50_with_cache_vs_without"] = (
            report["tool_calling"]["cache"]["step_p50_ms"] / report["tool_calling"]["no_cache"]["step_p50_ms"]
        )
        for level in cfg.levels:
            start = time.perf_counter()
            with ThreadPoolExecutor(level) as pool:
                latencies = list(pool.map(ask, tasks))
            wall = time.perf_counter() - start
            report["levels"][str(level)] = {
                "requests_per_s": cfg.requests / wall,
                "p50_ms": 1000 * statistics.median(latencies),
                "p99_ms": 1000 * _percentile(latencies, 0.99),
            }
            log.info("loadtest: %d clients: %s", level, report["levels"][str(level)])
    finally:
        background.__exit__()
        server.close()
    start = time.perf_counter()
    agent.run_batch(tasks)
    batch_rps = cfg.requests / (time.perf_counter() - start)
    singles = []
    for task in tasks[: min(16, len(tasks))]:
        t = time.perf_counter()
        agent.run(task)
        singles.append(time.perf_counter() - t)
    report["in_process"] = {"batch_requests_per_s": batch_rps, "single_p50_ms": 1000 * statistics.median(singles)}
    for row in report["levels"].values():
        row["throughput_vs_in_process_batch"] = row["requests_per_s"] / batch_rps
        row["p50_vs_in_process_single"] = row["p50_ms"] / report["in_process"]["single_p50_ms"]
    return report


@hydra.main(version_base="1.3", config_path="pkg://rl_agents.conf", config_name="loadtest")
def main(cfg: DictConfig) -> None:
    for name in ("httpx", "httpx2"):  # one line per request otherwise
        logging.getLogger(name).setLevel(logging.WARNING)
    report = load_test(cfg)
    out = Path(HydraConfig.get().runtime.output_dir) / "loadtest.json"
    out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
