"""The decide stage: one client's statements judged by the rules before any server sees them.

Rules this module keeps:
- Every message that carries SQL or runs a statement is judged here (``Governor.decide``):
  a simple Query (the whole string, every statement in it), Parse, and SQL-level EXECUTE as
  the statement it runs; FunctionCall is refused while rules are active; Bind and Describe of
  the unnamed statement only if this client parsed it on its current server.
- Fail closed: SQL the gateway cannot read as the server will (policy.lexing), text that is
  not valid in the client's encoding, a statement that cannot be analyzed, a rule error: the
  message is refused. A name already prepared is refused as PostgreSQL refuses it, so EXECUTE
  is never judged as text the server does not run; the search_path the rules see only grows.
- A decision to mask plans what the reply side needs (masking.plan.MaskCtx): kept per
  statement and portal in the client's statement book, or handed to forwarding for the Query
  being sent (``query_mask``). Statements whose masked values would leave another way (COPY,
  cursors, writes that copy them) are refused.
- Decisions are cached by the policy engine (rules version, exact text, session attributes);
  this stage keeps the session attributes' key ready (``session_info``).
"""

from __future__ import annotations

import logging
import struct
from typing import Any, Protocol

from ..approvals.present import bind_parts, justification_in, shown_params
from ..masking.plan import MaskCtx, QueryMask, compile_masks, method_for
from ..policy.engine import SessionInfo
from ..policy.rules import Decision
from ..policy.sessionwork import Refusal, apply_prepared, grown_search_path, merge_shadow, session_work
from ..protocol import messages as m
from ..protocol.frontend import T_BIND, T_DESCRIBE, T_FUNCTION, T_PARSE, T_QUERY
from ..sql.lexing import codec as reading_codec, unsafe_session
from ..sql.lineage import UNKNOWN, StatementLineage
from .events import Refused
from .holds import Need

log = logging.getLogger("pooler.client")

WAIT_CATALOG: Refusal = ("", "")  # not a refusal: the catalog must be loaded before this message is judged
WAIT_APPROVAL: Refusal = ("", "approval")  # not a refusal: held for approval (Governor.need says what)

_unpack_len = struct.Struct("!i").unpack_from
struct_error = struct.error
_NO_LINEAGE = StatementLineage(None, frozenset((UNKNOWN,)))
MESSAGE_KIND = {T_QUERY: "Q", T_PARSE: "P", T_BIND: "B", T_DESCRIBE: "D", T_FUNCTION: "F"}


class GovernedSession(Protocol):
    """What the decide stage reads of its session (session.ClientSession)."""

    gw: Any  # interfaces.SessionHost
    user: str
    database: str
    groups: tuple[str, ...]
    addr: str
    params: dict[str, str]
    tx_status: int
    rewrite: bool
    pool: Any
    book: Any  # statements.StatementBook

    def describe(self) -> str: ...


