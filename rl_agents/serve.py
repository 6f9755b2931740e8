"""The compiled agent behind OpenAI's chat-completions protocol: ``python -m rl_agents.serve agent=<policy dir>``.

FastAPI and uvicorn (``pip install 'rl_agents[serve]'``). The openai SDK, LangChain and curl work unchanged:

- **Agent mode** (a request without ``tools``): the last user message is the task; the server runs the whole
  tool loop with the agent's own tools and returns the final answer as the assistant message, each turn in
  the extension field ``agent_turns``. ``stream=true`` sends each turn as it ends, as server-sent events in
  OpenAI's chunk format (the turn in the chunk's ``agent_turn``), then the answer.
- **Tool-calling mode** (a request with ``tools``): the conversation so far is rendered in the training format
  (the policy's chat template, each message tokenized on its own as the runtime does, and a turn this server wrote
  fed back as the ids the model wrote: ``OwnTurns``) and the model writes one turn: a tool call comes back as OpenAI
  ``tool_calls`` for the client to run, an answer as the message's content. ``stream=true``: an answer's text
  as it is decoded, a tool call whole when the turn ends.
- ``GET /v1/models``, ``GET /health``.

One thread owns the model and runs the agent-mode tasks on the runtime's slots with continuous batching: a
request that arrives while others run starts in the next free slot, at the next forward pass, rather than
waiting for the batch to end (``Runtime.stream``); a tool-calling request runs between two passes. Bad
requests get OpenAI-style JSON errors with a 4xx status, and the server keeps serving. Past ``max_pending``
requests in hand a new one gets 429 (``overloaded``, with ``Retry-After``) instead of an unbounded wait, and a
request whose client leaves, streamed or not, stops: its episode ends at the next forward pass, its turn at the
next token (or is never started).
"""

import asyncio
import copy
import json
import logging
import queue
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig
from transformers import StoppingCriteria, StoppingCriteriaList

from envs.base import THINK_RE, Answer, ToolCall, parse_turn
from rl_agents.agent import Agent, AgentResult, AgentTurn
from rl_agents.runtime import Feed
from rl_agents.trajectory import (
    ANSWER_CLOSE,
    ANSWER_OPEN,
    END_OF_TURN,
    TOOL_CALL_CLOSE,
    TOOL_CALL_OPEN,
    conversation_ids,
)

log = logging.getLogger(__name__)
MAX_BODY_BYTES = 1 << 20


@dataclass
class ServeConfig:
    agent: str = MISSING
    """a saved policy directory with its agent card (``<run>/<stage>/policy``)"""
    host: str = "127.0.0.1"
    port: int = 8000
    model_name: str | None = None
    """the model's name in /v1/models and in requests; default: the directory's run and stage"""
    env_kwargs: dict[str, Any] = field(default_factory=dict)
    """the agent's environment's keywords over the card's (``++env_kwargs.fail_prob=0``)"""
    max_turns: int | None = None
    max_new_tokens: int | None = None
    tool_timeout_s: float = 30.0
    prefix_cache: int = 32
    """tool-calling mode: KV caches kept by token ids across requests (0: off)"""
    max_wall_s: float | None = 120.0
    """wall time of one agent-mode run (checked at the end of each turn)"""
    batch_size: int = 16
    """agent-mode episodes run at once (the runtime's slots); more requests wait for a free slot"""
    env_workers: int = 4
    """threads that run the tools while the model decodes for the other episodes"""
    max_pending: int = 256
    """requests in hand (running or waiting for the model); one more is refused with 429 (0: no limit)"""


ConfigStore.instance().store(name="serve_schema", node=ServeConfig)


