"""Real headless Chromium (playwright) for the page tests. Importing this skips the importing test module, with
the reason, where playwright or Chromium is missing (scripts/test installs Chromium in CI)."""

import contextlib
import shutil

import pytest

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
CHROMIUM = "/usr/bin/chromium"
if shutil.which(CHROMIUM) is None:
    pytest.skip(f"no Chromium at {CHROMIUM} (on Debian/Ubuntu: apt-get install chromium)", allow_module_level=True)

# no background traffic: the tests check that no request leaves this machine
ARGS = ["--no-sandbox", "--disable-background-networking", "--disable-component-update", "--no-first-run"]


@contextlib.contextmanager
def chromium():
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            yield browser
        finally:
            browser.close()