class Governor:
    def __init__(self, session: GovernedSession) -> None:
        self.session = session
        self.book = session.book
        self.events = session.gw.events
        self.lexing: str | None = None  # why the gateway cannot read this session's SQL (sql.lexing)
        self.codec = "utf-8"  # how it reads the SQL text: as the server converts it from client_encoding
        self.search_path: tuple[str, ...] = ("public",)
        self.query_mask: QueryMask | None = None  # masks/PREPAREs of the Query just accepted, for forwarding
        self._prep_new: list[tuple[str, str]] | tuple = ()  # PREPAREs of the message being judged
        self._sinfo: list = [None, None]  # SessionInfo outside / inside a transaction
        self._skey: list = [None, None]
        self._holder = None  # the CatalogHolder of this session's database (rules that mask)
        # approvals: what the message held now needs (decide returned WAIT_APPROVAL), the
        # approved message that may now pass once (exact bytes), the agent's justification
        self.need: Need | None = None
        self.ticket: bytes | None = None
        self.justification = ""  # SET pooler.justification
        self.parse_name = b""  # the name of the Parse being judged (what events.decided observers read for 'P')
        # the last refusal ``decide`` returned and what it answers (events.Refused): the session
        # reports both with events.refused (matched by identity, so a stale one is never used)
        self.refusing: tuple[Refusal, Refused] | None = None

    # ------------------------------------------------------------------ what the rules see of the session

    def reading_changed(self, params: dict[str, str]) -> None:
        """client_encoding or standard_conforming_strings changed: how SQL text is read."""
        self.lexing = unsafe_session(params)
        self.codec = reading_codec(params.get("client_encoding"))

    def session_changed(self) -> None:
        """An attribute the rules read changed (application_name, search_path)."""
        self._sinfo = [None, None]
        self._skey = [None, None]

    def search_path_seen(self, value: str) -> None:
        """The session's search_path may now be ``value``: the rules see its schemas from now on
        (the path only grows, so no SET that fails or is rolled back hides a schema)."""
        path = grown_search_path(self.search_path, value)
        if path != self.search_path:
            self.search_path = path
            self.session_changed()

    def judge_setting(self, name: str, value: str, sql: str) -> Refusal | None:
        """A parameter given at login (startup packet or ``options``) beyond the built-in ones
        (track_extra_parameters): judged as the statement ``sql`` that will apply it on servers
        (``SET name = 'value'``), as if the client had sent it. None, WAIT_CATALOG,
        WAIT_APPROVAL or a refusal, as ``decide``."""
        if name.lower() == "search_path":
            self.search_path_seen(value)
        if self.session.gw.policy is None or not self.session.gw.policy.enforcing:
            return None
        msg = m.query(sql)
        return self.decide(T_QUERY, msg, 0, len(msg))

    def session_info(self) -> SessionInfo:
        s = self.session
        in_tx = s.tx_status != m.TX_IDLE
        si = self._sinfo[in_tx]
        if si is None:
            si = SessionInfo(s.user, s.database, s.groups, s.params.get("application_name", ""),
                             s.addr.rsplit(":", 1)[0], in_tx, self.search_path)
            self._sinfo[in_tx] = si
            self._skey[in_tx] = si.key()
        return si

    # ------------------------------------------------------------------ deciding

    def decide(self, t: int, data: bytes, pos: int, end: int) -> Refusal | None:
        """Judge the message ``data[pos:end]`` of type ``t``: None if it may pass, WAIT_CATALOG
        if it must wait for masking's catalog (then judged again), else (sqlstate, message) of
        the refusal. Raises ProtocolError for a malformed Parse."""
        blocked = self.session.gw.record_block
        if blocked is not None and t != T_DESCRIBE:
            # record_failure = block: nothing runs that cannot be recorded
            return self._unread(("58030", blocked), t, data, pos, end)
        policy = self.session.gw.policy
        shadow_only = None
        if policy is not None and not policy.enforcing:
            # only MODE = "shadow" files: their opinions are computed, nothing of the rules'
            # is enforced (the gateway's own refusals included): the session runs as without rules
            shadow_only, policy = policy, None
        book = self.book
        if t == T_BIND or t == T_DESCRIBE:
            if t == T_BIND and book.gated:
                held = self._gated_bind(data, pos, end)
                if held is not None:
                    return held
            # the unnamed statement must be one this client parsed on this server
            if t == T_BIND:
                if data[pos + 5] == 0 and data[pos + 6] == 0 and not book.unnamed_ok:
                    return self._unread(("26000", "unnamed prepared statement does not exist"), t, data, pos, end)
            elif data[pos + 5] == 83 and data[pos + 6] == 0 and not book.unnamed_ok:
                return self._unread(("26000", "unnamed prepared statement does not exist"), t, data, pos, end)
            return None
        if t == T_FUNCTION:
            if policy is None:
                return None
            return self._unread(("42501", "refused by the gateway: the FunctionCall protocol message is not allowed; "
                                          "use a SQL statement"), t, data, pos, end)
        if t == T_QUERY:
            book.unnamed_ok = False  # a simple Query destroys the unnamed statement
            raw = data[pos + 5 : end - 1]
            if policy is None:
                if self.events.decided is not None:
                    self._unjudged("Q", raw)
                if shadow_only is not None:
                    self._shadow_only(shadow_only, "Q", raw)
                return None
            if self.lexing is not None:
                return self._unread(("0A000", f"refused by the gateway: {self.lexing}"), t, data, pos, end)
        else:  # Parse
            if policy is None and data[pos + 5] == 0 and self.events.decided is None and shadow_only is None:
                book.unnamed_ok = True  # the server checks the rest of the message
                return None
            body = data[pos + 5 : end]
            name_end = body.find(b"\x00")
            q_end = body.find(b"\x00", name_end + 1)
            if name_end < 0 or q_end < 0:
                raise m.ProtocolError("invalid Parse message")
            raw = body[name_end + 1 : q_end]
            self.parse_name = body[:name_end]
            if name_end == 0:
                book.unnamed_ok = False
            if policy is None:
                if name_end == 0:
                    book.unnamed_ok = True  # the server checks the rest of the message
                if self.events.decided is not None:
                    self._unjudged("P", raw)
                if shadow_only is not None:
                    self._shadow_only(shadow_only, "P", raw)
                return None
            if self.lexing is not None:
                return self._unread(("0A000", f"refused by the gateway: {self.lexing}"), t, data, pos, end)
        try:
            sql = raw.decode(self.codec)
        except UnicodeDecodeError:
            return self._unread(("42501", f"refused by the gateway: statement text is not valid "
                                          f"{self.session.params.get('client_encoding') or 'UTF8'}"), t, data, pos, end)
        si = self.session_info()
        catalog = holder = None
        if policy.rules.may_mask:
            holder = self._holder
            if holder is None or holder.pool.obsolete:
                holder = self._holder = self.session.gw.catalog_for(self.session.pool)
            if holder.stale:
                return WAIT_CATALOG
            catalog = holder.catalog
        self._prep_new = ()  # _session_work fills it; committed only if this message is accepted
        verdict = policy.decide(sql, si, self._skey[si.in_transaction], catalog)
        d = verdict.decision
        if verdict.unknown_tables and catalog is not None:
            holder.saw_unknown()
        shadow = verdict.shadow
        work = None
        if verdict.session_work:  # Query and Parse alike: EXECUTE can come either way
            # shadow files judge an EXECUTE as the statement it runs, as the enforced ones do
            inner = [] if policy.rules.shadow_entries else None
            if not d.refused:
                work = self._session_work(policy, verdict, si, catalog, inner)
            elif inner is not None:  # refused: the opinions only (its effects are never applied)
                session_work(policy, verdict, si, self.book.sql_prepared, catalog, None, inner)
            if inner:
                shadow = merge_shadow(shadow, inner)
        if shadow:
            sev = self.events.shadow_decided
            if sev is not None and self.ticket != data[pos:end]:  # (not again when an approved Query runs)
                enforced = d if work is None or isinstance(work, tuple) else work
                for sd in shadow:
                    sev(self.session, "Q" if t == T_QUERY else "P", sql, sd, enforced)
        if work is not None:
            if isinstance(work, tuple):
                return self._refused(work, t, sql)
            d = work
        ev = self.events.decided
        if t == T_PARSE and book.gated:
            book.gated.pop(data[pos + 5 : pos + 5 + name_end], None)  # the name gets a new text
        if d.action == "require_approval":
            if d.masks:  # a statement that could never run masked is refused now, not after a review
                early = self._mask_ctx(Decision("mask", d.reason, d.rule, d.masks), verdict, sql, si)
                if isinstance(early, tuple):
                    return self._refused(early, t, sql)
            replay = self.ticket is not None
            got = self._approval(t, d, sql, verdict, data, pos, end)
            if ev is not None and not (replay and self.ticket is None):
                ev(self.session, "Q" if t == T_QUERY else "P", sql, d)  # (not again when it runs approved)
            if isinstance(got, tuple):
                return self._refused(got, t, sql, d, True)
            d = got
        elif ev is not None:
            ev(self.session, "Q" if t == T_QUERY else "P", sql, d)
        # from here on a refusal answers a statement events.decided told
        if d.refused:
            return self._refused(refusal_text(d), t, sql, d, True)
        if book.mask_portals:
            for f in verdict.facts:
                if f.command in ("FETCH", "MOVE") and f.prepared_name is not None:
                    if f.prepared_name.encode(self.codec) in book.mask_portals:  # names as the client sent them
                        return self._refused(
                            ("42501", f'refused by the gateway: portal "{f.prepared_name}" reads masked columns; '
                                      "FETCH of it could not be masked (use Execute with a row limit)"), t, sql, d, True)
        ctx = None
        if d.action == "mask":
            ctx = self._mask_ctx(d, verdict, sql, si)
            if isinstance(ctx, tuple):
                return self._refused(ctx, t, sql, d, True)
        if t == T_PARSE:
            if self._prep_new:
                return self._refused(
                    ("42501", "refused by the gateway: send SQL-level PREPARE as a simple query (the "
                              "gateway follows what it prepares only there); drivers' protocol-level "
                              "prepared statements need no PREPARE"), t, sql, d, True)
            if name_end == 0:
                book.unnamed_ok = True
                if ctx is not None:
                    book.mask_stmts[b""] = ctx
                elif book.mask_stmts:
                    book.mask_stmts.pop(b"", None)
            else:
                name = data[pos + 5 : pos + 5 + name_end]
                old = book.mask_stmts.get(name)
                if self.session.rewrite and name in book.stmts:
                    pass  # the gateway refuses this Parse (42P05): the old statement stays as it is
                elif old is not None and (ctx is None or old.key != ctx.key):
                    # the name exists (a Parse reusing it fails on the server) or existed: which
                    # text runs cannot be told here, so mask what either would, by column origin
                    book.mask_stmts[name] = _either(old, ctx)
                elif ctx is not None:
                    book.mask_stmts[name] = ctx
        elif ctx is not None or self._prep_new:
            # the Query's PREPAREs are recorded as the server confirms each one (CommandComplete
            # PREPARE, in order); a PREPARE that fails never makes EXECUTE judged as its text
            self.query_mask = QueryMask(ctx, prepares=list(self._prep_new) if self._prep_new else None)
        else:
            self.query_mask = None
        return None

    # ------------------------------------------------------------------ what a refusal answers

    def _refused(self, refusal: Refusal, t: int, sql: str, decision=None, decided: bool = False) -> Refusal:
        """``refusal`` of the message of type ``t`` with text ``sql``; kept (``refusing``) for
        events.refused. ``decision``: the rules' Decision it follows (with ``decided``: told by
        events.decided already); None when the gateway refuses it itself."""
        self.refusing = (refusal, Refused(MESSAGE_KIND.get(t, chr(t)), sql, decision, decided))
        return refusal

    def _unread(self, refusal: Refusal, t: int, data: bytes, pos: int, end: int) -> Refusal:
        """A refusal made before the statement's text was read: read it now, for the record
        (as the session's encoding reads it, undecodable bytes replaced)."""
        sql = ""
        if t == T_QUERY:
            sql = data[pos + 5 : end - 1].decode(self.codec, "replace")
        elif t == T_PARSE:
            body = data[pos + 5 : end]
            name_end = body.find(b"\x00")
            q_end = body.find(b"\x00", name_end + 1)
            if name_end >= 0 and q_end >= 0:
                sql = body[name_end + 1 : q_end].decode(self.codec, "replace")
        elif t == T_BIND or t == T_DESCRIBE:
            # no text: the names it gives say which statement it would have run or described
            body = data[pos + 5 : end]
            stmt = portal = None
            if t == T_BIND:
                p_end = body.find(b"\x00")
                s_end = body.find(b"\x00", p_end + 1)
                if p_end >= 0 and s_end >= 0:
                    portal, stmt = body[:p_end], body[p_end + 1 : s_end]
            elif body[:1] in (b"S", b"P") and body.find(b"\x00", 1) >= 0:
                name = body[1 : body.find(b"\x00", 1)]
                if body[:1] == b"S":
                    stmt = name
                else:
                    portal = name
            self.refusing = (refusal, Refused(MESSAGE_KIND.get(t, chr(t)), "", None, False, stmt, portal))
            return refusal
        return self._refused(refusal, t, sql)

    # ------------------------------------------------------------------ approvals

    def _approval(self, t: int, d: Decision, sql: str, verdict, data: bytes, pos: int, end: int):
        """A statement the rules send for approval: the Decision it runs under once approved,
        WAIT_APPROVAL (``need`` says what waits), or a refusal. A Query waits whole; a Parse
        passes (nothing runs at Parse) and each Bind of its statement waits, with its parameters,
        unless the Bind is already here and no server is linked: then the Parse waits too, so that
        no server is taken while a human decides."""
        if d.justification and not (justification_in(sql) or self.justification):
            where = d.rule or "default_action"
            return ("42501", f"approval required by {where}: {d.reason}; this rule asks for a justification "
                             "first: add a comment /* justification: why this is needed */ to the statement, or "
                             "SET pooler.justification = 'why this is needed', and send it again")
        approved = Decision("mask", d.reason, d.rule, d.masks) if d.masks else Decision("allow", d.reason, d.rule)
        route = "execute" if any(f.command == "EXECUTE" for f in verdict.facts) else (
            "simple" if t == T_QUERY else "extended")
        desk = self.session.gw.approvals
        if t == T_QUERY:
            msg = data[pos:end]
            if self.ticket is not None and self.ticket == msg:
                self.ticket = None
                return approved
            need = Need(d, sql, verdict.facts, route, (), msg)
            if desk.granted(self.session, need) is not None:
                return approved
            self.need = need
            return WAIT_APPROVAL
        body = data[pos + 5 : end]
        name = body[: body.find(b"\x00")]
        self.book.gated[name] = Need(d, sql, verdict.facts, route)
        if self.session.server is None:
            bind = _next_bind(data, end, name)
            if bind is not None and bind != self.ticket:
                try:
                    _, _, values, formats = bind_parts(bind[5:])
                except (ValueError, IndexError, struct_error):
                    return approved  # a malformed Bind: the Bind stage refuses it (_gated_bind)
                need = Need(d, sql, verdict.facts, route, shown_params(values, formats, self.codec), bind)
                if desk.granted(self.session, need) is not None:
                    self.ticket = bind  # its Bind passes too
                    return approved
                self.need = need
                return WAIT_APPROVAL
        return approved

    def _gated_bind(self, data: bytes, pos: int, end: int) -> Refusal | None:
        """A Bind of a statement that needs approval: None if it may pass, else WAIT_APPROVAL."""
        body = data[pos + 5 : end]
        try:
            _, stmt, values, formats = bind_parts(body)
        except (ValueError, IndexError, struct_error):
            raise m.ProtocolError("invalid Bind message") from None
        gated = self.book.gated.get(stmt)
        if gated is None:
            return None
        msg = data[pos:end]
        if self.ticket is not None and self.ticket == msg:
            self.ticket = None
            return None
        need = Need(gated.decision, gated.sql, gated.facts, gated.route, shown_params(values, formats, self.codec), msg)
        if self.session.gw.approvals.granted(self.session, need) is not None:
            return None
        self.need = need
        return WAIT_APPROVAL

    def _shadow_only(self, policy, kind: str, raw: bytes) -> None:
        """A rule set of shadow files only: their opinions of a statement that runs whatever
        they say (counted and audited as shadow decisions; the enforced side is an allow)."""
        sev = self.events.shadow_decided
        if sev is None:
            return
        sql = raw.decode(self.codec, "replace")
        si = self.session_info()
        verdict = policy.decide(sql, si, self._skey[si.in_transaction])
        shadow = verdict.shadow
        if verdict.session_work:
            # EXECUTE is judged as the statement it runs, as with enforced files: the session's
            # PREPAREs (simple Query), DEALLOCATEs and search_path are followed all the same
            # (what session_work would refuse runs here: only its effects up to there are kept)
            inner: list = []
            pool = self.session.pool
            _, fx = session_work(policy, verdict, si, self.book.sql_prepared, None,
                                 pool.welcome if pool is not None else None, inner)
            if inner:
                shadow = merge_shadow(shadow, inner)
            if fx is not None:
                apply_prepared(self.book.sql_prepared, fx)
                if fx.prepares and kind == "Q":
                    self.query_mask = QueryMask(None, prepares=list(fx.prepares))  # kept as the server confirms
                if fx.justification is not None:
                    self.justification = fx.justification
                for value in fx.search_paths:
                    self.search_path_seen(value)
        if shadow:
            enforced = Decision("allow", "no enforced rules (only shadow files)", "")
            for sd in shadow:
                sev(self.session, kind, sql, sd, enforced)

    def _unjudged(self, kind: str, raw: bytes) -> None:
        """events.decided without rules: the statement as the session's encoding reads it."""
        self.events.decided(self.session, kind, raw.decode(self.codec, "replace"), None)

    def _session_work(self, policy, verdict, si, catalog=None, shadows=None):
        """SQL-level PREPARE/EXECUTE/DEALLOCATE and search_path (policy.sessionwork, the one
        implementation rules tests against recordings use too): EXECUTE is judged as the
        statement it runs. Returns a Decision, or (sqlstate, message) of a refusal. What the
        message did before a refusal is applied all the same (it only forgets prepared
        statements and grows the search_path the rules see: never lets more through)."""
        pool = self.session.pool
        got, fx = session_work(policy, verdict, si, self.book.sql_prepared, catalog,
                               pool.welcome if pool is not None else None, shadows)
        if fx is not None:
            # recorded when the server confirms it (CommandComplete PREPARE): a PREPARE that
            # fails there must never make the rules judge EXECUTE as text the server does not run
            self._prep_new = fx.prepares
            apply_prepared(self.book.sql_prepared, fx)
            if fx.justification is not None:
                self.justification = fx.justification
            for value in fx.search_paths:
                self.search_path_seen(value)
        return got

    # ------------------------------------------------------------------ planning masks

    def _mask_ctx(self, d, verdict, sql: str, si) -> "MaskCtx | Refusal":
        """What the reply side needs to mask this statement's results; or a refusal for the
        statements whose masked values would leave by another way (COPY, cursors, writes)."""
        holder = self._holder or self.session.gw.catalog_for(self.session.pool)
        cat = holder.catalog
        where = d.rule or "the rules"
        lineages = self._lineage(holder, sql, si.search_path)
        inners = []  # the statements EXECUTE runs: part of the plan cache key
        if lineages is not None:
            lineages = list(lineages)
            prepared_here = dict(self._prep_new)  # PREPAREd earlier in this same message
            for i, f in enumerate(verdict.facts):
                if f.command == "EXECUTE" and i < len(lineages):
                    name = f.prepared_name or ""
                    inner = prepared_here.get(name) or self.book.sql_prepared.get(name)
                    inners.append(inner)
                    got = self._lineage(holder, inner, si.search_path) if inner is not None else None
                    lineages[i] = got[0] if got else _NO_LINEAGE
        patterns = compile_masks(d.masks)
        for i, f in enumerate(verdict.facts):
            cmd = f.command
            if cmd == "COPY" or (cmd == "EXPLAIN" and f.inner is not None and f.inner.command == "COPY"):
                return ("42501", f"refused by the gateway: COPY would include columns that {where} masks; "
                                 "use SELECT, whose results are masked")
            if cmd == "DECLARE CURSOR":
                return ("42501", f"refused by the gateway: a cursor over columns that {where} masks cannot be "
                                 "masked; use SELECT (or the extended protocol's row limit) instead")
            # (for EXECUTE, lineages[i] is the prepared statement's: what it writes counts)
            lin = lineages[i] if lineages is not None and i < len(lineages) else None
            if _may_write(f):
                ws = lin.write_sources if lin is not None else None
                if ws is None or any(s == UNKNOWN or method_for(s, patterns) for s in ws):
                    return ("42501", f"refused by the gateway: this {cmd} would copy values of columns that "
                                     f"{where} masks into data that is not masked")
        key = (sql, si.search_path, tuple(inners), lineages is None)
        ctx = MaskCtx(d.masks, lineages, cat, where, key, holder.plan_cache, holder)
        if self.session.gw.config.verbose:
            log.info("masking %s for %s: %s", where, self.session.describe(), ", ".join(f"{c}={mt}" for c, mt in d.masks))
        return ctx

    @staticmethod
    def _lineage(holder, sql: str, search_path):
        key = (sql, search_path)
        cache = holder.lineage_cache
        got = cache.get(key)
        if got is None:
            try:
                got = holder.catalog.lineage(sql, search_path)  # loaded: decide waited for it
            except Exception as e:  # noqa: BLE001 - no lineage: every computed column is masked
                log.debug("lineage of a masked statement failed: %s", e)
                got = ()
            if len(sql) <= 20_000:  # a giant statement is analyzed again rather than kept
                if len(cache) > 5_000:
                    cache.clear()
                cache[key] = got
        return got or None

    def wait_for_catalog(self, wake) -> None:
        """The hold stage's wait for masking's catalog: ``wake`` is called when it is there."""
        self._holder.wait(wake)


