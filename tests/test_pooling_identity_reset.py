"""A pooled server passing from one identity to another (transaction and statement pooling, and a
session-mode user on a shared pool) is reset, and every client keeps its own session: the
settings of the database entry (connect_query, timezone, datestyle, client_encoding) survive
the reset, each identity keeps its parameters across many switches, prepared statements of
psycopg, asyncpg and pgbench keep working, and the reset works without plpgsql."""

from __future__ import annotations

import asyncio
import subprocess

import asyncpg
import psycopg
import pytest

from tests.conftest import IDENTITIES, identities_gw, upstream_entry


# --------------------------------------------------------------------------- settings of the database entry


def test_connect_query_settings_survive_identity_switch(pg, gw_factory):
    gw = identities_gw(gw_factory, pg, extra_db=" connect_query='SET statement_timeout = 12345'")
    with psycopg.connect(gw.dsn(user="u1"), autocommit=True) as a, \
            psycopg.connect(gw.dsn(user="u2"), autocommit=True) as b:
        for _ in range(3):
            assert a.execute("SHOW statement_timeout").fetchone()[0] == "12345ms"
            assert b.execute("SHOW statement_timeout").fetchone()[0] == "12345ms"


def test_connect_query_timezone_survives_identity_switch(pg, gw_factory):
    gw = identities_gw(gw_factory, pg, extra_db=" connect_query='SET TimeZone = ''Asia/Tokyo'''")
    with psycopg.connect(gw.dsn(user="u1"), autocommit=True) as a, \
            psycopg.connect(gw.dsn(user="u2"), autocommit=True) as b:
        assert a.info.parameter_status("TimeZone") == "Asia/Tokyo"
        for _ in range(3):
            assert a.execute("SHOW TimeZone").fetchone()[0] == a.info.parameter_status("TimeZone")
            assert b.execute("SHOW TimeZone").fetchone()[0] == b.info.parameter_status("TimeZone")


def test_db_entry_timezone_datestyle_encoding_survive_identity_switch(pg, gw_factory):
    gw = identities_gw(gw_factory, pg, extra_db=" timezone=Asia/Tokyo datestyle='SQL, DMY' client_encoding=LATIN1")
    with psycopg.connect(gw.dsn(user="u1"), autocommit=True) as a, \
            psycopg.connect(gw.dsn(user="u2"), autocommit=True) as b:
        for _ in range(4):
            for conn in (a, b):
                assert conn.execute("SHOW TimeZone").fetchone()[0] == "Asia/Tokyo"
                assert conn.execute("SHOW DateStyle").fetchone()[0] == "SQL, DMY"
                assert conn.execute("SHOW client_encoding").fetchone()[0] == "LATIN1"


# --------------------------------------------------------------------------- each client's parameters


@pytest.mark.parametrize("size", [1, 2])
def test_each_identity_keeps_its_parameters_across_many_switches(pg, gw_factory, size):
    gw = identities_gw(gw_factory, pg, size=size)
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


def test_session_mode_user_sharing_pool_with_transaction_users(pg, gw_factory):
    users = dict(IDENTITIES, u3="groups=g3 pool_mode=session")
    gw = identities_gw(gw_factory, pg, users=users)
    with psycopg.connect(gw.dsn(user="u1"), autocommit=True) as a:
        a.execute("SELECT set_config('x.secret', 'from-u1', false)")
        a.execute("SET TimeZone = 'Asia/Tokyo'")
        pid = a.execute("SELECT pg_backend_pid()").fetchone()[0]
        with psycopg.connect(gw.dsn(user="u3"), autocommit=True) as c:
            assert c.execute("SELECT pg_backend_pid()").fetchone()[0] == pid
            assert c.execute("SELECT current_setting('x.secret', true)").fetchone()[0] in (None, "")
            assert c.execute("SHOW TimeZone").fetchone()[0] == c.info.parameter_status("TimeZone")


def test_statement_mode_identity_switches(pg, gw_factory):
    gw = identities_gw(gw_factory, pg, size=1, settings={"pool_mode": "statement"})
    with psycopg.connect(gw.dsn(user="u1", application_name="one"), autocommit=True) as a, \
            psycopg.connect(gw.dsn(user="u2", application_name="two"), autocommit=True) as b:
        for i in range(5):
            assert a.execute("SELECT current_setting('application_name'), %s::int", (i,), prepare=True).fetchone() == ("one", i)
            assert b.execute("SELECT current_setting('application_name'), %s::int", (i,), prepare=True).fetchone() == ("two", i)


# --------------------------------------------------------------------------- prepared statements


def test_psycopg_prepared_statements_survive_identity_resets(pg, gw_factory):
    gw = identities_gw(gw_factory, pg, size=1)
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
    gw = identities_gw(gw_factory, pg, size=1)

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
    gw = identities_gw(gw_factory, pg, size=1)
    procs = [subprocess.Popen(["pgbench", "-n", "-M", proto, "-c", "2", "-t", "100", "-S",
                               gw.dsn(user=u, dbname=pgbench_db)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for u in ("u1", "u2")]
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err + gw.log()[-2000:]
        assert "number of transactions actually processed: 200/200" in out, out


# --------------------------------------------------------------------------- the reset itself


def test_reset_works_in_a_database_without_plpgsql(pg, gw_factory):
    pg.execute("DROP DATABASE IF EXISTS noplpgsql")
    pg.execute("CREATE DATABASE noplpgsql")
    pg.execute("DROP EXTENSION plpgsql", dbname="noplpgsql")
    gw = gw_factory(settings={"default_pool_size": "1"}, users=IDENTITIES,
                    databases={"noplpgsql": upstream_entry(pg, "noplpgsql")})
    with psycopg.connect(gw.dsn(user="u1", dbname="noplpgsql"), autocommit=True) as a, \
            psycopg.connect(gw.dsn(user="u2", dbname="noplpgsql"), autocommit=True) as b:
        for i in range(3):
            assert a.execute("SELECT %s::int", (i,)).fetchone() == (i,)
            assert b.execute("SELECT %s::int", (i,)).fetchone() == (i,)
