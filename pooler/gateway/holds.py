"""The hold stage's approvals desk: statements a rule sent for approval wait here, without a
server, until reviewers decide (approvals/book.py keeps the requests and the rules of deciding).

Rules this module keeps:
- A held statement is told to its client at once (a NoticeResponse naming the request, the rule
  and where to decide) and ends exactly once: approved (it runs as sent), denied, timed out
  (``approval_timeout``) or withdrawn (the client's CancelRequest, or its disconnect). The
  session is woken with the outcome (``ClientSession.approval_decided``).
- Fail closed: whatever goes wrong while a statement waits (the desk is stopped, the gateway
  shuts down) ends its request as refused, never as run.
- Nothing here blocks the event loop; the webhook is sent from a thread of its own.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any

from ..approvals.book import APPROVED, DENIED, EXPIRED, PENDING, WITHDRAWN, ApprovalBook, Request, Reviewer
from ..approvals.book import describe_interval
from ..approvals.present import bind_parts, fingerprint, justification_in, pretty
from ..approvals.preview import masked_sample, note_for, preview_sql, why_not
from ..approvals.webhook import Webhook
from ..protocol import messages as m

log = logging.getLogger("pooler.approvals")


@dataclass(slots=True)
class Need:
    """What the decide stage knows of a statement that needs approval."""

    decision: Any  # policy.rules.Decision (action require_approval; masks that apply once approved)
    sql: str
    facts: tuple
    route: str  # simple | extended | execute
    params: tuple = ()
    ticket: bytes = b""  # the message that runs once approved (a Query, or the statement's Bind)


class ApprovalDesk:
    def __init__(self, gw: Any) -> None:
        self.gw = gw
        cfg = gw.config
        self.book = ApprovalBook(max_grant=cfg.approval_max_grant)
        self.book.listeners.append(self._changed)
        self.sessions: dict[str, Any] = {}  # request id -> the held session
        self.timers: dict[str, asyncio.TimerHandle] = {}
        self.store = None
        if cfg.approvals_store != "memory":
            from .approval_store import PgStore, default_gateway_name  # asyncpg, loaded only when used
            self.store = PgStore(self, cfg.approvals_store, cfg.approvals_gateway_name or default_gateway_name(cfg))
        self.webhook = Webhook(cfg.approval_webhook) if cfg.approval_webhook else None
        if self.webhook is not None:
            self.book.listeners.append(self.webhook.changed)
        self.url = ""  # the page, once approvals_listen serves it (approvals_http.py)
        self.previews: set[asyncio.Task] = set()  # dry runs in progress

    # ------------------------------------------------------------------ holding

    def approver_groups(self, session) -> tuple[str, ...]:
        db = getattr(session.pool, "db", None)
        groups = getattr(db, "approver_groups", None) if db is not None else None
        return tuple(groups) if groups else self.gw.config.approver_groups

    def hold(self, session, need: Need) -> Request:
        cfg = self.gw.config
        d = need.decision
        facts = need.facts
        read = tuple(dict.fromkeys(t for f in facts for t in f.tables if t not in f.tables_written))
        written = tuple(dict.fromkeys(t for f in facts for t in f.tables_written))
        justification = justification_in(need.sql) or session.governor.justification
        req = Request(
            id="", created=time.time(), user=session.user, groups=tuple(session.groups),
            client_addr=session.addr, application_name=session.params.get("application_name", ""),
            database=session.database, rule=d.rule or "default_action", reason=d.reason, sql=need.sql,
            pretty_sql=pretty(need.sql), params=need.params, route=need.route, tables_read=read,
            tables_written=written, fingerprint=fingerprint(need.sql),
            in_transaction=session.tx_status != m.TX_IDLE, justification=justification,
            required=cfg.approvals_required, approver_groups=self.approver_groups(session),
            timeout=cfg.approval_timeout)
        self.book.submit(req)
        self.sessions[req.id] = session
        if self.store is not None:
            self.store.submitted(req)
        if cfg.approval_timeout:
            self.timers[req.id] = asyncio.get_running_loop().call_later(
                cfg.approval_timeout, self.book.expire, req.id)
        log.info("statement held for approval: request %s for %s (%s: %s)", req.id, session.describe(),
                 req.rule, req.reason)
        session.write(self.notice(req))
        if d.preview:
            self._start_preview(req, session, need)
        ev = self.gw.events.held
        if ev is not None:
            ev(session, req)
        return req

    def granted(self, session, need: Need):
        """A grant that lets this statement run without asking (None if none)."""
        g = self.book.grant_for(session.user, session.database, fingerprint(need.sql))
        if g is not None and self.store is not None:
            self.store.grant_used(g)
        if g is not None:
            log.info("statement of %s runs under grant %s (by %s, for its shape)", session.describe(), g.id,
                     g.granted_by)
        return g

    def notice(self, req: Request) -> bytes:
        cfg = self.gw.config
        where = [f'the admin console: psql -p {cfg.listen_port} -U <admin> pgbouncer -c "APPROVE {req.id}"']
        if self.url:
            where.append(f"{self.url}#{req.id}")
        need = f"{req.required} reviewers" if req.required > 1 else "a reviewer"
        timeout = f"within {describe_interval(cfg.approval_timeout)}" if cfg.approval_timeout else "ever"
        return m.notice_response(
            "00000", f"statement held for approval: request {req.id} ({req.rule}: {req.reason})",
            detail=f"It runs as soon as {need} approve it, and is refused if nobody decides {timeout}. "
                   "Cancel (Ctrl-C) withdraws the request.",
            hint="Decide with " + ", or at ".join(where))

    # ------------------------------------------------------------------ dry runs

    def _start_preview(self, req: Request, session, need: Need) -> None:
        why = why_not(need.facts)
        if why is None and session.pool is None:
            why = "no pool to run it on"
        if why is not None:
            self.book.previewed(req, {"state": "skipped", "why": why})
            return
        # the rows are shown as the agent would see them: the rules judge reading them (RETURNING *)
        try:
            sql = preview_sql(need.sql)
            gov = session.governor
            holder = gov._holder
            seen = self.gw.policy.decide(sql, gov.session_info(), None,
                                         holder.catalog if holder is not None else None).decision
        except Exception as e:  # noqa: BLE001 - no preview rather than an unjudged one
            self.book.previewed(req, {"state": "skipped", "why": f"it cannot be rewritten to show its rows ({e})"})
            return
        masks = seen.masks if seen.action in ("mask", "require_approval") else ()
        req.preview = {"state": "running"}
        task = asyncio.get_running_loop().create_task(
            self._preview(req, session.pool, need, sql, masks, seen.action != "deny", session.governor.codec))
        self.previews.add(task)
        task.add_done_callback(self.previews.discard)

    async def _preview(self, req: Request, pool, need: Need, sql: str, masks, show_rows: bool, codec: str) -> None:
        """Run the statement inside a transaction that is rolled back, on a side connection of
        the pool (its upstream user), with its own timeout; show what it would change."""
        cfg = self.gw.config
        limit = cfg.approval_preview_timeout
        srv = None
        try:
            async with asyncio.timeout(limit + (cfg.server_connect_timeout or 15)):
                srv = await pool.open_connection(side=True)
                ms = max(1, int(limit * 1000))
                await srv.run_query(f"BEGIN; SET LOCAL statement_timeout = {ms}; "
                                    f"SET LOCAL lock_timeout = {max(1, ms // 2)}; "
                                    "SET LOCAL idle_in_transaction_session_timeout = 0")
                if need.ticket[:1] == b"B":  # the held Bind's values, as the client bound them
                    _, _, values, formats = bind_parts(need.ticket[5:])
                    payload = (m.parse(b"", sql.encode(codec) + b"\x00\x00\x00") + m.bind(b"", b"", values, formats)
                               + m.describe_portal(b"") + m.execute() + m.SYNC)
                    rows = await srv.run_messages(payload)
                else:
                    rows = await srv.run_query(sql)
                names = srv.collected_names[-1] if srv.collected_names else []
                await srv.run_query("ROLLBACK")
            table = next((t for f in need.facts for t in f.tables_written), "")
            count, cols, sample = masked_sample(table, names, rows[-1] if rows else [], masks, cfg.mask_key, codec)
            note = note_for(need.facts)
            if not show_rows:  # the rules would not let the agent read them: the count only
                cols, sample = [], []
                note += "; rows not shown: the rules do not let this identity read them"
            result = {"state": "done", "rows": count, "columns": cols, "sample": sample, "note": note}
        except TimeoutError:
            result = {"state": "failed", "error": f"the dry run took longer than approval_preview_timeout ({limit:g} s)"}
        except Exception as e:  # noqa: BLE001 - a failed dry run is shown, never fatal
            result = {"state": "failed", "error": str(e) or type(e).__name__}
        finally:
            if srv is not None:
                srv.close("dry run over")  # never reused: its transaction ends with it
        if req.state == PENDING:
            self.book.previewed(req, result)
        else:
            req.preview = result

    # ------------------------------------------------------------------ outcomes

    def withdraw(self, req: Request, why: str) -> None:
        self.book.withdraw(req.id, why)

    def _changed(self, kind: str, what) -> None:
        if kind not in (APPROVED, DENIED, EXPIRED, WITHDRAWN):
            return
        req = what
        timer = self.timers.pop(req.id, None)
        if timer is not None:
            timer.cancel()
        session = self.sessions.pop(req.id, None)
        if self.store is not None and session is not None and kind in (EXPIRED, WITHDRAWN):
            self.store.ended_here(req)
        log.info("approval request %s %s%s%s", req.id, req.state, f" by {req.decided_by}" if req.decided_by else "",
                 f": {req.outcome}" if req.outcome else "")
        ev = self.gw.events.hold_ended
        if ev is not None and session is not None:
            ev(session, req)
        if session is not None:
            session.approval_decided(req)

    async def start(self) -> None:
        if self.store is not None:
            await self.store.start()

    def stop(self) -> None:
        """The gateway stops: every request held here is refused to its client."""
        for rid in list(self.sessions):
            self.book.withdraw(rid, "the gateway is shutting down")
        if self.store is not None:
            asyncio.get_running_loop().create_task(self.store.stop())
        for task in list(self.previews):
            task.cancel()
        if self.webhook is not None:
            self.webhook.stop()

    # ------------------------------------------------------------------ deciding (console, API)

    async def approve(self, rid: str, reviewer: Reviewer, seconds: float | None) -> Request:
        if self.store is not None:
            return await self.store.decide("approve", rid, reviewer, seconds)
        return self.book.approve(rid, reviewer, seconds)

    async def deny(self, rid: str, reviewer: Reviewer, reason: str) -> Request:
        if self.store is not None:
            return await self.store.decide("deny", rid, reviewer, reason)
        return self.book.deny(rid, reviewer, reason)

    async def revoke(self, gid: str, reviewer: Reviewer):
        if self.store is not None:
            return await self.store.revoke(gid, reviewer)
        return self.book.revoke(gid, reviewer)

    # ------------------------------------------------------------------ reviewers

    @staticmethod
    def console_reviewer(s) -> Reviewer:
        return Reviewer(s.user, tuple(s.groups), "console", console_admin=bool(s.admin_user))

    def pending_count(self) -> int:
        return sum(1 for r in self.book.pending.values() if r.state == PENDING)


def refusal_of(req: Request) -> tuple[str, str, str, str]:
    """(sqlstate, message, detail, hint) a held statement's client is told when it does not run."""
    held = f"approval required by {req.rule}: {req.reason}"
    detail = f"request {req.id}, held {describe_interval(max(req.decided_at - req.created, 0))}"
    if req.state == DENIED:
        return ("42501", f"denied by reviewer {req.decided_by}: {req.outcome} ({held}; request {req.id})", detail,
                "Change the statement, or ask the reviewer; sending it again asks for a new approval.")
    if req.state == EXPIRED:
        return ("42501", f"{held}; request {req.id} timed out after {describe_interval(req.timeout)} without a "
                         "decision", detail,
                "Send the statement again to ask again, after telling a reviewer (approval_timeout).")
    if req.outcome == "canceled by the client":
        return ("57014", "canceling statement due to user request", f"{detail}; the approval request was withdrawn", "")
    return ("42501", f"{held}; request {req.id} ended without approval: {req.outcome}", detail,
            "Send the statement again to ask again.")
