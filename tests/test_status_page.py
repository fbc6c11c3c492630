"""The /ui status page in a real browser (Debian's chromium driven by playwright) against real processes.

Every check waits on what the page shows; screenshots are saved beside the test's logs
(and under $INFERQ_TEST_ARTIFACTS when set) as test artifacts.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest
from playwright.async_api import Browser, Page, async_playwright, expect

from inferq.client.registry import RegistryClient
from tests.conftest import sample
from tests.models import write_mlp
from tests.test_edge import poll, submit, v2_input

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
WAIT_MS = 30_000

pytestmark = [  # a feature suite that starts many processes: make test-features (CI runs it after make test)
    pytest.mark.features,
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="needs Debian's chromium (make system-deps)"),
]


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            await browser.close()


@pytest.fixture
async def page(browser: Browser, tmp_path: Path) -> AsyncIterator[Page]:
    context = await browser.new_context(viewport={"width": 1280, "height": 900})
    page = await context.new_page()
    try:
        yield page
    finally:
        await screenshot(page, tmp_path, "last")
        await context.close()


async def screenshot(page: Page, tmp_path: Path, name: str) -> Path:
    """Save the page as ``<name>.png`` with the test's files, and under $INFERQ_TEST_ARTIFACTS if set."""
    path = tmp_path / f"{name}.png"
    await page.screenshot(path=str(path), full_page=True)
    artifacts = os.environ.get("INFERQ_TEST_ARTIFACTS")
    if artifacts:
        Path(artifacts).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(artifacts) / path.name)
    return path


def version_cell(page: Page, model: str, field: str):
    return page.locator(f'article[data-model="{model}"] tr[data-version="1"] td[data-field="{field}"]')


async def test_the_status_page_shows_models_workers_rising_counts_failures_and_timelines_and_survives_an_edge_restart(
        spawn_worker, spawn_edge, http, page, tmp_path) -> None:
    await spawn_worker("paged")
    await spawn_worker("reshape")
    edge = await spawn_edge(env={"INFERQ_METRICS_REFRESH_S": "0.3"})
    await page.goto(f"{edge.url}/ui")
    await expect(page.locator("#connection")).to_have_text("live", timeout=WAIT_MS)
    await expect(page.locator('article[data-model="paged"] h3')).to_have_text("paged", timeout=WAIT_MS)
    workers = page.locator("#workers tbody tr", has_text="paged:1")
    await expect(workers.first.locator("td").nth(2)).to_have_text("ready", timeout=WAIT_MS)
    await expect(page.locator("#workers button")).to_have_count(0)  # API keys off: read-only, no drain buttons

    succeeded = version_cell(page, "paged", "succeeded")
    before = int(await succeeded.inner_text())
    jobs = [(await submit(http, edge, "paged", sample("mlp", seed=i)))["job_id"] for i in range(3)]
    for job in jobs:
        assert (await poll(http, edge, job))["status"] == "succeeded"
    await expect(succeeded).to_have_text(str(before + 3), timeout=WAIT_MS)

    body = {"inputs": [v2_input(np.ones((2, 4), np.float32)), v2_input(np.array([3, 3], np.int64), "shape", "INT64")]}
    async with http.post(f"{edge.url}/v1/models/reshape/jobs", json=body) as resp:
        failed = (await resp.json())["job_id"]
    assert (await poll(http, edge, failed))["status"] == "failed"
    row = page.locator("#jobs tbody tr", has_text=failed)
    await expect(row.locator("td").nth(2)).to_have_text("failed", timeout=WAIT_MS)
    await expect(row.locator("td").nth(3)).to_contain_text("inference_error", timeout=WAIT_MS)

    await page.fill("#job-id", jobs[0])
    await page.click("#lookup button")
    timeline = page.locator("#timeline li")
    await expect(timeline).to_have_count(3, timeout=WAIT_MS)
    await expect(timeline.nth(0)).to_contain_text("queued at")
    await expect(timeline.nth(1)).to_contain_text("running at")
    await expect(timeline.nth(2)).to_contain_text("succeeded at")
    await expect(page.locator("#timeline")).to_contain_text("trace ")
    await screenshot(page, tmp_path, "status-page")

    await edge.process.stop()
    await expect(page.locator("#connection")).to_have_text("reconnecting…", timeout=WAIT_MS)
    await spawn_edge(port=edge.port, env={"INFERQ_METRICS_REFRESH_S": "0.3"})
    await expect(page.locator("#connection")).to_have_text("live", timeout=WAIT_MS)
    await expect(succeeded).to_have_text(str(before + 3), timeout=WAIT_MS)  # from the replayed ledger
    await expect(page.locator("#jobs tbody tr", has_text=failed)).to_have_count(1, timeout=WAIT_MS)


