"""Identity end to end: agents log in with OIDC/JWT tokens over TLS (psql, psycopg, asyncpg), the
gateway logs in upstream with credentials the agent never sees, and the token's groups reach the
rules. Real PostgreSQL, real gateway subprocess, real TLS."""

from __future__ import annotations

import asyncio
import os
import signal
import ssl
import subprocess
import time
from pathlib import Path

import asyncpg
import psycopg
import pytest

from pooler.tls import make_self_signed
from tests.conftest import send_until_closed, upstream_entry
from tests.idp import AUDIENCE, ISSUER, Idp, JwksServer, SigningKey

RULES = '''
def on_statement(stmt, session):
    if stmt.command in ("BEGIN", "COMMIT", "ROLLBACK"):
        return None
    if not stmt.read_only and "writers" not in session.groups:
        return deny("only writers may write (user %s, groups %s)" % (session.user, ",".join(session.groups)))
    return None
'''


@pytest.fixture(scope="module")
def idp(tmp_path_factory):
    return Idp(tmp_path_factory.mktemp("idp"))


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    d = tmp_path_factory.mktemp("tls")
    make_self_signed(d / "gw.crt", d / "gw.key", ("127.0.0.1", "localhost"))
    return {"cert": str(d / "gw.crt"), "key": str(d / "gw.key"), "dir": d}


@pytest.fixture(scope="module")
def rules_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("rules")
    (d / "10_writers.star").write_text(RULES)
    return str(d)


@pytest.fixture(scope="module")
def table(pg):
    pg.execute("DROP TABLE IF EXISTS idnotes; CREATE TABLE idnotes (id serial primary key, body text)")


def jwt_settings(idp, certs, rules_dir, **kw):
    s = {
        "auth_type": "jwt", "jwt_jwks": str(idp.jwks_path), "jwt_issuer": ISSUER, "jwt_audience": AUDIENCE,
        "jwt_leeway": "0", "client_tls_sslmode": "prefer", "client_tls_cert_file": certs["cert"],
        "client_tls_key_file": certs["key"], "rules_dir": rules_dir,
    }
    s.update(kw)
    return s


@pytest.fixture
def jgw(gw_factory, idp, certs, rules_dir, pg, table):
    def make(users=None, databases=None, **kw):
        return gw_factory(settings=jwt_settings(idp, certs, rules_dir, **kw),
                          databases=databases or {"postgres": upstream_entry(pg)}, users=users)
    return make


def tls_dsn(g, user, token, sslmode="require", **kw):
    parts = [f"host={g.host}", f"port={g.port}", "dbname=postgres", f"user={user}", f"sslmode={sslmode}",
             "connect_timeout=10", f"password={token}"]
    parts += [f"{k}={v}" for k, v in kw.items()]
    return " ".join(parts)


def psql(g, user, token, sql, sslmode="require"):
    env = dict(os.environ, PGPASSWORD=token, PGCONNECT_TIMEOUT="10")
    env.pop("PGSSLMODE", None)
    return subprocess.run(["psql", "-X", "-At", "-v", "ON_ERROR_STOP=1",
                           f"host={g.host} port={g.port} dbname=postgres user={user} sslmode={sslmode}",
                           "-c", sql], capture_output=True, text=True, env=env, timeout=60)


def test_psql_logs_in_with_a_token_over_tls_as_the_upstream_service_user(jgw, idp, pg):
    g = jgw()
    tok = idp.token(sub="agent-1", groups=["agents"])
    r = psql(g, "agent-1", tok, "SELECT current_user, ssl FROM pg_stat_ssl RIGHT JOIN (SELECT 1) x ON true WHERE pid IS NULL OR pid = pg_backend_pid()")
    assert r.returncode == 0, r.stderr
    # upstream: the configured service role, not the agent
    assert r.stdout.split("|")[0] == pg.superuser
    log = g.wait_log("login: ")
    assert "user=agent-1" in log and " tls" in log and "groups=agents" in log
    assert tok not in log
    # and the client connection really is TLS
    with psycopg.connect(tls_dsn(g, "agent-1", tok)) as conn:
        assert conn.pgconn.ssl_in_use


