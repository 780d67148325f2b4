"""Column lineage (pooler.sql.lineage): pure unit tests, no database."""

from __future__ import annotations

import pytest

from pooler.sql.lineage import UNKNOWN, OutputColumn, StatementLineage, statement_lineage

CATALOG = {
    "public.customers": ["id", "full_name", "email", "phone", "card_number", "ssn", "birth_date", "created_at"],
    "public.orders": ["id", "customer_id", "total", "created_at"],
    "public.payments": ["id", "order_id", "iban", "amount"],
    "crm.customers": ["id", "email", "note"],
    "public.quoted": ["id", "Email", "email"],
}

C = "public.customers."
O = "public.orders."
P = "public.payments."
CUSTOMER_COLS = CATALOG["public.customers"]
CUSTOMER_ROW = frozenset({C + "*"} | {C + c for c in CUSTOMER_COLS})


def columns_of(q: str):
    return CATALOG.get(q)


def lin(sql: str, **kw) -> StatementLineage:
    kw.setdefault("columns_of", columns_of)
    got = statement_lineage(sql, **kw)
    assert len(got) == 1
    return got[0]


def outs(sql: str, **kw) -> tuple[OutputColumn, ...] | None:
    return lin(sql, **kw).outputs


def srcs(sql: str, **kw) -> list[set[str]]:
    o = outs(sql, **kw)
    assert o is not None
    return [set(c.sources) for c in o]


def col(*sources: str, direct: bool = False) -> OutputColumn:
    return OutputColumn(frozenset(sources), direct)


# --------------------------------------------------------------------------- columns and names


def test_bare_columns_and_aliases():
    assert outs("SELECT email, c.ssn AS x, public.customers.phone FROM customers c") is not None
    assert outs("SELECT email, c.ssn AS x FROM customers c") == (
        col(C + "email", direct=True), col(C + "ssn", direct=True))
    assert outs("SELECT public.customers.phone FROM customers") == (col(C + "phone", direct=True),)


def test_star_expands_in_from_order():
    o = outs("SELECT * FROM orders o, payments p")
    assert o == tuple(col(O + c, direct=True) for c in CATALOG["public.orders"]) + tuple(
        col(P + c, direct=True) for c in CATALOG["public.payments"])


def test_qualified_star():
    o = outs("SELECT c.*, o.total FROM customers c JOIN orders o ON o.customer_id = c.id")
    assert o == tuple(col(C + c, direct=True) for c in CUSTOMER_COLS) + (col(O + "total", direct=True),)


def test_star_over_unknown_table_is_none():
    assert outs("SELECT * FROM mystery") is None
    assert outs("SELECT m.* FROM mystery m") is None
    assert outs("SELECT * FROM (SELECT * FROM mystery) s") is None


def test_unknown_table_columns_over_approximated():
    assert srcs("SELECT a FROM mystery", search_path=("app", "public")) == [{"app.mystery.a", "public.mystery.a"}]
    # a name that could be in either table of unknown columns
    assert srcs("SELECT a FROM mystery, enigma") == [{"public.mystery.a", "public.enigma.a"}]
    # known table has it: still the unknown one may have it too (over-approximation)
    assert srcs("SELECT email FROM customers, mystery") == [{C + "email", "public.mystery.email"}]
    # known table does not have it
    assert srcs("SELECT note FROM customers, mystery") == [{"public.mystery.note"}]


def test_unresolvable_name_is_unknown():
    assert outs("SELECT nosuch FROM customers") == (col(UNKNOWN),)


def test_quoted_identifiers():
    assert outs('SELECT "Email", email FROM quoted') == (
        col("public.quoted.Email", direct=True), col("public.quoted.email", direct=True))
    # customers has no "Email" column: unresolvable -> UNKNOWN, never customers.email
    assert outs('SELECT "Email" FROM customers') == (col(UNKNOWN),)


def test_system_columns():
    assert outs("SELECT ctid, c.xmin FROM customers c") == (
        col(C + "ctid", direct=True), col(C + "xmin", direct=True))


# --------------------------------------------------------------------------- expressions


