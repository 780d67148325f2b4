"""Statements held for a human's approval: held without a server, told at once, run exactly as
sent once approved, refused when denied, timed out, canceled or abandoned; decided from the
admin console by reviewers who are not the requester; grants for a statement's shape. Real
clients (psql, psycopg, asyncpg) through the gateway to the real cluster."""

from __future__ import annotations

import asyncio
import http.server
import json
import subprocess
import threading
import time
from pathlib import Path

import asyncpg
import psycopg
import pytest

from pooler.pgcluster import seed_demo
from tests.conftest import upstream_entry

REPO = Path(__file__).resolve().parent.parent
USERS = {"agent": "groups=agents", "ann": "groups=analysts", "dba": "groups=admins,pii-readers",
         "admin": "groups=admins"}
BASE = {"rules_dir": str(REPO / "rules"), "admin_users": "admin,admin2", "stats_users": "watcher"}


@pytest.fixture(scope="module")
def shop(pg):
    seed_demo(pg, "approval_shop")
    return "approval_shop"


@pytest.fixture
def make_gw(pg, shop, gw_factory):
    def make(**settings):
        return gw_factory(settings={**BASE, **settings}, users=USERS,
                          databases={"shop": upstream_entry(pg, shop) + " pool_size=2"})
    return make


@pytest.fixture
def agw(make_gw):
    return make_gw()


def console(g, user: str = "admin") -> psycopg.Connection:
    return psycopg.connect(g.dsn(user=user, dbname="pgbouncer"), autocommit=True, prepare_threshold=None)


def rows(conn, what: str) -> list[dict]:
    cur = conn.execute(f"SHOW {what}")
    names = [d.name for d in cur.description]
    return [dict(zip(names, r)) for r in cur.fetchall()]


def pending(g, n: int = 1, timeout: float = 15.0) -> list[dict]:
    """Wait (bounded) until ``n`` requests are pending; they, oldest first."""
    deadline = time.monotonic() + timeout
    with console(g) as c:
        while True:
            got = [r for r in rows(c, "APPROVALS") if r["state"] == "pending"]
            if len(got) >= n:
                return got
            assert time.monotonic() < deadline, f"no {n} pending approval request(s): {got}"
            time.sleep(0.05)


def pool_row(g) -> dict:
    with console(g) as c:
        return next(r for r in rows(c, "POOLS") if r["database"] == "shop")


def price_sum(pg, shop) -> str:
    return pg.psql("SELECT sum(price) FROM products", dbname=shop).strip()


class Background:
    """Run ``fn`` in a thread; ``result()`` is what it returned or raises what it raised."""

    def __init__(self, fn):
        self.value = self.error = None
        self.t = threading.Thread(target=self._run, args=(fn,), daemon=True)
        self.t.start()

    def _run(self, fn):
        try:
            self.value = fn()
        except BaseException as e:  # noqa: BLE001
            self.error = e

    def result(self, timeout: float = 30.0):
        self.t.join(timeout)
        assert not self.t.is_alive(), "the held client never got an answer"
        if self.error is not None:
            raise self.error
        return self.value


# --------------------------------------------------------------------------- simple query


def test_a_held_update_waits_without_a_server_and_runs_once_approved(pg, shop, agw):
    before = price_sum(pg, shop)
    notices = []

    def agent():
        with psycopg.connect(agw.dsn(user="ann", dbname="shop"), autocommit=True,
                             application_name="nightly-agent") as conn:
            conn.add_notice_handler(lambda d: notices.append((d.message_primary, d.message_hint)))
            cur = conn.execute("UPDATE products SET price = price + 1")
            return cur.rowcount

    job = Background(agent)
    req = pending(agw)[0]
    # the client was told at once, with where to decide
    deadline = time.monotonic() + 10
    while not notices:  # psycopg hands the notice over from its own thread
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert req["id"] in notices[0][0] and "rules/30_bulk_writes.star" in notices[0][0]
    assert "APPROVE " + req["id"] in notices[0][1]
    # what the reviewer sees
    assert (req["user"], req["groups"], req["database"], req["application_name"]) == (
        "ann", "analysts", "shop", "nightly-agent")
    assert req["rule"] == "rules/30_bulk_writes.star" and "without WHERE" in req["reason"]
    assert req["statement"] == "UPDATE products\nSET price = price + 1"
    assert req["tables_written"] == "public.products" and req["approvals"] == "0/1"
    # held outside a transaction: no server is taken while a human decides
    p = pool_row(agw)
    assert p["sv_active"] == 0
    assert price_sum(pg, shop) == before
    with console(agw) as c:
        c.execute(f"APPROVE {req['id']}")
    n = job.result()
    assert n == int(pg.psql("SELECT count(*) FROM products", dbname=shop))
    assert price_sum(pg, shop) != before
    with console(agw) as c:
        done = next(r for r in rows(c, "APPROVALS") if r["id"] == req["id"])
    assert (done["state"], done["decided_by"]) == ("approved", "admin")


