"""Headless Chromium for the page tests (the case board, CORS from a browser app), driven by Playwright over the
system's chromium; a test that asks for it is skipped, with the reason, where either is missing."""
from __future__ import annotations

import pytest

from tests.test_stats_ui import chromium_binary


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (tests/run.sh installs it)")
    binary = chromium_binary()
    if binary is None:
        pytest.skip("no chromium binary on PATH (Debian: apt-get install chromium); the page tests need one")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=binary, args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
        yield b
        b.close()
