"""The environments: Gymnasium's checker, the turn parser, every error kind, tools, teachers, seeds."""

import json
import re
import sqlite3
import warnings
from collections import Counter
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from envs.base import ERROR_KINDS, Answer, ParseError, Task, ToolCall, answers_match, parse_turn, task_split
from envs.calculator import CalculatorTeacher, evaluate_arithmetic
from envs.code import CodeTeacher
from envs.gym_text import PlannerTeacher
from envs.shop import ShopTeacher
from envs.sql import SQLTeacher
from envs.teacher import tool_call
from rl_agents.runtime import RuntimeConfig

CONF = str(Path(__file__).resolve().parents[1] / "conf")

TEACHERS = {
    "Calculator-v0": CalculatorTeacher,
    "SQL-v0": SQLTeacher,
    "Shop-v0": ShopTeacher,
    "Code-v0": CodeTeacher,
    "FrozenLakeText-v0": PlannerTeacher,
    "TaxiText-v0": PlannerTeacher,
}
ENV_IDS = list(TEACHERS)


@pytest.mark.parametrize("env_id", ENV_IDS)
def test_env_passes_gymnasium_check_env_without_warnings(env_id):
    env = gym.make(env_id)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check_env(env.unwrapped)
    assert [str(w.message) for w in caught] == []


@pytest.mark.parametrize("env_id", ENV_IDS)
def test_module_colon_id_form_imports_and_makes_the_env(env_id):
    env = gym.make(f"envs:{env_id}")
    obs, info = env.reset(seed=3)
    assert isinstance(obs, str) and obs
    assert [tool["function"]["name"] for tool in info["tools"]]


@pytest.mark.parametrize("env_id", ENV_IDS)
def test_reset_is_deterministic_in_the_seed(env_id):
    env = gym.make(env_id)
    assert env.reset(seed=11)[0] == env.reset(seed=11)[0]
    prompts = {env.reset(seed=s)[0] for s in range(20)}
    assert len(prompts) > 10


def _policy_turns(env_id: str) -> int:
    """The policy's turn budget for ``env_id`` in the env's config (runtime.max_turns), which the teacher gets."""
    from omegaconf import OmegaConf

    name = {"Calculator-v0": "calculator", "SQL-v0": "sql", "Shop-v0": "shop", "Code-v0": "code",
            "FrozenLakeText-v0": "frozenlake", "TaxiText-v0": "taxi"}[env_id]  # fmt: skip
    conf = OmegaConf.load(f"{CONF}/env/{name}.yaml")
    return int(OmegaConf.select(conf, "runtime.max_turns", default=RuntimeConfig().max_turns))


@pytest.mark.parametrize("env_id", ENV_IDS)
def test_expert_teacher_solves_every_test_task_within_the_policys_turn_budget(env_id):
    from rl_agents.collect import teacher_episode

    env = gym.make(env_id, split="test")
    teacher, turns = TEACHERS[env_id](noise=0.0), _policy_turns(env_id)
    for seed in range(1_000_000, 1_000_040):
        trajectory = teacher_episode(env, teacher, seed, env_id, turns)
        assert trajectory.metadata["split"] == "test"
        assert trajectory.success and trajectory.reward == 1.0, (
            seed,
            [(t.agent, t.observation) for t in trajectory.turns],
        )


@pytest.mark.parametrize("env_id", ENV_IDS)
def test_splits_are_disjoint_by_task_and_deterministic_in_the_seed(env_id):
    """A test task is never a train task: the split is a function of the task's key, not of the seed."""
    train_env = gym.make(env_id, split="train")
    train = {train_env.reset(seed=s)[1]["task_key"] for s in range(300)}
    env = gym.make(env_id, split="test")
    test = []
    for seed in range(1_000_000, 1_000_060):
        obs, info = env.reset(seed=seed)
        assert info["split"] == "test" == task_split(info["task_key"])
        assert env.reset(seed=seed)[0] == obs  # the same draw again
        test.append(info["task_key"])
    assert not train & set(test)
    assert {task_split(key) for key in train} == {"train"}
    # options override the constructor's split, and a draw without a split may land anywhere
    assert env.reset(seed=5, options={"split": "val"})[1]["split"] == "val"
    any_env = gym.make(env_id)
    anywhere = {any_env.reset(seed=s)[1]["split"] for s in range(200)}
    assert anywhere == {"train", "val", "test"}