def test_psql_shows_the_notice_and_the_reviewers_denial(pg, shop, agw):
    before = price_sum(pg, shop)
    proc = subprocess.Popen(["psql", "-X", "-d", agw.dsn(user="ann", dbname="shop"), "-c",
                             "DELETE FROM order_items"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    req = pending(agw)[0]
    with console(agw, "admin2") as c:
        c.execute(f"DENY {req['id']} 'not during business hours'")
    out, err = proc.communicate(timeout=30)
    assert proc.returncode != 0
    assert f"statement held for approval: request {req['id']}" in err
    assert "denied by reviewer admin2: not during business hours" in err
    assert "approval required by rules/30_bulk_writes.star" in err
    assert pg.psql("SELECT count(*) FROM order_items", dbname=shop).strip() != "0"
    assert price_sum(pg, shop) == before


def test_a_statement_nobody_decides_times_out(pg, shop, make_gw):
    g = make_gw(approval_timeout="1")
    with psycopg.connect(g.dsn(user="ann", dbname="shop"), autocommit=True) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="timed out after 1 s"):
            conn.execute("DELETE FROM order_items")
        assert conn.execute("SELECT count(*) FROM order_items").fetchone()[0] > 0  # the session goes on
    with console(g) as c:
        assert [r["state"] for r in rows(c, "APPROVALS")] == ["expired"]


# --------------------------------------------------------------------------- extended protocol


def test_psycopg_parameters_are_shown_and_bound_exactly_as_sent(pg, shop, agw):
    def agent():
        with psycopg.connect(agw.dsn(user="ann", dbname="shop"), autocommit=True) as conn:
            return conn.execute("UPDATE products SET name = name || %s", ["-x'y"]).rowcount

    job = Background(agent)
    req = pending(agw)[0]
    assert req["params"] == "$1 = '-x''y'"
    assert req["statement"].startswith("UPDATE products\nSET name = name || $1")
    assert pool_row(agw)["sv_active"] == 0  # Parse, Bind and Execute all wait: no server taken
    with console(agw) as c:
        c.execute(f"APPROVE {req['id']}")
    assert job.result() > 0
    assert pg.psql("SELECT count(*) FROM products WHERE name LIKE '%-x''y'", dbname=shop).strip() != "0"
    pg.psql("UPDATE products SET name = left(name, -4) WHERE name LIKE '%-x''y'", dbname=shop)


def test_asyncpg_prepared_statement_is_held_at_each_execution(pg, shop, agw):
    async def agent():
        c = await asyncpg.connect(host=agw.host, port=agw.port, user="ann", database="shop", ssl=False)
        try:
            stmt = await c.prepare("UPDATE products SET price = price + $1")  # Parse + Describe: answered
            assert [a.name for a in stmt.get_parameters()] == ["numeric"]
            first = await stmt.fetch(0)
            return first, await c.fetchval("SELECT 42")
        finally:
            await c.close()

    job = Background(lambda: asyncio.run(agent()))
    req = pending(agw)[0]
    assert req["params"].startswith("$1 = '\\x")  # asyncpg binds numeric in binary: shown as hex
    with console(agw) as c:
        c.execute(f"APPROVE {req['id']}")
    first, after = job.result()
    assert first == [] and after == 42


def test_inside_a_transaction_the_server_stays_and_later_messages_wait_in_order(pg, shop, agw):
    def agent():
        with psycopg.connect(agw.dsn(user="ann", dbname="shop")) as conn:
            conn.execute("SELECT 1")  # BEGIN: a server is linked
            with conn.pipeline():
                c1 = conn.execute("UPDATE products SET price = price + 0")
                c2 = conn.execute("SELECT count(*) FROM products")
            n1, n2 = c1.rowcount, c2.fetchone()[0]
            conn.rollback()
            return n1, n2

    job = Background(agent)
    req = pending(agw)[0]
    assert req["statement"].startswith("UPDATE products")
    assert pool_row(agw)["sv_active"] == 1  # its transaction keeps its server
    with console(agw) as c:
        c.execute(f"APPROVE {req['id']}")
    n1, n2 = job.result()
    assert n1 == n2 > 0


def test_sql_level_execute_is_held_as_the_statement_it_runs(pg, shop, agw):
    def agent():
        with psycopg.connect(agw.dsn(user="ann", dbname="shop")) as conn:
            conn.execute("PREPARE bump AS UPDATE products SET price = price + 0")
            n = conn.execute("EXECUTE bump").rowcount
            conn.rollback()
            return n

    job = Background(agent)
    req = pending(agw)[0]
    assert req["statement"] == "EXECUTE bump"
    with console(agw) as c:
        c.execute(f"APPROVE {req['id']}")
    assert job.result() > 0


# --------------------------------------------------------------------------- withdrawing


def test_cancel_withdraws_the_request_with_57014(pg, shop, agw):
    conn = psycopg.connect(agw.dsn(user="ann", dbname="shop"), autocommit=True)
    job = Background(lambda: conn.execute("DELETE FROM order_items"))
    req = pending(agw)[0]
    conn.cancel()
    with pytest.raises(psycopg.errors.QueryCanceled):
        job.result()
    assert conn.execute("SELECT 1").fetchone() == (1,)
    conn.close()
    with console(agw) as c:
        r = next(r for r in rows(c, "APPROVALS") if r["id"] == req["id"])
        assert (r["state"], r["outcome"]) == ("withdrawn", "canceled by the client")
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="already withdrawn"):
            c.execute(f"APPROVE {req['id']}")
    assert pg.psql("SELECT count(*) FROM order_items", dbname=shop).strip() != "0"