async def test_the_workers_table_says_which_device_variant_each_worker_serves(spawn_worker, spawn_edge, page, tmp_path) -> None:
    name = f"paged-variant-{uuid.uuid4().hex[:6]}"
    edge = await spawn_edge(env={"INFERQ_METRICS_REFRESH_S": "0.3"})
    async with RegistryClient(edge.url) as registry:
        await registry.push(name, [(write_mlp(tmp_path / "v1", seed=931), "model.onnx"),
                                   (write_mlp(tmp_path / "int8", seed=932), "model-int8.onnx")],
                            config='[variants.int8]\nfile = "model-int8.onnx"\nsoc = "tegra234"\n')
    await spawn_worker(name, "--variant", "int8")
    await spawn_worker(name)
    await page.goto(f"{edge.url}/ui")
    served = page.locator("#workers tbody tr td[data-field=served]", has_text=f"{name}:1")
    await expect(served).to_have_count(2, timeout=WAIT_MS)
    assert sorted(await served.all_inner_texts()) == [f"{name}:1", f"{name}:1 · int8"]


async def test_the_status_page_fits_a_phone_screen(spawn_edge, browser, tmp_path) -> None:
    edge = await spawn_edge()
    context = await browser.new_context(viewport={"width": 390, "height": 844}, device_scale_factor=2, is_mobile=True)
    try:
        phone = await context.new_page()
        await phone.goto(f"{edge.url}/ui")
        await expect(phone.locator('article[data-model="mlp"]')).to_be_visible(timeout=WAIT_MS)  # a card, or an idle chip
        width = await phone.evaluate("document.documentElement.scrollWidth")
        assert width <= 390, f"the page scrolls sideways on a phone ({width}px wide); only tables may"
        await screenshot(phone, tmp_path, "status-page-phone")
    finally:
        await context.close()


