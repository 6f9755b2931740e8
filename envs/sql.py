"""SQL-v0: questions over a per-seed company database, answered by querying it (documented on ``SQLEnv``)."""

from __future__ import annotations

import hashlib
import sqlite3
import time

from envs.base import Task, Tool, ToolEnv, ToolError, answers_match
from envs.teacher import ScriptedTeacher, answer, tool_call

DEPARTMENTS = ["Sales", "Engineering", "Marketing", "Finance", "Support", "Legal", "Research", "Operations"]
CITIES = ["Paris", "Berlin", "Madrid", "Rome", "Vienna", "Lisbon", "Dublin", "Oslo"]
NAMES = [
    "Alice", "Bruno", "Chloe", "Diego", "Emma", "Farid", "Grace", "Hugo", "Ines", "Jonas", "Karin", "Liam",
    "Maya", "Nils", "Olga", "Pedro", "Quinn", "Rosa", "Sven", "Tara", "Umar", "Vera", "Wang", "Xenia",
    "Yusuf", "Zoe", "Anton", "Bella", "Carlos", "Dana", "Elif", "Felix", "Gina", "Hans", "Ivan", "Julia",
]  # fmt: skip

SCHEMA = """
CREATE TABLE departments (id INTEGER PRIMARY KEY, name TEXT, city TEXT);
CREATE TABLE employees (id INTEGER PRIMARY KEY, name TEXT, dept_id INTEGER, salary INTEGER, hire_year INTEGER);
CREATE TABLE orders (id INTEGER PRIMARY KEY, employee_id INTEGER, amount INTEGER, year INTEGER);
"""

_JOIN_DEPT = "FROM employees e JOIN departments d ON e.dept_id = d.id"
_JOIN_ORDERS = "FROM orders o JOIN employees e ON o.employee_id = e.id JOIN departments d ON e.dept_id = d.id"
# (question template, SQL template); slots: {dept}, {year}, {city}
QUESTIONS = [
    ("How many employees work in the {dept} department?", "SELECT COUNT(*) " + _JOIN_DEPT + " WHERE d.name = '{dept}'"),
    (
        "What is the average salary in the {dept} department, rounded to the nearest integer?",
        "SELECT ROUND(AVG(e.salary)) " + _JOIN_DEPT + " WHERE d.name = '{dept}'",
    ),
    (
        "Who is the best paid employee of the {dept} department?",
        "SELECT e.name " + _JOIN_DEPT + " WHERE d.name = '{dept}' ORDER BY e.salary DESC LIMIT 1",
    ),
    (
        "What is the total amount of the orders placed in {year} by employees of the {dept} department?",
        "SELECT SUM(o.amount) " + _JOIN_ORDERS + " WHERE d.name = '{dept}' AND o.year = {year}",
    ),
    ("How many employees were hired after {year}?", "SELECT COUNT(*) FROM employees WHERE hire_year > {year}"),
    ("In which city is the {dept} department?", "SELECT city FROM departments WHERE name = '{dept}'"),
]

# sqlite3 authorizer actions a read-only query needs; everything else is denied.
_ALLOWED = {sqlite3.SQLITE_SELECT, sqlite3.SQLITE_READ, sqlite3.SQLITE_FUNCTION, sqlite3.SQLITE_RECURSIVE}


MAX_CELL_CHARS = 200
HEAP_LIMIT_BYTES = 256 << 20


def render_rows(columns: list[str], rows: list[tuple], truncated: bool) -> str:
    def cell(v) -> str:
        if isinstance(v, float) and v.is_integer():
            return str(int(v))
        text = "NULL" if v is None else (f"<blob of {len(v)} bytes>" if isinstance(v, bytes) else str(v))
        return text if len(text) <= MAX_CELL_CHARS else text[:MAX_CELL_CHARS] + f"... ({len(text)} characters)"

    lines = [" | ".join(columns)] + [" | ".join(cell(v) for v in row) for row in rows]
    if truncated:
        lines.append(f"... (only the first {len(rows)} rows are shown)")
    return "\n".join(lines) if rows else lines[0] + "\n(no rows)"