def test_a_client_that_disconnects_withdraws_its_request(pg, shop, agw):
    proc = subprocess.Popen(["psql", "-X", "-d", agw.dsn(user="ann", dbname="shop"), "-c", "DELETE FROM order_items"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    req = pending(agw)[0]
    proc.kill()
    proc.wait()
    deadline = time.monotonic() + 10
    with console(agw) as c:
        while next(r for r in rows(c, "APPROVALS") if r["id"] == req["id"])["state"] == "pending":
            assert time.monotonic() < deadline, "the request outlived its client"
            time.sleep(0.05)
        r = next(r for r in rows(c, "APPROVALS") if r["id"] == req["id"])
        assert (r["state"], r["outcome"]) == ("withdrawn", "the client disconnected")
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="already withdrawn"):
            c.execute(f"APPROVE {req['id']}")
    assert pg.psql("SELECT count(*) FROM order_items", dbname=shop).strip() != "0"


# --------------------------------------------------------------------------- who decides


def test_nobody_approves_their_own_statement_and_n_distinct_reviewers_are_needed(pg, shop, make_gw):
    g = make_gw(approvals_required="2")
    job = Background(lambda: psycopg.connect(g.dsn(user="admin", dbname="shop"), autocommit=True).execute(
        "UPDATE products SET price = price + 0").rowcount)
    req = pending(g)[0]
    with console(g, "admin") as c:
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="nobody approves their own statement"):
            c.execute(f"APPROVE {req['id']}")
    with console(g, "watcher") as c:  # stats_users: SHOW only
        with pytest.raises(psycopg.Error, match="admin access needed"):
            c.execute(f"APPROVE {req['id']}")
        assert rows(c, "APPROVALS")[0]["id"] == req["id"]
    notices = []
    with console(g, "admin2") as c:
        c.add_notice_handler(lambda d: notices.append(d.message_primary))
        c.execute(f"APPROVE {req['id']}")
        assert notices == [f"request {req['id']} has 1 of 2 approvals"]
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="already approved"):
            c.execute(f"APPROVE {req['id']}")
    assert pending(g)[0]["approvals"] == "1/2"  # still waiting for a second reviewer
    with console(g, "admin2") as c:
        c.execute("SET admin_users = 'admin,admin2,admin3'")
    with console(g, "admin3") as c:
        c.execute(f"APPROVE {req['id']}")
    assert job.result() > 0


