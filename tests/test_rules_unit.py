"""Starlark rules and decisions, without a server: precedence, fail-closed behaviour, limits,
caching, rule tests and the authoring CLI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pooler.policy.engine import Policy, SessionInfo
from pooler.policy.bundle import load_rules
from pooler.policy.rules import RuleLoadError

REPO = Path(__file__).resolve().parent.parent

AGENT = SessionInfo("agent", "shop", ("agents",), "psql", "127.0.0.1", False)
ANALYST = SessionInfo("ann", "shop", ("analysts",), "psql", "127.0.0.1", False)


def policy_from(tmp_path: Path, files: dict[str, str], default_action: str = "allow", timeout: float = 0.05) -> Policy:
    d = tmp_path / "rules"
    d.mkdir(exist_ok=True)
    for name, src in files.items():
        (d / name).write_text(src)
    return Policy(load_rules(d, default_action, timeout))


def decide(p: Policy, sql: str, session: SessionInfo = AGENT):
    return p.decide(sql, session).decision


def test_precedence_deny_then_approval_then_masks_then_allow(tmp_path):
    p = policy_from(tmp_path, {
        "a.star": 'def on_statement(stmt, session):\n    return allow()\n',
        "b.star": 'def on_statement(stmt, session):\n'
                  '    if stmt.command == "DELETE":\n        return require_approval("deletes need a human")\n'
                  '    if "public.t.secret" in stmt.columns:\n        return mask({"public.t.secret": "redact"})\n',
        "c.star": 'def on_statement(stmt, session):\n'
                  '    if "public.t.other" in stmt.columns:\n        return mask({"public.t.other": "null"})\n'
                  '    if stmt.command == "DROP TABLE":\n        return deny("no drops")\n',
    })
    assert decide(p, "SELECT 1").action == "allow"
    d = decide(p, "DELETE FROM t WHERE id = 1")
    assert (d.action, d.reason, d.rule) == ("require_approval", "deletes need a human", "rules/b.star")
    d = decide(p, "SELECT secret, other FROM t")
    assert d.action == "mask"
    assert dict(d.masks) == {"public.t.secret": "redact", "public.t.other": "null"}
    d = decide(p, "DROP TABLE t")
    assert (d.action, d.reason, d.rule) == ("deny", "no drops", "rules/c.star")


def test_default_action_applies_without_an_opinion(tmp_path):
    p = policy_from(tmp_path, {"a.star": 'def on_statement(stmt, session):\n    return None\n'}, "deny")
    d = decide(p, "SELECT 1")
    assert d.action == "deny" and "default_action" in d.reason
    (tmp_path / "x").mkdir()
    p2 = policy_from(tmp_path / "x", {"a.star": 'def on_statement(stmt, session):\n    return None\n'}, "allow")
    assert decide(p2, "SELECT 1").action == "allow"


@pytest.mark.parametrize("body,needle", [
    ('    return 1 // 0\n', "division by zero"),
    ('    return {"no": "action"}\n', "returned"),
    ('    return "allow"\n', "returned"),
    ('    return stmt.no_such_field\n', "no_such_field"),
    ('    return mask({"public.t.a": "scramble"})\n', "unknown masking method"),
    ('    return deny("")\n', "non-empty reason"),
    ('    fail("boom")\n', "boom"),
    ('    return {"pooler_action": "deny_it"}\n', "expected one of"),
    ('    return {"pooler_action": "mask", "columns": ["public.t.a"]}\n', "takes a dict"),
    ('    return {"pooler_action": "deny", "reason": 42}\n', "not a string"),
])
def test_a_broken_rule_denies_naming_file_and_line(tmp_path, body, needle):
    p = policy_from(tmp_path, {"broken.star": "# a comment\ndef on_statement(stmt, session):\n" + body})
    d = decide(p, "SELECT 1")
    assert d.action == "deny"
    assert needle in d.reason
    assert d.rule.startswith("rules/broken.star:"), d.rule


def test_an_opinion_that_is_no_value_denies_naming_the_file_that_returned_it(tmp_path):
    # the files' opinions come back as one JSON text: a function cannot be written, and the
    # refusal names the file that returned it, not the first file of the set
    p = policy_from(tmp_path, {"a.star": "def on_statement(stmt, session):\n    return None\n",
                               "b.star": "# b\ndef on_statement(stmt, session):\n    return {\"pooler_action\": \"mask\", "
                                         "\"columns\": {\"public.t.a\": on_statement}}\n"})
    d = decide(p, "SELECT 1")
    assert d.action == "deny" and "no decision" in d.reason, d
    assert d.rule == "rules/b.star:2", d.rule


def test_recursion_is_refused(tmp_path):
    p = policy_from(tmp_path, {"r.star": "def f(n):\n    return f(n + 1)\n\ndef on_statement(stmt, session):\n    return f(0)\n"})
    d = decide(p, "SELECT 1")
    assert d.action == "deny" and d.rule.startswith("rules/r.star:")


def test_a_rule_past_its_deadline_is_refused(tmp_path):
    src = ("def on_statement(stmt, session):\n    n = 0\n    for i in range(100000000):\n        n += i\n"
           "    return allow()\n")
    p = policy_from(tmp_path, {"slow.star": src}, timeout=0.02)
    d = decide(p, "SELECT 1")
    assert d.action == "deny" and "rule_timeout" in d.reason and d.rule.startswith("rules/slow.star")


@pytest.mark.parametrize("src,needle", [
    ('load("other.star", "x")\ndef on_statement(stmt, session):\n    return None\n', "load"),
    ('def on_statement(stmt, session):\n    return open("/etc/passwd")\n', "open"),
    ('def on_statement(stmt, session)\n    return None\n', "broken.star"),
])
def test_rules_cannot_do_io_and_syntax_errors_refuse_loading(tmp_path, src, needle):
    d = tmp_path / "rules"
    d.mkdir()
    (d / "broken.star").write_text(src)
    with pytest.raises(RuleLoadError) as e:
        load_rules(d)
    assert "broken.star" in str(e.value) and needle in str(e.value)


def test_failing_rule_tests_refuse_loading(tmp_path):
    d = tmp_path / "rules"
    d.mkdir()
    (d / "a.star").write_text('def on_statement(stmt, session):\n    return None\n')
    (d / "a.test.toml").write_text('[[test]]\nname = "writes refused"\nsql = "DELETE FROM t"\nexpect = "deny"\n')
    with pytest.raises(RuleLoadError, match="1 rule test"):
        load_rules(d)
    assert load_rules(d, run_tests=False).files


def test_unparsable_sql_is_refused_with_its_position(tmp_path):
    p = policy_from(tmp_path, {"a.star": 'def on_statement(stmt, session):\n    return allow()\n'})
    d = decide(p, "SELECT * FROM t WHERE AND id = 1")
    assert d.action == "deny" and "could not be analyzed" in d.reason and "position" in d.reason


def test_the_refusal_of_unparsable_sql_never_quotes_a_password(tmp_path):
    # the reason reaches the audit stream and the recordings, which must not hold the secret
    p = policy_from(tmp_path, {"a.star": 'def on_statement(stmt, session):\n    return allow()\n'})
    for sql in ("ALTER ROLE x PASSWORD 'hunter2", "SELECT dblink_connect('host=a password=hunter2)"):
        d = decide(p, sql)
        assert d.action == "deny" and "position" in d.reason and "hunter2" not in d.reason, d.reason
    assert 'at or near "SELEC"' in decide(p, "SELEC 1").reason  # other statements keep the excerpt


def test_one_denied_statement_refuses_the_whole_query(tmp_path):
    p = policy_from(tmp_path, {"a.star": 'def on_statement(stmt, session):\n'
                                         '    if stmt.command == "DELETE":\n        return deny("no deletes")\n'})
    assert decide(p, "SELECT 1; DELETE FROM t; SELECT 2").action == "deny"


def test_session_fields_reach_the_rules(tmp_path):
    p = policy_from(tmp_path, {"a.star": 'def on_statement(stmt, session):\n'
                                         '    if session.user == "agent" and "agents" in session.groups and session.database == "shop" \\\n'
                                         '       and session.application_name == "psql" and session.client_addr == "127.0.0.1" \\\n'
                                         '       and not session.in_transaction:\n'
                                         '        return deny("seen")\n'})
    assert decide(p, "SELECT 1").reason == "seen"
    assert decide(p, "SELECT 1", ANALYST).action == "allow"


def test_decisions_are_cached_and_shapes_share_one_evaluation(tmp_path):
    p = policy_from(tmp_path, {"a.star": 'def on_statement(stmt, session):\n    return allow()\n'})
    assert p.rules.literal_blind
    for i in range(10):
        assert decide(p, f"SELECT * FROM t WHERE id = {i}").action == "allow"
    assert p.evaluations == 1
    decide(p, "SELECT * FROM t WHERE id = 3", ANALYST)  # another session shape: evaluated again
    assert p.evaluations == 2


def test_rules_that_read_literals_are_not_shape_cached(tmp_path):
    p = policy_from(tmp_path, {"a.star": 'def on_statement(stmt, session):\n'
                                         '    if "42" in stmt.sql:\n        return deny("not 42")\n'})
    assert not p.rules.literal_blind
    assert decide(p, "SELECT * FROM t WHERE id = 1").action == "allow"
    assert decide(p, "SELECT * FROM t WHERE id = 42").action == "deny"


@pytest.mark.parametrize("reads", ["str(stmt)", "repr(stmt)", "json.encode(stmt)", "\"{}\".format(stmt)"])
def test_rules_that_turn_the_statement_into_text_read_its_literals(tmp_path, reads):
    # a rule that finds a constant in the statement's text without naming stmt.sql: it is
    # not judged by shape (that judged "SELECT 'secret'" as "SELECT $1" and let it through)
    p = policy_from(tmp_path, {"a.star": 'def on_statement(stmt, session):\n'
                                         f'    if "secret" in {reads}:\n        return deny("no secrets")\n'})
    assert not p.rules.literal_blind
    assert decide(p, "SELECT 'public'").action == "allow"
    assert decide(p, "SELECT 'secret'").action == "deny"


def test_rule_tests_judge_statements_as_the_gateway_does(tmp_path):
    # a literal-blind rule set is judged by shape: a way to reach the constants the scan does
    # not see finds none, in the gateway and in the bundle's tests alike (the tests ran the
    # statement as written and passed where the gateway allowed it)
    d = tmp_path / "rules"
    d.mkdir()
    (d / "a.star").write_text('def on_statement(stmt, session):\n'
                              '    if "secret" in "%s" % stmt:\n        return deny("no secrets")\n')
    (d / "a.test.toml").write_text('[[test]]\nsql = "SELECT \'secret\'"\nexpect = "deny"\n')
    rs = load_rules(d, run_tests=False)
    assert rs.literal_blind
    assert Policy(rs).decide("SELECT 'secret'", SessionInfo("agent", "shop", ("agents",), "psql", "127.0.0.1",
                                                           False)).decision.action == "allow"
    with pytest.raises(RuleLoadError, match="expected deny, got allow"):
        load_rules(d)


def test_set_config_names_are_never_shape_cached(tmp_path):
    p = policy_from(tmp_path, {"a.star": 'def on_statement(stmt, session):\n'
                                         '    if "role" in stmt.guc_writes:\n        return deny("no role changes")\n'})
    assert p.rules.literal_blind
    assert decide(p, "SELECT set_config('work_mem', '1MB', false)").action == "allow"
    assert decide(p, "SELECT set_config('role', 'postgres', false)").action == "deny"
    assert decide(p, "SET work_mem = '2MB'").action == "allow"
    assert decide(p, "SET role = 'postgres'").action == "deny"


def test_shipped_bundle_passes_its_tests():
    rs = load_rules(REPO / "rules")  # raises if a test fails
    assert len(rs.tests) >= 20 and rs.literal_blind


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "pooler", "rules", *args], capture_output=True, text=True, cwd=REPO)


def test_cli_check_and_test(tmp_path):
    r = _cli("check", "rules")
    assert r.returncode == 0, r.stderr
    assert "compiled" in r.stdout
    r = _cli("test", "rules")
    assert r.returncode == 0, r.stdout
    assert "0 failed" in r.stdout

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.star").write_text("def on_statement(stmt, session):\n    return allow(\n")
    r = _cli("check", str(bad))
    assert r.returncode == 1 and "x.star" in r.stderr

    failing = tmp_path / "failing"
    failing.mkdir()
    (failing / "a.star").write_text("def on_statement(stmt, session):\n    return None\n")
    (failing / "a.test.toml").write_text('[[test]]\nname = "drop refused"\nsql = "DROP TABLE t"\nexpect = "deny"\n')
    r = _cli("test", str(failing))
    assert r.returncode == 1
    assert "FAIL" in r.stdout and "drop refused" in r.stdout and "expected deny, got allow" in r.stdout
