"""What the masking tests share: the demo users of the shipped rules, a gateway with those rules
in front of a demo shop, a connection as one of the users, and the check that no raw personal
value reached the client. The fixtures (``demo_shop``, ``raw_pii``, ``shop_gw``) are in
conftest.py."""

from __future__ import annotations

import psycopg

from tests.conftest import upstream_entry
from tests.gwproc import REPO

# agents may only read, analysts may write, only pii-readers see personal data unmasked
USERS = {"agent": "groups=agents", "ann": "groups=analysts", "dba": "groups=admins,pii-readers"}

MASKED = "SELECT email, ssn, card_number FROM customers ORDER BY id LIMIT 3"  # three masked columns


def masking_gw(pg, db: str, gw_factory, **settings):
    """The shipped rules (hash key "test-key") in front of database ``db``, served as database
    shop; ``settings`` added or overridden."""
    s = {"rules_dir": str(REPO / "rules"), "mask_hash_key": "test-key"}
    s.update(settings)
    return gw_factory(settings=s, users=USERS, databases={"shop": upstream_entry(pg, db)})


def conn(gw, user="agent"):
    return psycopg.connect(gw.dsn(user=user, dbname="shop"), autocommit=True)


def assert_no_secret(text: str, raw) -> None:
    """None of the values ``raw`` (the fixture ``raw_pii``) appears in ``text``, in any case."""
    low = text.lower()
    leaked = [v for v in raw if v.lower() in low]
    assert not leaked, f"raw values reached the client: {leaked[:3]}"
