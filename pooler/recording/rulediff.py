"""Rules tested against what really happened: every recorded statement decided again with a
candidate rule set, and what would change (``pooler rules test DIR --against RECORDINGS``).

Rules this module keeps:
- The statement is decided as the gateway decided it (policy.engine.Policy, the same facts and
  the same Starlark call), for the session the recording names: its identity, groups,
  database, application_name, client address; whether it was inside a transaction (followed
  from the command tags before it); the search_path its SET search_path statements built;
  SQL-level EXECUTE judged as the statement its PREPARE named. What session commands do
  (EXECUTE's judgement and the merging of its masks, PREPARE/DEALLOCATE, SET search_path) is
  policy.sessionwork, the very code governor.py runs: no copy that could differ.
- The baseline is what the recording says was decided (``action``, ``rule``, ``reason``,
  ``masks``), or, with another rule set given as baseline, that rule set decided the same way
  offline; the second compares rules with rules only (nothing the gateway knew at the time, such
  as masking's catalog of views, differs between the two sides).
- A change is classified by what an agent would notice: ``newly denied``, ``newly allowed``
  (was denied), ``approval required`` / ``approval no longer required``, ``masks added``,
  ``masks dropped``, ``mask method changed``, and, with the same effect, ``decided by another
  rule`` / ``reason changed`` (the message the agent reads differs). A rule is its file within
  the rule set: the directory's own name (``rules/`` or ``rules-candidate/``) is no difference.
- Fail closed, as the gateway: a candidate rule that breaks decides deny, which shows as newly
  denied naming the rule and the error.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..policy.engine import Policy, SessionInfo
from ..policy.rules import Decision, RuleSet
from ..policy.sessionwork import SessionEffects, apply_prepared, grown_search_path, session_work
from .timeline import statements

KINDS = ("newly denied", "newly allowed", "approval required", "approval no longer required", "masks added",
         "masks dropped", "mask method changed", "decided by another rule", "reason changed")


@dataclass(slots=True)
class Change:
    sid: str
    q: int
    ts: float | None
    user: str
    database: str
    sql: str
    before: Decision
    after: Decision
    kinds: list[str]
    detail: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        def d(x: Decision) -> dict:
            return {"action": x.action, "rule": x.rule, "reason": x.reason, "masks": [list(m) for m in x.masks]}

        return {"sid": self.sid, "q": self.q, "ts": self.ts, "user": self.user, "database": self.database,
                "sql": self.sql, "changes": self.kinds, "detail": self.detail, "before": d(self.before),
                "after": d(self.after)}


@dataclass(slots=True)
class Report:
    sessions: int = 0
    statements: int = 0
    judged: int = 0  # statements decided again (those recorded without rules have nothing to compare)
    skipped: int = 0
    changes: list[Change] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        got = dict.fromkeys(KINDS, 0)
        for c in self.changes:
            for k in c.kinds:
                got[k] += 1
        return got


def _rule_file(name: str) -> str:
    """A rule's file within its rule set: ``rules/20_agents.star`` and
    ``rules-candidate/20_agents.star`` are the same rule (names start with the directory's)."""
    return name.split("/", 1)[1] if "/" in name else name


def classify(before: Decision, after: Decision) -> tuple[list[str], list[str]]:
    """What differs between two decisions of one statement, as kinds (KINDS) and details."""
    kinds: list[str] = []
    detail: list[str] = []
    b, a = before.action, after.action
    if a == "deny" and b != "deny":
        kinds.append("newly denied")
    elif b == "deny" and a != "deny":
        kinds.append("newly allowed")
    if a != "deny" and b != "deny":
        if a == "require_approval" and b != "require_approval":
            kinds.append("approval required")
        elif b == "require_approval" and a != "require_approval":
            kinds.append("approval no longer required")
    if a != "deny" and b != "deny":
        bm, am = dict(before.masks), dict(after.masks)
        added = [c for c in am if c not in bm]
        dropped = [c for c in bm if c not in am]
        changed = [c for c in am if c in bm and am[c] != bm[c]]
        if added:
            kinds.append("masks added")
            detail.append("masks added: " + ", ".join(f"{c}={am[c]}" for c in added))
        if dropped:
            kinds.append("masks dropped")
            detail.append("masks dropped: " + ", ".join(f"{c}={bm[c]}" for c in dropped))
        if changed:
            kinds.append("mask method changed")
            detail.append("mask method changed: " + ", ".join(f"{c} {bm[c]} -> {am[c]}" for c in changed))
    if not kinds:
        if _rule_file(before.rule) != _rule_file(after.rule):
            kinds.append("decided by another rule")
        elif before.reason != after.reason:
            kinds.append("reason changed")
    return kinds, detail


def _recorded(st: dict) -> Decision:
    return Decision(st["action"], st["reason"], st["rule"], tuple((c, m) for c, m in st["masks"]))


class _Session:
    """What the gateway knew of a session when it decided a statement."""

    def __init__(self, login: dict) -> None:
        self.login = login
        self.in_tx = False
        # as the rules saw it at login (options=-c search_path=...; recordings before it had the field: the default)
        self.search_path: tuple[str, ...] = tuple(login.get("search_path") or ("public",))
        self.prepared: dict[str, str] = {}

    def info(self) -> SessionInfo:
        lg = self.login
        client = str(lg.get("client") or "")
        addr = "unix" if client == "unix" else client.rsplit(":", 1)[0]
        return SessionInfo(str(lg.get("user") or ""), str(lg.get("database") or ""), tuple(lg.get("groups") or ()),
                           str(lg.get("app") or ""), addr, self.in_tx, self.search_path)

    def after(self, st: dict, work: _Work | None) -> None:
        """Follow what the statement did to the session: transaction state from its command
        tags; what its session commands did as governor.py follows them (policy.sessionwork,
        the gateway's own implementation): once the rules let the message through, the
        search_path grows and DEALLOCATE forgets, even if it is refused after (as in the
        gateway); a PREPARE counts once the server confirmed it (CommandComplete PREPARE, in
        order). What the recording shows the server did counts whatever the rules deciding now
        say of it (its later statements ran in that session)."""
        ran = st["refused"] is None
        fx = work.effects if work is not None else None
        if fx is not None and (work.passed or ran):
            for value in fx.search_paths:
                self.search_path = grown_search_path(self.search_path, value)
            apply_prepared(self.prepared, fx)
        if not ran:
            return  # refused: it did nothing (inside a transaction it failed it: still inside)
        confirmed = 0
        for r in st["results"]:
            tag = (r["tag"] or "").upper() if r["t"] == "done" else ""
            if tag in ("BEGIN", "START TRANSACTION"):
                self.in_tx = True
            elif tag in ("COMMIT", "ROLLBACK", "PREPARE TRANSACTION"):
                self.in_tx = False
            elif tag == "PREPARE":
                confirmed += 1
        if fx is not None:
            for name, text in fx.prepares[:confirmed]:
                self.prepared[name] = text


class _Work:
    """What a message's session commands did (policy.sessionwork.SessionEffects, None: nothing)
    and whether the rules deciding now let it through (else it is followed only as far as the
    recording shows it ran)."""

    __slots__ = ("effects", "passed")

    def __init__(self, effects: SessionEffects | None, passed: bool) -> None:
        self.effects = effects
        self.passed = passed


def decide(policy: Policy, sql: str, sess: _Session, catalog=None) -> tuple[Decision, _Work | None]:
    """The decision the gateway would make for ``sql`` in this session, and what its session
    commands do (None: it has none). With ``catalog`` (masking.catalog.Catalog) the facts are
    enriched as the gateway enriches them for a rule set that may mask. SQL-level EXECUTE is
    judged as governor.py judges it (policy.sessionwork): as the statement it runs, its masks
    merged with the message's; a message the gateway itself would refuse there (EXECUTE of a
    name not prepared, PREPARE of a name that is) decides deny by ``gateway``, as recordings
    name such refusals."""
    if not policy.rules.may_mask:
        catalog = None
    si = sess.info()
    v = policy.decide(sql, si, None, catalog)
    d = v.decision
    if not v.session_work:
        return d, None
    got, fx = session_work(policy, v, si, sess.prepared, catalog)
    if d.refused:
        return d, _Work(fx, False)
    if isinstance(got, tuple):  # (sqlstate, message)
        return Decision("deny", got[1], "gateway"), _Work(fx, True)
    return got, _Work(fx, True)


def compare(sessions, candidate: RuleSet, baseline: RuleSet | None = None, catalog=None,
            since: float | None = None, until: float | None = None) -> Report:
    """Decide every statement of ``sessions`` (reader.iter_sessions) with ``candidate`` and
    compare with the recorded decision, or with ``baseline``'s; ``catalog``: masking's catalog
    of the sessions' database (without it, views are not seen through). Only statements in
    ``[since, until)`` are compared and counted; those before still build the session's state."""
    cand = Policy(candidate)
    base = Policy(baseline) if baseline is not None else None
    rep = Report()
    for s in sessions:
        rep.sessions += 1
        login = s.get("login") or {}
        sess_c, sess_b = _Session(login), _Session(login)
        for st in statements(s):
            ts = st["ts"] or 0.0
            counted = (since is None or ts >= since) and (until is None or ts < until)
            if not counted and (until is None or ts < until):
                sess_c.after(st, decide(cand, st["sql"], sess_c, catalog)[1])  # what it did to the session
                if base is not None:
                    sess_b.after(st, decide(base, st["sql"], sess_b, catalog)[1])
                continue
            if not counted:
                break  # later statements change nothing that is compared
            rep.statements += 1
            if (st["action"] is None and base is None) or st["gateway"]:
                # recorded without rules: nothing to compare with; refused by the gateway before
                # the rules decided (it never ran): the rules' decision then was not recorded
                rep.skipped += 1
                continue
            after, work = decide(cand, st["sql"], sess_c, catalog)
            if base is not None:
                before, bwork = decide(base, st["sql"], sess_b, catalog)
                sess_b.after(st, bwork)
            else:
                before = _recorded(st)
            sess_c.after(st, work)
            rep.judged += 1
            kinds, detail = classify(before, after)
            if kinds:
                rep.changes.append(Change(s.get("sid"), st["q"], st["ts"], str(login.get("user") or ""),
                                          str(login.get("database") or ""), st["sql"], before, after, kinds, detail))
    return rep
