"""Session settings that change how PostgreSQL splits SQL text into tokens.

The gateway reads every statement with pglast, which lexes as PostgreSQL does with
``standard_conforming_strings = on`` and text decoded as UTF-8. Two settings make the server
read the same bytes differently, so that a string constant to the gateway hides statements
from it:

- ``standard_conforming_strings = off``: ``'\\'`` is an unterminated string to the server
  (``\\'`` escapes the quote), a whole one to the gateway;
- a client-only multibyte ``client_encoding`` (SJIS, BIG5, GBK, GB18030, UHC, JOHAB and their
  aliases): the second byte of a character may be a backslash or a quote, which the gateway's
  UTF-8 reading takes for itself.

While rules apply, the gateway refuses sessions and statements that would use either (the
encodings whose bytes below 0x80 are always ASCII are safe: UTF8, LATIN*, WIN*, EUC_*, ...).
Pure functions: no I/O.
"""

from __future__ import annotations

import re

SETTINGS = frozenset({"standard_conforming_strings", "client_encoding"})

# PostgreSQL's names (and aliases) of the client-only encodings, as clean_encoding_name leaves
# them: lower case, letters and digits only
CLIENT_ONLY_ENCODINGS = frozenset({
    "sjis", "shiftjis", "mskanji", "win932", "windows932", "shiftjis2004", "big5", "win950",
    "windows950", "gbk", "win936", "windows936", "gb18030", "uhc", "win949", "windows949", "johab",
})

_ON = frozenset({"on", "true", "yes", "1", "t", "tr", "tru", "y", "ye"})
_NOT_ALNUM = re.compile(r"[^a-z0-9]")


def unsafe_value(name: str, value: str | None) -> str | None:
    """Why the gateway cannot read SQL sent with ``name`` set to ``value`` (None: it can, or
    the setting does not matter). ``value`` None means "unknown": unsafe for these settings."""
    if name == "standard_conforming_strings":
        v = (value or "").strip().strip("'\"").lower()
        if v in _ON:
            return None
        return (f"standard_conforming_strings = {value or '?'} is not supported through this gateway: "
                "the gateway reads SQL with standard_conforming_strings = on (write backslash escapes "
                "as E'...')")
    if name == "client_encoding":
        v = _NOT_ALNUM.sub("", (value or "").lower())
        if v and v not in CLIENT_ONLY_ENCODINGS:
            return None
        return (f"client_encoding {value or '?'} is not supported through this gateway: its two-byte "
                "characters can contain quote and backslash bytes; use UTF8")
    return None


def unsafe_session(params: dict[str, str]) -> str | None:
    """Why the gateway cannot read this session's SQL (None: it can)."""
    for name in ("standard_conforming_strings", "client_encoding"):
        value = params.get(name)
        if value:  # unset: the server's default, checked where the pool learns it
            why = unsafe_value(name, value)
            if why is not None:
                return why
    return None
