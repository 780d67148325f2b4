"""The reviewers' HTTP API, event stream, page and command line (approvals_listen): reviewers
sign in with a token of an approver group (the login verifier) or as an admin console user;
requesters, non-reviewers, malformed requests and unknown ids get clear errors."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import psycopg
import pytest

from pooler.pgcluster import seed_demo
from tests.conftest import upstream_entry
from tests.gwproc import free_port
from tests.idp import AUDIENCE, ISSUER, Idp
from tests.test_approvals import Background

REPO = Path(__file__).resolve().parent.parent
USERS = {"ann": "groups=analysts", "admin": "groups=admins"}


@pytest.fixture(scope="module")
def shop(pg):
    seed_demo(pg, "approval_api_shop")
    return "approval_api_shop"


@pytest.fixture(scope="module")
def idp(tmp_path_factory):
    return Idp(tmp_path_factory.mktemp("approvals-idp"))


@pytest.fixture
def api_gw(pg, shop, idp, gw_factory):
    port = free_port()
    g = gw_factory(settings={"rules_dir": str(REPO / "rules"), "admin_users": "admin",
                             "approvals_listen": f"127.0.0.1:{port}", "approver_groups": "reviewers",
                             "jwt_jwks": str(idp.jwks_path), "jwt_issuer": ISSUER, "jwt_audience": AUDIENCE},
                   users=USERS, auth_users={"admin": "admin-password"},
                   databases={"shop": upstream_entry(pg, shop)})
    g.api = f"http://127.0.0.1:{port}"
    return g


def call(g, method: str, path: str, auth: str | None = None, body=None, raw: bytes | None = None):
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(g.api + path, method=method, data=data,
                                 headers={"Authorization": auth} if auth else {})
    try:
        with urllib.request.urlopen(req, timeout=15) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def bearer(idp, sub: str, groups) -> str:
    return "Bearer " + idp.token(sub=sub, groups=groups)


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def held(g, sql: str = "DELETE FROM order_items", user: str = "ann"):
    job = Background(lambda: psycopg.connect(g.dsn(user=user, dbname="shop"), autocommit=True).execute(sql).rowcount)
    deadline = time.monotonic() + 15
    auth = basic("admin", "admin-password")
    while True:
        status, data = call(g, "GET", "/api/approvals", auth)
        assert status == 200, data
        if data["pending"]:
            return job, data["pending"][0]
        assert time.monotonic() < deadline, "nothing was held"
        time.sleep(0.05)


def test_a_reviewer_token_approves_over_the_api(pg, shop, idp, api_gw):
    job, req = held(api_gw, "UPDATE products SET price = price + 0")
    assert req["pretty_sql"] == "UPDATE products\nSET price = price + 0"
    assert req["tables_written"] == ["public.products"] and req["user"] == "ann"
    # who may not decide
    assert call(api_gw, "GET", "/api/approvals")[0] == 401
    status, err = call(api_gw, "POST", f"/api/approvals/{req['id']}/approve", bearer(idp, "mallory", ["agents"]))
    assert status == 403 and "not in an approver group" in err["error"]
    status, err = call(api_gw, "POST", f"/api/approvals/{req['id']}/approve", bearer(idp, "ann", ["reviewers"]))
    assert status == 403 and "nobody approves their own statement" in err["error"]
    status, err = call(api_gw, "POST", f"/api/approvals/{req['id']}/approve", "Bearer not.a.token")
    assert status == 401 and "token refused" in err["error"]
    status, err = call(api_gw, "POST", f"/api/approvals/{req['id']}/approve", basic("admin", "wrong"))
    assert status == 401
    # a malformed body, an unknown id
    status, err = call(api_gw, "POST", f"/api/approvals/{req['id']}/approve", bearer(idp, "rita", ["reviewers"]),
                       raw=b"{nope")
    assert status == 400 and "not JSON" in err["error"]
    status, err = call(api_gw, "POST", "/api/approvals/deadbeef/approve", bearer(idp, "rita", ["reviewers"]))
    assert status == 404
    # the reviewer decides
    status, r = call(api_gw, "POST", f"/api/approvals/{req['id']}/approve", bearer(idp, "rita", ["reviewers"]), {})
    assert status == 200 and r["state"] == "approved" and r["decided_by"] == "rita"
    assert job.result() > 0
    status, err = call(api_gw, "POST", f"/api/approvals/{req['id']}/deny", bearer(idp, "rita", ["reviewers"]),
                       {"reason": "too late"})
    assert status == 409 and "already approved by rita" in err["error"]


def test_an_admin_user_denies_with_basic_and_the_agent_reads_the_reason(pg, shop, api_gw):
    job, req = held(api_gw)
    status, err = call(api_gw, "POST", f"/api/approvals/{req['id']}/deny", basic("admin", "admin-password"), {})
    assert status == 400 and "reason" in err["error"]
    status, r = call(api_gw, "POST", f"/api/approvals/{req['id']}/deny", basic("admin", "admin-password"),
                     {"reason": "use a WHERE clause"})
    assert status == 200 and r["state"] == "denied"
    with pytest.raises(psycopg.errors.InsufficientPrivilege, match="denied by reviewer admin: use a WHERE clause"):
        job.result()
    assert pg.psql("SELECT count(*) FROM order_items", dbname=shop).strip() != "0"


def test_the_event_stream_tells_of_new_and_decided_requests(idp, api_gw):
    req = urllib.request.Request(api_gw.api + "/api/events", headers={"Authorization": bearer(idp, "rita", ["reviewers"])})
    resp = urllib.request.urlopen(req, timeout=20)
    events = []

    def read():
        for raw in resp:
            line = raw.decode()
            if line.startswith("data: "):
                events.append(json.loads(line[6:]))
                if len(events) == 2:
                    return

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    job, r = held(api_gw)
    call(api_gw, "POST", f"/api/approvals/{r['id']}/deny", bearer(idp, "rita", ["reviewers"]), {"reason": "no"})
    reader.join(15)
    resp.close()
    assert [(e["event"], e["request"]["id"]) for e in events] == [("new", r["id"]), ("denied", r["id"])]
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        job.result()


def test_the_command_line_lists_and_approves(pg, shop, idp, api_gw):
    job, r = held(api_gw, "UPDATE products SET price = price + 0")
    env = dict(os.environ, POOLER_TOKEN=idp.token(sub="rita", groups=["reviewers"]), POOLER_APPROVALS_URL=api_gw.api)
    cli = [sys.executable, "-m", "pooler", "approvals"]
    out = subprocess.run(cli + ["list", "--full"], capture_output=True, text=True, env=env, timeout=30)
    assert out.returncode == 0, out.stderr
    assert r["id"] in out.stdout and "rules/30_bulk_writes.star" in out.stdout and "SET price = price + 0" in out.stdout
    bad = subprocess.run(cli + ["approve", "deadbeef"], capture_output=True, text=True, env=env, timeout=30)
    assert bad.returncode == 1 and "does not exist (HTTP 404)" in bad.stderr
    ok = subprocess.run(cli + ["approve", r["id"], "--for", "10 minutes"], capture_output=True, text=True, env=env,
                        timeout=30)
    assert ok.returncode == 0 and f"approved {r['id']} (grant " in ok.stdout, ok.stderr
    assert job.result() > 0
    grants = subprocess.run(cli + ["grants"], capture_output=True, text=True, env=env, timeout=30)
    assert "active" in grants.stdout and "ann@shop" in grants.stdout and "by rita" in grants.stdout
    nobody = subprocess.run(cli + ["list"], capture_output=True, text=True, timeout=30,
                            env=dict(env, POOLER_TOKEN=""))
    assert nobody.returncode == 1 and "sign in with --token" in nobody.stderr


def test_the_page_is_served_self_contained(api_gw):
    with urllib.request.urlopen(api_gw.api + "/", timeout=10) as r:
        page = r.read().decode()
        assert r.headers["Content-Type"].startswith("text/html")
    assert "/api/approvals" in page and "/api/events" in page and "<script src" not in page
