"""The ``options`` startup parameter, large startup packets and track_extra_parameters, as
PgBouncer 1.25 takes them (its test_misc.py: test_options_startup_param,
test_startup_packet_larger_than_pktbuf, test_track_extra_parameters), through the gateway with
psycopg and psql against the real PostgreSQL."""

from __future__ import annotations

import os
import subprocess

import psycopg
import pytest

from pooler.protocol.startup_options import ONLY_C_ALLOWED, OptionsError, parse_startup_options
from tests.conftest import upstream_entry

# --------------------------------------------------------------------------- the parser (pure)


@pytest.mark.parametrize("value,expected", [
    ("  -c    datestyle=German,\\ YMD", [("datestyle", "German, YMD")]),
    ("-c timezone=Europe/Lisbon  -c    datestyle=German,\\ YMD",
     [("timezone", "Europe/Lisbon"), ("datestyle", "German, YMD")]),
    ("-ctimezone=Europe/Lisbon  -cdatestyle=German,\\ YMD", [("timezone", "Europe/Lisbon"), ("datestyle", "German, YMD")]),
    ("--timezone=Europe/Lisbon  --datestyle=German,\\ YMD", [("timezone", "Europe/Lisbon"), ("datestyle", "German, YMD")]),
    ("-c t\\imezone=\\E\\u\\r\\o\\pe/Lisbon  -c    dat\\estyle\\=\\Ge\\rman,\\ YMD",
     [("timezone", "Europe/Lisbon"), ("datestyle", "German, YMD")]),
    ("-c search_path=a\\\\b", [("search_path", "a\\b")]),
    ("-c x=", [("x", "")]),
    ("", []),
])
def test_options_are_read_as_pgbouncer_reads_them(value, expected):
    assert parse_startup_options(value) == expected


@pytest.mark.parametrize("value", ["-d", "-c timezone", "-c =x", "datestyle=ISO", "-c a=b -f"])
def test_other_switches_are_refused_with_pgbouncers_text(value):
    with pytest.raises(OptionsError) as e:
        parse_startup_options(value)
    assert str(e.value) == ONLY_C_ALLOWED


# --------------------------------------------------------------------------- through the gateway


def value(gw, sql, **kw):
    with psycopg.connect(gw.dsn(), autocommit=True, **kw) as c:
        return c.execute(sql).fetchone()[0]


def test_options_set_tracked_parameters_for_the_session(gw):
    assert value(gw, "SHOW datestyle", options="  -c    datestyle=German,\\ YMD") == "German, YMD"
    assert value(gw, "SHOW timezone", options="-c timezone=Europe/Lisbon  -c    datestyle=German,\\ YMD") == "Europe/Lisbon"
    assert value(gw, "SHOW timezone", options="--timezone=Europe/Lisbon") == "Europe/Lisbon"
    assert value(gw, "SHOW application_name", options="-c application_name=from\\ options") == "from options"
    # extra_float_digits is in ignore_startup_parameters (the default): taken, not applied
    assert value(gw, "SHOW extra_float_digits", options="-c extra_float_digits=2") == "1"


def test_options_a_gateway_cannot_pass_are_refused(gw):
    with pytest.raises(psycopg.OperationalError, match="only '-c config=val' and '--config=val' are allowed"):
        value(gw, "SELECT 1", options="-d")
    with pytest.raises(psycopg.OperationalError, match="only '-c config=val' and '--config=val' are allowed"):
        value(gw, "SELECT 1", options="-c timezone")
    with pytest.raises(psycopg.OperationalError, match="unsupported startup parameter in options: enable_seqscan"):
        value(gw, "SELECT 1", options="-c enable_seqscan=false")


def test_options_in_ignore_startup_parameters_drops_unknown_ones_only(gw_factory):
    gw = gw_factory(settings={"ignore_startup_parameters": "options"})
    assert value(gw, "SHOW enable_seqscan", options="-c enable_seqscan=false") == "on"
    assert value(gw, "SHOW timezone", options="-ctimezone=Europe/Lisbon  -cdatestyle=German,\\ YMD") == "Europe/Lisbon"


def test_startup_packet_larger_than_postgresqls_limit_is_taken(gw):
    # PostgreSQL refuses startup packets over 10,000 bytes; PgBouncer takes them up to max_packet_size
    long = "1" * 20000
    assert value(gw, "SELECT 1", options=f"-c extra_float_digits={long}") == 1


def test_psql_options_through_pgoptions(gw):
    env = dict(os.environ, PGOPTIONS="-c timezone=Asia/Tokyo")
    r = subprocess.run(["psql", "-X", "-At", "-d", gw.dsn(), "-c", "SHOW timezone"],
                       capture_output=True, text=True, env=env, timeout=30)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "Asia/Tokyo"


def test_track_extra_parameters_keeps_each_clients_search_path_on_a_shared_server(gw_factory, pg):
    pg.execute("CREATE SCHEMA IF NOT EXISTS tep_a")
    gw = gw_factory(settings={"track_extra_parameters": "IntervalStyle, search_path", "default_pool_size": "1"},
                    databases={"postgres": upstream_entry(pg)})
    a = psycopg.connect(gw.dsn(), options="-c search_path=tep_a,public", autocommit=True)
    b = psycopg.connect(gw.dsn(), autocommit=True)
    c = psycopg.connect(gw.dsn(), options="-c search_path=public", autocommit=True)
    try:
        for _ in range(3):  # one server: each statement of each client runs on it in turn
            assert a.execute("SHOW search_path").fetchone()[0] == "tep_a, public"
            assert b.execute("SHOW search_path").fetchone()[0] == '"$user", public'
            assert c.execute("SHOW search_path").fetchone()[0] == "public"
        pids = {conn.execute("SELECT pg_backend_pid()").fetchone()[0] for conn in (a, b, c)}
        assert len(pids) == 1  # the three really share one server
    finally:
        for conn in (a, b, c):
            conn.close()


def test_search_path_is_refused_in_options_unless_tracked(gw):
    with pytest.raises(psycopg.OperationalError, match="unsupported startup parameter in options: search_path"):
        value(gw, "SELECT 1", options="-c search_path=x")


def test_rules_judge_a_parameter_given_at_login(gw_factory, pg, tmp_path):
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "paths.star").write_text(
        "def on_statement(stmt, session):\n"
        "    if stmt.command == 'SET' and stmt.set_name == 'search_path' and 'secret' in stmt.set_value:\n"
        "        return deny('no secret schema')\n"
        "    if 'vault.payroll' in stmt.tables:\n"
        "        return deny('payroll is off limits')\n"
        "    return None\n")
    pg.execute("CREATE SCHEMA IF NOT EXISTS vault")
    pg.execute("CREATE TABLE IF NOT EXISTS vault.payroll (salary int)")
    gw = gw_factory(settings={"track_extra_parameters": "search_path", "rules_dir": str(rules)},
                    databases={"postgres": upstream_entry(pg)})
    with pytest.raises(psycopg.OperationalError, match="no secret schema.*startup parameter search_path"):
        value(gw, "SELECT 1", options="-c search_path=secret")
    # a search_path given at login counts as a SET would: an unqualified name is judged along it
    with psycopg.connect(gw.dsn(), options="-c search_path=vault,public", autocommit=True) as conn:
        assert conn.execute("SHOW search_path").fetchone()[0] == "vault, public"
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="payroll is off limits"):
            conn.execute("SELECT salary FROM payroll")
