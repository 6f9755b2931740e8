"""The runtime: KV-reused batched decoding equals re-encoding, guards, sampling, trajectory output.

`pytest tests/test_runtime.py --device cuda` runs them on a GPU."""

import time

import gymnasium as gym
import pytest
import torch

from rl_agents.model import load_policy
from rl_agents.runtime import (
    SLOT_ATTENTION,
    Feed,
    NgramDrafter,
    NgramIndex,
    Runtime,
    RuntimeConfig,
    SlotCache,
    speculative_token,
    verify_draft,
)
from rl_agents.runtime import attention as runtime_attention
from rl_agents.runtime import cache as runtime_cache
from rl_agents.runtime.attention import _groups
from rl_agents.trajectory import IM_END


@pytest.fixture(scope="module")
def tiny_policy(tiny_policy, device):
    """The session's tiny policy, on ``--device`` (loaded again there, so the other modules keep theirs on the CPU)."""
    policy_dir, model, tokenizer = tiny_policy
    return policy_dir, model if device.type == "cpu" else _fresh(policy_dir, device), tokenizer


def _fresh(policy_dir, device):
    """A copy of the policy of its own (a trainer's patches of the session's model, such as TRL's forward, which
    calls the original model, do not come with it)."""
    return load_policy(policy_dir, local_files_only=True)[0].to(device)


def _tokens(trajectories):
    return [[t.token_ids for t in tr.turns] for tr in trajectories]


@pytest.mark.parametrize("batch_size", [1, 3, 8])
def test_kv_reused_greedy_decoding_equals_reencoding(tiny_policy, batch_size):
    """Slots of different lengths, prefills of some slots, slots refilled and the batch shrunk: same tokens."""
    _, model, tokenizer = tiny_policy
    seeds = list(range(100, 108))
    config = dict(batch_size=batch_size, max_new_tokens=64, max_turns=4)
    runtime = Runtime(model, tokenizer, RuntimeConfig(**config, use_cache=True))
    cached = runtime.run("Calculator-v0", seeds, {"fail_prob": 0.5})
    full = Runtime(model, tokenizer, RuntimeConfig(**config, use_cache=False)).run(
        "Calculator-v0", seeds, {"fail_prob": 0.5}
    )
    assert any(len(tr.turns) >= 2 for tr in cached), "need multi-turn episodes so observations are appended"
    assert _tokens(cached) == _tokens(full)
    assert [tr.success for tr in cached] == [tr.success for tr in full]


def test_a_slot_takes_the_next_seed_as_soon_as_its_episode_ends(tiny_policy):
    """Continuous batching: with two slots, a short episode's slot runs the third seed while a long one goes on."""
    _, model, tokenizer = tiny_policy
    runtime = Runtime(model, tokenizer, RuntimeConfig(batch_size=2, max_new_tokens=64, max_turns=1))
    eot = tokenizer.convert_tokens_to_ids(IM_END)
    letter = tokenizer.convert_tokens_to_ids("a")
    lengths = [40, 4, 4]  # tokens of each seed's single (teacher-forced) turn
    forced = [[[letter] * (n - 1) + [eot]] for n in lengths]
    envs = [gym.make("Calculator-v0") for _ in range(2)]
    ended = [e.seed for e in runtime._run_slots(envs, [10, 11, 12], forced)]
    assert ended == [11, 12, 10]  # batch by batch it would be 11, 10, 12
    trajectories = runtime.run("Calculator-v0", [10, 11, 12], forced=forced)
    assert [t.metadata["seed"] for t in trajectories] == [10, 11, 12]  # returned in the seeds' order
    assert [len(t.turns[0].token_ids) for t in trajectories] == lengths


