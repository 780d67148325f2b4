"""OIDC/JWT login: a client's password is a token; validate it and say who the agent is.

Rules this module keeps:
- Verification (``TokenVerifier.verify``) is a pure function of the token, the key set, the
  settings and the clock: no I/O, unit-testable in microseconds.
- Fetching the JWKS (a file or an https URL) is the only I/O (``JwksSource``): it runs off the
  event loop in a thread, is cached, refreshed periodically and on an unknown ``kid`` at a bounded
  rate, and a failed refresh keeps the keys already known.
- Every refusal is a ``TokenError`` whose message names the check that failed and nothing that
  helps forge a token: never the token, its claims' values or the expected values.
- Never ``alg: none``; an algorithm must be in the allowlist and must match the key's type, so an
  HMAC token can never be checked against an RSA/EC public key taken as a shared secret.

PyJWT (``PyJWK``, ``jwt.decode``) does the key parsing and the cryptography.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import ssl
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass, field

import jwt
from jwt import PyJWK

log = logging.getLogger("pooler.jwt")

ALG_FAMILY = {
    "RS256": "RSA", "RS384": "RSA", "RS512": "RSA",
    "PS256": "RSA", "PS384": "RSA", "PS512": "RSA",
    "ES256": "EC", "ES384": "EC", "ES512": "EC", "ES256K": "EC",
    "EdDSA": "OKP",
    "HS256": "oct", "HS384": "oct", "HS512": "oct",
}
MAX_JWKS_BYTES = 1 << 20


class TokenError(Exception):
    """A token login refused; ``str(e)`` is safe to show the client."""

    def __init__(self, message: str, sqlstate: str = "28P01") -> None:
        super().__init__(message)
        self.sqlstate = sqlstate


@dataclass(slots=True, frozen=True)
class JwtSettings:
    jwks: str = ""  # a file path or an https:// URL
    jwks_ca_file: str | None = None
    jwks_refresh: float = 300.0  # re-read the JWKS this often
    jwks_min_refresh: float = 10.0  # at most one refresh for an unknown kid per this many seconds
    algorithms: tuple[str, ...] = ("RS256", "ES256")
    issuer: str | None = None
    audience: tuple[str, ...] = ()
    leeway: float = 30.0
    user_claim: str = "sub"
    groups_claim: str = "groups"
    required_claims: tuple[str, ...] = ("exp",)
    max_token_size: int = 16384


@dataclass(slots=True, frozen=True)
class Identity:
    user: str
    groups: tuple[str, ...]
    expires: float | None  # exp claim (epoch seconds)
    issuer: str | None
    key_id: str | None


def claim_at(claims: dict, path: str):
    """The value at a dotted path (``realm_access.roles``); a key holding a dot is tried whole
    first, so ``https://example.com/groups`` style claim names work too."""
    if path in claims:
        return claims[path]
    cur = claims
    for part in path.split("."):
        if not isinstance(cur, dict) or part not in cur:
            return None
        cur = cur[part]
    return cur


@dataclass(slots=True)
class KeySet:
    """Parsed JWKS: keys by kid (and the list, for tokens without a kid)."""

    by_kid: dict[str, PyJWK] = field(default_factory=dict)
    keys: list[PyJWK] = field(default_factory=list)
    declared_alg: dict[int, str | None] = field(default_factory=dict)  # id(key) -> the JWK's "alg"
    fetched_at: float = 0.0

    @classmethod
    def parse(cls, data: bytes | str, now: float = 0.0) -> "KeySet":
        try:
            doc = json.loads(data)
        except ValueError as e:
            raise ValueError(f"JWKS is not JSON: {e}") from None
        if not isinstance(doc, dict) or not isinstance(doc.get("keys"), list):
            raise ValueError('JWKS must be a JSON object with a "keys" list')
        out = cls(fetched_at=now)
        skipped = []
        for k in doc["keys"]:
            if not isinstance(k, dict) or k.get("use", "sig") != "sig":
                continue
            try:
                jwk_ = PyJWK(k)
            except jwt.PyJWTError as e:
                skipped.append(f"{k.get('kid', '?')}: {e}")
                continue
            out.keys.append(jwk_)
            out.declared_alg[id(jwk_)] = k.get("alg") if isinstance(k.get("alg"), str) else None
            if jwk_.key_id:
                out.by_kid[jwk_.key_id] = jwk_
        if not out.keys:
            raise ValueError("JWKS holds no usable signing key" + (f" ({'; '.join(skipped)})" if skipped else ""))
        return out


