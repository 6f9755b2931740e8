"""rl_agents: compile agent workflows into model weights."""

import envs  # noqa: F401  (registers Calculator-v0 and SQL-v0 with Gymnasium)

__version__ = "0.1.0"
