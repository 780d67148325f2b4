"""What a reviewer is shown of a held statement: pretty SQL, its parameters, tables, the agent's
justification; and the texts the agent is told (notice, refusals). Pure functions.

Rules this module keeps:
- What is shown is for reading only: the statement that runs after approval is the one the
  client sent, byte for byte (the session keeps it); nothing here feeds back into it.
- Parameters are shown as the server will read them: text-format values decoded in the client's
  encoding, binary-format values as hex (``\\x...``), NULL as None; long values are cut for display.
"""

from __future__ import annotations

import re
import struct

from pglast import prettify
from pglast.parser import fingerprint as pg_fingerprint

_I16 = struct.Struct("!h")
_I32 = struct.Struct("!i")
SHOWN_PARAM = 2000  # characters of one parameter value shown
_JUSTIFICATION = re.compile(r"/\*\s*justification\s*:\s*(.*?)\s*\*/", re.I | re.S)


def pretty(sql: str) -> str:
    try:
        return prettify(sql, safety_belt=False)
    except Exception:  # noqa: BLE001 - shown as sent when pglast cannot print it
        return sql.strip()


def fingerprint(sql: str) -> str:
    try:
        return pg_fingerprint(sql)
    except Exception:  # noqa: BLE001 - unparseable text is its own shape
        import hashlib
        return "text:" + hashlib.sha256(sql.encode()).hexdigest()[:16]


def justification_in(sql: str) -> str:
    """The agent's ``/* justification: ... */`` comment, if the statement carries one."""
    mt = _JUSTIFICATION.search(sql)
    return mt.group(1).strip() if mt else ""


def bind_parts(body: bytes) -> tuple[bytes, bytes, list[bytes | None], list[int]]:
    """A Bind message's body -> (portal, statement, values, formats per value). Raises
    ValueError on a malformed body."""
    p_end = body.index(b"\x00")
    s_end = body.index(b"\x00", p_end + 1)
    portal, stmt = body[:p_end], body[p_end + 1 : s_end]
    pos = s_end + 1
    (nfmt,) = _I16.unpack_from(body, pos)
    pos += 2
    formats = [_I16.unpack_from(body, pos + 2 * i)[0] for i in range(nfmt)]
    pos += 2 * nfmt
    (nval,) = _I16.unpack_from(body, pos)
    pos += 2
    values: list[bytes | None] = []
    for _ in range(nval):
        (ln,) = _I32.unpack_from(body, pos)
        pos += 4
        if ln < 0:
            values.append(None)
        else:
            if pos + ln > len(body):
                raise ValueError("Bind value runs past the message")
            values.append(body[pos : pos + ln])
            pos += ln
    if nfmt == 0:
        per = [0] * nval
    elif nfmt == 1:
        per = formats * nval
    else:
        per = formats
    return portal, stmt, values, per


def shown_params(values: list[bytes | None], formats: list[int], codec: str) -> tuple[str | None, ...]:
    out: list[str | None] = []
    for i, v in enumerate(values):
        if v is None:
            out.append(None)
            continue
        fmt = formats[i] if i < len(formats) else 0
        s = "\\x" + v.hex() if fmt == 1 else v.decode(codec, "replace")
        out.append(s if len(s) <= SHOWN_PARAM else s[:SHOWN_PARAM] + f"... ({len(s)} characters)")
    return tuple(out)


def waited_text(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 7200:
        return f"{seconds // 60} min"
    return f"{seconds // 3600} h"
