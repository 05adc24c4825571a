"""The fleet page (`/fleet`) in real headless Chromium against a real `fleet-controller serve`
(real uvicorn, real Mosquitto) during a rollout to 200 simulated boxes: the token form, the
versions table matching the API, the waves and their gate figures, a box's update history, pause
and resume, and a halt by button with its reason shown. Screenshots at phone and desktop widths
are kept as test artefacts (tests/artifacts/, or $LINESIDE_ARTIFACTS)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from fleet_controller.plan import RolloutPlan, assign_waves, wave_sizes
from fleet_controller.simulator import Behaviour, BoxSpec, SimulatorThread
from tests.browser_support import ARTIFACTS, headless_chromium, needs_browser
from tests.fleet_support import (
    ControllerProcess,
    FleetKeys,
    fleet_keys,
    signed_bundles,
    simulator,
    spawn_controller,
    wait_for,
    write_config,
)
from tests.mqtt_support import Broker, running_broker
from tests.update_support import file_server

pytestmark = [pytest.mark.slow, needs_browser]
SITES = ("plant-a", "plant-b", "plant-c")
PHONE, DESKTOP = (390, 844), (1280, 900)
CANARY = 10


@dataclass(frozen=True)
class Fleet:
    broker: Broker
    keys: FleetKeys
    controller: ControllerProcess
    plan: dict[str, Any]
    base_dir: Path


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    """A broker, defects@1 and @2 signed and served over HTTP, and a real controller process."""
    work = tmp_path_factory.mktemp("fleet-page")
    keys = fleet_keys(work / "keys")
    files = work / "files"
    built = signed_bundles(files, keys, 1, 2)
    with running_broker(work / "broker") as broker, file_server(files) as (url, _log):
        config = write_config(work / "controller", keys, broker.port)
        controller = spawn_controller(config)
        try:
            assert controller.wait_up(), controller.log()[-4000:]
            plan = {
                "name": "defects-2",
                "bundle": str(built[2].path),
                "url": f"{url}/{built[2].path.name}",
                "cohort": {"site": list(SITES)},
                "waves": {"counts": [CANARY], "soak_s": 0.5, "deadline_s": 900},
                "gates": {"min_installs": 5, "max_failure_ratio": 0.2, "min_boxes": 2},
                "on_halt": {"rollback": False},
            }
            yield Fleet(broker, keys, controller, plan, work)
        finally:
            controller.stop()


@pytest.fixture
def browser() -> Iterator[Any]:
    with headless_chromium(console_log=True) as driver:
        yield driver


def boxes(canary: set[str]) -> list[BoxSpec]:
    """200 boxes over three sites, two lines and two profiles, on defects@1 (plant-c also runs
    scratches@3); the canary installs in a moment, everyone else takes minutes."""
    specs = []
    for n in range(200):
        site, device = SITES[n % len(SITES)], f"box{n:03d}"
        quick = f"{site}/{device}" in canary
        specs.append(
            BoxSpec(
                site=site,
                device=device,
                line=f"line{1 + n % 2}",
                groups=(f"line{1 + n % 2}",),
                profile="generic-x86-64-avx2" if n % 4 else "jetson-orin",
                models={"defects": 1, **({"scratches": 3} if site == "plant-c" else {})},
                behaviour=Behaviour(install_s=0.3 if quick else 600.0),
            )
        )
    return specs


def canary_of(fleet: Fleet) -> set[str]:
    refs = sorted(f"{SITES[n % 3]}/box{n:03d}" for n in range(200))
    plan = RolloutPlan.parse(fleet.plan, fleet.base_dir)
    return set(assign_waves(refs, wave_sizes(plan.waves, len(refs)), plan.name)[0])


def versions_from(devices: list[dict[str, Any]]) -> dict[tuple[str, str], tuple[int, int, int]]:
    """(model, version) -> (boxes, online, offline), computed from /v1/devices."""
    boxes: Counter[tuple[str, str]] = Counter()
    offline: Counter[tuple[str, str]] = Counter()
    for device in devices:
        for name, model in device["models"].items():
            key = (name, str(model["version"]))
            boxes[key] += 1
            offline[key] += 0 if device["online"] else 1
    return {k: (n, n - offline[k], offline[k]) for k, n in boxes.items()}


def cells(driver: Any, css: str) -> list[list[str]]:
    """The cells' text of the rows `css` picks, read in one step (the page re-renders often)."""
    found: list[list[str]] = driver.execute_script(
        "return [...document.querySelectorAll(arguments[0])]"
        ".map(row => [...row.cells].map(cell => cell.innerText.trim()))",
        css,
    )
    return found


