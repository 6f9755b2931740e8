"""The main job's promise, measured: run with `pytest -m slow` (about 8 minutes on 2 cores)."""

import json

import pytest

from tests.test_pipeline import _run


@pytest.mark.slow
def test_default_launch_clones_calculator_to_90_percent_on_held_out_seeds(tmp_path):
    _run("rl_agents.train", f"hydra.run.dir={tmp_path}", "logger=none", "progress=false")
    data = json.loads((tmp_path / "eval.json").read_text())
    assert data["seeds"]["start"] == 1_000_000 and data["seeds"]["count"] == 200
    assert data["policies"]["teacher"]["success_rate"] == 1.0
    assert data["policies"]["bc"]["success_rate"] >= 0.9