@pytest.mark.parametrize("expr", [
    "upper(email)", "email || ''", "substr(email, 1, 3)", "email::text", "CAST(email AS varchar(10))",
    "string_agg(email, ',')", "coalesce(email, 'x')", "CASE WHEN id > 1 THEN email END",
    "greatest(email, 'a')", "email COLLATE \"C\"", "lower(email) OVER ()", "ARRAY[email]",
    "(email IS NULL)", "NOT (email = 'x')", "ROW(email, 1)", "max(email) FILTER (WHERE true)",
    "(ARRAY[email])[1]",
])
def test_expressions_keep_sources_and_are_not_direct(expr):
    o = outs(f"SELECT {expr} FROM customers")
    assert o is not None and len(o) == 1
    assert C + "email" in o[0].sources
    assert o[0].direct is False


def test_case_uses_every_branch():
    assert srcs("SELECT CASE WHEN ssn = '1' THEN email ELSE phone END FROM customers") == [
        {C + "ssn", C + "email", C + "phone"}]


def test_count_star_has_no_sources():
    assert outs("SELECT count(*), count(1) FROM customers") == (col(), col())
    assert outs("SELECT count(*) FROM customers WHERE email LIKE 'a%'") == (col(),)


def test_constants_and_params():
    assert outs("SELECT 1, 'x', $1, now()") == (col(), col(), col(), col())


def test_scalar_subquery():
    o = outs("SELECT (SELECT email FROM customers LIMIT 1) AS e, id FROM orders")
    assert o[0].sources == {C + "email"} and not o[0].direct
    assert o[1] == col(O + "id", direct=True)


def test_correlated_subquery():
    o = outs("SELECT c.id, (SELECT max(o.total) FROM orders o WHERE o.customer_id = c.id) FROM customers c")
    assert o[0] == col(C + "id", direct=True)
    assert O + "total" in o[1].sources and C + "id" in o[1].sources and not o[1].direct
    # correlated reference inside the subquery's select list
    o = outs("SELECT (SELECT c.ssn FROM orders o WHERE o.customer_id = c.id LIMIT 1) FROM customers c")
    assert C + "ssn" in o[0].sources


def test_exists_and_array_sublinks():
    assert C + "ssn" in outs("SELECT EXISTS (SELECT 1 FROM customers WHERE ssn LIKE '1%')")[0].sources
    assert C + "email" in outs("SELECT ARRAY(SELECT email FROM customers)")[0].sources
    assert C + "email" in outs("SELECT id IN (SELECT email FROM customers) FROM orders")[0].sources


def test_udf_call_is_unknown():
    o = outs("SELECT leak(id), upper(email) FROM customers", udfs=frozenset({"leak"}))
    assert UNKNOWN in o[0].sources and not o[0].direct
    assert UNKNOWN not in o[1].sources
    o = outs("SELECT app.leak(1)", udfs=frozenset({"app.leak"}))
    assert UNKNOWN in o[0].sources
    o = outs("SELECT leak(1)", udfs=frozenset({"app.leak"}))  # may resolve to app.leak along search_path
    assert UNKNOWN in o[0].sources


def test_sql_running_builtins_are_unknown():
    assert UNKNOWN in outs("SELECT query_to_xml('select ssn from customers', true, false, '')")[0].sources


# --------------------------------------------------------------------------- whole-row references


@pytest.mark.parametrize("sql", [
    "SELECT c FROM customers c",
    "SELECT customers FROM customers",
    "SELECT row_to_json(c) FROM customers c",
    "SELECT json_agg(c) FROM customers c",
    "SELECT to_jsonb(c.*) FROM customers c",
    "SELECT ROW(c.*) FROM customers c",
    "SELECT count(c.*) FROM customers c",
])
def test_whole_row_references(sql):
    o = outs(sql)
    assert o is not None and len(o) == 1
    assert o[0].sources == CUSTOMER_ROW
    assert o[0].direct is False


def test_whole_row_of_unknown_table_keeps_marker():
    # m may also be a column of mystery (its columns are unknown): both
    assert srcs("SELECT row_to_json(m) FROM mystery m") == [{"public.mystery.*", "public.mystery.m"}]


def test_whole_row_of_subquery_and_cte():
    assert srcs("SELECT row_to_json(s) FROM (SELECT email, id FROM customers) s") == [{C + "email", C + "id"}]
    assert srcs("WITH s AS (SELECT ssn FROM customers) SELECT json_agg(s) FROM s") == [{C + "ssn"}]