def test_task_keys_ignore_surface_variation_and_split_shares_follow_the_hash():
    env = gym.make("Calculator-v0").unwrapped
    same = [
        Task("What is 12 + 3?", "15", {"expression": "12 + 3"}),
        Task("Compute 12 + 3.", "15", {"expression": "12 + 3"}),
    ]
    assert env.task_key(same[0]) == env.task_key(same[1])
    shares = Counter(task_split(str(i)) for i in range(20_000))
    assert abs(shares["train"] / 20_000 - 0.8) < 0.02 and abs(shares["test"] / 20_000 - 0.1) < 0.01
    with pytest.raises(ValueError, match="split must be one of"):
        gym.make("Calculator-v0", split="holdout")


@pytest.mark.parametrize("env_id", ENV_IDS)
def test_noisy_teacher_fails_about_as_often_as_its_noise(env_id):
    from rl_agents.collect import collect

    _, stats = collect(env_id, {}, TEACHERS[env_id](noise=0.5), list(range(150)), 24, progress=False)
    assert 0.3 < stats["teacher_success_rate"] < 0.9


@pytest.mark.parametrize("env_id", ["Calculator-v0", "Code-v0"])
def test_collect_workers_change_nothing_but_the_wall_time(env_id):
    """Each worker thread copies the scripted teacher, whose per-episode state (its noise draw) would race if
    shared: the episodes in seed order are the serial ones, turn for turn, and the teacher is left untouched."""
    from rl_agents.collect import bench, collect

    teacher, seeds = TEACHERS[env_id](noise=0.5), list(range(40))
    serial, serial_stats = collect(env_id, {}, teacher, seeds, 8, keep="all", progress=False)
    state = (teacher.lazy, teacher.rng.bit_generator.state)
    threaded, threaded_stats = collect(env_id, {}, teacher, seeds, 8, keep="all", progress=False, workers=4)
    assert (teacher.lazy, teacher.rng.bit_generator.state) == state
    assert [t.to_dict() for t in threaded] == [t.to_dict() for t in serial]
    assert threaded_stats == serial_stats and 0 < serial_stats["teacher_success_rate"] < 1
    with pytest.raises(ValueError, match="collect.workers"):
        collect(env_id, {}, teacher, seeds, 8, progress=False, workers=0)
    seconds = bench(env_id, teacher, 4, [1, 2], rounds=1)  # python -m rl_agents.collect's timing
    assert sorted(seconds) == [1, 2] and all(s > 0 for s in seconds.values())


def test_perturbed_collection_labels_only_the_experts_turns_and_recovers_from_off_path_states():
    """collect.perturb (DART): a perturbed turn is a random action kept as context (mask 0); every labelled turn is
    the planner's own action in the state the episode had reached, so the data shows states off the expert's path
    (walls bumped, a pickup in the wrong place) and the way back from them, episode by episode reproducible."""
    from rl_agents.collect import collect
    from rl_agents.trajectory import Trajectory

    teacher, seeds = PlannerTeacher(), list(range(60))
    plain, plain_stats = collect("TaxiText-v0", {}, teacher, seeds, 24, progress=False)
    everything, stats = collect("TaxiText-v0", {}, teacher, seeds, 24, "all", progress=False, perturb=0.2)
    kept, _ = collect("TaxiText-v0", {}, teacher, seeds, 24, progress=False, perturb=0.2)
    assert [e.to_dict() for e in kept] == [e.to_dict() for e in everything if e.success] and len(kept) > 50
    assert plain_stats["perturbed_turns"] == 0 and all(t.imitate for e in plain for t in e.turns)
    perturbed = [t for e in everything for t in e.turns if not t.imitate]
    assert stats["perturbed_turns"] == len(perturbed) > 0.1 * sum(len(e.turns) for e in everything)
    assert stats["error_kinds"].get("tool_error", 0) > 0  # random pickups and drop-offs in the wrong place
    assert len({tuple(t.agent for t in e.turns) for e in kept}) > len({tuple(t.agent for t in e.turns) for e in plain})
    env = gym.make("TaxiText-v0", split="train")
    for episode in kept:
        env.reset(seed=episode.metadata["seed"])
        for turn in episode.turns:
            if turn.imitate:  # the expert's action in the state reached, whatever led there
                assert turn.agent == teacher.expert(env.unwrapped, [])
            env.step(turn.agent)
        assert episode.success and episode.turns[-1].imitate == (episode.turns[-1].agent == tool_call("dropoff"))
    again, _ = collect("TaxiText-v0", {}, teacher, seeds, 24, progress=False, perturb=0.2, workers=2)
    assert [e.to_dict() for e in again] == [e.to_dict() for e in kept]
    reread = Trajectory.from_dict(kept[0].to_dict())
    assert [t.imitate for t in reread.turns] == [t.imitate for t in kept[0].turns]
    with pytest.raises(ValueError, match=r"collect.perturb=0.1 needs a teacher with perturbation.*CalculatorTeacher"):
        collect("Calculator-v0", {}, CalculatorTeacher(), seeds, 8, progress=False, perturb=0.1)
    with pytest.raises(ValueError, match=r"collect.perturb must be in \[0, 1\)"):
        collect("TaxiText-v0", {}, teacher, seeds, 24, progress=False, perturb=1.0)


