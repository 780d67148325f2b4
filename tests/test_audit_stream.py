"""The audit stream for a SIEM (docs/audit.md): real sessions through a real gateway process
(psycopg, psql, the admin console) produce ECS documents for logins, failed logins, denials,
masks, approvals, console commands and reloads; they are read back from audit_file, received
by syslog listeners the test opens (RFC 5424 over UDP, TCP and a Unix socket) and by HTTP
receivers (batches; one that fails and recovers; one that stays down)."""

from __future__ import annotations

import subprocess
import threading
import time

import psycopg
import pytest

from tests.audit_helpers import HttpReceiver, SyslogReceiver, action, of, read_lines, wait_docs
from tests.conftest import upstream_entry
from tests.gwproc import free_port
from tests import test_identity_e2e as identity
from tests.test_identity_e2e import tls_dsn
from tests.test_metrics import scrape, value

# the token-login fixtures of tests/test_identity_e2e.py (an identity provider, TLS, its gateway)
idp, certs, rules_dir, table, jgw = identity.idp, identity.certs, identity.rules_dir, identity.table, identity.jgw

RULES = '''
def on_statement(stmt, session):
    if stmt.command == "DELETE":
        return deny("no deletes")
    if stmt.command == "ALTER ROLE":
        return deny("no role changes")
    if stmt.command == "UPDATE" and not stmt.has_where:
        return require_approval("bulk update")
    if "public.audit_people.email" in stmt.columns or "public.audit_people.*" in stmt.columns:
        return mask({"public.audit_people.email": "email"}, "personal data")
'''
PASSWORD = "s3cret-Pw-9"


@pytest.fixture(scope="module")
def people(pg):
    pg.execute("DROP TABLE IF EXISTS audit_people; CREATE TABLE audit_people (id int, email text); "
               "INSERT INTO audit_people VALUES (1, 'ann@example.com'), (2, 'bob@example.com')")
    return "audit_people"


def rules_in(tmp_path, text: str = RULES):
    d = tmp_path / "rules"
    d.mkdir(exist_ok=True)
    (d / "10_audit.star").write_text(text)
    return d


