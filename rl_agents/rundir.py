"""The run dir, made safe to kill, resume and share.

- **Atomic writes.** Every file or directory a later stage or a resume reads is written under a temporary
  name in the same directory, flushed to disk (fsync) and renamed into place: a kill leaves the old
  version or the new one, never half of one (``write_text``, ``open_atomic``, ``atomic_dir``).
- **Stage records.** ``<run_dir>/stages/<stage>.json`` says what a stage was made from and what it made:
  the config keys it depends on, the digests of its inputs and of its outputs. It is written when the stage
  starts (``"status": "started"``) and again, last, when it ends (``"done"``). A stage is finished only
  when its done record matches the files on disk and the current inputs (``finished``); a resume with a
  changed key is refused with the key named (``check_stage``).
- **A lock.** ``<run_dir>/.lock`` holds an exclusive ``flock`` for the life of the run and names its owner
  (pid, host, start time): a second run into the same dir stops at once with that name. The kernel drops
  the lock when its process dies, so a stale lock file never blocks anything.
- **Whole checkpoints.** ``complete_checkpoints`` lists only checkpoints whose files are all there and
  whose state file parses; ``last_checkpoint`` removes the others before a resume. ``check_free_space``
  refuses to start a save that the disk cannot hold, and ``disk_full_error`` turns the errors a full disk
  raises (``ENOSPC``, torch's ``unexpected pos``) into a message that says so.

``RL_AGENTS_KILL_AT=<point>`` makes the process kill itself with SIGKILL when it reaches a named point
(``kill_point``): the fault-injection tests use it to interrupt a run exactly where a crash would.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import shutil
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from transformers import TrainerCallback

log = logging.getLogger(__name__)

# what a run writes into its dir (Hydra's own .hydra/ and <job>.log are not ours)
ARTIFACTS = ("config.yaml", "stages", "trajectories", "model", "bc", "rl", "eval", "eval.json", "wandb")

# the config keys each stage's output depends on (a stage also depends on everything its inputs depend on)
STAGE_KEYS = {
    "collect": ("seed", "env", "teacher", "collect", "runtime.max_turns"),
    "bc": ("seed", "model", "peft", "bc"),
    "dagger": ("seed", "env", "teacher", "dagger", "runtime", "bc"),
    "rl": ("seed", "algo", "rl", "runtime", "peft"),
}


class RunDirError(RuntimeError):
    """A run dir that cannot be used as asked (busy, already holding a run, changed since a stage ran)."""


class DiskFullError(OSError):
    """The disk filled up (or would have) while writing something a resume needs."""


# --- fault injection ----------------------------------------------------------------------------
def kill_point(name: str) -> None:
    """SIGKILL this process if ``RL_AGENTS_KILL_AT`` names this point (fault-injection tests only)."""
    if os.environ.get("RL_AGENTS_KILL_AT") == name:
        log.warning("RL_AGENTS_KILL_AT=%s: killing this process", name)
        for handler in logging.getLogger().handlers:
            handler.flush()
        os.kill(os.getpid(), signal.SIGKILL)


# --- atomic writes ------------------------------------------------------------------------------
def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _temporary(path: Path) -> Path:
    return path.parent / f".{path.name}.tmp-{os.getpid()}"


@contextlib.contextmanager
def open_atomic(path: str | Path, mode: str = "w") -> Iterator[Any]:
    """A file opened for writing under a temporary name; on a clean exit it is fsynced and renamed to
    ``path``, on an error it is removed (``path`` keeps its old content)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary(path)
    with disk_full_reported(path):
        try:
            with tmp.open(mode) as f:
                yield f
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
            _fsync_dir(path.parent)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise


def write_text(path: str | Path, text: str) -> None:
    """``Path.write_text``, atomic."""
    with open_atomic(path) as f:
        f.write(text)


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """A directory to fill (``save_pretrained(tmp)``), moved to ``path`` on a clean exit: ``path`` is
    either the old directory or the whole new one. The old one, if any, is removed after the swap."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary(path)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    with disk_full_reported(path):
        try:
            yield tmp
            for file in tmp.rglob("*"):
                if file.is_file():
                    with file.open("rb") as f:
                        os.fsync(f.fileno())
            old = path.parent / f".{path.name}.old-{os.getpid()}"
            if path.exists():
                os.replace(path, old)
            os.replace(tmp, path)
            _fsync_dir(path.parent)
            shutil.rmtree(old, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


def clean_temporaries(run_dir: Path) -> None:
    """Remove what interrupted atomic writes left (``.<name>.tmp-<pid>``, ``.<name>.old-<pid>``)."""
    for stale in [*run_dir.rglob(".*.tmp-*"), *run_dir.rglob(".*.old-*")]:
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)


# --- a full disk --------------------------------------------------------------------------------
def _is_disk_full(err: BaseException) -> bool:
    if isinstance(err, DiskFullError):
        return False  # already explained
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    # torch.save on a full disk: "[enforce fail at inline_container.cc:...] unexpected pos" / "file write failed"
    text = str(err)
    return isinstance(err, RuntimeError) and ("unexpected pos" in text or "file write failed" in text)


def disk_full_error(err: BaseException, path: Path) -> DiskFullError:
    free = shutil.disk_usage(_existing(path)).free
    return DiskFullError(
        errno.ENOSPC,
        f"the disk is full: writing {path} failed ({type(err).__name__}: {str(err)[:200]}); {free / 2**20:.0f} MiB "
        "free. Nothing that was already complete was lost: free some space and resume with resume=true",
    )


def _existing(path: Path) -> Path:
    while not path.exists():
        path = path.parent
    return path


def check_free_space(path: str | Path, needed_bytes: int) -> None:
    """Refuse (``DiskFullError``) to start writing ``needed_bytes`` under ``path`` when the disk has less."""
    free = shutil.disk_usage(_existing(Path(path))).free
    if free < needed_bytes:
        raise DiskFullError(
            errno.ENOSPC,
            f"not enough disk space for {path}: it needs about {needed_bytes / 2**20:.0f} MiB and "
            f"{free / 2**20:.0f} MiB are free. Free some space and resume with resume=true",
        )


def checkpoint_bytes(model: Any, optimizer_states: int = 2) -> int:
    """About what a checkpoint of ``model`` takes: the weights plus ``optimizer_states`` copies (Adam: 2)."""
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    float32 = sum(p.numel() * 4 for p in model.parameters() if p.requires_grad)
    return params + optimizer_states * float32 + 2**20


@contextlib.contextmanager
def disk_full_reported(path: str | Path) -> Iterator[None]:
    """Re-raise the errors of a full disk while writing under ``path`` as a ``DiskFullError`` that says so."""
    try:
        yield
    except (OSError, RuntimeError) as err:
        if _is_disk_full(err):
            raise disk_full_error(err, Path(path)) from err
        raise


class SafeCheckpoints(TrainerCallback):
    """For a Trainer: refuse a checkpoint the disk cannot hold before writing any of it (the last complete
    one stays the newest), and mark the moment after each save as a fault-injection point."""

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if control.should_save and state.is_world_process_zero and model is not None:
            check_free_space(args.output_dir, checkpoint_bytes(model))

    def on_save(self, args, state, control, **kwargs):
        kill_point(f"{args.run_name}.checkpoint-{state.global_step}")


def save_policy(model: Any, tokenizer: Any, path: str | Path) -> None:
    """``save_pretrained`` of a policy (model and tokenizer) as one atomic directory."""
    with atomic_dir(path) as tmp:
        model.save_pretrained(tmp)
        kill_point(f"save:{Path(path).parent.name}/{Path(path).name}")
        tokenizer.save_pretrained(tmp)


# --- digests ------------------------------------------------------------------------------------
def digest(path: str | Path) -> str | None:
    """SHA-256 of a file, or of a directory's files (their relative paths and contents); None if absent."""
    path = Path(path)
    h = hashlib.sha256()
    if path.is_file():
        files = [(path.name, path)]
    elif path.is_dir():
        files = sorted((str(f.relative_to(path)), f) for f in path.rglob("*") if f.is_file())
    else:
        return None
    for name, file in files:
        h.update(name.encode() + b"\0")
        with file.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        h.update(b"\0")
    return h.hexdigest()


# --- stage records ------------------------------------------------------------------------------
def stage_config(cfg: DictConfig, stage: str) -> dict[str, Any]:
    """The flattened config keys ``stage`` depends on (``{"bc.max_steps": 2000, ...}``)."""
    out: dict[str, Any] = {}
    for key in STAGE_KEYS[stage]:
        value = OmegaConf.select(cfg, key)
        if isinstance(value, DictConfig):
            value = OmegaConf.to_container(value, resolve=True)
        out.update(_flatten(key, value))
    return out


def _flatten(prefix: str, value: Any) -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(_flatten(f"{prefix}.{k}", v))
        return out
    return {prefix: json.loads(json.dumps(value, default=str))}


