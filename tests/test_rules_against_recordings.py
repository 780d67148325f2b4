"""``pooler rules test DIR --against RECORDINGS`` on a real recording: the sessions of
replay_helpers (psql and psycopg through the gateway with the shipped rules) decided again with
a changed rule set report exactly the statements whose decision changes, and the exit status
tells CI whether anything did."""

from __future__ import annotations

import json
import shutil

import pytest

from tests.gwproc import REPO
from tests.replay_helpers import pooler, pooler_process, record_demo_sessions, start_recording_gateway


@pytest.fixture(scope="module")
def recorded(pg, demo_shop, tmp_path_factory):
    g, rec = start_recording_gateway(pg, demo_shop, tmp_path_factory.mktemp("against"))
    try:
        sessions = record_demo_sessions(g, rec)
    finally:
        g.stop()
    return rec, {s["login"]["user"]: s["sid"] for s in sessions}


@pytest.fixture
def candidate(tmp_path):
    """The shipped rules, changed: agents may no longer read products; e-mail addresses are no
    longer masked."""
    d = tmp_path / "rules-candidate"  # another directory name: the same rule files are the same rules
    shutil.copytree(REPO / "rules", d)
    (d / "50_products.star").write_text(
        'def on_statement(stmt, session):\n'
        '    if "agents" in session.groups and "public.products" in stmt.tables:\n'
        '        return deny("agents may not read products")\n'
        '    return None\n')
    pii = d / "40_pii.star"
    src = pii.read_text()
    assert '    "public.customers.email": "email",\n' in src
    pii.write_text(src.replace('    "public.customers.email": "email",\n', ""))
    return d


def test_unchanged_rules_change_nothing(recorded):
    rec, _ = recorded
    r = pooler_process("rules", "test", str(REPO / "rules"), "--against", str(rec))
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.splitlines()[-1].startswith("9 statement(s) of 3 session(s) decided again with ")
    assert r.stdout.splitlines()[-1].endswith("compared with what was recorded: 0 would change")


def test_changed_rules_report_exactly_the_changed_statements(recorded, candidate):
    rec, sid = recorded
    r = pooler("rules", "test", str(candidate), "--against", str(rec), "--json")
    assert r.returncode == 1, r.stderr
    rep = json.loads(r.stdout)
    got = {(c["user"], c["q"]): c for c in rep["changes"]}
    assert sorted(got) == [("agent", 1), ("agent", 4), ("ann", 2)]
    assert got["agent", 4]["changes"] == ["newly denied"] and got["agent", 4]["sql"] == "SELECT count(*) FROM products"
    assert got["agent", 4]["after"]["rule"] == "rules-candidate/50_products.star"
    assert got["agent", 4]["before"]["action"] == "allow"
    assert got["agent", 1]["changes"] == ["masks dropped"]
    assert got["agent", 1]["detail"] == ["masks dropped: public.customers.email=email"]
    assert got["agent", 1]["after"]["masks"] == [["public.customers.full_name", "hash"]]
    assert got["ann", 2]["changes"] == ["masks dropped"] and got["ann", 2]["after"]["action"] == "allow"
    assert all(c["sid"] == sid[c["user"]] for c in rep["changes"])
    assert rep["judged"] == 9 and rep["counts"]["newly denied"] == 1 and rep["counts"]["masks dropped"] == 2

    text = pooler("rules", "test", str(candidate), "--against", str(rec))
    assert text.returncode == 1
    lines = text.stdout.splitlines()
    changed = [line for line in lines if line.startswith("CHANGED")]
    assert len(changed) == 3 and f"{sid['agent']} #4  agent@shop" in changed[1] and "[newly denied]" in changed[1]
    assert "         before: allow by rules/20_agents.star" in lines
    assert "         after:  deny by rules-candidate/50_products.star: agents may not read products" in lines
    assert lines[-1].endswith("3 would change (1 newly denied, 2 masks dropped)")


def test_baseline_rules_and_filters(recorded, candidate):
    rec, _ = recorded
    r = pooler("rules", "test", str(candidate), "--against", str(rec), "--baseline", str(REPO / "rules"), "--json")
    rep = json.loads(r.stdout)
    assert r.returncode == 1 and sorted((c["user"], c["q"]) for c in rep["changes"]) == [
        ("agent", 1), ("agent", 4), ("ann", 2)]
    only = pooler("rules", "test", str(candidate), "--against", str(rec), "--identity", "ann", "--json")
    assert [(c["user"], c["q"]) for c in json.loads(only.stdout)["changes"]] == [("ann", 2)]
    later = pooler("rules", "test", str(candidate), "--against", str(rec), "--since", "2099-01-01")
    assert later.returncode == 0 and "0 statement(s) of 0 session(s)" in later.stdout
    bad = pooler("rules", "test", str(candidate), "--against", str(rec / "missing"))
    assert bad.returncode == 2 and "is not a directory" in bad.stderr


def test_a_candidate_rule_that_breaks_shows_as_newly_denied(recorded, tmp_path):
    rec, _ = recorded
    d = tmp_path / "rules"
    shutil.copytree(REPO / "rules", d)
    (d / "05_broken.star").write_text('def on_statement(stmt, session):\n    return 1 // 0\n')
    r = pooler("rules", "test", str(d), "--against", str(rec), "--json")
    rep = json.loads(r.stdout)
    assert r.returncode == 1
    # every statement that ran is refused now; the two the agent was denied already are denied
    # by the broken rule instead (the agent reads another message)
    kinds = sorted((c["user"], c["q"], c["changes"][0]) for c in rep["changes"])
    assert [k for k in kinds if k[2] != "newly denied"] == [("agent", 2, "decided by another rule"),
                                                          ("agent", 3, "decided by another rule")]
    assert len(kinds) == 9
    assert all(c["after"]["action"] == "deny" and "05_broken.star" in c["after"]["rule"] + c["after"]["reason"]
               for c in rep["changes"])


def test_with_the_catalog_views_are_seen_through_as_the_gateway_saw_them(pg, demo_shop, tmp_path):
    import subprocess

    from tests.conftest import upstream_entry
    from tests.recording_helpers import wait_logged_out

    pg.psql("CREATE OR REPLACE VIEW contact_card AS SELECT id, email AS address FROM customers", dbname=demo_shop)
    g, rec = start_recording_gateway(pg, demo_shop, tmp_path)
    try:
        r = subprocess.run(["psql", g.dsn(user="agent", dbname="shop"), "-X", "-At", "-c",
                            "SELECT address FROM contact_card ORDER BY id LIMIT 1"], capture_output=True, text=True,
                           timeout=30)
        assert r.stdout.strip() == "***@example.com", r.stderr  # the gateway saw the e-mail behind the view
        wait_logged_out(rec, 1)
    finally:
        g.stop()
    # offline, without the catalog, the view's column is not known to be an e-mail address
    blind = json.loads(pooler("rules", "test", str(REPO / "rules"), "--against", str(rec), "--json").stdout)
    assert [(c["q"], c["changes"]) for c in blind["changes"]] == [(1, ["masks dropped"])]
    # with the database's catalog it is decided as the gateway decided it
    seen = pooler("rules", "test", str(REPO / "rules"), "--against", str(rec), "--catalog", upstream_entry(pg, demo_shop))
    assert seen.returncode == 0, seen.stdout + seen.stderr
    assert seen.stdout.splitlines()[-1].endswith("0 would change")
    bad = pooler("rules", "test", str(REPO / "rules"), "--against", str(rec), "--catalog", "host=127.0.0.1 port=1 user=x")
    assert bad.returncode == 2 and "cannot read the catalog" in bad.stderr
