"""The benchmark: forced replay gives both approaches the same episode, the orchestrated agent is stateless,
and the CLI writes bench.json, bench.md and bench.png with the documented keys."""

import json
import statistics
from pathlib import Path

import numpy as np
import pytest

from envs.calculator import CalculatorTeacher
from rl_agents.bench import Orchestrated, raw_decode_rate
from rl_agents.collect import teacher_episode
from rl_agents.runtime import Runtime, RuntimeConfig
from rl_agents.trajectory import agent_ids
from tests.helpers.cli import run_cli as _run

KWARGS = {"fail_prob": 0.6, "max_episode_steps": 12}


def _teacher_episode(seed):
    import gymnasium as gym

    env = gym.make("Calculator-v0", **KWARGS)
    try:
        return teacher_episode(env, CalculatorTeacher(), seed, "Calculator-v0", 8)
    finally:
        env.close()


def test_forced_replay_gives_both_approaches_the_teachers_episode(tiny_policy):
    _, model, tokenizer = tiny_policy
    seed = next(s for s in range(1_000_000, 1_000_100) if len(_teacher_episode(s).turns) >= 3)
    teacher = _teacher_episode(seed)
    forced = [[agent_ids(tokenizer, turn.agent) for turn in teacher.turns]]
    config = RuntimeConfig(batch_size=1, max_new_tokens=96, max_turns=len(teacher.turns))
    compiled = Runtime(model, tokenizer, config).run("Calculator-v0", [seed], KWARGS, forced=forced)[0]
    orchestrated = Orchestrated(model, tokenizer, config).run("Calculator-v0", [seed], KWARGS, forced=forced)[0]
    for episode in (compiled, orchestrated):
        assert [t.agent for t in episode.turns] == [t.agent for t in teacher.turns]
        assert [t.observation for t in episode.turns] == [t.observation for t in teacher.turns]
        assert episode.success == teacher.success


def test_orchestrated_calls_are_stateless_and_carry_tool_docs_and_history(tiny_policy):
    _, model, tokenizer = tiny_policy
    teacher = _teacher_episode(1_000_003)
    agent = Orchestrated(model, tokenizer, RuntimeConfig(max_new_tokens=8))
    tools = [{"type": "function", "function": {"name": "calculator", "description": "Evaluate it."}}]
    history = [(t.agent, t.observation) for t in teacher.turns[:-1]]
    text = agent.prompt(tools, teacher.task, history)
    assert '"name": "calculator"' in text and "<tools>" in text and teacher.task in text
    assert all(a in text and o in text for a, o in history)
    agent.call(agent.prompt(tools, teacher.task, []))
    first = agent.stats["prompt_tokens"]
    agent.call(text)
    assert agent.stats["prompt_tokens"] - first > first  # the whole history is encoded again


def test_drafting_orchestrated_calls_reply_the_same_in_fewer_forward_passes(tiny_policy, monkeypatch):
    """The orchestrated agent drafts too (its prompt, its earlier replies); rejected drafts leave the cache."""
    _, model, tokenizer = tiny_policy
    seed = next(s for s in range(1_000_000, 1_000_100) if len(_teacher_episode(s).turns) >= 3)
    forced = [[agent_ids(tokenizer, turn.agent) for turn in _teacher_episode(seed).turns]]
    calls = []
    forward = model.forward
    monkeypatch.setattr(model, "forward", lambda *a, **k: calls.append(1) or forward(*a, **k))
    episodes, passes = {}, {}
    for draft_tokens in (0, 8):
        config = RuntimeConfig(max_new_tokens=96, max_turns=len(forced[0]), draft_tokens=draft_tokens)
        calls.clear()
        for replay in (forced, None):  # the teacher's tokens, then the model's own greedy ones
            episodes[draft_tokens, replay is None] = Orchestrated(model, tokenizer, config).run(
                "Calculator-v0", [seed], KWARGS, forced=replay
            )[0]
        passes[draft_tokens] = len(calls)
    for free in (False, True):
        assert [t.agent for t in episodes[0, free].turns] == [t.agent for t in episodes[8, free].turns]
    assert passes[8] < passes[0] / 2