def test_groups_claim_decides_what_the_rules_allow(jgw, idp):
    g = jgw()
    reader = idp.token(sub="agent-r", groups=["agents"])
    writer = idp.token(sub="agent-w", groups=["agents", "writers"])
    with psycopg.connect(tls_dsn(g, "agent-r", reader), autocommit=True) as conn:
        assert conn.execute("SELECT count(*) >= 0 FROM idnotes").fetchone() == (True,)
        with pytest.raises(psycopg.errors.InsufficientPrivilege) as ei:
            conn.execute("INSERT INTO idnotes (body) VALUES ('from reader')")
        assert "only writers may write (user agent-r, groups agents)" in str(ei.value)
    with psycopg.connect(tls_dsn(g, "agent-w", writer), autocommit=True) as conn:
        conn.execute("INSERT INTO idnotes (body) VALUES ('from writer')")
        assert conn.execute("SELECT count(*) FROM idnotes WHERE body = 'from writer'").fetchone()[0] >= 1


def test_asyncpg_over_verified_tls_with_a_token(jgw, idp, certs):
    g = jgw()
    tok = idp.token(key=idp.ec, sub="agent-a", groups=["agents"])
    ctx = ssl.create_default_context(cafile=certs["cert"])  # verify-full against the gateway's cert

    async def run():
        conn = await asyncpg.connect(host=g.host, port=g.port, user="agent-a", password=tok,
                                     database="postgres", ssl=ctx, timeout=10)
        try:
            # asyncpg prepares every statement: the extended protocol through TLS
            rows = await conn.fetch("SELECT $1::int + 1 AS n", 41)
            with pytest.raises(asyncpg.exceptions.InsufficientPrivilegeError, match="only writers"):
                await conn.execute("INSERT INTO idnotes (body) VALUES ('x')")
            return rows[0]["n"]
        finally:
            await conn.close()

    assert asyncio.run(run()) == 42


BAD_TOKENS = {
    "expired": ("token has expired", lambda idp: idp.token(ttl=-120)),
    "not yet valid": ("not yet valid", lambda idp: idp.token(nbf=int(time.time()) + 3600)),
    "wrong issuer": ("issuer is not accepted", lambda idp: idp.token(iss="https://evil.example")),
    "wrong audience": ("audience is not accepted", lambda idp: idp.token(aud="other")),
    "bad signature": ("signature is invalid", lambda idp: idp.token(key=SigningKey("rsa", "rsa-1"))),
    "alg none": ("'none' is not accepted", lambda idp: _unsigned(idp)),
    "hmac confusion": ("is not accepted", lambda idp: _hmac_confused(idp)),
    "unknown kid": ("signing key is not known", lambda idp: idp.token(headers={"kid": "who"})),
    "not a jwt": ("not a JWT", lambda idp: "my-old-password"),
    "giant token": ("too large", lambda idp: idp.token(pad="x" * 40000)),
    "missing groups": ("no groups claim", lambda idp: idp.token(groups=None)),
}


def _b64(obj):
    import base64
    import json
    raw = obj if isinstance(obj, bytes) else json.dumps(obj).encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _unsigned(idp):
    return _b64({"alg": "none", "kid": "rsa-1"}) + "." + _b64(idp.claims()) + "."


def _hmac_confused(idp):
    import hmac
    si = _b64({"alg": "HS256", "kid": "rsa-1"}) + "." + _b64(idp.claims())
    return si + "." + _b64(hmac.new(idp.rsa.public_pem(), si.encode(), "sha256").digest())


