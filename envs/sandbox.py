"""Run code a model wrote, in a separate process that cannot harm the host or the trainer.

``run_calls(code, function, calls)`` executes ``code`` in a child Python process and calls ``function`` on
each argument list, returning each call's value or error. The layers, outermost first:

- **namespaces**: when ``unshare`` can create them (root, or unprivileged user namespaces), the child has
  no network (an empty network namespace) and its own PID namespace, so every process it starts dies
  with it;
- **process group**: the child leads a new session; on the wall-time limit, and always at the end, the
  whole group is killed with SIGKILL;
- **dies with its parent**: the child's stdin is a pipe whose write end only the parent holds; when the
  parent dies (even by SIGKILL) the child reads end of file, removes its directory and exits;
- **resource limits** (``setrlimit`` in the child): CPU seconds, address space, file size (which also caps
  its output), open files, no core dumps, no new processes (for non-root users);
- **an audit hook** (PEP 578) installed before the code runs: no processes (``os.system``, ``fork``,
  ``subprocess``, ``exec``, ``posix_spawn``), no signals to other processes, no sockets, no ``ctypes``,
  no reads outside its temporary directory and the standard library, no writes, deletes or renames
  outside its temporary directory;
- **isolation**: ``python -I -S -B`` (no environment variables, no site-packages, no bytecode writes), an
  empty environment, a fresh temporary directory as working directory, deleted afterwards.

The expected results never enter the child: it returns values, and the caller compares them, so code
cannot forge a pass by writing fake results.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

HARNESS = Path(__file__).with_name("sandbox_harness.py")


@dataclass
class SandboxLimits:
    wall_s: float = 5.0
    """wall-clock limit of the whole run; the process group is killed after it"""
    cpu_s: int = 2
    """CPU seconds (RLIMIT_CPU)"""
    memory_mb: int = 256
    """address space (RLIMIT_AS)"""
    file_bytes: int = 1_000_000
    """largest file the code may write, its captured output included (RLIMIT_FSIZE)"""
    output_chars: int = 2000
    """captured stdout/stderr returned to the caller"""


@dataclass
class SandboxResult:
    outcomes: list[dict[str, Any]] = field(default_factory=list)
    """one per finished call: {"value": v} (JSON-able), {"value_repr": r} or {"error": "Type: message"}"""
    load_error: str | None = None
    """the code did not run (syntax error, exception at import, no such function)"""
    killed: str | None = None
    """why the process ended early: "timeout" (wall), "cpu" (CPU limit), "signal N", "exit N"; else None"""
    output: str = ""
    wall_s: float = 0.0
    isolation: str = "none"


@functools.cache
def isolation_prefix() -> tuple[str, ...]:
    """The ``unshare`` command line that gives the child no network and its own PID namespace, if possible."""
    if shutil.which("unshare") is None or not sys.platform.startswith("linux"):
        return ()
    for prefix in (
        ("unshare", "--net", "--pid", "--fork", "--kill-child"),
        ("unshare", "--user", "--map-root-user", "--net", "--pid", "--fork", "--kill-child"),
    ):
        try:
            probe = subprocess.run([*prefix, "true"], capture_output=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if probe.returncode == 0:
            return prefix
    return ()


def run_calls(code: str, function: str, calls: list[list[Any]], limits: SandboxLimits | None = None) -> SandboxResult:
    """Run ``code`` in the sandbox and call ``function(*args)`` for each ``args`` in ``calls``."""
    limits = limits or SandboxLimits()
    workdir = Path(tempfile.mkdtemp(prefix="rl_agents_sandbox_"))
    prefix = isolation_prefix()
    result = SandboxResult(isolation="namespaces" if prefix else "process")
    start = time.perf_counter()
    try:
        job = {"code": code, "function": function, "calls": calls, "limits": asdict(limits)}
        (workdir / "input.json").write_text(json.dumps(job))
        with open(workdir / "output.txt", "wb") as out:
            proc = subprocess.Popen(
                [*prefix, sys.executable, "-I", "-S", "-B", str(HARNESS)],
                cwd=workdir,
                env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"},
                stdin=subprocess.PIPE,  # never written: its end of file tells the child the parent is gone
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            try:
                returncode = proc.wait(timeout=limits.wall_s)
            except subprocess.TimeoutExpired:
                returncode = None
            finally:
                _kill_group(proc)
        result.wall_s = time.perf_counter() - start
        if returncode is None:
            result.killed = "timeout"
        elif returncode in (-signal.SIGXCPU, 128 + signal.SIGXCPU):
            result.killed = "cpu"
        elif returncode < 0:
            result.killed = f"signal {-returncode}"
        elif returncode != 0:
            result.killed = f"exit {returncode}"
        result.output = _read_head(workdir / "output.txt", limits.output_chars)
        for line in _read_head(workdir / "results.jsonl", limits.file_bytes).splitlines()[: len(calls) + 1]:
            try:
                outcome = json.loads(line)
            except json.JSONDecodeError:
                break
            if not isinstance(outcome, dict):
                break
            if "load_error" in outcome:
                result.load_error = str(outcome["load_error"])
                break
            result.outcomes.append(outcome)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return result


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()
    if proc.stdin is not None:
        proc.stdin.close()


def _read_head(path: Path, limit: int) -> str:
    try:
        with open(path, "rb") as f:
            return f.read(limit).decode("utf-8", errors="replace")
    except OSError:
        return ""