def text(driver: Any, css: str) -> str:
    found: str | None = driver.execute_script(
        "const e = document.querySelector(arguments[0]); return e ? e.innerText : null", css
    )
    return found or ""


def versions_on_page(driver: Any) -> dict[tuple[str, str], tuple[int, int, int]]:
    return {
        (row[0], row[1]): (int(row[2]), int(row[3]), int(row[4]))
        for row in cells(driver, "#versions tbody tr[data-model]")
    }


def click(driver: Any, css: str) -> None:
    """Click what `css` picks once it is there and enabled, again if it was re-rendered."""
    from selenium.webdriver.common.by import By

    def clicked(d: Any) -> bool:
        found = d.find_elements(By.CSS_SELECTOR, css)
        if not found or not found[0].is_enabled():
            return False
        found[0].click()
        return True

    wait(driver).until(clicked)


def wait(driver: Any, timeout: float = 20) -> Any:
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, ignored_exceptions=[StaleElementReferenceException])


def confirm(driver: Any, command: str, rollout_id: str, why: str) -> None:
    """Press the rollout's `command` button, give the reason, confirm."""
    from selenium.webdriver.common.by import By

    click(driver, f"[data-key='{command}:{rollout_id}']")
    assert driver.find_element(By.ID, "confirm").get_attribute("open") is not None
    driver.find_element(By.ID, "confirm-why").send_keys(why)
    driver.find_element(By.ID, "confirm-ok").click()


def test_without_a_token_the_page_shows_only_the_token_form(fleet: Fleet, browser: Any) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    api = fleet.controller.config.api
    page = httpx.get(f"{api}/fleet", timeout=10)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    for path in ("/fleet", "/fleet/fleet.js", "/fleet/fleet.css"):
        headers = httpx.get(f"{api}{path}", timeout=10).headers
        csp = headers["content-security-policy"]
        assert "default-src 'none'" in csp and "script-src 'self'" in csp, csp
        assert "unsafe-inline" not in csp and "unsafe-eval" not in csp and "http" not in csp, csp
        assert "frame-ancestors 'none'" in csp
        assert headers["x-frame-options"] == "DENY"
        assert headers["x-content-type-options"] == "nosniff"
        assert headers["referrer-policy"] == "no-referrer"
    assert "<script>" not in page.text and "<style>" not in page.text and "http" not in page.text
    assert httpx.get(f"{api}/v1/overview", timeout=10).status_code == 401

    browser.set_window_size(*PHONE)
    browser.get(f"{api}/fleet")
    WebDriverWait(browser, 15).until(lambda d: d.find_element(By.ID, "token").is_displayed())
    token = browser.find_element(By.ID, "token")
    assert token.get_attribute("type") == "password"
    assert browser.find_element(By.CSS_SELECTOR, "label[for='token']").text == "API token"
    assert not browser.find_element(By.ID, "fleet").is_displayed()
    assert not browser.find_elements(By.CSS_SELECTOR, "#versions tbody tr, #boxes tbody tr")
    # A wrong token is refused, not kept, and shows nothing.
    token.send_keys("not-the-token")
    browser.find_element(By.ID, "token-submit").click()
    WebDriverWait(browser, 15).until(
        lambda d: "refused" in d.find_element(By.ID, "token-error").text
    )
    assert not browser.find_element(By.ID, "fleet").is_displayed()
    assert browser.execute_script("return sessionStorage.length") == 0
    assert "token" not in browser.current_url
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    browser.save_screenshot(str(ARTIFACTS / "fleet-phone-token.png"))
    blocked = [e for e in browser.get_log("browser") if "Content Security Policy" in e["message"]]
    assert not blocked, blocked


