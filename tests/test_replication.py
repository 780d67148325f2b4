"""Replication connections (replication=database|true) through the gateway as PgBouncer 1.23+
passes them: a server connection of their own (never pooled), logged in with the client's
replication and options parameters as sent, then bytes pass both ways. Governed: only
identities with allow_replication in [users] may open one. pg_basebackup, pg_receivewal and
psycopg against the real PostgreSQL."""

from __future__ import annotations

import os
import subprocess

import psycopg
import pytest

from tests.conftest import upstream_entry


@pytest.fixture
def repl_gw(gw_factory, pg):
    pg.execute("DROP ROLE IF EXISTS rp_plain")
    pg.execute("CREATE ROLE rp_plain LOGIN")
    return gw_factory(settings={"admin_users": "postgres"},
                      users={pg.superuser: "allow_replication=1"},
                      # physical replication: libpq asks for the database "replication" (as in PgBouncer's test.ini)
                      databases={"postgres": upstream_entry(pg),
                                 "replication": upstream_entry(pg, "replication")})


def test_pg_basebackup_streams_a_backup_through_the_gateway(repl_gw, pg, tmp_path):
    target = tmp_path / "backup"
    r = subprocess.run(["pg_basebackup", "-d", repl_gw.dsn(), "-D", str(target), "-X", "stream", "-c", "fast",
                        "--no-sync", "-w"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr + repl_gw.log()[-2000:]
    assert (target / "PG_VERSION").read_text().strip() == "15"
    assert (target / "backup_manifest").exists() and any((target / "pg_wal").iterdir())


def test_logical_replication_mode_passes_options_as_sent_and_is_never_pooled(repl_gw, pg):
    system_id = pg.psql("SELECT system_identifier FROM pg_control_system()").strip()
    with psycopg.connect(repl_gw.dsn(), replication="database", options="-c extra_float_digits=3",
                         autocommit=True) as c:
        row = c.execute("IDENTIFY_SYSTEM").fetchone()
        assert str(row[0]) == system_id and row[3] == "postgres"  # dbname: a logical (database) connection
        # extra_float_digits is dropped from normal sessions (ignore_startup_parameters); a
        # replication connection's options reach the server as sent
        assert c.execute("SHOW extra_float_digits").fetchone() == ("3",)
        walsenders = pg.psql("SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'walsender'").strip()
        assert walsenders == "1"
        with psycopg.connect(repl_gw.dsn(dbname="pgbouncer"), autocommit=True, prepare_threshold=None) as adm:
            cur = adm.execute("SHOW POOLS")
            names = [d.name for d in cur.description]
            pools = [dict(zip(names, r)) for r in cur.fetchall() if r[0] == "postgres"]
            assert all(p["sv_active"] == 0 and p["sv_idle"] == 0 for p in pools)
            cur = adm.execute("SHOW CLIENTS")
            names = [d.name for d in cur.description]
            clients = [dict(zip(names, r)) for r in cur.fetchall() if r[2] == "postgres"]
            assert [(c["replication"], c["state"]) for c in clients] == [("logical", "active")]
    with psycopg.connect(repl_gw.dsn(), autocommit=True) as c:  # normal sessions are unaffected
        assert c.execute("SHOW extra_float_digits").fetchone() == ("1",)


def test_only_identities_with_allow_replication_may_open_one(repl_gw, pg, tmp_path):
    env = dict(os.environ)
    r = subprocess.run(["pg_receivewal", "-d", repl_gw.dsn(user="rp_plain"), "-D", str(tmp_path), "-n", "-w"],
                       capture_output=True, text=True, timeout=60, env=env)
    assert r.returncode != 0
    assert 'replication connections are not allowed for user "rp_plain" (allow_replication in [users])' in r.stderr
    with pytest.raises(psycopg.OperationalError, match="replication connections are not allowed"):
        psycopg.connect(repl_gw.dsn(user="rp_plain"), replication="true")
    with pytest.raises(psycopg.OperationalError, match='invalid value for parameter "replication"'):
        psycopg.connect(repl_gw.dsn(), replication="sideways")


def test_logical_decoding_with_pg_recvlogical_start_replication(gw_factory):
    """START_REPLICATION of a logical slot (wal_level = logical: a cluster of its own)."""
    from pooler.pgcluster import PgCluster

    cluster = PgCluster()
    cluster.extra_settings["wal_level"] = "logical"
    cluster.start()
    try:
        cluster.execute("CREATE TABLE items (id int PRIMARY KEY, name text)")
        gw = gw_factory(users={cluster.superuser: "allow_replication=1"},
                        databases={"postgres": upstream_entry(cluster)})
        base = ["pg_recvlogical", "-d", gw.dsn(), "-S", "gw_slot", "-w"]
        r = subprocess.run(base + ["--create-slot", "-P", "test_decoding"], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        cluster.execute("INSERT INTO items VALUES (1, 'through the gateway')")
        end = cluster.psql("SELECT pg_current_wal_insert_lsn()").strip()
        r = subprocess.run(base + ["--start", "-E", end, "-f", "-"], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        changes = r.stdout
        assert "table public.items: INSERT: id[integer]:1 name[text]:'through the gateway'" in changes
    finally:
        cluster.stop()


def test_reconnect_closes_a_replication_connection_at_once_and_limits_count_it(gw_factory, pg):
    gw = gw_factory(settings={"admin_users": "postgres", "max_db_connections": "1"},
                    users={pg.superuser: "allow_replication=1"},
                    databases={"postgres": upstream_entry(pg)})
    stream = psycopg.connect(gw.dsn(), replication="database", autocommit=True)
    assert stream.execute("IDENTIFY_SYSTEM").fetchone()[3] == "postgres"
    # the replication connection is the database's one server connection: a second cannot open
    with pytest.raises(psycopg.OperationalError, match=r"no more connections allowed.*max_db_connections"):
        psycopg.connect(gw.dsn(), replication="database")
    with psycopg.connect(gw.dsn(dbname="pgbouncer"), autocommit=True, prepare_threshold=None) as adm:
        adm.execute("RECONNECT postgres")
    # a stream never comes back to be released: it is closed now, as PgBouncer closes it
    with pytest.raises(psycopg.OperationalError, match="database configuration changed"):
        stream.execute("IDENTIFY_SYSTEM")
    stream.close()
    with psycopg.connect(gw.dsn(), autocommit=True) as c:  # its place is free again
        assert c.execute("SELECT 1").fetchone() == (1,)