def test_every_bad_token_is_refused_clearly_and_never_echoed(jgw, idp):
    g = jgw(auth_fail_delay_after="0")  # no slow-down: this test makes many failures on purpose
    for case, (expected, make) in BAD_TOKENS.items():
        tok = make(idp)
        with pytest.raises(psycopg.OperationalError) as ei:
            psycopg.connect(tls_dsn(g, "agent-1", tok)).close()
        msg = str(ei.value)
        assert expected in msg, (case, msg)
        assert 'token authentication failed for user "agent-1"' in msg, (case, msg)
        diag = getattr(ei.value, "sqlstate", None)
        assert diag in (None, "28000", "28P01"), (case, diag)
        assert tok[:40] not in msg, case
    log = g.log()
    for case, (expected, make) in BAD_TOKENS.items():
        assert expected in log, case
    assert "eyJ" not in log  # no token (base64url JSON header) ever reaches the log


def test_refusal_sqlstate_is_28p01_or_28000(jgw, idp):
    g = jgw()

    async def run():
        with pytest.raises(asyncpg.exceptions.InvalidPasswordError):
            await asyncpg.connect(host=g.host, port=g.port, user="agent-1", password=idp.token(ttl=-120),
                                  database="postgres", ssl="require", timeout=10)
        with pytest.raises(asyncpg.exceptions.InvalidAuthorizationSpecificationError):
            await asyncpg.connect(host=g.host, port=g.port, user="agent-1", password=idp.token(groups=None),
                                  database="postgres", ssl="require", timeout=10)

    asyncio.run(run())


def test_token_login_needs_tls_unless_allowed_for_tests(jgw, idp):
    g = jgw()
    tok = idp.token()
    with pytest.raises(psycopg.OperationalError, match="requires an encrypted connection"):
        psycopg.connect(tls_dsn(g, "agent-1", tok, sslmode="disable")).close()
    g2 = jgw(jwt_allow_plaintext="1")
    assert "jwt_allow_plaintext = 1" in g2.log()
    with psycopg.connect(tls_dsn(g2, "agent-1", tok, sslmode="disable")) as conn:
        assert not conn.pgconn.ssl_in_use
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_token_login_over_the_unix_socket_needs_no_tls(jgw, idp, tmp_path):
    sockdir = tmp_path / "sock"
    sockdir.mkdir()
    g = jgw(unix_socket_dir=str(sockdir))
    tok = idp.token(sub="agent-u")
    with psycopg.connect(f"host={sockdir} port={g.port} dbname=postgres user=agent-u password={tok}") as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_startup_user_must_be_the_identity_or_its_alias(jgw, idp):
    g = jgw(users={"svc-123": "alias=reporter groups=reporting"})
    tok = idp.token(sub="svc-123", groups=["agents"])
    with psycopg.connect(tls_dsn(g, "reporter", tok), autocommit=True) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege) as ei:
            conn.execute("INSERT INTO idnotes (body) VALUES ('x')")
        # the rules see the token's identity, and [users] groups join the token's
        assert "user svc-123, groups agents,reporting" in str(ei.value)
    with pytest.raises(psycopg.OperationalError, match="not for this user name"):
        psycopg.connect(tls_dsn(g, "someone-else", tok)).close()
    assert "as=reporter" in g.log()


def test_https_jwks_key_rotation_without_restart(jgw, idp, tmp_path):
    local = Idp(tmp_path)
    server = JwksServer(local)
    try:
        g = jgw(jwt_jwks=server.url, jwt_jwks_ca_file=server.ca, jwt_jwks_min_refresh="0")
        with psycopg.connect(tls_dsn(g, "agent-1", local.token())) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
        assert server.fetches == 1
        rotated = SigningKey("ec", "ec-2026-11")
        local.published = [rotated]  # the provider rotates: old keys gone, a new one in
        with psycopg.connect(tls_dsn(g, "agent-1", local.token(key=rotated))) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
        assert server.fetches == 2
        g.wait_log("key ids ec-2026-11")
    finally:
        server.close()


