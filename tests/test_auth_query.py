"""auth_query / auth_user / auth_dbname as PgBouncer 1.25 uses them: a user the auth_file does not
list is authenticated against the secret auth_query finds upstream (run as auth_user), and logs in
upstream with it (an md5 secret as is; a SCRAM secret by PgBouncer's pass-through of the keys the
client's own SCRAM login proved). Real psycopg/psql clients, real PostgreSQL."""

from __future__ import annotations

import psycopg
import pytest


@pytest.fixture(scope="module")
def aq_roles(pg):
    pg.execute("DROP ROLE IF EXISTS aq_scram")
    pg.execute("DROP ROLE IF EXISTS aq_md5")
    pg.execute("DROP ROLE IF EXISTS aq_nologin")
    pg.execute("SET password_encryption = 'scram-sha-256'; CREATE ROLE aq_scram LOGIN PASSWORD 'scram-pw'")
    pg.execute("SET password_encryption = 'md5'; CREATE ROLE aq_md5 LOGIN PASSWORD 'md5-pw'")
    pg.execute("CREATE ROLE aq_nologin NOLOGIN PASSWORD 'x'")
    pg.execute("DROP DATABASE IF EXISTS aq_other")
    pg.execute("CREATE DATABASE aq_other")


def aq_gw(gw_factory, pg, auth_type, host=None, extra_settings=None):
    s = {"auth_type": auth_type, "auth_user": pg.superuser, "auth_dbname": "postgres"}
    s.update(extra_settings or {})
    host = host or "127.0.0.1"
    return gw_factory(settings=s, auth_users={pg.superuser: pg.password},
                      databases={"postgres": f"host={host} port={pg.port} dbname=postgres",
                                 "aq_other": f"host={host} port={pg.port} dbname=aq_other"})


def test_a_scram_user_found_by_auth_query_logs_in_through_to_postgresql(gw_factory, pg, aq_roles):
    gw = aq_gw(gw_factory, pg, "scram-sha-256")
    for _ in range(2):  # the second login reuses the pool, whose servers log in with the same keys
        with psycopg.connect(gw.dsn(user="aq_scram", password="scram-pw", dbname="aq_other")) as c:
            assert c.execute("SELECT current_user, current_database()").fetchone() == ("aq_scram", "aq_other")
    with pytest.raises(psycopg.OperationalError, match='password authentication failed for user "aq_scram"'):
        psycopg.connect(gw.dsn(user="aq_scram", password="wrong"))
    with pytest.raises(psycopg.OperationalError, match='password authentication failed for user "aq_nobody"'):
        psycopg.connect(gw.dsn(user="aq_nobody", password="x"))
    with pytest.raises(psycopg.OperationalError, match='password authentication failed for user "aq_nologin"'):
        psycopg.connect(gw.dsn(user="aq_nologin", password="x"))  # rolcanlogin is false: no row


def test_an_md5_user_found_by_auth_query(gw_factory, pg, aq_roles):
    gw = aq_gw(gw_factory, pg, "md5", host=pg.socket_dir)  # upstream over the Unix socket (trust)
    with psycopg.connect(gw.dsn(user="aq_md5", password="md5-pw")) as c:
        assert c.execute("SELECT current_user").fetchone() == ("aq_md5",)
    with pytest.raises(psycopg.OperationalError, match='password authentication failed for user "aq_md5"'):
        psycopg.connect(gw.dsn(user="aq_md5", password="wrong"))


def test_auth_query_errors_refuse_the_login_and_say_why(gw_factory, pg, aq_roles):
    gw = aq_gw(gw_factory, pg, "scram-sha-256", extra_settings={"auth_query": "SELECT no_such_column FROM pg_authid WHERE rolname=$1"})
    with pytest.raises(psycopg.OperationalError, match="authentication failed: auth_query failed: column \"no_such_column\" does not exist"):
        psycopg.connect(gw.dsn(user="aq_scram", password="scram-pw"))
