"""Held statements and the reviewers' decisions on them: the approvals book (no I/O, no asyncio).

Rules this module keeps:
- A request is decided once: pending -> approved | denied | expired | withdrawn. Every later
  decision on it is refused with a message saying what happened to it and when.
- Only a reviewer of the request's database decides (``may_review``: in an approver group, or an
  admin console user), and never the identity that asked: nobody approves their own statement.
- ``required`` distinct reviewers must approve; one denial decides.
- A grant (APPROVE id FOR interval) lets the same identity run the same statement shape (pglast
  fingerprint) on the same database without asking, until it ends or is revoked; it is bounded by
  ``max_grant`` seconds.
- Listeners hear every change ("new", "approved", "denied", "expired", "withdrawn", "granted",
  "revoked", plus "approval" for one of several approvals); a listener's exception never
  undoes a decision.
- Time comes from the ``clock`` given (wall seconds), so tests and the gateway decide "when".
"""

from __future__ import annotations

import logging
import re
import secrets
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass, field, fields
from typing import Callable

log = logging.getLogger("pooler.approvals")

PENDING, APPROVED, DENIED, EXPIRED, WITHDRAWN = "pending", "approved", "denied", "expired", "withdrawn"
HISTORY = 200  # decided requests kept for SHOW APPROVALS and the page