def _may_write(f) -> bool:
    """Whether a statement with masks may copy values into data or session state (its
    lineage's write_sources say which): a statement that is not read-only or changes the
    session (``set_config('x', email, false)``), EXECUTE (its prepared statement may write;
    lineages[i] is that statement's) and PREPARE of a write (refused when prepared, before it
    can run)."""
    return (not f.read_only or f.changes_session or f.command == "EXECUTE"
            or (f.command == "PREPARE" and f.inner is not None and not f.inner.read_only))


def _next_bind(data: bytes, pos: int, name: bytes) -> bytes | None:
    """The first Bind of statement ``name`` after ``pos`` and before the next Sync, if it is in
    ``data`` whole."""
    n = len(data)
    while n - pos >= 5:
        t = data[pos]
        (length,) = _unpack_len(data, pos + 1)
        end = pos + 1 + length
        if length < 4 or end > n or t == 83:  # 'S'ync
            return None
        if t == 66:  # 'B'ind: portal name, then statement name
            body = data[pos + 5 : end]
            p_end = body.find(b"\x00")
            s_end = body.find(b"\x00", p_end + 1)
            if p_end >= 0 and s_end >= 0 and body[p_end + 1 : s_end] == name:
                return data[pos:end]
        elif t == 80:  # 'P'arse of the same name replaces it
            body = data[pos + 5 : end]
            if body[: body.find(b"\x00")] == name:
                return None
        pos = end
    return None


def refusal_text(d: Decision) -> Refusal:
    where = d.rule or "default_action"
    if d.action == "deny":
        msg = f"refused by {where}: {d.reason}"
    elif d.action == "require_approval":
        msg = f"approval required by {where}: {d.reason}"
    else:
        cols = ", ".join(f"{c} ({meth})" for c, meth in d.masks)
        msg = (f"masking required by {where} for {cols}"
               + (f": {d.reason}" if d.reason else "")
               + " (this gateway cannot mask results yet, so the statement is refused)")
    return ("42501", msg)


def _either(old, new):
    """Masks for a statement name whose text is one of two: the union of their masks, planned
    by column origin alone (no positions from either text)."""
    masks = dict(old.masks)
    if new is not None:
        masks.update(new.masks)
    merged = tuple(sorted(masks.items()))
    # a flat key: re-Parsing a name again and again never nests it (hashing stays cheap)
    return MaskCtx(merged, None, old.catalog, old.rule, ("either", merged), old.cache, old.holder)
