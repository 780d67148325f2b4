"""``pooler demo``: a throwaway PostgreSQL with sample personal data and the gateway in front.

Reads conf/gateway.ini, starts PostgreSQL on the port of its first [databases] entry (local
server binaries; run as the ``postgres`` user when root), creates that entry's upstream role,
loads the shop schema, runs the gateway in the foreground and removes everything on Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path

from . import config as config_mod
from .runtime import load_config_or_exit, new_event_loop, setup_logging

REPO_CONF = Path(__file__).resolve().parent.parent / "conf" / "gateway.ini"


def _quote_ident(s: str) -> str:
    return '"' + s.replace('"', '""') + '"'


def _quote_lit(s: str) -> str:
    return "'" + s.replace("'", "''") + "'"


DEMO_DIR = ".demo"  # beside the config file: the demo's TLS certificate and token signing key


def ensure_demo_material(conf_dir: Path) -> Path:
    """The demo's own keys, made once and kept (so minted tokens stay valid across runs):
    ``.demo/tls.crt`` + ``tls.key`` (self-signed, for sslmode=require) and
    ``.demo/jwt-signing.pem`` + ``jwks.json`` (an EC P-256 key that ``pooler token`` signs with)."""
    import json
    import os

    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from jwt.algorithms import ECAlgorithm

    from .tls import make_self_signed

    d = conf_dir / DEMO_DIR
    d.mkdir(mode=0o700, exist_ok=True)
    if not (d / "tls.crt").exists() or not (d / "tls.key").exists():
        make_self_signed(d / "tls.crt", d / "tls.key", ("localhost", "127.0.0.1", "::1"))
    if not (d / "jwt-signing.pem").exists() or not (d / "jwks.json").exists():
        key = ec.generate_private_key(ec.SECP256R1())
        fd = os.open(d / "jwt-signing.pem", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()))
        jwk = ECAlgorithm.to_jwk(key.public_key(), as_dict=True)
        jwk.update({"kid": "demo-" + os.urandom(4).hex(), "use": "sig", "alg": "ES256"})
        (d / "jwks.json").write_text(json.dumps({"keys": [jwk]}, indent=2) + "\n")
    return d


def mint_demo_token(cfg, subject: str, groups: list[str], ttl: float) -> str:
    """A token for ``subject`` signed with the demo's key, with the claims ``cfg`` checks."""
    import json
    import time

    import jwt

    demo = (cfg.path.parent / DEMO_DIR).resolve()
    if not cfg.jwt_jwks or cfg.resolve(cfg.jwt_jwks).resolve() != demo / "jwks.json":
        raise SystemExit("pooler token: mints tokens for the demo only, and this config's jwt_jwks is not "
                         f"the demo's key set ({DEMO_DIR}/jwks.json beside the config); use your identity provider")
    key = (demo / "jwt-signing.pem").read_bytes()
    kid = json.loads((demo / "jwks.json").read_text())["keys"][0]["kid"]
    now = int(time.time())
    claims: dict = {"iss": cfg.jwt_issuer, "iat": now, "nbf": now, "exp": now + int(ttl)}
    if cfg.jwt_audience:
        claims["aud"] = cfg.jwt_audience[0]

    def put(path: str, value) -> None:
        cur = claims
        parts = path.split(".")
        for part in parts[:-1]:
            cur = cur.setdefault(part, {})
        cur[parts[-1]] = value

    put(cfg.jwt_user_claim, subject)
    put(cfg.jwt_groups_claim, groups)
    return jwt.encode(claims, key, algorithm="ES256", headers={"kid": kid})


def demo_config(config: str | None, command: str) -> tuple[Path, config_mod.Config] | None:
    """The demo's ini (``config``, or conf/gateway.ini) with its keys and certificate made, loaded;
    None (after saying why) when it is missing."""
    path = Path(config) if config else REPO_CONF
    if not path.exists():
        print(f"pooler {command}: {path} not found (pass --config)", file=sys.stderr)
        return None
    ensure_demo_material(path.resolve().parent)
    return path, load_config_or_exit(str(path))


