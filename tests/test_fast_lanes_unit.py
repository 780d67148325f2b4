"""The proxy loop's fast lanes, in memory: a client session and a server connection of a real
Gateway wired to recording transports (no sockets, no PostgreSQL), so that what reaches each
side, in which order, and what the gateway keeps track of can be checked byte for byte.
The same paths run end to end in test_protocol_replies.py (scenario "fast_lanes")."""

from __future__ import annotations

import asyncio
import struct
from pathlib import Path

import pytest

from pooler.config import Config, DatabaseConfig
from pooler.gateway.app import Gateway
from pooler.gateway.interfaces import R_BIND, R_DESCRIBE, R_EXECUTE, R_PARSE, R_QUERY, R_SYNC
from pooler.gateway.server import FAST_REPLY_MAX, S_IDLE, ServerConn
from pooler.gateway.session import C_READY, ClientSession
from pooler.protocol import messages as m


class Transport:
    def __init__(self, name: str, log: list) -> None:
        self.name, self.log = name, log
        self.closed = False

    def write(self, data: bytes) -> None:
        self.log.append((self.name, bytes(data)))

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def get_extra_info(self, key, default=None):
        return default


@pytest.fixture
def wired(tmp_path: Path):
    """A gateway (no rules) with one pool of one idle server and three clients."""
    asyncio.set_event_loop(asyncio.new_event_loop())  # Gateway() may look for a loop
    cfg = Config(path=tmp_path / "gateway.ini", pool_mode="transaction", auth_type="trust")
    gw = Gateway(cfg)
    pool = gw.get_pool(DatabaseConfig(name="db"), "u")
    pool.welcome = {}
    pool.connecting = 1_000  # no new servers: the clients share the one below
    log: list = []
    srv = ServerConn(pool)
    srv.transport = Transport("server", log)
    srv.state = S_IDLE
    pool.idle.append(srv)
    clients = []
    for i in range(3):
        c = ClientSession(gw)
        c.transport = Transport(f"client{i}", log)
        c.state = C_READY
        c.pool = pool
        c.mode = "transaction"
        c.rewrite = True
        c.user = "u"
        clients.append(c)
    yield srv, clients, log
    asyncio.get_event_loop().close()


def msg(t: bytes, body: bytes = b"") -> bytes:
    return t + struct.pack("!i", len(body) + 4) + body


def P(sql: bytes) -> bytes:
    return msg(b"P", b"\0" + sql + b"\0\0\0")


B = msg(b"B", b"\0\0" + b"\0\0\0\0\0\0")
DP = msg(b"D", b"P\0")
E = msg(b"E", b"\0" + b"\0\0\0\0")
S = msg(b"S")
BATCH = P(b"SELECT 1") + B + DP + E + S


def rows(*values: bytes) -> bytes:
    out = msg(b"T", b"\0\1a\0" + b"\0" * 18)
    for v in values:
        out += msg(b"D", b"\0\1" + struct.pack("!i", len(v)) + v)
    return out + m.command_complete(f"SELECT {len(values)}")


READY_I = m.ready_for_query(m.TX_IDLE)
READY_T = m.ready_for_query(ord("T"))


def test_lone_query_is_sent_as_is_and_the_reply_frees_the_server(wired):
    srv, (a, _, _), log = wired
    q = m.query("SELECT 1")
    a.data_received(q)
    assert log == [("server", q)]
    assert [k for k, _ in srv.queue] == [R_QUERY] and a.server is srv
    reply = rows(b"1") + READY_I
    srv.data_received(reply)
    assert log[-1] == ("client0", reply)
    assert not srv.queue and a.server is None and srv.client is None and list(srv.pool.idle) == [srv]


def test_waiting_units_are_sent_whole_with_what_arrived_meanwhile(wired):
    srv, (a, b, c), log = wired
    a.data_received(m.query("BEGIN"))
    srv.data_received(m.command_complete("BEGIN") + READY_T)
    assert a.server is srv  # a keeps the only server
    b.data_received(BATCH)  # waits, governed
    c.data_received(m.query("SELECT 'c'"))  # waits, governed
    b.data_received(m.query("SELECT 'b2'"))  # arrives while b waits
    assert b.waiting and c.waiting and log[-1][0] == "client0"
    del log[:]
    a.data_received(m.query("COMMIT"))
    srv.data_received(m.command_complete("COMMIT") + READY_I)
    # the server went to b (first in line) before a's reply was written; b's batch and the
    # Query it sent while waiting both went, each with its queue entries
    assert log[0] == ("server", m.query("COMMIT"))
    assert log[1] == ("server", BATCH + m.query("SELECT 'b2'"))
    assert log[2] == ("client0", m.command_complete("COMMIT") + READY_I)
    assert [k for k, _ in srv.queue] == [R_PARSE, R_BIND, R_DESCRIBE, R_EXECUTE, R_SYNC, R_QUERY]
    first = m.PARSE_COMPLETE + m.BIND_COMPLETE + rows(b"b1") + READY_I
    second = rows(b"b2") + READY_I
    srv.data_received(first)  # not the last ReadyForQuery the queue waits for: b keeps the server
    assert srv.client is b and [k for k, _ in srv.queue] == [R_QUERY]
    srv.data_received(second)
    assert log[-2:] == [("server", m.query("SELECT 'c'")), ("client1", second)]
    assert srv.client is c


