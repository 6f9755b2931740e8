"""Hydra's configs, installed with the package as ``rl_agents.conf`` (pkg://rl_agents.conf)."""
