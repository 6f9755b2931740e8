"""The configured teacher of an environment (``make_teacher``: its scripted expert, or an LLM), and the LLM
teacher: a model behind an OpenAI-compatible chat endpoint.

The LLM is told the tools and the Hermes tool-call format in a system prompt and answers in plain text,
so its replies are agent turns in exactly the format the compiled agent learns (no conversion from a
provider's native tool-call objects, which not every OpenAI-compatible server implements).
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
from hydra.utils import get_method, instantiate

from envs.base import ToolEnv
from rl_agents.config import env_entries

SYSTEM_PROMPT = """You are an agent that solves the user's task with tools.
You are provided with function signatures within <tools></tools> XML tags:
<tools>
{tools}
</tools>
Each of your replies is exactly one of:
- a tool call: <tool_call>{{"name": <function-name>, "arguments": <args-json-object>}}</tool_call>
- the final answer, once you know it: <answer>the answer alone, no explanation</answer>
You may think briefly first inside <think></think>. Tool results come back inside <tool_response></tool_response>.
If a tool fails with a transient error, call it again."""


class OpenAITeacher:
    """A teacher backed by any OpenAI-compatible chat completions endpoint (OpenAI, vLLM, TGI, Ollama...)."""

    def __init__(
        self,
        model: str,
        base_url: str | None = None,
        api_key_env: str = "OPENAI_API_KEY",
        temperature: float = 0.0,
        max_tokens: int = 512,
        timeout_s: float = 60.0,
        noise: float = 0.0,
        client: Any = None,
    ):
        self.model = model
        self.base_url = base_url
        self.api_key_env = api_key_env
        self.temperature = temperature
        self.max_tokens = max_tokens
        self.timeout_s = timeout_s
        self.noise = noise  # kept for config symmetry with scripted teachers; an LLM's mistakes are its own
        self._client = client

    @property
    def name(self) -> str:
        return f"openai:{self.model}"

    @property
    def client(self):
        if self._client is None:
            try:
                from openai import OpenAI
            except ImportError:
                raise ImportError("teacher=openai needs the openai package: pip install 'rl_agents[openai]'") from None
            key = os.environ.get(self.api_key_env)
            if not key:
                raise RuntimeError(f"teacher=openai: set the API key in the environment variable {self.api_key_env}")
            self._client = OpenAI(api_key=key, base_url=self.base_url, timeout=self.timeout_s)
        return self._client

    def begin(self, env: ToolEnv, rng: np.random.Generator) -> None:
        pass

    def messages(self, env: ToolEnv, task: str, history: list[tuple[str, str]]) -> list[dict[str, str]]:
        tools = "\n".join(json.dumps(tool.schema()) for tool in env.tools.values())
        messages = [{"role": "system", "content": SYSTEM_PROMPT.format(tools=tools)}, {"role": "user", "content": task}]
        for agent, observation in history:
            messages.append({"role": "assistant", "content": agent})
            messages.append({"role": "user", "content": f"<tool_response>\n{observation}\n</tool_response>"})
        return messages

    def request(self, env: ToolEnv, task: str, history: list[tuple[str, str]]) -> dict[str, Any]:
        """The keyword arguments of ``client.chat.completions.create`` for the next turn."""
        return {
            "model": self.model,
            "messages": self.messages(env, task, history),
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
        }

    def act(self, env: ToolEnv, task: str, history: list[tuple[str, str]]) -> str:
        response = self.client.chat.completions.create(**self.request(env, task, history))
        return (response.choices[0].message.content or "").strip()


def make_teacher(cfg, env_id: str):
    """The teacher ``cfg`` configures for ``env_id``: the teacher group's builder (``teacher._target_``)."""
    return get_method(cfg.teacher._target_)(cfg, env_id)


def scripted_teacher(cfg, env_id: str):
    """``teacher=scripted``: the environment's own expert (``env.envs.<id>.teacher``, a Hydra node) with
    ``teacher.noise`` and ``teacher.think``."""
    return instantiate(env_entries(cfg)[env_id].teacher, noise=cfg.teacher.noise, think=cfg.teacher.think)


def openai_teacher(cfg, env_id: str) -> OpenAITeacher:
    """``teacher=openai``: one LLM behind an OpenAI-compatible endpoint, for every environment."""
    t = cfg.teacher
    return OpenAITeacher(t.model, t.base_url, t.api_key_env, t.temperature, t.max_tokens, noise=t.noise)
