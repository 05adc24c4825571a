"""The station page in real headless Chromium against a running agent: upload a photo, see the
label and root causes, correct it, see the correction in the history. Screenshots at phone and
desktop widths are kept as test artefacts (tests/artifacts/, or $LINESIDE_ARTIFACTS)."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.agent_support import build_bundle, make_keys, photo, run_agent
from tests.browser_support import ARTIFACTS, headless_chromium, needs_browser

pytestmark = needs_browser


@pytest.fixture
def browser() -> Iterator[object]:
    with headless_chromium() as driver:
        yield driver


@pytest.mark.parametrize("width,height,name", [(390, 844, "phone"), (1280, 900, "desktop")])
def test_upload_see_answer_correct_and_see_history(
    tmp_path: Path, browser: object, width: int, height: int, name: str
) -> None:
    import cv2
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.select import Select
    from selenium.webdriver.support.ui import WebDriverWait

    driver = browser
    keys = make_keys(tmp_path / "keys")
    bundle = build_bundle(tmp_path / "dist", keys)
    state = tmp_path / "state"
    subprocess.run(
        [".venv/bin/edge-agent", "install", str(bundle.path), "--state-dir", str(state),
         "--trusted-key", str(keys.public)],
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    image = tmp_path / "part.jpg"
    cv2.imwrite(str(image), photo(4, (900, 1200)))
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with run_agent(state, "--trusted-key", str(keys.public)) as agent:
        agent.wait_ready()
        driver.set_window_size(width, height)  # type: ignore[attr-defined]
        driver.get(agent.url + "/")  # type: ignore[attr-defined]
        wait = WebDriverWait(driver, 30)
        wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#model option"))
        driver.find_element(By.ID, "file").send_keys(str(image))  # type: ignore[attr-defined]
        driver.find_element(By.ID, "classify").click()  # type: ignore[attr-defined]
        label = wait.until(ec.visibility_of_element_located((By.ID, "answer-label")))
        assert "%" in label.text
        result = driver.find_element(By.ID, "result").text  # type: ignore[attr-defined]
        assert "Likely causes" in result and "What to do" in result
        driver.save_screenshot(str(ARTIFACTS / f"station-{name}-answer.png"))  # type: ignore[attr-defined]
        choice = Select(driver.find_element(By.ID, "correct-label"))  # type: ignore[attr-defined]
        corrected = choice.options[0].get_attribute("value")
        choice.select_by_index(0)
        driver.find_element(By.ID, "station").send_keys("line3-s2")  # type: ignore[attr-defined]
        driver.find_element(By.CSS_SELECTOR, "#correct-form button").click()  # type: ignore[attr-defined]
        try:
            wait.until(lambda d: "recorded" in d.find_element(By.ID, "feedback-status").text)
        except Exception:
            status = driver.find_element(By.ID, "feedback-status").text  # type: ignore[attr-defined]
            logs = driver.get_log("browser")  # type: ignore[attr-defined]
            raise AssertionError(f"feedback not recorded: {status!r}; console: {logs}") from None
        wait.until(lambda d: corrected in d.find_element(By.ID, "history").text)
        assert "line3-s2" in driver.find_element(By.ID, "history").text  # type: ignore[attr-defined]
        driver.save_screenshot(str(ARTIFACTS / f"station-{name}-corrected.png"))  # type: ignore[attr-defined]
        # Accessibility basics: every input has a label; the answer region is announced.
        for field in ("model", "file", "note", "correct-label", "station"):
            assert driver.find_elements(By.CSS_SELECTOR, f"label[for='{field}']"), field  # type: ignore[attr-defined]
        assert driver.find_element(By.ID, "result").get_attribute("aria-live") == "polite"  # type: ignore[attr-defined]
        # The page runs whole under its own Content-Security-Policy: nothing of it was blocked.
        logs = driver.get_log("browser")  # type: ignore[attr-defined]
        assert not [e for e in logs if "Content Security Policy" in e["message"]], logs


def test_an_anomaly_answer_is_drawn_over_the_photo(tmp_path: Path, browser: object) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from tests.anomaly_agent_support import build_anomaly
    from tests.anomaly_parts import part_photo

    driver = browser
    keys = make_keys(tmp_path / "keys")
    bundle = build_anomaly(tmp_path / "anomaly", keys)
    state = tmp_path / "state"
    subprocess.run(
        [".venv/bin/edge-agent", "install", str(bundle), "--state-dir", str(state),
         "--trusted-key", str(keys.public)],
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    image = tmp_path / "chip.jpg"
    image.write_bytes(part_photo(41, "chip", 0, side=256).jpeg())
    with run_agent(state, "--trusted-key", str(keys.public)) as agent:
        agent.wait_ready()
        driver.get(agent.url + "/")  # type: ignore[attr-defined]
        wait = WebDriverWait(driver, 30)
        wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#model option"))
        driver.find_element(By.ID, "file").send_keys(str(image))  # type: ignore[attr-defined]
        driver.find_element(By.ID, "classify").click()  # type: ignore[attr-defined]
        canvas = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#heatmap[data-regions]"))
        assert int(canvas.get_attribute("data-regions")) >= 1
        assert canvas.get_attribute("width") == "256"
        assert "anomalous" in driver.find_element(By.ID, "anomaly-line").text  # type: ignore[attr-defined]
        driver.save_screenshot(str(ARTIFACTS / "station-anomaly.png"))  # type: ignore[attr-defined]
