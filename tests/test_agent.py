"""The compiled agent on the user's own tasks: its card, ``Agent.run`` and ``run_batch``, the user's tools and the
guard between the model and them."""

import json
import shutil
import time
from pathlib import Path

import pytest

from rl_agents import Agent
from rl_agents.agent import CARD, AgentCardError

CONF = str(Path(__file__).resolve().parents[1] / "conf")


@pytest.fixture
def carded(carded_policy):
    return carded_policy


def test_the_card_describes_the_agent(carded):
    card = json.loads((carded / CARD).read_text())
    (tool,) = card["envs"]["Calculator-v0"]["tools"]
    assert tool["function"]["name"] == "calculator" and "expression" in tool["function"]["parameters"]["properties"]
    assert card["runtime"]["max_turns"] == 4 and card["provenance"]["stage"] == "bc"


def test_an_agent_answers_a_task_of_the_users_own(carded):
    agent = Agent.from_pretrained(carded, env_kwargs={"fail_prob": 0.0})
    result = agent.run("What is 12 * 34?")
    assert result.task == "What is 12 * 34?" and result.success is None  # no ground truth for a user's task
    assert 1 <= len(result.turns) <= 4 and result.latency_ms > 0
    assert result.stop_reason in {"answer", "max_turns", "context_length", "max_steps", "ended"}
    assert (result.answer is not None) == (result.stop_reason == "answer")
    calls = [t for t in result.turns if t.tool == "calculator" and t.error is None]
    assert calls, "the calculator policy calls its tool"
    batch = agent.run_batch(["What is 2 + 2?", "What is 12 * 34?", "Compute 7 - 9."])
    assert [r.task for r in batch] == ["What is 2 + 2?", "What is 12 * 34?", "Compute 7 - 9."]
    assert [t.text for t in batch[1].turns] == [t.text for t in result.turns]  # greedy: the same episode


def test_the_users_tools_replace_the_declared_ones_behind_the_guard(carded):
    seen = []

    def calculator(expression: str) -> str:
        seen.append(expression)
        return "42"

    result = Agent.from_pretrained(carded, tools={"calculator": calculator}).run("What is 12 * 34?")
    called = [t for t in result.turns if t.tool == "calculator" and t.error is None]
    assert called and all(t.observation == "42" for t in called)
    assert len(seen) == len(called) and all(isinstance(e, str) for e in seen)
    with pytest.raises(ValueError, match="not declared in the agent's card"):
        Agent.from_pretrained(carded, tools={"shell": print})


def test_a_users_tool_that_hangs_is_cut_at_its_time_limit(carded):
    def slow(expression: str) -> str:
        time.sleep(5)
        return "too late"

    agent = Agent.from_pretrained(carded, tools={"calculator": slow}, tool_timeout_s=0.2, max_turns=2)
    result = agent.run("What is 12 * 34?")
    timed_out = [t for t in result.turns if t.error == "tool_timeout"]
    assert timed_out and "did not answer within 0.2 s" in timed_out[0].observation


def test_a_card_that_does_not_match_is_refused_with_what_differs(carded, tmp_path):
    for key, value, message in [("tokenizer_fingerprint", "0" * 16, "tokenizer fingerprint"),
                                ("format_version", 99, "format version 99")]:  # fmt: skip
        copy = tmp_path / key
        shutil.copytree(carded, copy)
        card = json.loads((copy / CARD).read_text())
        card[key] = value
        (copy / CARD).write_text(json.dumps(card))
        with pytest.raises(AgentCardError, match=message):
            Agent.from_pretrained(copy)
    (copy / CARD).unlink()
    with pytest.raises(AgentCardError, match="has no agent.json"):
        Agent.from_pretrained(copy)


def test_an_environment_whose_tools_need_its_task_refuses_a_users_task():
    import gymnasium as gym

    env = gym.make("SQL-v0")
    with pytest.raises(NotImplementedError, match="cannot take a task of yours"):
        env.reset(options={"task": "How many rows?"})


def test_export_gathers_the_runs_agent_with_its_evaluation_and_a_model_card(smoke_run, tmp_path):
    """A real run's bc/policy (its card written by the run), exported and loaded back as an Agent."""
    import yaml

    from rl_agents.export import ExportError, export

    out = export(smoke_run, tmp_path / "shipped")
    card = json.loads((out / CARD).read_text())
    evaluated = json.loads((smoke_run / "eval.json").read_text())
    assert card["eval"]["policies"]["bc"]["success_rate"] == evaluated["policies"]["bc"]["success_rate"]
    assert set(card["envs"]) == set(evaluated["env_ids"]) and card["provenance"]["stage"] == "bc"
    assert card["provenance"]["training_data_digest"]
    header = yaml.safe_load((out / "README.md").read_text().split("---\n")[1])
    assert "rl_agents" in header["tags"]
    (result,) = header["model-index"][0]["results"][:1]
    assert result["metrics"][0]["value"] == evaluated["policies"]["bc"]["success_rate"]
    agent = Agent.from_pretrained(out, env_id="Calculator-v0", max_turns=2)
    assert agent.run("What is 2 + 2?").task == "What is 2 + 2?"
    with pytest.raises(ExportError, match="no trained policy"):
        export(tmp_path, tmp_path / "nothing")


def test_a_run_past_its_wall_time_ends_at_the_end_of_the_turn(carded):
    """max_wall_s: a tool that takes longer than the run may ends the run after that turn (stop_reason
    wall_time), where the turn budget would have let it go on."""

    def slow(expression: str) -> str:
        time.sleep(0.5)
        return "408"

    result = Agent.from_pretrained(carded, tools={"calculator": slow}, max_wall_s=0.2, max_turns=4).run(
        "What is 12 * 34?"
    )
    assert result.turns[0].tool == "calculator"  # greedy: the policy calls its tool first
    assert result.stop_reason == "wall_time" and len(result.turns) == 1 and result.turns[0].observation == "408"