def test_a_streamed_episode_joins_the_running_batch_and_a_refused_one_is_left_out(tiny_policy):
    """``Runtime.stream``: an episode added by ``poll`` while another runs starts at the next pass, beside it (no
    wait for the batch to end) and decodes as it would alone; one whose ``reset`` raises is left out, with its
    error, and the others go on."""
    _, model, tokenizer = tiny_policy
    config = RuntimeConfig(batch_size=4, max_new_tokens=64, max_turns=4)
    alone = Runtime(model, tokenizer, config).run("Calculator-v0", [100, 101], {"fail_prob": 0.0})
    runtime = Runtime(model, tokenizer, config)
    feed = Feed()
    feed.add(seed=100)
    polls = []

    def poll():
        polls.append(len(polls))
        if len(polls) == 5:  # after four passes of the first episode
            feed.add({"split": "nowhere"}, seed=7)
            feed.add(seed=101)

    ended = list(runtime.stream("Calculator-v0", feed, poll, {"fail_prob": 0.0}))
    assert sorted(index for index, _ in ended) == [0, 2]
    streamed = dict(ended)
    assert _tokens([streamed[0], streamed[2]]) == _tokens(alone)
    assert list(feed.refused) == [1] and "nowhere" in str(feed.refused[1])
    generated = [sum(len(t.token_ids) for t in tr.turns) for tr in alone]
    # one pass per token of the first episode, the second's tokens from the fifth pass on: run side by side
    assert runtime.stats["forward_passes"] == max(generated[0], 4 + generated[1]) < sum(generated)
    assert runtime.runs == 1 and model.config._attn_implementation != SLOT_ATTENTION


def test_a_step_is_one_forward_pass_whatever_its_slots_feed(tiny_policy):
    """Prompts, observations and decoded tokens share one packed pass: each pass gives every live slot a token."""
    _, model, tokenizer = tiny_policy
    seeds = list(range(100, 108))
    runtime = Runtime(model, tokenizer, RuntimeConfig(batch_size=8, max_new_tokens=64, max_turns=4))
    trajectories = runtime.run("Calculator-v0", seeds, {"fail_prob": 0.5})
    generated = [sum(len(t.token_ids) for t in tr.turns) for tr in trajectories]
    assert any(len(tr.turns) >= 2 for tr in trajectories), "need observations fed beside other slots' tokens"
    assert len(set(generated)) > 1, "need episodes of different lengths"
    assert runtime.stats["forward_passes"] == max(generated)  # all start together; one pass per token of the longest
    assert runtime.stats["prefills"] >= 1


def test_attention_groups_are_whole_regions_merged_where_a_call_costs_more_than_it_saves(monkeypatch):
    monkeypatch.setattr(runtime_cache, "REGION_SLOTS", 2)
    needs = [40, 38, 0, 0, 9, 10, 12, 0]  # columns each slot's row reads; 0: no row (skipped where it can be)
    monkeypatch.setattr(runtime_attention, "CALL_COLUMNS", 0)
    assert _groups(needs) == [(0, 2, 40), (4, 6, 10), (6, 8, 12)]
    monkeypatch.setattr(runtime_attention, "CALL_COLUMNS", 10)  # two calls over regions of 10 and 12: one costs less
    assert _groups(needs) == [(0, 2, 40), (4, 8, 12)]
    monkeypatch.setattr(runtime_attention, "CALL_COLUMNS", 1000)  # one call, reading the empty region too
    assert _groups(needs) == [(0, 8, 40)]


def test_a_freed_slot_takes_the_longest_episode_of_the_next_region(monkeypatch):
    """Regions of 2 slots: freeing slot 0 moves region 1's longest episode into it, region 2's longest into the
    slot that one left, and the new episode starts in the last region; each moved episode keeps its tokens."""
    monkeypatch.setattr(runtime_cache, "REGION_SLOTS", 2)
    cache = SlotCache(slots=6, num_layers=2)
    for layer in range(2):
        cache.buffers(layer, torch.zeros(1, 2, 1, 4))
        for buffer in (cache.keys[layer], cache.values[layer]):
            buffer.copy_(torch.arange(6.0)[:, None, None, None].expand_as(buffer))  # slot s's columns hold s
    cache.lengths = [0, 7, 5, 9, 3, 4]
    slots = [None, "b", "c", "d", "e", "f"]  # the episodes (their lengths above); slot 0 is free
    envs = ["env0", "env1", "env2", "env3", "env4", "env5"]
    start = Runtime._make_room(cache, slots, envs, 0)
    assert start == 5 and slots == ["d", "b", "c", "f", "e", None]
    assert envs == ["env3", "env1", "env2", "env5", "env4", "env0"]  # each episode with its own environment
    assert cache.lengths == [9, 7, 5, 4, 3, 0]
    for buffer in cache.keys + cache.values:
        assert torch.all(buffer[0, :, :9] == 3) and torch.all(buffer[3, :, :4] == 5)
    assert Runtime._make_room(cache, slots, envs, 5) == 5  # the last region: nothing after it