def test_unknown_kid_refreshes_at_a_bounded_rate(jgw, tmp_path):
    local = Idp(tmp_path)
    server = JwksServer(local)
    try:
        g = jgw(jwt_jwks=server.url, jwt_jwks_ca_file=server.ca, jwt_jwks_min_refresh="1h",
                auth_fail_delay_after="0")
        with psycopg.connect(tls_dsn(g, "agent-1", local.token())) as conn:
            conn.execute("SELECT 1")
        for i in range(5):
            with pytest.raises(psycopg.OperationalError, match="signing key is not known"):
                psycopg.connect(tls_dsn(g, "agent-1", local.token(headers={"kid": f"forged-{i}"}))).close()
        assert server.fetches == 1  # a flood of unknown kids does not hammer the provider
    finally:
        server.close()


def test_jwks_file_rotation_on_reload_and_unknown_kid(jgw, tmp_path):
    local = Idp(tmp_path)
    g = jgw(jwt_jwks=str(local.jwks_path), jwt_jwks_min_refresh="0")
    rotated = SigningKey("rsa", "rsa-next")
    local.published.append(rotated)
    local.write_jwks()
    with psycopg.connect(tls_dsn(g, "agent-1", local.token(key=rotated))) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_session_closes_when_its_token_expires(jgw, idp):
    g = jgw()
    tok = idp.token(ttl=2)
    with psycopg.connect(tls_dsn(g, "agent-1", tok), autocommit=True) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
        with pytest.raises(psycopg.OperationalError, match="login token has expired"):
            conn.execute("SELECT pg_sleep(30)")  # the gateway ends the session at expiry
    g.wait_log("login token expired, closing the session")


def test_session_may_outlive_its_token_when_configured(jgw, idp):
    g = jgw(jwt_expiry_action="keep")
    tok = idp.token(ttl=1)
    with psycopg.connect(tls_dsn(g, "agent-1", tok), autocommit=True) as conn:
        exp = time.time() + 1
        conn.execute("SELECT pg_sleep(%s)", (max(0.0, exp - time.time()) + 0.5,))
        assert time.time() > exp
        assert conn.execute("SELECT 2").fetchone() == (2,)


def test_repeated_failures_from_one_address_are_slowed_down(jgw, idp):
    g = jgw(auth_fail_delay_after="2", auth_fail_max_delay="1s")
    bad = idp.token(ttl=-120)
    for _ in range(2):
        with pytest.raises(psycopg.OperationalError, match="expired"):
            psycopg.connect(tls_dsn(g, "agent-1", bad)).close()
    t0 = time.monotonic()
    with pytest.raises(psycopg.OperationalError, match="expired"):
        psycopg.connect(tls_dsn(g, "agent-1", bad)).close()
    t1 = time.monotonic()
    with pytest.raises(psycopg.OperationalError, match="expired"):
        psycopg.connect(tls_dsn(g, "agent-1", bad)).close()
    t2 = time.monotonic()
    assert t1 - t0 >= 0.1 and t2 - t1 >= 0.2  # 0.1 s, then twice as long
    log = g.log()
    assert "failure 3 from 127.0.0.1 in a row, answering in 0.10s" in log
    assert "failure 4 from 127.0.0.1 in a row, answering in 0.20s" in log


