"""The policy gate end to end: the shipped rules in front of the demo schema, with psql, psycopg,
asyncpg and raw protocol messages trying every route to get a refused statement through."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import struct
import subprocess
from pathlib import Path

import asyncpg
import psycopg
import pytest

from pooler.pgcluster import seed_demo
from tests.conftest import upstream_entry
from tests.wire import SYNC, Raw, bind, errors, execute, msg, parse

REPO = Path(__file__).resolve().parent.parent
USERS = {"agent": "groups=agents", "ann": "groups=analysts", "dba": "groups=admins,pii-readers"}


@pytest.fixture(scope="module")
def shop(pg):
    seed_demo(pg, "policy_shop")
    pg.execute("CREATE OR REPLACE PROCEDURE wipe_orders() LANGUAGE sql AS $$ DELETE FROM order_items $$",
               dbname="policy_shop")
    return "policy_shop"


@pytest.fixture
def pgw(pg, shop, gw_factory):
    # a statement held for approval that nobody decides is refused after approval_timeout
    # (tests/test_approvals.py decides them)
    return gw_factory(settings={"rules_dir": str(REPO / "rules"), "approval_timeout": "0.2"}, users=USERS,
                      databases={"shop": upstream_entry(pg, shop)})


def count(pg, sql: str) -> int:
    return int(pg.psql(sql, dbname="policy_shop").strip())


def psql(gw, sql, user):
    env = dict(os.environ)
    env.pop("PGPASSWORD", None)
    return subprocess.run(["psql", "-X", "-At", "-v", "ON_ERROR_STOP=1", "-d", gw.dsn(user=user, dbname="shop"),
                           "-c", sql], capture_output=True, text=True, env=env, timeout=60)


# --------------------------------------------------------------------------- simple query


def test_psql_refusal_names_rule_and_reason(pgw):
    r = psql(pgw, "DELETE FROM orders WHERE id = 1", "agent")
    assert r.returncode != 0
    assert "refused by rules/20_agents.star: agents may only read data (DELETE writes)" in r.stderr
    r = psql(pgw, "SELECT count(*) FROM products", "agent")
    assert r.returncode == 0 and int(r.stdout) > 0


def test_multi_statement_query_runs_nothing_when_one_is_refused(pg, pgw):
    before = count(pg, "SELECT count(*) FROM products")
    r = psql(pgw, "INSERT INTO products (name, price, stock) VALUES ('sneaky', 1, 1); DROP TABLE orders", "ann")
    assert r.returncode != 0 and "schema changes are not allowed (DROP TABLE)" in r.stderr
    assert count(pg, "SELECT count(*) FROM products") == before
    assert count(pg, "SELECT count(*) FROM pg_tables WHERE tablename = 'orders'") == 1


def test_refusal_inside_a_transaction_fails_it_like_a_server_error(pg, pgw):
    with psycopg.connect(pgw.dsn(user="agent", dbname="shop")) as conn:
        conn.execute("SELECT 1")  # opens a transaction (psycopg's default)
        with pytest.raises(psycopg.errors.InsufficientPrivilege) as e:
            conn.execute("UPDATE products SET price = 0 WHERE id = 1")
        assert e.value.diag.sqlstate == "42501"
        assert "rules/20_agents.star" in e.value.diag.message_primary
        with pytest.raises(psycopg.errors.InFailedSqlTransaction):
            conn.execute("SELECT 1")
        conn.rollback()
        assert conn.execute("SELECT 2").fetchone() == (2,)
    assert count(pg, "SELECT count(*) FROM products WHERE price = 0") == 0


def test_refusal_outside_a_transaction_leaves_the_session_usable(pgw):
    with psycopg.connect(pgw.dsn(user="agent", dbname="shop"), autocommit=True) as conn:
        for _ in range(3):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute("TRUNCATE orders")
            assert conn.execute("SELECT 1").fetchone() == (1,)


# --------------------------------------------------------------------------- extended protocol


def test_psycopg_extended_and_prepared_refused_at_parse(pg, pgw):
    with psycopg.connect(pgw.dsn(user="agent", dbname="shop"), autocommit=True) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("DELETE FROM orders WHERE id = %s", (1,))
        for _ in range(7):  # past psycopg's prepare threshold
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute("UPDATE orders SET status = %s WHERE id = %s", ("x", 1), prepare=True)
        assert conn.execute("SELECT count(*) FROM orders WHERE id = %s", (1,)).fetchone()[0] == 1
    assert count(pg, "SELECT count(*) FROM orders WHERE status = 'x'") == 0


def test_asyncpg_every_call_style_is_governed(pg, pgw):
    async def go():
        conn = await asyncpg.connect(host=pgw.host, port=pgw.port, user="agent", database="shop", ssl=False)
        try:
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await conn.execute("DELETE FROM orders")  # simple protocol
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await conn.fetch("DELETE FROM orders WHERE id = $1 RETURNING id", 1)  # Parse/Bind/Execute
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await conn.prepare("UPDATE orders SET status = $1")
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await conn.executemany("INSERT INTO products (name, price, stock) VALUES ($1, 1, 1)", [("a",), ("b",)])
            async with conn.transaction():
                assert await conn.fetchval("SELECT count(*) FROM products WHERE price > $1", 0) > 0
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                async with conn.transaction():
                    await conn.fetch("SELECT pg_read_file('/etc/hostname')")
            assert await conn.fetchval("SELECT 1") == 1
        finally:
            await conn.close()
    asyncio.run(go())
    assert count(pg, "SELECT count(*) FROM products WHERE name IN ('a', 'b')") == 0


def test_bind_and_execute_of_a_refused_parse_fail_too(pg, pgw):
    c = Raw(pgw, "agent")
    # a refused unnamed Parse, then Bind/Execute of it in the same batch
    c.send(parse(b"", "DELETE FROM order_items"), bind(), execute(), SYNC)
    replies = c.until_ready()
    errs = errors(replies)
    assert len(errs) == 1 and errs[0]["C"] == "42501"
    assert not any(t == b"C" for t, _ in replies)  # nothing completed
    # an allowed unnamed statement, then a refused Parse: the old statement must not run
    c.send(parse(b"", "SELECT 1"), SYNC)
    assert not errors(c.until_ready())
    c.send(parse(b"", "DELETE FROM order_items"), SYNC)
    assert errors(c.until_ready())[0]["C"] == "42501"
    c.send(bind(), execute(), SYNC)
    errs = errors(c.until_ready())
    assert errs and errs[0]["C"] == "26000"
    # named: the refused name never exists
    c.send(parse(b"wipe", "DELETE FROM order_items"), SYNC)
    assert errors(c.until_ready())[0]["C"] == "42501"
    c.send(bind(stmt=b"wipe"), execute(), SYNC)
    assert errors(c.until_ready())[0]["C"] == "26000"
    c.close()
    assert count(pg, "SELECT count(*) FROM order_items") > 0


def test_unnamed_statement_of_another_client_cannot_be_bound(pgw):
    a = Raw(pgw, "ann")
    a.send(parse(b"", "SELECT 42"), SYNC)
    a.until_ready()
    b = Raw(pgw, "agent")
    b.send(bind(), execute(), SYNC)
    errs = errors(b.until_ready())
    assert errs and errs[0]["C"] == "26000"
    a.close()
    b.close()


def test_function_call_message_is_refused(pgw):
    c = Raw(pgw, "dba")
    # FunctionCall of oid 2624 (pg_read_file(text)), one text argument
    arg = b"/etc/hostname"
    body = struct.pack("!IhhhI", 2624, 1, 0, 1, len(arg)) + arg + struct.pack("!h", 0)
    c.send(msg(b"F", body))
    replies = c.until_ready()
    errs = errors(replies)
    assert errs and errs[0]["C"] == "42501" and "FunctionCall" in errs[0]["M"]
    assert not any(t == b"V" for t, _ in replies)
    c.close()


# --------------------------------------------------------------------------- SQL-level routes


def test_sql_prepare_and_execute_are_judged_as_the_statement(pg, pgw):
    with psycopg.connect(pgw.dsn(user="ann", dbname="shop")) as conn:
        conn.execute("PREPARE bump AS UPDATE products SET price = price + 1")
        with pytest.raises(psycopg.errors.InsufficientPrivilege) as e:
            conn.execute("EXECUTE bump")
        assert "approval required" in str(e.value) and "without WHERE" in str(e.value)
        conn.rollback()
        with pytest.raises(psycopg.errors.InvalidSqlStatementName):
            conn.execute("EXECUTE never_prepared")
    with psycopg.connect(pgw.dsn(user="agent", dbname="shop")) as conn:
        # PREPARE writes nothing (read_only, as in PostgreSQL); its EXECUTE is judged as the DELETE
        conn.execute("PREPARE wipe AS DELETE FROM orders WHERE id = $1")
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match=r"agents may only read data \(DELETE writes\)"):
            conn.execute("EXECUTE wipe(1)")
        conn.rollback()
        conn.execute("PREPARE top AS SELECT name FROM products ORDER BY price DESC LIMIT $1")
        assert len(conn.execute("EXECUTE top(3)").fetchall()) == 3
    assert count(pg, "SELECT count(*) FROM products WHERE price = 0") == 0


@pytest.mark.parametrize("user,sql,needle", [
    ("agent", "EXPLAIN ANALYZE DELETE FROM orders", "agents may only read"),
    ("ann", "DO $$ BEGIN DELETE FROM order_items; END $$", "DO blocks"),
    ("agent", "CALL wipe_orders()", "agents may only read"),
    ("dba", "COPY orders TO PROGRAM 'cat > /tmp/pooler-leak'", "PROGRAM"),
    ("dba", "COPY orders FROM '/etc/hostname'", "server-side file"),
    ("agent", "COPY products FROM STDIN", "agents may only read"),
    ("dba", "SELECT name FROM products WHERE name = pg_read_file('/etc/hostname')", "pg_read_file"),
    ("dba", "SELECT * FROM products p, LATERAL pg_ls_dir('.') f", "pg_ls_dir"),
    ("dba", "SELECT lo_import('/etc/hostname')", "lo_import"),
    ("ann", "SELECT set_config('role', 'postgres', false)", "changing role"),
    ("ann", "SET ROLE postgres", "changing role"),
    ("ann", "SET SESSION AUTHORIZATION postgres", "session_authorization"),
    ("ann", "ALTER SYSTEM SET work_mem = '1GB'", "ALTER SYSTEM"),
    ("ann", "GRANT SELECT ON customers TO public", "privilege"),
    ("ann", "CREATE TABLE stolen AS SELECT * FROM customers", "schema changes"),
    ("agent", "COPY (SELECT email FROM customers) TO STDOUT", "masks"),  # masked results: test_masking_e2e.py
    ("ann", "UPDATE products SET price = 1", "approval required"),
    ("agent", "SELECT * FROM orders WHERE", "could not be analyzed"),
])
def test_refused_routes(pgw, user, sql, needle):
    with psycopg.connect(pgw.dsn(user=user, dbname="shop"), autocommit=True) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege) as e:
            conn.execute(sql)
        assert needle in str(e.value), str(e.value)
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_allowed_routes(pgw):
    with psycopg.connect(pgw.dsn(user="dba", dbname="shop"), autocommit=True) as conn:
        assert conn.execute("SELECT count(email) FROM customers").fetchone()[0] > 0  # pii-readers
        conn.execute("CREATE TABLE IF NOT EXISTS scratch (a int)")  # admins may change the schema
        conn.execute("DROP TABLE scratch")
    with psycopg.connect(pgw.dsn(user="agent", dbname="shop"), autocommit=True) as conn:
        assert conn.execute("SELECT count(*) FROM customers").fetchone()[0] > 0  # no personal column
        with conn.cursor() as cur:
            with cur.copy("COPY (SELECT id, name FROM products ORDER BY id) TO STDOUT") as cp:
                rows = list(cp.rows())
        assert rows
        conn.execute("SET statement_timeout = '5s'")
        assert conn.execute("EXPLAIN SELECT email FROM customers").fetchall()


def test_search_path_is_followed(pg, pgw):
    pg.execute("CREATE SCHEMA IF NOT EXISTS sales; CREATE TABLE IF NOT EXISTS sales.customers (email text)",
               dbname="policy_shop")
    with psycopg.connect(pgw.dsn(user="agent", dbname="shop"), autocommit=True) as conn:
        conn.execute("SET search_path = sales, public")
        # sales.customers or public.customers: the rules see both candidates and mask
        pub = conn.execute("SELECT email FROM public.customers LIMIT 1").fetchone()[0]
        assert pub.startswith("***@")
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="masks"):
            conn.execute("COPY (SELECT email FROM customers) TO STDOUT")
        conn.execute("SET search_path = sales")
        assert conn.execute("SELECT count(*) FROM customers").fetchone() == (0,)


# --------------------------------------------------------------------------- broken rules, reload


def write_rules(d: Path, files: dict[str, str]) -> None:
    d.mkdir(exist_ok=True)
    for p in d.glob("*"):
        p.unlink()
    for name, src in files.items():
        (d / name).write_text(src)


def test_a_rule_that_breaks_at_runtime_never_lets_a_statement_pass(pg, shop, gw_factory, tmp_path):
    rules = tmp_path / "broken-rules"
    write_rules(rules, {"ok.star": "def on_statement(stmt, session):\n    return allow()\n",
                        "bad.star": "def on_statement(stmt, session):\n    return stmt.tables[5]\n"})
    gw = gw_factory(settings={"rules_dir": str(rules)}, databases={"shop": upstream_entry(pg, shop)})
    with psycopg.connect(gw.dsn(dbname="shop"), autocommit=True) as conn:
        for sql in ("SELECT 1", "DELETE FROM order_items"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege) as e:
                conn.execute(sql)
            assert "rules/bad.star:2" in str(e.value) and "rule error" in str(e.value)
    assert count(pg, "SELECT count(*) FROM order_items") > 0


def test_rules_that_do_not_compile_stop_the_gateway_from_starting(pg, shop, gw_factory, tmp_path):
    rules = tmp_path / "bad-rules"
    write_rules(rules, {"bad.star": "def on_statement(stmt, session)\n    return None\n"})
    gw = gw_factory(settings={"rules_dir": str(rules)}, databases={"shop": upstream_entry(pg, shop)}, start=False)
    with pytest.raises(RuntimeError) as e:
        gw.start()
    assert "bad.star" in str(e.value)


def test_sighup_reloads_rules_atomically_and_rejects_broken_sets(pg, shop, gw_factory, tmp_path):
    rules = tmp_path / "live-rules"
    deny_delete = ("def on_statement(stmt, session):\n    if stmt.command == \"DELETE\":\n"
                   "        return deny(\"version one\")\n")
    write_rules(rules, {"a.star": deny_delete})
    gw = gw_factory(settings={"rules_dir": str(rules)}, databases={"shop": upstream_entry(pg, shop)})
    with psycopg.connect(gw.dsn(dbname="shop"), autocommit=True) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="version one"):
            conn.execute("DELETE FROM order_items")
        # a broken set (compile error) and a set whose tests fail are both rejected
        write_rules(rules, {"a.star": "def on_statement(stmt, session)\n"})
        gw.signal(signal.SIGHUP)
        gw.wait_log("rules not reloaded")
        write_rules(rules, {"a.star": "def on_statement(stmt, session):\n    return None\n",
                            "a.test.toml": '[[test]]\nsql = "DELETE FROM t"\nexpect = "deny"\n'})
        n = gw.log().count("rules not reloaded")
        gw.signal(signal.SIGHUP)
        _wait_count(gw, "rules not reloaded", n + 1)
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="version one"):
            conn.execute("DELETE FROM order_items")  # the old set keeps serving, same session
        # a good set takes effect for the running session
        write_rules(rules, {"a.star": "def on_statement(stmt, session):\n    if stmt.command == \"SELECT\":\n"
                                      "        return deny(\"version two\")\n"})
        gw.signal(signal.SIGHUP)
        gw.wait_log("rules loaded")
        _wait_refused(conn, "SELECT 1", "version two")
    assert count(pg, "SELECT count(*) FROM order_items") > 0


def _wait_count(gw, needle: str, n: int) -> None:
    import time

    deadline = time.monotonic() + 10
    while gw.log().count(needle) < n:
        assert time.monotonic() < deadline, gw.log()[-2000:]
        time.sleep(0.02)


def _wait_refused(conn, sql: str, needle: str) -> None:
    """The reload log line is written just before the new set is installed; poll the effect."""
    import time

    deadline = time.monotonic() + 10
    while True:
        try:
            conn.execute(sql)
        except psycopg.errors.InsufficientPrivilege as e:
            assert needle in str(e)
            return
        assert time.monotonic() < deadline
        time.sleep(0.02)


def test_session_tracking_fails_closed(pg, pgw):
    with psycopg.connect(pgw.dsn(user="agent", dbname="shop"), autocommit=True) as conn:
        # a SET rolled back (or a server handed to another transaction) cannot hide public.customers
        conn.execute("BEGIN")
        conn.execute("SET search_path = sales")
        conn.execute("ROLLBACK")
        assert conn.execute("SELECT email FROM customers LIMIT 1").fetchone()[0].startswith("***@")
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="masks"):
            conn.execute("COPY (SELECT email FROM customers) TO STDOUT")
    with psycopg.connect(pgw.dsn(user="ann", dbname="shop"), autocommit=True) as conn:
        # search_path changed behind the rules' back is refused
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="use SET search_path"):
            conn.execute("SELECT set_config('search_path', 'sales', false)")
        # re-preparing the name must not make the rules judge EXECUTE as other text
        # (transaction pooling: SQL-level statements last for the transaction, as with PgBouncer)
        with conn.transaction():
            conn.execute("PREPARE bump2 AS UPDATE products SET price = price + 1")
            with pytest.raises(psycopg.errors.DuplicatePreparedStatement):
                with conn.transaction():  # a savepoint
                    conn.execute("PREPARE bump2 AS SELECT 1")
            with pytest.raises(psycopg.errors.InsufficientPrivilege, match="approval required"):
                conn.execute("EXECUTE bump2")
        # after the transaction the statement may be on another server: EXECUTE is refused
        with pytest.raises(psycopg.errors.InvalidSqlStatementName):
            conn.execute("EXECUTE bump2")

    async def over_parse():  # EXECUTE sent as an extended-protocol Parse is judged too
        c = await asyncpg.connect(host=pgw.host, port=pgw.port, user="ann", database="shop", ssl=False)
        try:
            async with c.transaction():
                await c.execute("PREPARE bump3 AS UPDATE products SET price = price + 1")
                with pytest.raises(asyncpg.InsufficientPrivilegeError, match="approval required"):
                    await c.fetch("EXECUTE bump3")
        except asyncpg.InFailedSQLTransactionError:
            pass
        finally:
            await c.close()
    asyncio.run(over_parse())
    assert count(pg, "SELECT count(*) FROM products WHERE price = 0") == 0


@pytest.mark.parametrize("one_read", [True, False])
def test_a_malformed_parse_is_answered_alike_in_one_read_or_in_pieces(pgw, one_read):
    """A Parse whose query text lacks its terminator, then Sync: in one read (the fast lane)
    as in pieces (the general loop) the client gets 08P01 before the connection closes (the
    fast lane let the error escape: no ErrorResponse, a traceback in the log)."""
    c = Raw(pgw, "ann")
    data = msg(b"P", b"\x00SELECT 1") + msg(b"S", b"")
    if one_read:
        c.send(data)
    else:
        c.s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for i in range(len(data)):
            c.send(data[i:i + 1])
    t, body = c.read()
    assert t == b"E" and b"08P01" in body and b"invalid Parse message" in body, (t, body)
    assert psql(pgw, "SELECT 1", "ann").stdout.strip() == "1"
    assert "Traceback" not in pgw.log()
