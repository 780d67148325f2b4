"""policy.sessionwork without a gateway: the one implementation of what SQL-level session
commands mean for the rules (governor.py and rulediff.py both call it)."""

from __future__ import annotations

from pooler.gateway.params import set_sql
from pooler.policy.bundle import load_rules
from pooler.policy.engine import Policy, SessionInfo
from pooler.policy.rules import Decision
from pooler.policy.sessionwork import grown_search_path, merge_masks, search_path_items, session_work

SI = SessionInfo("bot", "shop", ("agents",), "", "10.0.0.1", False)


def test_search_path_items_unquote_as_one_parser_for_all():
    assert search_path_items('"My ""odd"" schema", public') == ('My "odd" schema', "public")
    assert search_path_items("hr ,  public") == ("hr", "public")
    assert search_path_items("") == ()
    assert grown_search_path(("public",), '"$user", hr') == ("hr", "public")
    assert grown_search_path(("hr", "public"), "public") == ("public", "hr")
    # the statement a startup search_path reaches servers with reads back as the same names
    assert search_path_items(set_sql("search_path", '"a""b", c').removeprefix("SET search_path = ")) == ('a"b', "c")


def test_merge_masks():
    inner = Decision("mask", "pii", "r/pii.star", (("t.email", "email"),))
    assert merge_masks(Decision("allow", "", "r/agents.star"), inner) is inner
    got = merge_masks(Decision("mask", "phones", "r/phone.star", (("t.phone", "partial"), ("t.email", "redact"))), inner)
    assert got == Decision("mask", "phones; pii", "r/phone.star, r/pii.star",
                           (("t.email", "redact"), ("t.phone", "partial")))


def _policy(tmp_path):
    d = tmp_path / "rules"
    d.mkdir()
    (d / "10_pii.star").write_text('def on_statement(stmt, session):\n'
                                   '    if "public.users.email" in stmt.columns:\n'
                                   '        return mask({"public.users.email": "email"}, "pii")\n'
                                   '    return None\n')
    return Policy(load_rules(d, run_tests=False))


def test_execute_prepared_in_the_same_message_and_deallocated_in_it(tmp_path):
    p = _policy(tmp_path)
    sql = "PREPARE q AS SELECT email FROM users; EXECUTE q"
    d, fx = session_work(p, p.decide(sql, SI), SI, {})
    assert d.masks == (("public.users.email", "email"),)
    assert fx.prepares == (("q", "SELECT email FROM users"),)
    sql = "DEALLOCATE q; EXECUTE q"
    d, fx = session_work(p, p.decide(sql, SI), SI, {"q": "SELECT email FROM users"})
    assert d == ("26000", 'prepared statement "q" does not exist') and fx.forget == ("q",)
    sql = "DEALLOCATE ALL; PREPARE q AS SELECT 1"
    d, fx = session_work(p, p.decide(sql, SI), SI, {"q": "SELECT email FROM users"})
    assert d.action == "allow" and fx.forget_all and fx.prepares == (("q", "SELECT 1"),)
    d, fx = session_work(p, p.decide("PREPARE q AS SELECT 1", SI), SI, {"q": "SELECT 2"})
    assert d == ("42P05", 'prepared statement "q" already exists') and fx is None
    # EXECUTE alone has no effects: nothing is made for it
    d, fx = session_work(p, p.decide("EXECUTE q", SI), SI, {"q": "SELECT email FROM users"})
    assert d.action == "mask" and fx is None


def test_search_path_values_are_reported_in_order_up_to_a_refusal(tmp_path):
    p = _policy(tmp_path)
    sql = "SET search_path = hr, public; SET search_path = ops; EXECUTE missing"
    d, fx = session_work(p, p.decide(sql, SI), SI, {})
    assert fx.search_paths == ("hr, public", "ops") and d[0] == "26000"
