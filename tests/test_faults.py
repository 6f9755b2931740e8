"""Fault injection: kill -9 at chosen points, a full disk, two runs in one dir, stale and changed run dirs.

A run killed anywhere and resumed must end exactly where the uninterrupted run ends, or refuse clearly.
``RL_AGENTS_KILL_AT=<point>`` makes the run SIGKILL itself at a named point (``rl_agents.rundir.kill_point``).
"""

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from rl_agents import rundir
from tests.helpers.cli import ROOT

STAGES = ["budget=smoke", "logger=none", "algo=ppo", "stages=[collect,bc,rl,eval]", "eval.policies=[teacher,bc,rl]"]


def _train(run_dir, *overrides, kill_at=None):
    env = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"}
    env.pop("RL_AGENTS_KILL_AT", None)
    if kill_at:
        env["RL_AGENTS_KILL_AT"] = kill_at
    command = [sys.executable, "-m", "rl_agents.train", *STAGES, f"hydra.run.dir={run_dir}", *overrides]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def _compile(run_dir, *overrides, env="calculator"):
    """``_train``'s run in this process (``compile_agent``: the same ``run``), where no kill or exit code is at stake:
    it saves a Python start and the imports (seconds) per run."""
    from rl_agents.api import compile_agent

    return compile_agent(env, run_dir=run_dir, overrides=[*STAGES, *overrides])


