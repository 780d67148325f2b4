"""Rule files in shadow mode through a real gateway process: what they would decide is counted
(SHOW RULES, SHOW DECISIONS, Prometheus), logged and sent to the audit stream, and never
enforced; a shadow rule that breaks never blocks a statement."""

from __future__ import annotations

import subprocess

import psycopg
import pytest

from tests.audit_helpers import of, read_lines, wait_docs
from tests.conftest import upstream_entry
from tests.gwproc import free_port
from tests.test_metrics import scrape, value

ENFORCED = 'def on_statement(stmt, session):\n    if stmt.command == "DELETE":\n        return deny("no deletes")\n'
CANDIDATE = '''MODE = "shadow"

def on_statement(stmt, session):
    if stmt.command == "SELECT" and "public.shadow_orders" in stmt.tables and "agents" in session.groups:
        return deny("agents will not read orders")
    if stmt.command == "UPDATE":
        return require_approval("updates will need a reviewer")
'''
BROKEN = 'MODE = "shadow"\n\ndef on_statement(stmt, session):\n    return {"not": "a decision"}[stmt.command]\n'


def shadow_gw(pg, gw_factory, tmp_path, files: dict[str, str]):
    """A gateway with these rule files, an audit file (``g.audit``) and metrics (``g.metrics_port``),
    over the table shadow_orders (3 rows)."""
    pg.execute("DROP TABLE IF EXISTS shadow_orders; CREATE TABLE shadow_orders (id int); "
               "INSERT INTO shadow_orders VALUES (1), (2), (3)")
    rules = tmp_path / "rules"
    rules.mkdir()
    for name, text in files.items():
        (rules / name).write_text(text)
    port = free_port()
    g = gw_factory(settings={"rules_dir": str(rules), "admin_users": "admin", "audit_file": str(tmp_path / "audit.jsonl"),
                             "metrics_listen": f"127.0.0.1:{port}"},
                   users={"agent": "groups=agents"}, databases={"postgres": upstream_entry(pg)})
    g.metrics_port, g.audit = port, tmp_path / "audit.jsonl"
    return g


@pytest.fixture
def sgw(pg, gw_factory, tmp_path):
    return shadow_gw(pg, gw_factory, tmp_path,
                     {"10_enforced.star": ENFORCED, "50_candidate.star": CANDIDATE, "60_broken.star": BROKEN})


def rows(g, what: str) -> list[dict]:
    with psycopg.connect(g.dsn(user="admin", dbname="pgbouncer"), autocommit=True, prepare_threshold=None) as c:
        cur = c.execute(f"SHOW {what}")
        names = [d.name for d in cur.description]
        return [dict(zip(names, r)) for r in cur.fetchall()]


