"""The audit stream: an observer of the event hub that turns logins, failed logins, denials,
masks, approvals, shadow decisions, console commands and reloads into ECS documents
(audit/ecs.py) and hands them to the configured destinations (audit/sinks.py).

Rules this module keeps:
- On the loop it only builds a document, serializes it (orjson) and puts it on each
  destination's bounded queue: no I/O, no waiting. Allowed statements are not audited (the
  ``decided`` handler returns at once for them): the stream is for what a security team acts on.
- A denial is one document, made at the refusal that answers it (``refused``): the event names
  the statement refused and the rules' decision it follows (a deny, or a held statement's
  request that ended without approval), with the SQLSTATE and the message the client got.
  Nothing is kept between events, so a refusal is never taken for an earlier statement's.
  Refusals the gateway makes without a rule (FunctionCall, SQL it cannot read, COPY of masked
  columns, recordings that cannot be written, ...) are denials too, attributed to
  ``rule.name = "gateway"``, with the statement they refused.
- Trusted (called without the hub's guard, so the hot path pays one Python call for
  ``decided``), hence every handler guards itself: an audit bug is logged, never raised into a
  session.
- Secrets never reach a document (audit/ecs.py): statements normalized, secret settings'
  values masked here before the console command is told.
"""

from __future__ import annotations

import logging

from ..audit import ecs
from ..audit.ecs import INFO, NOTICE, WARNING
from ..audit.sinks import FileSink, HttpSink, Item, Sink, SyslogSink
from ..audit.syslog import FACILITIES
from .events import Observer

log = logging.getLogger("pooler.audit")


def sinks_of(cfg) -> list[Sink]:
    """The destinations ``cfg`` configures (not started)."""
    out: list[Sink] = []
    if cfg.audit_file:
        out.append(FileSink(str(cfg.resolve(cfg.audit_file)), cfg.audit_queue_size))
    if cfg.audit_syslog:
        out.append(SyslogSink(cfg.audit_syslog, FACILITIES[cfg.audit_syslog_facility], cfg.audit_queue_size,
                              retries=cfg.audit_http_retries, timeout=cfg.audit_http_timeout))
    if cfg.audit_http_url:
        headers = {"Authorization": f"{cfg.audit_http_auth_scheme} {cfg.audit_http_token}"} if cfg.audit_http_token else {}
        out.append(HttpSink(cfg.audit_http_url, cfg.audit_queue_size, batch=cfg.audit_http_batch,
                            flush=cfg.audit_http_flush, retries=cfg.audit_http_retries, timeout=cfg.audit_http_timeout,
                            fmt=cfg.audit_http_format, headers=headers))
    return out


def _guarded(fn):
    def run(self, *args):
        try:
            fn(self, *args)
        except Exception:  # noqa: BLE001 - the audit never breaks a session
            log.exception("audit: %s failed", fn.__name__)
    run.__name__ = fn.__name__
    return run