def test_unknown_and_malformed_decisions_are_clear_errors(agw):
    with console(agw) as c:
        with pytest.raises(psycopg.Error, match="approval request 'deadbeef' does not exist"):
            c.execute("APPROVE deadbeef")
        with pytest.raises(psycopg.Error, match="invalid interval"):
            c.execute("APPROVE deadbeef FOR 'a while'")
        with pytest.raises(psycopg.Error, match="does not exist"):
            c.execute("DENY deadbeef 'no'")
        with pytest.raises(psycopg.Error, match="grant 'g1' does not exist"):
            c.execute("REVOKE g1")


def test_a_grant_lets_the_same_shape_run_until_revoked(pg, shop, agw):
    job = Background(lambda: psycopg.connect(agw.dsn(user="ann", dbname="shop"), autocommit=True).execute(
        "UPDATE products SET price = price + 0").rowcount)
    req = pending(agw)[0]
    with console(agw) as c:
        c.execute(f"APPROVE {req['id']} FOR '10 minutes'")
    job.result()
    with psycopg.connect(agw.dsn(user="ann", dbname="shop"), autocommit=True) as conn:
        # same shape, other literal: no hold
        assert conn.execute("UPDATE products SET price = price + 0.0").rowcount > 0
    with console(agw) as c:
        (grant,) = rows(c, "GRANTS")
        assert (grant["user"], grant["granted_by"], grant["uses"], grant["active"]) == ("ann", "admin", 1, "yes")
        assert grant["id"] == next(r for r in rows(c, "APPROVALS") if r["id"] == req["id"])["grant"]
        c.execute(f"REVOKE {grant['id']}")
        assert rows(c, "GRANTS")[0]["active"] == "no"
    # another identity never benefits, and after the revocation ann is held again
    job = Background(lambda: psycopg.connect(agw.dsn(user="ann", dbname="shop"), autocommit=True).execute(
        "UPDATE products SET price = price + 0").rowcount)
    req2 = pending(agw)[0]
    assert req2["id"] != req["id"]
    with console(agw) as c:
        c.execute(f"DENY {req2['id']} 'enough'")
    with pytest.raises(psycopg.errors.InsufficientPrivilege, match="enough"):
        job.result()
    # a grant is bounded by approval_max_grant
    job = Background(lambda: psycopg.connect(agw.dsn(user="ann", dbname="shop"), autocommit=True).execute(
        "DELETE FROM order_items"))
    req3 = pending(agw)[0]
    with console(agw) as c:
        with pytest.raises(psycopg.Error, match="at most 1 h"):
            c.execute(f"APPROVE {req3['id']} FOR '2 hours'")
        c.execute(f"DENY {req3['id']} 'no'")
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        job.result()


def test_other_sessions_run_while_statements_wait(pg, shop, agw):
    conns = [psycopg.connect(agw.dsn(user="ann", dbname="shop"), autocommit=True) for _ in range(3)]
    jobs = [Background(lambda c=c: c.execute("DELETE FROM order_items")) for c in conns]
    held = pending(agw, 3)
    # the pool has 2 servers and 3 statements wait: none of them holds one
    with psycopg.connect(agw.dsn(user="ann", dbname="shop"), autocommit=True) as other:
        for _ in range(20):
            assert other.execute("SELECT count(*) FROM products").fetchone()[0] > 0
    with console(agw) as c:
        for r in held:
            c.execute(f"DENY {r['id']} 'no'")
    for j in jobs:
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            j.result()
    for c in conns:
        c.close()


# --------------------------------------------------------------------------- justification, webhook


