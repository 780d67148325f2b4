"""What a recording says of approvals, cancels, failed logins and secrets: a held statement's
request and who decided it, a cancel request, a refused login (without its password), and
password literals cut out of statement text."""

from __future__ import annotations

import threading

import psycopg
import pytest

from pooler.recording import files as rf
from tests.recording_helpers import of, wait_logged_out
from tests.test_approvals import BASE, USERS, Background, console, pending, shop  # noqa: F401 - shop: a fixture
from tests.conftest import upstream_entry


def all_text(d) -> str:
    return "\n".join(b"\n".join(rf.read_lines(f.path)[0]).decode() for f in rf.list_files(d))


@pytest.fixture
def rec_agw(pg, shop, gw_factory, tmp_path):  # noqa: F811
    d = tmp_path / "rec"
    g = gw_factory(settings={**BASE, "record_dir": str(d), "record_fsync": "always"}, users=USERS,
                   databases={"shop": upstream_entry(pg, shop) + " pool_size=2"})
    return g, d


def test_an_approved_statement_is_recorded_with_its_request_and_reviewer(rec_agw):
    g, d = rec_agw
    sql = "UPDATE products SET price = price + 0"

    def agent():
        with psycopg.connect(g.dsn(user="ann", dbname="shop"), autocommit=True) as c:
            return c.execute(sql).rowcount

    job = Background(agent)
    req = pending(g)[0]
    with console(g) as c:
        c.execute(f"APPROVE {req['id']}")
    n = job.result()
    (s,) = [s for s in wait_logged_out(d, 1) if s["login"]["user"] == "ann"]
    (stmt,) = [x for x in of(s, "stmt") if x["sql"] == sql]
    assert stmt["action"] == "require_approval" and stmt["rule"] == "rules/30_bulk_writes.star"
    (held,) = of(s, "held")
    assert held["request"] == req["id"] and held["q"] == stmt["q"] and "without WHERE" in held["reason"]
    (ended,) = of(s, "hold_ended")
    assert (ended["request"], ended["state"], ended["by"]) == (req["id"], "approved", "admin")
    (done,) = [x for x in of(s, "done") if x["q"] == stmt["q"]]
    assert done["tag"] == f"UPDATE {n}"
    kinds = [e["t"] for e in s["events"]]
    assert kinds.index("held") < kinds.index("hold_ended") < kinds.index("done")


def test_a_cancel_is_recorded_and_withdraws_the_held_request(rec_agw):
    g, d = rec_agw
    conn = psycopg.connect(g.dsn(user="ann", dbname="shop"), autocommit=True)
    job = Background(lambda: conn.execute("DELETE FROM order_items"))
    req = pending(g)[0]
    conn.cancel()
    with pytest.raises(psycopg.errors.QueryCanceled):
        job.result()
    conn.close()
    (s,) = [s for s in wait_logged_out(d, 1) if s["login"]["user"] == "ann"]
    kinds = [e["t"] for e in s["events"]]
    assert "cancel" in kinds and kinds.index("held") < kinds.index("cancel")
    (ended,) = of(s, "hold_ended")
    assert (ended["request"], ended["state"], ended["outcome"]) == (req["id"], "withdrawn", "canceled by the client")


def test_a_running_statement_canceled_is_recorded_with_its_error(gw_factory, tmp_path):
    d = tmp_path / "rec"
    g = gw_factory(settings={"record_dir": str(d), "record_fsync": "always"})
    with psycopg.connect(g.dsn(), autocommit=True) as c:
        done = threading.Event()

        def cancel_until_done():  # a cancel that arrives before the statement runs cancels nothing
            while not done.wait(0.1):
                c.cancel()

        t = threading.Thread(target=cancel_until_done)
        t.start()
        try:
            with pytest.raises(psycopg.errors.QueryCanceled):
                c.execute("SELECT pg_sleep(30)")
        finally:
            done.set()
            t.join(10)
    (s,) = wait_logged_out(d)
    (err,) = of(s, "error")
    assert err["sqlstate"] == "57014" and of(s, "cancel")


def test_failed_logins_and_password_literals_never_put_a_secret_in_a_recording(gw_factory, pg, tmp_path):
    d = tmp_path / "rec"
    g = gw_factory(settings={"record_dir": str(d), "record_fsync": "always", "auth_type": "md5"},
                   auth_users={"postgres": "right-pass-7731"})
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(g.dsn(password="wrong-pass-5519"), autocommit=True).close()
    with psycopg.connect(g.dsn(password="right-pass-7731"), autocommit=True) as c:
        c.execute("DROP ROLE IF EXISTS rec_pw_role")
        c.execute("CREATE ROLE rec_pw_role LOGIN PASSWORD 'hunter2-8842'")
        c.execute("ALTER ROLE rec_pw_role PASSWORD 'hunter3-9953' VALID UNTIL 'infinity'")
        c.execute("ALTER ROLE rec_pw_role PASSWORD U&'hunter4-1164'")  # quoting that a pattern would miss
        c.execute("DROP ROLE rec_pw_role")
        # parameters: of a statement that speaks of a password, and a connection string's password
        # (their results are lengths: a value the client is shown is recorded as it was shown)
        assert c.execute("SELECT length(%s::text) AS password", ["hunter5-2275"]).fetchone()[0] == 12
        assert c.execute("SELECT length(%s::text)", ["host=db password=hunter6-3386 user=x"]).fetchone()[0] == 36
    (s,) = wait_logged_out(d)
    redacted = [x for x in of(s, "stmt") if x.get("redacted")]
    assert [x["sql"] for x in redacted][:2] == ["CREATE ROLE rec_pw_role LOGIN PASSWORD '********'",
                                               "ALTER ROLE rec_pw_role PASSWORD '********' VALID UNTIL 'infinity'"]
    assert redacted[2]["sql"] == "ALTER ROLE rec_pw_role PASSWORD '********'"
    binds = [x["params"] for x in of(s, "bind")]
    assert ["********"] in binds and ["host=db password=******** user=x"] in binds
    g.stop()
    text = all_text(d)
    assert '"t":"login_failed"' in text and '"user":"postgres"' in text
    for secret in ("wrong-pass-5519", "right-pass-7731", "hunter2-8842", "hunter3-9953", "hunter4-1164", "hunter5-2275",
                   "hunter6-3386"):
        assert secret not in text
