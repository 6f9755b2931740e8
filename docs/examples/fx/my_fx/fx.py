# A user's workflow, written outside rl_agents: convert an amount between currencies.
# Look up today's rate for the pair, multiply the amount by it, answer. Three numbers to copy: the amount
# (prompt -> call), the rate (observation -> call), the product (observation -> answer). Each pair's rate moves
# only +-15% around its usual value, so a model can guess a plausible rate instead of reading it.
from gymnasium import register

from envs import ScriptedTeacher, Task, Tool, ToolEnv
from envs.teacher import tool_call

BASE = {
    ("USD", "EUR"): 0.92,
    ("EUR", "USD"): 1.09,
    ("USD", "JPY"): 151.3,
    ("JPY", "USD"): 0.0066,
    ("GBP", "USD"): 1.27,
    ("USD", "GBP"): 0.79,
    ("USD", "CNY"): 7.24,
    ("CNY", "USD"): 0.1401,
    ("EUR", "GBP"): 0.86,
    ("GBP", "EUR"): 1.17,
    ("USD", "CHF"): 0.88,
    ("CHF", "USD"): 1.14,
}


def _schema(**props):
    return {"type": "object", "properties": {k: {"type": v} for k, v in props.items()}, "required": list(props)}


class FxEnv(ToolEnv):
    def __init__(self, **kw):
        super().__init__(**kw)
        self.tools = {
            "rate": Tool(
                "rate",
                "Today's exchange rate from one currency to another.",
                _schema(source="string", target="string"),
                self._rate,
            ),
            "multiply": Tool(
                "multiply",
                "The product of two numbers, rounded to 2 decimals.",
                _schema(a="string", b="string"),
                self._multiply,
            ),
        }

    def _rate(self, source, target):
        return self.today.get((source, target), "unknown pair")

    def _multiply(self, a, b):
        try:
            return f"{float(a) * float(b):.2f}"
        except ValueError:
            return "not a number"

    def _new_task(self):
        pairs = list(BASE)
        source, target = pairs[int(self.np_random.integers(len(pairs)))]
        base = BASE[(source, target)]
        digits = 4 if base < 100 else 2
        rate = f"{base * float(self.np_random.uniform(0.85, 1.15)):.{digits}f}"
        if base < 0.01:
            rate = f"{base * float(self.np_random.uniform(0.85, 1.15)):.6f}"
        self.today = {(source, target): rate}
        amount = int(self.np_random.integers(10, 10000))
        answer = f"{amount * float(rate):.2f}"
        return Task(
            prompt=f"Convert {amount} {source} to {target} at today's rate.",
            answer=answer,
            extra={"pair": (source, target), "amount": amount, "rate": rate},
        )

    def task_key(self, task):
        return f"{task.prompt}|{task.extra['rate']}"


class FxTeacher(ScriptedTeacher):
    def expert(self, env, history):
        t = env.task.extra
        if not history:
            return tool_call("rate", source=t["pair"][0], target=t["pair"][1])
        if len(history) == 1:
            return tool_call("multiply", a=str(t["amount"]), b=history[-1][1])
        return f"<answer>{history[-1][1]}</answer>"


register(id="Fx-v0", entry_point="my_fx.fx:FxEnv", max_episode_steps=8)