def test_client_tls_require_refuses_plaintext_password_logins(gw_factory, certs):
    g = gw_factory(settings={"client_tls_sslmode": "require", "client_tls_cert_file": certs["cert"],
                             "client_tls_key_file": certs["key"], "auth_type": "scram-sha-256"},
                   auth_users={"alice": "alice-pw"})
    with pytest.raises(psycopg.OperationalError, match="SSL required"):
        psycopg.connect(g.dsn(user="alice", password="alice-pw")).close()
    with psycopg.connect(g.dsn(user="alice", password="alice-pw", sslmode="require")) as conn:
        assert conn.pgconn.ssl_in_use
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_plaintext_after_sslrequest_is_refused(gw_factory, certs):
    import struct
    g = gw_factory(settings={"client_tls_sslmode": "prefer", "client_tls_cert_file": certs["cert"],
                             "client_tls_key_file": certs["key"]})
    startup = b"\x00\x03\x00\x00user\x00postgres\x00database\x00postgres\x00\x00"
    # SSLRequest and, without waiting for the answer, a plaintext StartupMessage
    data = send_until_closed(g, struct.pack("!ii", 8, 80877103) + struct.pack("!i", len(startup) + 4) + startup,
                             timeout=10)
    assert data.startswith(b"E") and b"unexpected data after encryption request" in data
    assert b"R\x00" not in data  # never authenticated


def test_client_certificates_are_verified_with_verify_ca(gw_factory, certs, tmp_path):
    make_self_signed(tmp_path / "client.crt", tmp_path / "client.key", ("agent-client",))
    g = gw_factory(settings={"client_tls_sslmode": "verify-ca", "client_tls_cert_file": certs["cert"],
                             "client_tls_key_file": certs["key"], "client_tls_ca_file": str(tmp_path / "client.crt")})
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(g.dsn(sslmode="require")).close()
    with psycopg.connect(g.dsn(sslmode="require", sslcert=str(tmp_path / "client.crt"),
                               sslkey=str(tmp_path / "client.key"))) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


# ------------------------------------------------------------------ upstream credentials and TLS


@pytest.fixture
def service_role(pg):
    pg.execute("DROP ROLE IF EXISTS svc_gateway; CREATE ROLE svc_gateway LOGIN PASSWORD 'first-secret-A1'")
    yield "svc_gateway"
    pg.execute("DROP ROLE IF EXISTS svc_gateway")


def test_password_file_rotates_on_sighup_without_dropping_sessions(jgw, idp, pg, service_role, tmp_path):
    secret = tmp_path / "svc.secret"
    secret.write_text("first-secret-A1\n")
    g = jgw(default_pool_size="1", pool_mode="session", databases={
        "postgres": f"host=127.0.0.1 port={pg.port} dbname=postgres user=svc_gateway password_file={secret}"})
    tok = idp.token(sub="agent-1")
    with psycopg.connect(tls_dsn(g, "agent-1", tok), autocommit=True) as first:
        assert first.execute("SELECT current_user").fetchone() == ("svc_gateway",)
        pg.execute("ALTER ROLE svc_gateway PASSWORD 'second-secret-B2'")
        secret.write_text("second-secret-B2\n")
        g.signal(signal.SIGHUP)
        g.wait_log("upstream credentials changed")
        # the open session keeps its server connection
        assert first.execute("SELECT current_user").fetchone() == ("svc_gateway",)
    # a new session needs a new server connection (session mode, pool of 1): the new secret works
    with psycopg.connect(tls_dsn(g, "agent-1", tok), autocommit=True) as second:
        assert second.execute("SELECT current_user").fetchone() == ("svc_gateway",)
    log = g.log()
    assert "first-secret-A1" not in log and "second-secret-B2" not in log


def test_password_env_is_read_and_never_shown(gw_factory, pg, service_role):
    os.environ["POOLER_TEST_SVC_SECRET"] = "first-secret-A1"
    try:
        g = gw_factory(databases={"postgres": f"host=127.0.0.1 port={pg.port} dbname=postgres user=svc_gateway "
                                              "password_env=POOLER_TEST_SVC_SECRET"})
        with psycopg.connect(g.dsn()) as conn:
            assert conn.execute("SELECT current_user").fetchone() == ("svc_gateway",)
            assert "first-secret-A1" not in str(conn.execute("SHOW ALL").fetchall())
        assert "first-secret-A1" not in g.log()
    finally:
        del os.environ["POOLER_TEST_SVC_SECRET"]