@pytest.mark.parametrize(("draft_tokens", "call_columns"), [(0, 0), (4, 0), (0, 30)])
def test_episodes_moved_between_regions_and_attended_by_groups_decode_the_same(
    tiny_policy, monkeypatch, draft_tokens, call_columns
):
    """Regions of 2 slots, attended one call each (call_columns 0) or merged where cheaper: the same tokens as
    re-encoding."""
    _, model, tokenizer = tiny_policy
    monkeypatch.setattr(runtime_cache, "REGION_SLOTS", 2)
    monkeypatch.setattr(runtime_attention, "CALL_COLUMNS", call_columns)
    moves, calls = [], []
    move, groups = SlotCache.move, runtime_attention._groups
    monkeypatch.setattr(SlotCache, "move", lambda self, a, b: moves.append((a, b)) or move(self, a, b))
    monkeypatch.setattr(runtime_attention, "_groups", lambda needs: calls.append(len(out := groups(needs))) or out)
    seeds, kwargs = list(range(100, 120)), {"fail_prob": 0.5}
    config = dict(batch_size=8, max_new_tokens=64, max_turns=4, draft_tokens=draft_tokens)
    cached = Runtime(model, tokenizer, RuntimeConfig(**config)).run("Calculator-v0", seeds, kwargs)
    assert moves and max(calls) >= 2  # episodes moved, and passes attended in several groups
    full = Runtime(model, tokenizer, RuntimeConfig(**config, use_cache=False)).run("Calculator-v0", seeds, kwargs)
    assert _tokens(cached) == _tokens(full)
    assert [tr.metadata["seed"] for tr in cached] == seeds


def test_the_runtime_gives_the_model_back_with_its_own_attention(tiny_policy):
    """The slot attention is switched on for a run only, and the model answers as before afterwards."""
    _, model, tokenizer = tiny_policy
    ids = torch.tensor([[5, 6, 7, 8]], device=model.device)
    before_impl = model.config._attn_implementation
    with torch.no_grad():
        before = model(input_ids=ids).logits
    Runtime(model, tokenizer, RuntimeConfig(batch_size=2, max_new_tokens=16)).run("Calculator-v0", [1, 2])
    assert model.config._attn_implementation == before_impl
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, before)
    model.set_attn_implementation(SLOT_ATTENTION)  # called by others while switched (no packed pass): plain SDPA
    try:
        with torch.no_grad():
            torch.testing.assert_close(model(input_ids=ids).logits, before)
    finally:
        model.set_attn_implementation(before_impl)


def test_a_model_that_keeps_its_own_attention_is_refused_with_a_clear_error(tiny_policy, monkeypatch):
    _, model, tokenizer = tiny_policy
    monkeypatch.setattr(model, "set_attn_implementation", lambda name: None)  # as transformers does for such models
    with pytest.raises(ValueError, match="AttentionInterface"):
        Runtime(model, tokenizer, RuntimeConfig(batch_size=2, max_new_tokens=8)).run("Calculator-v0", [1, 2])
    cached_free = Runtime(model, tokenizer, RuntimeConfig(batch_size=2, max_new_tokens=8, use_cache=False))
    assert len(cached_free.run("Calculator-v0", [1, 2])) == 2


