"""`/dashboard` and `/fairness` over a live server on the tiny model, in a real headless Chromium.

Needs Debian's `chromium` and `chromium-driver` (`.ci/run` installs them) and selenium (the dev
extra); skipped, saying which is missing, otherwise. RADIXFAIR_DASHBOARD_SCREENSHOT=PATH also saves
the screenshot there (the README's figure).
"""

from __future__ import annotations

import os
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fixtures.live_server import LiveServer

from radixfair.engine.engine import Engine
from radixfair.server import ServerClient, create_app

FAIRNESS_FIELDS = {"policy", "quantum", "window_s", "throughput", "hit_rate", "kv_used", "clients"}
CLIENT_FIELDS = {"client", "service_rate", "waiting", "running", "deficit", "hit_rate", "ttft_p50", "ttft_p99",
                 "e2e_p50", "e2e_p99", "backlogged", "behind"}
CLIENTS = ("heavy", "light-a", "light-b")
HEAVY_FACTOR = 4  # the heavy client's requests per round, against one for each light client
ADMIN_KEY = "sk-operator"
KEYS = {"sk-alice": ServerClient("alice")}
WAIT_S = 90  # the browser's wait for what it checks; the page polls every 2 s


def _chromium() -> tuple[str, str] | None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


@pytest.fixture(scope="module")
def engine(tiny_llama: Path) -> Iterator[Engine]:
    with Engine(str(tiny_llama), dtype="float32", max_total_tokens=4096, schedule_policy="dlpm",
                dlpm_quantum=256, max_running_requests=8) as e:
        yield e


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    found = _chromium()
    if found is None:
        pytest.skip("chromium and chromedriver are not installed (apt-get install chromium chromium-driver; "
                    ".ci/run does it)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (the dev extra)")
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = found[0]
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1280,1000"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(found[1]), options=opts)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


class Traffic:
    """Three clients, each over its own document (so the cache has prefixes to hit), sending
    requests back to back until stopped or `max_rounds` are done; the heavy one from `HEAVY_FACTOR`
    threads, so it has 4x the others' requests in flight."""

    def __init__(self, url: str, headers: dict[str, str] | None = None, max_rounds: int = 400) -> None:
        self.url = url
        self.headers = headers or {}
        self.max_rounds = max_rounds
        self.stop = threading.Event()
        self.errors: list[str] = []
        self.threads = [threading.Thread(target=self._client, args=(c, k), daemon=True)
                        for c in CLIENTS for k in range(HEAVY_FACTOR if c == "heavy" else 1)]
        for t in self.threads:
            t.start()

    def _client(self, client: str, k: int) -> None:
        doc = f"Document of {client}: " + " ".join(f"{client}{i}" for i in range(60))
        with httpx.Client(base_url=self.url, timeout=60, headers={**self.headers, "x-client-id": client}) as http:
            for r in range(self.max_rounds):
                if self.stop.is_set():
                    return
                body = {"text": f"{doc} Question {r}.{k}?",
                        "sampling_params": {"max_new_tokens": 12, "temperature": 0, "ignore_eos": True}}
                try:
                    resp = http.post("/generate", json=body)
                    if resp.status_code != 200:
                        self.errors.append(f"{client}: {resp.status_code} {resp.text[:200]}")
                except httpx.HTTPError as e:
                    if not self.stop.is_set():
                        self.errors.append(f"{client}: {e}")
                    return

    def close(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=60)


def _drawn(driver: Any, heavy: str) -> bool:
    """All three clients in the table, and every client's line in the chart with points; the
    heavy client's line rising above the zero line somewhere."""
    from selenium.webdriver.common.by import By

    rows = {r.get_attribute("data-client") for r in driver.find_elements(By.CSS_SELECTOR, "#clients tbody tr")}
    if not set(CLIENTS) <= rows:
        return False
    lines = {ln.get_attribute("data-client"): ln for ln in driver.find_elements(By.CSS_SELECTOR, "#chart polyline.series")}
    if not set(CLIENTS) <= set(lines) or any(int(lines[c].get_attribute("data-points") or 0) < 2 for c in CLIENTS):
        return False
    points = [tuple(map(float, p.split(","))) for p in (lines[heavy].get_attribute("points") or "").split()]
    height = driver.execute_script("return document.getElementById('chart').viewBox.baseVal.height")
    return any(y < height - 26 - 0.5 for _, y in points)  # above the x axis (26 px bottom padding)