def test_wrong_upstream_secret_is_not_revealed_to_the_client(gw_factory, pg, service_role):
    g = gw_factory(databases={"postgres": f"host=127.0.0.1 port={pg.port} dbname=postgres user=svc_gateway "
                                          "password=wrong-secret-Z9"})
    with pytest.raises(psycopg.OperationalError) as ei:
        psycopg.connect(g.dsn()).close()
    assert "wrong-secret-Z9" not in str(ei.value) and "wrong-secret-Z9" not in g.log()


@pytest.fixture
def pg_tls(pg, tmp_path_factory):
    """Turn on TLS in the test cluster (reloadable since PostgreSQL 10); off again afterwards."""
    d = tmp_path_factory.mktemp("pgtls")
    make_self_signed(d / "server.crt", d / "server.key", ("127.0.0.1", "localhost"))
    import shutil
    for f in ("server.crt", "server.key"):
        shutil.copy(d / f, Path(pg.data_dir) / f)
        os.chmod(Path(pg.data_dir) / f, 0o600)
        if os.geteuid() == 0:
            shutil.chown(Path(pg.data_dir) / f, "postgres", "postgres")
    pg.execute("ALTER SYSTEM SET ssl = on; ALTER SYSTEM SET ssl_cert_file = 'server.crt';"
               "ALTER SYSTEM SET ssl_key_file = 'server.key'; SELECT pg_reload_conf()")
    yield str(d / "server.crt")
    pg.execute("ALTER SYSTEM RESET ssl; ALTER SYSTEM RESET ssl_cert_file; ALTER SYSTEM RESET ssl_key_file;"
               "SELECT pg_reload_conf()")


def test_server_tls_verify_full(gw_factory, pg_tls, tmp_path):
    g = gw_factory(settings={"server_tls_sslmode": "verify-full", "server_tls_ca_file": pg_tls})
    with psycopg.connect(g.dsn()) as conn:
        assert conn.execute("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()").fetchone() == (True,)
    # a CA that did not sign the server's certificate: no connection, a clear error
    make_self_signed(tmp_path / "other.crt", tmp_path / "other.key")
    g2 = gw_factory(settings={"server_tls_sslmode": "verify-ca", "server_tls_ca_file": str(tmp_path / "other.crt")})
    with pytest.raises(psycopg.OperationalError, match="certificate verify failed"):
        psycopg.connect(g2.dsn()).close()


def test_server_tls_prefer_falls_back_and_require_refuses(gw_factory):
    g = gw_factory(settings={"server_tls_sslmode": "prefer"})
    with psycopg.connect(g.dsn()) as conn:
        assert conn.execute("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()").fetchone() == (False,)
    g2 = gw_factory(settings={"server_tls_sslmode": "require"})
    with pytest.raises(psycopg.OperationalError, match="does not accept TLS"):
        psycopg.connect(g2.dsn()).close()


def test_sighup_rereads_the_jwks_so_a_withdrawn_key_stops_working(jgw, tmp_path):
    local = Idp(tmp_path)
    g = jgw(jwt_jwks=str(local.jwks_path))
    tok = local.token(key=local.ec)
    with psycopg.connect(tls_dsn(g, "agent-1", tok)) as conn:
        conn.execute("SELECT 1")
    local.published = [local.rsa]  # the EC key is compromised and withdrawn
    local.write_jwks()
    g.signal(signal.SIGHUP)
    g.wait_log("key ids rsa-1\n")
    with pytest.raises(psycopg.OperationalError, match="signing key is not known"):
        psycopg.connect(tls_dsn(g, "agent-1", tok)).close()


