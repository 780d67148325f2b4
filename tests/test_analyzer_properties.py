"""The analyzer and lineage checked against PostgreSQL's own planner, with hypothesis.

Generated SELECTs over the demo shop (pooler/demo_data.sql: joins along its foreign keys,
expressions, filters, EXISTS and scalar subqueries, ORDER BY, aggregates, UNION ALL, CTEs) are
planned by the real cluster with ``EXPLAIN (VERBOSE, FORMAT JSON)``, whose nodes name every
column they read as ``alias.column``:

- every column the plan reads is in ``stmt.columns`` (what masking and the rules rely on: the
  analyzer may over-approximate, never miss), and with every column qualified, as generated
  here, every column the analyzer lists is one the plan reads;
- each result column's lineage holds every column the plan's top node computes it from.

And for any text, analyze() raises nothing but AnalysisError, and statement_lineage() nothing
but pglast's ParseError or AnalysisError.
"""

from __future__ import annotations

import re

import orjson
import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pglast.parser import ParseError

from pooler.sql.analyzer import AnalysisError, analyze
from pooler.sql.lineage import statement_lineage

PLANNED = settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))

TEXT = {"full_name", "email", "phone", "card_number", "ssn", "city", "name", "status", "card_last4", "iban"}
NUMERIC = {"id", "customer_id", "order_id", "product_id", "price", "stock", "total", "quantity", "unit_price",
           "amount"}
TABLES = {
    "customers": ["id", "full_name", "email", "phone", "card_number", "ssn", "birth_date", "city", "created_at"],
    "products": ["id", "name", "price", "stock"],
    "orders": ["id", "customer_id", "ordered_at", "status", "total"],
    "order_items": ["order_id", "product_id", "quantity", "unit_price"],
    "payments": ["id", "order_id", "amount", "card_last4", "iban", "paid_at"],
}
# foreign keys: (table, column) -> (table, column)
JOINS = [("orders", "customer_id", "customers", "id"), ("order_items", "order_id", "orders", "id"),
         ("order_items", "product_id", "products", "id"), ("payments", "order_id", "orders", "id")]


@st.composite
def from_clause(draw):
    """1-3 tables joined along foreign keys: (FROM text, [(alias, table)])."""
    first = draw(st.sampled_from(sorted(TABLES)))
    rels = [("t0", first)]
    sql = f"{first} t0"
    for i in range(1, draw(st.integers(1, 3))):
        edges = [(a, j) for a, t in rels for j in JOINS if t in (j[0], j[2])]
        if not edges:
            break
        alias, (lt, lc, rt, rc) = draw(st.sampled_from(edges))
        here = dict((a, t) for a, t in rels)[alias]
        new, mine, theirs = (rt, lc, rc) if here == lt else (lt, rc, lc)
        na = f"t{i}"
        sql += f" JOIN {new} {na} ON {alias}.{mine} = {na}.{theirs}"
        rels.append((na, new))
    return sql, rels


def column(draw, rels, kinds=None):
    alias, table = draw(st.sampled_from(rels))
    cols = [c for c in TABLES[table] if kinds is None or c in kinds]
    if not cols:
        cols = TABLES[table]
    return f"{alias}.{draw(st.sampled_from(cols))}"


@st.composite
def expression(draw, rels):
    c = column(draw, rels)
    kind = draw(st.integers(0, 5))
    if kind == 0:
        return c
    if kind == 1:
        return f"upper({column(draw, rels, TEXT)}::text)"
    if kind == 2:
        return f"{c}::text || '-'"
    if kind == 3:
        return f"coalesce({c}::text, 'none')"
    if kind == 4:
        return f"CASE WHEN {column(draw, rels, NUMERIC)} > 2 THEN {c}::text END"
    return f"(SELECT max(x.total) FROM orders x WHERE x.customer_id = {column(draw, rels, NUMERIC)})"


@st.composite
def predicate(draw, rels):
    kind = draw(st.integers(0, 3))
    if kind == 0:
        return f"{column(draw, rels, NUMERIC)} > {draw(st.integers(0, 5))}"
    if kind == 1:
        return f"{column(draw, rels, TEXT)}::text LIKE 'a%'"
    if kind == 2:
        return f"EXISTS (SELECT 1 FROM payments y WHERE y.order_id = {column(draw, rels, NUMERIC)})"
    return f"{column(draw, rels)}::text <> 'x'"


