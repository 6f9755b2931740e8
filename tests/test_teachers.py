"""The OpenAI-compatible teacher: request building and reply handling, with a fake client (no network)."""

import json
from types import SimpleNamespace

import gymnasium as gym
import pytest

from rl_agents.collect import teacher_episode
from rl_agents.teachers import OpenAITeacher


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