def test_every_kind_of_event_is_written_to_the_audit_file(pg, people, gw_factory, tmp_path):
    rules = rules_in(tmp_path)
    audit = tmp_path / "audit.jsonl"
    g = gw_factory(settings={"rules_dir": str(rules), "auth_type": "md5", "admin_users": "admin",
                             "audit_file": str(audit), "auth_fail_delay_after": "0"},
                   auth_users={"agent": PASSWORD, "admin": PASSWORD}, users={"agent": "groups=agents,readers"},
                   databases={"postgres": upstream_entry(pg)})
    docs = lambda: read_lines(audit)  # noqa: E731

    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(g.dsn(user="agent", password="wrong-password"))
    with psycopg.connect(g.dsn(user="agent", password=PASSWORD), autocommit=True, application_name="nightly") as a:
        a.execute("SELECT 1")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            a.execute("DELETE FROM audit_people WHERE id = 1")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            a.execute("ALTER ROLE agent PASSWORD 'hunter2-never-logged'")
        assert all("***" in r[0] for r in a.execute("SELECT email FROM audit_people").fetchall())
    # psql too: a denial through libpq's simple query
    r = subprocess.run(["psql", g.dsn(user="agent", password=PASSWORD), "-XAtc", "DELETE FROM audit_people"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode != 0 and "no deletes" in r.stderr

    # an approval: held, then approved from the console
    held: list = []
    job = threading.Thread(target=lambda: held.append(_run(g, "UPDATE audit_people SET id = id")), daemon=True)
    job.start()
    req = wait_docs(docs, of("approval-requested"))[0]
    with psycopg.connect(g.dsn(user="admin", password=PASSWORD, dbname="pgbouncer"), autocommit=True, prepare_threshold=None) as c:
        c.execute(f"APPROVE {req['pooler']['approval']['id']}")
        job.join(30)
        assert held == [2]
        refused: list = []
        job = threading.Thread(target=lambda: refused.append(_refusal(g, "UPDATE audit_people SET id = id + 0")),
                               daemon=True)
        job.start()
        second = wait_docs(docs, of("approval-requested"), n=2)[1]
        c.execute(f"DENY {second['pooler']['approval']['id']} 'too broad'")
        job.join(30)
        assert refused and "too broad" in refused[0]
        with pytest.raises(psycopg.Error, match="already denied"):
            c.execute(f"APPROVE {second['pooler']['approval']['id']}")  # too late: audited as a failure
        c.execute("SET default_pool_size = 7")
        c.execute("SET mask_hash_key = 'topsecret-key-material'")
        with pytest.raises(psycopg.Error):
            c.execute("KILL_CLIENT 987654")
        c.execute("PAUSE postgres")
        c.execute("RESUME postgres")
        c.execute("RELOAD")
        (rules / "20_broken.star").write_text("def on_statement(stmt, session):\n    return (\n")
        with pytest.raises(psycopg.Error, match="RELOAD failed"):  # the settings applied, the rules not
            c.execute("RELOAD")
        c.execute("SHOW POOLS")  # reading is not audited

    got = wait_docs(docs, of("rules-reload"), n=2)
    by = {}
    for d in docs():
        by.setdefault(action(d), []).append(d)

    # every document: ECS basics
    for d in docs():
        assert d["ecs"]["version"] and d["@timestamp"].endswith("Z") and d["event"]["dataset"] == "pooler.audit"
        assert d["event"]["kind"] == "event" and d["event"]["outcome"] in ("success", "failure", "unknown")
        assert d["observer"]["product"] == "pooler" and d["message"]

    failed = by["login-failed"][0]
    assert failed["event"]["outcome"] == "failure" and failed["event"]["reason"] == "wrong password"
    assert failed["user"]["name"] == "agent" and failed["source"]["ip"] == "127.0.0.1"
    assert failed["event"]["category"] == ["authentication"]

    login = next(d for d in by["login"] if d["user"]["name"] == "agent")
    assert login["event"]["outcome"] == "success" and login["user"]["roles"] == ["agents", "readers"]
    assert login["db"]["name"] == "postgres" and login["db"]["user"] == pg.superuser
    assert isinstance(login["source"]["port"], int) and login["client"] == login["source"]
    assert login["pooler"]["session"]["auth_method"] == "md5"
    assert login["pooler"]["session"]["application_name"] == "nightly"

    denied = [d for d in by["statement-denied"] if d["event"]["reason"] == "no deletes"]
    assert len(denied) == 2  # psycopg's and psql's
    assert denied[0]["rule"]["name"] == "rules/10_audit.star" and denied[0]["rule"]["ruleset"]
    assert denied[0]["error"]["code"] == "42501" and "no deletes" in denied[0]["error"]["message"]
    assert denied[0]["db"]["statement"] == "DELETE FROM audit_people WHERE id = $1"
    assert denied[0]["event"]["type"] == ["access", "denied"] and denied[0]["user"]["name"] == "agent"
    role = next(d for d in by["statement-denied"] if d["event"]["reason"] == "no role changes")
    assert "hunter2" not in role["db"]["statement"]

    bye = next(d for d in by["logout"] if d["pooler"]["session"]["application_name"] == "nightly")
    assert bye["pooler"]["masked_values"] == [{"column": "public.audit_people.email", "method": "email", "values": 2}]
    masked = by["statement-masked"][0]
    assert masked["pooler"]["masks"] == [{"column": "public.audit_people.email", "method": "email"}]
    assert masked["db"]["statement"] == "SELECT email FROM audit_people" and masked["event"]["reason"] == "personal data"

    denied_req = by["approval-decided"][1]
    assert denied_req["pooler"]["approval"]["state"] == "denied" and denied_req["event"]["outcome"] == "failure"
    assert denied_req["pooler"]["approval"]["decided_by"] == "admin" and denied_req["event"]["reason"] == "too broad"
    assert denied_req["event"]["type"] == ["end", "denied"]
    told = next(d for d in by["statement-denied"] if "too broad" in d["error"]["message"])  # what the agent got
    assert told["rule"]["name"] == "rules/10_audit.star" and told["pooler"]["decision"]["action"] == "require_approval"
    assert told["db"]["statement"] == "UPDATE audit_people SET id = id + $1"
    decided = by["approval-decided"][0]
    assert decided["pooler"]["approval"]["state"] == "approved"
    assert decided["pooler"]["approval"]["decided_by"] == "admin" and decided["event"]["outcome"] == "success"
    assert decided["pooler"]["approval"]["id"] == req["pooler"]["approval"]["id"]
    assert req["rule"]["name"] == "rules/10_audit.star" and req["event"]["reason"] == "bulk update"

    admin = {(d["pooler"]["admin"]["command"], d["event"]["outcome"]): d for d in docs()
             if action(d).startswith("admin-")}
    assert admin[("APPROVE", "success")]["user"]["name"] == "admin"
    late = admin[("APPROVE", "failure")]
    assert late["pooler"]["admin"]["argument"] == second["pooler"]["approval"]["id"] and "already" in late["error"]["message"]
    assert [d["pooler"]["admin"]["argument"] for d in by["admin-set"]] == ["default_pool_size = 7",
                                                                          "mask_hash_key = ********"]
    assert admin[("KILL_CLIENT", "failure")]["error"]["message"] == "client not found"
    assert ("PAUSE", "success") in admin and ("RESUME", "success") in admin and ("RELOAD", "success") in admin
    assert "admin-show" not in by  # reading is not audited

    ok, bad = got[0], got[1]
    assert ok["event"]["outcome"] == "success" and ok["pooler"]["rules"]["files"] == ["rules/10_audit.star"]
    assert bad["event"]["outcome"] == "failure" and "20_broken.star" in bad["error"]["message"]
    assert bad["rule"]["ruleset"] == ok["rule"]["ruleset"]  # the running rule set keeps serving
    assert {d["event"]["outcome"] for d in by["config-reload"]} == {"success"}  # the file itself was fine
    assert [d["event"]["outcome"] for d in by["admin-reload"]] == ["success", "failure"]

    # secrets never appear: passwords, the SET value, the password in ALTER ROLE
    text = audit.read_text()
    for secret in (PASSWORD, "wrong-password", "topsecret-key-material", "hunter2-never-logged"):
        assert secret not in text
    assert oct(audit.stat().st_mode & 0o777) == "0o600"


def _refusal(g, sql: str) -> str:
    with psycopg.connect(g.dsn(user="agent", password=PASSWORD), autocommit=True) as a:
        try:
            a.execute(sql)
        except psycopg.Error as e:
            return str(e)
    return ""


def _run(g, sql: str) -> int:
    with psycopg.connect(g.dsn(user="agent", password=PASSWORD), autocommit=True) as a:
        return a.execute(sql).rowcount


def test_a_config_file_that_breaks_is_a_failed_config_reload(gw_factory, tmp_path, pg):
    audit = tmp_path / "audit.jsonl"
    g = gw_factory(settings={"audit_file": str(audit), "admin_users": "admin"},
                   databases={"postgres": upstream_entry(pg)})
    g.ini.write_text(g.ini.read_text() + "pool_mode = sometimes\n")
    with psycopg.connect(g.dsn(user="admin", dbname="pgbouncer"), autocommit=True, prepare_threshold=None) as c:
        with pytest.raises(psycopg.Error, match="RELOAD failed"):
            c.execute("RELOAD")
    d = wait_docs(lambda: read_lines(audit), of("config-reload"))[0]
    assert d["event"]["outcome"] == "failure" and "pool_mode" in d["error"]["message"]
    assert d["file"]["path"] == str(g.ini)
    a = wait_docs(lambda: read_lines(audit), of("admin-reload"))[0]
    assert a["event"]["outcome"] == "failure"


@pytest.mark.parametrize("kind", ["udp", "tcp", "unix"])
def test_syslog_listeners_receive_rfc5424_messages(kind, gw_factory, tmp_path, pg):
    rx = SyslogReceiver(kind, tmp_path)
    try:
        g = gw_factory(settings={"audit_syslog": rx.target, "audit_syslog_facility": "local3",
                                 "auth_type": "md5", "auth_fail_delay_after": "0"},
                       auth_users={"agent": PASSWORD}, databases={"postgres": upstream_entry(pg)})
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(g.dsn(user="agent", password="nope"))
        with psycopg.connect(g.dsn(user="agent", password=PASSWORD), autocommit=True) as a:
            a.execute("SELECT 1")
        got = wait_docs(rx.documents, lambda d: action(d) == "logout")
        docs = rx.documents()
        failed = next(d for d in docs if action(d) == "login-failed")
        login = next(d for d in docs if action(d) == "login")
        # PRI = facility (local3 = 19) * 8 + severity: warning (4) for a failed login, info (6) else
        assert failed["_syslog"]["pri"] == 19 * 8 + 4 and login["_syslog"]["pri"] == 19 * 8 + 6
        assert failed["_syslog"]["msgid"] == "login-failed" and got[0]["_syslog"]["msgid"] == "logout"
        assert failed["_syslog"]["timestamp"] == failed["@timestamp"]
        assert failed["event"]["reason"] == "wrong password" and login["user"]["name"] == "agent"
        assert g.proc.pid == login["_syslog"]["procid"]
    finally:
        rx.close()


def _metrics_gw(gw_factory, pg, rx_url: str, **settings):
    port = free_port()
    g = gw_factory(settings={"audit_http_url": rx_url, "metrics_listen": f"127.0.0.1:{port}", **settings},
                   databases={"postgres": upstream_entry(pg)})
    g.metrics_port = port
    return g


def _sessions(g, n: int) -> None:
    for _ in range(n):
        with psycopg.connect(g.dsn(), autocommit=True) as c:
            assert c.execute("SELECT 1").fetchone() == (1,)


def _wait_metric(g, name: str, at_least: float, timeout: float = 20.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        m = scrape(g.metrics_port)
        if m.get((name, (("destination", "http"),)), 0) >= at_least:
            return m
        assert time.monotonic() < deadline, f"{name} never reached {at_least}: {m.get((name, (('destination', 'http'),)))}"
        time.sleep(0.1)


def test_http_endpoint_gets_batches_with_the_token_header(gw_factory, pg, monkeypatch):
    monkeypatch.setenv("AUDIT_TEST_TOKEN", "tok-123-from-env")
    rx = HttpReceiver()
    try:
        g = _metrics_gw(gw_factory, pg, rx.url, audit_http_batch="3", audit_http_flush="0.3",
                        audit_http_token_env="AUDIT_TEST_TOKEN")
        _sessions(g, 4)  # a login and a logout each
        wait_docs(rx.documents, lambda d: action(d) in ("login", "logout"), n=8)
        assert all(len(b) <= 3 for b in rx.batches) and len(rx.batches) >= 3
        assert all(h["Authorization"] == "Bearer tok-123-from-env" for h in rx.requests)
        assert all(h["Content-Type"] == "application/x-ndjson" for h in rx.requests)
        m = _wait_metric(g, "pooler_audit_events_sent_total", 8)
        assert value(m, "pooler_audit_events_dropped_total", destination="http") == 0
        assert value(m, "pooler_audit_events_failed_total", destination="http") == 0
        assert "tok-123-from-env" not in g.log()
    finally:
        rx.close()


def test_a_receiver_that_fails_then_recovers_gets_every_event_after_retries(gw_factory, pg):
    rx = HttpReceiver(fail_first=2)
    try:
        g = _metrics_gw(gw_factory, pg, rx.url, audit_http_batch="50", audit_http_flush="0.2",
                        audit_http_retries="3", audit_http_format="json")
        _sessions(g, 3)
        got = wait_docs(rx.documents, lambda d: action(d) in ("login", "logout"), n=6)
        assert len(got) == 6  # each delivered once
        assert len(rx.requests) >= 3  # two refused, then delivered
        m = _wait_metric(g, "pooler_audit_events_sent_total", 6)
        assert value(m, "pooler_audit_events_failed_total", destination="http") == 0
    finally:
        rx.close()


def test_a_receiver_that_stays_down_costs_counted_drops_and_sessions_go_on(gw_factory, pg):
    rx = HttpReceiver(hang=True)  # reads each request and never answers
    try:
        g = _metrics_gw(gw_factory, pg, rx.url, audit_http_batch="1", audit_http_retries="1",
                        audit_http_timeout="1", audit_queue_size="2")
        _sessions(g, 10)  # every session runs while the audit thread waits for the receiver
        m = _wait_metric(g, "pooler_audit_events_dropped_total", 1)
        assert value(m, "pooler_queries_total", database="postgres", user=pg.superuser) == 10
        m = _wait_metric(g, "pooler_audit_events_failed_total", 1)
        assert value(m, "pooler_audit_events_sent_total", destination="http") == 0
        assert "audit http: queue full" in g.wait_log("audit http: queue full")
    finally:
        rx.close()


def test_token_logins_are_audited_with_the_tokens_groups_and_never_the_token(jgw, idp, tmp_path):
    audit = tmp_path / "jwt-audit.jsonl"
    g = jgw(audit_file=str(audit))
    good = idp.token(sub="agent-7", groups=["agents", "writers"])
    with psycopg.connect(tls_dsn(g, "agent-7", good), autocommit=True) as a:
        a.execute("SELECT 1")
    expired = idp.token(sub="agent-7", ttl=-120)
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(tls_dsn(g, "agent-7", expired))
    login = wait_docs(lambda: read_lines(audit), of("login"))[0]
    assert login["user"] == {"name": "agent-7", "roles": ["agents", "writers"]}
    assert login["pooler"]["session"]["auth_method"] == "jwt" and login["tls"] == {"established": True}
    failed = wait_docs(lambda: read_lines(audit), of("login-failed"))[0]
    assert failed["event"]["reason"] == "token has expired" and failed["user"]["name"] == "agent-7"
    text = audit.read_text()
    for token in (good, expired):
        assert token not in text and token.split(".")[2] not in text