class RequestError(Exception):
    """A request the server refuses, as OpenAI does: a status, a message, a type, a code."""

    def __init__(
        self,
        status: int,
        message: str,
        code: str | None = None,
        kind: str = "invalid_request_error",
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.code, self.kind, self.headers = status, message, code, kind, headers

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": None, "code": self.code}}


class PrefixCache:
    """Tool-calling mode's KV caches by token ids, so that a multi-turn conversation over HTTP does not re-encode
    its history at every request: the longest prefix a request shares with a cached one is reused (a copy, cut to that
    prefix), and each request's cache is kept under the ids it holds. At most ``entries`` caches, least recently
    used out first; 0 turns it off. ``hits``, ``misses`` and ``reused_tokens`` count what it saved."""

    def __init__(self, entries: int):
        self.entries = entries
        self.caches: OrderedDict[tuple[int, ...], Any] = OrderedDict()
        self.hits = self.misses = self.reused_tokens = 0

    def take(self, ids: list[int]):
        """A copy of the cache that shares the longest common prefix with ``ids``, cut to it (at least one token
        left to feed: a re-rendered turn may tokenize apart from the ids the model wrote), or None."""
        best, shared = None, 0
        for key in self.caches:
            n = _common_prefix(key, ids, len(ids) - 1)
            if n > shared:
                best, shared = key, n
        if best is None:
            self.misses += 1
            return None
        self.caches.move_to_end(best)
        cache = copy.deepcopy(self.caches[best])
        if cache.get_seq_length() > shared:
            cache.crop(shared - cache.get_seq_length())  # transformers 5 crops by a negative count
        self.hits += 1
        self.reused_tokens += shared
        return cache

    def put(self, ids: list[int], cache) -> None:
        if self.entries <= 0 or cache is None:
            return
        length = cache.get_seq_length()
        self.caches[tuple(ids[:length])] = cache
        self.caches.move_to_end(tuple(ids[:length]))
        while len(self.caches) > self.entries:
            self.caches.popitem(last=False)


class OwnTurns:
    """The ids of the turns this server wrote, by the ids before them and their text. A conversation that sends a
    turn back as it was written is fed the ids the model wrote, as the runtime feeds them, not the ids its text
    tokenizes to: they can differ (the model's ``8``, ``9`` where the tokenizer has ``89``) and change every later
    turn. At most ``entries`` turns, least recently used out first."""

    def __init__(self, entries: int = 4096):
        self.entries = entries
        self.turns: OrderedDict[tuple[int, int, str], list[int]] = OrderedDict()

    @staticmethod
    def _key(prefix: list[int], text: str) -> tuple[int, int, str]:
        return len(prefix), hash(tuple(prefix)), text

    def get(self, prefix: list[int], text: str) -> list[int] | None:
        key = self._key(prefix, text)
        if key not in self.turns:
            return None
        self.turns.move_to_end(key)
        return list(self.turns[key])

    def put(self, prefix: list[int], text: str, ids: list[int]) -> None:
        key = self._key(prefix, text)
        self.turns[key] = list(ids)
        self.turns.move_to_end(key)
        while len(self.turns) > self.entries:
            self.turns.popitem(last=False)


def _common_prefix(a, b, limit: int) -> int:
    n = min(len(a), len(b), limit)
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


@dataclass
class _Job:
    kind: str  # "agent", "turn" or "cancel" (the payload: the agent job whose client left)
    payload: Any
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    events: asyncio.Queue | None = None  # agent mode, streamed: each turn as it ends
    cancelled: bool = False  # its client left: a turn not started is skipped, a running one stops at its next token


class AgentServer:
    """The model's one thread and the HTTP app around it."""

    def __init__(self, agent: Agent, model_name: str, prefix_cache: int = 32, max_pending: int = 256):
        self.agent, self.model_name = agent, model_name
        self.max_pending, self.pending = max_pending, 0  # requests in hand; counted on the event loop's thread
        self.prefix_cache = PrefixCache(prefix_cache)
        self.own_turns = OwnTurns()
        self.jobs: queue.Queue[_Job | None] = queue.Queue()
        self._feed, self._waiting = Feed(), {}  # agent tasks on the runtime's slots, by their index in the feed
        self._stopping = False
        self.cancelled = 0  # agent episodes ended because their client left
        self.worker = threading.Thread(target=self._work, name="agent-model", daemon=True)
        self.worker.start()
        self.app = self._app()

    # --- the model's thread --------------------------------------------------------------------
    def _work(self) -> None:
        while not self._stopping:
            self._accept(self.jobs.get())
            if not self._feed.empty():
                self._run_agents()

    def _accept(self, job: _Job | None) -> None:
        """A request off the queue: a one-turn request runs now (between the running episodes' forward passes),
        an agent task joins the feed and starts in the next free slot."""
        if job is None:
            self._stopping = True
        elif job.kind == "cancel":  # a streamed request's client left: its episode ends at the next pass
            index = next((i for i, waiting in self._waiting.items() if waiting is job.payload), None)
            if index is not None:
                self._feed.cancel(index)
        elif job.kind == "turn":
            streamer = _TokenStreamer(job) if job.events is not None else None
            self._settle(job, self._one_turn, job.payload, streamer, lambda: job.cancelled)
        else:
            self._waiting[self._feed.add({"task": job.payload})] = job

    def _poll(self) -> None:
        """Before each forward pass of the running batch: take in the requests that arrived meanwhile."""
        self._settle_refused()
        while True:
            try:
                job = self.jobs.get_nowait()
            except queue.Empty:
                return
            self._accept(job)

    def _settle(self, job: _Job, fn, *args) -> None:
        try:
            result = fn(*args)
        except Exception as err:  # noqa: BLE001  (the request fails, the server goes on)
            job.loop.call_soon_threadsafe(_set_exception, job.future, err)
        else:
            job.loop.call_soon_threadsafe(_set_result, job.future, result)

    def _settle_refused(self) -> None:
        for index, err in list(self._feed.refused.items()):
            job = self._waiting.pop(index, None)
            if job is not None:
                refused = RequestError(400, f"the agent's environment refused the task: {err}", "task_refused")
                job.loop.call_soon_threadsafe(_set_exception, job.future, refused)

    def _run_agents(self) -> None:
        """The agent tasks on the runtime's slots until none runs and none waits; tasks that arrive meanwhile join
        the running batch (``Agent.stream``)."""
        waiting = self._waiting

        def on_turn(index: int, turn: AgentTurn, done: bool) -> None:
            job = waiting.get(index)
            if job is not None and job.events is not None:
                job.loop.call_soon_threadsafe(job.events.put_nowait, turn)

        try:
            for index, result in self.agent.stream(self._feed, self._poll, on_turn):
                self.cancelled += result.stop_reason == "cancelled"
                job = waiting.pop(index)
                job.loop.call_soon_threadsafe(_set_result, job.future, result)
            self._settle_refused()
        except Exception as err:  # noqa: BLE001  (those requests fail, the server goes on)
            log.exception("the agent's batch failed")
            for job in waiting.values():
                job.loop.call_soon_threadsafe(_set_exception, job.future, err)
        finally:
            self._feed, self._waiting = Feed(), {}

    def _one_turn(self, messages: list[dict[str, str]], streamer=None, cancelled=None) -> tuple[str, int, int]:
        """The model's next turn after ``messages`` (training format): its text, prompt and completion tokens;
        ``streamer`` hears each token as it is decoded; decoding stops at the first token after ``cancelled()``."""
        if cancelled is not None and cancelled():
            raise ClientLeft()
        tokenizer, model = self.agent.tokenizer, self.agent.model
        ids = conversation_ids(tokenizer, messages, self.own_turns.get)
        limit = self.agent.runtime.config.max_context
        new = self.agent.config.max_new_tokens
        if len(ids) + new > limit:
            raise RequestError(
                400,
                f"the conversation is {len(ids)} tokens and the turn may take {new}: over the model's context of "
                f"{limit} tokens",
                "context_length_exceeded",
            )
        eot = tokenizer.convert_tokens_to_ids(END_OF_TURN)
        with torch.no_grad(), self.agent.runtime.plain_attention():  # between a running batch's passes
            out = model.generate(
                torch.tensor([list(ids)], device=model.device),
                cache=self.prefix_cache.take(list(ids)),
                max_new_tokens=new,
                do_sample=False,
                eos_token_id=eot,
                pad_token_id=tokenizer.pad_token_id,
                return_dict_in_generate=True,
                streamer=streamer,
                stopping_criteria=StoppingCriteriaList([_Cancelled(cancelled)]) if cancelled else None,
            )
        if cancelled is not None and cancelled():
            raise ClientLeft()
        sequence = out.sequences[0].tolist()
        self.prefix_cache.put(sequence, out.cache)
        generated = sequence[len(ids) :]
        if generated and generated[-1] == eot:
            generated = generated[:-1]
        text = tokenizer.decode(generated, skip_special_tokens=False)
        self.own_turns.put(ids, text, generated + [eot])  # as the turn is fed back: ended, as agent_ids ends it
        return text, len(ids), len(generated)

    def close(self) -> None:
        self.jobs.put(None)
        self.worker.join(timeout=10)

    async def _submit(self, kind: str, payload: Any, stream: bool = False) -> _Job:
        if self.max_pending and self.pending >= self.max_pending:
            raise RequestError(
                429,
                f"the server has {self.pending} requests in hand, its limit (max_pending); retry shortly",
                "overloaded",
                "rate_limit_error",
                {"Retry-After": "1"},
            )
        loop = asyncio.get_running_loop()
        job = _Job(kind, payload, loop, loop.create_future(), asyncio.Queue() if stream else None)
        self.pending += 1
        job.future.add_done_callback(self._settled)
        self.jobs.put(job)
        return job

    def _settled(self, future: asyncio.Future) -> None:
        self.pending -= 1
        if not future.cancelled():
            future.exception()  # retrieved: the failure of a request whose client left has no one to raise into

    def _cancel(self, job: _Job) -> None:
        """The request's client left: its turn stops (or never starts), its agent episode ends at the next pass."""
        job.cancelled = True
        if job.kind == "agent":
            self.jobs.put(_Job("cancel", job, job.loop, job.future))

    async def _answer(self, job: _Job, request) -> Any:
        """A request's result, not streamed; if its client leaves first, the request is cancelled."""
        while not job.future.done():
            await asyncio.wait([job.future], timeout=0.5)
            if not job.future.done() and await request.is_disconnected():
                self._cancel(job)
                raise ClientLeft()
        return job.future.result()

    # --- HTTP ----------------------------------------------------------------------------------
    def _app(self):
        from fastapi import FastAPI, Request
        from fastapi.responses import JSONResponse, StreamingResponse

        app = FastAPI(title="rl_agents: a compiled agent")

        @app.exception_handler(RequestError)
        async def refused(request: Request, err: RequestError):
            return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

        @app.get("/health")
        async def health():
            c = self.prefix_cache
            counts = {"hits": c.hits, "misses": c.misses, "reused_tokens": c.reused_tokens}
            waiting = self._feed.waiting()
            episodes = {"running": len(self._waiting) - waiting, "waiting": waiting, "cancelled": self.cancelled}
            requests = {"pending": self.pending, "max_pending": self.max_pending}
            return {"status": "ok", "model": self.model_name, "prefix_cache": counts, "agent_episodes": episodes,
                    "requests": requests}  # fmt: skip

        @app.get("/v1/models")
        async def models():
            return {"object": "list", "data": [{"id": self.model_name, "object": "model", "created": 0,
                                                "owned_by": "rl_agents"}]}  # fmt: skip

        @app.post("/v1/chat/completions")
        async def chat(request: Request):
            body = await _json_body(request)
            if body.get("model") not in (None, self.model_name):
                raise RequestError(404, f"the model {body.get('model')!r} does not exist; this server serves "
                                        f"{self.model_name!r}", "model_not_found")  # fmt: skip
            messages = body.get("messages")
            if not isinstance(messages, list) or not messages:
                raise RequestError(400, "'messages' must be a non-empty list", "invalid_messages")
            if body.get("tools"):
                known = set(self.agent.declared)
                for tool in body["tools"]:
                    name = (tool.get("function") or {}).get("name") if isinstance(tool, dict) else None
                    if name not in known:
                        raise RequestError(400, f"the agent does not know the tool {name!r}; it was compiled with "
                                                f"{sorted(known)}", "unknown_tool")  # fmt: skip
                job = await self._submit("turn", _training_messages(messages), stream=bool(body.get("stream")))
                if job.events is None:
                    return JSONResponse(_turn_completion(self.model_name, *(await self._answer(job, request))))
                # the status waits for the turn to start, so that a refused request (over the context) is a 4xx
                started = asyncio.ensure_future(job.events.get())
                await asyncio.wait([started, job.future], return_when=asyncio.FIRST_COMPLETED)
                if not started.done():
                    started.cancel()
                    job.future.result()  # raises the refusal
                usage = bool((body.get("stream_options") or {}).get("include_usage"))
                cancel = partial(self._cancel, job)
                return StreamingResponse(_stream_turn(self.model_name, job, request, self.agent.tokenizer, usage,
                                                      cancel), media_type="text/event-stream")  # fmt: skip
            task = next((m.get("content") for m in reversed(messages) if m.get("role") == "user"), None)
            if not isinstance(task, str) or not task.strip():
                raise RequestError(400, "agent mode needs a user message with text content (the task)", "no_task")
            job = await self._submit("agent", task, stream=bool(body.get("stream")))
            if job.events is None:
                return JSONResponse(_agent_completion(self.model_name, await self._answer(job, request)))
            cancel = partial(self._cancel, job)
            return StreamingResponse(_stream(self.model_name, job, request, cancel), media_type="text/event-stream")

        return app


# --- request and response shapes ------------------------------------------------------------------
async def _json_body(request) -> dict[str, Any]:
    raw = await request.body()
    if len(raw) > MAX_BODY_BYTES:
        raise RequestError(413, f"the request is {len(raw)} bytes; the limit is {MAX_BODY_BYTES}", "request_too_large")
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise RequestError(400, f"the request body is not valid JSON: {err}", "invalid_json") from None
    if not isinstance(body, dict):
        raise RequestError(400, "the request body must be a JSON object", "invalid_json")
    return body


def _training_messages(messages: list[dict]) -> list[dict[str, str]]:
    """OpenAI messages as the training format's: user, assistant (a tool call as its ``<tool_call>`` text), and
    tool results as "tool" messages. The agent learned its tools, so a system message is not part of its format
    and is dropped."""
    out = []
    for m in messages:
        role, content = m.get("role"), m.get("content") or ""
        if not isinstance(content, str):
            content = "".join(part.get("text", "") for part in content if isinstance(part, dict))
        if role == "system":
            continue
        if role == "assistant" and m.get("tool_calls"):
            calls = []
            for call in m["tool_calls"]:
                fn = call.get("function", {})
                arguments = fn.get("arguments", "{}")
                try:
                    arguments = json.loads(arguments) if isinstance(arguments, str) else arguments
                except json.JSONDecodeError:
                    raise RequestError(
                        400, f"tool call arguments are not JSON: {arguments!r}", "invalid_tool_call"
                    ) from None
                calls.append(TOOL_CALL_OPEN + json.dumps({"name": fn.get("name"), "arguments": arguments})
                             + TOOL_CALL_CLOSE)  # fmt: skip
            content = content + "".join(calls)
        if role not in ("user", "assistant", "tool"):
            raise RequestError(400, f"unknown message role {role!r}", "invalid_role")
        out.append({"role": role, "content": content})
    if out and out[-1]["role"] == "assistant":
        raise RequestError(
            400, "the conversation ends with an assistant message: nothing to answer", "invalid_messages"
        )
    return out


def _ids() -> tuple[str, int]:
    return f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())


