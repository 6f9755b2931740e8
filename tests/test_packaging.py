"""The package as a user installs it: a built wheel, installed (not editable) into a fresh venv, runs the pipeline
from any directory with the configs it carries."""

import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("pyproject.toml", "README.md", "rl_agents", "envs", "conf")


def build_wheel(tmp_path: Path) -> Path:
    """The wheel of the source tree (its sources copied, so the checkout gets no build/ or egg-info)."""
    src = tmp_path / "src"
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            src.mkdir(exist_ok=True)
            shutil.copy(ROOT / name, src / name)
    dist = tmp_path / "dist"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", dist, src],
        check=True,
    )
    (wheel,) = dist.glob("rl_agents-*.whl")
    return wheel


def test_the_wheel_holds_every_module_and_config(tmp_path):
    names = set(zipfile.ZipFile(build_wheel(tmp_path)).namelist())
    modules = [p for package in ("rl_agents", "envs") for p in (ROOT / package).rglob("*.py")]
    sources = {p.relative_to(ROOT).as_posix() for p in modules}
    configs = {"rl_agents/" + p.relative_to(ROOT).as_posix() for p in (ROOT / "conf").rglob("*.yaml")}
    assert sources <= names, sources - names
    assert configs <= names, configs - names
    assert "rl_agents/trace.html" in names


def test_a_non_editable_install_runs_the_pipeline_from_anywhere(tmp_path):
    wheel = build_wheel(tmp_path)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True)
    python = venv / "bin" / "python"
    subprocess.run([sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps", wheel], check=True)
    # the dependencies are this venv's (a path line, not its .pth files: this checkout's editable install stays out)
    site = Path(subprocess.check_output([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                                        text=True).strip())  # fmt: skip
    (site / "deps.pth").write_text(sysconfig.get_path("purelib") + "\n")
    work = tmp_path / "work"
    work.mkdir()
    where = subprocess.check_output([python, "-c", "import rl_agents, envs; print(rl_agents.__file__, envs.__file__)"],
                                    cwd=work, text=True)  # fmt: skip
    assert all(Path(p).is_relative_to(venv) for p in where.split()), where
    run = subprocess.run(
        [python, "-m", "rl_agents.train", "budget=smoke", "logger=none", "progress=false", "hydra.run.dir=run"],
        cwd=work, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    assert "it/s]" not in run.stderr + run.stdout  # progress=false: no library's progress bar either
    assert (work / "run" / "eval.json").is_file()
    assert (work / "run" / "bc" / "policy" / "config.json").is_file()