class ApprovalError(Exception):
    """A decision that cannot be made (unknown id, already decided, not a reviewer, ...).
    ``status`` is the HTTP status the API answers it with."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True, slots=True)
class Reviewer:
    name: str
    groups: tuple[str, ...] = ()
    via: str = "console"  # console | api
    console_admin: bool = False  # an admin_users user of the console: a reviewer of every database


@dataclass(slots=True)
class Grant:
    id: str
    user: str
    database: str
    fingerprint: str
    sql: str  # the statement that was approved, to show what the grant is for
    granted_by: str
    created: float
    until: float
    approver_groups: tuple[str, ...] = ()
    uses: int = 0
    revoked_by: str = ""

    def active(self, now: float) -> bool:
        return not self.revoked_by and now < self.until

    def as_dict(self, now: float) -> dict:
        return {"id": self.id, "user": self.user, "database": self.database, "fingerprint": self.fingerprint,
                "sql": self.sql, "granted_by": self.granted_by, "created": self.created, "until": self.until,
                "uses": self.uses, "active": self.active(now), "revoked_by": self.revoked_by}


@dataclass(slots=True)
class Request:
    """One held statement and what the reviewers are shown of it."""

    id: str
    created: float
    user: str
    groups: tuple[str, ...]
    client_addr: str
    application_name: str
    database: str
    rule: str
    reason: str
    sql: str
    pretty_sql: str
    params: tuple[str | None, ...]
    route: str  # simple | extended | execute
    tables_read: tuple[str, ...]
    tables_written: tuple[str, ...]
    fingerprint: str
    in_transaction: bool
    justification: str = ""
    required: int = 1
    approver_groups: tuple[str, ...] = ()
    state: str = PENDING
    approvals: list[tuple[str, float]] = field(default_factory=list)  # (reviewer, when)
    decided_by: str = ""
    decided_at: float = 0.0
    outcome: str = ""  # the reviewer's reason, "timed out", "canceled by the client", ...
    grant_id: str = ""
    timeout: float = 0.0  # seconds it may wait
    # the dry run's result when the rule asked for one: {"state": running|done|skipped|failed, ...}
    preview: dict | None = None

    def as_dict(self, now: float) -> dict:
        return {
            "id": self.id, "state": self.state, "created": self.created,
            "waited": round((self.decided_at or now) - self.created, 3),
            "expires": self.created + self.timeout if self.timeout else None,
            "user": self.user, "groups": list(self.groups), "client_addr": self.client_addr,
            "application_name": self.application_name, "database": self.database,
            "rule": self.rule, "reason": self.reason, "sql": self.sql, "pretty_sql": self.pretty_sql,
            "params": list(self.params), "route": self.route, "tables_read": list(self.tables_read),
            "tables_written": list(self.tables_written), "fingerprint": self.fingerprint,
            "in_transaction": self.in_transaction, "justification": self.justification,
            "required": self.required, "approvals": [{"by": b, "at": t} for b, t in self.approvals],
            "decided_by": self.decided_by, "decided_at": self.decided_at or None,
            "outcome": self.outcome, "grant": self.grant_id or None, "preview": self.preview,
        }


Listener = Callable[[str, object], None]


def _from_record(cls, d: dict):
    """A Request or Grant from its stored record (asdict), lists back to tuples."""
    kw = {}
    for f in fields(cls):
        if f.name not in d:
            continue
        v = d[f.name]
        if isinstance(v, list) and f.name != "approvals":
            v = tuple(v)
        elif f.name == "approvals":
            v = [tuple(x) for x in v]
        kw[f.name] = v
    return cls(**kw)


def request_record(r: Request) -> dict:
    return asdict(r)


def request_from(d: dict) -> Request:
    return _from_record(Request, d)


def grant_record(g: Grant) -> dict:
    return asdict(g)


def grant_from(d: dict) -> Grant:
    return _from_record(Grant, d)


def new_id(taken) -> str:
    while True:
        rid = secrets.token_hex(4)
        if rid not in taken:
            return rid


_INTERVAL = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|sec|secs|second|seconds|m|min|mins|minute|minutes|"
                       r"h|hour|hours|d|day|days)?\s*$", re.I)
_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_interval(text: str) -> float:
    """'10 minutes', '10m', '1 hour', '90s', '600' (seconds) -> seconds."""
    mt = _INTERVAL.match(text or "")
    if not mt:
        raise ApprovalError(f"invalid interval {text!r}: use e.g. '10 minutes', '1 hour' or '90s'")
    n = float(mt.group(1))
    unit = (mt.group(2) or "s").lower()
    seconds = n * _UNIT[unit[0]]
    if seconds <= 0:
        raise ApprovalError("a grant must last longer than 0 seconds")
    return seconds


def describe_interval(seconds: float) -> str:
    if seconds < 10 and seconds != int(seconds):
        return f"{seconds:.1f} s"
    seconds = int(round(seconds))
    if seconds % 3600 == 0 and seconds >= 3600:
        return f"{seconds // 3600} h"
    if seconds % 60 == 0 and seconds >= 60:
        return f"{seconds // 60} min"
    return f"{seconds} s"


class ApprovalBook:
    """The requests and grants of one gateway (``approvals_store = memory``)."""

    def __init__(self, clock: Callable[[], float] = time.time, max_grant: float = 3600.0) -> None:
        self.clock = clock
        self.max_grant = max_grant
        self.pending: dict[str, Request] = {}
        self.decided: OrderedDict[str, Request] = OrderedDict()
        self.grants: dict[str, Grant] = {}
        self.listeners: list[Listener] = []

    # ------------------------------------------------------------------ listeners

    def _tell(self, kind: str, what: object) -> None:
        for fn in list(self.listeners):
            try:
                fn(kind, what)
            except Exception:  # noqa: BLE001 - a listener never undoes a decision
                log.exception("approvals listener failed on %s", kind)

    # ------------------------------------------------------------------ requests

    def get(self, rid: str) -> Request:
        r = self.pending.get(rid) or self.decided.get(rid)
        if r is None:
            raise ApprovalError(f"approval request {rid!r} does not exist", 404)
        return r

    def submit(self, req: Request) -> Request:
        req.id = req.id or new_id(self.pending.keys() | self.decided.keys())
        self.pending[req.id] = req
        self._tell("new", req)
        return req

    def _pending(self, rid: str) -> Request:
        r = self.get(rid)
        if r.state != PENDING:
            when = time.strftime("%H:%M:%S", time.localtime(r.decided_at)) if r.decided_at else ""
            by = f" by {r.decided_by}" if r.decided_by else ""
            raise ApprovalError(f"approval request {rid} was already {r.state}{by} at {when}", 409)
        return r

    @staticmethod
    def may_review(reviewer: Reviewer, req: Request) -> str | None:
        """None if ``reviewer`` may decide ``req``, else why not."""
        if reviewer.name == req.user:
            return f"{reviewer.name} asked for request {req.id}: nobody approves their own statement"
        if reviewer.console_admin:
            return None
        if not req.approver_groups:
            return (f"no approver_groups are configured for database {req.database}: "
                    "only admin console users may decide")
        if set(reviewer.groups) & set(req.approver_groups):
            return None
        return (f"{reviewer.name} is not in an approver group of database {req.database} "
                f"({', '.join(req.approver_groups)})")

    def _check(self, rid: str, reviewer: Reviewer) -> Request:
        r = self._pending(rid)
        why = self.may_review(reviewer, r)
        if why is not None:
            raise ApprovalError(why, 403)
        return r

    def approve(self, rid: str, reviewer: Reviewer, grant_for: float | None = None) -> Request:
        """One reviewer's approval; the request is approved when ``required`` distinct reviewers
        have approved. ``grant_for`` (seconds) also grants the statement's shape to its identity."""
        r = self._check(rid, reviewer)
        if grant_for is not None and grant_for > self.max_grant:
            raise ApprovalError(f"a grant may last at most {describe_interval(self.max_grant)} "
                                "(approval_max_grant)")
        if any(b == reviewer.name for b, _ in r.approvals):
            raise ApprovalError(f"{reviewer.name} has already approved request {rid}; "
                                f"it needs {r.required} distinct reviewers", 409)
        now = self.clock()
        r.approvals.append((reviewer.name, now))
        if len(r.approvals) < r.required:
            self._tell("approval", r)
            return r
        if grant_for is not None:
            g = Grant(new_id(self.grants.keys()), r.user, r.database, r.fingerprint, r.sql,
                      reviewer.name, now, now + grant_for, r.approver_groups)
            self.grants[g.id] = g
            r.grant_id = g.id
            self._tell("granted", g)
        self._decide(r, APPROVED, ", ".join(b for b, _ in r.approvals), "")
        return r

    def deny(self, rid: str, reviewer: Reviewer, reason: str) -> Request:
        r = self._check(rid, reviewer)
        reason = (reason or "").strip()
        if not reason:
            raise ApprovalError("a denial needs a reason: DENY id 'reason'")
        self._decide(r, DENIED, reviewer.name, reason)
        return r

    def expire(self, rid: str) -> Request | None:
        r = self.pending.get(rid)
        if r is not None:
            self._decide(r, EXPIRED, "", "timed out")
        return r

    def withdraw(self, rid: str, why: str) -> Request | None:
        r = self.pending.get(rid)
        if r is not None:
            self._decide(r, WITHDRAWN, "", why)
        return r

    def _decide(self, r: Request, state: str, by: str, outcome: str) -> None:
        r.state = state
        r.decided_by = by
        r.decided_at = self.clock()
        r.outcome = outcome
        del self.pending[r.id]
        self.decided[r.id] = r
        while len(self.decided) > HISTORY:
            self.decided.popitem(last=False)
        self._tell(state, r)

    def previewed(self, r: Request, preview: dict) -> None:
        """A dry run of ``r`` ended (or was skipped): reviewers are told."""
        r.preview = preview
        self._tell("preview", r)

    def apply(self, rec: Request) -> None:
        """A request as the shared store has it (approvals_store): kept in the mirror; a local
        pending one that the store says is decided is decided here too (its session wakes)."""
        mine = self.pending.get(rec.id)
        if mine is not None:
            if rec.state == PENDING:
                if rec.approvals != mine.approvals:
                    mine.approvals = rec.approvals
                    self._tell("approval", mine)
                return
            mine.approvals, mine.grant_id = rec.approvals, rec.grant_id
            self._decide(mine, rec.state, rec.decided_by, rec.outcome)
            return
        known = self.decided.get(rec.id)
        if known is not None:
            return  # decided here already (the first word stands)
        if rec.state == PENDING:
            self.pending[rec.id] = rec
            self._tell("new", rec)
        else:
            self.decided[rec.id] = rec
            while len(self.decided) > HISTORY:
                self.decided.popitem(last=False)
            self._tell(rec.state, rec)

    def apply_grant(self, g: Grant) -> None:
        known = self.grants.get(g.id)
        self.grants[g.id] = g
        if known is None:
            self._tell("granted", g)
        elif g.revoked_by and not known.revoked_by:
            self._tell("revoked", g)

    def listing(self) -> list[Request]:
        """Pending first (oldest first), then the decided, newest first."""
        return sorted(self.pending.values(), key=lambda r: r.created) + list(reversed(self.decided.values()))

    # ------------------------------------------------------------------ grants

    def grant_for(self, user: str, database: str, fingerprint: str) -> Grant | None:
        now = self.clock()
        for g in self.grants.values():
            if g.user == user and g.database == database and g.fingerprint == fingerprint and g.active(now):
                g.uses += 1
                return g
        return None

    def revoke(self, gid: str, reviewer: Reviewer) -> Grant:
        g = self.grants.get(gid)
        if g is None:
            raise ApprovalError(f"grant {gid!r} does not exist", 404)
        if not g.active(self.clock()):
            raise ApprovalError(f"grant {gid} has already ended", 409)
        if not (reviewer.console_admin or reviewer.name == g.granted_by
                or set(reviewer.groups) & set(g.approver_groups)):
            raise ApprovalError(f"{reviewer.name} may not revoke grant {gid}", 403)
        g.revoked_by = reviewer.name
        self._tell("revoked", g)
        return g

    def grant_listing(self) -> list[Grant]:
        now = self.clock()
        # ended grants are forgotten after a day
        for gid in [gid for gid, g in self.grants.items() if not g.active(now) and now - g.until > 86400]:
            del self.grants[gid]
        return sorted(self.grants.values(), key=lambda g: -g.created)
