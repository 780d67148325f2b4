"""However TCP cuts a client's byte stream, the gateway reads the same messages.

The gateway runs in this process (tests/inproc.py) in front of the real test cluster; each
client connects over a real socket, but its bytes are handed to the session's
``data_received`` in chunks hypothesis chooses (a read of one byte, a message cut in its
length field, a CopyData cut in two, several messages in one read ...), exactly as the event
loop would deliver them. The replies, read back over the socket, must be byte for byte those
of the same stream delivered whole. The same holds for the startup packet.
"""

from __future__ import annotations

import socket
import struct
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pooler.protocol import messages as m
from tests.conftest import upstream_entry
from tests.inproc import LiveGateway
from tests.wire import SYNC, Raw, bind, close, describe, execute, msg, parse, query

SPLITS = settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))

# units of a client's stream: (messages, ReadyForQuery messages they end with)
UNITS = [
    query("SELECT 1"),
    query("SELECT 'wide', repeat('x', 3000)"),
    query("BEGIN; SELECT 2; COMMIT"),
    query("SELECT 1/0"),
    query(""),
    parse("", "SELECT 40 + 2") + bind() + describe(b"P") + execute() + SYNC,
    parse("named", "SELECT 'n'") + bind("", "named") + execute() + close(b"S", "named") + SYNC,
    parse("", "SELEC oops") + bind() + execute() + SYNC,  # an error skips to Sync
    query("COPY split_copy FROM STDIN") + msg(b"d", b"a\nb\n") + msg(b"d", b"c" * 70000 + b"\n") + msg(b"c"),
    query("SELECT count(*) > 0 FROM pg_class"),
]


@pytest.fixture(scope="module")
def live(pg, tmp_path_factory):
    pg.execute("DROP TABLE IF EXISTS split_copy; CREATE TABLE split_copy (v text)")
    g = LiveGateway({"postgres": upstream_entry(pg)}, settings={"pool_mode": "transaction", "default_pool_size": "2"},
                    workdir=str(tmp_path_factory.mktemp("splits")))
    g.start()
    yield g
    g.stop()
    pg.execute("DROP TABLE IF EXISTS split_copy")


def _session_of(live, sock: socket.socket):
    """The gateway's ClientSession of this client socket."""
    port = sock.getsockname()[1]
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        found = live.call(lambda: [c for c in live.gw.clients if c.addr.endswith(f":{port}")])
        if found:
            return found[0]
        time.sleep(0.005)  # the listener has not accepted it yet: poll with a deadline
    raise AssertionError("the gateway never saw the connection")


def _replies(c: Raw, readies: int) -> list[tuple[bytes, bytes]]:
    out = []
    while readies:
        t, body = c.read()
        if t in (b"S", b"N"):  # ParameterStatus, notices: not part of the comparison
            continue
        out.append((t, body))
        if t == b"Z":
            readies -= 1
    return out


def _when_reading(live, session) -> None:
    """Wait (with a deadline) until the session reads again: the event loop never delivers a
    paused transport's bytes (the session pauses reading while it waits for a server with more
    than 64 kB buffered), so neither may the test."""
    deadline = time.monotonic() + 10
    while not live.call(lambda: session.closed or session.transport.is_reading()):
        assert time.monotonic() < deadline, "the session never resumed reading"
        time.sleep(0.002)


def _deliver(live, stream: bytes, cuts: list[int]) -> list[tuple[bytes, bytes]]:
    """Log in over a socket, hand ``stream`` to the session cut at ``cuts``, read the replies."""
    c = Raw(live, "postgres", "postgres")
    try:
        session = _session_of(live, c.s)
        c.s.settimeout(5)  # a stalled reply fails the example in seconds, not Raw's 20 s (shrinking retries it)
        bounds = [0, *sorted(set(cuts)), len(stream)]
        for a, b in zip(bounds, bounds[1:]):
            if b > a:
                _when_reading(live, session)
                live.call(session.data_received, stream[a:b])
        return _replies(c, _readies(stream))
    finally:
        c.close()


def _readies(stream: bytes) -> int:
    """How many ReadyForQuery the stream asks for: one per Query and per Sync."""
    n = pos = 0
    while pos < len(stream):
        t = stream[pos:pos + 1]
        (length,) = struct.unpack_from("!i", stream, pos + 1)
        if t in (b"Q", b"S"):
            n += 1
        pos += 1 + length
    return n


