"""Properties of the sans-I/O protocol layer (pooler/protocol/), checked with hypothesis over
generated input:

- every parser, given any bytes, returns its messages or raises ProtocolError, never another
  exception (the gateway turns a ProtocolError into 08P01 for that session alone; anything else
  would be an internal error);
- the frame check (frontend.frame_error) answers for any type byte and length;
- what the builders make, the parsers read back (startup packet, RowDescription, DataRow,
  ErrorResponse, Bind names).

How the gateway frames a live byte stream split anywhere is checked end to end in
tests/test_stream_splits.py.
"""

from __future__ import annotations

import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pooler.protocol import frontend
from pooler.protocol import messages as m

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

PARSERS = [m.parse_startup_packet, m.parse_error_fields, m.parse_parameter_status, m.parse_bind_statement,
           m.parse_authentication, m.parse_sasl_initial_response, m.parse_sasl_mechanisms, m.parse_command_tag,
           m.parse_row_description, m.parse_data_row]

# bytes that look like protocol: short fields, NULs, lengths, high bytes
protocolish = st.lists(st.one_of(
    st.binary(max_size=12),
    st.just(b"\x00"),
    st.integers(-2, 70000).map(lambda n: struct.pack("!i", n)),
    st.integers(-2, 40).map(lambda n: struct.pack("!h", n)),
    st.sampled_from([b"\xff\xfe", b"\xc3", b"SCRAM-SHA-256\x00", b"user\x00", b"\x00\x03\x00\x00"]),
), max_size=12).map(b"".join)


def _parse_or_protocol_error(parser, data) -> None:
    try:
        parser(data)
    except m.ProtocolError:
        pass


@FAST
@given(st.sampled_from(PARSERS), st.one_of(st.binary(max_size=200), protocolish))
def test_any_bytes_give_a_message_or_a_protocol_error(parser, data):
    _parse_or_protocol_error(parser, data)


@FAST
@given(st.sampled_from([m.parse_row_description, m.parse_data_row, m.parse_error_fields]), protocolish)
def test_parsers_that_take_memoryviews_behave_alike(parser, data):
    """The replies loop hands parsers slices of its receive buffer as memoryviews."""
    def outcome(x):
        try:
            return ("ok", parser(x))
        except m.ProtocolError as e:
            return ("error", str(e))
    assert outcome(memoryview(b"--" + data + b"--")[2:-2]) == outcome(data)


@FAST
@given(st.integers(0, 255), st.integers(-(2 ** 31), 2 ** 31 - 1), st.integers(4, 1 << 30))
def test_the_frame_check_answers_for_any_type_and_length(t, length, max_packet):
    why = frontend.frame_error(t, length, max_packet)
    assert why is None or isinstance(why, str)
    if why is None:  # a frame it accepts is one the session's scan may read
        assert t in frontend.MIN_LENGTH and frontend.MIN_LENGTH[t] <= length <= max_packet


names = st.text(st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",)), min_size=1, max_size=20)
values = st.text(st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",)), max_size=40)


@FAST
@given(st.dictionaries(names, values, max_size=6))
def test_a_built_startup_packet_reads_back(params):
    pkt = m.startup_message(params)
    (length,) = struct.unpack("!i", pkt[:4])
    assert length == len(pkt)
    got = m.parse_startup_packet(pkt[4:])
    assert (got.kind, got.version, got.params) == ("startup", m.PROTOCOL_3_0, params)


@FAST
@given(protocolish)
def test_any_startup_body_gives_a_packet_or_a_protocol_error(body):
    try:
        got = m.parse_startup_packet(body)
    except m.ProtocolError:
        return
    assert got.kind in ("startup", "ssl", "gssenc", "cancel")


@FAST
@given(st.lists(st.tuples(names, st.sampled_from("siqNTb")), max_size=8))
def test_a_built_row_description_reads_back(columns):
    body = m.row_description(columns)[5:]
    got = m.parse_row_description(body)
    assert [f.name.decode() for f in got] == [name for name, _ in columns]


@FAST
@given(st.lists(st.one_of(st.none(), st.binary(max_size=30)), max_size=10))
def test_a_data_row_reads_back(vals):
    body = struct.pack("!h", len(vals)) + b"".join(
        b"\xff\xff\xff\xff" if v is None else struct.pack("!i", len(v)) + v for v in vals)
    assert m.parse_data_row(body) == vals
    for cut in range(len(body)):  # a DataRow cut anywhere is malformed, never misread
        try:
            got = m.parse_data_row(body[:cut])
        except m.ProtocolError:
            continue
        assert got != vals


@FAST
@given(st.dictionaries(st.sampled_from("SVCMDHPWF"), values, min_size=1, max_size=6))
def test_an_error_response_reads_back(fields):
    body = m.build_error_from_fields(fields)[5:]
    assert m.parse_error_fields(body) == fields


@FAST
@given(st.binary(max_size=20).filter(lambda b: b"\x00" not in b), st.binary(max_size=20).filter(lambda b: b"\x00" not in b))
def test_bind_names_read_back(portal, stmt):
    body = m.bind(portal, stmt, [b"1", None], [0, 0])[5:]
    got_portal, got_stmt, start, after = m.parse_bind_statement(body)
    assert (got_portal, got_stmt) == (portal, stmt)
    assert body[start:after - 1] == stmt