def _record_path(run_dir: Path, stage: str) -> Path:
    return run_dir / "stages" / f"{stage}.json"


def read_record(run_dir: Path, stage: str) -> dict[str, Any] | None:
    path = _record_path(run_dir, stage)
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        log.warning("%s is not valid JSON (an interrupted write before records were atomic?): ignored", path)
        return None


def config_changes(recorded: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``key: old -> new`` for each key whose value differs."""
    keys = sorted(set(recorded) | set(current), key=lambda k: (k.count("."), k))  # env.name before env.envs.*
    missing = object()
    return [
        f"{k}: {recorded.get(k, missing)!r} -> {current.get(k, missing)!r}".replace(repr(missing), "(unset)")
        for k in keys
        if recorded.get(k, missing) != current.get(k, missing)
    ]


def _added_since(recorded: dict[str, Any], current: dict[str, Any], schema: DictConfig) -> dict[str, Any]:
    """The schema's default of each key ``current`` has and ``recorded`` lacks: a key added to the schema after the
    stage was recorded ran with what its default does (e.g. ``bc.copy_augment=0``, off), so a resume that leaves it
    at that default is the same run."""
    defaults: dict[str, Any] = {}
    for key in set(current) - set(recorded):
        value = OmegaConf.select(schema, key, default=None)  # None: no default (an open group, a missing value)
        if value is not None and not isinstance(value, DictConfig | ListConfig):
            defaults.update(_flatten(key, value))  # as stage_config records it
    return defaults


def check_stage(run_dir: Path, stage: str, cfg: DictConfig, schema: DictConfig) -> None:
    """Refuse to resume ``stage`` with config keys other than those it was started or finished with; a key the
    record lacks counts as its default in ``schema`` (the structured config's defaults), where it has one."""
    record = read_record(run_dir, stage)
    if record is None:
        return
    current = stage_config(cfg, stage)
    recorded = {**_added_since(record["config"], current, schema), **record["config"]}
    changes = config_changes(recorded, current)
    if changes:
        shown = "; ".join(changes[:6]) + (f"; and {len(changes) - 6} more" if len(changes) > 6 else "")
        raise RunDirError(
            f"resume=true: the {stage} stage in {run_dir} was {record['status']} with other settings ({shown}). "
            "Resume with the settings it had, or start a new run dir (or overwrite=true to discard this one)"
        )


def digests(paths: dict[str, str | Path]) -> dict[str, str | None]:
    """``digest`` of each named path: what a stage record stores of its inputs and outputs."""
    return {name: digest(path) for name, path in paths.items()}


def start_stage(run_dir: Path, stage: str, cfg: DictConfig, inputs: dict[str, str | None]) -> None:
    """Record that ``stage`` started from ``inputs`` (name -> digest, ``digests``) with the current config.

    A previous started record with other inputs means the stage's partial state (checkpoints) came from
    other data: it is discarded by the caller (``inputs_changed``)."""
    record = {
        "stage": stage,
        "status": "started",
        "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "config": stage_config(cfg, stage),
        "inputs": inputs,
    }
    write_text(_record_path(run_dir, stage), json.dumps(record, indent=2))


def inputs_changed(run_dir: Path, stage: str, inputs: dict[str, str | None]) -> bool:
    """Whether a recorded (started or done) ``stage`` came from other inputs than these digests."""
    record = read_record(run_dir, stage)
    return record is not None and record["inputs"] != inputs


def finish_stage(run_dir: Path, stage: str, outputs: dict[str, str | Path], **facts: Any) -> None:
    """Record, last, that ``stage`` finished: its outputs' digests and ``facts`` (counts, ...)."""
    record = read_record(run_dir, stage)
    if record is None:
        raise RunDirError(f"finish_stage({stage!r}) without start_stage in {run_dir}")
    record.update(
        status="done",
        finished=time.strftime("%Y-%m-%dT%H:%M:%S"),
        outputs=digests(outputs),
        **facts,
    )
    write_text(_record_path(run_dir, stage), json.dumps(record, indent=2))


def finished(run_dir: Path, stage: str, inputs: dict[str, str | None], outputs: dict[str, str | Path]) -> bool:
    """Whether ``stage`` is done and still valid: a done record whose inputs (digests) and outputs match.

    Call ``check_stage`` first (a changed config is refused, not redone). A record that no longer matches
    (an output modified or partly written, an input re-made) is logged and the stage runs again."""
    record = read_record(run_dir, stage)
    if record is None or record["status"] != "done":
        return False
    if record["inputs"] != inputs:
        log.warning("%s: its inputs changed since it finished (%s): running it again", stage, sorted(inputs))
        return False
    now_out = digests(outputs)
    if record["outputs"] != now_out:
        changed = [name for name in now_out if now_out[name] != record["outputs"].get(name)]
        log.warning("%s: %s no longer match(es) its record (modified or partly written): running it again",
                    stage, changed)  # fmt: skip
        return False
    return True


# --- preparing a run dir ------------------------------------------------------------------------
def existing_artifacts(run_dir: Path) -> list[str]:
    return [name for name in ARTIFACTS if (run_dir / name).exists()]


def prepare(run_dir: Path, resume: bool, overwrite: bool) -> None:
    """A fresh run needs a dir without a previous run's artifacts (``overwrite`` removes them); a resume
    clears what interrupted atomic writes left behind."""
    run_dir.mkdir(parents=True, exist_ok=True)
    found = existing_artifacts(run_dir)
    if resume:
        clean_temporaries(run_dir)
        return
    if found and not overwrite:
        raise RunDirError(
            f"{run_dir} already holds a run ({', '.join(found)}). Continue it with resume=true, discard it with "
            "overwrite=true, or choose another hydra.run.dir"
        )
    for name in found:
        target = run_dir / name
        log.warning("overwrite=true: removing %s", target)
        shutil.rmtree(target) if target.is_dir() else target.unlink()


# --- the lock -----------------------------------------------------------------------------------
class RunLock:
    """An exclusive lock on a run dir for the life of this process (``with RunLock(run_dir): ...``)."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / ".lock"
        self.fd: int | None = None

    def __enter__(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise RunDirError(
                f"{self.path.parent} is in use by {owner}: wait for it to finish, or choose another hydra.run.dir"
            ) from None
        previous = os.pread(fd, 4096, 0).decode(errors="replace").strip()
        if previous:
            log.info("run dir lock: taking over a stale lock of a process that is gone (%s)", previous)
        owner = f"pid {os.getpid()} on {socket.gethostname()} (started {time.strftime('%Y-%m-%d %H:%M:%S')})"
        os.ftruncate(fd, 0)
        os.pwrite(fd, owner.encode() + b"\n", 0)
        self.fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            os.ftruncate(self.fd, 0)
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


# --- checkpoints --------------------------------------------------------------------------------
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "adapter_model.safetensors")


def checkpoint_step(path: str | Path) -> int:
    """The step of a checkpoint dir (``checkpoint-500``, ``step-000020``)."""
    path = Path(path)
    return int(path.name.rsplit("-", 1)[1])


def _hf_complete(path: Path) -> bool:
    """A Trainer checkpoint is complete when its trainer_state.json (written last) parses with its step,
    and weights, optimizer and scheduler are there."""
    try:
        state = json.loads((path / "trainer_state.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    weights = any((path / name).is_file() for name in WEIGHT_FILES)
    others = all((path / name).is_file() for name in ("optimizer.pt", "scheduler.pt"))
    return state.get("global_step") == checkpoint_step(path) and weights and others


def _ppo_complete(path: Path) -> bool:
    try:
        return json.loads((path / "ppo_state.json").read_text())["step"] == checkpoint_step(path)
    except (OSError, json.JSONDecodeError, KeyError):
        return False


def complete_checkpoints(folder: str | Path) -> list[Path]:
    """The complete checkpoints in ``folder`` (Trainer ``checkpoint-N`` or PPO ``step-N``), oldest first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and p.name.rsplit("-", 1)[-1].isdigit()]
    done = [p for p in found if (_ppo_complete(p) if p.name.startswith("step-") else _hf_complete(p))]
    return sorted(done, key=checkpoint_step)


def last_checkpoint(folder: str | Path) -> str | None:
    """The newest complete checkpoint; incomplete ones (a kill or a full disk during a save) are removed."""
    folder = Path(folder)
    done = complete_checkpoints(folder)
    for path in folder.iterdir() if folder.is_dir() else []:
        if path.is_dir() and path.name.rsplit("-", 1)[-1].isdigit() and path not in done:
            log.warning("removing the incomplete checkpoint %s (interrupted while it was saved)", path)
            shutil.rmtree(path, ignore_errors=True)
    return str(done[-1]) if done else None


def trim_history(path: Path, last_step: int, key: str = "step") -> None:
    """Keep the lines of a JSONL history up to ``last_step`` (a resume redoes the steps after it)."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a kill
        if record.get(key, 0) <= last_step:
            kept.append(line)
    write_text(path, "".join(line + "\n" for line in kept))
