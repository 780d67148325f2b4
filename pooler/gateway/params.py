"""Session parameters the gateway keeps per client (as PgBouncer's varcache does), so that each
client sees the values it set whichever server it is given, and the SQL that applies them.

Parameter keys and client identities are canonical objects: comparing a server's with a
client's on every hand-over is then mostly an ``is``.
"""

from __future__ import annotations

TRACKED_PARAMS = (
    "client_encoding",
    "DateStyle",
    "TimeZone",
    "IntervalStyle",
    "standard_conforming_strings",
    "application_name",
)
TRACKED = frozenset(TRACKED_PARAMS)
TRACKED_LOWER = {p.lower(): p for p in TRACKED_PARAMS}

_CANONICAL: dict[tuple, tuple] = {}


def canonical(key: tuple) -> tuple:
    """One object for equal keys (parameter keys, client identities). Bounded: clients choose
    some of the values (application_name)."""
    c = _CANONICAL.get(key)
    if c is None:
        if len(_CANONICAL) >= 4096:
            _CANONICAL.clear()
        c = _CANONICAL[key] = key
    return c


def param_key_of(params: dict[str, str]) -> tuple:
    return canonical(tuple(params.get(p) for p in TRACKED_PARAMS))


def quote_literal(v: str) -> str:
    return "'" + v.replace("'", "''") + "'" if "\\" not in v else "E'" + v.replace("\\", "\\\\").replace("'", "''") + "'"


def sync_sql(wanted: dict[str, str], have: dict[str, str]) -> list[str]:
    """The SETs that give a server whose parameters are ``have`` the client's ``wanted``."""
    out = []
    for k in TRACKED_PARAMS:
        v = wanted.get(k)
        if v is not None and have.get(k) != v:
            out.append(f"SET {k} = {quote_literal(v)}")
    return out
