"""Statements the gateway refuses before the rules decide (SQL it could not read as the server
would after SET standard_conforming_strings = off, PREPARE of a reserved name, ...), through a
real gateway with real clients: each is recorded as its own statement with its text and its
refusal, replayed as such, and audited naming it, never taken for the statement before it."""

from __future__ import annotations

import json
import subprocess

import psycopg
import pytest

from tests.audit_helpers import of as audit_of, read_lines, wait_docs
from tests.recording_helpers import of, recording_gw, wait_logged_out
from tests.replay_helpers import pooler
from tests.wire import SYNC, Raw, bind, describe, errors, execute, parse, query

RULES = '''
def on_statement(stmt, session):
    if stmt.command == "DELETE":
        return deny("no deletes")
'''


def _gateway(gw_factory, tmp_path, **settings):
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "10_test.star").write_text(RULES)
    audit = tmp_path / "audit.jsonl"
    g, d = recording_gw(gw_factory, tmp_path, rules_dir=str(rules), audit_file=str(audit), **settings)
    return g, d, audit


SCS = "SET standard_conforming_strings = off"
RESERVED = "PREPARE pooler_mine AS SELECT 1"


def test_psql_refusals_without_a_decision_are_their_own_statements(gw_factory, tmp_path):
    g, d, audit = _gateway(gw_factory, tmp_path)
    r = subprocess.run(["psql", g.dsn(), "-X", "-q", "-v", "ON_ERROR_STOP=0", "-c", "SELECT 1 AS one", "-c", SCS,
                        "-c", RESERVED, "-c", "DELETE FROM pg_class WHERE false", "-c", "SELECT 2 AS two"],
                       capture_output=True, text=True, timeout=30)
    assert "standard_conforming_strings" in r.stderr and "pooler_ are reserved" in r.stderr, r.stderr
    (s,) = wait_logged_out(d)
    stmts = of(s, "stmt")
    assert [(x["q"], x["sql"], x["action"], x["rule"]) for x in stmts] == [
        (1, "SELECT 1 AS one", "allow", ""),
        (2, SCS, "deny", "gateway"),
        (3, RESERVED, "deny", "gateway"),
        (4, "DELETE FROM pg_class WHERE false", "deny", "rules/10_test.star"),
        (5, "SELECT 2 AS two", "allow", "")]
    assert stmts[1]["gateway"] is True and stmts[1]["kind"] == "Q" and stmts[1]["route"] == "simple"
    assert "gateway" not in stmts[0] and "gateway" not in stmts[3]
    refused = {x["q"]: x for x in of(s, "refused")}
    assert sorted(refused) == [2, 3, 4]  # none on the SELECT before them
    assert refused[2]["sqlstate"] == "0A000" and "standard_conforming_strings" in refused[2]["message"]
    assert refused[3]["sqlstate"] == "42501" and "pooler_" in refused[3]["message"]
    assert stmts[1]["reason"] == refused[2]["message"]
    assert [(x["q"], x["tag"]) for x in of(s, "done")] == [(1, "SELECT 1"), (5, "SELECT 1")]
    out = s["logout"]
    assert out["statements"] == 5 and out["refused"] == 3
    assert [e["i"] for e in s["events"]] == list(range(len(s["events"])))

    # replay: the refusal under its own statement, with its text
    shown = pooler("replay", "show", str(d), "last", "--no-pager", "--color", "never")
    assert shown.returncode == 0, shown.stderr
    text = shown.stdout
    at = text.index(SCS)
    assert "REFUSED 0A000" in text[at:text.index(RESERVED)]
    assert text.index("SELECT 1 AS one") < at and "REFUSED" not in text[:at]
    listed = pooler("replay", "statements", str(d), "--decision", "refused", "--json")
    got = [json.loads(line) for line in listed.stdout.splitlines()]
    assert [(x["q"], x["sql"], x["refused"]["sqlstate"]) for x in got] == [
        (2, SCS, "0A000"), (3, RESERVED, "42501"), (4, "DELETE FROM pg_class WHERE false", "42501")]
    assert got[0]["gateway"] is True and got[2]["gateway"] is False
    # rules tested against the recording: what the gateway refused before the rules is skipped
    diff = pooler("rules", "test", str(tmp_path / "rules"), "--against", str(d), "--json")
    report = json.loads(diff.stdout)
    assert report["skipped"] == 2 and report["judged"] == 3 and not report["changes"], report

    # the audit: each denial names its own statement
    docs = wait_docs(lambda: read_lines(audit), audit_of("statement-denied"), n=3)
    by_code = {x["error"]["code"]: x for x in docs if x["rule"]["name"] == "gateway"}
    scs, reserved = by_code["0A000"], by_code["42501"]
    assert "standard_conforming_strings" in scs["db"]["statement"]
    assert scs["pooler"]["statement"]["protocol"] == "simple" and "decision" not in scs["pooler"]
    assert "pooler_mine" in reserved["db"]["statement"] and "SELECT 1" not in reserved["db"]["statement"].split("AS")[0]
    rule = next(x for x in docs if x["rule"]["name"] == "rules/10_test.star")
    assert rule["db"]["statement"].startswith("DELETE FROM pg_class") and rule["pooler"]["decision"]["action"] == "deny"