def test_parse_turn_reads_tool_calls_answers_and_reasoning():
    call = parse_turn(
        '<think>x</think><tool_call>{"name": "calculator", "arguments": {"expression": "1+1"}}</tool_call>'
    )
    assert call == ToolCall("calculator", {"expression": "1+1"})
    assert parse_turn("<think>maybe <answer>3</answer>?</think><answer> 42 </answer>") == Answer("42")
    assert parse_turn("<tool_call>{bad json</tool_call>").kind == "malformed_json"
    assert parse_turn('<tool_call>["calculator"]</tool_call>').kind == "malformed_call"
    assert parse_turn('<tool_call>{"name": "c", "arguments": 3}</tool_call>').kind == "malformed_call"
    assert parse_turn("just words").kind == "no_action"
    assert parse_turn("x" * 50, max_chars=10).kind == "action_too_long"


@pytest.mark.parametrize(
    ("action", "kind"),
    [
        ("<tool_call>{not json}</tool_call>", "malformed_json"),
        ('<tool_call>{"arguments": {}}</tool_call>', "malformed_call"),
        ('<tool_call>{"name": "python", "arguments": {"code": "1"}}</tool_call>', "unknown_tool"),
        ('<tool_call>{"name": "calculator", "arguments": {}}</tool_call>', "bad_arguments"),
        ('<tool_call>{"name": "calculator", "arguments": {"expression": 7}}</tool_call>', "bad_arguments"),
        ('<tool_call>{"name": "calculator", "arguments": {"expression": "1", "x": 1}}</tool_call>', "bad_arguments"),
        (
            '<tool_call>{"name": "calculator", "arguments": {"expression": "__import__(\'os\')"}}</tool_call>',
            "tool_error",
        ),
        ('<tool_call>{"name": "calculator", "arguments": {"expression": "1/0"}}</tool_call>', "tool_error"),
        ("I think the answer is five", "no_action"),
        ("<answer>" + "9" * 2000 + "</answer>", "action_too_long"),
    ],
)
def test_bad_turns_become_error_observations_with_a_counted_kind(action, kind):
    env = gym.make("Calculator-v0", fail_prob=0.0)
    env.reset(seed=0)
    obs, reward, terminated, truncated, info = env.step(action)
    assert obs.startswith("ERROR:") and info["error"] == kind
    assert info["error_counts"] == {kind: 1}
    assert (reward, terminated, truncated) == (0.0, False, False)


def test_a_tool_that_raises_becomes_a_tool_exception_observation():
    env = gym.make("Calculator-v0", fail_prob=0.0)
    env.reset(seed=0)
    env.unwrapped.tools["calculator"] = env.unwrapped.tools["calculator"].__class__(
        name="calculator", description="", parameters={"type": "object"}, fn=lambda **_: 1 / 0
    )
    obs, _, _, _, info = env.step(tool_call("calculator", expression="1"))
    assert info["error"] == "tool_exception" and "ZeroDivisionError" in obs