def _ok(proc):
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def _output(proc):
    return proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run every interrupted one must reproduce."""
    run_dir = tmp_path_factory.mktemp("reference")
    _ok(_train(run_dir))
    return run_dir


def _same_run(a, b):
    assert (a / "trajectories/train.jsonl").read_text() == (b / "trajectories/train.jsonl").read_text()
    for policy in ("bc/policy", "rl/policy"):
        wa, wb = load_file(str(a / policy / "model.safetensors")), load_file(str(b / policy / "model.safetensors"))
        assert all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa), policy
    ea, eb = json.loads((a / "eval.json").read_text()), json.loads((b / "eval.json").read_text())
    for name in ("teacher", "bc", "rl"):
        assert ea["policies"][name]["success_rate"] == eb["policies"][name]["success_rate"]
    steps = [json.loads(line)["step"] for line in (b / "rl/metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]  # the reward curve: no repeated or missing step


@pytest.mark.parametrize(
    "point",
    ["write:train.jsonl", "bc.checkpoint-2", "save:bc/policy", "rl.checkpoint-1", "write:episodes_bc.jsonl"],
)
def test_a_run_killed_anywhere_resumes_to_the_uninterrupted_result(tmp_path, reference, point):
    killed = _train(tmp_path, kill_at=point)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert not (tmp_path / "eval.json").exists()
    if point.startswith("write:train"):
        assert not (tmp_path / "trajectories/train.jsonl").exists()  # never half a file
    if point.startswith("save:"):
        assert not (tmp_path / point[5:]).exists()  # never half a policy
    _ok(_train(tmp_path, "resume=true"))
    _same_run(reference, tmp_path)
    assert not list(tmp_path.rglob(".*.tmp-*"))  # what the kill left was cleaned up


def test_a_grpo_run_killed_after_a_checkpoint_resumes_to_the_uninterrupted_result(tmp_path):
    """The same for GRPO (TRL's trainer): its reward curve keeps each step once, its weights match."""
    grpo = ["algo=grpo", "rl.logging_steps=1"]
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    _ok(_train(whole, *grpo))
    assert _train(killed, *grpo, kill_at="rl.checkpoint-1").returncode == -signal.SIGKILL
    _ok(_train(killed, *grpo, "resume=true"))
    for policy in ("bc/policy", "rl/policy"):
        a = load_file(str(whole / policy / "model.safetensors"))
        b = load_file(str(killed / policy / "model.safetensors"))
        assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a), policy
    history = [json.loads(line) for line in (killed / "rl/metrics.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history if "loss" in h] == [1, 2]


def test_incomplete_checkpoints_and_a_truncated_policy_are_not_taken_for_finished_work(
    tmp_path, reference, fresh_accelerate_state
):
    """A checkpoint cut short by a kill (or a full disk) is skipped and removed; a 0-byte config.json in a
    policy dir does not make the stage finished: the resume redoes the work and ends where the reference does."""
    _compile(tmp_path, "stages=[collect,bc]")
    checkpoints = tmp_path / "bc/checkpoints"
    (checkpoints / "checkpoint-4/trainer_state.json").unlink()  # as if the save died before its last file
    (tmp_path / "bc/policy/config.json").write_text("")
    _compile(tmp_path, "resume=true")
    log = (tmp_path / "train.log").read_text()
    assert "no longer match" in log and "removing the incomplete checkpoint" in log
    assert "resuming from" in log and "checkpoint-2" in log
    _same_run(reference, tmp_path)


def test_a_fresh_run_refuses_a_used_dir_and_overwrite_starts_afresh(tmp_path):
    _compile(tmp_path, "stages=[collect]")
    refused = _train(tmp_path, "stages=[collect]")
    assert refused.returncode == 2
    assert "already holds a run" in _output(refused) and "resume=true" in _output(refused)
    assert "Traceback" not in _output(refused)  # one message, no traceback
    _compile(tmp_path, "stages=[collect]", "overwrite=true", "collect.episodes=6")
    record = json.loads((tmp_path / "stages/collect.json").read_text())
    assert record["status"] == "done" and record["config"]["collect.episodes"] == 6


def test_a_resume_with_other_settings_is_refused_with_the_key_named(tmp_path, fresh_accelerate_state):
    """In this process (``compile_agent``, the same ``run``; the command line's exit code 2 for these errors is
    ``test_a_second_run_into_a_busy_dir_stops_at_once_naming_the_first``'s)."""

    def train(*overrides, env="calculator"):
        return _compile(tmp_path, *overrides, env=env)

    train("stages=[collect,bc]")
    with pytest.raises(rundir.RunDirError, match="collect stage") as refused:
        train("stages=[collect,bc]", "resume=true", env="sql")
    assert "env.name: 'calculator' -> 'sql'" in str(refused.value)
    with pytest.raises(rundir.RunDirError, match="bc.learning_rate: 0.002 -> 0.1"):
        train("stages=[collect,bc]", "resume=true", "bc.learning_rate=0.1")
    # nor can a later stage evaluate this run's policy under another environment's name
    with pytest.raises(rundir.RunDirError, match="env.name: 'calculator' -> 'sql'"):
        train("stages=[eval]", "eval.policies=[bc]", "resume=true", env="sql")
    # a record from before a key existed (here bc.copy_augment) resumes at that key's default, and only there
    record = json.loads((tmp_path / "stages/bc.json").read_text())
    del record["config"]["bc.copy_augment"]
    (tmp_path / "stages/bc.json").write_text(json.dumps(record))
    with pytest.raises(rundir.RunDirError, match="bc.copy_augment: 0.0 -> 0.5"):
        train("stages=[collect,bc]", "resume=true", "bc.copy_augment=0.5")
    train("stages=[collect,bc]", "resume=true")
    # a stage not started yet may take new settings
    train("stages=[collect,bc,rl]", "resume=true", "rl.steps=1")
    assert json.loads((tmp_path / "stages/rl.json").read_text())["status"] == "done"


def test_a_second_run_into_a_busy_dir_stops_at_once_naming_the_first(tmp_path):
    with rundir.RunLock(tmp_path):
        proc = _train(tmp_path)
    assert proc.returncode == 2
    assert f"is in use by pid {os.getpid()}" in _output(proc)
    assert not (tmp_path / "config.yaml").exists()  # it touched nothing


def test_a_stale_lock_of_a_dead_process_is_taken_over(tmp_path):
    (tmp_path / ".lock").write_text("pid 999999 on elsewhere (started 2026-01-01 00:00:00)\n")
    with rundir.RunLock(tmp_path) as lock:
        assert str(os.getpid()) in lock.path.read_text()
    assert lock.path.read_text() == ""


def test_a_retrained_policy_drops_its_stale_eval_entry(tmp_path, reference):
    """eval.json keeps an older entry only while the policy it measured is unchanged."""
    from omegaconf import OmegaConf

    from rl_agents.evaluate import write_eval

    cfg = OmegaConf.load(reference / "config.yaml")
    (tmp_path / "rl").mkdir()
    import shutil

    shutil.copytree(reference / "rl/policy", tmp_path / "rl/policy")
    shutil.copytree(reference / "bc/policy", tmp_path / "bc/policy")
    metrics = {"success_rate": 0.5}
    write_eval(tmp_path / "eval.json", cfg, {"bc": dict(metrics), "rl": dict(metrics)},
               {"bc": tmp_path / "bc/policy", "rl": tmp_path / "rl/policy"})  # fmt: skip
    shutil.rmtree(tmp_path / "rl/policy")
    shutil.copytree(reference / "bc/policy", tmp_path / "rl/policy")  # "re-trained": other weights
    data = write_eval(tmp_path / "eval.json", cfg, {"bc": dict(metrics)}, {"bc": tmp_path / "bc/policy"})
    assert set(data["policies"]) == {"bc"}


# --- a full disk --------------------------------------------------------------------------------
def test_a_checkpoint_the_disk_cannot_hold_is_refused_before_a_byte_is_written(tmp_path, calculator_data,
                                                                                monkeypatch):  # fmt: skip
    from rl_agents.bc import BCConfig, train_bc
    from rl_agents.model import build_tiny_model, build_tokenizer, trajectory_texts

    tokenizer = build_tokenizer(trajectory_texts(calculator_data[:50]), 256)
    model = build_tiny_model(tokenizer, seed=0, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64)
    config = BCConfig(max_steps=4, batch_size=4, max_length=256, save_steps=2, logging_steps=2)
    real = rundir.shutil.disk_usage
    calls = []

    def filling_disk(path):
        calls.append(path)  # the second save finds the disk full
        usage = real(path)
        return usage._replace(free=usage.free if len(calls) < 2 else 1000)

    monkeypatch.setattr(rundir.shutil, "disk_usage", filling_disk)
    with pytest.raises(rundir.DiskFullError, match="not enough disk space .* MiB are free"):
        train_bc(calculator_data[:50], model, tokenizer, tmp_path, config, seed=0)
    assert [p.name for p in rundir.complete_checkpoints(tmp_path / "checkpoints")] == ["checkpoint-2"]
    assert not (tmp_path / "checkpoints/checkpoint-4").exists()


def test_a_full_disk_during_a_save_is_reported_as_a_full_disk(tmp_path):
    """torch's own error for a full disk names a C++ file position; the user sees that the disk is full."""
    with pytest.raises(rundir.DiskFullError, match="the disk is full: writing .* free some space"):
        with rundir.disk_full_reported(tmp_path):
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 3200 vs 3090")
    with pytest.raises(rundir.DiskFullError, match="the disk is full"):
        with rundir.open_atomic(tmp_path / "x.json") as f:
            f.write("{")
            raise OSError(28, "No space left on device")
    assert not (tmp_path / "x.json").exists() and not list(tmp_path.iterdir())
    with pytest.raises(ValueError, match="not a disk"):  # other errors pass through untouched
        with rundir.disk_full_reported(tmp_path):
            raise ValueError("not a disk problem")
