"""Review of identity reset (transaction/statement pooling) and ReadyForQuery handling. The
tests that failed before their fix: connect_query settings lost by the reset, the reset failing
without plpgsql, a Query skipped after an error mistaken for answered, and a session-mode user
on a shared pool getting a server another identity used."""

from __future__ import annotations

import asyncio
import os
import socket
import struct
import subprocess

import asyncpg
import psycopg
import pytest

from pooler.protocol import messages as m
from tests.conftest import upstream_entry
from tests.test_policy_e2e import Raw

USERS = {"u1": "groups=g1", "u2": "groups=g2", "u3": "groups=g3"}


def _gw(gw_factory, pg, size=1, extra_db="", settings=None, users=None):
    s = {"default_pool_size": str(size)}
    s.update(settings or {})
    dbs = {"postgres": upstream_entry(pg) + extra_db, "bench": upstream_entry(pg, "bench")}
    return gw_factory(settings=s, users=users or USERS, databases=dbs)


def test_connect_query_settings_survive_identity_switch(pg, gw_factory):
    gw = _gw(gw_factory, pg, extra_db=" connect_query='SET statement_timeout = 12345'")
    with psycopg.connect(gw.dsn(user="u1"), autocommit=True) as a, \
            psycopg.connect(gw.dsn(user="u2"), autocommit=True) as b:
        for _ in range(3):
            assert a.execute("SHOW statement_timeout").fetchone()[0] == "12345ms"
            assert b.execute("SHOW statement_timeout").fetchone()[0] == "12345ms"


def test_connect_query_timezone_survives_identity_switch(pg, gw_factory):
    gw = _gw(gw_factory, pg, extra_db=" connect_query='SET TimeZone = ''Asia/Tokyo'''")
    with psycopg.connect(gw.dsn(user="u1"), autocommit=True) as a, \
            psycopg.connect(gw.dsn(user="u2"), autocommit=True) as b:
        assert a.info.parameter_status("TimeZone") == "Asia/Tokyo"
        for _ in range(3):
            assert a.execute("SHOW TimeZone").fetchone()[0] == a.info.parameter_status("TimeZone")
            assert b.execute("SHOW TimeZone").fetchone()[0] == b.info.parameter_status("TimeZone")


@pytest.mark.parametrize("size", [1, 2])
def test_each_identity_keeps_its_parameters_across_many_switches(pg, gw_factory, size):
    gw = _gw(gw_factory, pg, size=size)
    a = psycopg.connect(gw.dsn(user="u1", application_name="appone", options=""), autocommit=True)
    b = psycopg.connect(gw.dsn(user="u2", application_name="apptwo", client_encoding="LATIN1"), autocommit=True)
    c = psycopg.connect(gw.dsn(user="u3"), autocommit=True)
    try:
        a.execute("SET IntervalStyle = 'sql_standard'")
        b.execute("SET standard_conforming_strings = off")
        c.execute("SET application_name = 'appthree'")
        c.execute("SET DateStyle = 'German'")
        want = {
            a: {"application_name": "appone", "IntervalStyle": "sql_standard", "client_encoding": "UTF8",
                "standard_conforming_strings": "on"},
            b: {"application_name": "apptwo", "client_encoding": "LATIN1", "standard_conforming_strings": "off",
                "IntervalStyle": "postgres"},
            c: {"application_name": "appthree", "DateStyle": "German, DMY", "client_encoding": "UTF8"},
        }
        for i in range(15):
            for conn in (a, b, c, b, a, c):
                for k, v in want[conn].items():
                    got = conn.execute(f"SHOW {k}").fetchone()[0]
                    assert got == v, (i, k, got, v)
                    assert conn.info.parameter_status(k) == v, (i, k)
    finally:
        for x in (a, b, c):
            x.close()


def test_db_entry_timezone_datestyle_encoding_survive_identity_switch(pg, gw_factory):
    gw = _gw(gw_factory, pg, extra_db=" timezone=Asia/Tokyo datestyle='SQL, DMY' client_encoding=LATIN1")
    with psycopg.connect(gw.dsn(user="u1"), autocommit=True) as a, \
            psycopg.connect(gw.dsn(user="u2"), autocommit=True) as b:
        for _ in range(4):
            for conn in (a, b):
                assert conn.execute("SHOW TimeZone").fetchone()[0] == "Asia/Tokyo"
                assert conn.execute("SHOW DateStyle").fetchone()[0] == "SQL, DMY"
                assert conn.execute("SHOW client_encoding").fetchone()[0] == "LATIN1"


