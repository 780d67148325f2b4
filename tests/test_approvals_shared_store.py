"""Several gateways sharing one approvals store (``approvals_store = <PostgreSQL connection
string>``): a statement held on one gateway is decided on another's console or API, a grant
made on one is used on the other, two reviewers deciding at once cannot both win, a store that
cannot be written refuses the held statement, and a gateway that restarts withdraws what it
left pending. Real gateways (subprocesses), real clients, the store in the real test cluster."""

from __future__ import annotations

import base64
import json
import signal
import subprocess
import threading
import time
import urllib.request

import psycopg
import pytest

from pooler.pgcluster import seed_demo
from tests.conftest import upstream_entry
from tests.test_approvals import BASE, USERS, Background, console, price_sum, rows


@pytest.fixture(scope="module")
def shop(pg):
    seed_demo(pg, "shared_store_shop")
    return "shared_store_shop"


@pytest.fixture
def store(pg, request):
    """A fresh database for the store, reached as a role of its own (so a test can lock it out)."""
    name = "store_" + request.node.name[5:40].lower()
    pg.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    pg.execute("DO $$BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'approvals') THEN "
               "CREATE ROLE approvals LOGIN PASSWORD 'store-secret'; END IF; END$$")
    pg.execute("ALTER ROLE approvals LOGIN")
    pg.execute(f"CREATE DATABASE {name} OWNER approvals")
    yield f"host=127.0.0.1 port={pg.port} dbname={name} user=approvals password=store-secret"
    pg.execute("ALTER ROLE approvals LOGIN")
    pg.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture
def make_gw(pg, shop, store, gw_factory):
    def make(name: str, auth_users=None, **settings):
        return gw_factory(settings={**BASE, "approvals_store": store, "approvals_gateway_name": name, **settings},
                          users=USERS, auth_users=auth_users,
                          databases={"shop": upstream_entry(pg, shop) + " pool_size=2"})
    return make


def approvals(g, state: str | None = None) -> list[dict]:
    with console(g) as c:
        return [r for r in rows(c, "APPROVALS") if state is None or r["state"] == state]


def wait_for(g, rid: str, state: str, timeout: float = 15.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        got = [r for r in approvals(g) if r["id"] == rid]
        if got and got[0]["state"] == state:
            return got[0]
        assert time.monotonic() < deadline, f"request {rid} is not {state} on this gateway: {got}"
        time.sleep(0.05)


def wait_pending(g, n: int = 1, timeout: float = 15.0) -> list[dict]:
    deadline = time.monotonic() + timeout
    while True:
        got = approvals(g, "pending")
        if len(got) >= n:
            return got
        assert time.monotonic() < deadline, f"no {n} pending request(s) on this gateway: {approvals(g)}"
        time.sleep(0.05)


def held_update(g, sql: str = "UPDATE products SET price = price + 1"):
    def agent():
        with psycopg.connect(g.dsn(user="ann", dbname="shop"), autocommit=True) as conn:
            return conn.execute(sql).rowcount
    return Background(agent)


def test_a_statement_held_on_one_gateway_is_approved_on_another(pg, shop, make_gw):
    a, b = make_gw("gw-a"), make_gw("gw-b")
    before = price_sum(pg, shop)
    job = held_update(a)
    req = wait_pending(b)[0]  # B sees A's request
    assert (req["user"], req["database"], req["rule"]) == ("ann", "shop", "rules/30_bulk_writes.star")
    assert price_sum(pg, shop) == before
    with console(b, "admin2") as c:
        c.execute(f"APPROVE {req['id']}")
    assert job.result() == int(pg.psql("SELECT count(*) FROM products", dbname=shop))
    assert price_sum(pg, shop) != before
    for g in (a, b):  # both gateways tell the same story
        done = wait_for(g, req["id"], "approved")
        assert done["decided_by"] == "admin2"


def test_a_denial_over_the_other_gateways_api_reaches_the_client(pg, shop, make_gw):
    from tests.gwproc import free_port
    a = make_gw("gw-a")
    port = free_port()
    b = make_gw("gw-b", auth_users={"admin2": "admin2-password"}, approvals_listen=f"127.0.0.1:{port}")
    before = price_sum(pg, shop)
    job = held_update(a, "DELETE FROM order_items")
    rid = wait_pending(b)[0]["id"]
    body = json.dumps({"reason": "not on a Friday"}).encode()
    auth = "Basic " + base64.b64encode(b"admin2:admin2-password").decode()
    r = urllib.request.Request(f"http://127.0.0.1:{port}/api/approvals/{rid}/deny", data=body, method="POST",
                               headers={"Authorization": auth, "Content-Type": "application/json"})
    with urllib.request.urlopen(r, timeout=10) as resp:
        assert json.loads(resp.read())["state"] == "denied"
    with pytest.raises(psycopg.errors.InsufficientPrivilege, match="denied by reviewer admin2: not on a Friday"):
        job.result()
    assert pg.psql("SELECT count(*) FROM order_items", dbname=shop).strip() != "0"
    assert price_sum(pg, shop) == before


def test_a_grant_made_on_one_gateway_lets_the_same_shape_run_on_the_other(pg, shop, make_gw):
    a, b = make_gw("gw-a"), make_gw("gw-b")
    job = held_update(b, "UPDATE products SET price = price + 0")
    rid = wait_pending(a)[0]["id"]
    with console(a) as c:
        c.execute(f"APPROVE {rid} FOR '10 minutes'")
    assert job.result() > 0
    deadline = time.monotonic() + 15
    while True:  # the grant reaches B's mirror through the store
        with console(b) as c:
            grants = rows(c, "GRANTS")
        if grants:
            break
        assert time.monotonic() < deadline, "the grant never reached the other gateway"
        time.sleep(0.05)
    with psycopg.connect(b.dsn(user="ann", dbname="shop"), autocommit=True) as conn:
        # same shape, other constant: runs at once under the grant, nothing is held
        assert conn.execute("UPDATE products SET price = price + 0.00").rowcount > 0
    assert approvals(a, "pending") == [] and approvals(b, "pending") == []


def test_two_reviewers_deciding_at_once_on_two_gateways_cannot_both_win(pg, shop, make_gw):
    a, b = make_gw("gw-a"), make_gw("gw-b")
    before = price_sum(pg, shop)
    job = held_update(a)
    rid = wait_pending(b)[0]["id"]
    wait_pending(a)
    outcomes: dict[str, str] = {}
    go = threading.Barrier(2)

    def decide(g, user, sql):
        with console(g, user) as c:
            go.wait(10)
            try:
                c.execute(sql)
                outcomes[user] = "ok"
            except psycopg.Error as e:
                outcomes[user] = str(e)

    ts = [threading.Thread(target=decide, args=(a, "admin", f"APPROVE {rid}")),
          threading.Thread(target=decide, args=(b, "admin2", f"DENY {rid} 'no'"))]
    for t in ts:
        t.start()
    for t in ts:
        t.join(30)
    winners = [u for u, o in outcomes.items() if o == "ok"]
    assert len(winners) == 1, outcomes
    loser = next(u for u in outcomes if u not in winners)
    assert "already" in outcomes[loser]
    if winners == ["admin"]:
        assert job.result() > 0 and price_sum(pg, shop) != before
        state = "approved"
    else:
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="denied by reviewer admin2"):
            job.result()
        assert price_sum(pg, shop) == before
        state = "denied"
    for g in (a, b):
        assert wait_for(g, rid, state)["decided_by"] == winners[0]