class Audit(Observer):
    trusted = True

    def __init__(self, gw, sinks: list[Sink]) -> None:
        self.gw = gw
        self.sinks = sinks
        self._masked: dict[object, dict[tuple[str, str], int]] = {}  # session -> (column, method) -> values masked

    # -- delivery

    def start(self) -> None:
        for s in self.sinks:
            s.start()
        log.info("audit events to %s", ", ".join(_where(s) for s in self.sinks))

    def stop(self) -> None:
        for s in self.sinks:
            s.stop()

    def figures(self) -> dict[str, dict[str, int]]:
        return {s.name: {"sent": s.sent, "dropped": s.dropped, "failed": s.failed} for s in self.sinks}

    def emit(self, doc: dict) -> None:
        ev = doc["event"]
        item = Item(ecs.dumps(doc), ev["severity"], ev["action"], doc["@timestamp"])
        for s in self.sinks:
            s.put(item)

    # -- what a session contributes to a document

    def _who(self, s) -> dict:
        where = ecs.endpoint(s.addr)
        fields = {
            "user": {"name": s.user or s.login_name, "roles": list(s.groups)},
            "source": where, "client": where,
            "db": {"name": s.database, "user": s.pool.server_user if s.pool is not None else None},
            "pooler": {"session": {"id": s.id, "application_name": s.app_name, "login_name":
                                   s.login_name if s.login_name != s.user else None}},
        }
        if s.tls:
            fields["tls"] = {"established": True}
        return fields

    @staticmethod
    def _statement(kind: str, sql: str, decision) -> dict:
        """How the statement came (its normalized text is ``db.statement``)."""
        return {"protocol": {"Q": "simple", "F": "function"}.get(kind, "extended"), "fingerprint": ecs.statement(sql)[1] if sql else None}

    def _ruleset(self) -> str | None:
        p = self.gw.policy
        return p.rules.version if p is not None else None

    def _rule(self, decision) -> dict:
        return {"name": decision.rule or "(default_action)", "ruleset": self._ruleset()}

    # -- sessions

    @_guarded
    def login(self, s) -> None:
        f = self._who(s)
        f["pooler"]["session"].update(auth_method=s.auth_method or "trust", pool_mode=s.mode,
                                      console=True if s.console else None)
        how = f" ({s.auth_method})" if s.auth_method else ""
        self.emit(ecs.document("login", ["authentication", "session"], ["start"], "success",
                               f"{s.user} logged in to {s.database}{how}", **f))

    @_guarded
    def login_failed(self, s, reason: str) -> None:
        f = self._who(s)
        f["user"]["name"] = s.login_name or s.user
        self.emit(ecs.document("login-failed", ["authentication"], ["start"], "failure",
                               f"login of {s.login_name or s.user or '?'} to {s.database or '?'} refused: {reason}",
                               severity=WARNING, reason=reason, **f))

    @_guarded
    def masked(self, s, report) -> None:
        per = self._masked.get(s)
        if per is None:
            per = self._masked[s] = {}
        for column, method, n in report:
            if n:
                per[(column, method)] = per.get((column, method), 0) + n

    @_guarded
    def logout(self, s, reason: str) -> None:
        masked = self._masked.pop(s, None)
        if not s.user:
            return  # never logged in (a failed login was told already)
        f = self._who(s)
        if masked:  # what the session was shown masked, in total
            f["pooler"]["masked_values"] = [{"column": c, "method": m, "values": n}
                                            for (c, m), n in sorted(masked.items())]
        self.emit(ecs.document("logout", ["session"], ["end"], "success", f"{s.user} left {s.database}: {reason}",
                               reason=reason, **f))

    # -- statements

    def statement_decided(self, s, kind: str, sql: str, d) -> None:
        """events.decided, through AuditDecisions (subscribed only while rules are loaded)."""
        if d is None or d.action != "mask":
            return  # allowed: not audited; deny, require_approval: told with the refusal or the hold that follows
        self._decided(s, kind, sql, d)

    @_guarded
    def _decided(self, s, kind: str, sql: str, d) -> None:
        if d.action == "mask":
            f = self._who(s)
            f["db"]["statement"] = ecs.statement(sql)[0]
            f["rule"] = self._rule(d)
            f["pooler"]["statement"] = self._statement(kind, sql, d)
            f["pooler"]["masks"] = [{"column": c, "method": m} for c, m in d.masks]
            self.emit(ecs.document("statement-masked", ["database"], ["access", "allowed"], "success",
                                   f"{d.rule} masks {', '.join(c for c, _ in d.masks)} for {s.user}",
                                   severity=NOTICE, reason=d.reason, **f))

    @_guarded
    def refused(self, s, sqlstate: str, message: str, what) -> None:
        d = what.decision
        if d is not None and not d.refused:
            d = None  # (a statement the rules allowed or masked that the gateway refused: its refusal)
        f = self._who(s)
        f["error"] = {"code": sqlstate, "message": message}
        if what.sql:
            f["db"]["statement"] = ecs.statement(what.sql)[0]
            f["pooler"]["statement"] = self._statement(what.kind, what.sql, d)
        if d is not None:
            f["rule"] = self._rule(d)
            f["pooler"]["decision"] = {"action": d.action, "rule_error": True if d.error else None}
        else:
            f["rule"] = {"name": "gateway"}
        self.emit(ecs.document("statement-denied", ["database"], ["access", "denied"], "failure", message,
                               severity=WARNING, reason=d.reason if d is not None else message, **f))

    @_guarded
    def shadow_decided(self, s, kind: str, sql: str, d, enforced) -> None:
        if not d.error and d.action == "allow" and enforced.action == "allow":
            return  # agrees that it may run: counted (SHOW RULES, metrics), not a document per statement
        f = self._who(s)
        f["db"]["statement"] = ecs.statement(sql)[0]
        f["rule"] = {"name": d.rule, "ruleset": self._ruleset()}
        f["pooler"]["statement"] = self._statement(kind, sql, d)
        f["pooler"]["shadow"] = {"action": "error" if d.error else d.action, "enforced_action": enforced.action,
                                 "would_change": (not d.error and d.action != enforced.action) or None,
                                 "masks": [{"column": c, "method": m} for c, m in d.masks]}
        what = "failed" if d.error else f"would {d.action.replace('_', ' ')}"
        self.emit(ecs.document("shadow-decision", ["database"], ["info"], "unknown",
                               f"shadow rule {d.rule} {what} (enforced: {enforced.action})",
                               severity=WARNING if d.error else INFO, reason=d.reason, **f))

    # -- approvals

    @_guarded
    def held(self, s, r) -> None:
        f = self._who(s)
        f["db"]["statement"] = ecs.statement(r.sql)[0]
        f["rule"] = {"name": r.rule or "(default_action)", "ruleset": self._ruleset()}
        f["pooler"]["approval"] = {"id": r.id, "state": r.state, "route": r.route, "required": r.required,
                                   "justification": r.justification}
        self.emit(ecs.document("approval-requested", ["database"], ["start"], "unknown",
                               f"statement of {s.user} held for approval ({r.id})", severity=NOTICE, reason=r.reason,
                               **f))

    @_guarded
    def hold_ended(self, s, r) -> None:
        f = self._who(s)
        f["db"]["statement"] = ecs.statement(r.sql)[0]
        f["rule"] = {"name": r.rule or "(default_action)", "ruleset": self._ruleset()}
        f["pooler"]["approval"] = {"id": r.id, "state": r.state, "decided_by": r.decided_by,
                                   "reviewers": [who for who, _ in r.approvals], "outcome": r.outcome,
                                   "grant": r.grant_id, "waited": round(max(0.0, r.decided_at - r.created), 3)}
        approved = r.state == "approved"
        by = f" by {r.decided_by}" if r.decided_by else ""
        self.emit(ecs.document("approval-decided", ["database"], ["end", "allowed" if approved else "denied"],
                               "success" if approved else "failure", f"approval {r.id} {r.state}{by}",
                               severity=NOTICE if approved else WARNING, reason=r.outcome, **f))

    # -- the gateway

    @_guarded
    def admin_command(self, s, command: str, detail: str, ok: bool, message: str) -> None:
        f = self._who(s)
        f["pooler"]["admin"] = {"command": command, "argument": detail}
        if not ok:
            f["error"] = {"message": message}
        self.emit(ecs.document(f"admin-{command.lower()}", ["configuration"], ["admin", "change"],
                               "success" if ok else "failure",
                               f"console: {command}{' ' + detail if detail else ''} by {s.user}"
                               + ("" if ok else f" failed: {message}"),
                               severity=NOTICE if ok else WARNING, reason=message, **f))

    @_guarded
    def rules_reloaded(self, ok: bool, version: str, files: list[str], message: str) -> None:
        self.emit(ecs.document("rules-reload", ["configuration"], ["change"], "success" if ok else "failure",
                               f"rules reloaded: version {version}, {len(files)} file(s)" if ok
                               else f"rules not reloaded, version {version} keeps serving: {message}",
                               severity=NOTICE if ok else WARNING, reason=message,
                               rule={"ruleset": version}, pooler={"rules": {"files": files}},
                               error={"message": message} if not ok else None))

    @_guarded
    def config_reloaded(self, ok: bool, path: str, message: str) -> None:
        self.emit(ecs.document("config-reload", ["configuration"], ["change"], "success" if ok else "failure",
                               f"configuration reloaded from {path}" if ok
                               else f"configuration not reloaded, the running one keeps serving: {message}",
                               severity=NOTICE if ok else WARNING, reason=message, file={"path": path},
                               error={"message": message} if not ok else None))


def _where(s: Sink) -> str:
    return getattr(s, "path", None) or getattr(s, "target", None) or getattr(s, "shown", "?")


class AuditDecisions(Observer):
    """The audit stream's ear for decisions, subscribed only while a rule set is active: without
    one every decision is None (nothing to audit), and a listener of ``decided`` would take the
    proxy loop off its no-rules path for every statement."""

    self_guarded = frozenset(("decided",))  # one plain call per statement: the audit's own work below it is guarded (_decided)

    def __init__(self, audit: Audit) -> None:
        self.audit = audit

    def decided(self, s, kind: str, sql: str, d) -> None:
        self.audit.statement_decided(s, kind, sql, d)
