"""rl_agents: compile agent workflows into model weights."""

import envs  # noqa: F401  (registers the six tool environments with Gymnasium)

__version__ = "0.1.0"

__all__ = ["Agent", "compile_agent"]


def __getattr__(name: str):
    # rl_agents.compile_agent and rl_agents.Agent, imported on first use: ``import rl_agents`` stays light
    if name == "compile_agent":
        from rl_agents.api import compile_agent

        return compile_agent
    if name == "Agent":
        from rl_agents.agent import Agent

        return Agent
    raise AttributeError(f"module 'rl_agents' has no attribute {name!r}")
