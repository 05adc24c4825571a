"""Headless Chromium for the page tests: where Debian's chromium and chromedriver are, a skip mark
for when they are not, the artefacts folder screenshots go to, and a driver on a fresh profile."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
needs_browser = pytest.mark.skipif(
    CHROMIUM is None or CHROMEDRIVER is None,
    reason="needs Debian's chromium and chromium-driver (.ci/run installs them)",
)
#: Screenshots kept as test artefacts: tests/artifacts/, or $LINESIDE_ARTIFACTS.
ARTIFACTS = Path(
    os.environ.get("LINESIDE_ARTIFACTS", Path(__file__).resolve().parent / "artifacts")
)


@contextlib.contextmanager
def headless_chromium(*, console_log: bool = False) -> Iterator[Any]:
    """A Selenium driver for headless Chromium on a temporary profile, removed afterwards;
    `console_log` keeps every browser console message for `get_log("browser")`."""
    webdriver = pytest.importorskip("selenium.webdriver")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    profile = tempfile.mkdtemp(prefix="lineside-chromium-")
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run",
                 f"--user-data-dir={profile}"):  # fmt: skip
        options.add_argument(flag)
    if console_log:
        options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    try:
        driver = webdriver.Chrome(
            service=webdriver.ChromeService(executable_path=str(CHROMEDRIVER)), options=options
        )
        try:
            yield driver
        finally:
            driver.quit()
    finally:
        shutil.rmtree(profile, ignore_errors=True)
