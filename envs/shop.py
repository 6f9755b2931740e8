"""Shop-v0: find and buy the product an instruction describes (after WebShop; documented on ``ShopEnv``)."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field

from envs.base import Finish, Task, Tool, ToolEnv, ToolError
from envs.teacher import ScriptedTeacher, tool_call

CATEGORIES = {  # category: (features, sizes)
    "running shoes": (
        ["waterproof", "lightweight", "breathable", "cushioned", "trail", "wide"], ["7", "8", "9", "10", "11"]
    ),
    "t-shirt": (["cotton", "organic", "slim", "v-neck", "striped", "oversized"], ["xs", "s", "m", "l", "xl"]),
    "backpack": (
        ["waterproof", "leather", "lightweight", "padded", "rolltop", "compact"], ["15l", "20l", "30l", "40l"]
    ),
    "headphones": (
        ["wireless", "foldable", "noise-cancelling", "waterproof", "over-ear", "compact"], ["small", "medium", "large"]
    ),
    "jacket": (["waterproof", "insulated", "hooded", "lightweight", "windproof", "packable"], ["s", "m", "l", "xl"]),
    "water bottle": (["insulated", "steel", "glass", "leakproof", "compact", "lightweight"], ["500ml", "750ml", "1l"]),
}  # fmt: skip
COLORS = ["black", "white", "blue", "red", "green", "grey", "navy", "pink"]
BRANDS = ["Nordik", "Acme", "Lumo", "Vela", "Orbit", "Kestrel", "Tundra", "Pax", "Zephyr", "Mosa"]
PAGE_SIZE = 5
WORD_RE = re.compile(r"[a-z0-9-]+")


@dataclass
class Product:
    item_id: str
    category: str
    brand: str
    features: list[str]
    colors: list[str]
    sizes: list[str]
    price: float

    @property
    def title(self) -> str:
        return f"{self.brand} {' '.join(self.features)} {self.category}"

    def options(self) -> dict[str, list[str]]:
        return {"color": self.colors, "size": self.sizes}


@dataclass
class Goal:
    category: str
    features: list[str]
    options: dict[str, str]
    max_price: int
    target: str  # the id of a product that meets every requirement
    extra: dict = field(default_factory=dict)


def purchase_reward(goal: Goal, product: Product, chosen: dict[str, str]) -> float:
    """WebShop's reward: share of the requirements met, times the category match."""
    if product.category != goal.category:
        return 0.0
    hits = sum(f in product.features for f in goal.features)
    hits += sum(chosen.get(k) == v for k, v in goal.options.items())
    hits += product.price <= goal.max_price
    return hits / (len(goal.features) + len(goal.options) + 1)