# --------------------------------------------------------------------------- FROM items


def test_subquery_in_from_with_renamed_columns():
    o = outs("SELECT a, b FROM (SELECT email, upper(ssn) FROM customers) s(a, b)")
    assert o == (col(C + "email", direct=True), col(C + "ssn"))
    o = outs("SELECT s.upper, s.e FROM (SELECT upper(ssn), email AS e FROM customers) s")
    assert o == (col(C + "ssn"), col(C + "email", direct=True))
    o = outs("SELECT * FROM (SELECT email AS e, 1 AS one FROM customers) s")
    assert o == (col(C + "email", direct=True), col())


def test_joins_with_aliases():
    o = outs("SELECT c.email, o.total, p.iban FROM customers c "
             "JOIN orders o ON o.customer_id = c.id LEFT JOIN payments p ON p.order_id = o.id")
    assert o == (col(C + "email", direct=True), col(O + "total", direct=True), col(P + "iban", direct=True))
    # unqualified names resolve to the table that has them
    assert outs("SELECT iban, total FROM orders JOIN payments ON order_id = orders.id") == (
        col(P + "iban", direct=True), col(O + "total", direct=True))


def test_join_alias_hides_inner_names():
    o = outs("SELECT j.email, j.total FROM (customers c JOIN orders o ON o.customer_id = c.id) AS j")
    assert o == (col(C + "email", direct=True), col(O + "total", direct=True))


def test_join_using_star_order():
    o = outs("SELECT * FROM orders JOIN payments USING (id)")
    assert o[0] == col(O + "id", P + "id", direct=True)
    assert o[1:] == tuple(col(O + c, direct=True) for c in ["customer_id", "total", "created_at"]) + tuple(
        col(P + c, direct=True) for c in ["order_id", "iban", "amount"])
    o = outs("SELECT * FROM customers NATURAL JOIN orders")
    assert len(o) == 8 + 4 - 2
    assert o[0].sources == {C + "id", O + "id"} and o[1].sources == {C + "created_at", O + "created_at"}
    assert outs("SELECT * FROM customers JOIN mystery USING (id)") is None


def test_unqualified_using_column():
    assert srcs("SELECT id FROM orders JOIN payments USING (id)") == [{O + "id", P + "id"}]


def test_lateral():
    o = outs("SELECT c.id, l.e FROM customers c CROSS JOIN LATERAL "
             "(SELECT c.email AS e FROM orders o WHERE o.customer_id = c.id LIMIT 1) l")
    assert o == (col(C + "id", direct=True), col(C + "email", direct=True))


def test_generate_series_in_from():
    o = outs("SELECT g, g.g, * FROM generate_series(1, 10) g")
    assert o == (col(), col(), col())
    o = outs("SELECT n, s.email FROM generate_series(1, 3) AS t(n), "
             "LATERAL (SELECT email FROM customers WHERE id = n) s")
    assert o == (col(), col(C + "email", direct=True))
    # arguments are sources of the function's columns
    assert srcs("SELECT x FROM customers c, unnest(ARRAY[c.ssn]) AS u(x)") == [{C + "ssn"}]


def test_unknown_table_function():
    assert outs("SELECT * FROM leak() f", udfs=frozenset({"leak"})) is None
    o = outs("SELECT f.a FROM leak() f", udfs=frozenset({"leak"}))
    assert UNKNOWN in o[0].sources
    o = outs("SELECT r.a FROM customers c, jsonb_to_record(to_jsonb(c)) AS r(a text, b int)")
    assert o[0].sources >= {C + "*"}


def test_values_in_from():
    o = outs("SELECT * FROM (VALUES (1, 'a'), (2, 'b')) v(n, s)")
    assert o == (col(), col())


# --------------------------------------------------------------------------- CTEs and set operations


def test_cte():
    assert outs("WITH x AS (SELECT email FROM customers) SELECT email FROM x") == (col(C + "email", direct=True),)
    assert outs("WITH x AS (SELECT upper(email) AS e FROM customers) SELECT e FROM x") == (col(C + "email"),)


