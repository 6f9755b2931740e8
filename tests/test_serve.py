"""The compiled agent behind the chat-completions protocol, driven by the real openai client on 127.0.0.1."""

import json
import threading
import urllib.error
import urllib.request
from functools import partial
from pathlib import Path

import openai
import pytest

from rl_agents.agent import Agent

CONF = str(Path(__file__).resolve().parents[1] / "conf")


@pytest.fixture(scope="module")
def server(carded_policy):
    """The carded tiny calculator policy, served by uvicorn in a thread."""
    from rl_agents.serve import AgentServer, Background

    served = AgentServer(Agent.from_pretrained(carded_policy, env_kwargs={"fail_prob": 0.0}), "calculator-agent")
    with Background(served.app) as base:
        yield base, openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0), served, carded_policy
    served.close()


def test_agent_mode_answers_with_the_whole_tool_loop(server):
    base, client, served, target = server
    assert [m.id for m in client.models.list().data] == ["calculator-agent"]
    response = client.chat.completions.create(model="calculator-agent",
                                              messages=[{"role": "user", "content": "What is 12 * 34?"}])  # fmt: skip
    turns = response.model_extra["agent_turns"]
    assert turns and any(t["tool"] == "calculator" for t in turns)
    # the same episode as the Python API's
    direct = Agent.from_pretrained(target, env_kwargs={"fail_prob": 0.0}).run("What is 12 * 34?")
    assert [t["text"] for t in turns] == [t.text for t in direct.turns]
    assert response.choices[0].message.content == (direct.answer or "")
    assert response.model_extra["stop_reason"] == direct.stop_reason


def test_agent_mode_streams_each_turn_as_it_ends(server):
    _, client, _, _ = server
    ask = [{"role": "user", "content": "What is 12 * 34?"}]
    chunks = list(client.chat.completions.create(model="calculator-agent", stream=True, messages=ask))
    turns = [c.model_extra["agent_turn"] for c in chunks if c.model_extra.get("agent_turn")]
    whole = client.chat.completions.create(model="calculator-agent",
                                           messages=[{"role": "user", "content": "What is 12 * 34?"}])  # fmt: skip
    assert [t["text"] for t in turns] == [t["text"] for t in whole.model_extra["agent_turns"]]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_concurrent_agent_requests_are_answered_each_with_its_own_episode(server):
    _, client, _, _ = server
    tasks = ["What is 2 + 2?", "What is 12 * 34?", "Compute 7 - 9.", "What is 100 / 4?"]
    results = {}

    def ask(task):
        r = client.chat.completions.create(model="calculator-agent", messages=[{"role": "user", "content": task}])
        results[task] = r.model_extra["agent_turns"]

    threads = [threading.Thread(target=ask, args=(t,)) for t in tasks]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert set(results) == set(tasks)
    alone = client.chat.completions.create(model="calculator-agent",
                                           messages=[{"role": "user", "content": "What is 12 * 34?"}])  # fmt: skip
    assert [t["text"] for t in results["What is 12 * 34?"]] == [t["text"] for t in alone.model_extra["agent_turns"]]


def test_a_request_joins_the_running_batch_instead_of_waiting_for_it(carded_policy):
    """Continuous batching across requests: while the first request's tool hangs, a second request starts in a
    free slot and is answered; then the first is released and answered too. A server that ran batch by batch
    (or held one lock per request) would answer the second only after the first."""
    from rl_agents.serve import AgentServer, Background

    entered, release, calls = threading.Event(), threading.Event(), []

    def calculator(expression: str) -> str:
        calls.append(expression)
        if len(calls) == 1:  # the first call of all: the first request's
            entered.set()
            release.wait(timeout=60)
        return "408"

    agent = Agent.from_pretrained(carded_policy, tools={"calculator": calculator}, tool_timeout_s=90)
    served = AgentServer(agent, "calculator-agent")
    ask = [{"role": "user", "content": "What is 12 * 34?"}]
    order = []
    with Background(served.app) as base:
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)

        def request(name):
            client.chat.completions.create(model="calculator-agent", messages=ask)
            order.append(name)

        first = threading.Thread(target=request, args=("first",))
        first.start()
        try:
            assert entered.wait(timeout=60), "the first request never called its tool"
            request("second")  # answered while the first one's tool still hangs
            assert order == ["second"] and not release.is_set()
            # a tool-calling request runs between the batch's passes, with the model's own attention
            tools = [{"type": "function", "function": agent.declared["calculator"]}]
            during = client.chat.completions.create(model="calculator-agent", messages=ask, tools=tools)
            assert not release.is_set()
        finally:
            release.set()
            first.join(timeout=60)
        after = client.chat.completions.create(model="calculator-agent", messages=ask, tools=tools)
    served.close()
    assert order == ["second", "first"]
    assert agent.runtime.runs == 1  # one running batch took both
    assert during.choices[0].message.tool_calls[0].function == after.choices[0].message.tool_calls[0].function


