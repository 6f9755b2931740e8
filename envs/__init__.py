"""Gymnasium text tool environments, registered on import.

``gymnasium.make("Calculator-v0")`` works once this package is imported (``rl_agents`` imports it);
``gymnasium.make("envs:Calculator-v0")`` imports it first, as does the ``"module:EnvId-v0"`` form for a
user's own package.
"""

from gymnasium.envs.registration import register, registry

from envs.base import Answer, ParseError, Task, Tool, ToolCall, ToolEnv, ToolError, parse_turn
from envs.teacher import ScriptedTeacher

__all__ = ["Answer", "ParseError", "ScriptedTeacher", "Task", "Tool", "ToolCall", "ToolEnv", "ToolError", "parse_turn"]

for _id, _entry in [("Calculator-v0", "envs.calculator:CalculatorEnv"), ("SQL-v0", "envs.sql:SQLEnv")]:
    if _id not in registry:
        register(id=_id, entry_point=_entry, max_episode_steps=8)
