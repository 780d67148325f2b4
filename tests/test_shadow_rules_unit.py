"""Rule files loaded in shadow mode (``MODE = "shadow"``), in the pure policy layer: their
decisions are computed beside the enforced ones and never change what is enforced; a shadow
rule that fails is an error decision, never a refusal. No PostgreSQL needed."""

from __future__ import annotations

import pytest

from pooler.policy.rules import Decision, RuleLoadError
from pooler.policy.sessionwork import merge_shadow, session_work
from tests.test_rules_unit import AGENT, policy_from

ENFORCED = 'def on_statement(stmt, session):\n    if stmt.command == "DROP TABLE":\n        return deny("no drops")\n'
SHADOW_DENY_DELETES = ('MODE = "shadow"\n'
                       'def on_statement(stmt, session):\n'
                       '    if stmt.command == "DELETE":\n'
                       '        return deny("deletes will be refused")\n')


def test_a_shadow_deny_is_reported_but_the_enforced_decision_stands(tmp_path):
    p = policy_from(tmp_path, {"10_enforced.star": ENFORCED, "50_candidate.star": SHADOW_DENY_DELETES})
    v = p.decide("DELETE FROM t WHERE id = 1", AGENT)
    assert v.decision.action == "allow"
    (sd,) = v.shadow
    assert (sd.action, sd.rule, sd.reason) == ("deny", "rules/50_candidate.star", "deletes will be refused")
    assert not sd.error
    # a statement the shadow file has no opinion about carries no shadow decision
    v = p.decide("SELECT 1", AGENT)
    assert v.decision.action == "allow" and v.shadow == ()
    # the enforced file still refuses; the shadow file is asked about that statement too
    v = p.decide("DROP TABLE t", AGENT)
    assert v.decision.action == "deny" and v.decision.rule == "rules/10_enforced.star" and v.shadow == ()


def test_a_shadow_file_sees_every_statement_of_a_query_even_after_an_enforced_deny(tmp_path):
    p = policy_from(tmp_path, {"10_enforced.star": ENFORCED, "50_candidate.star": SHADOW_DENY_DELETES})
    v = p.decide("DROP TABLE t; DELETE FROM t", AGENT)
    assert v.decision.action == "deny" and v.decision.rule == "rules/10_enforced.star"
    assert [(d.action, d.rule) for d in v.shadow] == [("deny", "rules/50_candidate.star")]


def test_shadow_only_rule_set_allows_everything_and_reports_would_be_masks(tmp_path):
    p = policy_from(tmp_path, {"50_mask.star": 'MODE = "shadow"\ndef on_statement(stmt, session):\n'
                                               '    return mask({"public.customers.email": "email"}, "pii")\n'})
    assert not p.rules.may_mask  # a shadow mask never makes statements wait for the catalog
    v = p.decide("SELECT email FROM customers", AGENT)
    assert v.decision.action == "allow" and v.decision.masks == ()
    assert [(d.action, d.masks) for d in v.shadow] == [("mask", (("public.customers.email", "email"),))]


@pytest.mark.parametrize("body", [
    "    return 1 // 0",
    "    return 42",
    "    return mask({'a.b.c.d.e': 'email'})",
    "    x = 1\n    for i in range(100000000):\n        x = x + 1\n    return None",
])
def test_a_broken_shadow_rule_never_refuses(tmp_path, body):
    p = policy_from(tmp_path, {"50_broken.star": f'MODE = "shadow"\ndef on_statement(stmt, session):\n{body}\n'})
    v = p.decide("SELECT 1", AGENT)
    assert v.decision.action == "allow"
    (sd,) = v.shadow
    assert sd.error and sd.rule.startswith("rules/50_broken.star") and "rule error" in sd.reason


def test_a_broken_shadow_file_hides_no_other_shadow_files_opinion(tmp_path):
    p = policy_from(tmp_path, {"50_candidate.star": SHADOW_DENY_DELETES,
                               "60_broken.star": 'MODE = "shadow"\ndef on_statement(stmt, session):\n    return 1 // 0\n'})
    v = p.decide("DELETE FROM t", AGENT)
    assert v.decision.action == "allow"
    assert [(d.rule.split(":")[0], d.action, d.error) for d in v.shadow] == [
        ("rules/50_candidate.star", "deny", False), ("rules/60_broken.star", "deny", True)]