def test_a_reply_with_two_ready_for_query_goes_through_the_general_loop(wired):
    srv, (a, _, _), log = wired
    a.data_received(BATCH + BATCH)
    reply = (m.PARSE_COMPLETE + m.BIND_COMPLETE + rows(b"1") + READY_I) * 2
    srv.data_received(reply)
    assert b"".join(d for who, d in log if who == "client0") == reply
    assert not srv.queue and srv.client is None


def test_parameter_status_in_a_small_reply_is_followed(wired):
    srv, (a, _, _), log = wired
    a.data_received(m.query("SET application_name = 'x'"))
    reply = m.command_complete("SET") + m.parameter_status("application_name", "fastlane") + READY_I
    srv.data_received(reply)
    assert a.params.get("application_name") == "fastlane"
    assert srv.params.get("application_name") == "fastlane"
    assert log[-1] == ("client0", reply)


@pytest.mark.parametrize("tag", ["DEALLOCATE ALL", "DISCARD ALL", "PREPARE", "COMMIT"])
def test_command_tags_the_gateway_acts_on_leave_the_fast_lane(wired, tag):
    srv, (a, _, _), log = wired
    a.book.stmts[b"s1"] = (b"S_1", b"body")
    a.data_received(m.query("SELECT 1"))
    srv.data_received(m.command_complete(tag) + READY_I)
    if tag in ("DEALLOCATE ALL", "DISCARD ALL"):
        assert not a.book.stmts  # _check_tag saw it: the client's statements are gone
    else:
        assert a.book.stmts
    assert srv.client is None


@pytest.mark.parametrize("split", [1, 5, 9, 200])
def test_a_reply_cut_anywhere_is_forwarded_whole_once(wired, split):
    srv, (a, _, _), log = wired
    a.data_received(m.query("SELECT x"))
    reply = rows(b"v" * 300, b"w" * 300) + READY_I
    srv.data_received(reply[:split])
    assert srv.client is a  # not complete: the server stays
    srv.data_received(reply[split:])
    assert b"".join(d for who, d in log if who == "client0") == reply
    assert srv.client is None and not srv.queue


def test_large_replies_take_the_general_loop(wired):
    srv, (a, _, _), log = wired
    a.data_received(m.query("SELECT big"))
    reply = rows(*(b"x" * 1000 for _ in range(FAST_REPLY_MAX // 1000 + 2))) + READY_I
    assert len(reply) > FAST_REPLY_MAX
    srv.data_received(reply)
    assert b"".join(d for who, d in log if who == "client0") == reply
    assert srv.client is None


@pytest.mark.parametrize("bad", [msg(b"B", b""), msg(b"E", b"\0"), msg(b"D", b"P")])
def test_a_short_message_in_a_batch_is_left_to_the_general_loop(wired, bad):
    srv, (a, _, _), log = wired
    # the fast lane neither reads past the message nor acts: _pump reports it (end to end in
    # test_protocol_replies.py::test_malformed_message_in_a_batch_closes_only_that_session)
    assert a._unnamed_batch(P(b"SELECT 1") + bad + S) is False
    assert not log and not srv.queue and a.server is None


@pytest.mark.parametrize("tail", [b"", msg(b"B", b"\0\0\0\0\0\0\0\0") + msg(b"E", b"\0\0\0\0\0"),
                                  msg(b"S", b"x"), msg(b"P", b"\0SELECT 2\0\0\0") + S])
def test_only_a_batch_ended_by_one_sync_is_a_unit(wired, tail):
    srv, (a, _, _), log = wired
    # without its Sync the server waits for one in an implicit transaction: _pump follows that
    # (end to end in test_protocol_fuzz.py::test_an_unsynced_batch_in_one_read_...)
    assert a._unnamed_batch(P(b"SELECT 1") + tail) is False
    assert not log and not srv.queue and a.server is None


def test_deallocate_is_not_taken_by_the_fast_lane(wired):
    srv, (a, _, _), log = wired
    a.book.stmts[b"s1"] = (b"S_1", b"body")
    a.data_received(m.query("DEALLOCATE s1"))
    # answered by the gateway itself (the client's view of its statements): no server involved
    assert not any(who == "server" for who, _ in log)
    assert b"".join(d for _, d in log) == m.command_complete("DEALLOCATE") + READY_I
    assert b"s1" not in a.book.stmts
