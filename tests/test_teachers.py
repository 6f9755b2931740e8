"""The OpenAI-compatible teacher: request building and reply handling, with a fake client (no network)."""

import json
from types import SimpleNamespace

import gymnasium as gym
import pytest

from rl_agents.collect import Health, collect, teacher_episode
from rl_agents.teachers import OpenAITeacher, ResponseCache, TeacherUnavailable
from tests.helpers.cli import run_cli
from tests.helpers.fake_llm import FakeLLM


class FakeClient:
    """Records requests; replies like an OpenAI chat completions endpoint."""

    def __init__(self, replies):
        self.replies, self.requests = list(replies), []
        self.chat = SimpleNamespace(completions=SimpleNamespace(create=self._create))

    def _create(self, **kwargs):
        self.requests.append(kwargs)
        message = SimpleNamespace(content=self.replies.pop(0))
        return SimpleNamespace(choices=[SimpleNamespace(message=message)])


def test_request_holds_tools_task_and_history():
    env = gym.make("Calculator-v0")
    task, _ = env.reset(seed=0)
    teacher = OpenAITeacher(model="my-model", temperature=0.3, max_tokens=99)
    request = teacher.request(env.unwrapped, task, [("<tool_call>{}</tool_call>", "ERROR: timeout, try again")])
    assert request["model"] == "my-model" and request["temperature"] == 0.3 and request["max_tokens"] == 99
    system, user, assistant, tool = request["messages"]
    assert system["role"] == "system" and "<tools>" in system["content"]
    schema = json.loads(system["content"].split("<tools>\n")[1].split("\n</tools>")[0])
    assert schema["function"]["name"] == "calculator" and "expression" in schema["function"]["parameters"]["properties"]
    assert user == {"role": "user", "content": task}
    assert assistant == {"role": "assistant", "content": "<tool_call>{}</tool_call>"}
    assert tool["role"] == "user" and tool["content"] == "<tool_response>\nERROR: timeout, try again\n</tool_response>"


def test_an_openai_teacher_episode_is_a_trajectory():
    env = gym.make("Calculator-v0", fail_prob=0.0)
    env.reset(seed=4)
    expression = env.unwrapped.task.extra["expression"]
    value = env.unwrapped.task.answer
    call = json.dumps({"name": "calculator", "arguments": {"expression": expression}})
    client = FakeClient([f"<tool_call>{call}</tool_call>", f"<answer>{value}</answer>"])
    trajectory = teacher_episode(
        env, OpenAITeacher(model="m", client=client), seed=4, env_id="Calculator-v0", max_turns=8
    )
    assert trajectory.success and len(trajectory.turns) == 2
    assert trajectory.metadata["teacher"] == "openai:m"
    assert len(client.requests) == 2 and len(client.requests[1]["messages"]) == 4


def test_missing_api_key_fails_with_the_variable_name(monkeypatch):
    monkeypatch.delenv("MY_KEY", raising=False)
    teacher = OpenAITeacher(model="m", api_key_env="MY_KEY")
    with pytest.raises(RuntimeError, match="MY_KEY"):
        _ = teacher.client


def test_client_is_built_for_the_configured_endpoint(monkeypatch):
    monkeypatch.setenv("MY_KEY", "sk-test")
    client = OpenAITeacher(model="m", base_url="http://127.0.0.1:9/v1", api_key_env="MY_KEY").client
    assert str(client.base_url).startswith("http://127.0.0.1:9/v1") and client.api_key == "sk-test"


# --- at scale, against a local server with injected faults ------------------------------------------------------
SEEDS = list(range(12))


