"""Password verifiers for client logins (md5, SCRAM-SHA-256 server side) and the upstream
client side helpers. Pure functions and small state machines; no I/O.

Our own SCRAM server: libpq sends an empty user name in its client-first-message
(``n,,n=,r=...``), which scramp's server refuses (see shared/FACTS.md).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
from dataclasses import dataclass


def md5_secret(user: str, password: str) -> str:
    return "md5" + hashlib.md5((password + user).encode()).hexdigest()


def md5_response(secret_md5: str, salt: bytes) -> str:
    """What a client sends for AuthenticationMD5Password given the stored md5 secret."""
    return "md5" + hashlib.md5(secret_md5[3:].encode() + salt).hexdigest()


def is_md5(secret: str) -> bool:
    return len(secret) == 35 and secret.startswith("md5")


def is_scram(secret: str) -> bool:
    return secret.startswith("SCRAM-SHA-256$")


def verify_md5(user: str, secret: str, salt: bytes, response: bytes) -> bool:
    stored = secret if is_md5(secret) else md5_secret(user, secret)
    expected = md5_response(stored, salt).encode()
    return hmac.compare_digest(expected, response)


def verify_password(user: str, password: str, secret: str) -> bool:
    """A plaintext password (HTTP Basic of the approvals API) against an auth_file secret:
    plain, md5 or SCRAM-SHA-256."""
    if is_scram(secret):
        try:
            want = ScramSecret.parse(secret)
        except ValueError:
            return False
        got = ScramSecret.from_password(password, want.iterations, want.salt)
        return hmac.compare_digest(got.stored_key, want.stored_key)
    if is_md5(secret):
        return hmac.compare_digest(md5_secret(user, password), secret)
    return bool(secret) and hmac.compare_digest(password.encode(), secret.encode())


@dataclass(frozen=True, slots=True)
class ScramSecret:
    iterations: int
    salt: bytes
    stored_key: bytes
    server_key: bytes

    @classmethod
    def parse(cls, secret: str) -> "ScramSecret":
        # SCRAM-SHA-256$<iter>:<salt>$<StoredKey>:<ServerKey>
        try:
            _, iter_salt, keys = secret.split("$")
            iters, salt = iter_salt.split(":")
            stored, server = keys.split(":")
            return cls(int(iters), base64.b64decode(salt), base64.b64decode(stored),
                       base64.b64decode(server))
        except ValueError:
            raise ValueError("malformed SCRAM-SHA-256 secret") from None

    @classmethod
    def from_password(cls, password: str, iterations: int = 4096, salt: bytes | None = None):
        salt = salt or os.urandom(16)
        salted = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
        client_key = hmac.digest(salted, b"Client Key", "sha256")
        server_key = hmac.digest(salted, b"Server Key", "sha256")
        return cls(iterations, salt, hashlib.sha256(client_key).digest(), server_key)

    def to_string(self) -> str:
        b = lambda x: base64.b64encode(x).decode()  # noqa: E731
        return f"SCRAM-SHA-256${self.iterations}:{b(self.salt)}${b(self.stored_key)}:{b(self.server_key)}"


class ScramError(Exception):
    pass


class ScramServer:
    """Server side of SCRAM-SHA-256 (RFC 5802/7677), no channel binding.

    Usage: ``first = s.client_first(data)`` -> server-first bytes;
    ``final = s.client_final(data)`` -> server-final bytes or raises ScramError.
    """

    def __init__(self, secret: ScramSecret) -> None:
        self.secret = secret
        self.client_key: bytes | None = None  # the client's ClientKey, once its proof checked out
        self.nonce = ""
        self.client_first_bare = ""
        self.server_first = ""

    def client_first(self, data: bytes) -> bytes:
        try:
            msg = data.decode()
        except UnicodeDecodeError:
            raise ScramError("malformed SCRAM message") from None
        parts = msg.split(",", 2)
        if len(parts) != 3:
            raise ScramError("malformed SCRAM message")
        gs2, authzid, bare = parts
        if gs2 == "p" or gs2.startswith("p="):
            raise ScramError("channel binding is not supported")
        if gs2 not in ("n", "y") or authzid:
            raise ScramError("malformed SCRAM message")
        attrs = dict(a.split("=", 1) for a in bare.split(",") if "=" in a)
        cnonce = attrs.get("r")
        if not cnonce:
            raise ScramError("malformed SCRAM message")
        self.client_first_bare = bare
        self.nonce = cnonce + base64.b64encode(os.urandom(18)).decode()
        salt = base64.b64encode(self.secret.salt).decode()
        self.server_first = f"r={self.nonce},s={salt},i={self.secret.iterations}"
        return self.server_first.encode()

    def client_final(self, data: bytes) -> bytes:
        try:
            msg = data.decode()
        except UnicodeDecodeError:
            raise ScramError("malformed SCRAM message") from None
        without_proof, sep, proof_b64 = msg.rpartition(",p=")
        if not sep:
            raise ScramError("malformed SCRAM message")
        attrs = dict(a.split("=", 1) for a in without_proof.split(",") if "=" in a)
        if attrs.get("r") != self.nonce:
            raise ScramError("SCRAM nonce mismatch")
        if attrs.get("c") not in ("biws", "eSws"):  # base64 of "n,," / "y,,"
            raise ScramError("unexpected SCRAM channel binding")
        try:
            proof = base64.b64decode(proof_b64, validate=True)
        except ValueError:
            raise ScramError("malformed SCRAM proof") from None
        auth_message = f"{self.client_first_bare},{self.server_first},{without_proof}".encode()
        client_sig = hmac.digest(self.secret.stored_key, auth_message, "sha256")
        if len(proof) != len(client_sig):
            raise ScramError("password authentication failed")
        client_key = bytes(a ^ b for a, b in zip(proof, client_sig))
        if not hmac.compare_digest(hashlib.sha256(client_key).digest(), self.secret.stored_key):
            raise ScramError("password authentication failed")
        self.client_key = client_key
        server_sig = hmac.digest(self.secret.server_key, auth_message, "sha256")
        return b"v=" + base64.b64encode(server_sig)


class ScramKeysClient:
    """Client side of SCRAM-SHA-256 from keys instead of a password: the ClientKey a client
    proved at its own SCRAM login against the same secret, and the secret's ServerKey
    (PgBouncer's SCRAM pass-through, for secrets fetched with auth_query). The method names are
    scramp.ScramClient's, so the server login code drives either."""

    def __init__(self, client_key: bytes, server_key: bytes) -> None:
        self.client_key = client_key
        self.server_key = server_key
        self.nonce = base64.b64encode(os.urandom(18)).decode()
        self.bare = f"n=,r={self.nonce}"
        self.expected = b""
        self.final_wo_proof = ""
        self.server_first_msg = ""

    def get_client_first(self) -> str:
        return "n,," + self.bare

    def set_server_first(self, msg: str) -> None:
        attrs = dict(a.split("=", 1) for a in msg.split(",") if "=" in a)
        r = attrs.get("r", "")
        if not r.startswith(self.nonce) or "s" not in attrs or "i" not in attrs:
            raise ScramError("malformed SCRAM server-first-message")
        self.server_first_msg = msg
        self.final_wo_proof = f"c=biws,r={r}"

    def get_client_final(self) -> str:
        auth = f"{self.bare},{self.server_first_msg},{self.final_wo_proof}".encode()
        stored = hashlib.sha256(self.client_key).digest()
        sig = hmac.digest(stored, auth, "sha256")
        proof = bytes(a ^ b for a, b in zip(self.client_key, sig))
        self.expected = hmac.digest(self.server_key, auth, "sha256")
        return f"{self.final_wo_proof},p={base64.b64encode(proof).decode()}"

    def set_server_final(self, msg: str) -> None:
        if not msg.startswith("v=") or not hmac.compare_digest(base64.b64decode(msg[2:]), self.expected):
            raise ScramError("server signature does not match (the server holds another secret)")
