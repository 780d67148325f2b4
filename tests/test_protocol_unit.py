"""Sans-I/O unit tests: message builders/parsers, startup packets, SCRAM/md5 verifiers."""

import base64
import hashlib
import hmac
import struct

import pytest

from pooler.auth.passwords import (
    ScramError, ScramSecret, ScramServer, md5_response, md5_secret, verify_md5,
)
from pooler.protocol import messages as m


def body_of(packet: bytes) -> bytes:
    """Startup-phase packet (int32 length + body) -> body."""
    (n,) = struct.unpack_from("!i", packet)
    assert n == len(packet)
    return packet[4:]


def test_startup_message_roundtrip():
    pkt = m.startup_message({"user": "alice", "database": "shop", "application_name": "psql"})
    sp = m.parse_startup_packet(body_of(pkt))
    assert sp.kind == "startup"
    assert sp.version == m.PROTOCOL_3_0
    assert sp.params == {"user": "alice", "database": "shop", "application_name": "psql"}


@pytest.mark.parametrize("code,kind", [(m.SSL_REQUEST_CODE, "ssl"), (m.GSSENC_REQUEST_CODE, "gssenc")])
def test_encryption_requests(code, kind):
    assert m.parse_startup_packet(struct.pack("!i", code)).kind == kind


def test_cancel_request_roundtrip():
    sp = m.parse_startup_packet(body_of(m.cancel_request(1234, -5678)))
    assert (sp.kind, sp.pid, sp.key) == ("cancel", 1234, -5678)


def test_protocol_2_is_refused_with_feature_not_supported():
    with pytest.raises(m.ProtocolError) as e:
        m.parse_startup_packet(struct.pack("!i", 2 << 16) + b"user\x00x\x00\x00")
    assert e.value.sqlstate == "0A000"
    assert "unsupported frontend protocol 2.0" in str(e.value)


def test_protocol_3_minor_is_accepted_for_negotiation():
    sp = m.parse_startup_packet(struct.pack("!i", (3 << 16) | 2) + b"user\x00x\x00_pq_.foo\x00y\x00\x00")
    assert sp.version & 0xFFFF == 2
    assert "_pq_.foo" in sp.params


@pytest.mark.parametrize("body", [
    b"",                                             # too short
    b"\x00\x03",                                     # truncated version
    struct.pack("!i", m.PROTOCOL_3_0) + b"user\x00alice",        # no terminators
    struct.pack("!i", m.PROTOCOL_3_0) + b"user\x00alice\x00",    # missing final NUL
    struct.pack("!i", m.PROTOCOL_3_0) + b"user\x00",             # key without value
    struct.pack("!i", m.PROTOCOL_3_0) + b"\x00junk",             # trailing bytes
    struct.pack("!i", m.CANCEL_REQUEST_CODE) + b"\x00\x00",      # short cancel
    struct.pack("!i", m.PROTOCOL_3_0) + b"user\x00\xff\xfe\x00\x00",  # not UTF-8
])
def test_hostile_startup_packets_raise_protocol_error(body):
    with pytest.raises(m.ProtocolError):
        m.parse_startup_packet(body)


def test_negotiate_protocol_version_layout():
    msg = m.negotiate_protocol_version(0, ["_pq_.a", "_pq_.b"])
    assert msg[:1] == b"v"
    (n,) = struct.unpack_from("!i", msg, 1)
    assert n == len(msg) - 1
    minor, count = struct.unpack_from("!ii", msg, 5)
    assert (minor, count) == (0, 2)
    assert msg[13:] == b"_pq_.a\x00_pq_.b\x00"


def test_error_response_fields_roundtrip():
    msg = m.error_response("42501", "refused by rules/x.star: no", detail="d", hint="h")
    assert msg[:1] == b"E"
    fields = m.parse_error_fields(msg[5:])
    assert fields["S"] == "ERROR" and fields["C"] == "42501"
    assert fields["M"] == "refused by rules/x.star: no"
    assert fields["D"] == "d" and fields["H"] == "h"
    assert m.build_error_from_fields(fields) == msg


def test_truncated_error_fields_raise():
    with pytest.raises(m.ProtocolError):
        m.parse_error_fields(b"Mno terminator")


