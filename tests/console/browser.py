"""A headless Chromium driven by Selenium, for the console's browser tests.

Debian's ``chromium`` and ``chromium-driver`` packages (``/usr/bin/chromium``,
``/usr/bin/chromedriver``). Locally a missing browser skips the tests with the
command to install it; in CI (``CI=true``) it is a failure, never a skip.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

CHROMIUM = Path(os.environ.get("CONVEYOR_TEST_CHROMIUM", "/usr/bin/chromium"))
CHROMEDRIVER = Path(os.environ.get("CONVEYOR_TEST_CHROMEDRIVER", "/usr/bin/chromedriver"))
INSTALL = "apt-get install -y -qq chromium chromium-driver"


def require_browser() -> None:
    """Skip (locally) or fail (in CI) when Chromium or its driver is missing."""
    missing = [str(path) for path in (CHROMIUM, CHROMEDRIVER) if not path.exists()]
    if not missing:
        return
    message = f"{', '.join(missing)} missing: {INSTALL}"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def chromium(width: int = 1366, height: int = 900, dark: bool = False, offline: bool = False) -> object:
    """A new headless Chromium with a laptop-sized window.

    ``offline``: every host but 127.0.0.1 fails to resolve, as on a machine without internet
    (the tests reach the process at 127.0.0.1).
    """
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in (
        "--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", f"--window-size={width},{height}",
        "--disable-extensions", "--no-first-run", "--disable-background-networking", "--lang=en-GB",
    ):  # fmt: skip
        options.add_argument(argument)
    if offline:
        options.add_argument("--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1")
    if dark:
        options.add_argument("--force-dark-mode")
        options.add_argument("--blink-settings=preferredColorScheme=0")
    return webdriver.Chrome(options=options, service=Service(str(CHROMEDRIVER)))
