"""Gymnasium text tool environments, registered on import.

``gymnasium.make("Calculator-v0")`` works once this package is imported (``rl_agents`` imports it);
``gymnasium.make("envs:Calculator-v0")`` imports it first, as does the ``"module:EnvId-v0"`` form for a
user's own package.
"""

from gymnasium.envs.registration import register, registry

from envs.base import Answer, Finish, ParseError, Task, Tool, ToolCall, ToolEnv, ToolError, parse_turn
from envs.teacher import ScriptedTeacher

__all__ = [
    "Answer",
    "Finish",
    "ParseError",
    "ScriptedTeacher",
    "Task",
    "Tool",
    "ToolCall",
    "ToolEnv",
    "ToolError",
    "parse_turn",
]

_ENVS = [
    ("Calculator-v0", "envs.calculator:CalculatorEnv", 8),
    ("SQL-v0", "envs.sql:SQLEnv", 8),
    ("Shop-v0", "envs.shop:ShopEnv", 12),
    ("Code-v0", "envs.code:CodeEnv", 8),
    ("FrozenLakeText-v0", "envs.gym_text:FrozenLakeTextEnv", 16),
    ("TaxiText-v0", "envs.gym_text:TaxiTextEnv", 24),
]
for _id, _entry, _steps in _ENVS:
    if _id not in registry:
        register(id=_id, entry_point=_entry, max_episode_steps=_steps)