def test_a_store_that_cannot_be_written_refuses_the_held_statement(pg, shop, make_gw):
    a = make_gw("gw-a")
    before = price_sum(pg, shop)
    pg.execute("ALTER ROLE approvals NOLOGIN")
    pg.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = 'approvals'")
    with psycopg.connect(a.dsn(user="ann", dbname="shop"), autocommit=True) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="approvals store is unreachable"):
            conn.execute("UPDATE products SET price = price + 1")
        assert conn.execute("SELECT count(*) FROM products").fetchone()[0] > 0  # the session goes on
    assert price_sum(pg, shop) == before
    assert "could not be stored" in a.log()
    # the store back: the gateway listens again and holds statements as before
    pg.execute("ALTER ROLE approvals LOGIN")
    a.wait_log("LISTEN connection back", timeout=20)
    job = held_update(a)
    rid = wait_pending(a)[0]["id"]
    with console(a) as c:
        c.execute(f"DENY {rid} 'later'")
    with pytest.raises(psycopg.errors.InsufficientPrivilege, match="denied by reviewer admin"):
        job.result()


def test_a_gateway_that_restarts_withdraws_what_it_left_pending(pg, shop, make_gw):
    a, b = make_gw("gw-a"), make_gw("gw-b")
    before = price_sum(pg, shop)
    proc = subprocess.Popen(["psql", "-X", "-d", a.dsn(user="ann", dbname="shop"), "-c",
                             "UPDATE products SET price = price + 1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    rid = wait_pending(b)[0]["id"]
    a.signal(signal.SIGKILL)  # gone without a word: its request stays pending in the store
    a.proc.wait(10)
    proc.communicate(timeout=30)
    assert wait_pending(b)[0]["id"] == rid
    a.start()  # the same gateway name comes back
    gone = wait_for(b, rid, "withdrawn")
    assert "restarted" in gone["outcome"]
    # approving it now changes nothing: it was withdrawn, and nothing runs later on its own
    with console(b, "admin2") as c:
        with pytest.raises(psycopg.Error, match="already withdrawn"):
            c.execute(f"APPROVE {rid}")
    assert price_sum(pg, shop) == before


def test_a_gateway_whose_store_is_unreachable_starts_and_refuses_only_what_a_rule_holds(pg, shop, gw_factory):
    g = gw_factory(settings={**BASE, "approvals_store": f"host=127.0.0.1 port={pg.port} dbname=nowhere user=nobody"},
                   users=USERS, databases={"shop": upstream_entry(pg, shop)})
    g.wait_log("approvals_store unreachable")
    with psycopg.connect(g.dsn(user="ann", dbname="shop"), autocommit=True) as conn:
        assert conn.execute("SELECT count(*) FROM products").fetchone()[0] > 0
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="approvals store is unreachable"):
            conn.execute("DELETE FROM order_items")
    with console(g) as c:
        with pytest.raises(psycopg.Error, match="approvals store is unreachable"):
            c.execute("APPROVE deadbeef")
    assert pg.psql("SELECT count(*) FROM order_items", dbname=shop).strip() != "0"


def test_the_store_connection_string_is_never_shown(make_gw):
    a = make_gw("gw-a")
    with console(a) as c:
        cfg = {r["key"]: r["value"] for r in rows(c, "CONFIG")}
    assert "store-secret" not in json.dumps(cfg)
    assert "store-secret" not in a.log()