def test_a_rule_may_require_a_justification(pg, shop, make_gw, tmp_path):
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "bulk.star").write_text(
        "def on_statement(stmt, session):\n"
        "    if stmt.command == 'DELETE':\n"
        "        return require_approval('deletes need a human', justification = True)\n")
    g = make_gw(rules_dir=str(rules))
    with psycopg.connect(g.dsn(user="ann", dbname="shop"), autocommit=True) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="asks for a justification first"):
            conn.execute("DELETE FROM order_items WHERE false")
    job = Background(lambda: psycopg.connect(g.dsn(user="ann", dbname="shop"), autocommit=True).execute(
        "/* justification: ticket OPS-7, stale rows */ DELETE FROM order_items WHERE false").rowcount)
    req = pending(g)[0]
    assert req["justification"] == "ticket OPS-7, stale rows"
    with console(g) as c:
        c.execute(f"APPROVE {req['id']}")
    assert job.result() == 0

    def by_setting():
        with psycopg.connect(g.dsn(user="ann", dbname="shop"), autocommit=True) as conn:
            conn.execute("SET pooler.justification = 'cleanup after import'")
            return conn.execute("DELETE FROM order_items WHERE false").rowcount

    job = Background(by_setting)
    req = pending(g)[0]
    assert req["justification"] == "cleanup after import"
    with console(g) as c:
        c.execute(f"APPROVE {req['id']}")
    assert job.result() == 0


def test_the_webhook_hears_new_and_decided_requests(pg, shop, make_gw):
    got = []
    fails = {"left": 1}  # the first POST fails: it is retried

    class Hook(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers["Content-Length"]))
            if fails["left"]:
                fails["left"] -= 1
                self.send_response(503)
            else:
                got.append(json.loads(body))
                self.send_response(204)
            self.end_headers()

        def log_message(self, *a):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hook)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        g = make_gw(approval_webhook=f"http://127.0.0.1:{srv.server_address[1]}/hook")
        job = Background(lambda: psycopg.connect(g.dsn(user="ann", dbname="shop"), autocommit=True).execute(
            "DELETE FROM order_items").rowcount)
        req = pending(g)[0]
        with console(g) as c:
            c.execute(f"DENY {req['id']} 'no thanks'")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            job.result()
        deadline = time.monotonic() + 15
        while len(got) < 2:
            assert time.monotonic() < deadline, got
            time.sleep(0.05)
        assert [(e["event"], e["request"]["id"]) for e in got] == [("new", req["id"]), ("denied", req["id"])]
        assert got[1]["request"]["decided_by"] == "admin" and got[1]["request"]["outcome"] == "no thanks"
        assert "password" not in json.dumps(got)
    finally:
        srv.shutdown()


def test_prometheus_counts_held_and_decided_requests(pg, shop, make_gw):
    from tests.gwproc import free_port
    from tests.test_metrics import scrape, value

    port = free_port()
    g = make_gw(metrics_listen=f"127.0.0.1:{port}")
    job = Background(lambda: psycopg.connect(g.dsn(user="ann", dbname="shop"), autocommit=True).execute(
        "DELETE FROM order_items"))
    req = pending(g)[0]
    m = scrape(port)
    assert value(m, "pooler_approvals_pending") == 1
    assert value(m, "pooler_decisions_total", rule="rules/30_bulk_writes.star", action="require_approval") == 1
    with console(g) as c:
        c.execute(f"DENY {req['id']} 'no'")
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        job.result()
    m = scrape(port)
    assert value(m, "pooler_approvals_pending") == 0
    assert value(m, "pooler_approval_requests_total", outcome="denied") == 1
    assert value(m, "pooler_approval_wait_seconds_count") == 1


# --------------------------------------------------------------------------- dry runs for reviewers

PREVIEW_RULE = ("def on_statement(stmt, session):\n"
                "    if stmt.command in ('UPDATE', 'DELETE') and stmt.has_where == False:\n"
                "        return require_approval('bulk change', preview = True)\n")