def test_bind_statement_offsets():
    body = b"portal\x00stmt\x00\x00\x00\x00\x00\x00\x00"
    portal, stmt, start, after = m.parse_bind_statement(body)
    assert (portal, stmt) == (b"portal", b"stmt")
    assert body[start:after - 1] == b"stmt"


def test_ready_for_query_and_fixed_messages():
    assert m.ready_for_query(m.TX_IN_BLOCK) == b"Z\x00\x00\x00\x05T"
    assert m.command_complete("SELECT 1") == b"C\x00\x00\x00\x0dSELECT 1\x00"


def test_sasl_initial_response_parsing():
    body = b"SCRAM-SHA-256\x00" + struct.pack("!i", 5) + b"hello"
    assert m.parse_sasl_initial_response(body) == ("SCRAM-SHA-256", b"hello")
    with pytest.raises(m.ProtocolError):
        m.parse_sasl_initial_response(b"SCRAM-SHA-256\x00" + struct.pack("!i", 50) + b"short")
    with pytest.raises(m.ProtocolError):
        m.parse_sasl_initial_response(b"SCRAM-SHA-256\x00\x00")


# --------------------------------------------------------------------------- passwords


def test_md5_verification():
    salt = b"abcd"
    good = md5_response(md5_secret("alice", "s3cret"), salt).encode()
    assert verify_md5("alice", "s3cret", salt, good)  # plain secret
    assert verify_md5("alice", md5_secret("alice", "s3cret"), salt, good)  # md5 secret
    assert not verify_md5("alice", "other", salt, good)
    assert not verify_md5("bob", "s3cret", salt, good)  # md5 salts with the user name


def _scram_client_final(password: str, client_first_bare: str, server_first: str, channel=b"n,,"):
    attrs = dict(a.split("=", 1) for a in server_first.split(","))
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), base64.b64decode(attrs["s"]), int(attrs["i"]))
    client_key = hmac.digest(salted, b"Client Key", "sha256")
    stored = hashlib.sha256(client_key).digest()
    without_proof = f"c={base64.b64encode(channel).decode()},r={attrs['r']}"
    auth = f"{client_first_bare},{server_first},{without_proof}".encode()
    sig = hmac.digest(stored, auth, "sha256")
    proof = bytes(a ^ b for a, b in zip(client_key, sig))
    return f"{without_proof},p={base64.b64encode(proof).decode()}".encode(), salted, auth


def test_scram_server_accepts_libpq_style_empty_username():
    secret = ScramSecret.from_password("pw", iterations=4096)
    s = ScramServer(secret)
    bare = "n=,r=clientnonce123"
    server_first = s.client_first(f"n,,{bare}".encode()).decode()
    assert server_first.startswith("r=clientnonce123")
    final, salted, auth = _scram_client_final("pw", bare, server_first)
    verifier = s.client_final(final)
    server_key = hmac.digest(salted, b"Server Key", "sha256")
    assert verifier == b"v=" + base64.b64encode(hmac.digest(server_key, auth, "sha256"))


def test_scram_server_rejects_wrong_password_and_tampering():
    secret = ScramSecret.from_password("pw")
    s = ScramServer(secret)
    bare = "n=,r=abc"
    server_first = s.client_first(f"n,,{bare}".encode()).decode()
    final, _, _ = _scram_client_final("wrong", bare, server_first)
    with pytest.raises(ScramError):
        s.client_final(final)
    s2 = ScramServer(secret)
    sf2 = s2.client_first(f"n,,{bare}".encode()).decode()
    final2, _, _ = _scram_client_final("pw", bare, sf2)
    with pytest.raises(ScramError):  # nonce from another exchange
        s.client_final(final2)
    with pytest.raises(ScramError):
        ScramServer(secret).client_first(b"p=tls-server-end-point,,n=,r=x")
    with pytest.raises(ScramError):
        ScramServer(secret).client_first(b"garbage")


def test_scram_secret_string_roundtrip():
    s = ScramSecret.from_password("pw", 4096, b"0123456789abcdef")
    assert ScramSecret.parse(s.to_string()) == s
    with pytest.raises(ValueError):
        ScramSecret.parse("SCRAM-SHA-256$nonsense")
