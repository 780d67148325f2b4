"""PostgreSQL v3 wire messages: builders and parsers. Pure functions, no I/O.

Rules this module keeps:
- Names follow the protocol chapter ("Frontend/Backend Protocol") exactly.
- Builders return ``bytes`` ready to write; parsers take ``bytes``/``memoryview`` of one
  message *body* (after the type byte and length) and raise ``ProtocolError`` on anything
  malformed, never IndexError or struct.error.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

_I32 = struct.Struct("!i")
_I16 = struct.Struct("!h")
_HDR = struct.Struct("!ci")

PROTOCOL_3_0 = 196608  # 3 << 16
SSL_REQUEST_CODE = 80877103
GSSENC_REQUEST_CODE = 80877104
CANCEL_REQUEST_CODE = 80877102

# Transaction status bytes carried by ReadyForQuery.
TX_IDLE = ord("I")
TX_IN_BLOCK = ord("T")
TX_FAILED = ord("E")


class ProtocolError(Exception):
    """Malformed or hostile input; the session that sent it is closed with 08P01."""

    def __init__(self, message: str, sqlstate: str = "08P01") -> None:
        super().__init__(message)
        self.sqlstate = sqlstate


# --------------------------------------------------------------------------- builders


def message(type_byte: bytes, body: bytes = b"") -> bytes:
    return type_byte + _I32.pack(len(body) + 4) + body


def cstr(s: str) -> bytes:
    return s.encode() + b"\x00"


def authentication_ok() -> bytes:
    return b"R\x00\x00\x00\x08\x00\x00\x00\x00"


def authentication_cleartext() -> bytes:
    return b"R\x00\x00\x00\x08\x00\x00\x00\x03"


def authentication_md5(salt: bytes) -> bytes:
    return message(b"R", _I32.pack(5) + salt)


def authentication_sasl(mechanisms: list[str]) -> bytes:
    return message(b"R", _I32.pack(10) + b"".join(cstr(m) for m in mechanisms) + b"\x00")


def authentication_sasl_continue(data: bytes) -> bytes:
    return message(b"R", _I32.pack(11) + data)


def authentication_sasl_final(data: bytes) -> bytes:
    return message(b"R", _I32.pack(12) + data)


def parameter_status(name: str, value: str) -> bytes:
    return message(b"S", cstr(name) + cstr(value))


def backend_key_data(pid: int, key: int) -> bytes:
    return message(b"K", struct.pack("!ii", pid, key))


def ready_for_query(status: int = TX_IDLE) -> bytes:
    return b"Z\x00\x00\x00\x05" + bytes((status,))


def command_complete(tag: str) -> bytes:
    return message(b"C", cstr(tag))


PARSE_COMPLETE = b"1\x00\x00\x00\x04"
BIND_COMPLETE = b"2\x00\x00\x00\x04"
CLOSE_COMPLETE = b"3\x00\x00\x00\x04"
NO_DATA = b"n\x00\x00\x00\x04"
EMPTY_QUERY_RESPONSE = b"I\x00\x00\x00\x04"
SYNC = b"S\x00\x00\x00\x04"
FLUSH = b"H\x00\x00\x00\x04"
TERMINATE = b"X\x00\x00\x00\x04"
SSL_REFUSED = b"N"
SSL_ACCEPTED = b"S"


def error_response(
    sqlstate: str,
    text: str,
    severity: str = "ERROR",
    detail: str | None = None,
    hint: str | None = None,
) -> bytes:
    body = b"S" + cstr(severity) + b"V" + cstr(severity) + b"C" + cstr(sqlstate) + b"M" + cstr(text)
    if detail:
        body += b"D" + cstr(detail)
    if hint:
        body += b"H" + cstr(hint)
    return message(b"E", body + b"\x00")


def notice_response(sqlstate: str, text: str, severity: str = "NOTICE", detail: str | None = None,
                    hint: str | None = None) -> bytes:
    body = b"S" + cstr(severity) + b"V" + cstr(severity) + b"C" + cstr(sqlstate) + b"M" + cstr(text)
    if detail:
        body += b"D" + cstr(detail)
    if hint:
        body += b"H" + cstr(hint)
    return message(b"N", body + b"\x00")


def negotiate_protocol_version(newest_minor: int, unrecognized: list[str]) -> bytes:
    body = _I32.pack(newest_minor) + _I32.pack(len(unrecognized))
    body += b"".join(cstr(o) for o in unrecognized)
    return message(b"v", body)


def startup_message(params: dict[str, str], version: int = PROTOCOL_3_0) -> bytes:
    body = _I32.pack(version)
    for k, v in params.items():
        body += cstr(k) + cstr(v)
    body += b"\x00"
    return _I32.pack(len(body) + 4) + body


def ssl_request() -> bytes:
    return struct.pack("!ii", 8, SSL_REQUEST_CODE)


def cancel_request(pid: int, key: int) -> bytes:
    return struct.pack("!iiii", 16, CANCEL_REQUEST_CODE, pid, key)


def password_message(data: bytes) -> bytes:
    return message(b"p", data)


def query(sql: str) -> bytes:
    return message(b"Q", cstr(sql))


def parse(name: bytes, query_and_types: bytes) -> bytes:
    """Parse with statement ``name``; ``query_and_types`` is the body after the name."""
    return message(b"P", name + b"\x00" + query_and_types)


def bind(portal: bytes, statement: bytes, values: list, formats: list[int], result_formats: tuple = ()) -> bytes:
    """Bind ``values`` (bytes, None for NULL) with one format code per value."""
    body = portal + b"\x00" + statement + b"\x00" + _I16.pack(len(formats))
    body += b"".join(_I16.pack(f) for f in formats) + _I16.pack(len(values))
    for v in values:
        body += _I32.pack(-1) if v is None else _I32.pack(len(v)) + v
    body += _I16.pack(len(result_formats)) + b"".join(_I16.pack(f) for f in result_formats)
    return message(b"B", body)


def execute(portal: bytes = b"", max_rows: int = 0) -> bytes:
    return message(b"E", portal + b"\x00" + _I32.pack(max_rows))


def describe_statement(name: bytes) -> bytes:
    return message(b"D", b"S" + name + b"\x00")


def close_statement(name: bytes) -> bytes:
    return message(b"C", b"S" + name + b"\x00")


# --------------------------------------------------------------------------- parsers


def read_cstr(buf: bytes | memoryview, pos: int) -> tuple[bytes, int]:
    """Return (string bytes, position after its NUL)."""
    end = bytes(buf).find(b"\x00", pos) if isinstance(buf, memoryview) else buf.find(b"\x00", pos)
    if end < 0:
        raise ProtocolError("invalid message format: missing string terminator")
    return bytes(buf[pos:end]), end + 1


@dataclass(slots=True)
class StartupPacket:
    """What the first packet of a connection asked for."""

    kind: str  # "startup" | "ssl" | "gssenc" | "cancel"
    version: int = 0
    params: dict[str, str] = field(default_factory=dict)
    pid: int = 0
    key: int = 0


def parse_startup_packet(body: bytes) -> StartupPacket:
    """Parse a startup-phase packet body (after its 4-byte length)."""
    if len(body) < 4:
        raise ProtocolError("invalid startup packet layout: too short")
    (code,) = _I32.unpack_from(body, 0)
    if code == SSL_REQUEST_CODE:
        return StartupPacket("ssl")
    if code == GSSENC_REQUEST_CODE:
        return StartupPacket("gssenc")
    if code == CANCEL_REQUEST_CODE:
        if len(body) != 12:
            raise ProtocolError("invalid cancel request packet")
        pid, key = struct.unpack_from("!ii", body, 4)
        return StartupPacket("cancel", pid=pid, key=key)
    major = code >> 16
    if major != 3:
        raise ProtocolError(
            f"unsupported frontend protocol {major}.{code & 0xFFFF}: "
            "server supports 3.0 to 3.0",
            "0A000",
        )
    params: dict[str, str] = {}
    pos = 4
    n = len(body)
    while True:
        if pos >= n:
            raise ProtocolError("invalid startup packet layout: expected terminator as last byte")
        if body[pos] == 0:
            if pos != n - 1:
                raise ProtocolError("invalid startup packet layout: trailing bytes")
            break
        k, pos = read_cstr(body, pos)
        if pos >= n:
            raise ProtocolError("invalid startup packet layout: missing value")
        v, pos = read_cstr(body, pos)
        try:
            params[k.decode()] = v.decode()
        except UnicodeDecodeError:
            raise ProtocolError("invalid startup packet: parameters are not valid UTF-8") from None
    return StartupPacket("startup", version=code, params=params)


def parse_error_fields(body: bytes) -> dict[str, str]:
    """Fields of an ErrorResponse/NoticeResponse body, keyed by field type letter."""
    fields: dict[str, str] = {}
    pos = 0
    n = len(body)
    while pos < n and body[pos] != 0:
        code = chr(body[pos])
        val, pos = read_cstr(body, pos + 1)
        fields[code] = val.decode("utf-8", "replace")
    return fields


def build_error_from_fields(fields: dict[str, str], type_byte: bytes = b"E") -> bytes:
    body = b"".join(k.encode() + cstr(v) for k, v in fields.items()) + b"\x00"
    return message(type_byte, body)


def parse_parameter_status(body: bytes) -> tuple[str, str]:
    k, pos = read_cstr(body, 0)
    v, _ = read_cstr(body, pos)
    return k.decode("utf-8", "replace"), v.decode("utf-8", "replace")


def parse_bind_statement(body: bytes) -> tuple[bytes, bytes, int, int]:
    """Bind body -> (portal, statement, offset where statement name starts, offset after it)."""
    portal, pos = read_cstr(body, 0)
    start = pos
    stmt, pos = read_cstr(body, pos)
    return portal, stmt, start, pos


def parse_authentication(body: bytes) -> tuple[int, bytes]:
    if len(body) < 4:
        raise ProtocolError("invalid authentication request")
    (code,) = _I32.unpack_from(body, 0)
    return code, bytes(body[4:])


def parse_sasl_mechanisms(data: bytes) -> list[str]:
    # a name that is not UTF-8 is no mechanism the gateway knows: kept, replaced, never an error
    return [m.decode("utf-8", "replace") for m in data.split(b"\x00") if m]


def parse_sasl_initial_response(body: bytes) -> tuple[str, bytes]:
    mech, pos = read_cstr(body, 0)
    if pos + 4 > len(body):
        raise ProtocolError("invalid SASLInitialResponse")
    (n,) = _I32.unpack_from(body, pos)
    pos += 4
    data = b"" if n < 0 else bytes(body[pos : pos + n])
    if n >= 0 and len(data) != n:
        raise ProtocolError("invalid SASLInitialResponse length")
    # a mechanism name that is not UTF-8 names no mechanism: the login refuses it (28000) as
    # it refuses any other unknown name, not as an internal error
    return mech.decode("utf-8", "replace"), data


def parse_command_tag(body: bytes) -> str:
    tag, _ = read_cstr(body, 0)
    return tag.decode("ascii", "replace")


@dataclass(frozen=True, slots=True)
class FieldDescription:
    name: bytes
    table_oid: int
    attnum: int
    type_oid: int
    type_size: int
    type_mod: int
    format: int


_FIELD = struct.Struct("!ihihih")


def parse_row_description(body: bytes | memoryview) -> list[FieldDescription]:
    """RowDescription body -> its fields."""
    try:
        (count,) = _I16.unpack_from(body, 0)
        pos = 2
        fields = []
        for _ in range(count):
            name, pos = read_cstr(body, pos)
            oid, attnum, typ, size, mod, fmt = _FIELD.unpack_from(body, pos)
            pos += 18
            fields.append(FieldDescription(bytes(name), oid & 0xFFFFFFFF, attnum, typ & 0xFFFFFFFF, size, mod, fmt))
    except struct.error:
        raise ProtocolError("invalid RowDescription message") from None
    if count < 0 or pos != len(body):
        raise ProtocolError("invalid RowDescription message")
    return fields


def parse_data_row(body: bytes | memoryview) -> list[bytes | None]:
    """DataRow body -> its column values (None for NULL)."""
    try:
        (count,) = _I16.unpack_from(body, 0)
        pos = 2
        out: list[bytes | None] = []
        for _ in range(count):
            (n,) = _I32.unpack_from(body, pos)
            pos += 4
            if n < 0:
                out.append(None)
            else:
                if pos + n > len(body):
                    raise ProtocolError("invalid DataRow message")
                out.append(bytes(body[pos : pos + n]))
                pos += n
    except struct.error:
        raise ProtocolError("invalid DataRow message") from None
    if pos != len(body):
        raise ProtocolError("invalid DataRow message")
    return out


def describe_portal(name: bytes) -> bytes:
    return message(b"D", b"P" + name + b"\x00")


# --------------------------------------------------------------------------- result sets the gateway makes
# Column types as PgBouncer's console sends them (its tupdesc letters): 's' text, 'i' int4,
# 'q' int8, 'N' numeric, 'T' a timestamp sent as text, 'b' bytea (values given as bytes).
_COLUMN_TYPES = {"s": (25, -1), "T": (25, -1), "i": (23, 4), "q": (20, 8), "N": (1700, -1), "b": (17, -1)}
_COLUMN = struct.Struct("!ihihih")


def row_description(columns: list[tuple[str, str]]) -> bytes:
    """RowDescription of ``(name, type letter)`` columns (no table, text format)."""
    out = [_I16.pack(len(columns))]
    for name, kind in columns:
        oid, size = _COLUMN_TYPES[kind]
        out.append(cstr(name) + _COLUMN.pack(0, 0, oid, size, -1, 0))
    return message(b"T", b"".join(out))


def data_row(values) -> bytes:
    """DataRow of text values: str, int, bool (as 0/1) or bytes (bytea, as \\x hex); None is NULL."""
    out = [_I16.pack(len(values))]
    for v in values:
        if v is None:
            out.append(b"\xff\xff\xff\xff")
            continue
        if isinstance(v, bytes):
            b = b"\\x" + v.hex().encode()
        elif isinstance(v, bool):
            b = b"1" if v else b"0"
        else:
            b = str(v).encode()
        out.append(_I32.pack(len(b)) + b)
    return message(b"D", b"".join(out))
