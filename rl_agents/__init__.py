"""rl_agents: compile agent workflows into model weights."""

import envs  # noqa: F401  (registers the six tool environments with Gymnasium)

__version__ = "0.1.0"