def test_shadow_decisions_are_counted_logged_and_audited_but_never_enforced(sgw, pg):
    with psycopg.connect(sgw.dsn(user="agent"), autocommit=True) as a:
        for _ in range(3):
            assert len(a.execute("SELECT id FROM shadow_orders").fetchall()) == 3  # a shadow deny: it runs
        assert a.execute("UPDATE shadow_orders SET id = id WHERE id = 1").rowcount == 1  # a shadow approval: no hold
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="no deletes"):
            a.execute("DELETE FROM shadow_orders")  # the enforced file still refuses
    r = subprocess.run(["psql", sgw.dsn(user="agent"), "-XAtc", "SELECT count(*) FROM shadow_orders"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and r.stdout.strip() == "3"
    assert pg.psql("SELECT count(*) FROM shadow_orders").strip() == "3"

    by_file = {r["file"]: r for r in rows(sgw, "RULES")}
    cand = by_file["rules/50_candidate.star"]
    assert (cand["mode"], cand["deny"], cand["require_approval"]) == ("shadow", 4, 1)
    assert by_file["rules/10_enforced.star"]["mode"] == "enforce" and by_file["rules/10_enforced.star"]["deny"] == 1
    broken = by_file["rules/60_broken.star"]
    assert broken["mode"] == "shadow" and broken["errors"] >= 6 and broken["deny"] == 0
    decisions = {(r["rule"], r["action"], r["mode"]): r for r in rows(sgw, "DECISIONS")}
    assert decisions[("rules/50_candidate.star", "deny", "shadow")]["count"] == 4
    assert decisions[("rules/50_candidate.star", "deny", "shadow")]["last_reason"] == "agents will not read orders"
    assert ("rules/10_enforced.star", "deny", "enforce") in decisions

    m = scrape(sgw.metrics_port)
    assert value(m, "pooler_shadow_decisions_total", rule="rules/50_candidate.star", action="deny") == 4
    assert value(m, "pooler_shadow_decisions_total", rule="rules/50_candidate.star", action="require_approval") == 1
    errors = [v for (name, labels), v in m.items() if name == "pooler_shadow_decisions_total"
              and dict(labels)["action"] == "error" and dict(labels)["rule"].startswith("rules/60_broken.star")]
    assert sum(errors) >= 6
    assert value(m, "pooler_decisions_total", rule="rules/10_enforced.star", action="deny") == 1

    log = sgw.wait_log("shadow rule failed (not enforced): rules/60_broken.star")
    assert ("3 file(s) (2 in shadow mode, never enforced: rules/50_candidate.star, rules/60_broken.star)"
            in log)  # the start's line
    assert "shadow: rules/50_candidate.star would deny (enforced: allow)" in log

    def would_deny(d):
        return (of("shadow-decision")(d) and d["rule"]["name"] == "rules/50_candidate.star"
                and d["pooler"]["shadow"]["action"] == "deny")
    # the audit writer is a thread of its own: wait until the four would-be denials are written
    would = wait_docs(lambda: read_lines(sgw.audit), would_deny, n=4)
    assert len(would) == 4
    shadow = [d for d in read_lines(sgw.audit) if of("shadow-decision")(d)]
    assert would[0]["pooler"]["shadow"]["enforced_action"] == "allow" and would[0]["pooler"]["shadow"]["would_change"]
    assert would[0]["event"]["reason"] == "agents will not read orders" and would[0]["user"]["name"] == "agent"
    assert would[0]["db"]["statement"] == "SELECT id FROM shadow_orders"
    failed = [d for d in shadow if d["pooler"]["shadow"]["action"] == "error"]
    assert failed and "rule error" in failed[0]["event"]["reason"]
    assert not [d for d in read_lines(sgw.audit) if d["event"]["action"] in ("approval-requested", "statement-masked")]


def test_shadow_mode_is_declared_in_the_file_and_reloads_with_it(sgw, tmp_path):
    rules = tmp_path / "rules"
    (rules / "50_candidate.star").write_text(CANDIDATE.replace('MODE = "shadow"', 'MODE = "enforce"'))
    (rules / "60_broken.star").unlink()
    with psycopg.connect(sgw.dsn(user="admin", dbname="pgbouncer"), autocommit=True, prepare_threshold=None) as c:
        c.execute("RELOAD")
    with psycopg.connect(sgw.dsn(user="agent"), autocommit=True) as a:
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="agents will not read orders"):
            a.execute("SELECT id FROM shadow_orders")
    assert {r["file"]: r["mode"] for r in rows(sgw, "RULES")}["rules/50_candidate.star"] == "enforce"
    reload = wait_docs(lambda: read_lines(sgw.audit), of("rules-reload"))[0]
    assert reload["pooler"]["rules"]["files"] == ["rules/10_enforced.star", "rules/50_candidate.star"]


def test_a_rule_set_of_shadow_files_only_enforces_nothing(pg, gw_factory, tmp_path):
    # the gateway's own refusals come with enforced rules (a statement it cannot read, the
    # FunctionCall message, ...): with only a candidate in shadow, sessions run as without rules
    g = shadow_gw(pg, gw_factory, tmp_path, {"50_candidate.star": CANDIDATE})
    with psycopg.connect(g.dsn(user="agent"), autocommit=True) as a:
        assert len(a.execute("SELECT id FROM shadow_orders").fetchall()) == 3
        # text the analyzer refuses to read with enforced rules (a syntax error): PostgreSQL's own answer
        with pytest.raises(psycopg.errors.SyntaxError):
            a.execute("SELEC 1")
        assert a.execute("SELECT 2").fetchone() == (2,)
    assert value(scrape(g.metrics_port), "pooler_shadow_decisions_total", rule="rules/50_candidate.star", action="deny") == 1
    by_file = {r["file"]: r for r in rows(g, "RULES")}
    assert by_file["rules/50_candidate.star"]["mode"] == "shadow"


def test_a_shadow_allow_of_an_allowed_statement_is_counted_not_audited(pg, gw_factory, tmp_path):
    g = shadow_gw(pg, gw_factory, tmp_path, {"50_candidate.star": 'MODE = "shadow"\n\ndef on_statement(stmt, session):\n'
                                             '    if stmt.command == "SELECT":\n        return allow()\n'
                                             '    return deny("only reads")\n'})
    audit = g.audit
    with psycopg.connect(g.dsn(), autocommit=True) as c:
        for i in range(3):
            assert c.execute(f"SELECT {i}").fetchone() == (i,)
        c.execute("SET application_name = 'x'")  # the candidate would deny it: that one is audited
    denied = wait_docs(lambda: read_lines(audit), of("shadow-decision"), n=1)
    assert denied[0]["pooler"]["shadow"]["action"] == "deny" and denied[0]["db"]["statement"].startswith("SET")
    assert {r["file"]: r for r in rows(g, "RULES")}["rules/50_candidate.star"]["allow"] == 3
    assert [d["pooler"]["shadow"]["action"] for d in read_lines(audit) if of("shadow-decision")(d)] == ["deny"]


def shadow_denials(g) -> int:
    return scrape(g.metrics_port).get(("pooler_shadow_decisions_total",
                                       (("action", "deny"), ("rule", "rules/50_candidate.star"))), 0)


@pytest.mark.parametrize("files", [{"10_enforced.star": ENFORCED, "50_candidate.star": CANDIDATE},
                                   {"50_candidate.star": CANDIDATE}], ids=["beside-enforced-files", "shadow-only"])
def test_a_shadow_file_judges_sql_level_execute_as_the_statement_it_runs(pg, gw_factory, tmp_path, files):
    g = shadow_gw(pg, gw_factory, tmp_path, files)
    with psycopg.connect(g.dsn(user="agent"), autocommit=True) as a:
        with a.transaction():  # (transaction pooling: a SQL-level prepared statement lives on its server)
            a.execute("PREPARE orders AS SELECT id FROM shadow_orders")
            a.execute("PREPARE one AS SELECT 1")
            assert shadow_denials(g) == 0  # PREPARE runs nothing
            assert len(a.execute("EXECUTE orders").fetchall()) == 3  # a shadow deny: it runs
            assert shadow_denials(g) == 1
            assert a.execute("EXECUTE one").fetchone() == (1,)
            a.execute("DEALLOCATE orders")
            with pytest.raises(psycopg.errors.InvalidSqlStatementName):
                a.execute("EXECUTE orders")  # gone: no opinion of a statement that does not run
        # PREPARE and EXECUTE in one simple Query
        r = subprocess.run(["psql", g.dsn(user="agent"), "-XAtc",
                            "PREPARE o2 AS SELECT count(*) FROM shadow_orders; EXECUTE o2"],
                           capture_output=True, text=True, timeout=30)
        assert r.returncode == 0 and r.stdout.split() == ["PREPARE", "3"], r.stderr
    assert shadow_denials(g) == 2
    would = wait_docs(lambda: read_lines(g.audit), lambda d: of("shadow-decision")(d)
                      and d["pooler"]["shadow"]["action"] == "deny", n=2)
    assert [d["db"]["statement"] for d in would] == ["EXECUTE orders",
                                                     "PREPARE o2 AS SELECT count(*) FROM shadow_orders; EXECUTE o2"]
    assert {d["event"]["reason"] for d in would} == {"agents will not read orders"}