class ShopEnv(ToolEnv):
    """Shop-v0: find and buy the product an instruction describes, in a catalogue generated per seed (after WebShop).

    ## Description
    Each seed generates a catalogue of about 40 products (category, brand, features, colour and size options,
    price) and an instruction such as "Find waterproof lightweight running shoes in blue, size 9, under 60
    dollars." The catalogue holds near misses for the requested product: the same category with one of the
    features, or both features above the price limit. The agent searches, reads result and product pages,
    picks options and buys.

    ## Tools
    - ``search(query: str)``: the five best keyword matches (``[id] title $price`` lines).
    - ``open(item_id: str)``: a product page (title, price, features, options); it becomes the current item.
    - ``choose(option: str, value: str)``: select an option (``color`` or ``size``) of the current item.
    - ``buy()``: buy the current item with the chosen options; ends the episode.

    ## Arguments
    ```python
    gymnasium.make("Shop-v0", n_products=40, max_action_chars=1000, max_observation_chars=2000,
                   render_mode=None, split=None, max_episode_steps=12)
    ```
    - ``n_products=40``: catalogue size per seed (near misses included).
    - ``max_action_chars=1000``, ``max_observation_chars=2000``, ``render_mode=None`` (or ``"ansi"``),
      ``split=None`` (``"train"``, ``"val"``, ``"test"``): :class:`envs.base.ToolEnv`'s, as in every tool env.
    - ``max_episode_steps``: Gymnasium's step budget (a ``TimeLimit``).

    ## Information
    :class:`envs.base.ToolEnv`'s keys (``tools``, ``task_key``, ``split`` from ``reset``; ``tool``, ``error``,
    ``success``, ``error_counts`` and ``answer`` from ``step``).

    ## Rewards
    WebShop's: the share of the instruction's requirements the purchase meets, (features matched + options
    matched + price within the limit) / (features + options + 1), times 1 if the category matches, else 0.
    Success is a full match (reward 1.0). An ``<answer>`` without buying gives up (reward 0).

    ## Episode End
    Terminated by ``buy()`` (or an answer); truncated by the step budget (``max_episode_steps``, default 12).
    An expert needs five tool calls: search, open, choose colour, choose size, buy.

    ## Seeds and splits
    ``reset(seed=s)`` fixes the catalogue and the instruction; a task is the instruction with its catalogue
    (``task_key``), and ``split=...`` keeps the tasks of one split.

    ## Version History
    - v0: initial version.
    """

    def __init__(self, n_products: int = 40, **kwargs):
        super().__init__(**kwargs)
        if n_products < 8:
            raise ValueError(f"n_products must be at least 8, got {n_products}")
        self.n_products = n_products
        self.catalogue: dict[str, Product] = {}
        self.goal: Goal | None = None
        self.current: Product | None = None
        self.chosen: dict[str, str] = {}
        self.tools = {
            "search": Tool(
                name="search",
                description="Search the shop; returns the best matches as [id] title $price.",
                parameters=_schema(query={"type": "string"}),
                fn=self._search,
            ),
            "open": Tool(
                name="open",
                description="Open a product page by its id; it becomes the current item.",
                parameters=_schema(item_id={"type": "string"}),
                fn=self._open,
            ),
            "choose": Tool(
                name="choose",
                description="Choose an option (color or size) of the current item.",
                parameters=_schema(option={"type": "string"}, value={"type": "string"}),
                fn=self._choose,
            ),
            "buy": Tool(
                name="buy",
                description="Buy the current item with the chosen options.",
                parameters=_schema(),
                fn=self._buy,
            ),
        }

    # --- the catalogue ------------------------------------------------------------------------
    def _product(
        self, item_id: str, category: str, features: list[str], price: float, colors=None, sizes=None
    ) -> Product:
        rng = self.np_random
        _, all_sizes = CATEGORIES[category]
        if colors is None:
            colors = sorted(rng.choice(COLORS, size=int(rng.integers(2, 5)), replace=False).tolist())
        if sizes is None:
            sizes = [s for s in all_sizes if rng.random() < 0.7] or [all_sizes[0]]
        return Product(item_id, category, str(rng.choice(BRANDS)), features, colors, sizes, price)

    def _new_task(self) -> Task:
        rng = self.np_random
        ids = iter(str(100 + int(x)) for x in rng.choice(900, size=self.n_products, replace=False))
        category = str(rng.choice(list(CATEGORIES)))
        features_pool, _ = CATEGORIES[category]
        wanted = sorted(rng.choice(features_pool, size=2, replace=False).tolist(), key=features_pool.index)
        others = [f for f in features_pool if f not in wanted]
        max_price = int(rng.integers(3, 10)) * 10
        price_ok = lambda: round(float(rng.integers(max_price // 2, max_price)) - 0.01, 2)  # noqa: E731
        price_high = lambda: round(float(rng.integers(max_price + 5, max_price * 2)) - 0.01, 2)  # noqa: E731
        target = self._product(next(ids), category, wanted, price_ok())
        color = str(rng.choice(target.colors))
        size = str(rng.choice(target.sizes))
        products = [target]
        # near misses: one wanted feature only; both features but too expensive
        for _ in range(3):
            products.append(
                self._product(next(ids), category, [str(rng.choice(wanted)), str(rng.choice(others))], price_ok())
            )
        for _ in range(2):
            products.append(self._product(next(ids), category, list(wanted), price_high()))
        while len(products) < self.n_products:
            cat = str(rng.choice([c for c in CATEGORIES if c != category]))
            pool, _ = CATEGORIES[cat]
            feats = sorted(rng.choice(pool, size=2, replace=False).tolist(), key=pool.index)
            products.append(self._product(next(ids), cat, feats, round(float(rng.integers(8, 120)) - 0.01, 2)))
        self.catalogue = {p.item_id: p for p in products}
        self.goal = Goal(category, wanted, {"color": color, "size": size}, max_price, target.item_id)
        self.current, self.chosen = None, {}
        prompt = f"Find {' '.join(wanted)} {category} in {color}, size {size}, under {max_price} dollars, and buy it."
        return Task(prompt=prompt, answer="", extra={"goal": self.goal})

    def task_key(self, task: Task) -> str:
        """The instruction and the catalogue it is carried out in."""
        catalogue = repr(sorted((p.item_id, p.title, p.colors, p.sizes, p.price) for p in self.catalogue.values()))
        return f"{task.prompt}|{hashlib.sha256(catalogue.encode()).hexdigest()[:16]}"

    # --- tools --------------------------------------------------------------------------------
    def _search(self, query: str) -> str:
        words = set(WORD_RE.findall(query.lower()))
        if not words:
            raise ToolError("empty search query")
        scored = []
        for p in self.catalogue.values():
            title = set(WORD_RE.findall(p.title.lower()))
            score = len(words & title)
            if score:
                scored.append((-score, p.item_id))
        if not scored:
            return "No results."
        lines = [
            f"[{i}] {self.catalogue[i].title} ${self.catalogue[i].price:.2f}" for _, i in sorted(scored)[:PAGE_SIZE]
        ]
        return "\n".join(lines)

    def _open(self, item_id: str) -> str:
        product = self.catalogue.get(item_id.strip().strip("[]"))
        if product is None:
            raise ToolError(f"no product with id {item_id!r}")
        self.current, self.chosen = product, {}
        return (
            f"[{product.item_id}] {product.title}\nPrice: ${product.price:.2f}\n"
            f"color: {', '.join(product.colors)}\nsize: {', '.join(product.sizes)}"
        )

    def _choose(self, option: str, value: str) -> str:
        if self.current is None:
            raise ToolError("open a product first")
        options = self.current.options()
        if option not in options:
            raise ToolError(f"unknown option {option!r}; options: {', '.join(options)}")
        if value not in options[option]:
            raise ToolError(f"{option} {value!r} is not available; choose one of {', '.join(options[option])}")
        self.chosen[option] = value
        return f"{option}: {value}"

    def _buy(self) -> Finish:
        if self.current is None:
            raise ToolError("open a product first")
        reward = purchase_reward(self.goal, self.current, self.chosen)
        chosen = ", ".join(f"{k} {v}" for k, v in self.chosen.items()) or "no options"
        return Finish(f"Bought [{self.current.item_id}] with {chosen}.", reward, reward >= 1.0)

    def _grade(self, answer: str) -> tuple[float, bool]:
        return 0.0, False  # the task is to buy, not to answer


def _schema(**properties) -> dict:
    return {
        "type": "object",
        "properties": properties,
        "required": list(properties),
        "additionalProperties": False,
    }


class ShopTeacher(ScriptedTeacher):
    """Expert: search the instruction's words, open the matching product, choose colour and size, buy.

    The expert has privileged access to the goal (which product matches); a lazy teacher opens the first
    result, or skips the size, or buys a near miss over the price limit.

    With ``explain`` (and ``think``), the expert's thought before it opens the product reads the result page
    line by line up to its pick, saying what rules each earlier line out (``[172] $95.99 is over 50.``),
    so that the pick is written as a chain of checks a small model can imitate, each beside what it checks.
    With ``budget_first`` a check copies the budget before its verdict (``[172] $95.99 against 50: over.``): the
    verdict then compares two numbers a few tokens back instead of one there and one in the instruction.
    """

    def __init__(self, noise: float = 0.0, think: bool = True, explain: bool = False, budget_first: bool = False):
        super().__init__(noise, think)
        self.explain, self.budget_first = explain, budget_first

    def reading(self, env: ShopEnv, results: str) -> str:
        """The expert's reading of a result page: one verdict per listed line, up to the goal's product."""
        goal = env.goal
        verdicts = []
        for item_id in re.findall(r"^\[(\d+)\]", results, re.MULTILINE):
            product = env.catalogue[item_id]
            missing = [f for f in goal.features if f not in product.features]
            if product.category != goal.category:
                verdicts.append(f"[{item_id}] is not {goal.category}.")
            elif missing:
                verdicts.append(f"[{item_id}] is not {missing[0]}.")
            else:
                over = product.price > goal.max_price
                if self.budget_first:
                    check = f"${product.price:.2f} against {goal.max_price}: " + (
                        "over." if over else "under, open it."
                    )
                else:
                    check = f"${product.price:.2f} is " + (
                        f"over {goal.max_price}." if over else f"under {goal.max_price}: open it."
                    )
                verdicts.append(f"[{item_id}] {check}")
            if item_id == goal.target:
                break
        return " ".join(verdicts)

    def begin(self, env, rng) -> None:
        super().begin(env, rng)
        self.mode = int(rng.integers(3))

    def _pick(self, env: ShopEnv, results: str) -> str:
        goal = env.goal
        if not self.lazy:
            return goal.target
        listed = re.findall(r"^\[(\d+)\]", results, re.MULTILINE)
        if self.mode == 0 and listed:
            return listed[0]
        if self.mode == 2:
            for i in listed:
                p = env.catalogue[i]
                if p.price > goal.max_price and p.category == goal.category:
                    return i
        return goal.target

    def expert(self, env: ShopEnv, history: list[tuple[str, str]]) -> str:
        """From any state (DAgger labels the policy's): with the target not open, open it if a search listed
        it, else search; then choose each requested option the open product does not have chosen; then buy."""
        goal = env.goal
        if env.current is None or env.current.item_id != goal.target:
            listed = re.compile(rf"^\[{goal.target}\]", re.MULTILINE)
            searched = [obs for t, obs in history if '"search"' in t and not obs.startswith("ERROR")]
            page = next((obs for obs in reversed(searched) if listed.search(obs)), None)
            if page is None:
                query = f"{' '.join(goal.features)} {goal.category}"
                return self.thought("Search for it.") + tool_call("search", query=query)
            why = self.reading(env, page) if self.explain else "Open the best match."
            return self.thought(why) + tool_call("open", item_id=goal.target)
        for option in ("color", "size"):
            value = goal.options[option]
            if env.chosen.get(option) != value and value in env.current.options()[option]:
                return tool_call("choose", option=option, value=value)
        return tool_call("buy")

    def lazy_act(self, env: ShopEnv, history: list[tuple[str, str]]) -> str:
        return self._next(env, history)

    def _next(self, env: ShopEnv, history: list[tuple[str, str]]) -> str:
        goal = env.goal
        done = [t for t, obs in history if not obs.startswith("ERROR")]
        names = [re.search(r'"name": "(\w+)"', t).group(1) for t in done if '"name"' in t]
        if "search" not in names:
            return self.thought("Search for it.") + tool_call(
                "search", query=f"{' '.join(goal.features)} {goal.category}"
            )
        if "open" not in names:
            results = next(obs for t, obs in history if '"search"' in t and not obs.startswith("ERROR"))
            return self.thought("Open the best match.") + tool_call("open", item_id=self._pick(env, results))
        chosen = [t for t in done if '"choose"' in t]
        product = env.current
        for option in ("color", "size"):
            if self.lazy and self.mode == 1 and option == "size":
                break
            value = goal.options[option]
            if not any(f'"option": "{option}"' in t for t in chosen) and value in product.options()[option]:
                return tool_call("choose", option=option, value=value)
        return tool_call("buy")