def test_calculator_times_out_transiently_and_the_teacher_retries():
    env = gym.make("Calculator-v0", fail_prob=0.5)
    kinds = []
    for seed in range(20):
        env.reset(seed=seed)
        expression = env.unwrapped.task.extra["expression"]
        obs, *_, info = env.step(tool_call("calculator", expression=expression))
        kinds.append(info["error"])
        if info["error"] == "tool_timeout":
            assert obs == "ERROR: timeout, try again"
    assert "tool_timeout" in kinds and None in kinds


def test_step_budget_truncates_the_episode():
    env = gym.make("Calculator-v0", max_episode_steps=3)
    env.reset(seed=0)
    results = [env.step("no action here") for _ in range(3)]
    assert [r[3] for r in results] == [False, False, True]


def test_calculator_evaluates_arithmetic_only():
    assert evaluate_arithmetic("12 * (3 + 4) - 2 ** 3") == 76
    assert evaluate_arithmetic("-7 // 2") == -4
    for bad in ["__import__('os').system('ls')", "a + 1", "[1, 2]", "9 ** 9999", "1 if 1 else 2", "1" * 300]:
        with pytest.raises(Exception) as err:
            evaluate_arithmetic(bad)
        assert type(err.value).__name__ == "ToolError"


@pytest.mark.parametrize(
    "query",
    [
        "DELETE FROM employees",
        "INSERT INTO departments VALUES (99, 'X', 'Y')",
        "DROP TABLE orders",
        "ATTACH DATABASE '/tmp/x.db' AS x",
        "PRAGMA writable_schema = 1",
        "CREATE TABLE t (x)",
        "SELECT 1; DELETE FROM employees",
    ],
)
def test_sql_tool_is_read_only(query):
    env = gym.make("SQL-v0")
    env.reset(seed=0)
    before = env.unwrapped.db.execute("SELECT COUNT(*) FROM employees").fetchone()
    obs, *_, info = env.step(tool_call("sql", query=query))
    assert info["error"] == "tool_error" and obs.startswith("ERROR: SQL error")
    env.unwrapped.db.set_authorizer(None)
    assert env.unwrapped.db.execute("SELECT COUNT(*) FROM employees").fetchone() == before
    assert env.unwrapped.db.execute("SELECT COUNT(*) FROM sqlite_master WHERE name = 't'").fetchone() == (0,)


def test_sql_tool_stops_slow_queries_and_caps_rows():
    env = gym.make("SQL-v0", time_limit_s=0.2, max_rows=5)
    env.reset(seed=0)
    slow = "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT COUNT(*) FROM c"
    obs, *_, info = env.step(tool_call("sql", query=slow))
    assert info["error"] == "tool_error" and "time limit" in obs
    obs, *_, info = env.step(tool_call("sql", query="SELECT name FROM employees"))
    assert info["error"] is None
    assert obs.splitlines()[0] == "name" and len(obs.splitlines()) == 1 + 5 + 1 and "first 5 rows" in obs


SQL_BOMBS = [
    "SELECT randomblob(300000000) FROM employees",
    "SELECT length(randomblob(300000000)) FROM employees",
    "SELECT printf('%.*c', 100000000, 'x')",
    "WITH RECURSIVE r(s) AS (SELECT 'xx' UNION ALL SELECT s || s FROM r) SELECT length(s) FROM r",
    "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r LIMIT 100000000) SELECT n FROM r ORDER BY n DESC",
    "SELECT zeroblob(99999), zeroblob(99999), zeroblob(99999) FROM employees",
]


