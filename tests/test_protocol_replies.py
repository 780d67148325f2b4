"""Through the gateway a raw protocol session gets PostgreSQL's own replies, message for message,
while its server passes between identities (transaction pooling, one server): errors that skip
to Sync (a simple Query skipped with them), pipelines, Describe, Flush without Sync, empty
queries, suspended portals, Close, and every way into and out of the fast lanes. A request
waiting for a server keeps what follows it in order, and a malformed message in a batch closes
only its own session."""

from __future__ import annotations

import os
import socket

import pytest

from pooler.protocol import messages as m
from tests.conftest import identities_gw
from tests.wire import FLUSH as H, SYNC as S, RawConn, msg
from tests.wire import bind as B, close as C, describe as D, execute as E, parse as P  # short, for SCENARIOS


# --------------------------------------------------------------------------- replies match PostgreSQL's


SCENARIOS = {
    "error_then_more_before_sync": [
        (P(b"", b"SELECT 1/0") + B() + E() + H, 1, b"E"),
        (B() + E() + S, 1, b"Z"),
        (P(b"", b"SELECT 7") + B() + E() + S, 1, b"Z"),
    ],
    "query_sent_while_skipping_to_sync": [
        (P(b"", b"SELECT 1/0") + B() + E() + H, 1, b"E"),
        (B() + E() + m.query("SELECT 'ignored'") + S, 1, b"Z"),
        (m.query("SELECT 8"), 1, b"Z"),
    ],
    "pipeline_error_middle": [
        (P(b"", b"SELECT 1") + B() + E() + P(b"", b"SELECT 1/0") + B() + E() + P(b"", b"SELECT 3") + B() + E() + S
         + P(b"", b"SELECT 4") + B() + E() + S, 2, b"Z"),
    ],
    "describe_sync_only": [
        (P(b"st1", b"SELECT 5 AS a") + S, 1, b"Z"),
        (D(b"S", b"st1") + S, 1, b"Z"),
        (D(b"S", b"st1") + D(b"S", b"st1") + S + S + S, 3, b"Z"),
        (B(b"", b"st1") + D(b"P") + E() + S, 1, b"Z"),
        (S, 1, b"Z"),
    ],
    "flush_without_sync": [
        (P(b"st2", b"SELECT 2 AS b") + D(b"S", b"st2") + H, 1, b"T"),
        (B(b"", b"st2") + E() + H, 1, b"C"),
        (B(b"", b"st2") + E() + S, 1, b"Z"),
    ],
    "empty_queries": [
        (m.query(""), 1, b"Z"),
        (P(b"", b"") + B() + D(b"P") + E() + S, 1, b"Z"),
        (m.query(";"), 1, b"Z"),
        (P(b"e1", b"") + B(b"", b"e1") + E() + S, 1, b"Z"),
    ],
    "portal_suspended": [
        (m.query("BEGIN"), 1, b"Z"),
        (P(b"", b"SELECT generate_series(1,5)") + B(b"p1") + E(b"p1", 2) + E(b"p1", 2) + S, 1, b"Z"),
        (E(b"p1", 0) + S + S, 2, b"Z"),
        (m.query("COMMIT"), 1, b"Z"),
    ],
    "sync_in_transaction": [
        (m.query("BEGIN"), 1, b"Z"),
        (S + S, 2, b"Z"),
        (P(b"", b"SELECT 1/0") + B() + E() + S + S, 2, b"Z"),
        (S, 1, b"Z"),
        (m.query("ROLLBACK"), 1, b"Z"),
    ],
    "close_and_errors": [
        (P(b"c1", b"SELECT 1") + C(b"S", b"c1") + C(b"S", b"c1") + C(b"P", b"nope") + S, 1, b"Z"),
        (P(b"c2", b"SELEC 1") + B(b"", b"c2") + E() + S, 1, b"Z"),
        (P(b"c2", b"SELECT 2") + B(b"", b"c2") + E() + S, 1, b"Z"),
    ],
    # the fast lanes (a lone Query, an unnamed Parse/Bind/Describe/Execute/Sync batch; a small
    # reply of plain messages) and every way out of them to the general loop
    "fast_lanes": [
        (m.query("SELECT 1"), 1, b"Z"),
        (P(b"", b"SELECT 2") + B() + D(b"P") + E() + S, 1, b"Z"),
        (P(b"", b"SELECT 3") + D(b"S") + B() + E() + B() + E() + S, 1, b"Z"),
        (m.query("SELECT 4; SELECT 5"), 1, b"Z"),
        (m.query("SET application_name = 'fastlane'"), 1, b"Z"),  # a ParameterStatus
        (m.query("DO $$BEGIN RAISE NOTICE 'n'; END$$"), 1, b"Z"),  # a NoticeResponse
        (m.query("SELECT length(repeat('x', 40000)), repeat('y', 20000) = repeat('y', 20000)"), 1, b"Z"),
        (m.query("SELECT count(*) FROM (SELECT generate_series(1, 3000)) s"), 1, b"Z"),
        (P(b"", b"SELEC 6") + B() + E() + S, 1, b"Z"),
        (P(b"", b"SELECT 7") + B() + E() + S, 1, b"Z"),
        (m.query("BEGIN"), 1, b"Z"),
        (P(b"", b"SELECT 8") + B() + E() + S, 1, b"Z"),
        (B() + E() + S, 1, b"Z"),  # the unnamed statement again, without Parse (same server)
        (m.query("SELECT 9"), 1, b"Z"),
        (m.query("COMMIT"), 1, b"Z"),
        (m.query("SELECT 1/0"), 1, b"Z"),
        (P(b"", b"SELECT 10") + B() + E() + S + m.query("SELECT 11"), 2, b"Z"),
    ],
}