def test_session_mode_user_sharing_pool_with_transaction_users(pg, gw_factory):
    users = dict(USERS, u3="groups=g3 pool_mode=session")
    gw = _gw(gw_factory, pg, users=users)
    with psycopg.connect(gw.dsn(user="u1"), autocommit=True) as a:
        a.execute("SELECT set_config('x.secret', 'from-u1', false)")
        a.execute("SET TimeZone = 'Asia/Tokyo'")
        pid = a.execute("SELECT pg_backend_pid()").fetchone()[0]
        with psycopg.connect(gw.dsn(user="u3"), autocommit=True) as c:
            assert c.execute("SELECT pg_backend_pid()").fetchone()[0] == pid
            assert c.execute("SELECT current_setting('x.secret', true)").fetchone()[0] in (None, "")
            assert c.execute("SHOW TimeZone").fetchone()[0] == c.info.parameter_status("TimeZone")


def test_psycopg_prepared_statements_survive_identity_resets(pg, gw_factory):
    gw = _gw(gw_factory, pg, size=1)
    conns = [psycopg.connect(gw.dsn(user=u), autocommit=True) for u in ("u1", "u2", "u3")]
    try:
        for i in range(12):
            for j, c in enumerate(conns):
                assert c.execute("SELECT %s::int + %s::int", (i, j)).fetchone() == (i + j,)
                assert c.execute(f"SELECT {j} + %s::int", (i,), prepare=True).fetchone() == (i + j,)
    finally:
        for c in conns:
            c.close()


def test_asyncpg_prepared_statements_survive_identity_resets(pg, gw_factory):
    gw = _gw(gw_factory, pg, size=1)

    async def main():
        conns = [await asyncpg.connect(gw.url(user=u)) for u in ("u1", "u2", "u3")]
        try:
            for i in range(10):
                for j, c in enumerate(conns):
                    assert await c.fetchval("SELECT $1::int + $2::int", i, j) == i + j
                    # (an explicit prepare ends with Flush, not Sync: use it at once, the
                    # server stays linked until then)
                    stmt = await c.prepare(f"SELECT $1::int * {j + 2}")
                    assert await stmt.fetchval(i) == (j + 2) * i
                    await c.executemany("SELECT $1::int", [(k,) for k in range(5)])
                    async with c.transaction():
                        assert await c.fetchval("SELECT $1::text", str(i)) == str(i)
            await asyncio.gather(*(c.fetchval("SELECT $1::int", 1) for c in conns))
        finally:
            for c in conns:
                await c.close()

    asyncio.run(main())