@pytest.fixture
def preview_gw(make_gw, tmp_path):
    rules = tmp_path / "preview-rules"
    rules.mkdir()
    (rules / "40_pii.star").write_text((REPO / "rules" / "40_pii.star").read_text())
    (rules / "50_preview.star").write_text(PREVIEW_RULE)
    return make_gw(rules_dir=str(rules), approval_preview_timeout="2")


def preview_of(g, rid: str, timeout: float = 20.0) -> str:
    deadline = time.monotonic() + timeout
    with console(g) as c:
        while True:
            r = next(r for r in rows(c, "APPROVALS") if r["id"] == rid)
            if r["preview"] and r["preview"] != "dry run in progress":
                return r["preview"]
            assert time.monotonic() < deadline, "the dry run never ended"
            time.sleep(0.05)


def test_a_dry_run_shows_the_rows_a_write_would_change_masked_and_changes_nothing(pg, shop, preview_gw):
    raw_name = pg.psql("SELECT full_name FROM customers ORDER BY id LIMIT 1", dbname=shop).strip()
    total = int(pg.psql("SELECT count(*) FROM customers", dbname=shop))
    job = Background(lambda: psycopg.connect(preview_gw.dsn(user="ann", dbname="shop"), autocommit=True).execute(
        "UPDATE customers SET email = 'changed+' || id || '@example.org'").rowcount)
    req = pending(preview_gw)[0]
    shown = preview_of(preview_gw, req["id"])
    assert shown.startswith(f"{total} row(s) would change: (id, full_name, email"), shown
    assert "***@example.org" in shown and raw_name not in shown  # masked as ann would see them
    assert "changed+" not in shown
    # the dry run was rolled back
    assert pg.psql("SELECT count(*) FROM customers WHERE email LIKE 'changed+%'", dbname=shop).strip() == "0"
    with console(preview_gw) as c:
        c.execute(f"DENY {req['id']} 'no'")
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        job.result()
    assert pg.psql("SELECT count(*) FROM customers WHERE email LIKE 'changed+%'", dbname=shop).strip() == "0"


def test_a_dry_run_binds_the_held_parameters(pg, shop, preview_gw):
    n = int(pg.psql("SELECT count(*) FROM products", dbname=shop))
    job = Background(lambda: psycopg.connect(preview_gw.dsn(user="ann", dbname="shop"), autocommit=True).execute(
        "UPDATE products SET name = name || %s", ["-preview"]).rowcount)
    req = pending(preview_gw)[0]
    shown = preview_of(preview_gw, req["id"])
    assert shown.startswith(f"{n} row(s) would change") and "-preview" in shown, shown
    with console(preview_gw) as c:
        c.execute(f"APPROVE {req['id']}")
    assert job.result() == n
    pg.psql("UPDATE products SET name = left(name, -8) WHERE name LIKE '%-preview'", dbname=shop)


def test_what_a_rollback_cannot_undo_is_never_dry_run(pg, shop, preview_gw):
    job = Background(lambda: psycopg.connect(preview_gw.dsn(user="ann", dbname="shop"), autocommit=True).execute(
        "UPDATE products SET name = name || pg_backend_pid()"))
    req = pending(preview_gw)[0]
    assert preview_of(preview_gw, req["id"]).startswith("not dry-run: it calls pg_backend_pid")
    with console(preview_gw) as c:
        c.execute(f"DENY {req['id']} 'no'")
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        job.result()


def test_a_dry_run_that_waits_on_a_lock_gives_up_and_says_so(pg, shop, preview_gw):
    locker = psycopg.connect(pg.dsn(dbname=shop))
    locker.execute("LOCK TABLE order_items IN ACCESS EXCLUSIVE MODE")
    try:
        job = Background(lambda: psycopg.connect(preview_gw.dsn(user="ann", dbname="shop"), autocommit=True).execute(
            "DELETE FROM order_items"))
        req = pending(preview_gw)[0]
        assert preview_of(preview_gw, req["id"]).startswith("dry run failed: canceling statement due to lock timeout")
    finally:
        locker.rollback()
        locker.close()
    with console(preview_gw) as c:
        c.execute(f"DENY {req['id']} 'no'")
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        job.result()
    assert pg.psql("SELECT count(*) FROM order_items", dbname=shop).strip() != "0"
