"""The code sandbox against hostile code: each case is contained, the host and this process are unharmed."""

import os
import time
from pathlib import Path

import gymnasium as gym

from envs.sandbox import SandboxLimits, isolation_prefix, run_calls

LIMITS = SandboxLimits(wall_s=3.0, cpu_s=1, memory_mb=256)


def run(code: str, calls=([1],), limits=LIMITS):
    start = time.perf_counter()
    result = run_calls(code, "f", [list(c) for c in calls], limits)
    return result, time.perf_counter() - start


def errors(result) -> list[str]:
    return [o.get("error", "") for o in result.outcomes] + ([result.load_error] if result.load_error else [])


def test_well_behaved_code_returns_values():
    result, _ = run("import math\ndef f(x):\n    return [math.isqrt(x * 16), str(x)]", calls=([4], [9]))
    assert result.outcomes == [{"value": [8, "4"]}, {"value": [12, "9"]}]
    assert result.killed is None and result.load_error is None


def test_syntax_errors_and_exceptions_are_reported_per_call():
    result, _ = run("def f(x) return 1")
    assert result.load_error.startswith("SyntaxError")
    result, _ = run("def f(x):\n    return 10 // x", calls=([2], [0]))
    assert result.outcomes[0] == {"value": 5}
    assert result.outcomes[1]["error"].startswith("ZeroDivisionError")


def test_infinite_loop_is_stopped_by_the_cpu_limit():
    result, seconds = run("def f(x):\n    while True:\n        pass", calls=([1], [2]))
    assert seconds < LIMITS.wall_s + 1
    assert "CPU time limit" in result.outcomes[0]["error"]
    assert len(result.outcomes) == 1  # the budget is spent: the second call does not run


def test_sleeping_code_is_killed_at_the_wall_limit_with_its_process_group():
    code = "import time\ndef f(x):\n    time.sleep(60)"
    result, seconds = run(code, limits=SandboxLimits(wall_s=1.0, cpu_s=1))
    assert result.killed == "timeout" and result.outcomes == []
    assert seconds < 3


def test_fork_bomb_cannot_start_a_process(tmp_path):
    before = len(os.listdir("/proc"))
    result, seconds = run("import os\ndef f(x):\n    while True:\n        os.fork()")
    assert "os.fork is not allowed" in errors(result)[0]
    assert seconds < LIMITS.wall_s
    assert len(os.listdir("/proc")) < before + 20  # no process explosion on the host


def test_os_system_and_subprocess_are_refused(tmp_path):
    marker = tmp_path / "pwned"
    result, _ = run(f"import os\ndef f(x):\n    return os.system('touch {marker}')")
    assert "os.system is not allowed" in errors(result)[0]
    result, _ = run(f"import subprocess\ndef f(x):\n    subprocess.run(['touch', '{marker}'])")
    assert "not allowed" in errors(result)[0]
    result, _ = run(f"import os\ndef f(x):\n    os.execv('/usr/bin/touch', ['touch', '{marker}'])")
    assert "not allowed" in errors(result)[0]
    assert not marker.exists()


def test_huge_output_is_capped_and_harmless():
    result, seconds = run("def f(x):\n    while True:\n        print('x' * 100000)")
    assert "File too large" in errors(result)[0]
    assert len(result.output) <= LIMITS.output_chars
    assert seconds < LIMITS.wall_s