def test_client_tls_protocols_refuses_older_tls(gw_factory, certs):
    import socket
    import struct
    g = gw_factory(settings={"client_tls_sslmode": "prefer", "client_tls_cert_file": certs["cert"],
                             "client_tls_key_file": certs["key"], "client_tls_protocols": "tlsv1.3"})
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    with socket.create_connection((g.host, g.port), timeout=10) as s:
        s.sendall(struct.pack("!ii", 8, 80877103))
        assert s.recv(1) == b"S"
        with pytest.raises(ssl.SSLError):
            ctx.wrap_socket(s).do_handshake()
    with psycopg.connect(g.dsn(sslmode="require")) as conn:  # libpq speaks TLS 1.3
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_jwt_on_one_database_entry_passwords_elsewhere(gw_factory, idp, certs, pg):
    g = gw_factory(settings={"auth_type": "scram-sha-256", "jwt_jwks": str(idp.jwks_path), "jwt_issuer": ISSUER,
                             "jwt_audience": AUDIENCE, "client_tls_sslmode": "prefer",
                             "client_tls_cert_file": certs["cert"], "client_tls_key_file": certs["key"]},
                   auth_users={"alice": "alice-pw"},
                   databases={"postgres": upstream_entry(pg),
                              "agents": upstream_entry(pg) + " auth_type=jwt"})
    tok = idp.token(sub="agent-9")
    with psycopg.connect(tls_dsn(g, "agent-9", tok).replace("dbname=postgres", "dbname=agents")) as conn:
        assert conn.execute("SELECT current_database()").fetchone() == ("postgres",)
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(tls_dsn(g, "agent-9", tok)).close()  # the token is no password for "postgres"
    with psycopg.connect(g.dsn(user="alice", password="alice-pw")) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_cancel_request_over_tls_reaches_the_query(jgw, idp, pg):
    import threading
    g = jgw()
    with psycopg.connect(tls_dsn(g, "agent-1", idp.token()), autocommit=True) as conn:
        result = {}

        def run():
            try:
                conn.execute("SELECT pg_sleep(30) AS tls_cancel_probe")
                result["error"] = None
            except Exception as e:  # noqa: BLE001 - the test inspects it
                result["error"] = e

        t = threading.Thread(target=run)
        t.start()
        with psycopg.connect(pg.dsn(), autocommit=True) as watcher:
            deadline = time.monotonic() + 20
            while not watcher.execute("SELECT 1 FROM pg_stat_activity WHERE state = 'active' "
                                      "AND query LIKE '%tls_cancel_probe%' AND pid <> pg_backend_pid()").fetchone():
                assert time.monotonic() < deadline, "the query never started"
        conn.cancel_safe()  # a CancelRequest on its own connection (inside TLS with libpq >= 17)
        t.join(30)
        assert isinstance(result.get("error"), psycopg.errors.QueryCanceled)
        assert conn.execute("SELECT 1").fetchone() == (1,)


def _ssl_request_then_reset(g, send_after=b""):
    import socket
    import struct
    s = socket.create_connection((g.host, g.port), timeout=10)
    s.sendall(struct.pack("!ii", 8, 80877103))
    assert s.recv(1) == b"S"
    if send_after:
        s.sendall(send_after)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # RST on close
    s.close()


def test_a_reset_during_the_tls_handshake_frees_the_client_slot(gw_factory, certs):
    g = gw_factory(settings={"client_tls_sslmode": "prefer", "client_tls_cert_file": certs["cert"],
                             "client_tls_key_file": certs["key"], "max_client_conn": "3"})
    for i in range(6):  # twice the limit: every slot must come back
        _ssl_request_then_reset(g, b"\x16\x03\x01" if i % 2 else b"")
        with psycopg.connect(g.dsn(sslmode="require")) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
    g.signal(signal.SIGTERM)  # waits for clients: there must be none left
    assert g.proc.wait(20) == 0