def test_one_sql_call_is_bounded_in_time_and_memory_whatever_the_query():
    """The queries that took 9-45 s and gigabytes in one step each end within the time limit (plus the
    interpreter's start) in a process that never grows past a few hundred MB, with an observation."""
    import subprocess
    import sys

    script = (
        "import json, sys, time, gymnasium as gym, envs\n"
        "env = gym.make('SQL-v0')\n"
        "for q in json.loads(sys.argv[1]):\n"
        "    env.reset(seed=1); t = time.perf_counter()\n"
        "    call = json.dumps({'name': 'sql', 'arguments': {'query': q}})\n"
        "    obs, *_ = env.step('<tool_call>' + call + '</tool_call>')\n"
        "    print(json.dumps({'s': time.perf_counter() - t, 'obs': obs}))\n"
        "peak = [line for line in open('/proc/self/status') if line.startswith('VmHWM')][0].split()[1]\n"
        "print(json.dumps({'peak_mb': int(peak) / 1024}))\n"
    )
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-c", script, json.dumps(SQL_BOMBS)], cwd=root, capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    *steps, memory = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(steps) == len(SQL_BOMBS)
    for query, step in zip(SQL_BOMBS, steps):
        assert step["s"] < 1.0 + 1.0, query  # time_limit_s is 1 s; no call may run past it by more than 1 s
        assert len(step["obs"]) <= 2000, query
    assert memory["peak_mb"] < 300  # the peak resident memory of this process (before the limits: several GB)
    assert "too big" in steps[0]["obs"] and "too big" in steps[3]["obs"]
    assert "<blob of 99999 bytes>" in steps[5]["obs"]


def test_sql_database_is_an_in_memory_sqlite_per_seed():
    env = gym.make("SQL-v0")
    env.reset(seed=1)
    db = env.unwrapped.db
    assert isinstance(db, sqlite3.Connection)
    tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert tables == {"departments", "employees", "orders"}


def test_answers_match_numbers_numerically_and_text_case_insensitively():
    assert answers_match("52345.0", "52345") and answers_match(" 1,200 ", "1200")
    assert answers_match("paris.", "Paris") and not answers_match("41", "42")


def test_integer_answers_are_exact_however_large():
    assert not answers_match("4908601", "4908600") and not answers_match("-6582825", "-6582824")
    assert not answers_match("123456789012345678901", "123456789012345678900")
    assert answers_match("123456789012345678900.0", "123456789012345678900")
    assert not answers_match("nan", "12") and not answers_match("inf", "inf1")
    # a tolerance applies only where a task declares a float answer
    assert answers_match("3.14159", "3.1416", rel_tol=1e-4) and not answers_match("3.14159", "3.1416")


def test_calculator_refuses_an_answer_off_by_one_on_a_large_result():
    env = gym.make("Calculator-v0")
    seed = next(s for s in range(1000) if abs(int(env.reset(seed=s)[0] and env.unwrapped.task.answer)) > 10**6)
    env.reset(seed=seed)
    truth = int(env.unwrapped.task.answer)
    _, reward, terminated, _, info = env.step(f"<answer>{truth + 1}</answer>")
    assert terminated and reward == 0.0 and not info["success"]
    env.reset(seed=seed)
    assert env.step(f"<answer>{truth}</answer>")[1] == 1.0


@pytest.mark.parametrize("env_id", ENV_IDS)
def test_a_terminated_episode_pays_nothing_more(env_id):
    env = gym.make(env_id)
    teacher = TEACHERS[env_id](noise=0.0)
    task, _ = env.reset(seed=2)
    teacher.begin(env.unwrapped, np.random.default_rng(2))
    history, total = [], 0.0
    while True:
        action = teacher.act(env.unwrapped, task, history)
        obs, reward, terminated, truncated, _ = env.step(action)
        history.append((action, obs))
        total += reward
        if terminated or truncated:
            break
    assert terminated and total == 1.0
    with pytest.raises(gym.error.ResetNeeded, match="terminated"):
        env.step(history[-1][0])  # the winning action again
    env.reset(seed=2)  # and a reset starts a new episode


