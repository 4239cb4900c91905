"""The dashboard in a real browser: headless Chromium, driven by Playwright, logs in with
the key and watches a batch run on a real worker against a slow simulator.

The browser is Debian's ``chromium`` (Playwright's own download is not needed). Without
it the test skips on a developer's machine and fails under ``CI=true``, where
``.ci/run`` installs it.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import sync_playwright
from sqlalchemy import func, select

from devstack.simulator import Simulator, SimulatorConfig
from jobs.db import session_scope
from jobs.models import Attempt
from jobs.settings import Settings
from tests.support import TEST_KEY, WEB_KEY, WorkerProcess, jsonl, line, make_settings, start_web

pytestmark = pytest.mark.integration

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
#: Requests of the batch, and the jobs under way at once (the worker's threads and its
#: dispatch window: a message carries up to ten jobs): with 0.5 to 1.5 s a call, the
#: batch takes several seconds, so the page's two-second refresh sees it move.
REQUESTS, THREADS = 24, 3


def require_chromium() -> None:
    if CHROMIUM.exists():
        return
    reason = f"no {CHROMIUM}: install Debian's chromium (apt-get install chromium)"
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason}; under CI=true the browser test must run (.ci/run installs it)")
    pytest.skip(reason)


@pytest.fixture
def slow_simulator() -> Iterator[Simulator]:
    sim = Simulator(SimulatorConfig(key=TEST_KEY, latency_min=0.5, latency_max=1.5)).start()
    yield sim
    sim.stop()


@pytest.fixture
def slow_settings(clean_db: str, redis_url: str, slow_simulator: Simulator) -> Settings:
    return make_settings(clean_db, redis_url, slow_simulator.url, dispatch_window=THREADS)


def create_batch(base_url: str, tmp_path: Path) -> str:
    """Upload a file and create its batch through the API, as a user's SDK would."""
    headers = {"Authorization": f"Bearer {WEB_KEY}"}
    rows = [line(f"r{i}") for i in range(REQUESTS)]
    with httpx.Client(base_url=base_url, headers=headers, timeout=30) as client:
        upload = client.post(
            "/v1/files", files={"file": ("requests.jsonl", jsonl(*rows))}, data={"purpose": "batch"}
        )
        assert upload.status_code == 200, upload.text
        batch = client.post(
            "/v1/batches",
            json={
                "input_file_id": upload.json()["id"],
                "endpoint": "/v1/chat/completions",
                "completion_window": "24h",
                "metadata": {"run": "browser"},
            },
        )
        assert batch.status_code == 200, batch.text
        batch_id: str = batch.json()["id"]
    return batch_id


def test_a_browser_watches_a_batch_run_to_completed(
    slow_settings: Settings, tmp_path: Path
) -> None:
    require_chromium()
    assert slow_settings.database_url
    web = start_web(slow_settings, tmp_path / "web.log")
    worker = WorkerProcess(slow_settings, tmp_path / "worker.log", concurrency=THREADS)
    try:
        worker.wait_ready()
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
            context = browser.new_context(
                http_credentials={"username": "batch", "password": WEB_KEY},
                viewport={"width": 1280, "height": 900},
            )
            page = context.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            assert (reply := page.goto(web.url + "/")) is not None and reply.status == 200
            # Survives only if the page is never reloaded.
            page.evaluate("window.__sameDocument = true")

            batch_id = create_batch(web.url, tmp_path)
            number = batch_id.removeprefix("batch_")
            row = page.locator(f'tr[data-batch="{number}"]')
            row.wait_for(timeout=30_000)  # the new batch appears without a reload
            done = row.locator('[data-field="done"]')
            status = row.locator('[data-field="status"]')
            pace = row.locator('[data-field="pace"]')
            seen: list[int] = []  # each value the page showed, in order
            paces: set[str] = set()  # the batch's pace as the page showed it
            deadline = time.monotonic() + 120
            while True:
                value = int(done.inner_text().replace(",", ""))
                if not seen or seen[-1] != value:
                    seen.append(value)
                paces.add(pace.inner_text())
                if status.inner_text() == "completed":
                    break
                assert time.monotonic() < deadline, f"still {status.inner_text()}: {seen}"
                page.wait_for_timeout(100)
            final = int(done.inner_text().replace(",", ""))
            if seen[-1] != final:
                seen.append(final)
            page.wait_for_timeout(1000)  # the bars' last widths ease in
            page.screenshot(path=str(tmp_path / "dashboard.png"), full_page=True)
            print(f"\ndone counts the page showed: {seen}")

            # The count moved while the page watched, up only, to the whole batch.
            assert len(seen) >= 2 and seen == sorted(seen) and seen[-1] == REQUESTS, seen
            assert page.evaluate("window.__sameDocument") is True
            # Under way it showed its pace ("12/min, 0 min 40 s left"), refreshed in place;
            # once ended, none.
            assert any(re.fullmatch(r"[\d,]+/min, \d+ min \d+ s left", p) for p in paces), paces
            assert pace.inner_text() == ""
            width = row.locator('[data-part="succeeded"]').evaluate("e => e.style.width")
            assert float(width.removesuffix("%")) == 100.0, width
            # The chart, empty when the page loaded, comes to draw every call of the ledger.
            with session_scope(slow_settings.database_url) as s:
                calls = s.execute(select(func.count()).select_from(Attempt)).scalar_one()
            page.wait_for_function(
                "calls => Array.from(document.querySelectorAll('#chart rect[data-value]'))"
                ".slice(0, 60).reduce((sum, bar) => sum + Number(bar.dataset.value), 0) === calls",
                arg=calls,
                timeout=15_000,
            )

            # The batch's page, and its output file downloaded with the same login.
            page.click(f'a[href="/batches/{batch_id}"]')
            page.wait_for_selector('a[data-file="output_file_id"]', timeout=30_000)
            assert page.locator('#batch [data-field="status"]').inner_text() == "completed"
            assert page.locator('#batch [data-field="succeeded"]').inner_text() == str(REQUESTS)
            href = page.get_attribute('a[data-file="output_file_id"]', "href")
            downloaded = page.evaluate(
                "async (href) => { const r = await fetch(href);"
                " return [r.status, (await r.text()).trim().split('\\n').length]; }",
                href,
            )
            assert downloaded == [200, REQUESTS]
            page.screenshot(path=str(tmp_path / "batch.png"), full_page=True)
            assert errors == []
            browser.close()
    finally:
        worker.stop()
        web.stop(10)
    assert (tmp_path / "dashboard.png").stat().st_size > 10_000
