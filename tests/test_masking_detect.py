"""``detect`` on values of every type: when a statement is masked, personal data a ``detect``
rule should find (a card number, an IBAN, an e-mail address in free text) does not reach the
client through the type or format its value is sent in. "detect" redacts types that can carry
text inside (arrays, records, json, bytea), in text (psycopg) and binary (asyncpg) results."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from tests.masking_helpers import conn, masking_gw


# --------------------------------------------------------------------------- detect and non-text types

# a rule set that masks the named personal columns and finds personal data in everything else
DETECT_RULES = '''
def on_statement(stmt, session):
    if "pii-readers" in session.groups:
        return None
    return mask({"public.customers.email": "email", "public.customers.phone": "partial",
                 "public.customers.card_number": "partial", "public.customers.ssn": "redact",
                 "public.customers.full_name": "hash", "public.payments.iban": "partial",
                 "*.*.*": "detect"})
'''
CARD = "4111 1111 1111 1111"
IBAN = "DE89370400440532013000"
MAIL = "jo.doe@mail.example.org"
FREE_TEXT = f"card {CARD} iban {IBAN} mail {MAIL}"


@pytest.fixture
def detect_gw(pg, demo_shop, gw_factory, tmp_path):
    d = tmp_path / "rules"
    d.mkdir()
    (d / "50_detect.star").write_text(DETECT_RULES)
    gw = masking_gw(pg, demo_shop, gw_factory, rules_dir=str(d))
    # free text of an unlisted column that happens to hold a card number, an IBAN and an address
    pg.execute(f"UPDATE customers SET city = '{FREE_TEXT}' WHERE id = 3", dbname=demo_shop)
    return gw


def _assert_detected(got) -> None:
    text = repr(got)
    for secret in (CARD, CARD.replace(" ", ""), IBAN, MAIL):
        assert secret not in text, f"{secret!r} reached the client: {text[:300]}"
    # the hex/escape form of bytea must not carry them either
    for secret in (CARD, IBAN, MAIL):
        assert secret.encode().hex() not in text, f"{secret!r} (hex) reached the client: {text[:300]}"


# the plain column is detected ("card [card] iban [iban] mail [email]"); each of these sends the
# same value as a type that carries the text inside, where detect must find it too
DETECT_BYPASSES = [
    "SELECT ARRAY[city] FROM customers WHERE id = 3",
    "SELECT array_agg(city) FROM customers WHERE id = 3",
    "SELECT ROW(city, 1) FROM customers WHERE id = 3",
    "SELECT to_json(city) FROM customers WHERE id = 3",
    "SELECT to_jsonb(city) FROM customers WHERE id = 3",
    "SELECT convert_to(city, 'UTF8') FROM customers WHERE id = 3",
    "SELECT city::bytea FROM customers WHERE id = 3",
]


@pytest.mark.parametrize("sql", DETECT_BYPASSES)
def test_detect_is_bypassed_by_converting_free_text_to_a_non_text_type_text_format(detect_gw, sql):
    """build_template gives a computed column whose only masked sources ask for ``detect`` the
    method ``detect`` whatever the column's type, and methods._apply_detect returns every value
    of a non-text kind unchanged. So the card number, IBAN and e-mail address that
    ``SELECT city`` shows as ``[card]``/``[iban]``/``[email]`` come back raw once the value is
    wrapped in an array, a record, json/jsonb or bytea (psycopg, text format)."""
    with conn(detect_gw) as c:
        plain = c.execute("SELECT city FROM customers WHERE id = 3").fetchall()
        _assert_detected(plain)  # the column itself is detected
        _assert_detected(c.execute(sql).fetchall())


@pytest.mark.parametrize("sql", DETECT_BYPASSES)
def test_detect_is_bypassed_by_converting_free_text_to_a_non_text_type_binary(detect_gw, sql):
    """The same through asyncpg (binary results)."""
    async def main():
        c = await asyncpg.connect(detect_gw.url(user="agent", dbname="shop"))
        try:
            return [tuple(r) for r in await c.fetch(sql)]
        finally:
            await c.close()

    _assert_detected(asyncio.run(main()))