def test_dashboard_shows_clients_and_service_lines(engine: Engine, browser: Any, tmp_path: Path) -> None:
    from selenium.webdriver.support.ui import WebDriverWait

    srv = LiveServer(create_app(engine, fairness_window=10.0))
    traffic = Traffic(srv.url)
    try:
        browser.get(srv.url + "/dashboard")
        WebDriverWait(browser, WAIT_S, poll_frequency=0.5).until(lambda d: _drawn(d, "heavy"))
        shot = tmp_path / "dashboard.png"
        browser.save_screenshot(str(shot))
        assert shot.stat().st_size > 0
        if extra := os.environ.get("RADIXFAIR_DASHBOARD_SCREENSHOT"):
            browser.save_screenshot(extra)
        # the JSON behind the page: the documented fields, one row per client
        data = httpx.get(srv.url + "/fairness", timeout=30).json()
        assert set(data) >= FAIRNESS_FIELDS
        assert data["policy"] == "dlpm" and data["quantum"] == 256
        rows = {c["client"]: c for c in data["clients"]}
        assert set(CLIENTS) <= set(rows)
        for c in CLIENTS:
            assert set(rows[c]) == CLIENT_FIELDS, rows[c]
        assert rows["heavy"]["hit_rate"] is not None and rows["heavy"]["e2e_p99"] is not None
        assert 0.0 <= data["kv_used"] <= 1.0
        assert not traffic.errors, traffic.errors[:3]
    finally:
        traffic.close()
        srv.stop()


def test_dashboard_says_when_the_server_is_down(engine: Engine, browser: Any) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    srv = LiveServer(create_app(engine))
    stopped = False
    try:
        browser.get(srv.url + "/dashboard")
        WebDriverWait(browser, WAIT_S, poll_frequency=0.5).until(
            lambda d: d.find_element(By.ID, "policy").text == "dlpm")
        srv.stop()
        stopped = True
        box = WebDriverWait(browser, WAIT_S, poll_frequency=0.5).until(
            lambda d: d.find_element(By.CSS_SELECTOR, "#error.shown"))
        assert "Cannot reach the radixfair server" in box.text
    finally:
        if not stopped:
            srv.stop()


def test_operator_key_guards_page_and_data(engine: Engine, browser: Any) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    srv = LiveServer(create_app(engine, KEYS, admin_api_key=(ADMIN_KEY,)))
    traffic = Traffic(srv.url, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, max_rounds=3)
    try:
        with httpx.Client(base_url=srv.url, timeout=30) as http:
            page = http.get("/dashboard", headers={"Accept": "text/html"})
            assert page.status_code == 401 and "Operator key" in page.text and "fairness" in page.text
            assert "clients" not in page.text  # the key page, not the dashboard
            assert http.get("/dashboard").status_code == 401
            assert http.get("/fairness").status_code == 401
            alice = {"Authorization": "Bearer sk-alice"}
            assert http.get("/fairness", headers=alice).status_code == 403
            assert http.get("/dashboard", headers={**alice, "Accept": "text/html"}).status_code == 403
            admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
            assert http.get("/fairness", headers=admin).status_code == 200
            assert http.get("/dashboard", headers=admin).status_code == 200
        # in the browser: asked for the key once, then the dashboard with its data
        browser.get(srv.url + "/dashboard")
        field = WebDriverWait(browser, WAIT_S).until(lambda d: d.find_element(By.ID, "key"))
        field.send_keys("wrong-key")
        browser.find_element(By.CSS_SELECTOR, "#key-form button").click()
        WebDriverWait(browser, WAIT_S).until(lambda d: "Refused (401)" in d.find_element(By.ID, "error").text)
        field = browser.find_element(By.ID, "key")
        field.clear()
        field.send_keys(ADMIN_KEY)
        browser.find_element(By.CSS_SELECTOR, "#key-form button").click()
        WebDriverWait(browser, WAIT_S, poll_frequency=0.5).until(
            lambda d: d.find_elements(By.ID, "policy") and d.find_element(By.ID, "policy").text == "dlpm")
        assert ADMIN_KEY not in browser.current_url
        assert browser.execute_script("return sessionStorage.getItem('radixfair.operatorKey')") == ADMIN_KEY
        # a reload asks no more: the key page finds it in the tab's storage
        browser.refresh()
        WebDriverWait(browser, WAIT_S, poll_frequency=0.5).until(
            lambda d: d.find_elements(By.ID, "policy") and d.find_element(By.ID, "policy").text == "dlpm")
        traffic.close()
        assert not traffic.errors, traffic.errors[:3]
    finally:
        traffic.close()
        srv.stop()