def test_nested_cte_and_column_alias_list():
    sql = """WITH a(x, y) AS (SELECT email, id FROM customers),
                  b AS (WITH inner_cte AS (SELECT y, x FROM a) SELECT * FROM inner_cte)
             SELECT b.x, b.y FROM b"""
    assert outs(sql) == (col(C + "email", direct=True), col(C + "id", direct=True))


def test_cte_shadows_table():
    assert outs("WITH customers AS (SELECT 1 AS email) SELECT email FROM customers") == (col(),)


def test_recursive_cte_conservative():
    sql = """WITH RECURSIVE r(n, e) AS (SELECT 1, email FROM customers UNION ALL SELECT n + 1, e FROM r WHERE n < 3)
             SELECT n, e FROM r"""
    o = outs(sql)
    assert all(C + "email" in c.sources for c in o)
    assert not any(c.direct for c in o)


def test_union_second_branch():
    o = outs("SELECT id, created_at FROM orders UNION SELECT id, email FROM customers")
    assert o == (col(O + "id", C + "id", direct=True), col(O + "created_at", C + "email", direct=True))
    o = outs("SELECT total::text FROM orders UNION ALL SELECT ssn FROM customers EXCEPT SELECT 'x'")
    assert o[0].sources == {O + "total", C + "ssn"} and not o[0].direct


def test_union_in_subquery_is_resolved_by_first_branch_names():
    o = outs("SELECT u.a FROM (SELECT id AS a FROM orders UNION SELECT ssn FROM customers) u")
    assert o == (col(O + "id", C + "ssn", direct=True),)


# --------------------------------------------------------------------------- search_path


def test_search_path_prefers_known_schema():
    crm = ("crm", "public")
    assert outs("SELECT email FROM customers", search_path=crm) == (col("crm.customers.email", direct=True),)
    assert outs("SELECT * FROM customers", search_path=("crm", "public")) == tuple(
        col(f"crm.customers.{c}", direct=True) for c in CATALOG["crm.customers"])
    # unknown in the first schema: the next one wins
    assert outs("SELECT email FROM customers", search_path=("nowhere", "public")) == (col(C + "email", direct=True),)
    # no catalog at all: every candidate
    o = outs("SELECT email FROM customers", search_path=("crm", "public"), columns_of=lambda q: None)
    assert o == (col("crm.customers.email", "public.customers.email", direct=True),)


# --------------------------------------------------------------------------- DML and writes


def test_returning():
    lg = lin("DELETE FROM customers WHERE id = 1 RETURNING email, upper(ssn)")
    assert lg.outputs == (col(C + "email", direct=True), col(C + "ssn"))
    assert lg.write_sources == frozenset()
    lg = lin("UPDATE orders o SET total = 1 FROM customers c WHERE c.id = o.customer_id RETURNING o.id, c.phone")
    assert lg.outputs == (col(O + "id", direct=True), col(C + "phone", direct=True))
    assert lin("INSERT INTO orders (total) VALUES (1) RETURNING *").outputs == tuple(
        col(O + c, direct=True) for c in CATALOG["public.orders"])
    assert lin("INSERT INTO orders (total) VALUES (1)").outputs == ()


def test_insert_select_write_sources():
    lg = lin("INSERT INTO payments (iban) SELECT card_number FROM customers WHERE ssn IS NOT NULL")
    assert lg.write_sources == {C + "card_number"}
    assert lg.outputs == ()
    lg = lin("INSERT INTO payments (iban, amount) VALUES ((SELECT email FROM customers LIMIT 1), 1)")
    assert C + "email" in lg.write_sources


def test_update_set_write_sources():
    lg = lin("UPDATE customers SET full_name = email WHERE ssn = '1'")
    assert lg.write_sources == {C + "email"}
    lg = lin("UPDATE orders o SET total = length(c.ssn) FROM customers c WHERE c.id = o.customer_id")
    assert lg.write_sources == {C + "ssn"}


def test_merge_write_sources():
    lg = lin("MERGE INTO orders o USING customers c ON o.customer_id = c.id "
             "WHEN MATCHED THEN UPDATE SET total = length(c.ssn) "
             "WHEN NOT MATCHED THEN INSERT (total) VALUES (length(c.phone))")
    assert lg.write_sources == {C + "ssn", C + "phone"}
    assert lg.outputs == ()