def run_demo(args: argparse.Namespace) -> int:
    found = demo_config(args.config, "demo")
    if found is None:
        return 1
    path, cfg = found
    setup_logging(cfg.verbose, cfg.logfile)
    log = logging.getLogger("pooler.demo")
    for w in cfg.warnings:
        log.warning("%s", w)
    if not cfg.databases:
        print(f"pooler demo: {path} has no [databases] entry", file=sys.stderr)
        return 1
    db = next(iter(cfg.databases.values()))
    if not cfg.record_dir:  # the demo always records (docs/recordings.md), beside its own files
        cfg.record_dir = f"{DEMO_DIR}/recordings"
    from .pgcluster import PgCluster, seed_demo

    log.info("starting a throwaway PostgreSQL on %s:%s", db.host, db.port)
    cluster = PgCluster(port=db.port, host=db.host if not db.host.startswith("/") else "127.0.0.1")
    try:
        cluster.start()
    except Exception as e:
        print(f"pooler demo: could not start PostgreSQL: {e}", file=sys.stderr)
        return 1
    try:
        dbname = db.dbname or db.name
        if db.user and db.user != cluster.superuser:
            stmt = f"CREATE ROLE {_quote_ident(db.user)} LOGIN"
            if db.password:
                stmt += f" PASSWORD {_quote_lit(db.password)}"
            cluster.execute(stmt)
        seed_demo(cluster, dbname, owner=None)
        if db.user and db.user != cluster.superuser:
            cluster.execute(
                f"ALTER DATABASE {_quote_ident(dbname)} OWNER TO {_quote_ident(db.user)};"
                f"GRANT ALL ON ALL TABLES IN SCHEMA public TO {_quote_ident(db.user)};"
                f"GRANT ALL ON ALL SEQUENCES IN SCHEMA public TO {_quote_ident(db.user)};",
                dbname=dbname)
        log.info("loaded the shop schema into database %r", dbname)
        users = sorted(u for u in cfg.auth_users if u not in cfg.admin_users and u not in cfg.stats_users)
        example = users[0] if users else "postgres"
        pw = cfg.auth_users.get(example, "")
        hint = f"PGPASSWORD={pw} " if pw and not pw.startswith(("md5", "SCRAM-SHA-256$")) else ""
        host = cfg.listen_addr.split(',')[0]
        token_hint = ""
        if config_mod.jwt_in_use(cfg):
            import shlex

            cmd = " ".join(shlex.quote(a) for a in (sys.executable, "-m", "pooler", "token"))
            if str(path.resolve()) != str(REPO_CONF):
                cmd += f" --config {shlex.quote(str(path))}"
            token_hint = (
                "  Or log in as an AI agent with a token (OIDC/JWT over TLS; the groups claim is what "
                "the rules see):\n\n"
                f"    PGPASSWORD=$({cmd} agent-42 --groups agents) psql "
                f"'host={host} port={cfg.listen_port} dbname={db.name} user=agent-42 sslmode=require'\n\n")
        console_hint = ""
        admins = [u for u in cfg.admin_users if u in cfg.auth_users]
        if admins:
            apw = cfg.auth_users[admins[0]]
            ahint = f"PGPASSWORD={apw} " if not apw.startswith(("md5", "SCRAM-SHA-256$")) else ""
            console_hint = ("  PgBouncer's admin console (docs/operations.md):\n\n"
                            f"    {ahint}psql 'host={host} port={cfg.listen_port} dbname=pgbouncer "
                            f"user={admins[0]}' -c 'SHOW POOLS'\n\n")
            if cfg.approvals_listen:
                page = cfg.approval_url or f"http://{cfg.approvals_listen.replace('0.0.0.0', '127.0.0.1')}/"
                console_hint += ("  Statements held for approval (docs/approvals.md): "
                                 f"{ahint}psql ... dbname=pgbouncer user={admins[0]} -c 'SHOW APPROVALS', "
                                 f"then -c 'APPROVE <id>'; or the page {page}\n\n")
        print(
            "\n  The gateway is ready. Connect with:\n\n"
            f"    {hint}psql 'host={host} port={cfg.listen_port} "
            f"dbname={db.name} user={example}'\n\n"
            + token_hint + console_hint +
            f"  Sessions are recorded in {cfg.resolve(cfg.record_dir)} (docs/recordings.md); they stay "
            f"when the demo stops. Check them with:\n\n    pooler recordings verify {cfg.resolve(cfg.record_dir)}\n\n"
            f"  and play them back (list, then show one; `pooler replay statements` searches them):\n\n"
            f"    pooler replay list {cfg.resolve(cfg.record_dir)}\n"
            f"    pooler replay show {cfg.resolve(cfg.record_dir)} last\n\n" +
            f"  Client logins are in {cfg.resolve(cfg.auth_file) if cfg.auth_file else '(trust)'}; "
            "press Ctrl-C to stop and remove everything.\n",
            file=sys.stderr, flush=True)
        from .gateway.app import Gateway

        async def main() -> None:
            gw = Gateway(cfg)
            await gw.start()
            gw.install_signal_handlers()
            await gw.stopped.wait()

        with asyncio.Runner(loop_factory=new_event_loop) as runner:
            try:
                runner.run(main())
            except OSError as e:
                log.error("could not start the gateway: %s", e)
                return 1
    finally:
        log.info("removing the throwaway PostgreSQL")
        cluster.stop()
    return 0