class TokenVerifier:
    """Checks a token against a key set: structure, algorithm, key, signature, claims."""

    def __init__(self, settings: JwtSettings) -> None:
        self.s = settings
        self.allowed = frozenset(settings.algorithms)

    def header(self, token: str) -> dict:
        s = self.s
        if len(token) > s.max_token_size:
            raise TokenError(f"token is too large ({len(token)} bytes, at most {s.max_token_size})")
        if token.count(".") != 2:
            raise TokenError("password is not a JWT (expected header.payload.signature)")
        try:
            hdr = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise TokenError("password is not a JWT (its header cannot be decoded)") from None
        alg = hdr.get("alg")
        if not isinstance(alg, str) or alg.lower() == "none":
            raise TokenError("token algorithm 'none' is not accepted")
        if alg not in self.allowed:
            raise TokenError(f"token algorithm {alg} is not accepted (jwt_algorithms)")
        kid = hdr.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise TokenError("token header has an invalid kid")
        return hdr

    def find_key(self, hdr: dict, keys: KeySet) -> PyJWK | None:
        kid = hdr.get("kid")
        if kid is not None:
            return keys.by_kid.get(kid)
        family = ALG_FAMILY.get(hdr["alg"])
        cands = [k for k in keys.keys if k.key_type == family]
        return cands[0] if len(cands) == 1 else None

    def verify(self, token: str, keys: KeySet, hdr: dict | None = None) -> Identity:
        s = self.s
        if hdr is None:
            hdr = self.header(token)
        alg = hdr["alg"]
        key = self.find_key(hdr, keys)
        if key is None:
            raise TokenError("token signing key is not known (unknown kid)")
        family = ALG_FAMILY.get(alg)
        if family is None or key.key_type != family:
            # e.g. HS256 against an RSA public key: the key confusion attack
            raise TokenError(f"token algorithm {alg} does not match its signing key")
        declared = keys.declared_alg.get(id(key))
        if declared and declared != alg:
            raise TokenError(f"token algorithm {alg} does not match its signing key")
        opts = {"require": list(dict.fromkeys(("exp",) + s.required_claims)), "verify_aud": bool(s.audience)}
        try:
            claims = jwt.decode(
                token, key.key, algorithms=[alg], audience=list(s.audience) or None,
                issuer=s.issuer or None, leeway=s.leeway, options=opts)
        except jwt.ExpiredSignatureError:
            raise TokenError("token has expired") from None
        except jwt.ImmatureSignatureError:
            raise TokenError("token is not yet valid (nbf/iat in the future)") from None
        except jwt.InvalidIssuerError:
            raise TokenError("token issuer is not accepted") from None
        except jwt.InvalidAudienceError:
            raise TokenError("token audience is not accepted") from None
        except jwt.InvalidSignatureError:
            raise TokenError("token signature is invalid") from None
        except jwt.MissingRequiredClaimError as e:
            raise TokenError(f"token lacks the required claim {e.claim!r}") from None
        except jwt.InvalidKeyError:
            raise TokenError(f"token algorithm {alg} does not match its signing key") from None
        except jwt.DecodeError:
            raise TokenError("token cannot be decoded") from None
        except jwt.PyJWTError as e:
            raise TokenError(f"token is invalid ({type(e).__name__})") from None
        user = claim_at(claims, s.user_claim)
        if not isinstance(user, str) or not user:
            raise TokenError(f"token has no user claim {s.user_claim!r}", "28000")
        groups = claim_at(claims, s.groups_claim)
        if groups is None:
            raise TokenError(f"token has no groups claim {s.groups_claim!r}", "28000")
        if isinstance(groups, str):
            groups = [g for g in groups.replace(",", " ").split() if g]
        if not isinstance(groups, list) or not all(isinstance(g, str) for g in groups):
            raise TokenError(f"token groups claim {s.groups_claim!r} is not a list of strings", "28000")
        for name in ("exp", "nbf", "iat"):
            v = claims.get(name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
                # PyJWT accepts "exp": "1700000000"; a session must still end at that time
                raise TokenError(f"token claim {name!r} is not a number")
        exp = claims.get("exp")
        return Identity(user=user, groups=tuple(groups), expires=float(exp) if exp is not None else None,
                        issuer=claims.get("iss"), key_id=hdr.get("kid"))


FETCH_DEADLINE = 10.0  # seconds for one whole JWKS fetch (connect, TLS, every read)


class _NoDowngrade(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):
        if not newurl.startswith("https://"):
            raise ValueError("JWKS URL redirected away from https")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


class JwksSource:
    """The JWKS of ``settings.jwks``, cached. Refreshed in the background when older than
    ``jwks_refresh`` (logins go on with the cached keys meanwhile), and on an unknown kid at most
    once per ``jwks_min_refresh`` seconds. One fetch at a time, in a thread, with a total deadline;
    a failed fetch keeps the keys already known."""

    def __init__(self, settings: JwtSettings, base_dir: str | None = None) -> None:
        self.s = settings
        loc = settings.jwks
        self.url = loc if loc.startswith(("https://", "http://")) else None
        self.path = None if self.url else (loc if os.path.isabs(loc) or base_dir is None else os.path.join(base_dir, loc))
        self.keys: KeySet | None = None
        self.last_attempt = -1e18
        self._task: asyncio.Task | None = None

    def describe(self) -> str:
        if self.url:
            u = urllib.parse.urlsplit(self.url)
            host = u.hostname or "?"
            return f"{u.scheme}://{host}{':' + str(u.port) if u.port else ''}{u.path}"  # no userinfo, no query
        return self.path or "?"

    def _fetch_blocking(self) -> bytes:
        if self.path is not None:
            with open(self.path, "rb") as f:
                data = f.read(MAX_JWKS_BYTES + 1)
        else:
            deadline = time.monotonic() + FETCH_DEADLINE
            ctx = ssl.create_default_context(cafile=self.s.jwks_ca_file)
            opener = urllib.request.build_opener(urllib.request.HTTPSHandler(context=ctx), _NoDowngrade())
            req = urllib.request.Request(self.url, headers={"Accept": "application/json", "User-Agent": "pooler"})
            chunks: list[bytes] = []
            size = 0
            with opener.open(req, timeout=FETCH_DEADLINE / 2) as r:
                if not r.geturl().startswith("https://"):
                    raise ValueError("JWKS URL redirected away from https")
                while True:
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"JWKS fetch took longer than {FETCH_DEADLINE:.0f}s")
                    chunk = r.read1(65536)
                    if not chunk:
                        break
                    chunks.append(chunk)
                    size += len(chunk)
                    if size > MAX_JWKS_BYTES:
                        break
            data = b"".join(chunks)
        if len(data) > MAX_JWKS_BYTES:
            raise ValueError("JWKS larger than 1 MB")
        return data

    def _parse(self, data: bytes) -> KeySet:
        ks = KeySet.parse(data, time.monotonic())
        if self.url is not None:
            # a shared secret published over the network is a shared secret no longer
            kept = [k for k in ks.keys if k.key_type != "oct"]
            if len(kept) != len(ks.keys):
                log.warning("JWKS %s: ignoring symmetric (oct) keys served over the network", self.describe())
                ks.keys = kept
                ks.by_kid = {kid: k for kid, k in ks.by_kid.items() if k.key_type != "oct"}
                if not kept:
                    raise ValueError("JWKS holds no usable signing key")
        return ks

    def load_now(self) -> KeySet:
        """Synchronous load (startup and reload of a JWKS file)."""
        self.last_attempt = time.monotonic()
        self.keys = self._parse(self._fetch_blocking())
        return self.keys

    async def _fetch(self) -> bool:
        try:
            data = await asyncio.to_thread(self._fetch_blocking)
            new = self._parse(data)
        except Exception as e:
            log.warning("JWKS %s could not be refreshed (keeping %d known key(s)): %s", self.describe(),
                        len(self.keys.keys) if self.keys else 0, e)
            return False
        old = set(self.keys.by_kid) if self.keys else set()
        self.keys = new
        if set(new.by_kid) != old:
            log.info("JWKS %s loaded: key ids %s", self.describe(), ", ".join(sorted(new.by_kid)) or "(none)")
        return True

    def _start(self) -> asyncio.Task:
        if self._task is None or self._task.done():
            self.last_attempt = time.monotonic()
            self._task = asyncio.get_running_loop().create_task(self._fetch())
        return self._task

    async def refresh(self) -> bool:
        """Fetch again (joining a fetch already running); False if it failed or ran too long.
        A caller that gives up (or is cancelled) leaves the fetch running for the next one."""
        task = self._start()
        try:
            return await asyncio.wait_for(asyncio.shield(task), FETCH_DEADLINE + 5)
        except TimeoutError:
            log.warning("JWKS %s: fetch still running after %.0fs", self.describe(), FETCH_DEADLINE + 5)
            return False

    async def keyset(self) -> KeySet:
        ks = self.keys
        if ks is None:
            # nothing cached yet: this login has to wait (bounded) for the first fetch
            if time.monotonic() - self.last_attempt >= self.s.jwks_min_refresh or self._task is not None and not self._task.done():
                await self.refresh()
        elif time.monotonic() - ks.fetched_at > self.s.jwks_refresh and \
                time.monotonic() - self.last_attempt >= self.s.jwks_min_refresh:
            self._start()  # stale: refresh in the background, serve the cached keys now
        if self.keys is None:
            raise TokenError("token keys are not available (the JWKS could not be loaded)", "28000")
        return self.keys

    async def keyset_for_unknown_kid(self) -> KeySet | None:
        """An unknown kid: the provider may have rotated its keys. Refresh, at a bounded rate."""
        if self._task is not None and not self._task.done():
            await self.refresh()  # a fetch is running anyway: its result may know the kid
            return self.keys
        if time.monotonic() - self.last_attempt < self.s.jwks_min_refresh:
            return None
        await self.refresh()
        return self.keys


class JwtAuthenticator:
    """Verifier + key source: ``await authenticate(token)`` -> Identity or TokenError."""

    def __init__(self, settings: JwtSettings, base_dir: str | None = None) -> None:
        self.settings = settings
        self.verifier = TokenVerifier(settings)
        self.source = JwksSource(settings, base_dir)

    async def authenticate(self, token: str) -> Identity:
        hdr = self.verifier.header(token)
        keys = await self.source.keyset()
        if self.verifier.find_key(hdr, keys) is None and hdr.get("kid") is not None:
            fresh = await self.source.keyset_for_unknown_kid()
            if fresh is not None:
                keys = fresh
        return self.verifier.verify(token, keys, hdr=hdr)