def _turn_message(text: str) -> tuple[dict[str, Any], str]:
    """The model's turn as OpenAI's assistant message and its finish reason: a tool call as ``tool_calls`` (the
    text before it as the content), an answer as its text, anything else (a malformed turn) as written."""
    parsed = parse_turn(text)
    if isinstance(parsed, ToolCall):
        call_id = f"call_{uuid.uuid4().hex[:24]}"
        thought = text.split(TOOL_CALL_OPEN, 1)[0]
        return {"role": "assistant", "content": thought or None, "tool_calls": [{
            "id": call_id, "type": "function",
            "function": {"name": parsed.name, "arguments": json.dumps(parsed.arguments)}}]}, "tool_calls"  # fmt: skip
    return {"role": "assistant", "content": parsed.text if isinstance(parsed, Answer) else text}, "stop"


def _turn_completion(model: str, text: str, prompt: int, completion: int) -> dict[str, Any]:
    message, finish = _turn_message(text)
    ident, created = _ids()
    return {"id": ident, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": message, "finish_reason": finish}],
            "usage": {"prompt_tokens": prompt, "completion_tokens": completion,
                      "total_tokens": prompt + completion}}  # fmt: skip


def _agent_completion(model: str, result: AgentResult) -> dict[str, Any]:
    ident, created = _ids()
    return {"id": ident, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": result.answer or ""},
                         "finish_reason": "stop" if result.answer is not None else "length"}],
            "agent_turns": [asdict(t) for t in result.turns], "stop_reason": result.stop_reason,
            "refused": result.refused, "latency_ms": result.latency_ms}  # fmt: skip


