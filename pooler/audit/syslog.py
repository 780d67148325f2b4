"""Syslog messages as RFC 5424 defines them, and their framing on each transport. Pure.

    <PRI>1 TIMESTAMP HOSTNAME APP-NAME PROCID MSGID STRUCTURED-DATA MSG

PRI is facility * 8 + severity; MSGID is the event's ``event.action``; STRUCTURED-DATA is the
NILVALUE ``-`` (everything is in MSG); MSG is the audit document's JSON, without a BOM (RFC
5424's MSG-ANY), so receivers parse it as JSON directly. Over TCP (and a stream Unix socket)
each message is framed by octet counting (RFC 6587 3.4.1: ``LENGTH SP MESSAGE``); over UDP and a
datagram Unix socket one message is one datagram.
"""

from __future__ import annotations

import re

FACILITIES = {"kern": 0, "user": 1, "mail": 2, "daemon": 3, "auth": 4, "syslog": 5, "lpr": 6, "news": 7,
              "uucp": 8, "cron": 9, "authpriv": 10, "ftp": 11, "local0": 16, "local1": 17, "local2": 18,
              "local3": 19, "local4": 20, "local5": 21, "local6": 22, "local7": 23}
APP_NAME = "pooler"

_PRINTUSASCII = re.compile(r"[^\x21-\x7e]")


def _field(value: str, limit: int) -> str:
    """A header field: printable US-ASCII, at most ``limit`` characters, ``-`` when empty."""
    value = _PRINTUSASCII.sub("_", value)[:limit]
    return value or "-"


def message(facility: int, severity: int, stamp: str, hostname: str, procid: int, msgid: str, msg: bytes) -> bytes:
    head = (f"<{facility * 8 + severity}>1 {stamp} {_field(hostname, 255)} {APP_NAME} {procid} "
            f"{_field(msgid, 32)} - ")
    return head.encode("ascii") + msg


def octet_counted(msg: bytes) -> bytes:
    return str(len(msg)).encode("ascii") + b" " + msg


def parse_target(v: str) -> tuple[str, object]:
    """``udp://host:port``, ``tcp://host:port`` or ``unix:/path`` -> (kind, address). Raises
    ValueError naming the forms."""
    v = v.strip()
    m = re.match(r"^(udp|tcp)://(\[[^\]]+\]|[^:/\s]+):(\d+)/?$", v)
    if m:
        port = int(m.group(3))
        if not 0 < port < 65536:
            raise ValueError(f"port out of range in {v!r}")
        return m.group(1), (m.group(2).strip("[]"), port)
    if v.startswith("unix:") and len(v) > 5 and v[5] == "/":
        return "unix", v[5:]
    raise ValueError(f"expected udp://host:port, tcp://host:port or unix:/path, got {v!r}")
