"""A tiny identity provider for tests: RSA/EC signing keys, a JWKS (as a file and over HTTPS),
and tokens minted with any claims, headers or (bad) keys the tests want."""

from __future__ import annotations

import http.server
import json
import ssl
import threading
import time
from pathlib import Path

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from pooler.tls import make_self_signed

ISSUER = "https://idp.test.example"
AUDIENCE = "pooler-gateway"


class SigningKey:
    def __init__(self, kind: str, kid: str) -> None:
        self.kind = kind
        self.kid = kid
        if kind == "rsa":
            self.private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
            self.alg = "RS256"
            self.jwk = RSAAlgorithm.to_jwk(self.private.public_key(), as_dict=True)
        else:
            self.private = ec.generate_private_key(ec.SECP256R1())
            self.alg = "ES256"
            self.jwk = ECAlgorithm.to_jwk(self.private.public_key(), as_dict=True)
        self.jwk.update({"kid": kid, "use": "sig", "alg": self.alg})

    def public_pem(self) -> bytes:
        return self.private.public_key().public_bytes(serialization.Encoding.PEM,
                                                      serialization.PublicFormat.SubjectPublicKeyInfo)


class Idp:
    def __init__(self, workdir: Path) -> None:
        self.dir = workdir
        self.rsa = SigningKey("rsa", "rsa-1")
        self.ec = SigningKey("ec", "ec-1")
        self.published = [self.rsa, self.ec]
        self.jwks_path = workdir / "jwks.json"
        self.write_jwks()

    def jwks(self) -> dict:
        return {"keys": [k.jwk for k in self.published]}

    def write_jwks(self) -> None:
        tmp = self.jwks_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.jwks()))
        tmp.replace(self.jwks_path)

    def claims(self, sub: str = "agent-1", groups=("agents",), ttl: float = 300, **extra) -> dict:
        now = int(time.time())
        c = {"iss": ISSUER, "aud": AUDIENCE, "sub": sub, "iat": now, "exp": now + ttl}
        if groups is not None:
            c["groups"] = list(groups)
        c.update(extra)
        return {k: v for k, v in c.items() if v is not None}

    def token(self, key: SigningKey | None = None, headers: dict | None = None, **claims) -> str:
        key = key or self.rsa
        h = {"kid": key.kid}
        h.update(headers or {})
        return jwt.encode(self.claims(**claims), key.private, algorithm=key.alg, headers=h)


class JwksServer:
    """Serves the Idp's current JWKS over HTTPS (a self-signed cert; ``ca`` is its file) and
    counts fetches."""

    def __init__(self, idp: Idp) -> None:
        self.idp = idp
        self.fetches = 0
        cert, key = idp.dir / "jwks-server.crt", idp.dir / "jwks-server.key"
        make_self_signed(cert, key, ("127.0.0.1", "localhost"))
        self.ca = str(cert)
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                server.fetches += 1
                body = json.dumps(server.idp.jwks()).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *a) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(str(cert), str(key))
        self.httpd.socket = ctx.wrap_socket(self.httpd.socket, server_side=True)
        self.url = f"https://127.0.0.1:{self.httpd.server_address[1]}/.well-known/jwks.json"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