def test_raw_decode_rate_is_positive_and_finite(tiny_policy):
    _, model, _ = tiny_policy
    rate = raw_decode_rate(model, 16)
    assert np.isfinite(rate) and rate > 0


@pytest.mark.slow  # about a minute: the whole benchmark on a tiny budget; the default suite keeps its refusals
def test_bench_cli_writes_the_report(smoke_run, tmp_path):
    out = tmp_path / "bench"
    _run("rl_agents.bench", f"checkpoint={smoke_run / 'bc' / 'policy'}", "env=calculator_sql", "episodes=2",
         "turns=[2,4]", "parallel=[1,2]", "throughput_episodes=2", "limit_tokens=8", "turn_scaling.episodes=1",
         "runtime.max_new_tokens=24", "scale.sizes=[32x2]", "scale.episodes=2", "rounds=2",
         f"hydra.run.dir={out}")  # fmt: skip
    data = json.loads((out / "bench.json").read_text())
    for key in ("speedup", "speedup_no_drafts", "limit_fraction", "turn_scaling", "throughput", "success", "memory"):
        assert key in data, key
    assert data["speedup"] > 0 and data["speedup_no_drafts"] > 0 and data["limit_fraction"] > 0
    assert data["draft_tokens"] == 64 and set(data["throughput_drafted"]["tokens_per_s"]) == {"1", "2"}
    assert set(data["success"]["compiled"]) == set(data["success"]["orchestrated"]) == {"Calculator-v0", "SQL-v0"}
    assert set(data["turn_scaling"]["compiled"]) == {"2", "4"} and set(data["throughput"]["tokens_per_s"]) == {"1", "2"}
    for p, rounds in data["throughput"]["rounds"].items():  # settings alternated `rounds` times; medians reported
        assert len(rounds) == 2 and data["throughput"]["tokens_per_s"][p] == statistics.median(rounds)
    assert [len(r) for r in data["limit"]["rounds"].values()] == [2, 2]
    # timings are the bench's to report, not a test's to order (a busy machine reorders them)
    assert all(v > 0 for v in data["turn_scaling_no_drafts"]["compiled"].values())
    scale = data["model_scale"]["32x2"]  # a random 32-wide, 2-layer model replaying the teacher's tokens
    assert scale["speedup"] > 0 and scale["parameters"] > 0
    assert set(scale["throughput"]["tokens_per_s"]) == {"1", "2"} and scale["throughput"]["episodes"] == 2
    assert "model scale 32x2" in (out / "bench.md").read_text()
    assert "Regenerate: `python -m rl_agents.bench" in (out / "bench.md").read_text()
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_refuses_a_bad_config_before_any_work(tmp_path):
    """The command exits 2 with the message (one process); the other checks are the same function's, composed
    in this process."""
    from hydra import compose, initialize_config_dir

    import rl_agents.bench  # noqa: F401  (registers the bench schema)
    from rl_agents.config import ConfigError
    from rl_agents.validate import validate_bench

    proc = _run("rl_agents.bench", "checkpoint=/nonexistent", f"hydra.run.dir={tmp_path / 'b'}", check=False)
    assert proc.returncode == 2 and "checkpoint='/nonexistent'" in proc.stdout + proc.stderr
    conf = str(Path(__file__).resolve().parents[1] / "conf")
    for override, message in [("parallel=[0]", "parallel must be"), ("rounds=0", "rounds must be positive"),
                              ("scale.sizes=[256]", "scale.sizes: '256' is not HIDDENxLAYERS")]:  # fmt: skip
        with initialize_config_dir(config_dir=conf, version_base="1.3"):
            cfg = compose("bench", [override])
        with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
            validate_bench(cfg)