@pytest.mark.parametrize("draft_tokens", [0, 8])
def test_a_model_under_mixed_precision_decodes_the_same_cached_and_re_encoded(tiny_policy, device, draft_tokens):
    """RL rollouts run through the model being trained, whose forward accelerate's mixed precision wraps in
    bf16 autocast: values then come in bf16 and Llama's rotary keys in float32 (it failed on a GPU so)."""
    policy_dir, _, tokenizer = tiny_policy
    mixed = _fresh(policy_dir, device)
    mixed.forward = torch.autocast(device.type, dtype=torch.bfloat16)(mixed.forward)  # as accelerate wraps it
    seeds, kwargs = list(range(100, 108)), {"fail_prob": 0.5}
    config = dict(batch_size=3, max_new_tokens=64, max_turns=4, draft_tokens=draft_tokens)
    cached = Runtime(mixed, tokenizer, RuntimeConfig(**config)).run("Calculator-v0", seeds, kwargs)
    full = Runtime(mixed, tokenizer, RuntimeConfig(**config, use_cache=False)).run("Calculator-v0", seeds, kwargs)
    assert any(len(tr.turns) >= 2 for tr in cached)
    assert _tokens(cached) == _tokens(full)


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


def test_sampled_episodes_depend_on_the_seed_only_not_on_batching_or_env_workers(tiny_policy):
    """Each episode draws from its own generator: the same seed gives the same episodes on 1 slot in turn and
    on 4 slots whose environments step in threads (where which slots share a pass depends on timing)."""
    _, model, tokenizer = tiny_policy
    seeds = [1, 2, 3, 4, 5]
    config = dict(max_new_tokens=32, max_turns=3, greedy=False, temperature=1.5)
    one = Runtime(model, tokenizer, RuntimeConfig(batch_size=1, **config), seed=3).run("Calculator-v0", seeds)
    threaded = Runtime(model, tokenizer, RuntimeConfig(batch_size=4, env_workers=4, **config), seed=3)
    assert _tokens(threaded.run("Calculator-v0", seeds)) == _tokens(one)
    assert _tokens(threaded.run("Calculator-v0", seeds)) != _tokens(one)  # a new run draws afresh


def test_a_slow_tool_holds_back_only_its_own_slot(tiny_policy, monkeypatch):
    """With env_workers, the model decodes for the other slots while one environment steps: the same episodes,
    and forward passes happen while the slow step runs (none do without workers: the loop waits for it)."""
    import gymnasium as gym

    from envs.calculator import CalculatorEnv

    _, model, tokenizer = tiny_policy
    step = CalculatorEnv.step
    seeds, config = list(range(100, 108)), dict(batch_size=8, max_new_tokens=32, max_turns=2)
    probe = gym.make("Calculator-v0")
    probe.reset(seed=seeds[0])
    slow_task = probe.unwrapped.task.prompt
    runtime, passes_during = None, []

    def slow_step(self, action):
        if self.task.prompt != slow_task:
            return step(self, action)
        before = runtime.stats["forward_passes"]
        time.sleep(0.3)
        passes_during.append(runtime.stats["forward_passes"] - before)
        return step(self, action)

    monkeypatch.setattr(CalculatorEnv, "step", slow_step)
    runtime = serial = Runtime(model, tokenizer, RuntimeConfig(**config))
    a = serial.run("Calculator-v0", seeds)
    serial_passes, passes_during[:] = list(passes_during), []
    runtime = threaded = Runtime(model, tokenizer, RuntimeConfig(**config, env_workers=8))
    b = threaded.run("Calculator-v0", seeds)
    assert _tokens(a) == _tokens(b) and [t.success for t in a] == [t.success for t in b]
    assert [t.observation for tr in b for t in tr.turns] == [t.observation for tr in a for t in tr.turns]
    assert serial_passes and set(serial_passes) == {0}  # without workers nothing decodes while a tool runs
    assert passes_during and passes_during[0] > 0  # with them, the other slots' turns go on