def test_ctas_and_select_into_write_sources():
    lg = lin("CREATE TABLE leak AS SELECT email, id FROM customers")
    assert lg.outputs == () and lg.write_sources == {C + "email", C + "id"}
    lg = lin("SELECT ssn INTO leak FROM customers")
    assert lg.outputs == () and lg.write_sources == {C + "ssn"}
    lg = lin("CREATE MATERIALIZED VIEW mv AS SELECT upper(phone) FROM customers")
    assert lg.write_sources == {C + "phone"}
    lg = lin("CREATE TABLE leak AS SELECT * FROM mystery")
    assert lg.write_sources == {"public.mystery.*"}


def test_data_modifying_cte():
    lg = lin("WITH d AS (INSERT INTO payments (iban) SELECT card_number FROM customers RETURNING id, iban) "
             "SELECT * FROM d")
    assert lg.outputs == (col(P + "id", direct=True), col(P + "iban", direct=True))
    assert lg.write_sources == {C + "card_number"}


def test_plain_select_writes_nothing():
    assert lin("SELECT email FROM customers").write_sources == frozenset()
    assert lin("COPY (SELECT email FROM customers) TO STDOUT").write_sources == frozenset()


def test_alter_column_using_writes():
    assert lin("ALTER TABLE customers ALTER COLUMN phone TYPE text USING ssn").write_sources == {C + "ssn"}


# --------------------------------------------------------------------------- statement kinds


def test_statement_kinds():
    assert lin("EXPLAIN SELECT ssn FROM customers").outputs == (col(),)
    assert lin("SHOW search_path").outputs == (col(),)
    for sql in ("SET search_path = x", "BEGIN", "CREATE TABLE t (a int)", "DROP TABLE t", "MOVE 1 IN c"):
        assert lin(sql).outputs == (), sql
    for sql in ("EXECUTE p(1)", "FETCH 1 FROM c", "CALL p()", "COPY customers TO STDOUT"):
        assert lin(sql).outputs is None, sql


def test_multi_statement():
    got = statement_lineage("SELECT 1; SELECT email FROM customers; SET x = 1; UPDATE customers SET phone = ssn",
                            columns_of=columns_of)
    assert len(got) == 4
    assert got[0].outputs == (col(),)
    assert got[1].outputs == (col(C + "email", direct=True),)
    assert got[2].outputs == ()
    assert got[3].outputs == () and got[3].write_sources == {C + "ssn"}


def test_parse_error_raises():
    with pytest.raises(Exception):
        statement_lineage("SELEC email FROM")


def test_report_query():
    o = outs(REPORT)
    assert o is not None and len(o) == 6
    assert o[0] == col(C + "id", direct=True)
    assert o[1].sources == {C + "email"} and not o[1].direct
    assert o[2].sources == {O + "total"}
    assert o[3].sources == {P + "iban"}
    assert o[4].sources == {O + "id"}
    assert o[5].sources >= {C + "ssn"}


REPORT = """
WITH recent AS (
    SELECT o.customer_id, sum(o.total) AS spent, count(*) AS n, max(o.id) AS last_order
    FROM orders o
    WHERE o.created_at > now() - interval '30 days'
    GROUP BY o.customer_id
)
SELECT c.id, lower(c.email) AS contact, r.spent,
       string_agg(DISTINCT p.iban, ', ') AS ibans, r.last_order,
       (SELECT count(*) FROM customers c2 WHERE c2.ssn = c.ssn) AS dupes
FROM customers c
JOIN recent r ON r.customer_id = c.id
LEFT JOIN payments p ON p.order_id = r.last_order
WHERE c.birth_date < now() - interval '18 years'
GROUP BY c.id, c.email, r.spent, r.last_order
ORDER BY r.spent DESC LIMIT 50
"""


if __name__ == "__main__":  # timing (not a test): python tests/test_lineage.py
    import timeit

    n = 2000
    t = timeit.timeit(lambda: statement_lineage(REPORT, columns_of=columns_of), number=n)
    print(f"statement_lineage on the report query: {t / n * 1e6:.0f} us per call")
