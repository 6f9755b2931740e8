"""The process that runs untrusted code for ``envs.sandbox`` (standard library only; run as a script).

It reads ``input.json`` from its working directory (a fresh temporary directory), lowers its own resource
limits, installs an audit hook that refuses everything outside the sandbox's contract, then executes the
code and calls the named function on each test input. Each call's outcome is written as one JSON line to
``results.jsonl`` as soon as it is known, so a call that hangs still leaves the earlier ones. The parent
compares the returned values with the expected ones: the expected values never enter this process.
"""

import json
import os
import resource
import shutil
import signal
import sys
import sysconfig
import threading

WORKDIR = os.path.realpath(os.getcwd())
READABLE = [WORKDIR] + sorted(
    {os.path.realpath(p) for p in (sysconfig.get_paths()["stdlib"], sysconfig.get_paths()["platstdlib"])}
)
# events refused outright: processes, signals to others, network, native code, new audit hooks
BLOCKED_EVENTS = {
    "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty", "subprocess.Popen",
    "os.kill", "os.killpg", "pty.spawn", "socket.__new__", "socket.connect", "socket.bind",
    "socket.getaddrinfo", "socket.gethostbyname", "ctypes.dlopen", "ctypes.dlsym", "ctypes.cdata",
    "ctypes.call_function", "sys.addaudithook", "resource.setrlimit", "resource.prlimit", "mmap.__new__",
    "os.setuid", "os.setgid", "os.chroot", "sys.remote_exec",
}  # fmt: skip
BLOCKED_MODULES = {
    "ctypes", "_ctypes", "socket", "_socket", "ssl", "_ssl", "subprocess", "_posixsubprocess",
    "multiprocessing", "_multiprocessing", "mmap", "pty", "fcntl", "signal", "_signal", "asyncio", "selectors",
}  # fmt: skip
# events whose first argument is a path that must stay inside the working directory
PATH_EVENTS = {
    "os.remove", "os.rmdir", "os.rename", "os.mkdir", "os.chmod", "os.chown", "os.symlink", "os.link",
    "os.truncate", "os.utime", "os.listdir", "os.scandir", "os.chdir", "shutil.rmtree", "shutil.copyfile",
    "shutil.move", "os.chflags", "os.lchown", "os.mkfifo", "os.mknod", "os.setxattr", "os.removexattr",
}  # fmt: skip
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def _inside(path, roots) -> bool:
    if isinstance(path, int):  # a file descriptor this process already holds
        return True
    try:
        real = os.path.realpath(os.path.join(WORKDIR, os.fsdecode(path)))
    except (TypeError, ValueError):
        return False
    return any(real == root or real.startswith(root + os.sep) for root in roots)


def _hook(event, args):
    if event in BLOCKED_EVENTS:
        raise PermissionError(f"sandbox: {event} is not allowed")
    if event == "import" and str(args[0]).split(".")[0] in BLOCKED_MODULES:
        raise PermissionError(f"sandbox: importing {args[0]} is not allowed")
    if event == "open":
        path, mode, flags = args
        writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or bool((flags or 0) & WRITE_FLAGS)
        if path is not None and not _inside(path, [WORKDIR] if writing else READABLE):
            raise PermissionError(f"sandbox: cannot {'write' if writing else 'read'} {path!r}")
    elif event in PATH_EVENTS:
        for path in args[:2] if event in ("os.rename", "os.symlink", "os.link", "shutil.move") else args[:1]:
            if path is not None and not _inside(path, [WORKDIR]):
                raise PermissionError(f"sandbox: {event} outside the sandbox directory is not allowed")


def _limit(which, soft, hard=None) -> None:
    try:
        resource.setrlimit(which, (soft, soft if hard is None else hard))
    except (ValueError, OSError):
        pass


class CPULimit(BaseException):
    """Raised in the running call when the CPU-time soft limit is reached (SIGXCPU)."""


def _on_sigxcpu(signum, frame):
    raise CPULimit()


def _encode(value):
    try:
        return {"value": json.loads(json.dumps(value))}
    except (TypeError, ValueError, RecursionError):
        return {"value_repr": repr(value)[:200]}


def _die_with_parent() -> None:
    """The parent holds the only write end of our stdin: end of file means it is gone (killed, crashed), so
    this process removes its directory and exits rather than run on, orphaned, with its CPU limit idle."""

    def watch() -> None:
        try:
            while os.read(0, 1024):
                pass
        except OSError:
            pass
        shutil.rmtree(WORKDIR, ignore_errors=True)
        os._exit(137)

    threading.Thread(target=watch, daemon=True).start()


def main() -> None:
    with open("input.json") as f:
        job = json.load(f)
    _die_with_parent()  # before RLIMIT_NPROC, which also counts threads
    limits = job["limits"]
    results = open("results.jsonl", "w", buffering=1)  # opened before the hook; line-buffered
    signal.signal(signal.SIGXCPU, _on_sigxcpu)  # soft limit: end the call cleanly; hard limit: SIGKILL
    _limit(resource.RLIMIT_CPU, int(limits["cpu_s"]), int(limits["cpu_s"]) + 1)
    _limit(resource.RLIMIT_AS, int(limits["memory_mb"]) * 2**20)
    _limit(resource.RLIMIT_FSIZE, int(limits["file_bytes"]))
    _limit(resource.RLIMIT_NOFILE, 32)
    _limit(resource.RLIMIT_CORE, 0)
    _limit(resource.RLIMIT_NPROC, 0)  # no new processes (not enforced for root: the audit hook refuses them)
    sys.setrecursionlimit(2000)
    dumps = json.dumps
    sys.addaudithook(_hook)
    namespace = {"__name__": "solution"}
    cpu_message = f"TimeoutError: the CPU time limit ({limits['cpu_s']} s) was reached"
    try:
        exec(compile(job["code"], "solution.py", "exec"), namespace)
        fn = namespace.get(job["function"])
        if not callable(fn):
            raise NameError(f"the code defines no function {job['function']!r}")
    except CPULimit:
        results.write(dumps({"load_error": cpu_message}) + "\n")
        return
    except BaseException as err:  # noqa: BLE001 - anything the code does is reported, never raised
        results.write(dumps({"load_error": f"{type(err).__name__}: {err}"[:300]}) + "\n")
        return
    for args in job["calls"]:
        try:
            outcome = _encode(fn(*args))
        except CPULimit:
            results.write(dumps({"error": cpu_message}) + "\n")
            return  # the CPU budget is spent: the remaining calls do not run
        except BaseException as err:  # noqa: BLE001
            outcome = {"error": f"{type(err).__name__}: {err}"[:300]}
        results.write(dumps(outcome) + "\n")


if __name__ == "__main__":
    try:
        main()
        sys.stdout.flush()
        sys.stderr.flush()
    except BaseException:  # noqa: BLE001 - a full output file; the results are already written
        pass
    os._exit(0)  # skip interpreter teardown: nothing the code registered (atexit, __del__) runs after the tests