def test_worker_processes_run_the_same_episodes_and_report_their_failures(tiny_policy):
    """processes=2: two spawned workers of 4 slots each take seeds from a shared counter; greedy and sampled
    episodes are those of one process, in the seeds' order, and a worker's exception reaches the caller."""
    _, model, tokenizer = tiny_policy
    seeds, kwargs = list(range(100, 120)), {"fail_prob": 0.5}
    for config in (dict(max_new_tokens=64, max_turns=4), dict(max_new_tokens=32, greedy=False, temperature=1.5)):
        one = Runtime(model, tokenizer, RuntimeConfig(batch_size=8, **config), seed=3)
        two = Runtime(model, tokenizer, RuntimeConfig(batch_size=8, processes=2, **config), seed=3)
        try:
            a, b = one.run("Calculator-v0", seeds, kwargs), two.run("Calculator-v0", seeds, kwargs)
            assert two._workers is not None and len(two._workers) == 2
            assert _tokens(a) == _tokens(b) and [t.metadata["seed"] for t in b] == seeds
            assert two.stats["generated_tokens"] == one.stats["generated_tokens"] > 0
            again = seeds[:3]  # the same workers again, in a new run (sampled: new draws, the same as one process's)
            assert _tokens(two.run("Calculator-v0", again, kwargs)) == _tokens(one.run("Calculator-v0", again, kwargs))
            with pytest.raises(RuntimeError, match="fail_prob must be in"):  # raised in a worker's environment
                two.run("Calculator-v0", seeds, {"fail_prob": 2.0})
            assert two._workers is None  # stopped
        finally:
            two.close()


def test_env_workers_refuse_sampled_drafts(tiny_policy):
    _, model, tokenizer = tiny_policy
    with pytest.raises(ValueError, match="env_workers"):
        Runtime(model, tokenizer, RuntimeConfig(env_workers=2, draft_tokens=8, greedy=False))
    with pytest.raises(ValueError, match="env_workers"):
        Runtime(model, tokenizer, RuntimeConfig(env_workers=-1))


def test_runtime_closes_its_environments(tiny_policy, monkeypatch):
    _, model, tokenizer = tiny_policy
    closed = []
    original = gym.Wrapper.close
    monkeypatch.setattr(gym.Wrapper, "close", lambda self: closed.append(1) or original(self))
    Runtime(model, tokenizer, RuntimeConfig(batch_size=3, max_new_tokens=8)).run("SQL-v0", [1, 2, 3])
    assert closed


