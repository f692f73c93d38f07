"""The web console (/ui/) in a real headless browser (Debian's chromium driven by chromedriver through
selenium) against a real stack (Ceph, tgtd, the HIL simulator, Einstein, Picasso) from scripts/bmi-stack.

Screenshots of every page are kept in test-artifacts/ui/ (the path is printed; git ignores it).
A machine without chromium or chromedriver FAILS here with what to install: scripts/install-deps
installs both.
"""
from __future__ import annotations

import base64
import configparser
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.iscsi_rw import LunAddress, _Session, conf_chap
from tests.support.stack import REPO, Stack, running_stack

ADMIN = ("haasadmin", "admin1234")
TENANT = ("haas", "secret")
TENANT2 = ("tenant2", "secret2")
ARTIFACTS = REPO / "test-artifacts" / "ui"
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
pytestmark = pytest.mark.integration

NODE_INITIATOR_PREFIX = "iqn.2017-10.org.moc.bmi.node:"  # [iscsi] initiator_iqn_prefix's default


class Browser:
    """One headless chromium; ``login`` sets the Basic credentials every request of it carries."""

    def __init__(self, base_url: str) -> None:
        missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not os.access(p, os.X_OK)]
        if missing:
            pytest.fail(f"the browser test needs {', '.join(missing)}: install Debian's chromium and "
                        f"chromium-driver (bash scripts/install-deps)", pytrace=False)
        try:
            from selenium import webdriver
            from selenium.webdriver.chrome.service import Service
        except ImportError:
            pytest.fail("the browser test needs selenium: bash scripts/install-deps (requirements-test.txt)",
                        pytrace=False)
        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                    "--window-size=1400,1000", "--no-proxy-server"):
            options.add_argument(arg)
        try:
            self.driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
        except Exception as exc:  # noqa: BLE001 - any start failure is the same verdict
            pytest.fail(f"headless chromium could not start: {exc}", pytrace=False)
        self.base = base_url
        self.driver.execute_cdp_cmd("Network.enable", {})

    def login(self, user: tuple[str, str]) -> None:
        token = base64.b64encode(f"{user[0]}:{user[1]}".encode()).decode()
        self.driver.execute_cdp_cmd("Network.setExtraHTTPHeaders", {"headers": {"Authorization": f"Basic {token}"}})

    def open(self, path: str, shot: str) -> str:
        """Load ``path``, keep a full-page screenshot as ``shot``.png; the visible text of the page."""
        self.driver.get(self.base + path)
        # the whole page in one screenshot: a viewport as tall as the document
        height = int(self.driver.execute_script("return document.documentElement.scrollHeight"))
        self.driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                                    {"width": 1400, "height": max(600, height), "deviceScaleFactor": 1,
                                     "mobile": False})
        assert self.driver.save_screenshot(str(ARTIFACTS / f"{shot}.png"))
        (ARTIFACTS / f"{shot}.html").write_text(self.driver.page_source)
        return str(self.driver.find_element("tag name", "body").text)

    def find(self, css: str) -> Any:
        return self.driver.find_element("css selector", css)

    def find_all(self, css: str) -> list[Any]:
        return list(self.driver.find_elements("css selector", css))

    def close(self) -> None:
        self.driver.quit()


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    with running_stack() as handle:
        yield handle


@pytest.fixture()
def browser(stack: Stack, capsys: pytest.CaptureFixture[str]) -> Iterator[Browser]:
    shutil.rmtree(ARTIFACTS, ignore_errors=True)
    ARTIFACTS.mkdir(parents=True)
    with capsys.disabled():  # shown even when pytest captures output
        print(f"\nweb console screenshots: {ARTIFACTS}")
    b = Browser(stack.url)
    try:
        yield b
    finally:
        b.close()


def portal(stack: Stack) -> str:
    cfg = configparser.ConfigParser(interpolation=None)
    cfg.read(stack.env["BMI_CONFIG"])
    return f"{cfg.get('iscsi', 'ip')}:{cfg.get('iscsi', 'port')}"


def target_chap(stack: Stack, iqn: str) -> tuple[str, str] | None:
    """The target's CHAP account, as the node's iPXE script carries it (from the target's conf file)."""
    cfg = configparser.ConfigParser(interpolation=None)
    cfg.read(stack.env["BMI_CONFIG"])
    return conf_chap(Path(cfg.get("iscsi", "conf_dir")) / (iqn.rsplit(":", 1)[1] + ".conf"))


def clone_iqn(stack: Stack, node: str) -> str:
    """The IQN of the live target of ``node``'s clone (from tgtd, through its Ceph name in ``bmi db ls``)."""
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in stack.bmi("db", "ls").stdout.splitlines()
            if line.startswith("|")]
    ceph = next(r[3] for r in rows if r[1] == node)
    return next(t for t in stack.targets() if t.endswith(ceph))