def test_the_fleet_page_during_a_rollout_to_200_boxes(fleet: Fleet, browser: Any) -> None:
    """Desktop: versions, waves and gates, a box's history, pause and resume (Escape cancels).
    Phone: halt by button with a reason; the rollout halts and the page shows why."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys as Key
    from selenium.webdriver.support.select import Select

    canary = canary_of(fleet)
    specs = boxes(canary)
    away = [b.ref for b in specs if b.ref not in canary][:3]
    simulated = simulator(fleet.broker.port, fleet.keys, specs, telemetry_interval_s=2.0)
    client = fleet.controller.client()
    ARTIFACTS.mkdir(parents=True, exist_ok=True)

    def devices() -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = client.get("/v1/devices").json()["devices"]
        return found

    def status() -> dict[str, Any]:
        found: dict[str, Any] = client.get(f"/v1/rollouts/{rollout_id}?boxes=false").json()
        return found

    with SimulatorThread(simulated) as sim, client:
        wait_for(
            lambda: sum(1 for d in devices() if d["agent_version"] and d["models"]) == 200,
            60, "200 boxes in the registry",
        )  # fmt: skip
        for ref in away:
            sim.set_online(ref, False)
        wait_for(lambda: sum(1 for d in devices() if not d["online"]) == 3, 30, "3 boxes offline")
        created = client.post("/v1/rollouts", json={"plan": fleet.plan})
        assert created.status_code == 201, created.text
        rollout_id = created.json()["id"]
        # The canary installs, soaks and passes its gates; wave 2 starts (and takes minutes).
        wait_for(lambda: status()["wave"] == 2 and status()["gates"], 60, "wave 2 under way")

        driver = browser
        until = wait(driver).until
        driver.set_window_size(*DESKTOP)
        driver.get(f"{fleet.controller.config.api}/fleet")
        until(lambda d: d.find_element(By.ID, "token").is_displayed())
        driver.find_element(By.ID, "token").send_keys(fleet.controller.config.token, Key.ENTER)
        until(lambda d: d.find_element(By.ID, "fleet").is_displayed())
        assert fleet.controller.config.token not in driver.current_url

        # Boxes × versions: the same counts as the API (retried while boxes report in).
        until(lambda d: versions_on_page(d) == versions_from(devices()))
        shown = versions_on_page(driver)
        scratches = sum(1 for b in specs if "scratches" in b.models)
        assert shown[("defects", "2")][0] == CANARY and shown[("scratches", "3")][0] == scratches
        assert "200 boxes: 197 online, 3 offline" in text(driver, "#summary")
        offline = cells(driver, "#boxes tbody tr.offline")
        assert sorted(row[0] for row in offline) == sorted(away), offline
        # Filter by site: the table follows, and matches the API's own filter.
        Select(driver.find_element(By.ID, "f-site")).select_by_value("plant-c")
        until(lambda d: "(of 200 in the fleet)" in text(d, "#summary"))
        site_c = client.get("/v1/devices", params={"site": "plant-c"}).json()["devices"]
        until(lambda d: versions_on_page(d) == versions_from(site_c))
        Select(driver.find_element(By.ID, "f-site")).select_by_value("")
        until(lambda d: "(of 200" not in text(d, "#summary"))

        # The rollout: its waves with per-wave counts, and the gate figures.
        article = f"details.rollout[data-id='{rollout_id}']"
        waves = until(lambda d: cells(d, f"{article} tr[data-wave]"))
        assert waves[0][:2] == ["1", str(CANARY)] and f"committed {CANARY}" in waves[0][3], waves
        assert waves[1][:2] == ["2 (current)", "190"], waves
        gates = {g["name"]: g for g in status()["gates"]}
        shown_gates = {row[0]: row for row in cells(driver, f"{article} tr[data-gate]")}
        assert shown_gates.keys() == gates.keys(), shown_gates
        install = shown_gates["install"]
        assert install[1:5] == [gates["install"]["status"], "0", "0.2", f"{CANARY} (needs 5)"]

        # A box's update history, in a dialog that Escape closes (found with the search field).
        box = sorted(canary)[0]
        driver.find_element(By.ID, "f-q").send_keys(box)
        opener = until(lambda d: d.find_element(By.CSS_SELECTOR, f"[data-key='box:{box}']"))
        opener.send_keys(Key.ENTER)
        history = until(lambda d: cells(d, "#history tbody tr"))
        assert history[0][1:5] == ["committed", "committed", "defects v2", rollout_id], history
        assert "Models" in text(driver, "#box-body dl")
        driver.save_screenshot(str(ARTIFACTS / "fleet-desktop-box-history.png"))
        driver.find_element(By.ID, "box-close").send_keys(Key.ESCAPE)
        until(lambda d: d.find_element(By.ID, "box").get_attribute("open") is None)
        driver.find_element(By.ID, "f-q").send_keys(Key.CONTROL, "a", Key.DELETE)
        until(lambda d: len(cells(d, "#boxes tbody tr")) == 50)

        # Escape cancels a command; pause and resume are confirmed with a reason.
        click(driver, f"[data-key='pause:{rollout_id}']")
        driver.find_element(By.ID, "confirm-why").send_keys("no", Key.ESCAPE)
        until(lambda d: d.find_element(By.ID, "confirm").get_attribute("open") is None)
        assert status()["status"] == "running"
        confirm(driver, "pause", rollout_id, "line 2 changeover")
        wait_for(lambda: status()["status"] == "paused", 15, "the rollout paused")
        until(lambda d: "paused" in text(d, f"{article} summary"))
        driver.save_screenshot(str(ARTIFACTS / "fleet-desktop-paused.png"))
        confirm(driver, "resume", rollout_id, "changeover done")
        wait_for(lambda: status()["status"] == "running", 15, "the rollout running again")
        assert [e["what"] for e in client.get(f"/v1/rollouts/{rollout_id}/audit").json()["audit"]
                if e["what"] in ("paused", "resumed")] == ["paused", "resumed"]  # fmt: skip

        # Phone: halt by button; the rollout halts and the page shows the reason.
        driver.set_window_size(*PHONE)
        driver.refresh()  # the token stays in this tab's session storage
        until(lambda d: "running" in text(d, f"{article} summary"))
        driver.save_screenshot(str(ARTIFACTS / "fleet-phone-running.png"))
        driver.execute_script("document.querySelector(arguments[0]).scrollIntoView()", article)
        reason = "camera 2 misaligned at plant-b; stop before wave 2 goes further"
        confirm(driver, "halt", rollout_id, reason)
        halted = wait_for(lambda: (s := status())["status"] == "halted" and s, 15, "a halt")
        assert halted["halt_reason"] == reason
        audit = client.get(f"/v1/rollouts/{rollout_id}/audit").json()["audit"]
        assert audit[-1]["what"] == "halted" and audit[-1]["actor"] == "ops", audit[-1]
        until(lambda d: reason in text(d, f"{article} .halt"))
        assert "halted" in text(driver, "#status")
        halt_button = driver.find_element(By.CSS_SELECTOR, f"[data-key='halt:{rollout_id}']")
        assert not halt_button.is_enabled()
        driver.execute_script("document.querySelector(arguments[0]).scrollIntoView()", article)
        driver.save_screenshot(str(ARTIFACTS / "fleet-phone-halted.png"))
        driver.execute_script("document.querySelector(arguments[0]).scrollIntoView()", "#boxes")
        driver.save_screenshot(str(ARTIFACTS / "fleet-phone-boxes.png"))
        # Nothing overflows the phone's width but the tables' own scrolling regions.
        assert driver.execute_script("return document.documentElement.scrollWidth") <= PHONE[0]
        driver.set_window_size(*DESKTOP)
        driver.save_screenshot(str(ARTIFACTS / "fleet-desktop-halted.png"))

        # Accessibility basics: every control is labelled; the page ran whole under its CSP.
        for field in ("f-site", "f-line", "f-group", "f-profile", "f-state", "f-q", "confirm-why"):
            assert driver.find_elements(By.CSS_SELECTOR, f"label[for='{field}']"), field
        logs = driver.get_log("browser")
        assert not [e for e in logs if "Content Security Policy" in e["message"]], logs
        assert not [e for e in logs if e["level"] == "SEVERE"], logs
