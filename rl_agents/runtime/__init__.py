"""The runtime of a compiled agent: run a policy's episodes in tool environments, batched, KV cache reused.

Read ``engine.py`` first (``Runtime``: the slots, the episode state machine, one packed pass a step); the
others are parts a reader can skip:

    config.py      RuntimeConfig, the checks of its worker options
    cache.py       SlotCache: each slot's keys and values in place, slots in regions
    attention.py   _Pass: the packed forward pass's layout; slot_attention, the attention it runs
    drafting.py    n-gram drafts from the episode itself and their verification (speculative decoding)
    workers.py     worker processes, each running a share of a run's episodes; Feed, a stream's episodes
"""

from rl_agents.runtime.attention import SLOT_ATTENTION, slot_attention
from rl_agents.runtime.cache import REGION_SLOTS, SlotCache
from rl_agents.runtime.config import RuntimeConfig, check_workers
from rl_agents.runtime.drafting import NgramDrafter, NgramIndex, speculative_token, verify_draft
from rl_agents.runtime.engine import Runtime
from rl_agents.runtime.workers import Feed

__all__ = [
    "REGION_SLOTS",
    "SLOT_ATTENTION",
    "Feed",
    "NgramDrafter",
    "NgramIndex",
    "Runtime",
    "RuntimeConfig",
    "SlotCache",
    "check_workers",
    "slot_attention",
    "speculative_token",
    "verify_draft",
]