def test_a_user_entry_cannot_weaken_a_token_only_database(gw_factory, idp, certs, pg):
    g = gw_factory(settings={"auth_type": "trust", "jwt_jwks": str(idp.jwks_path), "jwt_issuer": ISSUER,
                             "jwt_audience": AUDIENCE, "client_tls_sslmode": "prefer",
                             "client_tls_cert_file": certs["cert"], "client_tls_key_file": certs["key"]},
                   databases={"agents": upstream_entry(pg) + " auth_type=jwt", "postgres": upstream_entry(pg)},
                   users={"alice": "auth_type=trust"})
    with pytest.raises(psycopg.OperationalError, match="token authentication failed"):
        psycopg.connect(g.dsn(user="alice", dbname="agents", sslmode="require", password="x")).close()
    with psycopg.connect(g.dsn(user="alice")) as conn:  # trust where the database allows it
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_a_reload_with_broken_token_settings_is_refused_whole(jgw, idp):
    g = jgw()
    tok = idp.token()
    ini = g.ini.read_text()
    g.ini.write_text(ini.replace(f"jwt_jwks = {idp.jwks_path}", "jwt_jwks = /nonexistent/jwks.json")
                     .replace("jwt_leeway = 0", "jwt_leeway = 0\nquery_wait_timeout = 1"))
    g.signal(signal.SIGHUP)
    g.wait_log("reload failed, keeping the running configuration")
    assert "configuration reloaded" not in g.log()
    with psycopg.connect(tls_dsn(g, "agent-1", tok)) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_gssenc_request_is_declined_and_require_still_applies(gw_factory, certs):
    import socket
    import struct
    g = gw_factory(settings={"client_tls_sslmode": "require", "client_tls_cert_file": certs["cert"],
                             "client_tls_key_file": certs["key"]})
    with socket.create_connection((g.host, g.port), timeout=10) as s:
        s.sendall(struct.pack("!ii", 8, 80877104))  # GSSENCRequest
        assert s.recv(1) == b"N"
        startup = b"\x00\x03\x00\x00user\x00postgres\x00database\x00postgres\x00\x00"
        s.sendall(struct.pack("!i", len(startup) + 4) + startup)
        data = b""
        while chunk := s.recv(4096):
            data += chunk
    assert data.startswith(b"E") and b"SSL required" in data


def test_jwt_for_one_user_entry(gw_factory, idp, certs, pg):
    g = gw_factory(settings={"auth_type": "trust", "jwt_jwks": str(idp.jwks_path), "jwt_issuer": ISSUER,
                             "jwt_audience": AUDIENCE, "client_tls_sslmode": "prefer",
                             "client_tls_cert_file": certs["cert"], "client_tls_key_file": certs["key"]},
                   databases={"postgres": upstream_entry(pg)}, users={"bot": "auth_type=jwt"})
    with pytest.raises(psycopg.OperationalError, match="not a JWT"):
        psycopg.connect(g.dsn(user="bot", sslmode="require", password="guess")).close()
    with psycopg.connect(tls_dsn(g, "bot", idp.token(sub="bot"))) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
    with psycopg.connect(g.dsn(user="someone")) as conn:  # everyone else: trust
        assert conn.execute("SELECT 1").fetchone() == (1,)


# --------------------------------------------------------------------------- a token's identity


def test_a_password_users_groups_do_not_go_to_a_token_of_the_same_name(jgw, idp, pg):
    """A token whose user claim carries the name of a password user's [users] entry does not get
    that entry's groups (and so cannot do what only those groups may)."""
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
    """A token with ``"exp": "<digits>"`` (a string) passes PyJWT's checks, but its session would
    never end: exp, nbf and iat must be numbers."""
    g = jgw()
    now = int(time.time())
    value = str(now + 3) if claim == "exp" else str(now - 10)
    tok = idp.token(sub="agent-s", groups=["agents"], **{claim: value})
    with pytest.raises(psycopg.OperationalError) as ei:
        psycopg.connect(tls_dsn(g, "agent-s", tok)).close()
    assert f"token claim '{claim}' is not a number" in str(ei.value)