class SQLEnv(ToolEnv):
    """SQL-v0: questions over a small company database, answered by querying it (after AgentBench's DB task).

    ## Description
    Each seed generates a SQLite database (stdlib :mod:`sqlite3`, in memory) with three tables::

        departments(id, name, city)
        employees(id, name, dept_id, salary, hire_year)
        orders(id, employee_id, amount, year)

    and one question about it ("How many employees work in the Sales department?"). The agent queries the
    database and answers; the answer is checked against the ground truth computed from the same database.

    ## Tools
    ``sql(query: str)``: runs one read-only ``SELECT`` (an authorizer denies writes, ``ATTACH``, ``PRAGMA``
    and schema changes), stops after ``time_limit_s`` and returns at most ``max_rows`` rows, rendered as
    ``col | col`` lines. Every call is bounded: no string or blob may exceed ``max_value_bytes`` (SQLite's
    length limit, so ``randomblob(300000000)`` or a string-doubling CTE fails at once instead of allocating
    gigabytes), a shown cell is cut at ``MAX_CELL_CHARS`` characters, and SQLite's heap in this process is
    capped at ``HEAP_LIMIT_BYTES`` (a process-wide SQLite setting, applied only where none is set).

    ## Action Space / Observation Space
    ``Text``, as in :mod:`envs.base`.

    ## Arguments
    ```python
    gymnasium.make("SQL-v0", time_limit_s=1.0, max_rows=20, max_value_bytes=100_000, max_action_chars=1000,
                   max_observation_chars=2000, render_mode=None, split=None, max_episode_steps=8)
    ```
    - ``time_limit_s=1.0``: wall-clock limit of one statement.
    - ``max_rows=20``: rows one ``sql`` call returns at most.
    - ``max_value_bytes=100_000``: the longest string or blob a statement may build (SQLite's length limit).
    - ``max_action_chars=1000``, ``max_observation_chars=2000``, ``render_mode=None`` (or ``"ansi"``),
      ``split=None`` (``"train"``, ``"val"``, ``"test"``): :class:`envs.base.ToolEnv`'s, as in every tool env.
    - ``max_episode_steps``: Gymnasium's step budget (a ``TimeLimit``).

    ## Information
    :class:`envs.base.ToolEnv`'s keys (``tools``, ``task_key``, ``split`` from ``reset``; ``tool``, ``error``,
    ``success``, ``error_counts`` and ``answer`` from ``step``).

    ## Rewards
    1.0 for a correct final answer (numbers compared numerically), 0.0 otherwise.

    ## Episode End
    Terminated by a final answer; truncated by the step budget (``max_episode_steps``, default 8).

    ## Seeds and splits
    ``reset(seed=s)`` fixes the database and the question; a task is the question with its database
    (``task_key``), and ``split=...`` keeps the tasks of one split.

    ## Version History
    - v0: initial version.
    """

    def __init__(self, time_limit_s: float = 1.0, max_rows: int = 20, max_value_bytes: int = 100_000, **kwargs):
        super().__init__(**kwargs)
        self.time_limit_s = time_limit_s
        self.max_rows = max_rows
        self.max_value_bytes = max_value_bytes
        self.db: sqlite3.Connection | None = None
        self.tools = {
            "sql": Tool(
                name="sql",
                description="Run one read-only SQLite SELECT query on the company database and return the rows.",
                parameters={
                    "type": "object",
                    "properties": {"query": {"type": "string", "description": "a single SELECT statement"}},
                    "required": ["query"],
                    "additionalProperties": False,
                },
                fn=self._sql,
            )
        }

    # --- database -----------------------------------------------------------------------------
    def _build_db(self) -> sqlite3.Connection:
        rng = self.np_random
        db = sqlite3.connect(":memory:", check_same_thread=False)
        db.executescript(SCHEMA)
        n_depts = int(rng.integers(4, 7))
        depts = rng.choice(DEPARTMENTS, n_depts, replace=False)
        cities = rng.choice(CITIES, n_depts, replace=False)
        db.executemany(
            "INSERT INTO departments VALUES (?, ?, ?)",
            [(i + 1, str(d), str(c)) for i, (d, c) in enumerate(zip(depts, cities))],
        )
        n_emp = int(rng.integers(15, 31))
        names = rng.choice(NAMES, n_emp, replace=False)
        employees = [
            (
                i + 1,
                str(names[i]),
                int(rng.integers(1, n_depts + 1)),
                int(rng.integers(60, 300)) * 500,
                int(rng.integers(2010, 2025)),
            )
            for i in range(n_emp)
        ]
        db.executemany("INSERT INTO employees VALUES (?, ?, ?, ?, ?)", employees)
        orders = [
            (i + 1, int(rng.integers(1, n_emp + 1)), int(rng.integers(10, 1000)), int(rng.integers(2020, 2025)))
            for i in range(int(rng.integers(40, 101)))
        ]
        db.executemany("INSERT INTO orders VALUES (?, ?, ?, ?)", orders)
        db.commit()
        if db.execute("PRAGMA hard_heap_limit").fetchone()[0] == 0:
            db.execute(f"PRAGMA hard_heap_limit={HEAP_LIMIT_BYTES}")
        db.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, self.max_value_bytes)
        db.setlimit(sqlite3.SQLITE_LIMIT_SQL_LENGTH, 10_000)
        db.set_authorizer(lambda action, *args: sqlite3.SQLITE_OK if action in _ALLOWED else sqlite3.SQLITE_DENY)
        return db

    def _sql(self, query: str) -> str:
        deadline = time.monotonic() + self.time_limit_s
        self.db.set_progress_handler(lambda: int(time.monotonic() > deadline), 1000)
        try:
            cursor = self.db.execute(query)
            rows = cursor.fetchmany(self.max_rows + 1)
        except sqlite3.OperationalError as err:
            if "interrupted" in str(err):
                raise ToolError(f"query exceeded the {self.time_limit_s}s time limit") from None
            raise ToolError(f"SQL error: {err}") from None
        except (sqlite3.DatabaseError, sqlite3.Warning, ValueError, OverflowError, MemoryError) as err:
            raise ToolError(f"SQL error: {err}") from None
        finally:
            self.db.set_progress_handler(None, 0)
        columns = [d[0] for d in cursor.description or []]
        return render_rows(columns, rows[: self.max_rows], truncated=len(rows) > self.max_rows)

    # --- task ---------------------------------------------------------------------------------
    def _new_task(self) -> Task:
        if self.db is not None:
            self.db.close()
        self.db = self._build_db()
        rng = self.np_random
        depts = [row[0] for row in self.db.execute("SELECT name FROM departments")]
        while True:
            question, query = QUESTIONS[int(rng.integers(len(QUESTIONS)))]
            slots = {"dept": str(rng.choice(depts)), "year": int(rng.integers(2020, 2025))}
            if "hired after" in question:
                slots["year"] = int(rng.integers(2012, 2023))
            query = query.format(**slots)
            rows = self.db.execute(query).fetchall()
            if not rows or rows[0][0] is None:
                continue
            if "LIMIT 1" in query:  # "best paid" needs a unique top salary
                top2 = self.db.execute(query.replace("e.name", "e.salary").replace("LIMIT 1", "LIMIT 2")).fetchall()
                if len(top2) == 2 and top2[0] == top2[1]:
                    continue
            break
        truth = render_rows(["x"], rows[:1], False).splitlines()[1]
        return Task(prompt=question.format(**slots), answer=truth, extra={"query": query, "slots": slots})

    def task_key(self, task: Task) -> str:
        """The question and the database it is asked about (a digest of its rows)."""
        tables = ("departments", "employees", "orders")
        dump = repr([self.db.execute(f"SELECT * FROM {t} ORDER BY id").fetchall() for t in tables])
        return f"{task.prompt}|{hashlib.sha256(dump.encode()).hexdigest()[:16]}"

    def close(self) -> None:
        if self.db is not None:
            self.db.close()
            self.db = None
        super().close()