def _qwen2(tokenizer, device, **overrides):
    """A small random Qwen2: another architecture than the tiny Llama (biases, grouped-query attention)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    shape = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2)
    config = Qwen2Config(**{**shape, "intermediate_size": 64, "vocab_size": len(tokenizer), **overrides})
    return Qwen2ForCausalLM(config).to(device)


def test_another_architecture_with_grouped_query_attention_decodes_the_same_cached_and_re_encoded(tiny_policy, device):
    """The slot cache on Qwen2 (one key/value head for two query heads, biases): the same tokens as re-encoding."""
    _, _, tokenizer = tiny_policy
    torch.manual_seed(0)
    model = _qwen2(tokenizer, device, num_key_value_heads=1).eval()
    eot, letter = tokenizer.convert_tokens_to_ids(IM_END), tokenizer.convert_tokens_to_ids("a")
    forced = [[[letter] * n + [eot]] for n in (2, 9, 4, 6, 3)]  # a first turn of its own length per seed
    runs = {}
    for use_cache in (True, False):
        config = RuntimeConfig(batch_size=3, max_new_tokens=12, max_turns=2, use_cache=use_cache)
        runs[use_cache] = Runtime(model, tokenizer, config).run("Calculator-v0", [1, 2, 3, 4, 5], forced=forced)
    assert all(len(tr.turns) == 2 for tr in runs[True])  # the model's own turn after an observation
    assert _tokens(runs[True]) == _tokens(runs[False])


def test_a_model_with_sliding_window_layers_is_refused_with_a_clear_error(tiny_policy, device):
    _, _, tokenizer = tiny_policy
    sliding = dict(use_sliding_window=True, sliding_window=16, max_window_layers=0)
    with pytest.raises(ValueError, match="sliding_attention"):
        Runtime(_qwen2(tokenizer, device, **sliding), tokenizer, RuntimeConfig())
    Runtime(
        _qwen2(tokenizer, device, **sliding), tokenizer, RuntimeConfig(use_cache=False)
    )  # re-encoding needs no cache


# --- speculative decoding (n-gram drafts) -------------------------------------------------------
def test_the_drafter_continues_the_longest_match_in_the_sequence_or_in_earlier_turns():
    drafter = NgramDrafter(ngram=3)
    ids = [1, 2, 3, 4, 5, 9, 2, 3]
    assert drafter.propose(ids, NgramIndex(3), k=2) == [4, 5]  # "2 3" occurred before, followed by 4 5
    drafter.add_turn(context=[7, 2, 3], turn=[6, 6, 0])  # an earlier turn: "7 2 3" was followed by 6 6 0
    assert drafter.propose(ids, NgramIndex(3), k=5) == [4, 5, 9, 2, 3]  # "2 3" at equal length: its own first
    assert drafter.propose([8, 7, 2, 3], NgramIndex(3), k=5) == [6, 6, 0]  # "7 2 3": the longer match wins
    assert drafter.propose([8, 8], NgramIndex(3), k=5) == [8]  # its own last token, once before
    assert drafter.propose([5], NgramIndex(3), k=5) == [] and drafter.propose(ids, NgramIndex(3), k=0) == []
    assert NgramDrafter(ngram=3, stop=9).propose(ids, NgramIndex(3), k=5) == [4, 5, 9]  # a turn ends at its stop
    for sequence in (ids, [8, 7, 2, 3], [8, 8], [5], [1, 2, 1, 2, 1]):  # searching, as a stateless call does
        assert drafter.propose(sequence, None, k=5) == drafter.propose(sequence, NgramIndex(3), k=5)


def test_speculative_sampling_keeps_the_distribution_whatever_the_draft():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    generator = torch.Generator().manual_seed(0)
    for proposed in (None, 0, 1, 3):
        draws = torch.tensor([speculative_token(probs, proposed, generator) for _ in range(20_000)])
        frequencies = torch.bincount(draws, minlength=4) / len(draws)
        assert torch.allclose(frequencies, probs, atol=0.015), (proposed, frequencies)


@pytest.mark.parametrize("batch_size", [1, 3, 8])
def test_drafted_greedy_decoding_gives_the_same_episodes_in_fewer_forward_passes(tiny_policy, batch_size):
    """Drafts verified in the forward pass: rows of different lengths and drafts, refills, retries."""
    _, model, tokenizer = tiny_policy
    seeds, kwargs = list(range(100, 110)), {"fail_prob": 0.5}
    config = dict(batch_size=batch_size, max_new_tokens=64, max_turns=4)
    plain = Runtime(model, tokenizer, RuntimeConfig(**config))
    drafted = Runtime(model, tokenizer, RuntimeConfig(**config, draft_tokens=8))
    a, b = plain.run("Calculator-v0", seeds, kwargs), drafted.run("Calculator-v0", seeds, kwargs)
    assert any(len(tr.turns) >= 2 for tr in a)
    assert _tokens(a) == _tokens(b) and [tr.success for tr in a] == [tr.success for tr in b]
    for x, y in zip(a, b):
        for s, t in zip(x.turns, y.turns):
            assert s.logprobs == pytest.approx(t.logprobs, abs=1e-4)
    assert drafted.stats["accepted_tokens"] > drafted.stats["generated_tokens"] / 3
    assert drafted.stats["forward_passes"] < plain.stats["forward_passes"] / 2


@pytest.mark.parametrize("budget, per_slot", [(16, 2), (4, 0)])
def test_the_draft_budget_is_shared_by_the_slots(tiny_policy, budget, per_slot):
    """8 slots: a budget of 16 lets each slot draft 2 tokens a pass, one of 4 none (more once the batch
    shrinks at the end of the queue); the episodes stay the same."""
    _, model, tokenizer = tiny_policy
    seeds, kwargs = list(range(100, 110)), {"fail_prob": 0.5}
    config = dict(batch_size=8, max_new_tokens=64, max_turns=4)
    plain = Runtime(model, tokenizer, RuntimeConfig(**config)).run("Calculator-v0", seeds, kwargs)
    runtime = Runtime(model, tokenizer, RuntimeConfig(**config, draft_tokens=8, draft_budget=budget))
    calls = []
    draft = runtime._draft
    runtime._draft = lambda e, cap: calls.append((cap, len(out := draft(e, cap)))) or out
    assert _tokens(runtime.run("Calculator-v0", seeds, kwargs)) == _tokens(plain)
    assert calls[0][0] == per_slot and all(n <= cap for cap, n in calls)
    assert max(n for cap, n in calls if cap == per_slot) == per_slot


def test_drafted_sampling_records_the_policys_log_probabilities_and_is_reproducible(tiny_policy):
    _, model, tokenizer = tiny_policy
    config = RuntimeConfig(batch_size=4, max_new_tokens=32, max_turns=3, greedy=False, draft_tokens=8)
    seeds = [1, 2, 3, 4, 5, 6]
    a = Runtime(model, tokenizer, config, seed=1).run("Calculator-v0", seeds)
    assert _tokens(a) == _tokens(Runtime(model, tokenizer, config, seed=1).run("Calculator-v0", seeds))
    forced = [[t.token_ids for t in tr.turns] for tr in a]  # the sampled tokens, scored one at a time
    scored = Runtime(model, tokenizer, RuntimeConfig(batch_size=1, max_new_tokens=32, max_turns=3)).run(
        "Calculator-v0", seeds, forced=forced
    )
    assert _tokens(scored) == _tokens(a)
    for x, y in zip(a, scored):
        for s, t in zip(x.turns, y.turns):
            assert s.logprobs == pytest.approx(t.logprobs, abs=1e-4)


def test_drafts_on_grouped_query_attention_decode_the_same_as_re_encoding(tiny_policy, device):
    """Qwen2 with one key/value head, forced turns of different lengths: each row's own 4D mask."""
    _, _, tokenizer = tiny_policy
    torch.manual_seed(0)
    model = _qwen2(tokenizer, device, num_key_value_heads=1).eval()
    eot, letter = tokenizer.convert_tokens_to_ids(IM_END), tokenizer.convert_tokens_to_ids("a")
    forced = [[[letter] * n + [eot]] for n in (2, 9, 4, 6, 3)]
    runs = {}
    for draft_tokens, use_cache in ((4, True), (0, False)):
        config = RuntimeConfig(batch_size=3, max_new_tokens=12, max_turns=2, draft_tokens=draft_tokens)
        config.use_cache = use_cache
        runs[use_cache] = Runtime(model, tokenizer, config).run("Calculator-v0", [1, 2, 3, 4, 5], forced=forced)
    assert _tokens(runs[True]) == _tokens(runs[False])
    for x, y in zip(runs[True], runs[False]):
        for s, t in zip(x.turns, y.turns):
            assert s.logprobs == pytest.approx(t.logprobs, abs=1e-4)


