"""What a statement's text may carry that must not be kept: passwords and connection strings.
Read as PostgreSQL reads SQL (pglast's scanner), so quoting and comments cannot hide one. The
recorder keeps statements with their secrets replaced (``redact``) and their parameters hidden
where the statement may take one (``may_hold_secret``); the policy drops the parser's quote of
the text from an analysis error of such a statement."""

from __future__ import annotations

import re

from pglast.parser import scan

# what may put a secret in a statement: a PASSWORD clause, a password option or connection
# string (CREATE USER MAPPING ... OPTIONS (password '...'), dblink, CREATE SUBSCRIPTION ...
# CONNECTION), a URI with user:password@
# (casefold and ``in``: a tenth of the cost of one case-insensitive regex search, which
# PostgreSQL's ASCII-only keyword folding does not need to be wider than)
def _suspect(sql: str) -> bool:
    low = sql.casefold()
    return "password" in low or "connection" in low or "://" in low


# ... and in one value (a string constant, a Bind parameter)
SECRET_VALUE = re.compile(r"password|://[^/@\s]*:[^/@\s]*@", re.IGNORECASE).search
_STRINGS = frozenset({"SCONST", "USCONST"})


_CONNINFO_PASSWORD = re.compile(r"""(\bpassword\s*=\s*)(?:'(?:[^'\\]|\\.)*'|[^\s']+)""", re.IGNORECASE)
_URI_PASSWORD = re.compile(r"(://[^/@\s:]*:)[^/@\s]*@")


def hide_in_value(text: str) -> str:
    """A value (a string constant, a parameter) with the password of a connection string
    (``password=...``) or of a URI (``user:...@``) replaced by ``********``."""
    if SECRET_VALUE(text) is None:
        return text
    return _URI_PASSWORD.sub(r"\1********@", _CONNINFO_PASSWORD.sub(r"\1********", text))


def may_hold_secret(sql: str) -> bool:
    """Whether a statement's parameters may be secrets (ALTER ROLE a PASSWORD $1, a connection)."""
    return _suspect(sql)


_COMMENTS = frozenset({"C_COMMENT", "SQL_COMMENT"})
_HIDDEN = b"'********'"
UNREADABLE = "[not recorded: the statement mentions a password and could not be read]"


def redact(sql: str) -> tuple[str, bool]:
    """``sql`` with its secrets replaced by ``'********'``: the string after PASSWORD, after a
    ``password`` option name or CONNECTION, and any string that holds ``password`` or a URI's
    user:password@ (a comment that holds one is replaced too); and whether anything was
    replaced. Read with pglast's scanner, so quoting (E'', U&'', $tag$) and comments cannot
    hide a secret; a suspect statement the scanner cannot read is not kept at all."""
    if not _suspect(sql):
        return sql, False
    try:
        toks = scan(sql)
    except Exception:  # noqa: BLE001 - fail closed: a secret may be in what cannot be read
        return UNREADABLE, True
    b = sql.encode("utf-8")
    out, at, prev = [], 0, None
    for t in toks:
        name = t.name
        if name in _COMMENTS:
            if SECRET_VALUE(b[t.start:t.end + 1].decode("utf-8", "replace")):
                out += [b[at:t.start], b"/* ******** */"]
                at = t.end + 1
            continue
        if name in _STRINGS:
            word = b[prev.start:prev.end + 1].lower() if prev is not None else b""
            if word in (b"password", b'"password"', b"connection"):
                out += [b[at:t.start], _HIDDEN]
                at = t.end + 1
            else:
                text = b[t.start:t.end + 1].decode("utf-8", "replace")
                hidden = hide_in_value(text)
                if hidden != text:
                    out += [b[at:t.start], hidden.encode("utf-8")]
                    at = t.end + 1
        prev = t
    if not out:
        return sql, False
    out.append(b[at:])
    return b"".join(out).decode("utf-8"), True
