"""pytest-benchmark benchmarks of the policy engine (pooler.policy) with the shipped rules/.

    .venv/bin/python -m pytest bench/test_policy_bench.py --benchmark-only -p no:cacheprovider

- test_cached_decision: ``Policy.decide`` on the report query it has already decided. Aim: < 5 us.
  With the shipped rules (literal-blind) a statement that carries literals is decided by its
  *shape* (one pglast ``normalize``, ~20 us for this query, the first time this text is seen);
  the verdict is then stored under the exact text too, so a repeat is a dict lookup.
- test_cached_decision_no_literals: the same for a short statement whose normalized form equals
  its text, so it lands in the exact cache: a dict lookup.
- test_cold_evaluate: ``Policy._evaluate`` (bypasses both caches): pglast parse + fact extraction
  + every Starlark rule, for a 15-line report query over the demo schema. Aim: < 200 us.
- test_cold_evaluate_pii: the same for a query that reads personal columns (the mask path).
- test_analyze_only: ``analyze`` alone for the report query (the share of the cold cost spent in
  parsing/fact extraction, without Starlark).

Each benchmark also asserts the decision the shipped rules must give, so a fast wrong answer fails.
The aims are printed as a reminder, not asserted: timings on a shared machine are too noisy for
a hard gate (see bench/README.md).
"""
from __future__ import annotations

from pathlib import Path

import pytest

from pooler.sql.analyzer import analyze
from pooler.policy.engine import Policy, SessionInfo
from pooler.policy.bundle import load_rules

RULES = Path(__file__).resolve().parent.parent / "rules"

# A 15-line report query over the demo schema (pooler/demo_data.sql) that reads no personal
# columns: agents may run it as is.
REPORT_SQL = """\
WITH recent AS (
    SELECT o.id, o.customer_id, o.total, o.status
    FROM orders o
    WHERE o.ordered_at >= now() - interval '30 days' AND o.status IN ('paid', 'shipped')
)
SELECT p.name AS product,
       count(DISTINCT r.customer_id) AS buyers,
       sum(oi.quantity) AS units,
       sum(oi.quantity * oi.unit_price) AS revenue,
       round(avg(r.total), 2) AS avg_order
FROM recent r
JOIN order_items oi ON oi.order_id = r.id
JOIN products p ON p.id = oi.product_id
LEFT JOIN payments pay ON pay.order_id = r.id AND pay.amount > 0
GROUP BY p.name HAVING sum(oi.quantity) > 1 ORDER BY revenue DESC LIMIT 20"""
assert len(REPORT_SQL.splitlines()) == 15

# The same shape that also reads personal data (customers.email, payments.iban): masked for agents.
PII_SQL = """\
SELECT c.id, c.email, c.created_at,
       count(o.id) AS orders,
       sum(o.total) AS spent,
       max(pay.iban) AS last_iban
FROM customers c
JOIN orders o ON o.customer_id = c.id
LEFT JOIN payments pay ON pay.order_id = o.id
WHERE o.status <> 'cancelled'
GROUP BY c.id, c.email, c.created_at
ORDER BY spent DESC
LIMIT 50"""

SIMPLE_SQL = "SELECT name, price FROM products WHERE stock > $1 ORDER BY price"  # no literals


@pytest.fixture(scope="module")
def policy() -> Policy:
    p = Policy(load_rules(RULES))
    assert p.active, f"no rules loaded from {RULES}"
    return p


@pytest.fixture(scope="module")
def session() -> SessionInfo:
    return SessionInfo(user="agent", database="shop", groups=("agents",), application_name="psql",
                       client_addr="127.0.0.1", in_transaction=False)


def _configure(benchmark, aim_us: float) -> None:
    benchmark.extra_info["aim_us"] = aim_us


def test_cached_decision(benchmark, policy, session):
    _configure(benchmark, 5)
    skey = session.key()
    first = policy.decide(REPORT_SQL, session, skey)
    assert first.decision.action == "allow", first.decision
    before = policy.evaluations
    v = benchmark(policy.decide, REPORT_SQL, session, skey)
    assert v is first  # a cache hit (exact or shape) returns the stored verdict
    assert policy.evaluations == before, "the cached path must not re-evaluate"


def test_cached_decision_no_literals(benchmark, policy, session):
    _configure(benchmark, 5)
    skey = session.key()
    assert policy.decide(SIMPLE_SQL, session, skey).decision.action == "allow"
    assert (SIMPLE_SQL, skey) in policy.exact
    v = benchmark(policy.decide, SIMPLE_SQL, session, skey)
    assert v.decision.action == "allow"


def test_cold_evaluate(benchmark, policy, session):
    _configure(benchmark, 200)
    v = benchmark(policy._evaluate, REPORT_SQL, session)
    assert v.decision.action == "allow", v.decision
    assert v.decision.rule == "rules/20_agents.star"
    f = v.facts[0]
    assert f.read_only and f.command == "SELECT"
    assert {"public.orders", "public.order_items", "public.products", "public.payments"} <= set(f.tables)


def test_cold_evaluate_pii(benchmark, policy, session):
    _configure(benchmark, 200)
    v = benchmark(policy._evaluate, PII_SQL, session)
    assert v.decision.action == "mask", v.decision
    assert dict(v.decision.masks) == {"public.customers.email": "email", "public.payments.iban": "partial"}


def test_cold_evaluate_write_denied(benchmark, policy, session):
    _configure(benchmark, 200)
    sql = "UPDATE orders SET status = 'cancelled' WHERE id = 42"
    v = benchmark(policy._evaluate, sql, session)
    assert v.decision.action == "deny" and "agents may only read" in v.decision.reason


def test_analyze_only(benchmark, session):
    _configure(benchmark, 200)
    facts = benchmark(analyze, REPORT_SQL, session.search_path)
    assert len(facts) == 1 and facts[0].read_only
    assert "public.customers.email" not in facts[0].columns
