"""Session parameters the gateway keeps per client (as PgBouncer's varcache does), so that each
client sees the values it set whichever server it is given, and the SQL that applies them.

Parameter keys and client identities are canonical objects: comparing a server's with a
client's on every hand-over is then mostly an ``is``.
"""

from __future__ import annotations

from ..policy.sessionwork import search_path_items

# always tracked, as PgBouncer's varcache (IntervalStyle is PgBouncer's default track_extra_parameters)
BUILTIN_PARAMS = (
    "client_encoding",
    "DateStyle",
    "TimeZone",
    "IntervalStyle",
    "standard_conforming_strings",
    "application_name",
)
# The tracked set of this process: the built-in ones and track_extra_parameters
# (``set_extra_params``, at the gateway's start). Mutated in place, never rebound: the modules
# that imported these names see the change.
TRACKED_PARAMS: list[str] = list(BUILTIN_PARAMS)
TRACKED: set[str] = set(BUILTIN_PARAMS)
TRACKED_LOWER: dict[str, str] = {p.lower(): p for p in BUILTIN_PARAMS}


def set_extra_params(extra) -> None:
    """track_extra_parameters: the names (as the server reports them) tracked besides the
    built-in ones. Names are matched case-insensitively, as PgBouncer does."""
    names = list(BUILTIN_PARAMS)
    for e in extra:
        if e.lower() not in {n.lower() for n in names}:
            names.append(e)
    TRACKED_PARAMS[:] = names
    TRACKED.clear()
    TRACKED.update(names)
    TRACKED_LOWER.clear()
    TRACKED_LOWER.update({p.lower(): p for p in names})
    _CANONICAL.clear()

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
        if v is None:
            if have.get(k) is not None:  # an extra parameter another client set, this one did not
                out.append(f"RESET {k}")
        elif have.get(k) != v:
            out.append(set_sql(k, v))
    return out


def set_sql(name: str, value: str) -> str:
    """The statement that gives a server the parameter's value as a startup packet would.
    search_path is a list of names (PgBouncer's GUC_LIST_QUOTE case): a quoted literal would
    make it one schema named after the whole list."""
    if name.lower() == "search_path":
        items = search_path_items(value)
        if not items:
            return "SET search_path = ''"
        return "SET search_path = " + ", ".join('"' + i.replace('"', '""') + '"' for i in items)
    return f"SET {name} = {quote_literal(value)}"
