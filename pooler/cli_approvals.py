"""``pooler approvals list|show|approve|deny|watch|grants|revoke``: the reviewers' command line,
a client of the gateway's approvals API (approvals_listen; gateway/approvals_http.py).

Credentials: ``--token`` (or $POOLER_TOKEN), an OIDC/JWT token with an approver group; or
``--user`` with $POOLER_PASSWORD (asked for when unset), an admin console user of auth_file.
The API's address: ``--url``, $POOLER_APPROVALS_URL, or ``approvals_listen`` of ``--config``."""

from __future__ import annotations

import argparse
import base64
import getpass
import json
import os
import sys
import time
import urllib.error
import urllib.request


class CliError(Exception):
    pass


def _base_url(args) -> str:
    url = args.url or os.environ.get("POOLER_APPROVALS_URL")
    if not url:
        from .runtime import load_config_or_exit

        path = args.config or "conf/gateway.ini"
        if not os.path.exists(path):
            raise CliError("where is the gateway? give --url http://host:port/ (or --config with approvals_listen)")
        cfg = load_config_or_exit(path)
        if not cfg.approvals_listen:
            raise CliError(f"{path} sets no approvals_listen: the gateway serves no approvals API")
        host, _, port = cfg.approvals_listen.rpartition(":")
        url = cfg.approval_url or f"http://{host if host not in ('', '0.0.0.0', '::') else '127.0.0.1'}:{port}/"
    return url.rstrip("/")


def _auth(args) -> str:
    token = args.token or os.environ.get("POOLER_TOKEN")
    if token:
        return "Bearer " + token.strip()
    if args.user:
        password = os.environ.get("POOLER_PASSWORD")
        if password is None:
            password = getpass.getpass(f"password for {args.user}: ")
        return "Basic " + base64.b64encode(f"{args.user}:{password}".encode()).decode()
    raise CliError("sign in with --token (or $POOLER_TOKEN), or --user NAME with $POOLER_PASSWORD")


