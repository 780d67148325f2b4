"""The gateway in this test process: a real Gateway on its own uvloop in a thread, listening on a
real port, so that a test can subscribe observers to its events (or read its counters) while real
clients talk to it over sockets. Everything else is as with tests/gwproc.py (generated ini, the
test cluster behind it)."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import uvloop

from pooler import config as config_mod
from pooler.gateway.app import Gateway
from pooler.gateway.events import Observer
from tests.gwproc import GatewayProc


class LiveGateway:
    def __init__(self, databases: dict[str, str], settings: dict | None = None, users: dict | None = None,
                 workdir: str | None = None) -> None:
        # GatewayProc writes the ini exactly as the subprocess tests get it; it is never started
        self.files = GatewayProc(databases, settings=settings, users=users, workdir=workdir)
        self.host, self.port = self.files.host, self.files.port
        self.loop = uvloop.new_event_loop()
        self.gw: Gateway | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> "LiveGateway":
        cfg = config_mod.load(str(self.files.ini))
        started = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            asyncio.set_event_loop(self.loop)
            try:
                self.gw = Gateway(cfg)
                self.loop.run_until_complete(self.gw.start())
            except BaseException as e:  # noqa: BLE001 - reported to the test thread
                failure.append(e)
                started.set()
                return
            started.set()
            self.loop.run_until_complete(self.gw.stopped.wait())

        self._thread = threading.Thread(target=run, name="gateway", daemon=True)
        self._thread.start()
        started.wait(20)
        if failure:
            raise failure[0]
        return self

    def call(self, fn, *args):
        """Run ``fn(*args)`` on the gateway's loop and return its result."""
        fut = asyncio.run_coroutine_threadsafe(_call(fn, *args), self.loop)
        return fut.result(20)

    def subscribe(self, observer: Observer) -> None:
        self.call(self.gw.events.subscribe, observer)

    def dsn(self, user: str = "postgres", dbname: str = "postgres", **kw) -> str:
        return self.files.dsn(user=user, dbname=dbname, **kw)

    def stop(self) -> None:
        if self.gw is not None and self._thread is not None and self._thread.is_alive():
            self.loop.call_soon_threadsafe(self.gw._finish)
            self._thread.join(20)
        if not self.loop.is_running() and not self.loop.is_closed():
            self.loop.close()


async def _call(fn, *args):
    return fn(*args)


class Recorder(Observer):
    """Every event, in order, as (name, session, details...) tuples; ``wait_for`` blocks the test
    thread until an event matches (the gateway's thread appends them)."""

    EVENTS = ("login", "login_failed", "decided", "refused", "server_assigned", "forwarded", "completed",
              "failed", "masked", "ready", "server_released", "logout")

    def __init__(self) -> None:
        self.events: list[tuple] = []
        self.cond = threading.Condition()

    def _add(self, *ev) -> None:
        with self.cond:
            self.events.append(ev)
            self.cond.notify_all()

    def wait_for(self, pred, timeout: float = 10.0) -> tuple:
        with self.cond:
            found = []

            def match():
                found[:] = [e for e in self.events if pred(e)]
                return bool(found)

            if not self.cond.wait_for(match, timeout):
                raise AssertionError(f"no matching event; seen: {[e[0] for e in self.events]}")
            return found[0]

    def of(self, name: str, session=None) -> list[tuple]:
        with self.cond:
            return [e for e in self.events if e[0] == name and (session is None or e[1] is session)]

    def login(self, s): self._add("login", s)
    def login_failed(self, s, reason): self._add("login_failed", s, reason)
    def decided(self, s, kind, sql, decision): self._add("decided", s, kind, sql, decision)
    def refused(self, s, sqlstate, message, what): self._add("refused", s, sqlstate, message, what)
    def server_assigned(self, s, srv, waited): self._add("server_assigned", s, srv, waited)
    def forwarded(self, s, srv, nbytes): self._add("forwarded", s, srv, nbytes)
    def completed(self, s, srv, tag, rows, nbytes, seconds): self._add("completed", s, srv, tag, rows, nbytes, seconds)
    def failed(self, s, srv, sqlstate, message): self._add("failed", s, srv, sqlstate, message)
    def masked(self, s, report): self._add("masked", s, report)
    def ready(self, s, srv, status, started, sent, received): self._add("ready", s, srv, status, started, sent, received)
    def server_released(self, s, srv): self._add("server_released", s, srv)
    def logout(self, s, reason): self._add("logout", s, reason)


def rules_dir(tmp: Path, text: str) -> Path:
    d = tmp / "rules"
    d.mkdir(exist_ok=True)
    (d / "10_test.star").write_text(text)
    return d
