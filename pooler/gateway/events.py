"""What happened in the gateway, told to observers the core does not know (the log lines, the
counters behind the stats log and the console, recordings, metrics).

Rules this module keeps:
- One hub per gateway (``Events``); each event is an attribute that is ``None`` while nobody
  listens, so the core pays one attribute load and an ``is None`` test for an event nobody
  wants: ``ev = self.events.ready; if ev is not None: ev(...)``.
- An observer subclasses ``Observer`` and defines the events it wants, as methods with the
  signatures below; only those are called.
- An observer's exception is logged and swallowed: it never breaks the session that reported
  the event. An observer whose failure must stop traffic (a recorder that cannot write) says so
  through the gateway, not by raising here; it learns of its own exceptions through
  ``Observer.observer_failed``. The gateway's own observers (``trusted = True``:
  counters and log lines, pinned by tests) are called without that guard, one Python call less
  on the hot path; so are the events an observer names in ``self_guarded``, whose methods
  catch their own exceptions (the recorder's per-statement events).
- Events are reported synchronously on the event loop: an observer that does I/O buffers and
  hands it to a thread.

The events, in a session's order (``session`` is the ClientSession, ``server`` the ServerConn):

    login(session)                                   logged in; identity, groups, database known
    login_failed(session, reason)                    a login refused (reason for the log only)
    decided(session, kind, sql, decision)            a Query ('Q') or Parse ('P') judged; decision
                                                     is the policy's Decision (None: no rules)
    bound(session, data, pos, end)                   a Bind (the message is data[pos:end]): an
                                                     execution's parameters
    refused(session, sqlstate, message, what)        the gateway refused a request itself; ``what``
                                                     (a ``Refused``) says which statement, and whether
                                                     ``decided`` told it already
    held(session, request)                           a statement waits for approval (approvals.book.Request)
    hold_ended(session, request)                     ... and its request ended (request.state says how)
    server_assigned(session, server, waited)         a server linked to the session (waited: seconds
                                                     spent waiting for it, 0.0 if none)
    forwarded(session, server, nbytes)               request bytes sent to the server
    completed(session, server, tag, rows, nbytes, seconds)
                                                     one statement's result ended (CommandComplete or
                                                     EmptyQueryResponse): its tag, rows from the tag
                                                     (None where it has none), server bytes, duration
    suspended(session, server, nbytes, seconds)      an Execute's row limit was reached (PortalSuspended):
                                                     the portal may be executed again for more rows
    failed(session, server, sqlstate, message)       the server answered a request with an error
    notice(session, server, severity, sqlstate, message)
                                                     a NoticeResponse the server sent while answering
                                                     (as the client gets it: scrubbed when masked);
                                                     only while watching (see below)
    row(session, server, body)                       a DataRow as the client was sent it (masked),
                                                     body without type and length; None for a row
                                                     streamed in pieces. Only the first
                                                     ``Events.rows_wanted`` rows of each result
    masked(session, report)                          a masked result ended: [(column, method, values
                                                     masked)]
    ready(session, server, status, started, sent, received)
                                                     ReadyForQuery with nothing outstanding: a round
                                                     ended (status I/T/E; started: monotonic time of
                                                     its first request; bytes both ways)
    server_released(session, server)                 the server went back to its pool (or closed)
    logout(session, reason)                          the session ended
    canceled(session)                                a cancel request for the session arrived
    shadow_decided(session, kind, sql, shadow, enforced)
                                                     a Query or Parse a MODE = "shadow" rule file has
                                                     an opinion about (once per such file): its Decision
                                                     (``error`` set when the rule failed) and the
                                                     enforced one

Events of the gateway rather than of one client's statements:

    admin_command(session, command, detail, ok, message)
                                                     a console command other than SHOW ran (PAUSE,
                                                     KILL, SET, RELOAD, APPROVE, ...): its verb, its
                                                     argument (values of secret settings replaced by
                                                     ********), whether it succeeded, and the error
    rules_reloaded(ok, version, files, message)      the rule set was loaded again (SIGHUP, RELOAD, SET
                                                     rules_dir): ok, the version serving now, its files,
                                                     the error when it was refused
    config_reloaded(ok, path, message)               the config file was read again (SIGHUP, RELOAD):
                                                     ok, its path, the error when it was refused

``completed``, ``suspended``, ``failed`` and ``row`` make every server take the reply loop that reads each message (the
fast lane forwards small replies without looking at their tags): subscribe to them only where
they are needed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable

log = logging.getLogger("pooler.events")


@dataclass(frozen=True, slots=True)
class Refused:
    """What a refusal (``refused``) answers. A refusal the rules' decision explains follows that
    statement's ``decided`` (``decided`` True, ``decision`` the rules' Decision). One the
    gateway makes before the rules decide (recordings cannot be written, SQL it cannot read as
    the server would, a FunctionCall, PREPARE of a name in use, ...) has had no ``decided``:
    ``decided`` is False, and ``kind``, ``sql`` and, for a Bind or Describe, the names it gives
    are all an observer learns of the statement (``decision`` None: the gateway refused it, not
    a rule)."""

    kind: str  # the message refused: 'Q' Query, 'P' Parse, 'B' Bind, 'D' Describe, 'F' FunctionCall
    sql: str  # its statement text as the gateway read it ("" for a message without one)
    decision: Any = None  # the rules' Decision the refusal follows; None when the gateway refused it itself
    decided: bool = False  # ``decided`` reported this statement just before (its record exists)
    # the names a refused Bind or Describe gives, as sent (None where the message has none): the
    # prepared statement (a Bind's, a Describe 'S''s) and the portal (a Bind's, a Describe 'P''s)
    stmt: bytes | None = None
    portal: bytes | None = None

EVENTS = ("login", "login_failed", "decided", "bound", "refused", "held", "hold_ended", "server_assigned", "forwarded",
          "completed", "suspended", "failed", "notice", "row", "masked", "ready", "server_released", "logout", "canceled",
          "shadow_decided", "admin_command", "rules_reloaded", "config_reloaded")


class Observer:
    """Base class of observers: override the events you want (signatures in the module doc)."""

    trusted = False  # True only for the gateway's own observers: called without a guard
    # events whose methods catch their own exceptions (and tell observer_failed): called
    # without the hub's guard too
    self_guarded: frozenset[str] = frozenset()

    def login(self, session) -> None: ...
    def login_failed(self, session, reason: str) -> None: ...
    def decided(self, session, kind: str, sql: str, decision) -> None: ...
    def bound(self, session, data: bytes, pos: int, end: int) -> None: ...
    def refused(self, session, sqlstate: str, message: str, what: Refused) -> None: ...
    def held(self, session, request) -> None: ...
    def hold_ended(self, session, request) -> None: ...
    def server_assigned(self, session, server, waited: float) -> None: ...
    def forwarded(self, session, server, nbytes: int) -> None: ...
    def completed(self, session, server, tag: str, rows: int | None, nbytes: int, seconds: float) -> None: ...
    def suspended(self, session, server, nbytes: int, seconds: float) -> None: ...
    def failed(self, session, server, sqlstate: str, message: str) -> None: ...
    def notice(self, session, server, severity: str, sqlstate: str, message: str) -> None: ...
    def row(self, session, server, body: bytes | None) -> None: ...
    def masked(self, session, report: list[tuple[str, int]]) -> None: ...
    def ready(self, session, server, status: int, started: float, sent: int, received: int) -> None: ...
    def server_released(self, session, server) -> None: ...
    def logout(self, session, reason: str) -> None: ...
    def canceled(self, session) -> None: ...
    def shadow_decided(self, session, kind: str, sql: str, shadow, enforced) -> None: ...
    def admin_command(self, session, command: str, detail: str, ok: bool, message: str) -> None: ...
    def rules_reloaded(self, ok: bool, version: str, files: list[str], message: str) -> None: ...
    def config_reloaded(self, ok: bool, path: str, message: str) -> None: ...

    rows_wanted = 0  # an observer of ``row``: how many rows of each result it wants

    def observer_failed(self, event: str, exc: BaseException) -> None:
        """This observer raised on ``event`` (logged already): an observer whose failure must
        stop traffic says so to the gateway here."""


def _dispatcher(name: str, handlers: list[Callable], trusted: bool) -> Callable:
    if trusted and len(handlers) == 1:
        return handlers[0]
    if trusted and len(handlers) == 2:
        first, second = handlers

        def both(*args: Any) -> None:
            first(*args)
            second(*args)
        return both
    if len(handlers) == 1:
        (h,) = handlers

        def one(*args: Any) -> None:
            try:
                h(*args)
            except Exception as e:  # noqa: BLE001 - an observer never breaks the session
                log.exception("observer %r failed on %s", h, name)
                _tell(h, name, e)
        return one

    def fan_out(*args: Any) -> None:
        for h in handlers:
            try:
                h(*args)
            except Exception as e:  # noqa: BLE001
                log.exception("observer %r failed on %s", h, name)
                _tell(h, name, e)
    return fan_out


def _tell(handler: Callable, name: str, exc: BaseException) -> None:
    obs = getattr(handler, "__self__", None)
    if isinstance(obs, Observer):
        try:
            obs.observer_failed(name, exc)
        except Exception:  # noqa: BLE001
            log.exception("observer %r failed on observer_failed", obs)


class Events:
    """The hub: ``subscribe(observer)``; each event attribute is None or a callable."""

    __slots__ = EVENTS + ("observers", "watching", "rows_wanted")

    login: Callable | None
    login_failed: Callable | None
    decided: Callable | None
    bound: Callable | None
    refused: Callable | None
    held: Callable | None
    hold_ended: Callable | None
    server_assigned: Callable | None
    forwarded: Callable | None
    completed: Callable | None
    suspended: Callable | None
    failed: Callable | None
    notice: Callable | None
    row: Callable | None
    masked: Callable | None
    ready: Callable | None
    server_released: Callable | None
    logout: Callable | None
    canceled: Callable | None
    shadow_decided: Callable | None
    admin_command: Callable | None
    rules_reloaded: Callable | None
    config_reloaded: Callable | None

    def __init__(self) -> None:
        self.observers: list[Observer] = []
        self.watching = False  # completed/failed/row wanted: replies are read message by message
        self.rows_wanted = 0  # rows of each result ``row`` reports (the most any observer wants)
        self._build()

    def subscribe(self, observer: Observer) -> None:
        if observer not in self.observers:
            self.observers.append(observer)
            self._build()

    def unsubscribe(self, observer: Observer) -> None:
        if observer in self.observers:
            self.observers.remove(observer)
            self._build()

    def refresh(self) -> None:
        """An observer changed what it wants (``rows_wanted``)."""
        self._build()

    def _build(self) -> None:
        for name in EVENTS:
            base = getattr(Observer, name)
            wanted = [o for o in self.observers if getattr(type(o), name, base) is not base]
            handlers = [getattr(o, name) for o in wanted]
            trusted = all(o.trusted or name in o.self_guarded for o in wanted)
            setattr(self, name, _dispatcher(name, handlers, trusted) if handlers else None)
        self.rows_wanted = max((o.rows_wanted for o in self.observers
                                if getattr(type(o), "row", Observer.row) is not Observer.row), default=0)
        if self.rows_wanted <= 0:
            self.row = None
        self.watching = (self.completed is not None or self.failed is not None or self.row is not None
                         or self.suspended is not None)