def test_console_in_a_real_browser(stack: Stack, browser: Browser) -> None:
    stack.rbd("create", "ui-golden", "--size", "64", "--image-format", "2")
    stack.bmi("import", "bmi_infra", "ui-golden")
    stack.bmi("pro", "bmi_infra", "bmi_node", "ui-golden", "bmi_network", "bmi_port")
    stack.bmi("snap", "create", "bmi_infra", "bmi_node", "ui-snap")
    stack.bmi("pro", "bmi_infra", "cisco-01", "ui-snap", "bmi_network", "enp130s0f0")
    stack.rbd("create", "ui-other", "--size", "8", "--image-format", "2")
    stack.bmi("import", "other_project", "ui-other", user=TENANT2)
    node_iqn, cisco_iqn = clone_iqn(stack, "bmi_node"), clone_iqn(stack, "cisco-01")

    # bmi_node's initiator logs in (as its iPXE script would); cisco-01's does not
    session = _Session(LunAddress(portal(stack), node_iqn, 1), NODE_INITIATOR_PREFIX + "bmi_node",
                       chap=target_chap(stack, node_iqn))
    try:
        browser.login(TENANT)
        home = browser.open("/ui/", "1-tenant-projects")
        assert [a.text for a in browser.find_all("#projects a")] == ["bmi_infra"]
        assert "other_project" not in home
        verbs = [td.text for td in browser.find_all("#operations-finished tr td:nth-child(2)")]
        assert {"import_image", "provision", "create_snapshot"} <= set(verbs)

        browser.find("#projects a").click()
        text = browser.open("/ui/projects/bmi_infra", "2-tenant-project")
        assert browser.find("#project-name").text == "bmi_infra"
        # the image tree: golden -> (bmi_node's clone, the snapshot -> cisco-01's clone), with sizes
        golden = browser.find('#images > li[data-name="ui-golden"]')
        assert golden.get_attribute("data-kind") == "golden" and "64.0 MiB" in golden.text
        snap = browser.find('#images > li[data-name="ui-golden"] > ul > li[data-name="ui-snap"]')
        assert snap.get_attribute("data-kind") == "snapshot"
        under_golden = [li.get_attribute("data-kind")
                        for li in browser.find_all('#images > li[data-name="ui-golden"] > ul > li')]
        assert sorted(under_golden) == ["node", "snapshot"]
        assert [li.get_attribute("data-kind") for li in browser.find_all('li[data-name="ui-snap"] > ul > li')] \
            == ["node"]
        # the provisioned nodes with their targets and who is logged in
        node_row, cisco_row = browser.find('tr[data-node="bmi_node"]'), browser.find('tr[data-node="cisco-01"]')
        assert node_iqn in node_row.text and cisco_iqn in cisco_row.text
        assert browser.find('tr[data-node="bmi_node"] td.login .yes').text == "yes"
        assert NODE_INITIATOR_PREFIX + "bmi_node" in node_row.text
        assert browser.find('tr[data-node="cisco-01"] td.login .no').text == "no"
        assert "ui-snap" in cisco_row.text and "bmi_network" in cisco_row.text
        assert "ui-other" not in text and "other_project" not in text
    finally:
        session.close()

    # once the initiator logged out, the page says so
    browser.open("/ui/projects/bmi_infra", "3-tenant-project-logged-out")
    assert browser.find('tr[data-node="bmi_node"] td.login .no').text == "no"

    # tenant isolation: tenant2 sees its own project only, and bmi_infra's page is refused by URL
    browser.login(TENANT2)
    home2 = browser.open("/ui/", "4-tenant2-projects")
    assert [a.text for a in browser.find_all("#projects a")] == ["other_project"]
    assert "bmi_infra" not in home2 and "ui-golden" not in home2 and "bmi_node" not in home2
    refused = browser.open("/ui/projects/bmi_infra", "5-tenant2-refused")
    assert "Error 403" in refused and "Forbidden" in refused
    assert not re.search(r"ui-golden|ui-snap|bmi_node|cisco-01|iqn\.", refused)
    other = browser.open("/ui/projects/other_project", "6-tenant2-project")
    assert browser.find('#images > li[data-name="ui-other"]') and "ui-golden" not in other

    # the administrator sees every project
    browser.login(ADMIN)
    browser.open("/ui/", "7-admin-projects")
    assert [a.text for a in browser.find_all("#projects a")] == ["bmi_infra", "other_project"]
    assert "(administrator)" in browser.find("header").text

    for name in ("1-tenant-projects", "2-tenant-project", "5-tenant2-refused", "7-admin-projects"):
        assert (ARTIFACTS / f"{name}.png").stat().st_size > 1000

    stack.bmi("dpro", "bmi_infra", "cisco-01", "bmi_network", "enp130s0f0")
    stack.bmi("dpro", "bmi_infra", "bmi_node", "bmi_network", "bmi_port")
    stack.bmi("snap", "rm", "bmi_infra", "ui-snap")
    stack.bmi("rm", "bmi_infra", "ui-golden")
    stack.bmi("rm", "other_project", "ui-other", user=TENANT2)
    stack.rbd("rm", "ui-golden")
    stack.rbd("rm", "ui-other")
