"""rl_agents: compile agent workflows into model weights."""

import envs  # noqa: F401  (registers the six tool environments with Gymnasium)

__version__ = "0.1.0"

__all__ = ["compile_agent"]


def __getattr__(name: str):
    # rl_agents.compile_agent, imported on first use: ``import rl_agents`` stays light (no torch, no trainers)
    if name == "compile_agent":
        from rl_agents.api import compile_agent

        return compile_agent
    raise AttributeError(f"module 'rl_agents' has no attribute {name!r}")
