"""The configured teacher of an environment (``make_teacher``: its scripted expert, or an LLM), and the LLM
teacher: a model behind an OpenAI-compatible chat endpoint.

The LLM is told the tools and the Hermes tool-call format in a system prompt and answers in plain text,
so its replies are agent turns in exactly the format the compiled agent learns (no conversion from a
provider's native tool-call objects, which not every OpenAI-compatible server implements).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from hydra.utils import get_method, instantiate

from envs.base import ToolCall, ToolEnv, parse_turn
from rl_agents.config import env_entries

log = logging.getLogger(__name__)

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


USAGE_KEYS = ("requests", "cached", "retries", "failed_requests", "prompt_tokens", "completion_tokens")


class TeacherUnavailable(RuntimeError):
    """The endpoint or the prompt is broken: the collection stopped, with a message that says why (every reply
    it received is in the response cache, so a rerun resumes without paying for them again)."""


class RequestFailed(RuntimeError):
    """One request that still failed after its retries: its episode is lost, the collection goes on."""


class ResponseCache:
    """Every reply of an LLM teacher, on disk (JSON lines, appended and flushed as they arrive): an interrupted
    or failed collection resumes where it stopped, and a rerun of the same requests costs nothing. The key is a
    hash of the request (model, messages, sampling) and, when it samples (temperature > 0), the episode's seed."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.replies: dict[str, str] = {}
        self.lock = threading.Lock()
        if self.path.is_file():
            for line in self.path.read_text().splitlines():
                try:
                    record = json.loads(line)
                    self.replies[record["key"]] = record["reply"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    continue  # a line torn by a kill: that reply is requested again
        self.path.parent.mkdir(parents=True, exist_ok=True)

    @staticmethod
    def key(request: dict[str, Any], seed: int | None) -> str:
        sampled = request.get("temperature", 0) > 0
        return hashlib.sha256(json.dumps([request, seed if sampled else None], sort_keys=True).encode()).hexdigest()

    def get(self, key: str) -> str | None:
        with self.lock:
            return self.replies.get(key)

    def put(self, key: str, reply: str) -> None:
        with self.lock:
            self.replies[key] = reply
            with self.path.open("a") as f:
                f.write(json.dumps({"key": key, "reply": reply}) + "\n")
                f.flush()


class RateLimit:
    """At most ``per_s`` request starts per second across threads (None: no limit)."""

    def __init__(self, per_s: float | None):
        self.interval = 1.0 / per_s if per_s else 0.0
        self.next = 0.0
        self.lock = threading.Lock()

    def wait(self) -> None:
        if not self.interval:
            return
        with self.lock:
            now = time.monotonic()
            start = max(now, self.next)
            self.next = start + self.interval
        time.sleep(max(0.0, start - now))


class OpenAITeacher:
    """A teacher backed by any OpenAI-compatible chat completions endpoint (OpenAI, vLLM, TGI, Ollama...).

    Built to run at scale: the collect stage runs ``concurrency`` episodes at once (``act`` is thread-safe),
    each request has a timeout and ``max_retries`` retries with exponential backoff on timeouts, connection
    errors, 429 and 5xx (a 4xx such as a wrong model or key stops at once), ``requests_per_s`` limits the rate,
    and every reply goes through the ``cache`` (set by the collect stage). ``usage()`` counts requests,
    cache hits, retries, failures, tokens and their cost (``price_input_per_1m`` and ``price_output_per_1m``,
    in dollars per million tokens).
    """

    checks_health = True  # the collect stage stops early when its failure or malformed-turn rate is too high

    def __init__(
        self,
        model: str,
        base_url: str | None = None,
        api_key_env: str = "OPENAI_API_KEY",
        temperature: float = 0.0,
        max_tokens: int = 512,
        timeout_s: float = 60.0,
        max_retries: int = 4,
        backoff_s: float = 1.0,
        requests_per_s: float | None = None,
        concurrency: int = 8,
        price_input_per_1m: float = 0.0,
        price_output_per_1m: float = 0.0,
        noise: float = 0.0,
        client: Any = None,
        cache: ResponseCache | None = None,
        native_tools: bool = False,
    ):
        self.model = model
        self.base_url = base_url
        self.api_key_env = api_key_env
        self.temperature = temperature
        self.max_tokens = max_tokens
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.rate = RateLimit(requests_per_s)
        self.concurrency = concurrency
        self.prices = (price_input_per_1m, price_output_per_1m)
        self.noise = noise  # kept for config symmetry with scripted teachers; an LLM's mistakes are its own
        self.cache = cache
        self.native_tools = native_tools
        self._client = client
        self._client_lock = threading.Lock()
        self._usage: Counter[str] = Counter()
        self._usage_lock = threading.Lock()

    @property
    def name(self) -> str:
        return f"openai:{self.model}"

    @property
    def client(self):
        with self._client_lock:
            if self._client is None:
                try:
                    from openai import OpenAI
                except ImportError:
                    raise ImportError(
                        "teacher=openai needs the openai package: pip install 'rl_agents[openai]'"
                    ) from None
                key = os.environ.get(self.api_key_env)
                if not key and self.base_url:
                    key = "EMPTY"  # a local server (vLLM, TGI, Ollama) takes any key
                    log.info("teacher: %s is not set: sending a placeholder key to %s", self.api_key_env, self.base_url)
                if not key:
                    raise RuntimeError(
                        f"teacher=openai: set the API key in the environment variable {self.api_key_env}"
                    )
                # retries are ours (counted, with backoff and the failure policy): the client makes none
                self._client = OpenAI(api_key=key, base_url=self.base_url, timeout=self.timeout_s, max_retries=0)
            return self._client

    def begin(self, env: ToolEnv, rng: np.random.Generator) -> None:
        pass

    def messages(self, env: ToolEnv, task: str, history: list[tuple[str, str]]) -> list[dict[str, Any]]:
        if self.native_tools:
            return self._native_messages(task, history)
        tools = "\n".join(json.dumps(tool.schema()) for tool in env.tools.values())
        messages = [{"role": "system", "content": SYSTEM_PROMPT.format(tools=tools)}, {"role": "user", "content": task}]
        for agent, observation in history:
            messages.append({"role": "assistant", "content": agent})
            messages.append({"role": "user", "content": f"<tool_response>\n{observation}\n</tool_response>"})
        return messages

    @staticmethod
    def _native_messages(task: str, history: list[tuple[str, str]]) -> list[dict[str, Any]]:
        """The episode in OpenAI's tool-calling shape: a tool call is the assistant's ``tool_calls`` and its
        result a ``tool`` message; any other turn (an answer, a malformed one) stays text, its observation a
        user message in the format's ``<tool_response>`` (no system prompt: the endpoint gets ``tools``)."""
        messages: list[dict[str, Any]] = [{"role": "user", "content": task}]
        for i, (agent, observation) in enumerate(history):
            parsed = parse_turn(agent)
            if isinstance(parsed, ToolCall):
                call_id = f"call_{i}"
                thought = agent.split("<tool_call>", 1)[0]
                messages.append({"role": "assistant", "content": thought or None, "tool_calls": [{
                    "id": call_id, "type": "function",
                    "function": {"name": parsed.name, "arguments": json.dumps(parsed.arguments)}}]})  # fmt: skip
                messages.append({"role": "tool", "tool_call_id": call_id, "content": observation})
            else:
                messages.append({"role": "assistant", "content": agent})
                messages.append({"role": "user", "content": f"<tool_response>\n{observation}\n</tool_response>"})
        return messages

    def request(self, env: ToolEnv, task: str, history: list[tuple[str, str]]) -> dict[str, Any]:
        """The keyword arguments of ``client.chat.completions.create`` for the next turn."""
        request = {
            "model": self.model,
            "messages": self.messages(env, task, history),
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
        }
        if self.native_tools:
            request["tools"] = [tool.schema() for tool in env.tools.values()]
        return request

    def act(self, env: ToolEnv, task: str, history: list[tuple[str, str]]) -> str:
        request = self.request(env, task, history)
        key = ResponseCache.key(request, getattr(env, "np_random_seed", None)) if self.cache else None
        if key is not None and (cached := self.cache.get(key)) is not None:
            self._count(cached=1)
            return cached
        reply = self._create(request)
        if key is not None:
            self.cache.put(key, reply)
        return reply

    def _create(self, request: dict[str, Any]) -> str:
        import openai

        retryable = (openai.APITimeoutError, openai.APIConnectionError, openai.RateLimitError,
                     openai.InternalServerError)  # fmt: skip
        for attempt in range(self.max_retries + 1):
            self.rate.wait()
            self._count(requests=1)
            try:
                response = self.client.chat.completions.create(**request)
            except retryable as err:
                if attempt == self.max_retries:
                    self._count(failed_requests=1)
                    raise RequestFailed(f"{type(err).__name__}: {err}") from None
                self._count(retries=1)
                time.sleep(self.backoff_s * 2**attempt)
                continue
            except openai.APIStatusError as err:  # 4xx: the key, the model or the request is wrong; retrying won't help
                raise TeacherUnavailable(
                    f"the teacher's endpoint refused a request with {err.status_code} ({err.message}): check "
                    f"teacher.model={self.model!r}, teacher.base_url={self.base_url!r} and ${self.api_key_env}"
                ) from None
            usage = getattr(response, "usage", None)
            if usage is not None:
                self._count(prompt_tokens=usage.prompt_tokens or 0, completion_tokens=usage.completion_tokens or 0)
            return self._turn(response.choices[0].message)
        raise AssertionError("unreachable")

    def _turn(self, message) -> str:
        """The reply as an agent turn in the format: native tool calls become ``<tool_call>`` text (after the
        message's own text, a thought), and a plain native reply is the final answer."""
        content = (message.content or "").strip()
        calls = getattr(message, "tool_calls", None) if self.native_tools else None
        if calls:
            call = calls[0].function
            try:
                arguments = json.loads(call.arguments or "{}")
            except json.JSONDecodeError:
                arguments = call.arguments  # kept as sent: the environment reports the bad JSON to the episode
            return content + "<tool_call>" + json.dumps({"name": call.name, "arguments": arguments}) + "</tool_call>"
        if self.native_tools and content and "<answer>" not in content and "<tool_call>" not in content:
            return f"<answer>{content}</answer>"
        return content

    def _count(self, **counts: int) -> None:
        with self._usage_lock:
            self._usage.update(counts)

    def usage(self) -> dict[str, Any]:
        """Requests sent (retries included), cache hits, retries, requests lost after their retries, tokens, and
        their cost in dollars."""
        with self._usage_lock:
            usage = {k: self._usage.get(k, 0) for k in USAGE_KEYS}
        cost = usage["prompt_tokens"] * self.prices[0] + usage["completion_tokens"] * self.prices[1]
        return {**usage, "cost_usd": round(cost / 1e6, 6)}


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
    return OpenAITeacher(
        t.model, t.base_url, t.api_key_env, t.temperature, t.max_tokens, t.timeout_s, t.max_retries, t.backoff_s,
        t.requests_per_s, t.concurrency, t.price_input_per_1m, t.price_output_per_1m, noise=t.noise,
        native_tools=t.native_tools,
    )  # fmt: skip
