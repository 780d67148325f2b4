"""pooler.pgcluster: the throwaway PostgreSQL clusters the other tests run against."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import psycopg
import pytest

from pooler.masking.methods import _iban_ok as iban_ok, _luhn_ok as luhn_ok  # what `detect` recognizes
from pooler.pgcluster import PgCluster, PgClusterError, _pid_alive, find_pg_bindir, seed_demo

REPO = Path(__file__).resolve().parent.parent


def test_luhn_helper():
    assert luhn_ok("4111111111111111") and luhn_ok("378282246310005")
    assert not luhn_ok("4111111111111112")


def test_cluster_is_running(pg):
    assert pg.running
    assert pg.psql("SELECT 1").strip() == "1"
    assert pg.psql("SHOW max_connections").strip() == "200"
    assert pg.psql("SHOW password_encryption").strip() == "scram-sha-256"


def test_psql_over_tcp_with_password(pg):
    base = ["psql", "-X", "-At", "-h", pg.host, "-p", str(pg.port), "-U", "postgres", "-d", "postgres",
            "-c", "SELECT current_user"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    out = subprocess.run(base, env={**env, "PGPASSWORD": pg.password}, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "postgres"
    bad = subprocess.run(base, env={**env, "PGPASSWORD": "wrong"}, capture_output=True, text=True, timeout=30)
    assert bad.returncode != 0
    assert "password authentication failed" in bad.stderr


def test_psycopg_connects_with_dsn(pg):
    assert f"port={pg.port}" in pg.dsn() and "host=127.0.0.1" in pg.dsn()
    with psycopg.connect(pg.dsn(), connect_timeout=10) as conn:
        assert conn.execute("SELECT current_user").fetchone()[0] == "postgres"
        assert conn.info.parameter_status("server_encoding") == "UTF8"


def test_asyncpg_connects_with_url(pg):
    import asyncpg

    async def main():
        conn = await asyncpg.connect(pg.url(), timeout=10)
        try:
            return await conn.fetchval("SELECT 40 + 2")
        finally:
            await conn.close()

    assert asyncio.run(main()) == 42


def test_psql_raises_with_stderr(pg):
    with pytest.raises(PgClusterError, match="no_such_table"):
        pg.psql("SELECT * FROM no_such_table")


def test_seed_demo(pg):
    assert seed_demo(pg, "shop") == "shop"
    with psycopg.connect(pg.dsn("shop")) as conn:
        cards = [r[0] for r in conn.execute("SELECT card_number FROM customers ORDER BY id")]
        assert len(cards) == 200
        assert all(c.isdigit() and len(c) in (15, 16) for c in cards)
        assert all(luhn_ok(c) for c in cards)
        assert len(set(cards)) == 200
        emails = [r[0] for r in conn.execute("SELECT email FROM customers")]
        assert all(e.endswith("@example.com") and "." in e.split("@")[0] for e in emails)
        q = lambda sql: conn.execute(sql).fetchone()[0]  # noqa: E731
        assert q("SELECT count(*) FROM products") == 50
        assert q("SELECT count(*) FROM orders") == 1000
        assert q("SELECT count(*) FROM order_items") > 1000
        assert q("SELECT count(*) FROM payments") > 500
        assert q("SELECT count(*) FROM orders o WHERE total <> (SELECT sum(quantity * unit_price) "
                 "FROM order_items i WHERE i.order_id = o.id)") == 0
        assert q("SELECT count(*) FROM customer_contacts") == 200
        assert all(iban_ok(r[0]) for r in conn.execute("SELECT iban FROM payments"))
        assert q("SELECT phone FROM customers WHERE id = 1") == "+1-555-0100"
        assert "PII" in q("SELECT obj_description('customers'::regclass)")
        # new rows get fresh ids
        assert q("INSERT INTO products (name, price) VALUES ('x', 1) RETURNING id") == 51
        conn.rollback()


def test_roles_and_hba(pg):
    pg.create_role("md5user", "md5pw", method="md5")
    pg.create_role("scramuser", "scrampw")
    assert pg.psql("SELECT left(rolpassword, 3) FROM pg_authid WHERE rolname = 'md5user'").strip() == "md5"
    assert pg.psql("SELECT left(rolpassword, 5) FROM pg_authid WHERE rolname = 'scramuser'").strip() == "SCRAM"
    pg.create_database("appdb", owner="scramuser")
    try:
        pg.set_hba(["host all md5user 127.0.0.1/32 md5",
                    "host all trustuser 127.0.0.1/32 trust",
                    "host all nobody 127.0.0.1/32 reject",
                    "host all all 127.0.0.1/32 scram-sha-256"])
        with psycopg.connect(pg.dsn(user="md5user", password="md5pw")) as conn:
            assert conn.execute("SELECT current_user").fetchone()[0] == "md5user"
        with psycopg.connect(pg.dsn("appdb", user="scramuser", password="scrampw")) as conn:
            assert conn.execute("SELECT current_database()").fetchone()[0] == "appdb"
        with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
            psycopg.connect(pg.dsn(user="scramuser", password="nope"))
        with pytest.raises(psycopg.OperationalError, match="rejects connection"):
            psycopg.connect(pg.dsn(user="nobody", password="x"))
        with pytest.raises(PgClusterError, match="invalid pg_hba"):
            pg.set_hba(["host all all 127.0.0.1/32 no-such-method"])
        # the bad file was not installed: the previous rules still apply
        with psycopg.connect(pg.dsn(user="md5user", password="md5pw")):
            pass
    finally:
        pg.reset_hba()
    with pytest.raises(psycopg.OperationalError):  # md5 hash no longer accepted for scram
        psycopg.connect(pg.dsn(user="md5user", password="md5pw"))


def test_lifecycle_restart_and_cleanup():
    with PgCluster() as c:
        base, port = c.base_dir, c.port
        c.execute("CREATE TABLE kept (x int); INSERT INTO kept VALUES (7)")
        pid1 = c.pid
        c.restart()
        assert c.pid != pid1 and not _pid_alive(pid1)
        assert c.port == port
        assert c.psql("SELECT x FROM kept").strip() == "7"
        c.stop_server("immediate")
        assert not c.running
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(c.dsn(), connect_timeout=3)
        c.start_server()
        with psycopg.connect(c.dsn()) as conn:
            assert conn.execute("SELECT x FROM kept").fetchone()[0] == 7
        pid = c.pid
    assert not os.path.exists(base)
    assert not _pid_alive(pid)


def test_watchdog_cleans_up_after_crash():
    """A process that dies without atexit (os._exit) still leaves no server or files behind."""
    code = ("import os; from pooler.pgcluster import PgCluster\n"
            "c = PgCluster(); c.start(); print(c.base_dir, c.pid, flush=True); os._exit(3)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert r.returncode == 3, r.stderr
    base, pid = r.stdout.split()
    deadline = time.monotonic() + 60
    while (os.path.exists(base) or _pid_alive(int(pid))) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _pid_alive(int(pid))
    assert not os.path.exists(base)


def test_find_pg_bindir(monkeypatch, tmp_path, pg_bin):
    assert os.access(os.path.join(pg_bin, "initdb"), os.X_OK)
    monkeypatch.setenv("POOLER_PG_BINDIR", str(tmp_path))
    with pytest.raises(RuntimeError, match="not found"):
        find_pg_bindir()
    monkeypatch.setenv("POOLER_PG_BINDIR", pg_bin)
    assert find_pg_bindir() == os.path.abspath(pg_bin)
