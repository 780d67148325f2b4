"""The ``options`` startup parameter, read as PgBouncer 1.25 reads it (``set_startup_options``).

Rules this module keeps:
- Only PostgreSQL's ``-c name=value`` (also ``-cname=value``) and ``--name=value`` arguments are
  accepted: every other server command-line switch can be written in that form. Anything else
  is refused with PgBouncer's text.
- A backslash escapes the next character (``\\ `` is a space inside a value, ``\\\\`` a
  backslash); unescaped whitespace separates arguments; the first ``=`` of an argument splits
  name from value (an escaped ``=`` included, as in PgBouncer).
- Pure: no sockets, no configuration. Which names are taken, ignored or refused is the login
  stage's business.
"""

from __future__ import annotations

ONLY_C_ALLOWED = "unsupported options startup parameter: only '-c config=val' and '--config=val' are allowed"


class OptionsError(ValueError):
    """The options value cannot be read (PgBouncer's text)."""


def parse_startup_options(value: str) -> list[tuple[str, str]]:
    """``options`` -> [(name, value)] in the order given. Raises OptionsError."""
    out: list[tuple[str, str]] = []
    i, n = 0, len(value)
    while True:
        while i < n and value[i].isspace():
            i += 1
        if i >= n:
            return out
        if value.startswith("-c", i):
            i += 2
            while i < n and value[i].isspace():
                i += 1
        elif value.startswith("--", i):
            i += 2
        else:
            raise OptionsError(ONLY_C_ALLOWED)
        token = []
        while i < n:
            c = value[i]
            if c == "\\":
                i += 1
                if i < n:
                    token.append(value[i])
                    i += 1
                continue
            if c.isspace():
                break
            token.append(c)
            i += 1
        arg = "".join(token)
        name, eq, val = arg.partition("=")
        if not eq or not name:
            raise OptionsError(ONLY_C_ALLOWED)
        out.append((name, val))
