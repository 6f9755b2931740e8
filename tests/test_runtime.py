"""The runtime: KV-reused batched decoding equals re-encoding, guards, sampling, trajectory output."""

import gymnasium as gym
import pytest

from rl_agents import runtime as runtime_module
from rl_agents.runtime import Runtime, RuntimeConfig
from rl_agents.trajectory import IM_END


def _tokens(trajectories):
    return [[t.token_ids for t in tr.turns] for tr in trajectories]


@pytest.mark.parametrize("batch_size", [1, 4, 8])
def test_kv_reused_greedy_decoding_equals_reencoding(tiny_policy, batch_size, monkeypatch):
    """With a batch, finished rows leave the cache and its holes are squeezed out: tokens stay the same."""
    _, model, tokenizer = tiny_policy
    monkeypatch.setattr(runtime_module, "COMPACT_MIN_WIDTH", 8)  # compact at every hole, even in short episodes
    monkeypatch.setattr(runtime_module, "COMPACT_HOLE_FRACTION", 0.0)
    seeds = list(range(100, 108))
    config = dict(batch_size=batch_size, max_new_tokens=64, max_turns=4)
    runtime = Runtime(model, tokenizer, RuntimeConfig(**config, use_cache=True))
    cached = runtime.run("Calculator-v0", seeds, {"fail_prob": 0.5})
    if batch_size == 8:
        assert runtime.stats["compactions"] > 0
    full = Runtime(model, tokenizer, RuntimeConfig(**config, use_cache=False)).run(
        "Calculator-v0", seeds, {"fail_prob": 0.5}
    )
    assert any(len(tr.turns) >= 2 for tr in cached), "need multi-turn episodes so observations are appended"
    assert _tokens(cached) == _tokens(full)
    assert [tr.success for tr in cached] == [tr.success for tr in full]


def test_batching_does_not_change_greedy_results(tiny_policy):
    _, model, tokenizer = tiny_policy
    seeds = list(range(200, 206))
    one = Runtime(model, tokenizer, RuntimeConfig(batch_size=1, max_new_tokens=64)).run("Calculator-v0", seeds)
    many = Runtime(model, tokenizer, RuntimeConfig(batch_size=6, max_new_tokens=64)).run("Calculator-v0", seeds)
    assert _tokens(one) == _tokens(many)


def test_trajectories_carry_the_teacher_format_plus_runtime_fields(tiny_policy):
    _, model, tokenizer = tiny_policy
    runtime = Runtime(model, tokenizer, RuntimeConfig(batch_size=2, max_new_tokens=64))
    trajectories = runtime.run("Calculator-v0", [300, 301], policy="bc")
    eot = tokenizer.convert_tokens_to_ids(IM_END)
    for tr in trajectories:
        assert tr.metadata["env_id"] == "Calculator-v0" and tr.metadata["teacher"] == "bc"
        assert tr.metadata["seed"] in (300, 301) and tr.metadata["tokenizer"]
        for turn in tr.turns:
            assert turn.token_ids and len(turn.logprobs) == len(turn.token_ids)
            assert all(lp <= 0.0 for lp in turn.logprobs) and turn.latency_ms > 0
            assert turn.observation is not None
        finished = [t for t in tr.turns if t.token_ids[-1] == eot]
        assert finished, "the policy ends its turns with the end-of-turn token"
    assert runtime.stats["generated_tokens"] == sum(len(t.token_ids) for tr in trajectories for t in tr.turns)


@pytest.mark.parametrize(
    ("config", "reason"),
    [
        (dict(max_new_tokens=3), "max_new_tokens"),
        (dict(max_context=40, max_new_tokens=64), "context_length"),
    ],
)
def test_guards_truncate_with_a_clear_reason(tiny_policy, config, reason):
    _, model, tokenizer = tiny_policy
    trajectories = Runtime(model, tokenizer, RuntimeConfig(batch_size=2, **config)).run("Calculator-v0", [5, 6])
    assert {tr.metadata["truncation"] for tr in trajectories} == {reason}
    if reason == "max_new_tokens":
        assert all(len(t.token_ids) <= 3 for tr in trajectories for t in tr.turns)


def _assert_tool_callers_truncated(trajectories, reason):
    """Every episode stopped after one turn; those whose turn was a tool call were cut for ``reason``."""
    assert all(len(tr.turns) == 1 for tr in trajectories)
    tool_first = [tr for tr in trajectories if tr.turns[0].tool is not None]
    assert tool_first, "the fixture policy calls the tool first"
    assert {tr.metadata["truncation"] for tr in tool_first} == {reason}


def test_turn_budget_truncates_episodes_that_did_not_answer(tiny_policy):
    _, model, tokenizer = tiny_policy
    trajectories = Runtime(model, tokenizer, RuntimeConfig(batch_size=4, max_turns=1, max_new_tokens=64)).run(
        "Calculator-v0", list(range(8))
    )
    _assert_tool_callers_truncated(trajectories, "max_turns")


def test_env_step_budget_is_reported_as_max_steps(tiny_policy):
    _, model, tokenizer = tiny_policy
    trajectories = Runtime(model, tokenizer, RuntimeConfig(batch_size=4, max_new_tokens=64)).run(
        "Calculator-v0", list(range(8)), {"max_episode_steps": 1, "fail_prob": 0.99}
    )
    _assert_tool_callers_truncated(trajectories, "max_steps")


def test_sampling_is_reproducible_from_the_seed_and_differs_across_seeds(tiny_policy):
    _, model, tokenizer = tiny_policy
    config = RuntimeConfig(batch_size=4, max_new_tokens=32, greedy=False, temperature=1.5)
    a = Runtime(model, tokenizer, config, seed=1).run("Calculator-v0", [1, 2, 3, 4])
    b = Runtime(model, tokenizer, config, seed=1).run("Calculator-v0", [1, 2, 3, 4])
    c = Runtime(model, tokenizer, config, seed=2).run("Calculator-v0", [1, 2, 3, 4])
    assert _tokens(a) == _tokens(b) and _tokens(a) != _tokens(c)


def test_runtime_closes_its_environments(tiny_policy, monkeypatch):
    _, model, tokenizer = tiny_policy
    closed = []
    original = gym.Wrapper.close
    monkeypatch.setattr(gym.Wrapper, "close", lambda self: closed.append(1) or original(self))
    Runtime(model, tokenizer, RuntimeConfig(batch_size=3, max_new_tokens=8)).run("SQL-v0", [1, 2, 3])
    assert closed