@pytest.mark.parametrize("mode", ["session", "transaction"])
def test_psycopg_extended_refusal_after_an_allowed_statement(gw_factory, tmp_path, mode):
    g, d, audit = _gateway(gw_factory, tmp_path, pool_mode=mode)
    with psycopg.connect(g.dsn(), autocommit=True) as c:
        assert c.execute("SELECT %s::int AS n", (7,)).fetchone() == (7,)
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="reserved"):
            c.execute("PREPARE pooler_x AS SELECT %s::int", (1,))
        assert c.execute("SELECT %s::int", (8,)).fetchone() == (8,)  # the session goes on
    (s,) = wait_logged_out(d)
    stmts = of(s, "stmt")
    assert [(x["q"], x["kind"], x["route"], x["rule"]) for x in stmts] == [
        (1, "P", "extended", ""), (2, "P", "extended", "gateway"), (3, "P", "extended", "")]
    assert stmts[1]["sql"] == "PREPARE pooler_x AS SELECT $1::int"
    (refused,) = of(s, "refused")
    assert refused["q"] == 2 and refused["sqlstate"] == "42501"
    assert [b["q"] for b in of(s, "bind")] == [1, 3]  # the refused Parse's Bind was skipped
    assert [(x["q"], x["tag"]) for x in of(s, "done")] == [(1, "SELECT 1"), (3, "SELECT 1")]
    (doc,) = wait_docs(lambda: read_lines(audit), audit_of("statement-denied"))
    assert doc["rule"]["name"] == "gateway" and "pooler_x" in doc["db"]["statement"]
    assert doc["pooler"]["statement"]["protocol"] == "extended"


def test_a_refused_bind_or_describe_records_the_names_it_gave(gw_factory, tmp_path):
    """A Bind or Describe has no text: the gateway's refusal of one (here: the unnamed statement
    a Query destroyed) is recorded with the statement and portal it named, and replayed so."""
    g, d, _ = _gateway(gw_factory, tmp_path)
    c = Raw(g, "postgres", "postgres")
    assert not errors(c.run(parse(b"", "SELECT 1"), SYNC))
    assert not errors(c.run(query("SELECT 2")))  # a simple Query destroys the unnamed statement
    assert [e["C"] for e in errors(c.run(bind(b"", b""), execute(b""), SYNC))] == ["26000"]
    assert [e["C"] for e in errors(c.run(describe(b"S", b""), SYNC))] == ["26000"]
    c.close()
    (s,) = wait_logged_out(d)
    stmts = of(s, "stmt")
    assert [(x["q"], x["kind"], x["sql"], x["rule"]) for x in stmts] == [
        (1, "P", "SELECT 1", ""), (2, "Q", "SELECT 2", ""), (3, "B", "", "gateway"), (4, "D", "", "gateway")]
    assert (stmts[2]["stmt"], stmts[2]["portal"]) == ("", "")
    assert stmts[3]["stmt"] == "" and "portal" not in stmts[3]
    assert "stmt" not in stmts[0] and "stmt" not in stmts[1]
    assert sorted(x["q"] for x in of(s, "refused")) == [3, 4]
    shown = pooler("replay", "show", str(d), "last", "--no-pager", "--color", "never")
    assert shown.returncode == 0, shown.stderr
    assert '(Bind: stmt "", portal "")' in shown.stdout and '(Describe: stmt "")' in shown.stdout
    listed = pooler("replay", "statements", str(d), "--decision", "refused")
    assert '(Bind: stmt "", portal "")' in listed.stdout, listed.stdout