@st.composite
def select(draw, one_text_column=False):
    frm, rels = draw(from_clause())
    if one_text_column:
        items = [f"({draw(expression(rels))})::text"]
        tail = ""
    elif draw(st.booleans()) and draw(st.booleans()):  # aggregates over a group
        g = column(draw, rels)
        items = [g, f"count({column(draw, rels)})", f"max({column(draw, rels, NUMERIC)})"]
        tail = f" GROUP BY {g}"
    else:
        items = draw(st.lists(expression(rels), min_size=1, max_size=4))
        tail = ""
    where = draw(st.lists(predicate(rels), max_size=2))
    sql = f"SELECT {', '.join(items)} FROM {frm}"
    if where:
        sql += " WHERE " + " AND ".join(where)
    sql += tail
    if not tail and not one_text_column and draw(st.booleans()):
        sql += f" ORDER BY {column(draw, rels)}"
    return sql


@st.composite
def statement(draw):
    """A SELECT, a CTE over one, or a UNION ALL of two one-column SELECTs (with a flag: whether
    the plan's top node computes the result columns from base-table aliases)."""
    kind = draw(st.integers(0, 5))
    if kind == 4:
        inner = draw(select())
        return f"WITH q AS MATERIALIZED ({inner}) SELECT * FROM q", False
    if kind == 5:
        return f"{draw(select(True))} UNION ALL {draw(select(True))}", False
    return draw(select()), True


# --------------------------------------------------------------------------- the plan's side

_REF = re.compile(r"\b([a-z_][a-z0-9_]*)\.([a-z_][a-z0-9_]*)\b")


def _nodes(plan: dict):
    yield plan
    for p in plan.get("Plans") or ():
        yield from _nodes(p)


def plan_of(conn, sql: str) -> dict:
    (row,) = conn.execute("EXPLAIN (VERBOSE, FORMAT JSON) " + sql).fetchone()
    doc = row if isinstance(row, list) else orjson.loads(row)
    return doc[0]["Plan"]


def _aliases(plan: dict) -> dict[str, str]:
    return {n["Alias"]: f"{n['Schema']}.{n['Relation Name']}" for n in _nodes(plan) if "Relation Name" in n}


_STRING = re.compile(r"'(?:[^']|'')*'")
_BARE = re.compile(r"(?<![.\w])([a-z_][a-z0-9_]*)\b(?!\s*\()")


def _refs(texts, aliases: dict[str, str]) -> set[str]:
    """The base-table columns named in plan expressions: ``alias.column``; a plan over one
    relation names its columns bare (EXPLAIN qualifies them only with several relations)."""
    out = set()
    only = next(iter(aliases.values())) if len(aliases) == 1 else None
    for text in texts:
        text = _STRING.sub("''", text)
        for a, c in _REF.findall(text):
            if a in aliases:
                out.add(f"{aliases[a]}.{c}")
        if only is not None:
            known = TABLES[only.removeprefix("public.")]
            out |= {f"{only}.{c}" for c in _BARE.findall(text) if c in known}
    return out


# nodes that do not project: their output is their child's, a scan's physical target list
# included (a Materialize over an index-only scan outputs every column of the index)
_PASS_THROUGH = {"Materialize", "Memoize", "Hash", "Sort", "Incremental Sort", "Limit", "Unique", "Gather",
                 "Gather Merge", "LockRows"}


def columns_read(plan: dict) -> set[str]:
    """Every base-table column some node of the plan reads: outputs, filters, conditions, keys.
    A scan below another node may output its whole row although that node reads only some of it
    (a "physical target list"), and so may a node that passes its child's rows on unprojected: their
    outputs count only where they are a query's result (the plan's top, a CTE's or subquery's
    plan, a UNION member)."""
    aliases = _aliases(plan)
    texts = []
    for n in _nodes(plan):
        for k, v in n.items():
            if (k == "Output" and ("Relation Name" in n or n.get("Node Type") in _PASS_THROUGH) and n is not plan
                    and n.get("Parent Relationship") not in ("InitPlan", "SubPlan", "Member")):
                continue
            if isinstance(v, str):
                texts.append(v)
            elif isinstance(v, list):
                texts += [x for x in v if isinstance(x, str)]
    return _refs(texts, aliases)


def covered(col: str, listed: set[str] | frozenset[str]) -> bool:
    return col in listed or col.rsplit(".", 1)[0] + ".*" in listed


