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


# the Python codec that reads text as PostgreSQL converts it from each (ASCII-safe) client
# encoding; the rest (UTF8, SQL_ASCII, EUC_TW, MULE_INTERNAL) are read as UTF-8
_CODECS = {
    "latin1": "latin_1", "iso88591": "latin_1", "latin2": "iso8859_2", "iso88592": "iso8859_2",
    "latin3": "iso8859_3", "iso88593": "iso8859_3", "latin4": "iso8859_4", "iso88594": "iso8859_4",
    "latin5": "iso8859_9", "iso88599": "iso8859_9", "latin6": "iso8859_10", "iso885910": "iso8859_10",
    "latin7": "iso8859_13", "iso885913": "iso8859_13", "latin8": "iso8859_14", "iso885914": "iso8859_14",
    "latin9": "iso8859_15", "iso885915": "iso8859_15", "latin10": "iso8859_16", "iso885916": "iso8859_16",
    "iso88595": "iso8859_5", "iso88596": "iso8859_6", "iso88597": "iso8859_7", "iso88598": "iso8859_8",
    "win866": "cp866", "windows866": "cp866", "alt": "cp866", "win874": "cp874", "windows874": "cp874",
    "koi8": "koi8_r", "koi8r": "koi8_r", "koi8u": "koi8_u", "eucjp": "euc_jp",
    "eucjis2004": "euc_jis_2004", "euckr": "euc_kr", "euccn": "gb2312",
    "abc": "cp1258", "tcvn": "cp1258", "tcvn5712": "cp1258", "vscii": "cp1258", "win": "cp1251",
    **{f"{p}{n}": f"cp{n}" for p in ("win", "windows") for n in range(1250, 1259)},
}


def codec(client_encoding: str | None) -> str:
    """The Python codec to read a session's SQL text with."""
    return _CODECS.get(_NOT_ALNUM.sub("", (client_encoding or "").lower()), "utf-8")


def unsafe_session(params: dict[str, str]) -> str | None:
    """Why the gateway cannot read this session's SQL (None: it can)."""
    for name in ("standard_conforming_strings", "client_encoding"):
        value = params.get(name)
        if value:  # unset: the server's default, checked where the pool learns it
            why = unsafe_value(name, value)
            if why is not None:
                return why
    return None
