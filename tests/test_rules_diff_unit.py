"""The rules diff without a gateway: how two decisions of one statement differ, and recorded
sessions decided again as the gateway decided them (identity, transaction state, SQL-level
PREPARE/EXECUTE, search_path)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pooler.policy.bundle import load_rules
from pooler.policy.rules import Decision
from pooler.recording.rulediff import classify, compare


def D(action, rule="", reason="", masks=()):
    return Decision(action, reason, rule, tuple(masks))


@pytest.mark.parametrize("before, after, kinds", [
    (D("allow"), D("deny", "r/a.star", "no"), ["newly denied"]),
    (D("mask", masks=[("t.c", "hash")]), D("deny", "r/a.star", "no"), ["newly denied"]),
    (D("deny", "r/a.star", "no"), D("allow"), ["newly allowed"]),
    (D("deny", "r/a.star", "no"), D("mask", "r/b.star", masks=[("t.c", "hash")]), ["newly allowed", ]),
    (D("allow"), D("require_approval", "r/a.star", "big"), ["approval required"]),
    (D("require_approval", "r/a.star", "big"), D("allow"), ["approval no longer required"]),
    (D("allow"), D("mask", "r/p.star", masks=[("t.c", "hash")]), ["masks added"]),
    (D("mask", "r/p.star", masks=[("t.c", "hash"), ("t.d", "null")]), D("mask", "r/p.star", masks=[("t.c", "hash")]),
     ["masks dropped"]),
    (D("mask", "r/p.star", masks=[("t.c", "hash")]), D("mask", "r/p.star", masks=[("t.c", "redact")]),
     ["mask method changed"]),
    (D("deny", "r/a.star", "no"), D("deny", "r/b.star", "no"), ["decided by another rule"]),
    (D("deny", "r/a.star", "no"), D("deny", "r/a.star", "not today"), ["reason changed"]),
    (D("deny", "rules/a.star", "no"), D("deny", "rules-next/a.star", "no"), []),  # the same file, another directory
    (D("mask", "r/p.star", "pii", [("t.c", "hash")]), D("mask", "r/p.star", "pii", [("t.c", "hash")]), []),
])
def test_classify(before, after, kinds):
    assert classify(before, after)[0] == kinds


def test_classify_names_the_columns():
    kinds, detail = classify(D("mask", masks=[("t.a", "hash"), ("t.b", "null")]),
                             D("mask", masks=[("t.a", "redact"), ("t.c", "email")]))
    assert kinds == ["masks added", "masks dropped", "mask method changed"]
    assert detail == ["masks added: t.c=email", "masks dropped: t.b=null", "mask method changed: t.a hash -> redact"]


def rules(tmp_path: Path, src: str, name="rules") -> object:
    d = tmp_path / name
    d.mkdir()
    (d / "10_test.star").write_text(src)
    return load_rules(d, run_tests=False)


def rec_session(stmts, user="bot", groups=("agents",)):
    """A recorded session: ``stmts`` are (sql, recorded action, tag or None for refused); action
    "gateway": refused by the gateway before the rules decided (as the recorder writes it)."""
    evs = [{"t": "login", "ts": 1.0, "sid": "s.1", "i": 0, "user": user, "groups": list(groups), "database": "shop",
            "app": "a", "client": "10.0.0.9:4000"}]
    for q, (sql, action, tag) in enumerate(stmts, 1):
        gw = action == "gateway"
        evs.append({"t": "stmt", "ts": 1.0 + q, "sid": "s.1", "i": len(evs), "q": q, "kind": "Q", "route": "simple",
                    "sql": sql, "action": "deny" if gw else action, "rule": "gateway" if gw else "", "reason": "",
                    "masks": [], "gateway": gw})
        if tag is None:
            evs.append({"t": "refused", "ts": 1.0 + q, "sid": "s.1", "i": len(evs), "q": q, "sqlstate": "42501",
                        "message": "no"})
        else:
            evs.append({"t": "done", "ts": 1.0 + q, "sid": "s.1", "i": len(evs), "q": q, "tag": tag, "rows": None,
                        "bytes": 1, "dur": 0.001})
    return {"sid": "s.1", "start": 1.0, "end": None, "login": evs[0], "logout": None, "events": evs}


def test_transaction_state_is_followed_from_the_command_tags(tmp_path):
    rs = rules(tmp_path, 'def on_statement(stmt, session):\n'
                         '    if session.in_transaction and stmt.command == "DELETE":\n'
                         '        return deny("no deletes inside a transaction")\n'
                         '    return None\n')
    s = rec_session([("DELETE FROM t WHERE id = 1", "allow", "DELETE 1"), ("BEGIN", "allow", "BEGIN"),
                     ("DELETE FROM t WHERE id = 2", "allow", "DELETE 1"), ("COMMIT", "allow", "COMMIT"),
                     ("DELETE FROM t WHERE id = 3", "allow", "DELETE 1")])
    rep = compare([s], rs)
    assert [(c.q, c.kinds) for c in rep.changes] == [(3, ["newly denied"])]
    assert rep.judged == 5 and rep.sessions == 1


def test_execute_is_judged_as_the_statement_it_prepared(tmp_path):
    rs = rules(tmp_path, 'def on_statement(stmt, session):\n'
                         '    if "public.secrets" in stmt.tables:\n'
                         '        return deny("secrets are off limits")\n'
                         '    return None\n')
    s = rec_session([("PREPARE p AS SELECT * FROM secrets", "allow", "PREPARE"), ("EXECUTE p", "allow", "SELECT 3"),
                     ("DEALLOCATE p", "allow", "DEALLOCATE"), ("EXECUTE p", "gateway", None)])
    rep = compare([s], rs)
    # the PREPARE reads the table too, so it is denied; EXECUTE of it as well; after DEALLOCATE the
    # gateway refused the name itself (26000): nothing the rules said then to compare with
    assert [(c.q, c.kinds) for c in rep.changes] == [(1, ["newly denied"]), (2, ["newly denied"])]
    assert rep.changes[1].after.reason == "secrets are off limits"
    assert rep.skipped == 1
    # both sides decided offline: the same refusal of the gateway on both, no change
    assert [c.q for c in compare([s], rs, rs).changes] == []


def test_search_path_set_in_the_session_is_followed(tmp_path):
    rs = rules(tmp_path, 'def on_statement(stmt, session):\n'
                         '    if "hr.salaries" in stmt.tables:\n'
                         '        return deny("hr is private")\n'
                         '    return None\n')
    s = rec_session([("SELECT * FROM salaries", "allow", "SELECT 1"), ("SET search_path = hr, public", "allow", "SET"),
                     ("SELECT * FROM salaries", "allow", "SELECT 1")])
    assert [c.q for c in compare([s], rs).changes] == [3]


def test_identity_and_groups_reach_the_rules(tmp_path):
    rs = rules(tmp_path, 'def on_statement(stmt, session):\n'
                         '    if "agents" in session.groups and session.user == "bot" and session.client_addr == "10.0.0.9":\n'
                         '        return deny("bots read nothing")\n'
                         '    return None\n')
    assert len(compare([rec_session([("SELECT 1", "allow", "SELECT 1")])], rs).changes) == 1
    assert compare([rec_session([("SELECT 1", "allow", "SELECT 1")], groups=("people",))], rs).changes == []


def test_statements_recorded_without_rules_are_skipped_unless_a_baseline_is_given(tmp_path):
    cand = rules(tmp_path, 'def on_statement(stmt, session):\n    return deny("nothing")\n')
    base = rules(tmp_path, 'def on_statement(stmt, session):\n    return None\n', name="base")
    s = rec_session([("SELECT 1", None, "SELECT 1")])
    rep = compare([s], cand)
    assert (rep.judged, rep.skipped, rep.changes) == (0, 1, [])
    rep = compare([s], cand, base)
    assert rep.judged == 1 and rep.changes[0].kinds == ["newly denied"] and rep.changes[0].before.action == "allow"


def test_a_time_range_compares_only_its_statements_but_follows_the_session_from_its_start(tmp_path):
    rs = rules(tmp_path, 'def on_statement(stmt, session):\n'
                         '    if session.in_transaction:\n'
                         '        return deny("no transactions")\n'
                         '    return None\n')
    s = rec_session([("BEGIN", "allow", "BEGIN"), ("SELECT 1", "allow", "SELECT 1"), ("SELECT 2", "allow", "SELECT 1"),
                     ("COMMIT", "allow", "COMMIT")])  # statement q is recorded at ts 1 + q
    rep = compare([s], rs, since=3.0, until=4.5)
    assert [(c.q, c.kinds) for c in rep.changes] == [(2, ["newly denied"]), (3, ["newly denied"])]
    assert rep.statements == 2 and rep.judged == 2