@pytest.mark.parametrize("env_id", ENV_IDS)
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    turn=st.one_of(
        st.text(max_size=300),
        st.builds(lambda s: f"<tool_call>{s}</tool_call>", st.text(max_size=200)),
        st.builds(
            lambda name, args: f"<tool_call>{json.dumps({'name': name, 'arguments': args})}</tool_call>",
            st.sampled_from(
                [
                    "calculator",
                    "sql",
                    "search",
                    "open",
                    "choose",
                    "buy",
                    "run_tests",
                    "submit",
                    "move",
                    "pickup",
                    "nope",
                ]
            ),
            st.dictionaries(
                st.sampled_from(["expression", "query", "item_id", "option", "value", "code", "direction", "x"]),
                st.one_of(
                    st.text(max_size=80),
                    st.integers(),
                    st.none(),
                    st.sampled_from(["left", "north", "color", "def f(): pass"]),
                ),
            ),
        ),
        st.builds(lambda s: f"<answer>{s}</answer>", st.text(max_size=50)),
    )
)
def test_fuzzed_agent_turns_never_raise(env_id, turn):
    env = gym.make(env_id)
    env.reset(seed=0)
    obs, reward, terminated, truncated, info = env.step(turn)
    assert env.unwrapped.observation_space.contains(obs)
    assert info["error"] in (None, *ERROR_KINDS)
    assert isinstance(parse_turn(turn), (ToolCall, Answer, ParseError))


def play(env, actions: list[str]):
    out = None
    for action in actions:
        out = env.step(action)
        if out[2] or out[3]:
            break
    return out


def test_shop_rewards_partial_matches_webshop_style():
    env = gym.make("Shop-v0")
    env.reset(seed=5)
    shop = env.unwrapped
    goal = shop.goal
    near_miss = next(p for p in shop.catalogue.values() if p.category == goal.category and p.price > goal.max_price)
    color = goal.options["color"] if goal.options["color"] in near_miss.colors else near_miss.colors[0]
    obs, reward, terminated, _, info = play(
        env,
        [
            tool_call("search", query=" ".join(goal.features) + " " + goal.category),
            tool_call("open", item_id=near_miss.item_id),
            tool_call("choose", option="color", value=color),
            tool_call("buy"),
        ],
    )
    expected = (2 + (color == goal.options["color"])) / 5  # both features, maybe the colour; no size, over price
    assert terminated and not info["success"] and reward == pytest.approx(expected)
    env.reset(seed=5)
    obs, reward, terminated, _, info = play(
        env,
        [
            tool_call("open", item_id=goal.target),
            tool_call("choose", option="color", value=goal.options["color"]),
            tool_call("choose", option="size", value=goal.options["size"]),
            tool_call("buy"),
        ],
    )
    assert terminated and info["success"] and reward == 1.0


def test_shop_tools_refuse_out_of_order_or_unknown_choices():
    env = gym.make("Shop-v0")
    env.reset(seed=1)
    for action, message in [
        (tool_call("buy"), "open a product first"),
        (tool_call("choose", option="color", value="red"), "open a product first"),
        (tool_call("open", item_id="99999"), "no product"),
        (tool_call("search", query="   "), "empty search"),
    ]:
        obs, reward, terminated, _, info = env.step(action)
        assert info["error"] == "tool_error" and message in obs and not terminated
    item = next(iter(env.unwrapped.catalogue))
    env.step(tool_call("open", item_id=item))
    obs, *_, info = env.step(tool_call("choose", option="flavour", value="x"))
    assert "unknown option" in obs and info["error"] == "tool_error"


def test_expert_shop_episode_takes_at_least_four_tool_calls():
    from rl_agents.collect import collect

    trajectories, stats = collect("Shop-v0", {}, ShopTeacher(), list(range(20)), 12, progress=False)
    assert stats["teacher_success_rate"] == 1.0
    assert min(sum(t.tool is not None for t in traj.turns) for traj in trajectories) >= 4


