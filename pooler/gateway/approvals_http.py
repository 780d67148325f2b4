"""``approvals_listen = host:port``: the reviewers' HTTP JSON API and page (aiohttp), on the
gateway's event loop (its requests are few and never wait on I/O of their own).

    GET  /                         the page (pending requests update live)
    GET  /api/whoami               the reviewer the credentials name
    GET  /api/approvals            {"pending": [...], "decided": [...]}
    GET  /api/approvals/{id}
    POST /api/approvals/{id}/approve   {"for": "10 minutes"} (optional: a grant)
    POST /api/approvals/{id}/deny      {"reason": "..."}
    GET  /api/grants
    POST /api/grants/{id}/revoke
    GET  /api/events               a text/event-stream of changes ("new", "approved", ...)

Rules this module keeps:
- Every /api call is authenticated: ``Authorization: Bearer <OIDC/JWT token>`` checked by the
  same verifier as token logins (its groups must include an approver group to decide), or
  ``Basic`` with an admin console user's password from auth_file. Without credentials: 401.
- Errors are JSON ``{"error": "..."}`` with the status of what went wrong (400 malformed, 401,
  403 not a reviewer or the requester, 404 unknown id, 409 already decided).
- The event stream never holds the loop: each listener has a bounded queue; a reader that falls
  behind is dropped.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import time

import orjson
from aiohttp import web

from ..approvals.book import ApprovalError, Reviewer, parse_interval
from ..approvals.page import PAGE
from ..auth.jwt import TokenError
from ..auth.passwords import verify_password

log = logging.getLogger("pooler.approvals")

STREAM_QUEUE = 100


def _json(data, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


def _error(message: str, status: int) -> web.Response:
    headers = {"WWW-Authenticate": 'Bearer realm="pooler approvals"'} if status == 401 else None
    return web.Response(body=orjson.dumps({"error": message}), status=status, content_type="application/json",
                        headers=headers)


class ApprovalsHttp:
    def __init__(self, gw) -> None:
        self.gw = gw
        self.desk = gw.approvals
        self.runner: web.AppRunner | None = None
        self.streams: set[asyncio.Queue] = set()
        self.port = 0
        self.desk.book.listeners.append(self._changed)
        app = web.Application(middlewares=[self._errors], client_max_size=64 * 1024)
        app.add_routes([
            web.get("/", self.page), web.get("/approvals", self.page),
            web.get("/api/whoami", self.whoami),
            web.get("/api/approvals", self.listing), web.get("/api/approvals/{id}", self.one),
            web.post("/api/approvals/{id}/approve", self.approve), web.post("/api/approvals/{id}/deny", self.deny),
            web.get("/api/grants", self.grants), web.post("/api/grants/{id}/revoke", self.revoke),
            web.get("/api/events", self.events),
        ])
        self.app = app

    async def start(self, listen: str) -> None:
        host, _, port = listen.rpartition(":")
        self.runner = web.AppRunner(self.app, access_log=None, handle_signals=False)
        await self.runner.setup()
        site = web.TCPSite(self.runner, host or None, int(port), reuse_address=True)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1] if site._server and site._server.sockets else int(port)
        shown = host if host and host not in ("0.0.0.0", "::") else "127.0.0.1"
        self.desk.url = self.gw.config.approval_url or f"http://{shown}:{self.port}/"
        log.info("approvals page and API on %s", self.desk.url)

    async def stop(self) -> None:
        for q in list(self.streams):
            if not q.full():
                q.put_nowait(None)
        runner, self.runner = self.runner, None  # a second stop (signal, then shutdown) finds nothing to clean
        if runner is not None:
            await runner.cleanup()

    # ------------------------------------------------------------------ authentication

    async def reviewer(self, request: web.Request) -> Reviewer:
        auth = request.headers.get("Authorization", "")
        scheme, _, cred = auth.partition(" ")
        cfg = self.gw.config
        if scheme.lower() == "bearer" and cred.strip():
            jwt = self.gw.jwt
            if jwt is None:
                raise web.HTTPUnauthorized(text="token sign-in is not configured on this gateway (jwt_jwks)")
            try:
                ident = await jwt.authenticate(cred.strip())
            except TokenError as e:
                raise web.HTTPUnauthorized(text=f"token refused: {e}") from None
            ucfg = cfg.users.get(ident.user)
            groups = tuple(dict.fromkeys(tuple(ident.groups) + (ucfg.groups if ucfg else ())))
            return Reviewer(ident.user, groups, "api", console_admin=False)
        if scheme.lower() == "basic" and cred.strip():
            try:
                user, _, password = base64.b64decode(cred.strip()).decode().partition(":")
            except (ValueError, UnicodeDecodeError):
                raise web.HTTPBadRequest(text="malformed Basic credentials") from None
            secret = cfg.auth_users.get(user)
            if user in cfg.admin_users and secret is not None and verify_password(user, password, secret):
                ucfg = cfg.users.get(user)
                return Reviewer(user, ucfg.groups if ucfg else (), "api", console_admin=True)
            raise web.HTTPUnauthorized(text="user name or password not accepted (Basic sign-in is for "
                                            "admin_users of auth_file)")
        raise web.HTTPUnauthorized(text="sign in: Authorization: Bearer <token> (an approver group's), or Basic "
                                        "for an admin console user")

    @web.middleware
    async def _errors(self, request: web.Request, handler):
        try:
            return await handler(request)
        except ApprovalError as e:
            return _error(str(e), e.status)
        except web.HTTPException as e:
            if e.status >= 400 and request.path.startswith("/api/"):
                return _error(e.text or e.reason, e.status)
            raise

    async def _body(self, request: web.Request) -> dict:
        raw = await request.read()
        if not raw:
            return {}
        try:
            data = orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise web.HTTPBadRequest(text="the request body is not JSON") from None
        if not isinstance(data, dict):
            raise web.HTTPBadRequest(text="the request body must be a JSON object")
        return data

    # ------------------------------------------------------------------ handlers

    async def page(self, request: web.Request) -> web.Response:
        return web.Response(text=PAGE, content_type="text/html")

    async def whoami(self, request: web.Request) -> web.Response:
        r = await self.reviewer(request)
        return _json({"name": r.name, "groups": list(r.groups), "console_admin": r.console_admin})

    async def listing(self, request: web.Request) -> web.Response:
        await self.reviewer(request)
        now = time.time()
        book = self.desk.book
        return _json({"pending": [r.as_dict(now) for r in sorted(book.pending.values(), key=lambda r: r.created)],
                      "decided": [r.as_dict(now) for r in reversed(book.decided.values())]})

    async def one(self, request: web.Request) -> web.Response:
        await self.reviewer(request)
        return _json(self.desk.book.get(request.match_info["id"]).as_dict(time.time()))

    async def approve(self, request: web.Request) -> web.Response:
        who = await self.reviewer(request)
        body = await self._body(request)
        interval = body.get("for")
        if interval is not None and not isinstance(interval, str):
            raise web.HTTPBadRequest(text='"for" must be a string such as "10 minutes"')
        seconds = parse_interval(interval) if interval else None
        r = await self.desk.approve(request.match_info["id"], who, seconds)
        log.info("approval request %s approved by %s over the API%s", r.id, who.name,
                 f" for {interval}" if interval else "")
        return _json(r.as_dict(time.time()))

    async def deny(self, request: web.Request) -> web.Response:
        who = await self.reviewer(request)
        body = await self._body(request)
        reason = body.get("reason")
        if not isinstance(reason, str):
            raise web.HTTPBadRequest(text='a denial needs {"reason": "..."}')
        r = await self.desk.deny(request.match_info["id"], who, reason)
        return _json(r.as_dict(time.time()))

    async def grants(self, request: web.Request) -> web.Response:
        await self.reviewer(request)
        now = time.time()
        return _json([g.as_dict(now) for g in self.desk.book.grant_listing()])

    async def revoke(self, request: web.Request) -> web.Response:
        who = await self.reviewer(request)
        g = await self.desk.revoke(request.match_info["id"], who)
        return _json(g.as_dict(time.time()))

    async def events(self, request: web.Request) -> web.StreamResponse:
        await self.reviewer(request)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        q: asyncio.Queue = asyncio.Queue(STREAM_QUEUE)
        self.streams.add(q)
        try:
            await resp.write(b": connected\n\n")
            while True:
                try:
                    item = await asyncio.wait_for(q.get(), 15)
                except TimeoutError:
                    await resp.write(b": keep-alive\n\n")
                    continue
                if item is None:
                    break
                await resp.write(item)
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        finally:
            self.streams.discard(q)
        return resp

    def _changed(self, kind: str, what) -> None:
        if not self.streams:
            return
        data = orjson.dumps({"event": kind, ("grant" if kind in ("granted", "revoked") else "request"):
                             what.as_dict(time.time())})
        item = b"event: " + kind.encode() + b"\ndata: " + data + b"\n\n"
        for q in list(self.streams):
            if q.full():
                self.streams.discard(q)  # a reader that fell behind reconnects
                continue
            q.put_nowait(item)
