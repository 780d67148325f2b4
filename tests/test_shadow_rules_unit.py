"""Rule files loaded in shadow mode (``MODE = "shadow"``), in the pure policy layer: their
decisions are computed beside the enforced ones and never change what is enforced; a shadow
rule that fails is an error decision, never a refusal. No PostgreSQL needed."""

from __future__ import annotations

import pytest

from pooler.policy.rules import RuleLoadError
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
    assert (v.shadow.action, v.shadow.rule, v.shadow.reason) == ("deny", "rules/50_candidate.star",
                                                                 "deletes will be refused")
    assert not v.shadow.error
    # a statement the shadow file has no opinion about carries no shadow decision
    v = p.decide("SELECT 1", AGENT)
    assert v.decision.action == "allow" and v.shadow is None
    # the enforced file still refuses; the shadow opinion is computed for that statement too
    v = p.decide("DROP TABLE t", AGENT)
    assert v.decision.action == "deny" and v.decision.rule == "rules/10_enforced.star" and v.shadow is None


def test_a_shadow_file_sees_every_statement_of_a_query_even_after_an_enforced_deny(tmp_path):
    p = policy_from(tmp_path, {"10_enforced.star": ENFORCED, "50_candidate.star": SHADOW_DENY_DELETES})
    v = p.decide("DROP TABLE t; DELETE FROM t", AGENT)
    assert v.decision.action == "deny" and v.decision.rule == "rules/10_enforced.star"
    assert v.shadow.action == "deny" and v.shadow.rule == "rules/50_candidate.star"


def test_shadow_only_rule_set_allows_everything_and_reports_would_be_masks(tmp_path):
    p = policy_from(tmp_path, {"50_mask.star": 'MODE = "shadow"\ndef on_statement(stmt, session):\n'
                                               '    return mask({"public.customers.email": "email"}, "pii")\n'})
    assert not p.rules.may_mask  # a shadow mask never makes statements wait for the catalog
    v = p.decide("SELECT email FROM customers", AGENT)
    assert v.decision.action == "allow" and v.decision.masks == ()
    assert v.shadow.action == "mask" and v.shadow.masks == (("public.customers.email", "email"),)


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
    assert v.shadow.error and v.shadow.rule.startswith("rules/50_broken.star")
    assert "rule error" in v.shadow.reason


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