def _agent_whose_first_tool_call_hangs(policy):
    """The agent with a calculator whose first call sets ``entered`` and waits for ``release`` (60 s at most)."""
    entered, release = threading.Event(), threading.Event()

    def calculator(expression: str) -> str:
        if not entered.is_set():
            entered.set()
            release.wait(timeout=60)
        return "408"

    return Agent.from_pretrained(policy, tools={"calculator": calculator}, tool_timeout_s=90), entered, release


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_that_leaves_frees_its_slot(carded_policy, stream):
    """The client of an agent-mode request, streamed or not, disconnects while its tool hangs: the episode ends at
    once (``cancelled``, its slot free; /health counts it) rather than when the tool returns, and the server goes
    on."""
    import http.client
    import time

    from rl_agents.serve import AgentServer, Background

    agent, entered, release = _agent_whose_first_tool_call_hangs(carded_policy)
    served = AgentServer(agent, "calculator-agent")
    body = {"messages": [{"role": "user", "content": "What is 12 * 34?"}], "stream": stream}
    try:
        with Background(served.app) as base:
            connection = http.client.HTTPConnection("127.0.0.1", int(base.rsplit(":", 1)[1]), timeout=60)
            connection.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
            if stream:
                response = connection.getresponse()
                assert response.status == 200 and response.readline().startswith(b"data: ")
            assert entered.wait(timeout=60), "the request never called its tool"
            connection.close()  # the client leaves while its tool hangs
            deadline, health = time.monotonic() + 30, {}
            while time.monotonic() < deadline:
                health = json.loads(urllib.request.urlopen(base + "/health", timeout=10).read())["agent_episodes"]
                if health["running"] == 0:
                    break
                time.sleep(0.1)
            assert health == {"running": 0, "waiting": 0, "cancelled": 1} and not release.is_set()
            client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)
            again = client.chat.completions.create(model="calculator-agent", messages=body["messages"])
            assert again.model_extra["stop_reason"] != "cancelled" and not release.is_set()  # not held by the tool
    finally:
        release.set()
        served.close()


def test_a_request_past_max_pending_gets_429_and_the_server_goes_on(carded_policy):
    """With ``max_pending=1`` and one request in hand (its tool hangs), the next gets OpenAI's 429 with
    ``Retry-After`` at once rather than waiting; once the first is answered, requests are served again."""
    from rl_agents.serve import AgentServer, Background

    agent, entered, release = _agent_whose_first_tool_call_hangs(carded_policy)
    served = AgentServer(agent, "calculator-agent", max_pending=1)
    ask, answers = [{"role": "user", "content": "What is 12 * 34?"}], []
    try:
        with Background(served.app) as base:
            client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)
            ask_once = partial(client.chat.completions.create, model="calculator-agent", messages=ask)
            first = threading.Thread(target=lambda: answers.append(ask_once()))
            first.start()
            assert entered.wait(timeout=60), "the first request never called its tool"
            with pytest.raises(openai.RateLimitError) as refused:
                client.chat.completions.create(model="calculator-agent", messages=ask)
            assert refused.value.code == "overloaded" and refused.value.response.headers["retry-after"] == "1"
            assert not release.is_set() and not answers  # refused while the first still ran
            release.set()
            first.join(timeout=60)
            health = json.loads(urllib.request.urlopen(base + "/health", timeout=10).read())["requests"]
            assert health == {"pending": 0, "max_pending": 1}
            again = client.chat.completions.create(model="calculator-agent", messages=ask)
            assert len(answers) == 1 and again.choices[0].message.content == answers[0].choices[0].message.content
    finally:
        release.set()
        served.close()


