"""A Bind that must wait for a server (another client's transaction holds the pool's only one),
through a real gateway recording the session: it is recorded once, and every result after it is
attributed to its own statement."""

from __future__ import annotations

import socket
import time

import psycopg
import pytest

from tests.recording_helpers import of, recording_gw, wait_logged_out
from tests.wire import SYNC, Raw, bind, errors, execute, parse, query


def _wait_for_the_server(g, then=None) -> None:
    """Until a client waits for the server; then ``then()`` and one more round trip to the
    console: what ``then`` sent was in the gateway's socket before that question was, so the
    gateway has read it by the time the answer is here."""
    with psycopg.connect(g.dsn(user="admin", dbname="pgbouncer"), autocommit=True, prepare_threshold=None) as c:
        deadline = time.monotonic() + 15
        while not any(r[0] == "postgres" and r[3] == 1 for r in c.execute("SHOW POOLS").fetchall()):  # cl_waiting
            assert time.monotonic() < deadline, "the client never waited for the server"
        if then is not None:
            then()
            c.execute("SHOW POOLS").fetchall()


@pytest.mark.parametrize("named", [True, False], ids=["bind-of-a-named-statement", "parse-bind-execute-unit"])
def test_a_bind_that_waits_for_a_server_is_recorded_once(gw_factory, tmp_path, named):
    """Bind, Execute, Sync of a named statement (or an unnamed Parse, Bind, Execute, Sync unit,
    with a Query arriving while it waits) that must wait for a server, another client's
    transaction holding the only one: recorded as one bind, each result attributed to its own
    statement (a Bind told twice shifted every result after it)."""
    g, d = recording_gw(gw_factory, tmp_path, default_pool_size=1, admin_users="admin")
    b = Raw(g, "postgres", "postgres")
    b.s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # (Nagle would hold the Query back)
    if named:
        assert not errors(b.run(parse(b"s1", "SELECT 41 + 1"), SYNC))
    a = Raw(g, "postgres", "postgres")
    assert not errors(a.run(query("BEGIN")))  # holds the pool's only server
    if named:
        b.send(bind(b"", b"s1"), execute(b""), SYNC)
    else:
        b.send(parse(b"", "SELECT 41 + 1"), bind(b"", b""), execute(b""), SYNC)
    # an unnamed unit: a Query comes while it waits (read before the server is free)
    _wait_for_the_server(g, None if named else (lambda: b.send(query("SELECT 7 AS seven"))))
    assert not errors(a.run(query("COMMIT")))
    got = b.until_ready()
    assert [body for t, body in got if t == b"D"] == [b"\x00\x01\x00\x00\x00\x0242"]
    got = b.until_ready() if not named else b.run(query("SELECT 7 AS seven"))
    assert [body for t, body in got if t == b"D"] == [b"\x00\x01\x00\x00\x00\x017"]
    b.close()
    a.close()
    s = next(x for x in wait_logged_out(d, 2) if any(st["sql"] == "SELECT 41 + 1" for st in of(x, "stmt")))
    binds = [e for e in s["events"] if e["t"] == "bind"]
    assert [(e["stmt"], e["q"]) for e in binds] == [("s1" if named else "", 1)]
    assert {e["q"]: e["tag"] for e in of(s, "done")} == {1: "SELECT 1", 2: "SELECT 1"}
    assert {e["q"]: e["rows"] for e in of(s, "rows")} == {1: [["42"]], 2: [["7"]]}
