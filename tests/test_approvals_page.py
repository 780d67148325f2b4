"""The reviewers' page in headless Chromium (Debian's chromium and chromedriver, driven by
selenium): a reviewer signs in, sees a held statement appear live with its facts, approves one
(the agent's UPDATE then returns its row count) and denies another with a reason."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import psycopg
import pytest

from pooler.pgcluster import seed_demo
from tests.conftest import upstream_entry
from tests.gwproc import free_port
from tests.test_approvals import Background

selenium = pytest.importorskip("selenium")
from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support import expected_conditions as ec  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
CHROMIUM = shutil.which("chromium")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER),
                                reason="chromium and chromedriver are not installed (./dev.sh setup --with-browser)")


@pytest.fixture(scope="module")
def shop(pg):
    seed_demo(pg, "approval_page_shop")
    return "approval_page_shop"


@pytest.fixture
def browser():
    profile = tempfile.mkdtemp(prefix="pooler-chromium-")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--user-data-dir={profile}"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def test_a_reviewer_approves_and_denies_on_the_page(pg, shop, gw_factory, browser):
    port = free_port()
    g = gw_factory(settings={"rules_dir": str(REPO / "rules"), "admin_users": "admin",
                             "approvals_listen": f"127.0.0.1:{port}"},
                   users={"ann": "groups=analysts"}, auth_users={"admin": "admin-password"},
                   databases={"shop": upstream_entry(pg, shop)})
    wait = WebDriverWait(browser, 20)
    browser.get(f"http://127.0.0.1:{port}/")
    wait.until(ec.visibility_of_element_located((By.ID, "user"))).send_keys("admin")
    browser.find_element(By.ID, "password").send_keys("wrong")
    browser.find_element(By.ID, "signin-btn").click()
    wait.until(ec.text_to_be_present_in_element((By.ID, "signin-err"), "not accepted"))
    browser.find_element(By.ID, "password").clear()
    browser.find_element(By.ID, "password").send_keys("admin-password")
    browser.find_element(By.ID, "signin-btn").click()
    wait.until(ec.text_to_be_present_in_element((By.ID, "who"), "signed in as admin"))
    wait.until(ec.text_to_be_present_in_element((By.ID, "live"), "live"))

    # a statement held now appears without reloading the page
    job = Background(lambda: psycopg.connect(g.dsn(user="ann", dbname="shop"), autocommit=True).execute(
        "UPDATE products SET price = price + 0").rowcount)
    card = wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#pending .card")))
    assert "UPDATE products\nSET price = price + 0" in card.find_element(By.CSS_SELECTOR, "pre.sql").text
    assert "rules/30_bulk_writes.star" in card.text and "ann (analysts)" in card.text
    card.find_element(By.CSS_SELECTOR, "button.approve").click()
    assert job.result() == int(pg.psql("SELECT count(*) FROM products", dbname=shop))
    wait.until(ec.text_to_be_present_in_element((By.ID, "decided"), "approved by admin"))

    job = Background(lambda: psycopg.connect(g.dsn(user="ann", dbname="shop"), autocommit=True).execute(
        "DELETE FROM order_items"))
    card = wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#pending .card")))
    card.find_element(By.CSS_SELECTOR, "input.reason").send_keys("not on a Friday")
    card.find_element(By.CSS_SELECTOR, "button.deny").click()
    with pytest.raises(psycopg.errors.InsufficientPrivilege, match="denied by reviewer admin: not on a Friday"):
        job.result()
    wait.until(ec.text_to_be_present_in_element((By.ID, "decided"), "denied by admin: not on a Friday"))
    assert pg.psql("SELECT count(*) FROM order_items", dbname=shop).strip() != "0"
