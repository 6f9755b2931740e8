"""A local OpenAI-compatible chat-completions server that solves Calculator-v0, with injected faults.

The "model" calls the calculator with the expression in the task, calls it again after an error, and answers
with the tool's result. ``fault(n, body)`` (n: the request's number from 1) picks what the server does with
each request: ``None`` (answer), ``"500"``, ``"401"``, ``"stall"`` (sleep ``stall_s`` first), ``"prose"``
(a reply in prose, not the format) or ``"malformed"`` (a tool call with broken JSON).
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

EXPRESSION = re.compile(r"\d[\d\s+\-*/()]*\d|\d")


def solve(messages: list[dict]) -> str:
    task = next(m["content"] for m in messages if m["role"] == "user")
    last = messages[-1]["content"]
    if "<tool_response>" in last and "ERROR" not in last:
        result = last.split("<tool_response>\n", 1)[1].split("\n</tool_response>", 1)[0]
        return f"<answer>{result}</answer>"
    expression = max(EXPRESSION.findall(task), key=len).strip()
    return "<tool_call>" + json.dumps({"name": "calculator", "arguments": {"expression": expression}}) + "</tool_call>"


class FakeLLM:
    """``with FakeLLM(fault) as llm:`` serves on ``llm.base_url``; ``llm.requests`` counts what arrived."""

    def __init__(
        self, fault: Callable[[int, dict], str | None] = lambda n, body: None, stall_s: float = 2.0, port: int = 0
    ):
        self.fault, self.stall_s = fault, stall_s
        self.requests = 0
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_POST(self):  # noqa: N802  (http.server's name)
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    server.requests += 1
                    n = server.requests
                action = server.fault(n, body)
                if action == "stall":
                    time.sleep(server.stall_s)
                if action in ("500", "401"):
                    self._send(int(action), {"error": {"message": f"injected {action}", "type": "server_error"}})
                    return
                text = {"prose": "Let me think. The answer is probably 42.",
                        "malformed": '<tool_call>{"name": "calculator", "arguments": </tool_call>'}.get(
                    action, solve(body["messages"]))  # fmt: skip
                prompt = sum(len(m["content"]) for m in body["messages"]) // 4
                self._send(200, {
                    "id": f"chatcmpl-{n}", "object": "chat.completion", "created": 0, "model": body["model"],
                    "choices": [{"index": 0, "finish_reason": "stop",
                                 "message": {"role": "assistant", "content": text}}],
                    "usage": {"prompt_tokens": prompt, "completion_tokens": len(text) // 4,
                              "total_tokens": prompt + len(text) // 4},
                })  # fmt: skip

            def _send(self, status: int, payload: dict) -> None:
                data = json.dumps(payload).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the client timed out and left
                    pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.base_url = f"http://127.0.0.1:{self.port}/v1"

    def __enter__(self) -> FakeLLM:
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
