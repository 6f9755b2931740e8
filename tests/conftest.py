"""Shared fixtures: a tiny BC policy trained once per session (seconds), offline everything."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.pop("WANDB_API_KEY", None)
# pytest-xdist (the suite runs on `-n auto`, see pyproject.toml): the cores are shared out among the workers, so
# that two workers' torch threads (and those of the runs they start) do not fight over the same cores
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, cores // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))))

import pytest  # noqa: E402

import envs  # noqa: E402,F401  (registers the environments)
from envs.calculator import CalculatorTeacher  # noqa: E402
from rl_agents.bc import BCConfig, train_bc  # noqa: E402
from rl_agents.collect import collect  # noqa: E402
from rl_agents.model import build_tiny_model, build_tokenizer, load_policy, trajectory_texts  # noqa: E402


def pytest_addoption(parser):
    parser.addoption(
        "--device", default="cpu", help="where the runtime tests run their models: cpu (the default) or cuda[:N]"
    )


@pytest.fixture(scope="session")
def device(request):
    import torch

    return torch.device(request.config.getoption("--device"))


@pytest.fixture(scope="session")
def calculator_data():
    trajectories, _ = collect("Calculator-v0", {}, CalculatorTeacher(), list(range(300)), 8, progress=False)
    return trajectories


@pytest.fixture(scope="session")
def tiny_policy(tmp_path_factory, calculator_data):
    """A small policy cloned briefly from the calculator teacher: it writes well-formed multi-turn episodes."""
    out = tmp_path_factory.mktemp("tiny_policy")
    tokenizer = build_tokenizer(trajectory_texts(calculator_data), 512)
    model = build_tiny_model(tokenizer, seed=0, hidden_size=64, num_layers=2, num_heads=2, intermediate_size=128)
    config = BCConfig(  # copy rows off: 150 steps on the episodes alone (tests/test_bc.py tests the rows)
        max_steps=150, batch_size=8, max_length=256, learning_rate=5e-3, logging_steps=50, save_steps=1000, copy_mix=0.0
    )
    policy_dir = train_bc(calculator_data, model, tokenizer, out, config, seed=0)
    model, tokenizer = load_policy(policy_dir, local_files_only=True)
    return policy_dir, model, tokenizer


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory):
    """One ``budget=smoke`` run of the default stages on both first environments, through the CLI."""
    from tests.helpers.cli import run_cli

    run_dir = tmp_path_factory.mktemp("smoke")
    run_cli("rl_agents.train", "budget=smoke", f"hydra.run.dir={run_dir}", "env=calculator_sql")
    return run_dir


@pytest.fixture
def fresh_accelerate_state():
    """accelerate's state is one per process: a test that sets its own precision starts and ends afresh."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


@pytest.fixture(scope="session")
def carded_policy(tiny_policy, tmp_path_factory):
    """The session's tiny calculator policy, copied with the agent card a run would have written for it (4 turns
    of up to 48 new tokens)."""
    import shutil
    from pathlib import Path

    from hydra import compose, initialize_config_dir

    from rl_agents.agent import agent_card, write_card

    policy_dir, _, tokenizer = tiny_policy
    conf = str(Path(__file__).resolve().parents[1] / "conf")
    with initialize_config_dir(config_dir=conf, version_base="1.3"):
        cfg = compose("train", ["runtime.max_new_tokens=48", "runtime.max_turns=4"])
    target = tmp_path_factory.mktemp("carded") / "policy"
    shutil.copytree(policy_dir, target)
    write_card(target, agent_card(cfg, tokenizer, "bc"))
    return target