def _chunker(model: str):
    """``chunk(delta, finish, **extra)``: one streamed completion's server-sent events in OpenAI's chunk format,
    all with its id and time; ``delta=None`` gives a chunk without choices (the usage chunk)."""
    ident, created = _ids()

    def chunk(delta: dict | None, finish: str | None = None, **extra) -> str:
        choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish}]
        data = {"id": ident, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": choices, **extra}  # fmt: skip
        return f"data: {json.dumps(data)}\n\n"

    return chunk


def _error_event(err: Exception) -> str:
    """A failure after the stream began, as OpenAI's error body in an event (a refusal keeps its own)."""
    refusal = err if isinstance(err, RequestError) else RequestError(500, str(err), kind="server_error")
    return f"data: {json.dumps(refusal.body())}\n\n"


async def _stream(model: str, job: _Job, request, cancel):
    """Server-sent events: a chunk per turn as it ends (``agent_turn``), the answer, ``[DONE]``."""
    chunk = _chunker(model)
    yield chunk({"role": "assistant", "content": ""})
    try:
        while not job.future.done() or not job.events.empty():
            if await request.is_disconnected():
                return
            try:
                turn = await asyncio.wait_for(job.events.get(), timeout=0.5)
            except TimeoutError:
                continue
            yield chunk({}, agent_turn=asdict(turn))
    finally:  # the client left (seen here, or the server cancelled this stream): its episode ends, its slot is freed
        if not job.future.done():
            cancel()
    try:
        result = job.future.result()
    except Exception as err:  # noqa: BLE001
        yield _error_event(err)
        return
    yield chunk({"content": result.answer or ""})
    yield chunk({}, "stop" if result.answer is not None else "length", stop_reason=result.stop_reason)
    yield "data: [DONE]\n\n"


class ClientLeft(RequestError):
    """The request's client disconnected before its answer (nginx's 499: the status no one reads)."""

    def __init__(self):
        super().__init__(499, "the client closed the request", "client_closed_request")


class _Cancelled(StoppingCriteria):
    """``generate`` stops at the next token once ``cancelled()`` (the request's client left)."""

    def __init__(self, cancelled):
        self.cancelled = cancelled

    def __call__(self, input_ids, scores, **kwargs) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), self.cancelled(), dtype=torch.bool, device=input_ids.device)