class SQLTeacher(ScriptedTeacher):
    """Expert: write the query for the question, run it, answer with the first cell."""

    def expert(self, env: SQLEnv, history: list[tuple[str, str]]) -> str:
        """From any state (DAgger labels the policy's): answer once the last result's first cell is the answer,
        else run the question's query (again, after an error or a wrong query)."""
        if history and not history[-1][1].startswith("ERROR"):
            lines = history[-1][1].splitlines()
            cell = lines[1].strip() if len(lines) > 1 else ""
            if answers_match(cell, env.task.answer, env.task.tolerance):
                return answer(cell)
        return self.thought("Query the database.") + tool_call("sql", query=env.task.extra["query"])

    def lazy_act(self, env: SQLEnv, history: list[tuple[str, str]]) -> str:
        """A lazy teacher queries the wrong department or year, or answers without looking."""
        if self.rng.random() < 0.3:
            return answer(str(int(self.rng.integers(1, 20))))
        if not history:
            slots = dict(env.task.extra["slots"])
            depts = [row[0] for row in env.db.execute("SELECT name FROM departments")]
            slots["dept"] = str(self.rng.choice(depts))
            slots["year"] = slots["year"] + 1
            question = next(q for p, q in QUESTIONS if p.format(**env.task.extra["slots"]) == env.task.prompt)
            return self.thought("Query the database.") + tool_call("sql", query=question.format(**slots))
        if history[-1][1].startswith("ERROR"):
            return self.thought("Query the database.") + tool_call("sql", query=env.task.extra["query"])
        lines = history[-1][1].splitlines()  # answers with what its (possibly wrong) query returned
        return answer(lines[1].strip() if len(lines) > 1 else "")
