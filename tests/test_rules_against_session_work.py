"""``pooler rules test DIR --against RECORDINGS`` where the gateway's decision depends on the
session: SQL-level PREPARE/EXECUTE of statements reading masked columns (EXECUTE judged as the
statement it runs, its masks merged with those of the other statements of its Query), several
statements in one Query masking different columns, and SET search_path (also in a Query the
gateway refuses after the rules let it through). Recorded through a real gateway; deciding the
recording again with the very rule set that recorded it must change nothing, and a candidate
that changes one mask must report exactly the statements that mask reaches. (With the catalog:
a schema on the search_path that holds no such table is a relation the catalog does not know,
which the shipped rules mask as the gateway did.)"""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest

from tests.conftest import upstream_entry
from tests.gwproc import REPO
from tests.recording_helpers import wait_logged_out
from tests.replay_helpers import pooler, start_recording_gateway

# a rule that reads the session's search_path: statuses are masked once "scratch" is on it
SCRATCH_RULE = ('def on_statement(stmt, session):\n'
                '    if "scratch" in session.search_path and "public.orders.status" in stmt.columns:\n'
                '        return mask({"public.orders.status": "redact"}, "statuses are masked in scratch sessions")\n'
                '    return None\n')

CARD = "PREPARE card AS SELECT full_name, email FROM customers ORDER BY id LIMIT 1"
SESSIONS = [
    # SQL-level PREPARE / EXECUTE (inside a transaction: transaction pooling keeps its server)
    ["BEGIN", CARD, "EXECUTE card",
     "SELECT phone FROM customers ORDER BY id LIMIT 1; EXECUTE card",  # masks of both merged
     "SELECT 1 AS one; EXECUTE card",  # an allowed statement with it: EXECUTE's masks alone
     "PREPARE ssn_q AS SELECT ssn FROM customers ORDER BY id LIMIT 1; EXECUTE ssn_q",  # prepared in the same Query
     "COMMIT"],
    # several statements in one Query, masking different columns
    ["SELECT email FROM customers ORDER BY id LIMIT 1; SELECT birth_date, phone FROM customers ORDER BY id LIMIT 1"],
    # search_path: set plainly, and in a Query the gateway refuses once the rules let it through
    ["SET search_path = scratch, public", "SELECT status FROM orders ORDER BY id LIMIT 1"],
    ["SET search_path = scratch, public; COPY (SELECT email FROM customers) TO STDOUT",
     "SELECT status FROM orders ORDER BY id LIMIT 1"],
    # search_path given at login (options, track_extra_parameters): the rules see it from the start
    {"options": "-c search_path=scratch,public", "sql": ["SELECT status FROM orders ORDER BY id LIMIT 1"]},
]


@pytest.fixture(scope="module")
def recorded(pg, demo_shop, tmp_path_factory):
    work = tmp_path_factory.mktemp("against-work")
    rules = work / "rules"
    shutil.copytree(REPO / "rules", rules)
    (rules / "60_scratch.star").write_text(SCRATCH_RULE)
    g, rec = start_recording_gateway(pg, demo_shop, work, rules_dir=str(rules),
                                     track_extra_parameters="IntervalStyle, search_path")
    outs = []
    try:
        for n, session in enumerate(SESSIONS, 1):
            options = session["options"] if isinstance(session, dict) else None
            sqls = session["sql"] if isinstance(session, dict) else session
            args = ["psql", g.dsn(user="agent", dbname="shop", **({"options": f"'{options}'"} if options else {})),
                    "-X", "-At", "-v", "ON_ERROR_STOP=0"]
            for sql in sqls:
                args += ["-c", sql]
            outs.append(subprocess.run(args, capture_output=True, text=True, timeout=60))
            wait_logged_out(rec, n)
    finally:
        g.stop()
    return rules, rec, outs, upstream_entry(pg, demo_shop)


def test_the_gateway_masked_what_the_sessions_read(recorded):
    _, _, outs, _ = recorded
    card, multi, scratch, refused, at_login = outs
    assert "@example.com" in card.stdout and "***@example.com" in card.stdout, card.stdout + card.stderr
    assert "COPY would include columns" in refused.stderr
    # the status is masked in the three scratch sessions (also after the refused Query that set
    # it, and where the login's options set it)
    assert scratch.stdout.splitlines()[-1] == refused.stdout.splitlines()[-1] == at_login.stdout.strip(), \
        at_login.stdout + at_login.stderr
    assert scratch.stdout.splitlines()[-1] not in ("pending", "paid", "shipped", "delivered", "cancelled")


def test_the_rules_that_recorded_the_sessions_change_nothing(recorded):
    rules, rec, _, catalog = recorded
    r = pooler("rules", "test", str(rules), "--against", str(rec), "--catalog", catalog, "--json")
    rep = json.loads(r.stdout)
    assert [(c["q"], c["sql"], c["changes"], c["before"], c["after"]) for c in rep["changes"]] == []
    assert r.returncode == 0, r.stdout + r.stderr
    assert rep["judged"] == 13 and rep["sessions"] == 5
    # both sides decided offline with the same rules: nothing either
    same = pooler("rules", "test", str(rules), "--against", str(rec), "--catalog", catalog,
                  "--baseline", str(rules), "--json")
    assert json.loads(same.stdout)["changes"] == [] and same.returncode == 0


def test_a_changed_mask_is_reported_exactly_where_it_applies(recorded, tmp_path):
    rules, rec, _, catalog = recorded
    cand = tmp_path / "rules-candidate"
    shutil.copytree(rules, cand)
    pii = cand / "40_pii.star"
    src = pii.read_text()
    assert '    "public.customers.email": "email",\n' in src
    pii.write_text(src.replace('    "public.customers.email": "email",\n', '    "public.customers.email": "redact",\n'))
    r = pooler("rules", "test", str(cand), "--against", str(rec), "--catalog", catalog, "--json")
    assert r.returncode == 1, r.stdout + r.stderr
    rep = json.loads(r.stdout)
    got = [(c["sql"], c["changes"], c["detail"]) for c in rep["changes"]]
    detail = ["mask method changed: public.customers.email email -> redact"]
    # every statement whose masks include the e-mail address (in the scratch sessions the shipped
    # rules mask all personal data: scratch.orders is a relation the catalog does not know)
    assert got == [(sql, ["mask method changed"], detail) for sql in (
        CARD, "EXECUTE card", SESSIONS[0][3], SESSIONS[0][4], SESSIONS[1][0], SESSIONS[2][1], SESSIONS[3][0],
        SESSIONS[3][1], SESSIONS[4]["sql"][0])]
    assert rep["counts"]["mask method changed"] == 9 and sum(rep["counts"].values()) == 9


def test_a_changed_mask_behind_the_search_path(recorded, tmp_path):
    rules, rec, _, catalog = recorded
    cand = tmp_path / "rules-candidate"
    shutil.copytree(rules, cand)
    (cand / "60_scratch.star").write_text(SCRATCH_RULE.replace('"redact"', '"null"'))
    rep = json.loads(pooler("rules", "test", str(cand), "--against", str(rec), "--catalog", catalog, "--json").stdout)
    # the SELECT after each SET search_path, and the first statement where the login set it
    sids = sorted({c["sid"] for c in rep["changes"]}, key=lambda sid: int(sid.rsplit(".", 1)[1]))
    assert len(sids) == 3
    assert [(c["sid"], c["q"], c["changes"]) for c in rep["changes"]] == [
        (sids[0], 2, ["mask method changed"]), (sids[1], 2, ["mask method changed"]),
        (sids[2], 1, ["mask method changed"])]
