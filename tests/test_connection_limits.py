"""max_db_connections and max_user_connections as PgBouncer 1.25 keeps them: a client beyond the
cap queues for a server (its login too, when its pool has never had one) instead of timing out,
and an idle server of another pool of the same database (or user) is closed to make room
("evicted", as PgBouncer's evict_connection). Real psycopg clients, real PostgreSQL."""

from __future__ import annotations

import threading
import time

import psycopg
import pytest

from tests.conftest import login_roles

ROLES = {"cap_a": "cap-a-pw", "cap_b": "cap-b-pw"}


@pytest.fixture(scope="module")
def roles(pg):
    login_roles(pg, ROLES)
    pg.execute("DROP DATABASE IF EXISTS caps2")
    pg.execute("CREATE DATABASE caps2")
    return ROLES


def limits_gw(gw_factory, pg, settings, db_extra=""):
    """Database postgres (and caps2) without an upstream user: a pool per client user, the
    upstream password from the auth_file."""
    s = {"default_pool_size": "2", "query_wait_timeout": "30", "admin_users": "postgres"}
    s.update(settings)
    dbs = {"postgres": f"host=127.0.0.1 port={pg.port} dbname=postgres{db_extra}",
           "caps2": f"host=127.0.0.1 port={pg.port} dbname=caps2"}
    return gw_factory(settings=s, databases=dbs, auth_users=dict(ROLES))


def wait_until(cond, what, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = cond()
        if got:
            return got
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def upstream_count(pg, **where) -> int:
    cond = " AND ".join(f"{k} = '{v}'" for k, v in where.items())
    return int(pg.psql(f"SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend' AND pid <> pg_backend_pid() AND {cond}").strip())


def login_in_thread(gw, user, dbname="postgres"):
    box: dict = {}

    def run():
        try:
            conn = psycopg.connect(gw.dsn(user=user, dbname=dbname), autocommit=True)
            box["value"] = conn.execute("SELECT current_user, pg_backend_pid()").fetchone()
            box["conn"] = conn
        except Exception as e:  # noqa: BLE001 - the test reads it
            box["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, box


def pools(gw) -> dict:
    with psycopg.connect(gw.dsn(user="postgres", dbname="pgbouncer"), autocommit=True, prepare_threshold=None) as c:
        cur = c.execute("SHOW POOLS")
        names = [d.name for d in cur.description]
        return {(r["database"], r["user"]): r for r in (dict(zip(names, row)) for row in cur.fetchall())}


def test_login_beyond_max_db_connections_waits_for_a_server_of_another_pool(gw_factory, pg, roles):
    gw = limits_gw(gw_factory, pg, {}, db_extra=" max_db_connections=1")
    a = psycopg.connect(gw.dsn(user="cap_a"))
    a.execute("SELECT 1")  # a transaction: cap_a's only server stays linked
    t, box = login_in_thread(gw, "cap_b")
    # cap_b's login waits (its pool never had a server and the database is full)
    wait_until(lambda: ("postgres", "cap_b") in pools(gw), "cap_b's pool")
    assert t.is_alive() and "error" not in box
    assert upstream_count(pg, datname="postgres", usename="cap_b") == 0
    a.commit()  # cap_a's server goes idle: it is evicted for cap_b
    t.join(20)
    assert "error" not in box, box.get("error")
    assert box["value"][0] == "cap_b"
    assert upstream_count(pg, datname="postgres", usename="cap_a") == 0
    assert upstream_count(pg, datname="postgres", usename="cap_b") == 1
    # and back: cap_a queues for a request now, and gets the server cap_b's pool frees
    t2, box2 = login_in_thread(gw, "cap_a")  # its pool has a welcome already: login is immediate
    t2.join(20)
    assert box2["value"][0] == "cap_a"
    box["conn"].close()
    box2["conn"].close()
    a.close()


def test_requests_beyond_max_db_connections_queue_rather_than_fail(gw_factory, pg, roles):
    gw = limits_gw(gw_factory, pg, {"max_db_connections": "1", "pool_mode": "transaction"})
    conns = [psycopg.connect(gw.dsn(user=u), autocommit=True) for u in ("cap_a", "cap_b", "cap_a", "cap_b")]
    results: list = []
    errors: list = []

    def work(c):
        try:
            for _ in range(10):
                results.append(c.execute("SELECT current_user").fetchone()[0])
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=work, args=(c,)) for c in conns]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    assert errors == []
    assert sorted(set(results)) == ["cap_a", "cap_b"] and len(results) == 40
    assert upstream_count(pg, datname="postgres") <= 1
    for c in conns:
        c.close()


def test_login_beyond_max_user_connections_waits_for_the_users_server_in_another_database(gw_factory, pg, roles):
    gw = limits_gw(gw_factory, pg, {}, db_extra="")
    gw.stop()
    gw.users = {"cap_a": "max_user_connections=1"}
    gw.write_ini()
    gw.start()
    a = psycopg.connect(gw.dsn(user="cap_a"))
    a.execute("SELECT 1")
    t, box = login_in_thread(gw, "cap_a", dbname="caps2")
    wait_until(lambda: ("caps2", "cap_a") in pools(gw), "cap_a's pool of caps2")
    assert t.is_alive() and "error" not in box
    a.commit()
    t.join(20)
    assert "error" not in box, box.get("error")
    assert upstream_count(pg, usename="cap_a") == 1
    assert upstream_count(pg, datname="caps2", usename="cap_a") == 1
    box["conn"].close()
    a.close()


def test_a_login_that_waits_longer_than_query_wait_timeout_is_refused_with_its_name(gw_factory, pg, roles):
    gw = limits_gw(gw_factory, pg, {"query_wait_timeout": "1"}, db_extra=" max_db_connections=1")
    a = psycopg.connect(gw.dsn(user="cap_a"))
    a.execute("SELECT 1")
    with pytest.raises(psycopg.OperationalError, match="query_wait_timeout"):
        psycopg.connect(gw.dsn(user="cap_b"))
    a.close()