async def test_with_api_keys_on_the_page_asks_for_a_key_and_a_tenant_sees_only_its_own_jobs(
        synced, spawn_worker, spawn_edge, http, page) -> None:
    edge = await spawn_edge(env={"INFERQ_EDGE_AUTH": "true", "INFERQ_METRICS_REFRESH_S": "0.3"})
    worker = await spawn_worker("mlp")
    acme, globex = await key_for(synced, "acme"), await key_for(synced, "globex")
    mine = (await submit(http, edge, "mlp", sample("mlp"), headers={"Authorization": f"Bearer {acme}"}))["job_id"]
    theirs = (await submit(http, edge, "mlp", sample("mlp"), headers={"Authorization": f"Bearer {globex}"}))["job_id"]
    await page.goto(f"{edge.url}/ui")
    await expect(page.locator("#connection")).to_have_text("API key needed", timeout=WAIT_MS)
    await page.fill("#api-key", acme)
    await page.click("#key-form button")
    await expect(page.locator("#connection")).to_have_text("live", timeout=WAIT_MS)
    await expect(page.locator("#jobs tbody tr", has_text=mine)).to_have_count(1, timeout=WAIT_MS)
    await expect(page.locator("#jobs tbody tr", has_text=theirs)).to_have_count(0)
    async with http.get(f"{edge.url}/ui/api/jobs/{theirs}", headers={"Authorization": f"Bearer {acme}"}) as resp:
        assert resp.status == 404, "another tenant's job is not shown, not even by id"
    async with http.get(f"{edge.url}/ui/api/state") as resp:
        assert resp.status == 401, "the page's data needs a key"
    await expect(page.locator("#workers tbody tr", has_text="mlp:1").first).to_be_visible(timeout=WAIT_MS)
    await expect(page.locator("#workers button")).to_have_count(0)  # read-only for a user key
    await expect(page.locator("#jobs button")).to_have_count(0)
    async with http.post(f"{edge.url}/ui/api/jobs/{mine}/cancel", headers={"Authorization": f"Bearer {acme}"}) as resp:
        assert resp.status == 403, "a user key cannot cancel from the page's API either"

    await page.reload()  # the key was in the page's memory only: it asks again
    await expect(page.locator("#connection")).to_have_text("API key needed", timeout=WAIT_MS)
    await page.fill("#api-key", await key_for(synced, "ops", role="admin"))
    await page.click("#key-form button")
    row = page.locator("#workers tbody tr", has_text=f"-{worker.pid}-")
    await row.get_by_role("button", name="Drain").click(timeout=WAIT_MS)
    assert await worker.wait(40) == 0, "the drained worker finishes its jobs and exits cleanly"
    await expect(row).to_have_count(0, timeout=WAIT_MS)

    # With no worker left, a new job of acme's stays queued: the admin cancels it from the jobs table.
    waiting = (await submit(http, edge, "mlp", sample("mlp"), headers={"Authorization": f"Bearer {acme}"}))["job_id"]
    job_row = page.locator("#jobs tbody tr", has_text=waiting)
    await job_row.get_by_role("button", name="Cancel").click(timeout=WAIT_MS)
    await expect(page.locator("#timeline li").last).to_contain_text("cancelled", timeout=WAIT_MS)
    await expect(job_row.locator("td").nth(2)).to_have_text("cancelled", timeout=WAIT_MS)
    async with http.get(f"{edge.url}/v1/jobs/{waiting}", headers={"Authorization": f"Bearer {acme}"}) as resp:
        assert (resp.status, (await resp.json())["status"]) == (200, "cancelled"), "its tenant sees what the ledger says"
    await expect(page.locator("#jobs tbody tr", has_text=mine).get_by_role("button")).to_have_count(0)  # finished


async def key_for(settings, tenant: str, role: str = "user") -> str:
    from inferq.edge.auth import create_key
    from inferq.runtime.coordination import open_etcd

    async with open_etcd(settings.etcd) as client:
        return await create_key(client, settings.namespace, tenant, 0.0, 0, 5, role)


async def test_the_nodes_table_shows_each_nodes_jetson_facts_and_connectivity(synced, spawn_edge, page, tmp_path) -> None:
    from tests.jetson import ORIN, write_sysroot
    from tests.support import Process

    agent = Process(["agent", "--node", "orin-1", "--capacity", "2"], synced, tmp_path / "agent.log",
                    {"INFERQ_AGENT_SYSROOT": str(write_sysroot(tmp_path / "orin", ORIN))})
    try:
        edge = await spawn_edge(env={"INFERQ_METRICS_REFRESH_S": "0.3"})
        await page.goto(f"{edge.url}/ui")
        row = page.locator("#nodes tbody tr", has_text="orin-1")
        await expect(row.locator('td[data-field="device"]')).to_have_text(
            "NVIDIA Jetson AGX Orin Developer Kit · tegra234 · L4T 36.4.3 · power MAXN · 61.4 GiB", timeout=WAIT_MS)
        await expect(row.locator('td[data-field="outage"]')).to_have_text("none")
        await screenshot(page, tmp_path, "status-page-nodes")
    finally:
        await agent.stop(timeout=40)
