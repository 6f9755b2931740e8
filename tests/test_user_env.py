"""A user's own workflow, exactly as the docs tell it: the files of docs/environments.md written into a fresh
project, the README's commands run there as written, and the Python entry point's example run as written."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def code_blocks(path: Path) -> list[tuple[str, str]]:
    """(language, text) of every fenced block of a markdown file."""
    return re.findall(r"^```(\w*)\n(.*?)^```$", path.read_text(), flags=re.M | re.S)


def readme_commands() -> list[str]:
    section = ROOT / "README.md"
    text = section.read_text().split("## Your own workflow", 1)[1].split("\n## ", 1)[0]
    (block,) = re.findall(r"^```bash\n(.*?)^```$", text, flags=re.M | re.S)
    return block.strip().splitlines()


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """The docs' files (each block that starts with ``# <relative path>``) in a fresh project directory."""
    root = tmp_path_factory.mktemp("user_project")
    for _, text in code_blocks(ROOT / "docs" / "environments.md"):
        first = text.splitlines()[0]
        if first.startswith("# ") and "/" in first or first.endswith(".py"):
            target = root / first[2:].strip()
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text)
    assert {"my_pkg/prices.py", "conf/env/prices.yaml", "compile_prices.py"} <= {
        p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()
    }
    return root


def shell(line: str, cwd: Path) -> subprocess.CompletedProcess:
    """One documented command, as written, with this venv's ``python`` first on the PATH (a fresh process:
    this checkout is not on its path, only the installed package and the project)."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}  # fmt: skip
    env.pop("PYTHONPATH", None)
    return subprocess.run(["bash", "-c", line], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_the_readme_commands_compile_and_evaluate_a_user_env(project):
    commands = readme_commands()
    docs = "\n".join(text for lang, text in code_blocks(ROOT / "docs" / "environments.md") if lang == "bash")
    assert all(line in docs for line in commands), "the README's commands and docs/environments.md's differ"
    train, evaluate = commands
    run = shell(train, project)
    assert run.returncode == 0, run.stderr[-3000:]
    run_dir = project / "outputs" / "prices-smoke"
    trained = json.loads((run_dir / "eval.json").read_text())
    assert trained["env_ids"] == ["my_pkg.prices:Price-v0"]
    assert trained["policies"]["teacher"]["success_rate"] == 1.0
    assert trained["policies"]["bc"]["episodes"] > 0
    card = json.loads((run_dir / "bc" / "policy" / "agent.json").read_text())  # the compiled agent describes itself
    assert [t["function"]["name"] for t in card["envs"]["my_pkg.prices:Price-v0"]["tools"]] == ["price"]
    assert (run_dir / "bc" / "policy" / "README.md").read_text().startswith("---\nlibrary_name: transformers")

    done = shell(evaluate, project)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "env and runtime from the checkpoint's run" in done.stdout + done.stderr
    (evaluated,) = (project / "outputs" / "evaluate").glob("*/*/eval.json")
    single = json.loads(evaluated.read_text())
    assert single["env_ids"] == ["my_pkg.prices:Price-v0"]  # not the default Calculator-v0
    # worker processes import the user's module: the same greedy episodes as one process (the first 24 seeds)
    two = shell(f"{evaluate.split('#')[0]} runtime.processes=2 eval.episodes=24 hydra.run.dir=outputs/two", project)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "Overriding environment" not in two.stderr
    episodes = [
        [[(t["agent"], t["observation"]) for t in json.loads(line)["turns"]] for line in path.open()]
        for path in (evaluated.parent / "episodes_policy.jsonl", project / "outputs" / "two" / "episodes_policy.jsonl")
    ]
    assert len(episodes[0]) == single["policies"]["policy"]["episodes"] and len(episodes[1]) == 24
    assert episodes[0][:24] == episodes[1]


def test_the_python_entry_point_compiles_a_user_env(project):
    run = shell("python compile_prices.py", project)
    assert run.returncode == 0, run.stderr[-3000:]
    run_dir, teacher, policy = run.stdout.splitlines()[-1].split()
    assert (project / run_dir / "stages" / "bc.json").is_file()
    assert float(teacher) == 1.0
    assert Path(policy) == Path(run_dir) / "bc" / "policy"
    config = (project / run_dir / "config.yaml").read_text()
    assert "my_pkg.prices:Price-v0" in config and "Calculator-v0" not in config
    assert "eval bc on my_pkg.prices:Price-v0" in (project / run_dir / "train.log").read_text()