def _call(args, method: str, path: str, body: dict | None = None):
    req = urllib.request.Request(_base_url(args) + path, method=method,
                                 data=json.dumps(body).encode() if body is not None else None,
                                 headers={"Authorization": _auth(args), "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as e:
        try:
            msg = json.loads(e.read()).get("error")
        except ValueError:
            msg = e.reason
        raise CliError(f"{msg} (HTTP {e.code})") from None
    except urllib.error.URLError as e:
        raise CliError(f"cannot reach the approvals API at {_base_url(args)}: {e.reason}") from None


def _waited(r: dict) -> str:
    s = int(r.get("waited") or 0)
    return f"{s}s" if s < 120 else f"{s // 60}m"


def _print_request(r: dict, full: bool) -> None:
    head = (f"{r['id']}  {r['state']:<9} {_waited(r):>5}  {r['user']}"
            f"{' (' + ','.join(r['groups']) + ')' if r['groups'] else ''}  {r['database']}  {r['rule']}: {r['reason']}")
    print(head)
    if not full:
        first = r["sql"].strip().splitlines()[0] if r["sql"].strip() else ""
        print(f"          {first[:100]}")
        return
    for label, value in (("from", f"{r['client_addr']} {r['application_name']}".strip()),
                         ("reads", ", ".join(r["tables_read"])), ("writes", ", ".join(r["tables_written"])),
                         ("justification", r["justification"]),
                         ("approvals", f"{len(r['approvals'])} of {r['required']}"),
                         ("outcome", (f"by {r['decided_by']}: " if r["decided_by"] else "") + (r["outcome"] or ""))):
        if value and value.strip(": "):
            print(f"  {label:<14}{value}")
    print("  statement")
    for line in r["pretty_sql"].splitlines():
        print(f"    {line}")
    for i, v in enumerate(r["params"]):
        print(f"    ${i + 1} = {'NULL' if v is None else repr(v)}")


def run(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except CliError as e:
        print(f"pooler approvals: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _run(args) -> int:
    a = args.action
    if a == "list":
        data = _call(args, "GET", "/api/approvals")
        shown = data["pending"] + (data["decided"] if args.all else [])
        if args.json:
            print(json.dumps(shown, indent=2))
            return 0
        if not shown:
            print("no statements are waiting for approval")
        for r in shown:
            _print_request(r, args.full)
        return 0
    if a == "show":
        r = _call(args, "GET", f"/api/approvals/{_need(args.id, 'show ID')}")
        print(json.dumps(r, indent=2)) if args.json else _print_request(r, True)
        return 0
    if a == "approve":
        body = {"for": args.for_} if args.for_ else {}
        r = _call(args, "POST", f"/api/approvals/{_need(args.id, 'approve ID')}/approve", body)
        if r["state"] == "approved":
            print(f"approved {r['id']}" + (f" (grant {r['grant']} for {args.for_})" if r.get("grant") else ""))
        else:
            print(f"{r['id']}: {len(r['approvals'])} of {r['required']} approvals")
        return 0
    if a == "deny":
        if not args.reason:
            raise CliError("a denial needs --reason '...'")
        r = _call(args, "POST", f"/api/approvals/{_need(args.id, 'deny ID')}/deny", {"reason": args.reason})
        print(f"denied {r['id']}")
        return 0
    if a == "grants":
        grants = _call(args, "GET", "/api/grants")
        if args.json:
            print(json.dumps(grants, indent=2))
            return 0
        for g in grants:
            until = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(g["until"]))
            state = "active" if g["active"] else ("revoked by " + g["revoked_by"] if g["revoked_by"] else "ended")
            print(f"{g['id']}  {state:<10} until {until}  {g['user']}@{g['database']}  uses {g['uses']}  "
                  f"by {g['granted_by']}  {g['sql'][:80]}")
        return 0
    if a == "revoke":
        g = _call(args, "POST", f"/api/grants/{_need(args.id, 'revoke GRANT_ID')}/revoke")
        print(f"revoked {g['id']}")
        return 0
    if a == "watch":
        return _watch(args)
    raise CliError(f"unknown action {a}")


def _need(value, usage: str) -> str:
    if not value:
        raise CliError(f"usage: pooler approvals {usage}")
    return value


def _watch(args) -> int:
    """Print each change as it happens (the API's event stream), pending requests first."""
    for r in _call(args, "GET", "/api/approvals")["pending"]:
        _print_request(r, args.full)
    req = urllib.request.Request(_base_url(args) + "/api/events", headers={"Authorization": _auth(args)})
    try:
        resp = urllib.request.urlopen(req, timeout=60)
    except urllib.error.HTTPError as e:
        raise CliError(f"event stream refused (HTTP {e.code})") from None
    except urllib.error.URLError as e:
        raise CliError(f"cannot reach the approvals API: {e.reason}") from None
    with resp:
        for raw in resp:
            line = raw.decode().rstrip("\n")
            if not line.startswith("data: "):
                continue
            ev = json.loads(line[6:])
            if args.json:
                print(json.dumps(ev), flush=True)
                continue
            what = ev.get("request") or ev.get("grant") or {}
            if "request" in ev:
                print(f"[{time.strftime('%H:%M:%S')}] {ev['event']}", end=": ", flush=True)
                _print_request(what, args.full)
            else:
                print(f"[{time.strftime('%H:%M:%S')}] {ev['event']} grant {what.get('id')} for {what.get('user')}",
                      flush=True)
            sys.stdout.flush()
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("approvals", help="review statements held for approval (the gateway's approvals API)")
    p.add_argument("action", choices=["list", "show", "approve", "deny", "watch", "grants", "revoke"])
    p.add_argument("id", nargs="?", help="request id (grant id for revoke)")
    p.add_argument("--for", dest="for_", metavar="INTERVAL", help="approve: also grant the statement's shape, e.g. '10 minutes'")
    p.add_argument("--reason", help="deny: the reason the agent is told")
    p.add_argument("--all", action="store_true", help="list: decided requests too")
    p.add_argument("--full", action="store_true", help="list/watch: every fact, the statement pretty-printed")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--url", help="the approvals API (default: $POOLER_APPROVALS_URL or approvals_listen of --config)")
    p.add_argument("--config", help="gateway ini whose approvals_listen to use (default: conf/gateway.ini)")
    p.add_argument("--token", help="OIDC/JWT token (default: $POOLER_TOKEN)")
    p.add_argument("--user", help="admin console user (password: $POOLER_PASSWORD, else asked)")
    p.set_defaults(func=run)
