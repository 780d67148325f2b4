"""Error texts where PgBouncer 1.25's own tests read them (test_auth.py::test_scram_server,
test_misc.py's shutdown tests), through the gateway with psycopg against the real PostgreSQL."""

from __future__ import annotations

import psycopg
import pytest

from pooler.auth.passwords import ScramSecret, md5_secret


@pytest.fixture(scope="module")
def scram_role(pg):
    pg.execute("DROP ROLE IF EXISTS et_scram")
    pg.execute("SET password_encryption = 'scram-sha-256'; CREATE ROLE et_scram LOGIN PASSWORD 'et-pw'")
    return "et_scram", "et-pw"


def gw_with_secret(gw_factory, pg, secret):
    return gw_factory(databases={"p6": f"host=127.0.0.1 port={pg.port} dbname=postgres user=et_scram"},
                      auth_users={"et_scram": secret})


def test_scram_upstream_with_an_md5_secret_is_a_wrong_password_type(gw_factory, pg, scram_role):
    gw = gw_with_secret(gw_factory, pg, md5_secret(*scram_role))
    with pytest.raises(psycopg.OperationalError, match="wrong password type.*md5 secret"):
        psycopg.connect(gw.dsn(dbname="p6"))


def test_scram_upstream_with_only_a_scram_secret_is_a_wrong_password_type(gw_factory, pg, scram_role):
    gw = gw_with_secret(gw_factory, pg, ScramSecret.from_password(scram_role[1]).to_string())
    with pytest.raises(psycopg.OperationalError, match="wrong password type.*only a SCRAM secret"):
        psycopg.connect(gw.dsn(dbname="p6"))


def test_a_scram_secret_in_the_auth_file_logs_in_upstream_with_the_clients_keys(gw_factory, pg, scram_role):
    # PgBouncer's SCRAM pass-through: the client logs in as the upstream user with SCRAM against
    # the auth_file's copy of the server's secret; the keys it proved sign the upstream login
    stored = pg.psql("SELECT rolpassword FROM pg_authid WHERE rolname = 'et_scram'").strip()
    gw = gw_factory(settings={"auth_type": "scram-sha-256"}, auth_users={"et_scram": stored},
                    databases={"p7": f"host=127.0.0.1 port={pg.port} dbname=postgres"})
    for _ in range(2):  # the second session may get a new server: it logs in with the same keys
        with psycopg.connect(gw.dsn(user="et_scram", password=scram_role[1], dbname="p7")) as c:
            assert c.execute("SELECT current_user").fetchone() == ("et_scram",)
    with pytest.raises(psycopg.OperationalError, match='password authentication failed for user "et_scram"'):
        psycopg.connect(gw.dsn(user="et_scram", password="wrong", dbname="p7"))


def test_scram_upstream_with_the_password_logs_in(gw_factory, pg, scram_role):
    gw = gw_with_secret(gw_factory, pg, scram_role[1])
    with psycopg.connect(gw.dsn(dbname="p6")) as c:
        assert c.execute("SELECT current_user").fetchone() == ("et_scram",)


def test_shutdown_wait_for_servers_closes_a_client_that_needs_a_new_server(gw_factory, pg):
    gw = gw_factory(settings={"admin_users": "postgres"})
    busy = psycopg.connect(gw.dsn())
    idle = psycopg.connect(gw.dsn(), autocommit=True)
    busy.execute("SELECT 1")  # a transaction is open
    idle.execute("SELECT 1")
    with psycopg.connect(gw.dsn(dbname="pgbouncer"), autocommit=True, prepare_threshold=None) as c:
        c.execute("SHUTDOWN WAIT_FOR_SERVERS")
        with pytest.raises(psycopg.errors.ProtocolViolation, match="pooler is shutting down"):
            c.execute("RESUME")
    assert busy.execute("SELECT 2").fetchone() == (2,)  # still in its transaction: served
    with pytest.raises(psycopg.OperationalError, match="server shutting down"):
        idle.execute("SELECT 3")  # a new transaction: no server for it
    busy.commit()
    assert gw.proc.wait(10) == 0
    busy.close()
    idle.close()