def test_dashboard_shows_a_routers_workers(browser: Any) -> None:
    """A router plugs its view in through `FairnessView.report(..., workers=...)`: the same page
    then draws a workers table, an unhealthy worker highlighted."""
    from fastapi import FastAPI
    from fastapi.responses import HTMLResponse
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from radixfair.io_struct import ClientStats
    from radixfair.metrics.live_fairness import FairnessSnapshot, FairnessView
    from radixfair.server.fairness import page

    view = FairnessView(window_s=30.0)
    t = [0.0]
    workers = [{"url": "http://w0:30000", "load": 12, "healthy": True, "clients": ["heavy", "light-a"]},
               {"url": "http://w1:30000", "load": 0, "healthy": False, "clients": []}]

    def snapshot() -> FairnessSnapshot:
        t[0] += 5.0
        k = t[0]
        return FairnessSnapshot(time=k, policy="dlpm", quantum=4096.0, balance="deficit", bound=100.0,
                                input_tokens=int(100 * k), cached_tokens=int(50 * k), decode_tokens=int(10 * k),
                                kv_used=0.5, clients=(ClientStats("heavy", 3, 2, 40.0 * k, -10.0),
                                                      ClientStats("light-a", 2, 1, 5.0 * k, 30.0)))

    app = FastAPI()
    app.get("/dashboard")(lambda: HTMLResponse(page("dashboard.html")))
    app.get("/fairness")(lambda: view.report(snapshot(), workers=workers))
    srv = LiveServer(app)
    try:
        browser.get(srv.url + "/dashboard")
        WebDriverWait(browser, WAIT_S, poll_frequency=0.5).until(
            lambda d: len(d.find_elements(By.CSS_SELECTOR, "#workers tbody tr")) == 2)
        rows = browser.find_elements(By.CSS_SELECTOR, "#workers tbody tr")
        assert "http://w0:30000" in rows[0].text and "heavy, light-a" in rows[0].text
        assert rows[1].get_attribute("class") == "unhealthy" and "no" in rows[1].text
        # light-a waits and trails heavy by far more than the bound: its row is highlighted
        WebDriverWait(browser, WAIT_S, poll_frequency=0.5).until(
            lambda d: d.find_element(By.CSS_SELECTOR, "#clients tr[data-client='light-a']").get_attribute("class")
            == "behind")
        assert browser.find_element(By.CSS_SELECTOR, "#clients tr[data-client='heavy']").get_attribute("class") == ""
    finally:
        srv.stop()


def test_router_dashboard_shows_clients_and_workers(engine: Engine, browser: Any, tmp_path: Path) -> None:
    """`radixfair router`'s own /dashboard: the same page over the fleet's view, the clients of the
    traffic it routed, and its workers: the live one holding the clients, a dead one unhealthy."""
    from fixtures.live_server import free_port
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from radixfair.router.app import create_router_app
    from radixfair.router.router_args import RouterArgs
    from radixfair.router.serve import build_policy
    from radixfair.router.state import RouterState

    worker = LiveServer(create_app(engine))
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    args = RouterArgs(worker_urls=(worker.url, dead), health_check_interval_secs=0.2, retry_initial_backoff_ms=1.0,
                      fairness_window=10.0)
    router = LiveServer(create_router_app(RouterState(args, build_policy("d2lpm", {}))))
    traffic = Traffic(router.url, max_rounds=60)

    def shown(d: Any) -> bool:
        names = {r.get_attribute("data-client") for r in d.find_elements(By.CSS_SELECTOR, "#clients tbody tr")}
        rows = d.find_elements(By.CSS_SELECTOR, "#workers tbody tr")
        return (set(CLIENTS) <= names and len(rows) == 2 and rows[1].get_attribute("class") == "unhealthy"
                and all(c in rows[0].text for c in CLIENTS))

    try:
        browser.get(router.url + "/dashboard")
        WebDriverWait(browser, WAIT_S, poll_frequency=0.5).until(shown)
        assert browser.find_element(By.ID, "policy").text == "d2lpm"
        rows = browser.find_elements(By.CSS_SELECTOR, "#workers tbody tr")
        assert worker.url in rows[0].text and "yes" in rows[0].text
        assert dead in rows[1].text and "no" in rows[1].text
        shot = tmp_path / "router-dashboard.png"
        browser.save_screenshot(str(shot))
        assert shot.stat().st_size > 0
        if extra := os.environ.get("RADIXFAIR_ROUTER_DASHBOARD_SCREENSHOT"):
            browser.save_screenshot(extra)
        assert not traffic.errors, traffic.errors[:3]
    finally:
        traffic.close()
        router.stop()
        worker.stop()