class _TokenStreamer:
    """``generate``'s streamer for a streamed one-turn request: each decoded token to the request's events (the
    prompt, which ``generate`` hands over first, as the marker that the turn started)."""

    def __init__(self, job: _Job):
        self.job = job

    def put(self, value: torch.Tensor) -> None:
        self.job.loop.call_soon_threadsafe(self.job.events.put_nowait, value.reshape(-1).tolist())

    def end(self) -> None:
        pass


def _answer_so_far(text: str) -> str | None:
    """The answer a turn has written so far (what ``parse_turn`` would give once it closes), without trailing
    white space that more text may yet continue; None before ``<answer>`` or once a tool call opened."""
    body = THINK_RE.sub("", text)
    at = body.find(ANSWER_OPEN)
    if at < 0 or TOOL_CALL_OPEN in body[:at]:
        return None
    answer = body[at + len(ANSWER_OPEN) :].split(ANSWER_CLOSE, 1)[0]
    return answer.strip() if ANSWER_CLOSE in body[at:] else answer.lstrip().rstrip()


async def _stream_turn(model: str, job: _Job, request, tokenizer, usage: bool, cancel):
    """Tool-calling mode, streamed as OpenAI streams: an answer's text as it is decoded, a tool call whole (its
    name and arguments in one ``tool_calls`` delta) when the turn ends, then the finish reason and ``[DONE]``. The
    content and calls add up to the unstreamed reply's (but for a turn that opens an answer and never closes it:
    its text streams, and the whole reply is the malformed turn as written)."""
    chunk = _chunker(model)
    yield chunk({"role": "assistant", "content": ""})
    ids, sent = [], ""
    while not job.future.done() or not job.events.empty():
        if await request.is_disconnected():  # the client left: the turn stops at its next token
            cancel()
            return
        try:
            ids += await asyncio.wait_for(job.events.get(), timeout=0.5)
        except TimeoutError:
            continue
        answer = _answer_so_far(tokenizer.decode(ids, skip_special_tokens=False))
        if answer is not None and answer.startswith(sent) and len(answer) > len(sent):
            yield chunk({"content": answer[len(sent) :]})
            sent = answer
    try:
        text, prompt, completion = job.future.result()
    except Exception as err:  # noqa: BLE001
        yield _error_event(err)
        return
    message, finish = _turn_message(text)
    content = message["content"] or ""
    if content.startswith(sent) and len(content) > len(sent):
        yield chunk({"content": content[len(sent) :]})
    for index, call in enumerate(message.get("tool_calls", [])):
        yield chunk({"tool_calls": [{"index": index, **call}]})
    yield chunk({}, finish)
    if usage:
        counts = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
        yield chunk(None, usage=counts)
    yield "data: [DONE]\n\n"