@pytest.mark.parametrize("proto", ["prepared", "extended"])
def test_pgbench_two_identities_alternating(pg, gw_factory, pgbench_db, proto):
    gw = _gw(gw_factory, pg, size=1)
    procs = [subprocess.Popen(["pgbench", "-n", "-M", proto, "-c", "2", "-t", "100", "-S",
                               gw.dsn(user=u, dbname=pgbench_db)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for u in ("u1", "u2")]
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err + gw.log()[-2000:]
        assert "number of transactions actually processed: 200/200" in out, out


def test_statement_mode_identity_switches(pg, gw_factory):
    gw = _gw(gw_factory, pg, size=1, settings={"pool_mode": "statement"})
    with psycopg.connect(gw.dsn(user="u1", application_name="one"), autocommit=True) as a, \
            psycopg.connect(gw.dsn(user="u2", application_name="two"), autocommit=True) as b:
        for i in range(5):
            assert a.execute("SELECT current_setting('application_name'), %s::int", (i,), prepare=True).fetchone() == ("one", i)
            assert b.execute("SELECT current_setting('application_name'), %s::int", (i,), prepare=True).fetchone() == ("two", i)


# --------------------------------------------------------------------------- raw protocol: ReadyForQuery


def _msg(t: bytes, body: bytes = b"") -> bytes:
    return t + struct.pack("!i", len(body) + 4) + body


def P(name: bytes, sql: bytes) -> bytes:
    return _msg(b"P", name + b"\0" + sql + b"\0\0\0")


def B(portal: bytes = b"", stmt: bytes = b"") -> bytes:
    return _msg(b"B", portal + b"\0" + stmt + b"\0" + b"\0\0\0\0\0\0")


def E(portal: bytes = b"", limit: int = 0) -> bytes:
    return _msg(b"E", portal + b"\0" + struct.pack("!i", limit))


def D(kind: bytes, name: bytes = b"") -> bytes:
    return _msg(b"D", kind + name + b"\0")


def C(kind: bytes, name: bytes = b"") -> bytes:
    return _msg(b"C", kind + name + b"\0")


S = _msg(b"S")
H = _msg(b"H")


class RawConn:
    def __init__(self, sock, user: str, dbname: str = "postgres") -> None:
        self.s = sock
        self.s.settimeout(10)
        self.s.sendall(m.startup_message({"user": user, "database": dbname}))
        self.buf = b""
        self.replies(1)

    read = Raw.read  # one message: (type, body)

    def replies(self, zs: int, until: bytes = b"Z"):
        """Message types (and error SQLSTATEs, row values) up to the zs-th message of type ``until``."""
        out = []
        while zs:
            t, body = self.read()
            if t in (b"S", b"N", b"K", b"R"):
                continue
            if t == b"E":
                out.append("E" + m.parse_error_fields(body).get("C", ""))
            elif t == b"D":
                out.append("D" + repr(m.parse_data_row(body)))
            elif t == b"C":
                out.append("C" + body[:-1].decode())
            elif t == b"Z":
                out.append("Z" + body.decode())
            else:
                out.append(t.decode())
            if t == until:
                zs -= 1
        return out

    def close(self):
        try:
            self.s.sendall(b"X\0\0\0\4")
        finally:
            self.s.close()


# (request batches, how many replies of which kind end each batch)
SCENARIOS = {
    "error_then_more_before_sync": [
        (P(b"", b"SELECT 1/0") + B() + E() + H, 1, b"E"),
        (B() + E() + S, 1, b"Z"),
        (P(b"", b"SELECT 7") + B() + E() + S, 1, b"Z"),
    ],
    "query_sent_while_skipping_to_sync": [
        (P(b"", b"SELECT 1/0") + B() + E() + H, 1, b"E"),
        (B() + E() + m.query("SELECT 'ignored'") + S, 1, b"Z"),
        (m.query("SELECT 8"), 1, b"Z"),
    ],
    "pipeline_error_middle": [
        (P(b"", b"SELECT 1") + B() + E() + P(b"", b"SELECT 1/0") + B() + E() + P(b"", b"SELECT 3") + B() + E() + S
         + P(b"", b"SELECT 4") + B() + E() + S, 2, b"Z"),
    ],
    "describe_sync_only": [
        (P(b"st1", b"SELECT 5 AS a") + S, 1, b"Z"),
        (D(b"S", b"st1") + S, 1, b"Z"),
        (D(b"S", b"st1") + D(b"S", b"st1") + S + S + S, 3, b"Z"),
        (B(b"", b"st1") + D(b"P") + E() + S, 1, b"Z"),
        (S, 1, b"Z"),
    ],
    "flush_without_sync": [
        (P(b"st2", b"SELECT 2 AS b") + D(b"S", b"st2") + H, 1, b"T"),
        (B(b"", b"st2") + E() + H, 1, b"C"),
        (B(b"", b"st2") + E() + S, 1, b"Z"),
    ],
    "empty_queries": [
        (m.query(""), 1, b"Z"),
        (P(b"", b"") + B() + D(b"P") + E() + S, 1, b"Z"),
        (m.query(";"), 1, b"Z"),
        (P(b"e1", b"") + B(b"", b"e1") + E() + S, 1, b"Z"),
    ],
    "portal_suspended": [
        (m.query("BEGIN"), 1, b"Z"),
        (P(b"", b"SELECT generate_series(1,5)") + B(b"p1") + E(b"p1", 2) + E(b"p1", 2) + S, 1, b"Z"),
        (E(b"p1", 0) + S + S, 2, b"Z"),
        (m.query("COMMIT"), 1, b"Z"),
    ],
    "sync_in_transaction": [
        (m.query("BEGIN"), 1, b"Z"),
        (S + S, 2, b"Z"),
        (P(b"", b"SELECT 1/0") + B() + E() + S + S, 2, b"Z"),
        (S, 1, b"Z"),
        (m.query("ROLLBACK"), 1, b"Z"),
    ],
    "close_and_errors": [
        (P(b"c1", b"SELECT 1") + C(b"S", b"c1") + C(b"S", b"c1") + C(b"P", b"nope") + S, 1, b"Z"),
        (P(b"c2", b"SELEC 1") + B(b"", b"c2") + E() + S, 1, b"Z"),
        (P(b"c2", b"SELECT 2") + B(b"", b"c2") + E() + S, 1, b"Z"),
    ],
    # the fast lanes (a lone Query, an unnamed Parse/Bind/Describe/Execute/Sync batch; a small
    # reply of plain messages) and every way out of them to the general loop
    "fast_lanes": [
        (m.query("SELECT 1"), 1, b"Z"),
        (P(b"", b"SELECT 2") + B() + D(b"P") + E() + S, 1, b"Z"),
        (P(b"", b"SELECT 3") + D(b"S") + B() + E() + B() + E() + S, 1, b"Z"),
        (m.query("SELECT 4; SELECT 5"), 1, b"Z"),
        (m.query("SET application_name = 'fastlane'"), 1, b"Z"),  # a ParameterStatus
        (m.query("DO $$BEGIN RAISE NOTICE 'n'; END$$"), 1, b"Z"),  # a NoticeResponse
        (m.query("SELECT length(repeat('x', 40000)), repeat('y', 20000) = repeat('y', 20000)"), 1, b"Z"),
        (m.query("SELECT count(*) FROM (SELECT generate_series(1, 3000)) s"), 1, b"Z"),
        (P(b"", b"SELEC 6") + B() + E() + S, 1, b"Z"),
        (P(b"", b"SELECT 7") + B() + E() + S, 1, b"Z"),
        (m.query("BEGIN"), 1, b"Z"),
        (P(b"", b"SELECT 8") + B() + E() + S, 1, b"Z"),
        (B() + E() + S, 1, b"Z"),  # the unnamed statement again, without Parse (same server)
        (m.query("SELECT 9"), 1, b"Z"),
        (m.query("COMMIT"), 1, b"Z"),
        (m.query("SELECT 1/0"), 1, b"Z"),
        (P(b"", b"SELECT 10") + B() + E() + S + m.query("SELECT 11"), 2, b"Z"),
    ],
}


def _run(conn, scenario):
    got = []
    for data, count, until in scenario:
        conn.s.sendall(data)
        got.append(conn.replies(count, until))
    return got


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_protocol_replies_match_postgresql(pg, gw_factory, name):
    gw = _gw(gw_factory, pg, size=1)
    scenario = SCENARIOS[name]
    s = socket.socket(socket.AF_UNIX)
    s.connect(os.path.join(pg.socket_dir, f".s.PGSQL.{pg.port}"))
    direct = RawConn(s, pg.superuser)
    want = _run(direct, scenario)
    direct.close()
    others = [RawConn(socket.create_connection((gw.host, gw.port)), u) for u in ("u2", "u3")]
    for rnd in range(2):
        via = RawConn(socket.create_connection((gw.host, gw.port)), "u1")
        for o in others:  # another identity takes the server in between: the next link resets it
            o.s.sendall(m.query("SELECT 1"))
            o.replies(1)
        got = _run(via, scenario)
        assert got == want, (rnd, gw.log()[-2000:])
        via.s.sendall(m.query("SELECT 'alive'"))
        assert via.replies(1) == ["T", "D[b'alive']", "CSELECT 1", "ZI"]


def test_query_ignored_while_skipping_to_sync_does_not_keep_the_server(pg, gw_factory):
    """After an extended-protocol error PostgreSQL ignores everything up to Sync, simple Query
    included: its ReadyForQuery answers the Sync. The gateway must not take it for the Query's
    (queue off by one: the server is never given back, later replies are matched to the wrong
    requests)."""
    gw = _gw(gw_factory, pg, size=1)
    via = RawConn(socket.create_connection((gw.host, gw.port)), "u1")
    _run(via, SCENARIOS["query_sent_while_skipping_to_sync"])
    other = RawConn(socket.create_connection((gw.host, gw.port)), "u2")
    other.s.settimeout(5)
    other.s.sendall(m.query("SELECT 'other'"))
    try:
        got = other.replies(1)
    except TimeoutError:
        got = "timed out: the server is still linked to u1"
    assert got == ["T", "D[b'other']", "CSELECT 1", "ZI"]
    via.close()
    other.close()


def test_reset_works_in_a_database_without_plpgsql(pg, gw_factory):
    pg.execute("DROP DATABASE IF EXISTS noplpgsql")
    pg.execute("CREATE DATABASE noplpgsql")
    pg.execute("DROP EXTENSION plpgsql", dbname="noplpgsql")
    gw = gw_factory(settings={"default_pool_size": "1"}, users=USERS,
                    databases={"noplpgsql": upstream_entry(pg, "noplpgsql")})
    with psycopg.connect(gw.dsn(user="u1", dbname="noplpgsql"), autocommit=True) as a, \
            psycopg.connect(gw.dsn(user="u2", dbname="noplpgsql"), autocommit=True) as b:
        for i in range(3):
            assert a.execute("SELECT %s::int", (i,)).fetchone() == (i,)
            assert b.execute("SELECT %s::int", (i,)).fetchone() == (i,)


# --------------------------------------------------------------------------- the fast lanes


def test_fast_lane_units_wait_for_a_server_and_keep_what_follows(pg, gw_factory):
    """A lone Query or an unnamed batch that waits for a server is sent as it was governed when
    the server comes; anything the client sent meanwhile follows it, in order."""
    gw = _gw(gw_factory, pg, size=1)
    a = RawConn(socket.create_connection((gw.host, gw.port)), "u1")
    b = RawConn(socket.create_connection((gw.host, gw.port)), "u1")
    c = RawConn(socket.create_connection((gw.host, gw.port)), "u2")
    a.s.sendall(m.query("BEGIN"))
    assert a.replies(1) == ["CBEGIN", "ZT"]
    b.s.sendall(P(b"", b"SELECT 'b1'") + B() + E() + S)  # waits: the only server is in a's transaction
    c.s.sendall(m.query("SELECT 'c1'"))  # waits too
    b.s.sendall(m.query("SELECT 'b2'"))  # arrives while b waits
    a.s.sendall(m.query("COMMIT"))
    assert a.replies(1) == ["CCOMMIT", "ZI"]
    assert b.replies(2) == ["1", "2", "D[b'b1']", "CSELECT 1", "ZI", "T", "D[b'b2']", "CSELECT 1", "ZI"]
    assert c.replies(1) == ["T", "D[b'c1']", "CSELECT 1", "ZI"]
    for conn in (a, b, c):
        conn.s.sendall(m.query("SELECT 'again'"))
        assert conn.replies(1) == ["T", "D[b'again']", "CSELECT 1", "ZI"]
        conn.close()


@pytest.mark.parametrize("bad", [
    _msg(b"B", b""),  # a Bind too short to hold its names
    _msg(b"E", b"\0"),  # an Execute without its row limit
    _msg(b"D", b"P"),  # a Describe without its name
])
def test_malformed_message_in_a_batch_closes_only_that_session(pg, gw_factory, bad):
    gw = _gw(gw_factory, pg, size=1)
    other = RawConn(socket.create_connection((gw.host, gw.port)), "u2")
    via = RawConn(socket.create_connection((gw.host, gw.port)), "u1")
    via.s.sendall(P(b"", b"SELECT 1") + bad + S)
    got = []
    while True:
        try:
            t, body = via.read()
        except (AssertionError, OSError):  # closed
            break
        got.append((t, m.parse_error_fields(body).get("C") if t == b"E" else None))
        if t == b"Z":
            break
    assert (b"E", "08P01") in got, got
    other.s.sendall(m.query("SELECT 'still here'"))
    assert other.replies(1) == ["T", "D[b'still here']", "CSELECT 1", "ZI"]
