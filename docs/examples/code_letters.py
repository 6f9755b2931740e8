"""A copy probe for Code-v0: letter tasks with letters that no Code-v0 task names.

Code-v0's ``count_char`` and ``replace_char`` take their letters from ``envs.code.LETTERS``, so a letter is part of
the task's key and each ``count_char`` letter is one task: the test split holds two whose letter no training
``count_char`` counts, and the validation split none. This probe asks what those two test tasks ask, on tasks that
belong to no split at all: ``count_char`` and ``replace_char`` with letters outside ``LETTERS`` (that the
problems' words contain), so a policy that copies the letter its task names passes and one that writes a letter it
learned does not. No training stage ever sees these tasks, and they are not test tasks: a choice made on them is
not made on test.

    python docs/examples/code_letters.py <policy dir> [episodes=200]

prints one JSON line: success over the episodes, per problem, and the letters written in place of the task's.
"""

from __future__ import annotations

import json
import re
import sys
from collections import Counter

import gymnasium as gym
import numpy as np

import envs  # noqa: F401 - registers Code-v0
from envs.code import LETTERS, PROBLEMS, CodeEnv
from rl_agents import Agent

UNSEEN = [c for c in "bcdgmp" if c not in LETTERS]  # common in the problems' words (cat, apple, moon, garden)
BY_NAME = {problem.name: problem for problem in PROBLEMS}


class UnseenLetterCode(CodeEnv):
    """Code-v0 drawing only ``count_char`` and ``replace_char``, each with a letter outside ``LETTERS``."""

    def draw_problem(self, rng: np.random.Generator):
        if rng.random() < 0.5:
            return BY_NAME["count_char"], {"a": str(rng.choice(UNSEEN))}
        a, b = (str(c) for c in rng.choice(UNSEEN + LETTERS, size=2, replace=False))
        while a not in UNSEEN and b not in UNSEEN:
            a, b = (str(c) for c in rng.choice(UNSEEN + LETTERS, size=2, replace=False))
        return BY_NAME["replace_char"], {"a": a, "b": b}


def main(policy: str, episodes: int = 200) -> dict:
    agent = Agent.from_pretrained(policy, env_id="Code-v0")  # the card's runtime settings, greedy
    trajectories = agent.runtime.run(
        "Code-v0", list(range(episodes)), make_env=lambda: gym.wrappers.TimeLimit(UnseenLetterCode(), 8)
    )
    per_problem, written = Counter(), Counter()
    for trajectory in trajectories:
        problem = trajectory.metadata["task_key"].split(":")[0]
        per_problem[problem, trajectory.success] += 1
        if not trajectory.success and trajectory.turns:
            written.update(re.findall(r"'([a-z])'", trajectory.turns[0].agent))
    report = {
        "policy": policy,
        "episodes": episodes,
        "success_rate": sum(t.success for t in trajectories) / episodes,
        "per_problem": {
            name: per_problem[name, True] / max(1, per_problem[name, True] + per_problem[name, False])
            for name in ("count_char", "replace_char")
        },
        "letters_in_failed_first_turns": dict(written.most_common()),
    }
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main(sys.argv[1], *(int(a) for a in sys.argv[2:]))
