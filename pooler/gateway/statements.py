"""The client's prepared statements and portals, as the client sees them (its statement book).

Rules this module keeps:
- In transaction and statement pooling the names are the client's view: each statement is
  prepared on whichever server the client is given, once per server, under a name derived from
  its text and parameter types (``statement_server_name``), at most ``max_prepared_statements``
  per server (least recently used first out). Parse, Bind, Describe and Close of a named
  statement are rewritten here; the gateway answers what that server already has itself (fake
  replies queued in order) and gives the errors PostgreSQL would (42P05, 26000) as refusals for
  the session to deliver in order.
- What forwarding assumed is made true by the replies (interfaces.Bookkeeping): a Parse that
  failed or was skipped frees its name, a Close the server skipped leaves the statement.
- The masks of each statement and portal (policy decided them at Parse; Bind carries them to
  the portal) live here too, and go when the server confirms a Close or the transaction ends.
- SQL-level PREPARE texts are recorded as the server confirms each one, so that EXECUTE is
  judged as what the server runs.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

from ..protocol import messages as m
from .interfaces import (R_BIND, R_CLOSE_SKIP, R_DESCRIBE, R_FAKE_DONE, R_FAKE_PARSE, R_PARSE, R_PARSE_SKIP,
                         R_QUERY)

_DEALLOCATE_RE = re.compile(
    r'\s*deallocate\s+(?:prepare\s+)?(?:"((?:[^"]|"")+)"|([A-Za-z_\x80-\uffff][\w$\x80-\uffff]*))\s*;?\s*\Z',
    re.IGNORECASE,
)

Refusal = tuple[str, str]  # (sqlstate, message) of an error the session delivers in order


def statement_server_name(query_and_types: bytes) -> bytes:
    """Name of a prepared statement on the servers: derived from its text and parameter types,
    so every client preparing the same statement shares one server-side copy."""
    return b"pooler_" + hashlib.blake2b(query_and_types, digest_size=10).hexdigest().encode()


def _missing(name: bytes) -> Refusal:
    return ("26000", f'prepared statement "{name.decode("utf-8", "replace")}" does not exist')


class StatementBook:
    """One client's statement tables; ``config`` is read for max_prepared_statements (it
    follows reloads)."""

    def __init__(self, host: Any) -> None:
        self.host = host  # anything with .config (the gateway)
        self.stmts: dict[bytes, tuple[bytes, bytes]] = {}  # client name -> (server name, Parse body)
        self.mask_stmts: dict[bytes, Any] = {}  # client statement name -> MaskCtx of its results
        self.mask_portals: dict[bytes, Any] = {}  # portal name -> MaskCtx of its results
        self.sql_prepared: dict[str, str] = {}  # SQL-level PREPARE name -> statement text (confirmed)
        self.unnamed_ok = False  # this client parsed the unnamed statement on its current server
        # client statement name -> holds.Need of a statement whose every Bind waits for approval
        self.gated: dict[bytes, Any] = {}
        # named statements as PgBouncer counts them (SHOW STATS, the stats log line)
        self.parse_count = 0  # Parse of a named statement from the client
        self.server_parse_count = 0  # Parse of one the gateway sent a server
        self.bind_count = 0  # Bind of a named statement

    # ------------------------------------------------------------------ rewriting for a server

    def parse(self, srv, body: bytes, out: list) -> Refusal | None:
        """A Parse of a named statement (``body`` without its header)."""
        name, p = m.read_cstr(body, 0)
        if name in self.stmts:
            return ("42P05", f'prepared statement "{name.decode("utf-8", "replace")}" already exists')
        rest = body[p:]
        sname = statement_server_name(rest)
        self.stmts[name] = (sname, rest)
        self.parse_count += 1
        if sname in srv.prepared:
            srv.prepared.move_to_end(sname)
            srv.queue.append((R_FAKE_PARSE, (sname, name)))
            return None
        self._make_room(srv, out)
        out.append(m.parse(sname, rest))
        self.server_parse_count += 1
        srv.prepared[sname] = None
        srv.queue.append((R_PARSE, (sname, name)))
        return None

    def bind(self, srv, body: bytes, out: list) -> Refusal | None:
        """A Bind (``body`` without its header) of a named statement: the server's name for it,
        prepared there first if it is not."""
        portal, stmt, start, after = m.parse_bind_statement(body)
        if not stmt:
            out.append(m.message(b"B", body))
            srv.queue.append((R_BIND, None))
            return None
        entry = self.stmts.get(stmt)
        if entry is None:
            return _missing(stmt)
        sname, pbody = entry
        self.bind_count += 1
        self._ensure_prepared(srv, sname, pbody, out)
        out.append(m.message(b"B", body[:start] + sname + body[after - 1 :]))
        srv.queue.append((R_BIND, None))
        return None

    def describe_statement(self, srv, name: bytes, out: list) -> Refusal | None:
        entry = self.stmts.get(name)
        if entry is None:
            return _missing(name)
        sname, pbody = entry
        self._ensure_prepared(srv, sname, pbody, out)
        out.append(m.describe_statement(sname))
        srv.queue.append((R_DESCRIBE, None))
        return None

    def sql_deallocate(self, srv, sql: bytes, codec: str, out: list) -> bool:
        """``DEALLOCATE name`` of one of the client's protocol-level statements, with ``srv``
        linked: True when handled here (the server's copy deallocated, or the reply faked)."""
        name = self.deallocate_target(sql, codec)
        if name is None:
            return False
        sname = self.stmts[name][0]
        undo = self.forget_until_done(name)
        if sname in srv.prepared:
            del srv.prepared[sname]
            out.append(m.query(f'DEALLOCATE "{sname.decode()}"'))
            srv.queue.append((R_QUERY, None))
        else:
            srv.queue.append((R_FAKE_DONE, undo))
        return True

    def deallocate_target(self, sql: bytes, codec: str) -> bytes | None:
        """The client's protocol-level statement that ``DEALLOCATE name`` names, if any.
        PostgreSQL keeps SQL-level and protocol-level statements in one namespace."""
        try:
            text = sql.decode(codec)
        except UnicodeDecodeError:
            return None
        mt = _DEALLOCATE_RE.match(text)
        if not mt:
            return None
        if mt.group(1) is not None:
            name = mt.group(1).replace('""', '"').encode(codec)
        else:
            name = mt.group(2).lower().encode(codec)
            if name == b"all":
                return None  # forwarded; its CommandComplete clears our state
        return name if name in self.stmts else None

    def _ensure_prepared(self, srv, sname: bytes, body: bytes, out: list) -> None:
        prepared = srv.prepared
        if sname in prepared:
            prepared.move_to_end(sname)
            return
        self._make_room(srv, out)
        out.append(m.parse(sname, body))
        self.server_parse_count += 1
        prepared[sname] = None
        srv.queue.append((R_PARSE_SKIP, sname))

    def _make_room(self, srv, out: list) -> None:
        prepared = srv.prepared
        limit = self.host.config.max_prepared_statements
        while len(prepared) >= limit:
            old, _ = prepared.popitem(last=False)
            out.append(m.close_statement(old))
            srv.queue.append((R_CLOSE_SKIP, old))

    # ------------------------------------------------------------------ forgetting

    def forget(self, name: bytes) -> None:
        """The client's statement ``name`` is gone (Close, DEALLOCATE, a failed Parse)."""
        self.stmts.pop(name, None)
        self.mask_stmts.pop(name, None)

    def forget_until_done(self, name: bytes) -> tuple:
        """Forget the client's statement ``name`` now (a Close or DEALLOCATE the gateway answers
        itself); -> the undo record close_skipped needs should the server skip that request (an
        error earlier in the same batch makes PostgreSQL ignore everything up to Sync)."""
        undo = (name, self.stmts.get(name), self.mask_stmts.get(name))
        self.forget(name)
        return undo

    # ------------------------------------------------------------------ masks of statements and portals

    def bind_masks(self, body: bytes) -> None:
        """A Bind (``body`` without its header): its portal gets the statement's masks."""
        portal, stmt, _, _ = m.parse_bind_statement(body)
        if portal and portal in self.mask_portals:
            return  # a named portal that is open: this Bind fails on the server, its masks stay
        ctx = self.mask_stmts.get(stmt)
        if ctx is not None:
            self.mask_portals[portal] = ctx
        else:
            self.mask_portals.pop(portal, None)

    # ------------------------------------------------------------------ what replies confirm (interfaces.Bookkeeping)

    def parse_skipped(self, client_name: bytes, server_name: bytes) -> None:
        entry = self.stmts.get(client_name)
        if entry is not None and entry[0] == server_name:
            self.forget(client_name)

    def close_skipped(self, undo: tuple) -> None:
        name, stmt, mask = undo
        if stmt is not None and name not in self.stmts:
            self.stmts[name] = stmt
            if mask is not None:
                self.mask_stmts[name] = mask

    def close_confirmed(self, info: tuple[int, bytes]) -> None:
        # not before: a Close skipped after an error leaves the statement or portal in place
        kind, name = info
        (self.mask_stmts if kind == 83 else self.mask_portals).pop(name, None)

    def all_discarded(self) -> None:
        self.stmts.clear()
        self.mask_stmts.clear()

    def sql_prepare_confirmed(self, name: str, text: str) -> None:
        self.sql_prepared[name] = text

    def server_gone(self) -> None:
        """The client's server went back to its pool or died: what lived only there goes
        (SQL-level prepared statements: the next transaction may get another server, as with
        PgBouncer; the unnamed statement)."""
        self.unnamed_ok = False
        if self.sql_prepared:
            self.sql_prepared.clear()
