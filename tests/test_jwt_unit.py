"""Token verification (pooler.auth.jwt), sans I/O: every check a forged or stale token must fail,
and the identity a good one yields."""

from __future__ import annotations

import asyncio
import base64
import hmac
import json

import jwt
import pytest

from pooler.auth.jwt import JwksSource, JwtAuthenticator, JwtSettings, KeySet, TokenError, TokenVerifier, claim_at
from tests.idp import AUDIENCE, ISSUER, Idp, SigningKey


@pytest.fixture(scope="module")
def idp(tmp_path_factory):
    return Idp(tmp_path_factory.mktemp("idp"))


@pytest.fixture(scope="module")
def keys(idp):
    return KeySet.parse(json.dumps(idp.jwks()))


def settings(**kw) -> JwtSettings:
    base = dict(jwks="unused", issuer=ISSUER, audience=(AUDIENCE,), leeway=5)
    base.update(kw)
    return JwtSettings(**base)


def verify(token: str, keys: KeySet, **kw):
    return TokenVerifier(settings(**kw)).verify(token, keys)


def b64(obj) -> str:
    raw = obj if isinstance(obj, bytes) else json.dumps(obj).encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def test_good_rsa_and_ec_tokens_yield_identity_and_groups(idp, keys):
    ident = verify(idp.token(sub="agent-7", groups=["agents", "readers"]), keys)
    assert (ident.user, ident.groups, ident.key_id) == ("agent-7", ("agents", "readers"), "rsa-1")
    assert ident.expires is not None
    assert verify(idp.token(key=idp.ec, sub="agent-8"), keys).user == "agent-8"


def test_dotted_claims_for_user_and_groups(idp, keys):
    tok = idp.token(groups=None, realm_access={"roles": ["agents"]}, preferred_username="bot")
    ident = verify(tok, keys, groups_claim="realm_access.roles", user_claim="preferred_username")
    assert (ident.user, ident.groups) == ("bot", ("agents",))
    assert claim_at({"https://x.example/groups": ["a"]}, "https://x.example/groups") == ["a"]
    assert claim_at({"a": {"b": 1}}, "a.c") is None


@pytest.mark.parametrize("case,expected", [
    ("expired", "token has expired"),
    ("not_yet_valid", "not yet valid"),
    ("wrong_issuer", "issuer is not accepted"),
    ("wrong_audience", "audience is not accepted"),
    ("bad_signature", "signature is invalid"),
    ("alg_none", "'none' is not accepted"),
    ("hmac_confusion", "does not match its signing key"),
    ("unknown_kid", "signing key is not known"),
    ("not_a_jwt", "not a JWT"),
    ("garbage_header", "not a JWT"),
    ("giant", "too large"),
    ("missing_groups", "no groups claim"),
    ("missing_exp", "required claim 'exp'"),
    ("alg_not_allowed", "algorithm PS256 is not accepted"),
    ("groups_not_strings", "not a list of strings"),
])
def test_every_bad_token_is_refused_with_the_check_that_failed(idp, keys, case, expected):
    now = int(__import__("time").time())
    if case == "expired":
        tok = idp.token(ttl=-60)
    elif case == "not_yet_valid":
        tok = idp.token(nbf=now + 600)
    elif case == "wrong_issuer":
        tok = idp.token(iss="https://evil.example")
    elif case == "wrong_audience":
        tok = idp.token(aud="another-service")
    elif case == "bad_signature":
        other = SigningKey("rsa", "rsa-1")  # same kid, different key
        tok = idp.token(key=other)
    elif case == "alg_none":
        tok = b64({"alg": "none", "typ": "JWT", "kid": "rsa-1"}) + "." + b64(idp.claims()) + "."
    elif case == "hmac_confusion":
        # the classic attack: HS256 "signed" with the RSA public key as the shared secret
        signing_input = b64({"alg": "HS256", "typ": "JWT", "kid": "rsa-1"}) + "." + b64(idp.claims())
        sig = hmac.new(idp.rsa.public_pem(), signing_input.encode(), "sha256").digest()
        tok = signing_input + "." + b64(sig)
        return _refused(tok, keys, expected, algorithms=("RS256", "ES256", "HS256"))
    elif case == "unknown_kid":
        tok = idp.token(headers={"kid": "nobody-knows-me"})
    elif case == "not_a_jwt":
        tok = "hunter2"
    elif case == "garbage_header":
        tok = "!!!.abc.def"
    elif case == "giant":
        tok = idp.token(padding="x" * 20000)
    elif case == "missing_groups":
        tok = idp.token(groups=None)
    elif case == "missing_exp":
        tok = jwt.encode({"iss": ISSUER, "aud": AUDIENCE, "sub": "a", "groups": []}, idp.rsa.private,
                         algorithm="RS256", headers={"kid": "rsa-1"})
    elif case == "alg_not_allowed":
        tok = jwt.encode(idp.claims(), idp.rsa.private, algorithm="PS256", headers={"kid": "rsa-1"})
    elif case == "groups_not_strings":
        tok = idp.token(groups=[1, 2])
    _refused(tok, keys, expected)


