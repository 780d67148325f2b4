"""A real recording for the replay tests: the shipped rules in front of a demo shop, three
identities (an agent, an analyst, a pii-reader) doing what they do through psql and psycopg,
recorded by the gateway; and ``pooler`` run as a command on it."""

from __future__ import annotations

import os
import subprocess
import sys

import psycopg

from tests.conftest import upstream_entry
from tests.gwproc import REPO, GatewayProc
from tests.masking_helpers import USERS
from tests.recording_helpers import wait_logged_out

ESC_SQL = "SELECT 1 AS one -- \x1b[2J\x1b[31m<script>alert(1)</script>"  # terminal control and HTML in text

# what each identity runs, in order (the agent through psql, the others through psycopg)
AGENT = [
    "SELECT full_name, email FROM customers ORDER BY id LIMIT 2",  # masked
    "DELETE FROM customers WHERE id = 1",  # denied by 20_agents.star
    "DELETE FROM orders WHERE id = 1",  # denied (another table)
    "SELECT count(*) FROM products",  # allowed
    ESC_SQL,
]
ANALYST = [
    ("SELECT name FROM products WHERE id = %s", (1,)),  # extended, a parameter
    ("SELECT email FROM customers WHERE id = %s", (2,)),  # masked
    ("SELECT 1/0", None),  # a server error
]
DBA = ["SELECT email FROM customers ORDER BY id LIMIT 1"]  # a pii-reader: not masked


def start_recording_gateway(pg, db: str, workdir, **settings) -> tuple[GatewayProc, object]:
    rec = workdir / "rec"
    s = {"rules_dir": str(REPO / "rules"), "mask_hash_key": "test-key", "record_dir": str(rec),
         "record_fsync": "always", "pool_mode": "transaction"}
    s.update(settings)
    g = GatewayProc({"shop": upstream_entry(pg, db)}, settings=s, users=USERS, workdir=str(workdir)).start()
    return g, rec


def record_demo_sessions(g: GatewayProc, rec) -> list[dict]:
    """Run the three sessions one after the other; -> the recorded sessions, in start order."""
    args = ["psql", g.dsn(user="agent", dbname="shop", application_name="agent-psql"), "-X", "-q",
            "-v", "ON_ERROR_STOP=0"]
    for sql in AGENT:
        args += ["-c", sql]
    r = subprocess.run(args, capture_output=True, text=True, timeout=60)
    assert "agents may only read data" in r.stderr, r.stderr
    with psycopg.connect(g.dsn(user="ann", dbname="shop"), autocommit=True) as c:
        for sql, params in ANALYST:
            try:
                c.execute(sql, params, prepare=False)
            except psycopg.errors.DivisionByZero:
                pass
    wait_logged_out(rec, 2)
    with psycopg.connect(g.dsn(user="dba", dbname="shop"), autocommit=True) as c:
        c.execute(DBA[0])
    return wait_logged_out(rec, 3)


def pooler(*args: str) -> subprocess.CompletedProcess:
    """``pooler ARGS`` run in this process (pooler.cli.main, as the console script calls it),
    stdout and stderr captured (not a terminal: no colour, no pager)."""
    import contextlib
    import io

    from pooler.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main(list(args))
        except SystemExit as e:
            rc = e.code if isinstance(e.code, int) else 1
            if isinstance(e.code, str):
                print(e.code, file=sys.stderr)
    return subprocess.CompletedProcess(["pooler", *args], rc, out.getvalue(), err.getvalue())


def pooler_process(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """``python -m pooler ARGS`` from this checkout, as a separate process."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("NO_COLOR", None)
    return subprocess.run([sys.executable, "-m", "pooler", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=REPO)
