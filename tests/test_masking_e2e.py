"""Streaming masking end to end: the shipped rules in front of the demo schema; psql, psycopg
(text) and asyncpg (binary) read personal data through every route, and the raw values never
reach the client."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import struct
import subprocess
from pathlib import Path

import asyncpg
import psycopg
import pytest

from pooler.pgcluster import seed_demo
from tests.conftest import upstream_entry

REPO = Path(__file__).resolve().parent.parent
USERS = {"agent": "groups=agents", "ann": "groups=analysts", "dba": "groups=admins,pii-readers"}
DB = "mask_shop"


@pytest.fixture(scope="module")
def shop(pg):
    seed_demo(pg, DB)
    pg.execute("CREATE OR REPLACE FUNCTION leak_email(i int) RETURNS text LANGUAGE sql AS "
               "$$ SELECT email FROM customers WHERE id = i $$", dbname=DB)
    pg.execute("CREATE OR REPLACE FUNCTION shout(t text) RETURNS text LANGUAGE plpgsql AS "
               "$$ BEGIN RAISE NOTICE 'value: %', t; RAISE EXCEPTION 'bad value %', t; END $$", dbname=DB)
    pg.execute("CREATE OR REPLACE VIEW vip AS SELECT c.id AS cid, upper(c.email) AS mail, c.city "
               "FROM customers c WHERE c.id < 50", dbname=DB)
    return DB


@pytest.fixture(scope="module")
def raw(pg, shop):
    """The real values, read directly from PostgreSQL."""
    rows = pg.psql("SELECT id, full_name, email, phone, card_number, ssn, coalesce(birth_date::text, '') "
                   "FROM customers ORDER BY id", dbname=shop)
    out = {}
    for line in rows.strip().splitlines():
        i, name, email, phone, card, ssn, birth = line.split("|")
        out[int(i)] = {"full_name": name, "email": email, "phone": phone, "card_number": card, "ssn": ssn,
                       "birth_date": birth}
    ibans = pg.psql("SELECT iban FROM payments WHERE iban IS NOT NULL", dbname=shop).split()
    return out, ibans


def secrets_of(raw) -> list[str]:
    customers, ibans = raw
    vals = []
    for c in customers.values():
        vals += [c["email"], c["phone"], c["card_number"], c["ssn"], c["full_name"]]
    return [v for v in vals + ibans if v]


def assert_no_secret(text: str, raw) -> None:
    low = text.lower()
    for v in secrets_of(raw):
        assert v.lower() not in low, f"raw value {v!r} reached the client"


@pytest.fixture
def mgw(pg, shop, gw_factory):
    return gw_factory(settings={"rules_dir": str(REPO / "rules"), "mask_hash_key": "test-key"}, users=USERS,
                      databases={"shop": upstream_entry(pg, shop)})


def psql(gw, sql, user="agent"):
    env = dict(os.environ)
    env.pop("PGPASSWORD", None)
    return subprocess.run(["psql", "-X", "-At", "-v", "ON_ERROR_STOP=1", "-d", gw.dsn(user=user, dbname="shop"),
                           "-c", sql], capture_output=True, text=True, env=env, timeout=60)


# --------------------------------------------------------------------------- every route of point 1

ROUTES = [
    "SELECT email, phone, card_number, ssn, full_name, birth_date FROM customers",
    "SELECT * FROM customers",
    "SELECT c.* FROM customers c",
    "SELECT upper(email) FROM customers",
    "SELECT email || '' FROM customers",
    "SELECT substr(phone, 1, 20) FROM customers",
    "SELECT email::varchar(200), CAST(card_number AS text) FROM customers",
    "SELECT string_agg(email, ',') FROM customers",
    "SELECT (SELECT email FROM customers c2 WHERE c2.id = o.customer_id) FROM orders o",
    "WITH x AS (SELECT email AS e, phone FROM customers) SELECT e, phone FROM x",
    "WITH x AS (SELECT * FROM customers) SELECT * FROM x",
    "WITH a AS (SELECT email FROM customers), b AS (SELECT email AS m FROM a) SELECT lower(m) FROM b",
    "SELECT city FROM customers UNION ALL SELECT email FROM customers",
    "SELECT 'x' UNION SELECT card_number FROM customers",
    "SELECT row_to_json(c) FROM customers c",
    "SELECT json_agg(c) FROM customers c",
    "SELECT c FROM customers c",
    "SELECT * FROM customer_contacts",
    "SELECT mail FROM vip",
    "SELECT s.x FROM (SELECT email AS x FROM customers) s",
    "SELECT leak_email(id) FROM customers",
    "SELECT iban FROM payments",
    "SELECT format('%s <%s>', full_name, email) FROM customers",
    "SELECT CASE WHEN id > 0 THEN email END FROM customers",
    "SELECT ARRAY[email, phone] FROM customers",
    "SELECT e FROM customers, LATERAL (SELECT email AS e) l",
    "SELECT t.* FROM (VALUES (1)) v(n), LATERAL (SELECT ssn FROM customers) t",
]


@pytest.mark.parametrize("sql", ROUTES)
def test_routes_psycopg_text(mgw, raw, sql):
    with psycopg.connect(mgw.dsn(user="agent", dbname="shop"), autocommit=True) as conn:
        rows = conn.execute(sql).fetchall()
        assert rows, sql
        assert_no_secret(repr(rows), raw)


@pytest.mark.parametrize("sql", ROUTES)
def test_routes_asyncpg_binary(mgw, raw, sql):
    async def main():
        conn = await asyncpg.connect(mgw.url(user="agent", dbname="shop"))
        try:
            rows = await conn.fetch(sql)  # prepared, binary results
            cur_rows = []
            async with conn.transaction():
                async for r in conn.cursor(sql, prefetch=7):  # portal with a row limit
                    cur_rows.append(r)
            return rows, cur_rows
        finally:
            await conn.close()

    rows, cur_rows = asyncio.run(main())
    assert rows and len(cur_rows) == len(rows)
    assert_no_secret(repr([tuple(r) for r in rows]) + repr([tuple(r) for r in cur_rows]), raw)


@pytest.mark.parametrize("sql", ROUTES[:6] + ROUTES[14:19])
def test_routes_psql(mgw, raw, sql):
    r = psql(mgw, sql)
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.splitlines()) >= 1  # whole rows masked as a whole may be NULL (empty lines)
    assert_no_secret(r.stdout + r.stderr, raw)


# --------------------------------------------------------------------------- methods and wire correctness


def test_methods_on_the_shipped_rules(mgw, raw):
    customers, _ = raw
    with psycopg.connect(mgw.dsn(user="agent", dbname="shop"), autocommit=True) as conn:
        rows = conn.execute("SELECT id, full_name, email, phone, card_number, ssn, birth_date, city "
                            "FROM customers ORDER BY id").fetchall()
    assert len(rows) == len(customers)
    for cid, name, email, phone, card, ssn, birth, city in rows:
        real = customers[cid]
        assert re.fullmatch(r"h_[0-9a-f]{16}", name), name  # hash
        assert email == "***@" + real["email"].split("@")[1]  # email keeps the domain
        assert phone.endswith(real["phone"][-4:]) and set(phone[:-4]) == {"*"}  # partial
        assert len(phone) == len(real["phone"])
        assert card.endswith(real["card_number"][-4:]) and set(card[:-4]) == {"*"}
        assert ssn == "***"  # redact
        assert birth is None  # null
        assert city is not None  # not listed: byte-identical
    with psycopg.connect(mgw.dsn(user="dba", dbname="shop"), autocommit=True) as conn:
        got = dict(conn.execute("SELECT id, email FROM customers").fetchall())
    assert got == {i: c["email"] for i, c in customers.items()}  # pii-readers see everything


def test_hash_is_deterministic_so_joins_still_work(mgw):
    with psycopg.connect(mgw.dsn(user="agent", dbname="shop"), autocommit=True) as conn:
        a = conn.execute("SELECT id, full_name FROM customers ORDER BY id").fetchall()
        b = conn.execute("SELECT id, full_name FROM customer_contacts ORDER BY id").fetchall()
    assert a == b
    assert len({n for _, n in a}) == len(a)  # distinct inputs stay distinct


def test_unmasked_columns_byte_identical(mgw, pg, shop):
    sql = "SELECT id, city, created_at, email FROM customers ORDER BY id"
    with psycopg.connect(mgw.dsn(user="agent", dbname="shop"), autocommit=True) as conn:
        via = conn.execute(sql).fetchall()
    with psycopg.connect(pg.dsn(dbname=shop), autocommit=True) as conn:
        direct = conn.execute(sql).fetchall()
    assert [r[:3] for r in via] == [r[:3] for r in direct]
    assert all(v[3] != d[3] for v, d in zip(via, direct))
    # binary format, a typed masked column and a NULL
    async def main():
        conn = await asyncpg.connect(mgw.url(user="agent", dbname="shop"))
        try:
            return await conn.fetch("SELECT id, birth_date, created_at, phone, NULL::text AS n FROM customers ORDER BY id")
        finally:
            await conn.close()
    rows = asyncio.run(main())
    assert all(r["birth_date"] is None and r["n"] is None for r in rows)
    assert [r["created_at"] for r in rows] == [r[2] for r in direct]


def test_no_rows_no_parsing_and_tables_without_pii_untouched(mgw, pg, shop):
    sql = "SELECT * FROM products ORDER BY id"
    with psycopg.connect(mgw.dsn(user="agent", dbname="shop"), autocommit=True) as conn:
        via = conn.execute(sql).fetchall()
    with psycopg.connect(pg.dsn(dbname=shop), autocommit=True) as conn:
        assert via == conn.execute(sql).fetchall()


def test_extended_protocol_named_statements_psycopg(mgw, raw):
    # psycopg prepares after 5 executions: the named statement path must mask too
    with psycopg.connect(mgw.dsn(user="agent", dbname="shop"), autocommit=True) as conn:
        seen = []
        for i in range(1, 12):
            seen += conn.execute("SELECT email, phone FROM customers WHERE id = %s", (i,)).fetchall()
            seen += conn.execute("SELECT email FROM customers WHERE id = %s", (i,), binary=True).fetchall()
        assert len(seen) == 22
        assert_no_secret(repr(seen), raw)


def test_sql_prepare_execute_and_multi_statement(mgw, raw):
    r = psql(mgw, "PREPARE p AS SELECT email FROM customers ORDER BY id LIMIT 3; EXECUTE p; "
                  "SELECT 1; SELECT phone FROM customers LIMIT 2; EXECUTE p")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.split()
    assert lines[0] == "PREPARE" and len(lines) == 1 + 3 + 1 + 2 + 3
    assert all(x.startswith("***@") for x in lines[1:4] + lines[7:])
    assert_no_secret(r.stdout, raw)


# --------------------------------------------------------------------------- nothing else carries it out


def test_errors_and_notices_do_not_carry_values(mgw, raw):
    with psycopg.connect(mgw.dsn(user="agent", dbname="shop"), autocommit=True) as conn:
        notices = []
        conn.add_notice_handler(lambda d: notices.append(f"{d.message_primary} {d.message_detail} {d.context}"))
        with pytest.raises(psycopg.errors.InvalidTextRepresentation) as e:
            conn.execute("SELECT email::int FROM customers")
        assert_no_secret(str(e.value) + repr(e.value.diag.message_detail), raw)
        with pytest.raises(psycopg.errors.RaiseException) as e:
            conn.execute("SELECT shout(email) FROM customers")
        assert_no_secret(str(e.value) + repr(e.value.diag.context), raw)
        assert notices
        assert_no_secret(" ".join(notices), raw)
        assert conn.execute("SELECT 1").fetchone() == (1,)  # still in sync


@pytest.mark.parametrize("sql, needle", [
    ("COPY customers TO STDOUT", "COPY"),
    ("COPY (SELECT email FROM customers) TO STDOUT WITH (FORMAT csv)", "COPY"),
    ("DECLARE c CURSOR WITH HOLD FOR SELECT email FROM customers", "cursor"),
])
def test_copy_and_cursors_of_masked_columns_refused(mgw, raw, sql, needle):
    r = psql(mgw, sql)
    assert r.returncode != 0
    assert needle in r.stderr and "masks" in r.stderr, r.stderr
    assert_no_secret(r.stdout + r.stderr, raw)


def test_writes_that_copy_masked_values_refused(mgw, raw):
    with psycopg.connect(mgw.dsn(user="ann", dbname="shop"), autocommit=True) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="would copy values"):
            conn.execute("UPDATE customers SET city = email WHERE id = 1")
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="would copy values"):
            conn.execute("INSERT INTO payments (order_id, amount, iban) SELECT 1, 0, card_number FROM customers LIMIT 1")
        # the same write prepared first: EXECUTE is judged by what the prepared statement writes
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="would copy values"):
            conn.execute("PREPARE cp AS INSERT INTO products (name, price, stock) "
                         "SELECT email, 1, 1 FROM customers WHERE id = 7; EXECUTE cp")
        # a write that only reads unmasked data, with masked RETURNING, works
        rows = conn.execute("UPDATE customers SET city = city WHERE id = 1 RETURNING email").fetchall()
        assert rows[0][0].startswith("***@")


def test_slow_client_streams_in_bounded_memory(mgw, raw):
    """A large masked result read slowly: rows arrive masked and complete."""
    with psycopg.connect(mgw.dsn(user="agent", dbname="shop"), autocommit=True) as conn:
        n = 0
        with conn.cursor() as cur:
            for row in cur.stream("SELECT c.email, g FROM customers c, generate_series(1, 200) g"):
                assert row[0].startswith("***@")
                n += 1
        assert n == 200 * 200


def test_catalog_follows_ddl(mgw, pg, shop, raw):
    with psycopg.connect(mgw.dsn(user="dba", dbname="shop"), autocommit=True) as dba, \
            psycopg.connect(mgw.dsn(user="agent", dbname="shop"), autocommit=True) as agent:
        dba.execute("CREATE OR REPLACE VIEW late AS SELECT id, phone AS p FROM customers")
        rows = agent.execute("SELECT p FROM late").fetchall()
        assert_no_secret(repr(rows), raw)
        dba.execute("CREATE OR REPLACE VIEW late AS SELECT id, card_number AS p FROM customers")
        rows = agent.execute("SELECT p FROM late").fetchall()
        assert_no_secret(repr(rows), raw)
        dba.execute("DROP VIEW late")


def test_masked_counts_logged_at_debug(pg, shop, gw_factory, raw):
    gw = gw_factory(settings={"rules_dir": str(REPO / "rules"), "verbose": "2"}, users=USERS,
                    databases={"shop": upstream_entry(pg, shop)})
    with psycopg.connect(gw.dsn(user="agent", dbname="shop"), autocommit=True) as conn:
        conn.execute("SELECT email FROM customers LIMIT 7").fetchall()
    log = gw.wait_log("public.customers.email=7")
    assert_no_secret(log, raw)


# --------------------------------------------------------------------------- raw protocol routes


@pytest.mark.parametrize("mode", ["transaction", "session"])
def test_raw_extended_protocol_without_describe(pg, shop, gw_factory, raw, mode):
    """Bind/Execute with no Describe from the client (a driver that cached the row description),
    a reused statement name, and a binary result format: every row arrives masked."""
    from tests.wire import SYNC, Raw, bind, execute, msg, parse

    gw = gw_factory(settings={"rules_dir": str(REPO / "rules"), "pool_mode": mode}, users=USERS,
                    databases={"shop": upstream_entry(pg, shop)})
    c = Raw(gw, "agent")
    try:
        c.send(parse(b"s1", "SELECT email, id FROM customers ORDER BY id LIMIT 3"), SYNC)
        c.until_ready()
        # reusing the name fails on the server; the masked statement stays what runs
        c.send(parse(b"s1", "SELECT 'harmless'::text, 1"), SYNC)
        assert any(t == b"E" for t, _ in c.until_ready())
        c.send(bind(stmt=b"s1"), execute(), SYNC)
        rows = [body for t, body in c.until_ready() if t == b"D"]
        assert len(rows) == 3
        assert_no_secret(repr(rows), raw)
        assert all(b"***@example.com" in r for r in rows)
        # binary result format for all columns, unnamed statement, row limit of 2 then the rest
        c.send(parse(b"", "SELECT phone FROM customers ORDER BY id LIMIT 5"),
               msg(b"B", b"\x00\x00" + b"\x00\x00" + b"\x00\x00" + b"\x00\x01\x00\x01"),
               msg(b"E", b"\x00" + struct.pack("!i", 2)), msg(b"E", b"\x00" + struct.pack("!i", 0)), SYNC)
        replies = c.until_ready()
        rows = [body for t, body in replies if t == b"D"]
        assert len(rows) == 5 and any(t == b"s" for t, _ in replies)
        assert all(b"*******01" in r for r in rows)
        assert_no_secret(repr(rows), raw)
        # closing and re-preparing the name with an unmasked statement unmasks it (no stale masks)
        c.send(msg(b"C", b"Ss1\x00"), parse(b"s1", "SELECT city FROM customers ORDER BY id LIMIT 1"),
               bind(stmt=b"s1"), execute(), SYNC)
        rows = [body for t, body in c.until_ready() if t == b"D"]
        assert len(rows) == 1 and b"***" not in rows[0]
    finally:
        c.close()


def test_reload_rereads_the_catalog_after_ddl_made_elsewhere(pg, shop, mgw, raw):
    with psycopg.connect(mgw.dsn(user="agent", dbname="shop"), autocommit=True) as agent:
        pg.execute("CREATE OR REPLACE VIEW elsewhere AS SELECT id, city AS p FROM customers", dbname=shop)
        city = agent.execute("SELECT p FROM elsewhere WHERE id = 1").fetchone()[0]
        assert city and "@" not in city  # a city: not masked
        # the same view (same OID) now shows e-mails: changed directly in PostgreSQL, not through
        # the gateway; RELOAD (SIGHUP) makes the gateway read the catalog again
        pg.execute("CREATE OR REPLACE VIEW elsewhere AS SELECT id, email AS p FROM customers", dbname=shop)
        mgw.signal(signal.SIGHUP)
        mgw.wait_log("configuration reloaded")
        rows = agent.execute("SELECT p FROM elsewhere").fetchall()
        assert rows and all(r[0] == "***@example.com" for r in rows)
    pg.execute("DROP VIEW elsewhere", dbname=shop)