def test_max_context_defaults_to_the_models_positions_and_refuses_more(tiny_policy):
    _, model, tokenizer = tiny_policy
    positions = model.config.max_position_embeddings
    assert Runtime(model, tokenizer, RuntimeConfig()).config.max_context == positions
    with pytest.raises(ValueError, match=f"runtime.max_context={positions + 1} exceeds"):
        Runtime(model, tokenizer, RuntimeConfig(max_context=positions + 1))


def test_a_tokenizer_that_does_not_belong_to_its_model_is_refused(tiny_policy, tmp_path):
    """A saved policy whose tokenizer has more tokens than the model has rows is not patched with random rows."""
    policy_dir, model, tokenizer = tiny_policy
    smaller = type(model)(type(model.config)(**{**model.config.to_dict(), "vocab_size": len(tokenizer) - 5}))
    smaller.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="do not belong together"):
        load_policy(tmp_path, local_files_only=True)


def test_a_verified_draft_is_kept_up_to_its_first_miss_and_the_choice_there():
    """The one acceptance rule of the runtime and the bench's orchestrated agent: position j's choice is emitted
    and the draft stops at the first position whose choice differs (after a full match: one more token)."""
    policy = [5, 6, 9, 1]  # what the model chooses at each position of the verifying pass
    seen = []

    def choose(j, proposed):
        seen.append((j, proposed))
        return policy[j], -0.5

    assert [t for t, _ in verify_draft([5, 6, 7], choose)] == [5, 6, 9]
    assert seen == [(0, 5), (1, 6), (2, 7)]  # the verifier never looks past the miss
    assert [t for t, _ in verify_draft([5, 6, 9], choose)] == [5, 6, 9, 1]  # all kept, then the next token
    assert [t for t, _ in verify_draft([], choose)] == [5]  # no draft: one token, as without drafting