def test_host_files_cannot_be_read(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("top secret")
    for path in ("/etc/passwd", str(secret), os.path.abspath(__file__)):
        result, _ = run(f"def f(x):\n    return open({path!r}).read()")
        assert "cannot read" in errors(result)[0], path
    result, _ = run("import os\ndef f(x):\n    return os.listdir('/')")
    assert "not allowed" in errors(result)[0]


def test_files_outside_the_sandbox_cannot_be_written_or_deleted(tmp_path):
    keep = tmp_path / "keep.txt"
    keep.write_text("data")
    folder = tmp_path / "folder"
    folder.mkdir()
    cases = [
        f"import os\ndef f(x):\n    os.remove({str(keep)!r})",
        f"import os\ndef f(x):\n    os.rename({str(keep)!r}, 'stolen.txt')",
        f"import shutil\ndef f(x):\n    shutil.rmtree({str(folder)!r})",
        f"def f(x):\n    open({str(keep)!r}, 'w').write('overwritten')",
        f"def f(x):\n    open({str(tmp_path / 'new.txt')!r}, 'x')",
    ]
    for code in cases:
        result, _ = run(code)
        assert "not allowed" in errors(result)[0] or "cannot write" in errors(result)[0], code
    assert keep.read_text() == "data" and folder.is_dir() and not (tmp_path / "new.txt").exists()


def test_the_code_may_use_its_own_temporary_directory_which_is_deleted_afterwards():
    result, _ = run(
        "import os\ndef f(x):\n    open('notes.txt', 'w').write('hi')\n"
        "    return [open('notes.txt').read(), os.getcwd()]"
    )
    text, cwd = result.outcomes[0]["value"]
    assert text == "hi" and not os.path.exists(cwd)


def test_sockets_and_native_code_are_refused():
    result, _ = run("import socket\ndef f(x):\n    socket.create_connection(('1.1.1.1', 80), timeout=1)")
    assert "not allowed" in errors(result)[0]
    result, _ = run("import ctypes\ndef f(x):\n    return 1")
    assert "not allowed" in errors(result)[0]


def test_signals_to_other_processes_are_refused():
    result, _ = run(f"import os\ndef f(x):\n    os.kill({os.getpid()}, 9)")
    assert "os.kill is not allowed" in errors(result)[0]


def test_memory_bomb_hits_the_memory_limit():
    result, _ = run("def f(x):\n    return len([0] * (10 ** 9))")
    assert errors(result)[0].startswith("MemoryError")


def test_the_result_says_which_isolation_was_used():
    result, _ = run("def f(x):\n    return 1")
    assert result.isolation == ("namespaces" if isolation_prefix() else "process")


def test_hostile_submissions_only_fail_their_episode():
    env = gym.make("Code-v0", cpu_s=1, wall_s=2.0)
    task, _ = env.reset(seed=0)
    name = env.unwrapped.problem.name
    for body in ("while True: pass", "import os; os.system('echo hi')", "print('x' * 10**7)"):
        code = f"def {name}(*args):\n    {body}"
        obs, reward, terminated, truncated, info = env.step(
            '<tool_call>{"name": "run_tests", "arguments": {"code": '
            + __import__("json").dumps(code)
            + "}}</tool_call>"
        )
        assert obs.startswith("passed 0/") and not terminated and info["error"] is None, obs


def _harnesses() -> set[int]:
    found = set()
    for entry in os.listdir("/proc"):
        try:
            if entry.isdigit() and b"sandbox_harness.py" in open(f"/proc/{entry}/cmdline", "rb").read():
                found.add(int(entry))
        except OSError:
            pass
    return found


def test_the_sandbox_dies_with_its_parent_and_leaves_no_directory(tmp_path):
    """kill -9 of the process stepping Code-v0 must not leave its sandboxed child sleeping forever."""
    import signal
    import subprocess
    import sys
    import tempfile

    before = _harnesses()
    script = (
        "from envs.sandbox import SandboxLimits, run_calls\n"
        "run_calls('import time\\ndef f():\\n    time.sleep(600)', 'f', [[]], SandboxLimits(wall_s=600))\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", script], cwd=Path(__file__).resolve().parents[1])
    deadline = time.monotonic() + 30
    while not (_harnesses() - before) and time.monotonic() < deadline:
        time.sleep(0.1)
    children = _harnesses() - before
    assert children, "the sandbox never started"
    # this sandbox's own directory (the harness runs in it): other tests' sandboxes come and go beside it
    dirs = {Path(os.readlink(f"/proc/{pid}/cwd")) for pid in children}
    tmp = Path(tempfile.gettempdir()).resolve()
    assert all(d.name.startswith("rl_agents_sandbox_") and d.parent == tmp for d in dirs)
    assert all(d.exists() for d in dirs)
    time.sleep(0.5)  # the child is sleeping inside the code now
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + 10
    while _harnesses() & children and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _harnesses() & children, "the sandbox outlived its parent"
    assert not any(d.exists() for d in dirs), "the sandbox left its directory"