@pytest.mark.parametrize("budget_first", [False, True])
def test_explaining_shop_expert_reads_the_page_up_to_its_pick_and_each_verdict_holds(budget_first):
    from rl_agents.collect import collect

    teacher = ShopTeacher(explain=True, budget_first=budget_first)
    trajectories, stats = collect("Shop-v0", {}, teacher, list(range(60)), 12, progress=False)
    assert stats["teacher_success_rate"] == 1.0
    env = gym.make("Shop-v0", split="train").unwrapped
    lengths = set()
    for traj in trajectories:
        env.reset(seed=traj.metadata["seed"])
        page, pick = traj.turns[0].observation, traj.turns[1]
        verdicts = re.findall(r"\[(\d+)\] (.*?)(?= \[|</think>)", pick.agent)
        listed = re.findall(r"^\[(\d+)\]", page, re.MULTILINE)
        assert [i for i, _ in verdicts] == listed[: len(verdicts)]  # line by line, in the page's order
        *ruled_out, (chosen, last) = verdicts
        assert chosen == env.goal.target and last.endswith("open it.") and f'"item_id": "{chosen}"' in pick.agent
        for item_id, verdict in ruled_out:  # each reason is true of that product
            product = env.catalogue[item_id]
            form = r"\$([\d.]+) against (\d+): over\." if budget_first else r"\$([\d.]+) is over (\d+)\."
            price = re.fullmatch(form, verdict)
            assert price and float(price[1]) == product.price > env.goal.max_price == int(price[2])
        lengths.add(len(verdicts))
    assert lengths == {1, 2, 3}  # the pick is not always the first line
    assert "Open the best match." in ShopTeacher().expert(env, [(tool_call("search", query="x"), page)])


def test_frozen_lake_text_hole_ends_the_episode_and_the_goal_succeeds():
    env = gym.make("FrozenLakeText-v0")
    for seed in range(50):  # find a map with a hole next to the start
        task, _ = env.reset(seed=seed)
        if "right H" in task or "down H" in task:
            break
    direction = "right" if "right H" in task else "down"
    obs, reward, terminated, truncated, info = env.step(tool_call("move", direction=direction))
    assert terminated and reward == 0.0 and not info["success"] and "hole" in obs
    env.reset(seed=seed)
    obs, reward, terminated, truncated, info = env.step(tool_call("move", direction="diagonal"))
    assert info["error"] == "bad_arguments" and not terminated


def test_taxi_text_illegal_pickup_is_a_tool_error_and_dropoff_at_the_destination_succeeds():
    env = gym.make("TaxiText-v0")
    for seed in range(50):
        env.reset(seed=seed)
        row, col, passenger, _ = env.unwrapped._decode()
        if passenger < 4 and (row, col) != env.unwrapped.inner.locs[passenger]:
            break
    obs, reward, terminated, _, info = env.step(tool_call("pickup"))
    assert info["error"] == "tool_error" and not terminated
    assert info["env_return"] == -10
    teacher = PlannerTeacher()
    out = env.step(teacher.act(env.unwrapped, "", []))
    while not (out[2] or out[3]):
        out = env.step(teacher.act(env.unwrapped, "", []))
    assert out[4]["success"] and out[1] == 1.0 and "dropped off" in out[0]


def test_code_env_grades_in_the_sandbox_and_reports_the_first_failure():
    env = gym.make("Code-v0")
    env.reset(seed=3)
    code_env = env.unwrapped
    params = code_env.task.extra["params"]
    good = code_env.problem.solution.format(**params)
    obs, *_ = env.step(tool_call("run_tests", code=good))
    assert obs == f"passed {code_env.n_examples}/{code_env.n_examples} examples"
    obs, *_ = env.step(tool_call("run_tests", code=f"def {code_env.problem.name}(*a):\n    return None"))
    assert obs.startswith("passed 0/") and "first failure" in obs and "returned null, expected" in obs
    obs, *_ = env.step(tool_call("run_tests", code="def nothing(): pass"))
    assert "defines no function" in obs
    obs, reward, terminated, _, info = env.step(tool_call("submit", code=good))
    assert terminated and info["success"] and reward == 1.0


def _lookup_table(name: str, revealed: dict[str, object]) -> str:
    """Code that answers the revealed inputs from a table and nothing else (the probing attack)."""
    body = "return json.loads(TABLE).get(json.dumps(list(args)))"
    return f"import json\nTABLE = {json.dumps(revealed)!r}\ndef {name}(*args):\n    {body}"


