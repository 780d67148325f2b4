"""A security review of identity and logging (2026-11-30). Each test failed on the reviewed code
(e0f5890):

1. a client's user name, database name or application_name with a newline wrote a forged line
   into the gateway's log (before any authentication);
2. a token whose user claim carried the name of a password user's [users] entry got that
   entry's groups (and so read what only those groups may);
3. a token with ``"exp": "<digits>"`` passed PyJWT's checks, but its session never ended.
"""

from __future__ import annotations

import socket
import time

import psycopg
import pytest

from pooler.protocol import messages as m
from tests.conftest import upstream_entry
from tests.test_identity_e2e import certs, idp, jgw, rules_dir, table, tls_dsn  # noqa: F401 - fixtures


def test_client_supplied_names_cannot_forge_log_lines(gw):
    forged = "2026-01-01 00:00:00,000 INFO pooler.client: login: 10.0.0.9 db=postgres user=cfo-bot tls token"
    s = socket.create_connection((gw.host, gw.port), timeout=10)
    try:
        s.sendall(m.startup_message({"user": "eve\n" + forged, "database": "no_such_db\r\n" + forged}))
        s.recv(65536)
    finally:
        s.close()
    with psycopg.connect(gw.dsn(), application_name="app\n" + forged) as c:
        c.execute("SET application_name = 'x\n" + forged + "'")
        c.execute("SELECT 1")
    log = gw.log()
    assert "user=cfo-bot" in log  # it was logged, escaped inside the line of the real event
    assert not any(line.startswith("2026-01-01") for line in log.splitlines()), log[-2000:]
    assert "eve\\n2026-01-01" in log


def test_a_password_users_groups_do_not_go_to_a_token_of_the_same_name(jgw, idp, pg):
    # the database takes tokens only; "analyst" is also a person who logs in with a password elsewhere
    g = jgw(users={"analyst": "groups=writers auth_type=scram-sha-256", "svc-w": "groups=writers"},
            databases={"postgres": upstream_entry(pg) + " auth_type=jwt"})
    tok = idp.token(sub="analyst", groups=[])
    with psycopg.connect(tls_dsn(g, "analyst", tok), autocommit=True) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege) as ei:
            conn.execute("INSERT INTO idnotes (body) VALUES ('x')")
        assert "user analyst, groups )" in str(ei.value)
    # an identity's own [users] entry (no auth_type, or jwt) still adds its groups
    tok = idp.token(sub="svc-w", groups=[])
    with psycopg.connect(tls_dsn(g, "svc-w", tok), autocommit=True) as conn:
        conn.execute("INSERT INTO idnotes (body) VALUES ('from svc-w')")


@pytest.mark.parametrize("claim", ["exp", "nbf", "iat"])
def test_time_claims_must_be_numbers(jgw, idp, claim):
    g = jgw()
    now = int(time.time())
    value = str(now + 3) if claim == "exp" else str(now - 10)
    tok = idp.token(sub="agent-s", groups=["agents"], **{claim: value})
    with pytest.raises(psycopg.OperationalError) as ei:
        psycopg.connect(tls_dsn(g, "agent-s", tok)).close()
    assert f"token claim '{claim}' is not a number" in str(ei.value)