@pytest.fixture(scope="module")
def shop(pg, demo_shop):
    conn = psycopg.connect(pg.dsn(dbname=demo_shop), autocommit=True)
    cols: dict[str, list[str]] = {}
    for table, col in conn.execute("SELECT table_schema || '.' || table_name, column_name FROM "
                                   "information_schema.columns WHERE table_schema = 'public' ORDER BY ordinal_position"):
        cols.setdefault(table, []).append(col)
    yield conn, cols
    conn.close()


@PLANNED
@given(statement())
def test_the_columns_the_analyzer_lists_are_those_postgresql_reads(shop, generated):
    conn, _ = shop
    sql, _ = generated
    plan = plan_of(conn, sql)
    read = columns_read(plan)
    (facts,) = analyze(sql)
    listed = set(facts.columns)
    missed = {c for c in read if not covered(c, listed)}
    assert not missed, f"PostgreSQL reads {sorted(missed)} the analyzer does not list, in {sql}"
    extra = {c for c in listed if not c.endswith(".*")} - read
    assert not extra, f"the analyzer lists {sorted(extra)} PostgreSQL does not read, in {sql}"
    assert {t for t in _aliases(plan).values()} <= set(facts.tables)
    assert facts.read_only and facts.command == "SELECT"


@PLANNED
@given(statement())
def test_lineage_holds_every_column_postgresql_computes_a_result_from(shop, generated):
    conn, cols = shop
    sql, top_from_tables = generated
    plan = plan_of(conn, sql)
    (lin,) = statement_lineage(sql, ("public",), lambda q: cols.get(q))
    width = len(conn.execute(f"SELECT * FROM ({sql}) r LIMIT 0").description)
    assert lin.outputs is not None and len(lin.outputs) == width, sql
    outputs = (plan.get("Output") or [])[:width]  # after them: sort keys the client never sees
    if not top_from_tables:
        return  # a CTE or UNION scan names its own alias, not the tables': the count is what it checks
    aliases = _aliases(plan)
    for i, expr in enumerate(outputs):
        need = _refs([expr], aliases)
        missing = {c for c in need if not covered(c, lin.outputs[i].sources)}
        assert not missing, f"result column {i + 1} ({expr}) comes from {sorted(missing)} too: {sql}"


SQLISH = st.lists(st.one_of(
    st.sampled_from(["SELECT", "FROM", "WHERE", "WITH", "AS", "(", ")", ",", ";", "*", "DELETE", "INSERT INTO",
                     "UPDATE", "SET", "RETURNING", "UNION", "JOIN", "ON", "customers", "c", "c.email", "t.*", "1",
                     "'x'", "E'\\''", "$$", "$q$", "::text", "=", "+", "row_to_json(c)", "LATERAL", "VALUES",
                     "EXPLAIN", "ANALYZE", "COPY", "TO STDOUT", "PREPARE p AS", "EXECUTE p", "DO", "CALL f()",
                     "ORDER BY", "GROUP BY", "FOR UPDATE", "MERGE INTO", "USING", "WHEN MATCHED THEN", "CASE", "END",
                     "ARRAY[", "]", "NULL", "IS", "NOT", "EXISTS", "OVER (", "PARTITION BY", "FILTER (WHERE",
                     "TABLE", "CREATE TABLE x AS", "SET search_path =", "DECLARE c CURSOR FOR", "FETCH ALL c"]),
    st.text(max_size=6)), max_size=25).map(" ".join)


@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.one_of(st.text(max_size=80), SQLISH, statement().map(lambda g: g[0])))
def test_the_analyzer_raises_nothing_but_its_own_error(text):
    try:
        analyze(text)
    except AnalysisError:
        pass
    try:
        statement_lineage(text, ("public",), lambda q: TABLES.get(q.removeprefix("public.")))
    except (ParseError, AnalysisError):
        pass


@pytest.mark.parametrize("sql", [
    "SELECT 1" + " + 1" * 600,
    "SELECT " + "ARRAY[" * 600 + "1" + "]" * 600,
    "SELECT * FROM " + "(SELECT * FROM " * 300 + "t" + ") s" * 300,
])
def test_a_statement_nested_too_deeply_is_an_analysis_error(sql):
    """orjson stops at 1,024 levels and the walk at Python's recursion limit: both are refused
    as AnalysisError (they escaped as JSONDecodeError and RecursionError)."""
    with pytest.raises(AnalysisError, match="nested too deeply"):
        analyze(sql)
    try:
        statement_lineage(sql)
    except AnalysisError:
        pass  # or an UNKNOWN lineage: never another exception