def _run(conn, scenario):
    got = []
    for data, count, until in scenario:
        conn.s.sendall(data)
        got.append(conn.replies(count, until))
    return got


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_protocol_replies_match_postgresql(pg, gw_factory, name):
    gw = identities_gw(gw_factory, pg, size=1)
    scenario = SCENARIOS[name]
    s = socket.socket(socket.AF_UNIX)
    s.connect(os.path.join(pg.socket_dir, f".s.PGSQL.{pg.port}"))
    direct = RawConn(s, pg.superuser)
    want = _run(direct, scenario)
    direct.close()
    others = [RawConn(socket.create_connection((gw.host, gw.port)), u) for u in ("u2", "u3")]
    for rnd in range(2):
        via = RawConn(socket.create_connection((gw.host, gw.port)), "u1")
        for o in others:  # another identity takes the server in between: the next link resets it
            o.s.sendall(m.query("SELECT 1"))
            o.replies(1)
        got = _run(via, scenario)
        assert got == want, (rnd, gw.log()[-2000:])
        via.s.sendall(m.query("SELECT 'alive'"))
        assert via.replies(1) == ["T", "D[b'alive']", "CSELECT 1", "ZI"]


def test_query_ignored_while_skipping_to_sync_does_not_keep_the_server(pg, gw_factory):
    """After an extended-protocol error PostgreSQL ignores everything up to Sync, simple Query
    included: its ReadyForQuery answers the Sync. The gateway must not take it for the Query's
    (queue off by one: the server is never given back, later replies are matched to the wrong
    requests)."""
    gw = identities_gw(gw_factory, pg, size=1)
    via = RawConn(socket.create_connection((gw.host, gw.port)), "u1")
    _run(via, SCENARIOS["query_sent_while_skipping_to_sync"])
    other = RawConn(socket.create_connection((gw.host, gw.port)), "u2")
    other.s.settimeout(5)
    other.s.sendall(m.query("SELECT 'other'"))
    try:
        got = other.replies(1)
    except TimeoutError:
        got = "timed out: the server is still linked to u1"
    assert got == ["T", "D[b'other']", "CSELECT 1", "ZI"]
    via.close()
    other.close()


# --------------------------------------------------------------------------- the fast lanes


def test_fast_lane_units_wait_for_a_server_and_keep_what_follows(pg, gw_factory):
    """A lone Query or an unnamed batch that waits for a server is sent as it was governed when
    the server comes; anything the client sent meanwhile follows it, in order."""
    gw = identities_gw(gw_factory, pg, size=1)
    a = RawConn(socket.create_connection((gw.host, gw.port)), "u1")
    b = RawConn(socket.create_connection((gw.host, gw.port)), "u1")
    c = RawConn(socket.create_connection((gw.host, gw.port)), "u2")
    a.s.sendall(m.query("BEGIN"))
    assert a.replies(1) == ["CBEGIN", "ZT"]
    b.s.sendall(P(b"", b"SELECT 'b1'") + B() + E() + S)  # waits: the only server is in a's transaction
    c.s.sendall(m.query("SELECT 'c1'"))  # waits too
    b.s.sendall(m.query("SELECT 'b2'"))  # arrives while b waits
    a.s.sendall(m.query("COMMIT"))
    assert a.replies(1) == ["CCOMMIT", "ZI"]
    assert b.replies(2) == ["1", "2", "D[b'b1']", "CSELECT 1", "ZI", "T", "D[b'b2']", "CSELECT 1", "ZI"]
    assert c.replies(1) == ["T", "D[b'c1']", "CSELECT 1", "ZI"]
    for conn in (a, b, c):
        conn.s.sendall(m.query("SELECT 'again'"))
        assert conn.replies(1) == ["T", "D[b'again']", "CSELECT 1", "ZI"]
        conn.close()


@pytest.mark.parametrize("bad", [
    msg(b"B", b""),  # a Bind too short to hold its names
    msg(b"E", b"\0"),  # an Execute without its row limit
    msg(b"D", b"P"),  # a Describe without its name
])
def test_malformed_message_in_a_batch_closes_only_that_session(pg, gw_factory, bad):
    gw = identities_gw(gw_factory, pg, size=1)
    other = RawConn(socket.create_connection((gw.host, gw.port)), "u2")
    via = RawConn(socket.create_connection((gw.host, gw.port)), "u1")
    via.s.sendall(P(b"", b"SELECT 1") + bad + S)
    got = []
    while True:
        try:
            t, body = via.read()
        except (AssertionError, OSError):  # closed
            break
        got.append((t, m.parse_error_fields(body).get("C") if t == b"E" else None))
        if t == b"Z":
            break
    assert (b"E", "08P01") in got, got
    other.s.sendall(m.query("SELECT 'still here'"))
    assert other.replies(1) == ["T", "D[b'still here']", "CSELECT 1", "ZI"]