def llm_collect(llm, tmp_path, malformed="mask", cache="cache.jsonl", **teacher_kwargs):
    """Collect Calculator-v0 episodes from the fake server; returns (kept, stats, teacher)."""
    kwargs = {"base_url": llm.base_url, "api_key_env": "RL_AGENTS_TEST_NO_KEY", "concurrency": 4, "backoff_s": 0.01,
              "timeout_s": 5.0, "price_input_per_1m": 1.0, "price_output_per_1m": 2.0, **teacher_kwargs}  # fmt: skip
    teacher = OpenAITeacher(model="fake", cache=ResponseCache(tmp_path / cache), **kwargs)
    health = Health(check_after=8)
    kept, stats = collect("Calculator-v0", {"fail_prob": 0.0}, teacher, SEEDS, 8, "success", False, malformed, health)
    return kept, stats, teacher


def texts(trajectories):
    return [[t.agent for t in trajectory.turns] for trajectory in trajectories]


@pytest.fixture
def healthy(tmp_path):
    """The reference: every episode through a healthy server (no key set: a local server gets a placeholder)."""
    with FakeLLM() as llm:
        kept, stats, _ = llm_collect(llm, tmp_path, cache="healthy.jsonl")
    return kept, stats


def test_a_healthy_endpoint_is_collected_concurrently_with_its_usage_counted(healthy):
    kept, stats = healthy
    assert [t.metadata["seed"] for t in kept] == SEEDS  # seed order, whatever the order they finished in
    assert all(t.success and len(t.turns) == 2 for t in kept)
    usage = stats["teacher_usage"]
    assert usage["requests"] == 2 * len(SEEDS) and usage["cached"] == usage["retries"] == 0
    assert usage["prompt_tokens"] > 0 and usage["completion_tokens"] > 0
    assert usage["cost_usd"] == pytest.approx((usage["prompt_tokens"] + 2 * usage["completion_tokens"]) / 1e6)


def test_a_rerun_costs_nothing_from_the_cache(tmp_path, healthy):
    with FakeLLM() as llm:
        llm_collect(llm, tmp_path)
        first = llm.requests
        kept, stats, _ = llm_collect(llm, tmp_path)
        assert llm.requests == first  # not one request more
    assert stats["teacher_usage"]["requests"] == 0 and stats["teacher_usage"]["cached"] == 2 * len(SEEDS)
    assert texts(kept) == texts(healthy[0])


@pytest.mark.parametrize("fault, retries", [("500", 3), ("stall", 1)])
def test_transient_faults_are_retried_and_lose_nothing(tmp_path, healthy, fault, retries):
    """500s on the first three requests, or one request that stalls past teacher.timeout_s: retried."""
    with FakeLLM(lambda n, body: fault if n <= retries else None, stall_s=3.0) as llm:
        kept, stats, _ = llm_collect(llm, tmp_path, timeout_s=1.0)
    assert stats["teacher_usage"]["retries"] == retries and stats["lost_episodes"] == 0
    assert texts(kept) == texts(healthy[0])


def test_a_dead_endpoint_stops_early_and_a_resume_pays_only_for_the_rest(tmp_path, healthy):
    with FakeLLM(lambda n, body: "500" if n > 10 else None) as llm:
        with pytest.raises(TeacherUnavailable, match="endpoint is failing"):
            llm_collect(llm, tmp_path, max_retries=1)
        assert llm.requests < 60  # not the whole budget: 24 turns x 2 attempts
    cached = len((tmp_path / "cache.jsonl").read_text().splitlines())
    assert cached == 10  # every reply that came back
    with FakeLLM() as llm:
        kept, stats, _ = llm_collect(llm, tmp_path)
        assert llm.requests == 2 * len(SEEDS) - cached
    assert stats["teacher_usage"]["cached"] == cached
    assert texts(kept) == texts(healthy[0])


def test_a_teacher_that_never_writes_the_format_stops_within_a_few_requests(tmp_path):
    with FakeLLM(lambda n, body: "prose") as llm:
        with pytest.raises(TeacherUnavailable, match="does not write the format") as err:
            llm_collect(llm, tmp_path)
        # the window's 8 turns; then at most the 3 others in flight, and one more per worker before the stop reaches it
        assert llm.requests <= 8 + 3 + 4
    assert "42" in str(err.value)  # the message shows what it wrote