def _set_result(future: asyncio.Future, value: Any) -> None:
    if not future.done():
        future.set_result(value)


def _set_exception(future: asyncio.Future, err: BaseException) -> None:
    if not future.done():
        future.set_exception(err)


class Background:
    """``server.app`` on 127.0.0.1 (a free port) in a uvicorn thread, for tests and the load test:
    ``with Background(app) as base_url: ...``."""

    def __init__(self, app):
        import socket

        import uvicorn

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.uvicorn = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.uvicorn.run, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.uvicorn.started and time.monotonic() < deadline:
            time.sleep(0.05)
        return f"http://127.0.0.1:{self.port}"

    def __exit__(self, *exc) -> None:
        self.uvicorn.should_exit = True
        self.thread.join(timeout=10)


def build_server(cfg: DictConfig | ServeConfig) -> AgentServer:
    agent = Agent.from_pretrained(
        cfg.agent, env_kwargs=dict(cfg.env_kwargs), max_turns=cfg.max_turns, max_new_tokens=cfg.max_new_tokens,
        tool_timeout_s=cfg.tool_timeout_s, batch_size=cfg.batch_size, max_wall_s=cfg.max_wall_s,
        env_workers=cfg.env_workers,
    )  # fmt: skip
    path = Path(cfg.agent).resolve()
    name = cfg.model_name or f"{path.parent.parent.name}/{path.parent.name}"
    return AgentServer(agent, name, cfg.prefix_cache, cfg.max_pending)


@hydra.main(version_base="1.3", config_path="pkg://rl_agents.conf", config_name="serve")
def main(cfg: DictConfig) -> None:
    try:
        import uvicorn
    except ImportError:
        raise SystemExit("rl_agents.serve needs FastAPI and uvicorn: pip install 'rl_agents[serve]'") from None
    server = build_server(cfg)
    log.info("serving %s (%s) on http://%s:%d/v1", server.model_name, cfg.agent, cfg.host, cfg.port)
    try:
        uvicorn.run(server.app, host=cfg.host, port=cfg.port, log_level="info")
    finally:
        server.close()


if __name__ == "__main__":
    main()