def test_the_same_broken_rule_enforced_refuses(tmp_path):
    p = policy_from(tmp_path, {"50_broken.star": "def on_statement(stmt, session):\n    return 1 // 0\n"})
    d = p.decide("SELECT 1", AGENT).decision
    assert d.action == "deny" and d.error and d.rule == "rules/50_broken.star:2"


def test_mode_must_be_enforce_or_shadow(tmp_path):
    with pytest.raises(RuleLoadError, match=r'50_x.star: MODE must be "enforce" or "shadow", got \'dry-run\''):
        policy_from(tmp_path, {"50_x.star": 'MODE = "dry-run"\ndef on_statement(stmt, session):\n    return None\n'})
    p = policy_from(tmp_path, {"50_x.star": 'MODE = "enforce"\n' + ENFORCED.replace("DROP TABLE", "DELETE")})
    assert p.decide("DELETE FROM t", AGENT).decision.action == "deny"
    assert [rf.mode for rf in p.rules.files] == ["enforce"]


def test_pooler_rules_check_names_the_shadow_files(tmp_path):
    import subprocess
    import sys

    from tests.test_rules_unit import REPO

    d = tmp_path / "rules"
    d.mkdir()
    (d / "50_candidate.star").write_text(SHADOW_DENY_DELETES)
    (d / "10_enforced.star").write_text(ENFORCED)
    r = subprocess.run([sys.executable, "-m", "pooler", "rules", "check", str(d)], capture_output=True, text=True,
                       cwd=REPO)
    assert r.returncode == 0, r.stderr
    assert 'rules/50_candidate.star: note: MODE = "shadow": decided, counted and audited, never enforced' in r.stdout
    assert "10_enforced.star: note" not in r.stdout


SHADOW_DENY_DELETES_MASK_EMAILS = SHADOW_DENY_DELETES + (
    '    if "public.customers" in stmt.tables:\n'
    '        return mask({"public.customers.email": "email"}, "pii")\n')


def test_a_shadow_file_judges_execute_as_the_statement_it_runs(tmp_path):
    p = policy_from(tmp_path, {"10_enforced.star": ENFORCED, "50_candidate.star": SHADOW_DENY_DELETES_MASK_EMAILS})
    prepared = {"del": "DELETE FROM t WHERE id = $1", "pii": "SELECT email FROM customers", "one": "SELECT 1"}
    for text, want in (("EXECUTE del(1)", [("deny", "deletes will be refused")]),
                       ("EXECUTE pii", [("mask", "pii")]),
                       ("EXECUTE one; EXECUTE pii; EXECUTE del(2)", [("deny", "deletes will be refused")]),
                       ("EXECUTE one", [])):
        v = p.decide(text, AGENT)
        assert v.shadow == ()  # the EXECUTE text itself: no opinion
        inner: list = []
        d, _ = session_work(p, v, AGENT, prepared, shadows=inner)
        assert d.action == "allow"  # what is enforced does not change
        got = merge_shadow(v.shadow, inner)
        assert [(sd.action, sd.reason) for sd in got] == want, text
        assert all(sd.rule == "rules/50_candidate.star" for sd in got)
    # PREPARE and EXECUTE in one message: the statement prepared just before
    v = p.decide("PREPARE gone AS DELETE FROM t; EXECUTE gone", AGENT)
    inner = []
    session_work(p, v, AGENT, {}, shadows=inner)
    assert [sd.action for sd in merge_shadow(v.shadow, inner)] == ["deny"]


def test_a_message_and_the_statements_it_executes_are_one_opinion_per_shadow_file(tmp_path):
    a_mask = Decision("mask", "pii", "rules/50_a.star", (("public.c.email", "email"),))
    a_mask2 = Decision("mask", "phones", "rules/50_a.star", (("public.c.phone", "phone"),))
    a_error = Decision("deny", "rule error: ZeroDivisionError", "rules/50_a.star:4", error=True)
    b_deny = Decision("deny", "no", "rules/60_b.star")
    got = merge_shadow((a_mask,), [(a_mask2, b_deny)])
    assert [(d.rule, d.action) for d in got] == [("rules/50_a.star", "mask"), ("rules/60_b.star", "deny")]
    assert got[0].masks == (("public.c.email", "email"), ("public.c.phone", "phone"))
    got = merge_shadow((a_mask,), [(a_error,)])  # a failed rule names its line: still the same file
    assert got == (a_error,)