def test_a_turn_whose_client_left_stops_at_its_next_token(server):
    """Tool-calling mode: once ``cancelled()`` holds (the request's client left), decoding stops at the next token
    and the turn is not answered; one not started is never decoded."""
    from rl_agents.serve import ClientLeft

    base, client, served, target = server
    messages = [{"role": "user", "content": "What is 12 * 34?"}]
    _, _, full = served._one_turn(messages)

    class Tokens:
        def __init__(self):
            self.puts = []

        def put(self, value):
            self.puts.append(value)

        def end(self):
            pass

    heard = Tokens()  # generate hands the prompt first, then each token as it is decoded
    with pytest.raises(ClientLeft):
        served._one_turn(messages, heard, lambda: len(heard.puts) > 3)
    # cancelled once three tokens were heard: the token being decoded then is the last, of a longer turn
    assert full > 4 and len(heard.puts) == 1 + 4
    never = Tokens()
    with pytest.raises(ClientLeft):
        served._one_turn(messages, never, lambda: True)
    assert never.puts == []


def test_tool_calling_mode_returns_the_models_call_for_the_client_to_run(server):
    _, client, served, _ = server
    tools = [{"type": "function", "function": served.agent.declared["calculator"]}]
    messages = [{"role": "user", "content": "What is 12 * 34?"}]
    first = client.chat.completions.create(model="calculator-agent", messages=messages, tools=tools)
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls
    assert call.function.name == "calculator" and "expression" in json.loads(call.function.arguments)
    # the client runs the tool and sends the result back, as with any hosted model
    messages += [choice.message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": call.id, "content": "408"}]  # fmt: skip
    second = client.chat.completions.create(model="calculator-agent", messages=messages, tools=tools)
    assert second.usage.prompt_tokens > first.usage.prompt_tokens
    assert second.choices[0].finish_reason in ("stop", "tool_calls")
    # streamed, each reply adds up to the whole one: an answer's text as it is decoded, a call whole
    for whole, conversation in [(first, messages[:1]), (second, messages)]:
        chunks = list(client.chat.completions.create(model="calculator-agent", messages=conversation, tools=tools,
                                                     stream=True, stream_options={"include_usage": True}))  # fmt: skip
        deltas = [c.choices[0].delta for c in chunks if c.choices]
        calls = [call for d in deltas for call in d.tool_calls or []]
        message = whole.choices[0].message
        assert "".join(d.content or "" for d in deltas) == (message.content or "")
        assert [(c.function.name, c.function.arguments) for c in calls] == [
            (c.function.name, c.function.arguments) for c in message.tool_calls or []]  # fmt: skip
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
        assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def _post(base, body: bytes, path="/v1/chat/completions"):
    request = urllib.request.Request(base + path, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


@pytest.mark.parametrize(
    "body, status, code",
    [
        (b"{not json", 400, "invalid_json"),
        (json.dumps({"model": "gpt-9", "messages": [{"role": "user", "content": "hi"}]}).encode(), 404,
         "model_not_found"),
        (json.dumps({"messages": []}).encode(), 400, "invalid_messages"),
        (json.dumps({"messages": [{"role": "user", "content": "x"}],
                     "tools": [{"type": "function", "function": {"name": "shell"}}]}).encode(), 400, "unknown_tool"),
        (json.dumps({"messages": [{"role": "user", "content": "7 * 8 " * 400}],
                     "tools": [{"type": "function", "function": {"name": "calculator"}}]}).encode(), 400,
         "context_length_exceeded"),
        (json.dumps({"messages": [{"role": "user", "content": "x" * (1 << 20)}]}).encode(), 413, "request_too_large"),
    ],
)  # fmt: skip
def test_a_bad_request_gets_an_openai_error_and_the_server_keeps_serving(server, body, status, code):
    base, client, _, _ = server
    got, error = _post(base, body)
    assert got == status and error["error"]["code"] == code and error["error"]["message"]
    ok = client.chat.completions.create(
        model="calculator-agent", messages=[{"role": "user", "content": "What is 2 + 2?"}]
    )
    assert ok.model_extra["agent_turns"]
    with urllib.request.urlopen(base + "/health", timeout=10) as response:
        assert json.loads(response.read())["status"] == "ok"


def test_the_llm_teacher_collects_from_the_served_agent_with_native_tool_calls(server):
    """teacher=openai teacher.native_tools=true against this server's tool-calling mode: the collected episodes
    are the agent's own greedy ones (the runtime's, in this process), turn for turn."""
    from rl_agents.collect import collect
    from rl_agents.runtime import Runtime
    from rl_agents.teachers import OpenAITeacher

    base, _, served, _ = server
    teacher = OpenAITeacher(model="calculator-agent", base_url=f"{base}/v1", api_key_env="RL_AGENTS_TEST_NO_KEY",
                            native_tools=True, max_tokens=48, concurrency=2)  # fmt: skip
    seeds = list(range(4))
    collected, stats = collect("Calculator-v0", {"fail_prob": 0.0}, teacher, seeds, 4, "all", False)
    assert len(collected) == len(seeds) and stats["teacher_usage"]["requests"] == sum(len(t.turns) for t in collected)
    runtime = Runtime(served.agent.model, served.agent.tokenizer, served.agent.config)
    own = runtime.run("Calculator-v0", seeds, {"fail_prob": 0.0, "split": "train"})
    assert [[t.agent for t in e.turns] for e in collected] == [[t.agent for t in e.turns] for e in own]


def test_the_load_test_reports_every_level_against_the_in_process_runtime(server):
    """A tiny bounded run: each level answers its requests; the ratios are against the same tasks in-process
    (their values are measurements, not asserted)."""
    from omegaconf import OmegaConf

    from rl_agents.loadtest import LoadTestConfig, load_test

    _, _, _, target = server
    small = {"agent": str(target), "levels": [1, 2], "requests": 4, "tasks": ["What is 12 * 34?"],
             "conversation_steps": 3}  # fmt: skip
    cfg = OmegaConf.merge(OmegaConf.structured(LoadTestConfig), small)
    report = load_test(cfg)
    assert set(report["levels"]) == {"1", "2"} and report["requests"] == 4
    for row in report["levels"].values():
        assert row["requests_per_s"] > 0 and row["p99_ms"] >= row["p50_ms"] > 0
        assert row["throughput_vs_in_process_batch"] > 0 and row["p50_vs_in_process_single"] > 0
    tool_calling = report["tool_calling"]
    assert tool_calling["no_cache"]["steps"] == tool_calling["cache"]["steps"] == 2
    assert tool_calling["no_cache"]["reused_tokens"] == 0 < tool_calling["cache"]["reused_tokens"]


def test_the_prefix_cache_reuses_a_conversations_history_and_changes_no_token(server):
    """Tool-calling mode over several requests: with the cache, each request after the first reuses the
    previous one's keys and values; every turn is the one the uncached model writes."""
    from rl_agents.serve import PrefixCache

    _, _, served, _ = server
    conversation = [{"role": "user", "content": "What is 12 * 34?"}]
    turns = {}
    for entries in (0, 32):
        served.prefix_cache = PrefixCache(entries)
        messages, texts = list(conversation), []
        for observation in ("ERROR: timeout, try again", "408"):
            text, _, _ = served._one_turn(messages)
            texts.append(text)
            messages += [{"role": "assistant", "content": text}, {"role": "tool", "content": observation}]
        texts.append(served._one_turn(messages)[0])
        turns[entries] = texts
        if entries:
            cache = served.prefix_cache
            assert cache.hits == 2 and cache.misses == 1 and cache.reused_tokens > 0
    assert turns[0] == turns[32]
    served.prefix_cache = PrefixCache(32)
