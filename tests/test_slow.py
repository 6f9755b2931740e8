"""The main job's promise, measured: run with `pytest -m slow` (about 7 minutes on 2 cores).

This is issue 2's acceptance target (BC >= 90% on Calculator-v0 held-out seeds). It does not pass yet:
the default launch reaches 79.5% (see the README's results), so the issue stays open until it does.
"""

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