def test_a_refused_request_stops_at_once(tmp_path):
    with FakeLLM(lambda n, body: "401") as llm:
        with pytest.raises(TeacherUnavailable, match="refused a request with 401"):
            llm_collect(llm, tmp_path)
        assert llm.requests <= 8  # no retries: one per worker, and one more each before the stop reaches it


@pytest.mark.parametrize("policy", ["mask", "drop", "keep"])
def test_malformed_teacher_turns_in_successful_episodes(tmp_path, policy):
    """The first reply of every episode is broken JSON; the teacher recovers after the error observation."""
    first_turn = lambda n, body: "malformed" if len(body["messages"]) == 2 else None  # noqa: E731
    with FakeLLM(first_turn) as llm:
        kept, stats, _ = llm_collect(llm, tmp_path, malformed=policy)
    assert stats["teacher_success_rate"] == 1.0
    if policy == "drop":
        assert kept == [] and stats["dropped_malformed"] == len(SEEDS)
        return
    assert len(kept) == len(SEEDS) and all(t.turns[0].error == "malformed_json" for t in kept)
    assert [t.turns[0].imitate for t in kept] == [policy == "keep"] * len(SEEDS)
    assert all(turn.imitate for t in kept for turn in t.turns[1:])
    assert stats["masked_turns"] == (len(SEEDS) if policy == "mask" else 0)


def test_the_train_command_with_an_llm_teacher_stops_clearly_and_resumes_from_its_cache(tmp_path):
    """``teacher=openai`` through the command: an endpoint that dies mid-collection ends the run with one message
    (exit 2, no traceback); ``resume=true`` against the endpoint, healthy again, pays only for the missing
    replies."""
    run_dir = tmp_path / "run"
    common = ["teacher=openai", "teacher.model=fake", "teacher.api_key_env=RL_AGENTS_TEST_NO_KEY",
              "teacher.backoff_s=0.01", "teacher.max_retries=1", "++env.envs.Calculator-v0.kwargs.fail_prob=0.0",
              "budget=smoke", "stages=[collect]", "logger=none", "progress=false",
              f"hydra.run.dir={run_dir}"]  # fmt: skip
    with FakeLLM(lambda n, body: "500" if n > 20 else None) as llm:
        failed = run_cli("rl_agents.train", f"teacher.base_url={llm.base_url}", *common, check=False)
        port = llm.port
    assert failed.returncode == 2
    assert "Traceback" not in failed.stderr + failed.stdout
    assert "endpoint is failing" in failed.stdout and "resume=true" in failed.stdout
    with FakeLLM(port=port) as llm:  # the same endpoint (a changed teacher.base_url would refuse the resume)
        run_cli("rl_agents.train", f"teacher.base_url={llm.base_url}", *common, "resume=true")
        resumed = llm.requests
    stats = json.loads((run_dir / "trajectories" / "collect_stats.json").read_text())["Calculator-v0"]
    usage = stats["teacher_usage"]
    assert usage["cached"] == 20 and usage["requests"] + usage["cached"] == 2 * stats["episodes"]  # two turns each
    assert resumed == usage["requests"]  # the collection's missing replies only
    assert stats["teacher_success_rate"] == 1.0 and stats["kept"] == stats["episodes"]


def test_the_rate_limit_spaces_request_starts_across_threads(monkeypatch):
    """teacher.requests_per_s: each start waits for the previous one's slot (a fake clock: no wall time)."""
    from rl_agents import teachers

    clock = {"now": 100.0}
    monkeypatch.setattr(teachers.time, "monotonic", lambda: clock["now"])
    monkeypatch.setattr(teachers.time, "sleep", lambda s: clock.__setitem__("now", clock["now"] + s))
    limit = teachers.RateLimit(per_s=4.0)
    starts = []
    for _ in range(5):
        limit.wait()
        starts.append(clock["now"])
    assert starts == pytest.approx([100.0, 100.25, 100.5, 100.75, 101.0])
    assert teachers.RateLimit(per_s=None).interval == 0.0