@pytest.mark.benchmark
@pytest.mark.parametrize("draft_tokens", [0, 64])
def test_micro_runtime_decoding_one_episode(benchmark, tiny_policy, draft_tokens):
    """Micro-benchmark (``pytest -m benchmark -n 0``): one greedy Calculator episode through the runtime.

    With drafts it is drafting's best case: every round repeats the episode the drafter has already seen.
    """
    _, model, tokenizer = tiny_policy
    runtime = Runtime(model, tokenizer, RuntimeConfig(batch_size=1, max_new_tokens=64, draft_tokens=draft_tokens))
    benchmark(runtime.run, "Calculator-v0", [1_000_000])


@pytest.mark.benchmark
def test_micro_orchestrated_one_episode(benchmark, tiny_policy):
    """Micro-benchmark (``pytest -m benchmark -n 0``): the same episode driven the orchestrated way."""
    _, model, tokenizer = tiny_policy
    agent = Orchestrated(model, tokenizer, RuntimeConfig(max_new_tokens=64))
    benchmark(agent.run, "Calculator-v0", [1_000_000])


@pytest.mark.benchmark
@pytest.mark.parametrize("env_workers", [0, 16])
def test_micro_code_rollouts_with_env_workers(benchmark, tiny_policy, env_workers):
    """Micro-benchmark (``pytest -m benchmark -n 0 -k env_workers``): 32 Code-v0 teacher episodes replayed on 16
    slots, each ``run_tests``/``submit`` a sandbox process; with workers the model decodes while they run."""
    import gymnasium as gym

    from envs.code import CodeTeacher

    _, model, tokenizer = tiny_policy
    env, teacher, seeds = gym.make("Code-v0"), CodeTeacher(), list(range(100_000, 100_032))
    forced = [
        [agent_ids(tokenizer, t.agent) for t in teacher_episode(env, teacher, seed, "Code-v0", 8).turns]
        for seed in seeds
    ]
    config = RuntimeConfig(batch_size=16, max_new_tokens=1024, max_turns=8, env_workers=env_workers)
    runtime = Runtime(model, tokenizer, config)
    episodes = benchmark.pedantic(runtime.run, ("Code-v0", seeds), {"forced": forced}, rounds=3, warmup_rounds=1)
    assert all(e.success for e in episodes)  # the teacher's code passes the hidden tests


@pytest.mark.benchmark
@pytest.mark.parametrize("region_slots", [10**9, 8])
def test_micro_rollouts_by_cache_regions(benchmark, tiny_policy, monkeypatch, region_slots):
    """Micro-benchmark (``pytest -m benchmark -n 0 -k regions``): 256 Calculator-v0 teacher episodes replayed on 32
    slots, the slot cache in one region (one attention call over every slot) or in regions of 8."""
    import gymnasium as gym

    import rl_agents.runtime as runtime_module

    monkeypatch.setattr(runtime_module, "REGION_SLOTS", region_slots)
    _, model, tokenizer = tiny_policy
    env, teacher, seeds = gym.make("Calculator-v0"), CalculatorTeacher(), list(range(1_000_000, 1_000_256))
    taught = [teacher_episode(env, teacher, seed, "Calculator-v0", 8) for seed in seeds]
    forced = [[agent_ids(tokenizer, t.agent) for t in episode.turns] for episode in taught]
    runtime = Runtime(model, tokenizer, RuntimeConfig(batch_size=32, max_new_tokens=256, max_turns=16))
    episodes = benchmark.pedantic(runtime.run, ("Calculator-v0", seeds), {"forced": forced}, rounds=5, warmup_rounds=1)
    assert [e.success for e in episodes] == [e.success for e in taught]  # the teacher's episodes, replayed


def test_the_reported_runtime_size_counts_every_module_of_the_package():
    from rl_agents import runtime
    from rl_agents.bench import _runtime_lines

    package = Path(runtime.__file__).parent
    engine = sum(1 for line in (package / "engine.py").read_text().splitlines() if line.strip())
    init = sum(1 for line in (package / "__init__.py").read_text().splitlines() if line.strip())
    assert _runtime_lines() > engine + init  # the engine, the package's __init__ and the other modules