@pytest.mark.parametrize("seed", range(12))
def test_code_reward_cannot_be_won_by_hard_coding_what_run_tests_reveals(seed):
    """The attack: call run_tests, hard-code each revealed input and expected value, repeat until run_tests
    passes, submit. The examples are not the hidden tests, so the table earns nothing."""
    env = gym.make("Code-v0", max_episode_steps=20)
    env.reset(seed=seed)
    name, revealed = env.unwrapped.problem.name, {}
    for _ in range(10):
        obs, *_ = env.step(tool_call("run_tests", code=_lookup_table(name, revealed)))
        failure = re.search(rf"first failure: {name}\((.*)\) returned .*, expected (.*)$", obs)
        if failure is None:
            break
        args = json.loads(f"[{failure.group(1)}]")
        revealed[json.dumps(args)] = json.loads(failure.group(2))
    assert obs.startswith("passed 3/3 examples"), obs  # the attack did learn every example
    obs, reward, terminated, _, info = env.step(tool_call("submit", code=_lookup_table(name, revealed)))
    assert terminated and reward == 0.0 and not info["success"], obs
    hidden = {json.dumps(args) for args, _ in env.unwrapped.tests}
    assert not hidden & {json.dumps(args) for args, _ in env.unwrapped.examples}


@pytest.mark.parametrize(
    "env_id", ["Calculator-v0", "SQL-v0", "Shop-v0", "Code-v0", "FrozenLakeText-v0", "TaxiText-v0"]
)
def test_each_env_documents_its_gym_make_call_with_every_keyword_and_default(env_id):
    """Gymnasium's convention: the env class's docstring gives the exact ``gymnasium.make`` call under ``##
    Arguments``, every keyword with its default, and an ``## Information`` section; the defaults live in
    ``__init__`` only (conf/env/*.yaml sets only what it changes)."""
    import inspect

    import yaml

    cls = type(gym.make(env_id).unwrapped)
    doc = inspect.getdoc(cls)
    assert "## Arguments" in doc and "## Information" in doc
    call = re.search(r'gymnasium\.make\("' + re.escape(env_id) + r'"(.*?)\)\n', doc, re.S)
    assert call, doc
    documented = dict(re.findall(r"(\w+)=([^,\s)]+)", call.group(1)))
    keywords = {}
    for klass in reversed(cls.__mro__):
        if "__init__" in vars(klass):
            for name, p in inspect.signature(klass.__init__).parameters.items():
                if p.default is not inspect.Parameter.empty:
                    keywords[name] = p.default
    assert set(documented) == set(keywords) | {"max_episode_steps"}
    for name, default in keywords.items():
        assert documented[name] == repr(default).replace("100000", "100_000"), name
    assert documented["max_episode_steps"] == str(gym.spec(env_id).max_episode_steps)
    conf = Path(__file__).resolve().parents[1] / "conf" / "env"
    for path in conf.glob("*.yaml"):
        data = yaml.safe_load(path.read_text())
        entries = (data.get("env", data) or {}).get("envs", {})
        for key, value in ((entries.get(env_id) or {}).get("kwargs") or {}).items():
            assert value != keywords[key], f"{path.name} repeats {env_id}'s default {key}={value!r}"


def test_the_unseen_letter_probe_draws_letters_no_code_task_names_and_its_teacher_solves_them():
    """docs/examples/code_letters.py: every task is count_char or replace_char with a letter outside
    envs.code.LETTERS; the teacher solves each, and a count_char solution with a letter the training tasks know
    (the failure the probe looks for) does not pass its hidden tests."""
    import importlib.util

    from envs.code import LETTERS
    from rl_agents.collect import teacher_episode

    path = Path(__file__).parents[1] / "docs/examples/code_letters.py"
    spec = importlib.util.spec_from_file_location("code_letters", path)
    probe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probe)
    env = gym.wrappers.TimeLimit(probe.UnseenLetterCode(), 8)
    problems = Counter()
    for seed in range(16):
        episode = teacher_episode(env, CodeTeacher(), seed, "Code-v0", max_turns=8)
        code_env = env.unwrapped
        params = code_env.task.extra["params"]
        assert episode.success and set(params.values()) & set(probe.UNSEEN), params
        assert not set(params.values()) - set(probe.UNSEEN) - set(LETTERS)
        problems[code_env.problem.name] += 1
        if code_env.problem.name == "count_char":
            wrong = code_env.problem.solution.format(a="s")
            assert code_env.grade(wrong)[0] < code_env.n_tests
    assert set(problems) == {"count_char", "replace_char"}