@SPLITS
@given(st.lists(st.sampled_from(UNITS), min_size=1, max_size=5), st.data())
def test_any_split_of_a_valid_stream_gives_the_same_replies(live, units, data):
    stream = b"".join(units)
    cuts = data.draw(st.lists(st.integers(1, len(stream) - 1), max_size=12) if len(stream) > 1 else st.just([]))
    whole = _deliver(live, stream, [])
    assert [t for t, _ in whole].count(b"Z") == _readies(stream)
    assert _deliver(live, stream, cuts) == whole


@settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.data())
def test_any_split_of_a_startup_packet_logs_in_alike(live, data):
    packet = m.startup_message({"user": "postgres", "database": "postgres", "application_name": "splits"})
    cuts = data.draw(st.lists(st.integers(1, len(packet) - 1), max_size=8))
    sock = socket.create_connection((live.host, live.port), timeout=20)
    c = Raw.__new__(Raw)
    c.s, c.buf = sock, b""
    try:
        session = _session_of(live, sock)
        bounds = [0, *sorted(set(cuts)), len(packet)]
        for a, b in zip(bounds, bounds[1:]):
            if b > a:
                _when_reading(live, session)
                live.call(session.data_received, packet[a:b])
        login = c.until_ready()
        assert login[0] == (b"R", b"\x00\x00\x00\x00")  # AuthenticationOk
        assert [t for t, _ in login if t not in (b"S",)] == [b"R", b"K", b"Z"]
        assert dict(m.parse_parameter_status(b) for t, b in login if t == b"S")["application_name"] == "splits"
        rows = c.run(query("SELECT 5"))
        assert [b for t, b in rows if t == b"D"] == [b"\x00\x01\x00\x00\x00\x015"]
    finally:
        c.close()


def test_a_sasl_mechanism_that_is_not_utf8_is_refused_as_unknown(pg, gw_factory):
    """Found by tests/test_protocol_properties.py: the name was decoded strictly, and the login
    ended with XX000 "internal error" (and a traceback in the log) instead of PostgreSQL's
    refusal of an unknown mechanism."""
    gw = gw_factory(settings={"auth_type": "scram-sha-256"}, auth_users={"alice": "alice-pw"})
    with socket.create_connection((gw.host, gw.port), timeout=20) as s:
        s.sendall(m.startup_message({"user": "alice", "database": "postgres"}))
        c = Raw.__new__(Raw)
        c.s, c.buf = s, b""
        t, body = c.read()
        assert t == b"R" and body[:4] == b"\x00\x00\x00\x0a"  # AuthenticationSASL
        s.sendall(m.password_message(b"\xff\xfe\x00" + struct.pack("!i", -1)))
        t, body = c.read()
        fields = m.parse_error_fields(body)
        assert t == b"E" and fields["C"] == "28000" and "invalid SASL authentication mechanism" in fields["M"]


@pytest.mark.parametrize("after", [query("SELECT 7"), parse("", "SELECT 7") + bind() + execute() + SYNC],
                         ids=["query", "extended"])
def test_requests_after_the_sync_that_ends_a_server_error_are_answered(pg, gw_factory, after):
    """Found by the property test above (a stream cut right after a failing Parse): PostgreSQL
    reports the Parse's error at once, before any Sync, so the gateway marks the server as
    skipping to the next Sync (ServerConn.awaiting_sync). The mark was cleared only when that
    Sync's ReadyForQuery came back, so the requests behind the Sync in the same read were
    skipped by the gateway too: the client got one ReadyForQuery, and waited for the rest."""
    gw = gw_factory(settings={"pool_mode": "transaction"})
    c = Raw(gw, "postgres", "postgres")
    try:
        c.send(parse("", "SELEC oops"))
        t, body = c.read()  # the error reached the client: the gateway has seen it
        assert t == b"E" and m.parse_error_fields(body)["C"] == "42601"
        c.s.settimeout(5)
        replies = c.run(bind() + execute() + SYNC + after)  # up to the Sync's ReadyForQuery
        assert [t for t, _ in replies] == [b"Z"]
        replies = c.until_ready()
        assert [b for t, b in replies if t == b"D"] == [b"\x00\x01\x00\x00\x00\x017"]
        assert not [t for t, _ in replies if t == b"E"]
    finally:
        c.close()
