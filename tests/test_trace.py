"""The trace report: a self-contained HTML page, opened, filtered, clicked and screenshotted in headless Chromium."""

import json
import re
import shutil

import pytest

from rl_agents.trace import main as trace_main
from rl_agents.trace import render
from rl_agents.trajectory import read_jsonl


def test_trace_report_is_self_contained_and_holds_every_episode(smoke_run):
    path = render(smoke_run)
    page = path.read_text()
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page)  # no external scripts, styles or images
    data = json.loads(page.split("const DATA = ", 1)[1].split(";\n", 1)[0].replace("<\\/", "</"))
    episodes = read_jsonl(smoke_run / "eval" / "episodes_bc.jsonl") + read_jsonl(
        smoke_run / "eval" / "episodes_teacher.jsonl"
    )
    assert len(data["episodes"]) == len(episodes)
    bc = [e for e in data["episodes"] if e["policy"] == "bc"]
    token_turns = [t for e in bc for t in e["turns"]]
    assert token_turns and all(t["tokens"] for t in token_turns)
    for turn in token_turns:  # the tokens spell the turn, each with a probability
        assert all(0.0 <= p <= 1.0 for _, p in turn["tokens"])
        assert "".join(text for text, _ in turn["tokens"]).startswith(turn["agent"])


def test_an_episode_file_that_does_not_match_eval_json_is_refused(smoke_run, tmp_path):
    """A file with fewer episodes than eval.json counts is not rendered as if it were the evaluation."""
    run = tmp_path / "run"
    shutil.copytree(smoke_run / "eval", run / "eval")
    shutil.copy(smoke_run / "eval.json", run / "eval.json")
    shutil.copy(smoke_run / "config.yaml", run / "config.yaml")
    shutil.copytree(smoke_run / "bc" / "policy", run / "bc" / "policy")
    path = run / "eval" / "episodes_bc.jsonl"
    path.write_text("".join(path.read_text().splitlines(keepends=True)[:3]))
    with pytest.raises(ValueError, match="holds 3 episodes and eval.json counts 8 for bc"):
        render(run)


def test_trace_cli_names_a_run_without_episodes(tmp_path):
    with pytest.raises(SystemExit, match="no evaluation episodes"):
        trace_main([str(tmp_path)])


def test_trace_report_in_headless_chromium(smoke_run, tmp_path):
    from playwright.sync_api import sync_playwright

    browser_path = shutil.which("chromium") or shutil.which("chromium-browser")
    assert browser_path, "the trace test needs Chromium: apt-get install chromium (.ci/run installs it)"
    path = render(smoke_run, tmp_path / "trace.html")
    episodes = read_jsonl(smoke_run / "eval" / "episodes_bc.jsonl") + read_jsonl(
        smoke_run / "eval" / "episodes_teacher.jsonl"
    )
    failures = sum(not e.success for e in episodes)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=browser_path, args=["--no-sandbox"])
        page = browser.new_page()
        errors = []
        page.on("pageerror", lambda err: errors.append(str(err)))
        page.goto(path.as_uri())
        assert page.inner_text("#count") == f"{len(episodes)} of {len(episodes)} episodes"
        page.select_option("#outcome", "failure")
        assert page.locator(".ep").count() == failures
        page.select_option("#outcome", "all")
        page.select_option("#policy", "bc")
        page.click(".ep >> nth=0")
        assert page.locator(".turn").count() >= 1
        assert page.locator(".tok").count() > 0 and page.locator(".tok").first.get_attribute("title").startswith("p=")
        page.screenshot(path=str(tmp_path / "trace.png"))
        browser.close()
    assert not errors
    assert (tmp_path / "trace.png").read_bytes()[:4] == b"\x89PNG"