def _refused(tok, keys, expected, **kw):
    with pytest.raises(TokenError) as ei:
        verify(tok, keys, **kw)
    msg = str(ei.value)
    assert expected in msg
    assert ei.value.sqlstate in ("28000", "28P01")
    assert tok not in msg and "agent-1" not in msg  # nothing of the token comes back


def test_token_alg_must_match_the_algorithm_its_jwk_declares(idp):
    # an RSA key published for RS256 must not verify a PS256 token even if PS256 is allowed
    ks = KeySet.parse(json.dumps(idp.jwks()))
    tok = jwt.encode(idp.claims(), idp.rsa.private, algorithm="PS256", headers={"kid": "rsa-1"})
    with pytest.raises(TokenError, match="does not match"):
        verify(tok, ks, algorithms=("RS256", "PS256"))


def test_leeway_accepts_small_clock_skew(idp, keys):
    tok = idp.token(ttl=-3)
    assert verify(tok, keys, leeway=10).user == "agent-1"
    with pytest.raises(TokenError, match="expired"):
        verify(tok, keys, leeway=0)


def test_token_without_kid_uses_the_only_key_of_its_type(idp, keys):
    tok = jwt.encode(idp.claims(), idp.ec.private, algorithm="ES256")
    assert verify(tok, keys).user == "agent-1"
    two_rsa = KeySet.parse(json.dumps({"keys": [idp.rsa.jwk, SigningKey("rsa", "rsa-2").jwk]}))
    tok = jwt.encode(idp.claims(), idp.rsa.private, algorithm="RS256")
    with pytest.raises(TokenError, match="not known"):
        verify(tok, two_rsa)


@pytest.mark.parametrize("doc,msg", [
    ("not json", "not JSON"),
    ('{"nokeys": []}', "keys"),
    ('{"keys": [{"kty": "RSA", "n": "!!", "e": "AQAB"}]}', "no usable signing key"),
    ('{"keys": [{"kty": "EC", "use": "enc", "crv": "P-256"}]}', "no usable signing key"),
])
def test_broken_jwks_is_refused(doc, msg):
    with pytest.raises(ValueError, match=msg):
        KeySet.parse(doc)


def test_file_source_refreshes_on_unknown_kid_at_a_bounded_rate(tmp_path, idp):
    local = Idp(tmp_path)
    new_key = SigningKey("ec", "ec-rotated")
    auth = JwtAuthenticator(settings(jwks=str(local.jwks_path), jwks_min_refresh=3600))
    auth.source.load_now()
    tok = local.token(key=new_key)

    async def run():
        with pytest.raises(TokenError, match="not known"):
            await auth.authenticate(tok)  # refreshed too recently: not fetched again
        local.published.append(new_key)
        local.write_jwks()
        auth.source.last_attempt -= 7200  # the rate limit's window has passed
        return await auth.authenticate(tok)

    assert asyncio.run(run()).user == "agent-1"


def test_failed_refresh_keeps_the_known_keys(tmp_path):
    local = Idp(tmp_path)
    auth = JwtAuthenticator(settings(jwks=str(local.jwks_path), jwks_min_refresh=0, jwks_refresh=0))
    auth.source.load_now()
    local.jwks_path.write_text("{broken")

    async def run():
        return await auth.authenticate(local.token())  # refresh fails; old keys still verify

    assert asyncio.run(run()).user == "agent-1"


def test_jwks_source_knows_files_from_urls(tmp_path):
    assert JwksSource(settings(jwks="https://idp.example/jwks")).url == "https://idp.example/jwks"
    assert JwksSource(settings(jwks="keys/jwks.json"), str(tmp_path)).path == str(tmp_path / "keys/jwks.json")


def test_token_without_aud_is_refused_when_an_audience_is_configured(idp, keys):
    tok = idp.token(aud=None)
    with pytest.raises(TokenError, match="audience|'aud'"):
        verify(tok, keys)


def test_stale_keys_serve_logins_while_a_hanging_jwks_server_is_asked(idp, monkeypatch):
    """A JWKS server that accepts and never answers: logins with cached keys do not wait for
    it, and a cold start gives up after the fetch deadline instead of hanging."""
    import socket

    import pooler.auth.jwt as jwtmod

    monkeypatch.setattr(jwtmod, "FETCH_DEADLINE", 1.0)
    hole = socket.socket()
    hole.bind(("127.0.0.1", 0))
    hole.listen(16)  # never accept(): connect succeeds, the TLS handshake never gets an answer
    url = f"https://127.0.0.1:{hole.getsockname()[1]}/jwks.json"
    try:
        warm = JwtAuthenticator(settings(jwks=url, jwks_refresh=0, jwks_min_refresh=0))
        warm.source.keys = KeySet.parse(json.dumps(idp.jwks()), now=-1e9)  # very stale
        cold = JwtAuthenticator(settings(jwks=url, jwks_min_refresh=0))

        async def run():
            async with asyncio.timeout(5):  # a hang detector, not a timing assertion
                ident = await warm.authenticate(idp.token())
            assert warm.source._task is not None  # the refresh runs in the background
            with pytest.raises(TokenError, match="could not be loaded"):
                async with asyncio.timeout(30):
                    await cold.authenticate(idp.token())
            await asyncio.gather(warm.source._task, return_exceptions=True)
            return ident

        assert asyncio.run(run()).user == "agent-1"
    finally:
        hole.close()
