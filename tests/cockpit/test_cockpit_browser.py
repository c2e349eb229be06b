"""The cockpits in headless Chromium against a real server, real services and simulated devices.

The server (every role) runs in-process on a free port; the cockpit is served by ``pn.serve`` in a
thread; Debian's ``/usr/bin/chromium`` is driven by the PyPI ``playwright`` package (never
``playwright install``). Set ``CARBONOS_SCREENSHOTS=1`` to write docs/img/bigscreen-zh.png,
bigscreen-en.png, bigscreen-operations.png, cockpit.png and cockpit-command.png.

Dispatches waiting for approval are submitted to the in-process server's dispatcher, as the
controller's rules do; the operator decides in the browser and the simulated inverter must then hold
the value.
"""

from __future__ import annotations

import functools
import os
import socket
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from _auth_helpers import TEST_SECRET_KEY, admin_headers
from _plant_helpers import eventually as _eventually
from _plant_helpers import simulated_plant
from aiohttp.test_utils import TestServer

from control_engine.dispatcher import DispatchRequest
from scada.api.dispatches import DISPATCHER
from scada.app import create_app
from scada.config import SiteConfig, parse_site
from scada.model import NodeId, PointId
from scada.services import Endpoints
from scada.settings import Settings
from simulators.plant import SimulatedPlant

playwright_api = pytest.importorskip("playwright.async_api")

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
]
SCREENSHOTS = os.environ.get("CARBONOS_SCREENSHOTS") == "1"
IMG_DIR = Path(__file__).resolve().parents[2] / "docs" / "img"
PASSWORD = "cockpit-operator-pass-1"
LIMIT = PointId("pv-1.power_limit_pct")

pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="needs Debian's chromium")

SITE = """
site: {{id: cockpit-test, name: 驾驶舱测试站 Cockpit test site, timezone: Asia/Shanghai}}
hierarchy:
  - id: grp
    name: 测试集团 Test group
    level: group
    children:
      - id: park
        name: 测试园区 Test park
        level: park
        children:
          - id: ent-e
            name: 东方精工 East Works
            level: enterprise
            children: [{{id: ws-w, name: 装配车间 Assembly, level: workshop}}]
templates:
  meter:
    points:
      - {{key: active_power_kw, name: 有功功率 Active power, kind: power, unit: kW, carrier: electricity,
          modbus: {{address: 4, type: float32}}}}
      - {{key: energy_import_kwh, name: 正向有功电能 Import energy, kind: energy_counter, unit: kWh,
          carrier: electricity, scale: 0.1, modbus: {{address: 10, type: uint32}}}}
  pv:
    points:
      - {{key: active_power_kw, name: 发电功率 PV power, kind: power, unit: kW, carrier: pv,
          modbus: {{table: input, address: 0, type: float32}}}}
devices:
  - {{id: meter-1, name: 总进线 Incoming feeder, node: ent-e, kind: power_meter, protocol: modbus_tcp,
     template: meter, poll_period_s: 0.2, modbus: {{host: 127.0.0.1, port: {port}, unit_id: 1, timeout_s: 0.5}},
     simulation: {{profile: flat, base_kw: 80, seed: 1}}}}
  - {{id: pv-1, name: 屋顶光伏 Roof PV, node: ws-w, kind: pv_inverter, protocol: modbus_tcp, template: pv,
     poll_period_s: 0.5, modbus: {{host: 127.0.0.1, port: {port}, unit_id: 2, timeout_s: 0.5}},
     points: [{{key: power_limit_pct, name: 功率限值 Power limit, kind: setpoint, unit: "%", writable: true,
                modbus: {{address: 100, type: uint16}}}}],
     simulation: {{profile: pv, peak_kw: 120, seed: 3}}}}
  - {{id: bat-1, name: 储能 Battery, node: ws-w, kind: battery, protocol: modbus_tcp, poll_period_s: 0.5,
     modbus: {{host: 127.0.0.1, port: {port}, unit_id: 3, timeout_s: 0.5}},
     points: [{{key: active_power_kw, name: 储能功率 Battery power, kind: power, unit: kW, carrier: storage,
                modbus: {{address: 0, type: float32}}}},
              {{key: soc_pct, name: 荷电状态 SOC, kind: state_of_charge, unit: "%", scale: 0.1,
                modbus: {{address: 2, type: uint16}}}}],
     simulation: {{capacity_kwh: 200, max_charge_kw: 100, max_discharge_kw: 100, soc_min_pct: 10,
                  soc_max_pct: 95, initial_soc_pct: 64, round_trip_efficiency: 0.9, seed: 4}}}}
  - {{id: meter-gone, name: 失联电表 Unreachable meter, node: ws-w, kind: power_meter, protocol: modbus_tcp,
     template: meter, poll_period_s: 0.2, modbus: {{host: 127.0.0.1, port: {dead_port}, unit_id: 1, timeout_s: 0.3}}}}
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


eventually = functools.partial(_eventually, timeout_s=15.0, interval_s=0.1)
"""Browser pages settle slower than the server: a longer default wait, polled less often."""


@pytest.fixture
def site(unused_tcp_port_factory: Callable[[], int]) -> SiteConfig:
    return parse_site(SITE.format(port=unused_tcp_port_factory(), dead_port=unused_tcp_port_factory()))


@pytest.fixture
async def plant(site: SiteConfig) -> AsyncIterator[SimulatedPlant]:
    async with simulated_plant(site, without={"meter-gone"}) as simulated:  # no hardware behind it
        yield simulated


@pytest.fixture
async def server(
    site: SiteConfig,
    plant: SimulatedPlant,
    pg_url: str,
    redis_url: str,
    mqtt_url: str,
    stream_prefix: str,
    redis_client: Any,
) -> AsyncIterator[TestServer]:
    """The server with every role on a real port: API, gateway (writes) and analytics (alarms, dispatcher)."""
    del plant, redis_client  # started first; redis_client deletes this test's keys afterwards
    settings = Settings(
        stream_prefix=stream_prefix,
        secret_key=TEST_SECRET_KEY,
        bootstrap_admin=f"cockpit-test:operator:{PASSWORD}",
    )
    endpoints = Endpoints(db_url=pg_url, redis_url=redis_url, mqtt_url=mqtt_url, origins={})
    test_server = TestServer(create_app(site, settings, endpoints), host="127.0.0.1", port=_free_port())
    await test_server.start_server()
    try:
        yield test_server
    finally:
        await test_server.close()


@pytest.fixture
def api_url(server: TestServer) -> str:
    return f"http://127.0.0.1:{server.port}"


@pytest.fixture
def cockpit_url(api_url: str) -> Iterator[str]:
    from cockpit.app import serve  # noqa: PLC0415 -- Panel is imported only by the tests that serve it

    port = _free_port()
    server = serve(api_url, port=port, threaded=True, refresh_s=2.0)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                break
        time.sleep(0.1)
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
async def browser() -> AsyncIterator[Any]:
    async with playwright_api.async_playwright() as p:
        chromium = await p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            await chromium.close()


async def _kiosk_token(api_url: str, site: SiteConfig) -> str:
    async with aiohttp.ClientSession(headers=admin_headers(site)) as http:
        async with http.post(
            f"{api_url}/api/v1/kiosk-tokens", json={"name": "wall", "node": "grp"}
        ) as response:
            assert response.status == 201, await response.text()
            token: str = (await response.json())["token"]
        month = time.strftime("%Y-%m", time.gmtime(time.time() + 8 * 3600))
        async with http.put(f"{api_url}/api/v1/quotas/grp/{month}", json={"quota_t": 40}) as response:
            assert response.status in (200, 201), await response.text()
    return token


async def test_big_screen_shows_a_simulator_change_within_two_seconds(
    api_url: str, cockpit_url: str, browser: Any, plant: SimulatedPlant, site: SiteConfig
) -> None:
    token = await _kiosk_token(api_url, site)
    page = await browser.new_page(viewport={"width": 1920, "height": 1080})
    await page.goto(f"{cockpit_url}/bigscreen?token={token}&lang=zh&layout=1080&rotate=600")
    power = page.locator('[data-kpi="power-ent-e"] .kpi-value')
    await power.wait_for(timeout=15_000)
    await eventually(lambda: _number(power), timeout_s=15)  # live values arrived
    assert "今日排放" in await page.locator('[data-kpi="co2-today"]').inner_text()

    plant.device("meter-1").override("active_power_kw", 1234.5)
    changed_at = time.monotonic()
    await eventually(lambda: _shows(power, "1,234.5"), timeout_s=5, interval_s=0.05)
    elapsed_s = time.monotonic() - changed_at
    print(f"simulator change on the big screen after {elapsed_s:.2f} s")
    assert elapsed_s < 2.0
    assert "1,234.5" in await page.locator('[data-kpi="power-total"] .kpi-value').inner_text()
    assert not await page.locator('[data-empty="dispatches"]').is_visible()  # a later view

    await eventually(lambda: page.locator('.chip[data-alarm="meter-gone:offline"]').count())
    await eventually(lambda: _number(page.locator('[data-kpi="soc"] .big')))
    if SCREENSHOTS:
        IMG_DIR.mkdir(parents=True, exist_ok=True)
        await page.screenshot(path=str(IMG_DIR / "bigscreen-zh.png"))
    english = await browser.new_page(viewport={"width": 1920, "height": 1080})
    await english.goto(f"{cockpit_url}/bigscreen?token={token}&lang=en&rotate=3")
    title = english.locator('[data-kpi="co2-month"]')
    await title.wait_for(timeout=15_000)
    assert "Emissions this month" in await title.inner_text()
    await eventually(lambda: _shows(english.locator('[data-kpi="power-ent-e"] .kpi-value'), "1,234.5"))
    if SCREENSHOTS:
        await english.screenshot(path=str(IMG_DIR / "bigscreen-en.png"))
    empty = english.locator('[data-empty="dispatches"]')  # the third view, after two rotations
    await empty.wait_for(state="visible", timeout=10_000)
    assert "No dispatches yet" in await empty.inner_text()


async def _signed_in(browser: Any, cockpit_url: str) -> Any:
    page = await browser.new_page(viewport={"width": 1920, "height": 1080})
    await page.goto(f"{cockpit_url}/cockpit?lang=zh")
    await page.locator(".login-tenant input").fill("cockpit-test")
    await page.locator(".login-user input").fill("operator")
    await page.locator(".login-password input").fill(PASSWORD)
    await page.locator(".login-button button").click()
    return page


async def _drill_down(page: Any, labels: tuple[str, ...]) -> None:
    children = page.locator(".tree-children select")
    for label in labels:
        await eventually(lambda label=label: _has_label(children, label))
        await children.select_option(label=label)


TO_THE_FEEDER = (
    "集团 · 测试集团 Test group",
    "园区 · 测试园区 Test park",
    "企业 · 东方精工 East Works",
    "设备 · 总进线 Incoming feeder",
)
TO_THE_INVERTER = (
    "集团 · 测试集团 Test group",
    "园区 · 测试园区 Test park",
    "企业 · 东方精工 East Works",
    "车间 · 装配车间 Assembly",
    "设备 · 屋顶光伏 Roof PV",
)


async def test_operator_signs_in_and_acknowledges_an_alarm(cockpit_url: str, browser: Any) -> None:
    page = await _signed_in(browser, cockpit_url)

    row = page.locator('tr[data-alarm="meter-gone:offline"]')
    await row.wait_for(timeout=20_000)
    assert await row.get_attribute("data-state") == "active_unack"
    await eventually(lambda: _has_option(page, "meter-gone:offline"))
    await page.locator(".alarm-select select").select_option("meter-gone:offline")
    await page.locator(".alarm-comment input").fill("网关断电, 已通知维修")
    await page.locator(".alarm-ack button").click()
    await eventually(lambda: _state_is(row, "active_ack"), timeout_s=10)
    await eventually(lambda: _contains(page.locator("[data-feedback]"), "已完成"), timeout_s=5)

    await page.locator(".alarm-ack button").click()  # again: the server refuses, the detail shows
    await eventually(lambda: _contains(page.locator("[data-feedback]"), "409"), timeout_s=10)
    assert "cannot acknowledge" in await page.locator("[data-feedback]").inner_text()

    # Drill down: group -> park -> enterprise -> the feeder -> its power trend.
    await _drill_down(page, (*TO_THE_FEEDER, "测点 · 有功功率 Active power"))
    await eventually(lambda: page.locator('tr[data-point="meter-1.active_power_kw"]').count())
    await page.locator('[data-command-note="read_only"]').wait_for(timeout=5_000)  # no command box
    assert not await page.locator(".command-send button").is_visible()


async def test_operator_approves_and_rejects_dispatches(
    server: TestServer,
    api_url: str,
    site: SiteConfig,
    cockpit_url: str,
    browser: Any,
    plant: SimulatedPlant,
) -> None:
    dispatcher = server.app[DISPATCHER]

    async def waiting(value: float, reason: str, stage: int, expected_kw: float) -> int:
        dispatch = await dispatcher.submit(
            DispatchRequest(
                node=NodeId("ws-w"),
                point=LIMIT,
                value=value,
                reason=reason,
                rule_id="curtail-pv",
                stage=stage,
                needs_approval=True,
                expected_kw=expected_kw,
            )
        )
        return dispatch.id

    approved = await waiting(35, "stage 4: curtail PV export", 4, 40.0)
    rejected = await waiting(10, "stage 4: deeper curtailment", 4, 70.0)
    left = await waiting(60, "stage 2: cap PV output", 2, 25.0)
    page = await _signed_in(browser, cockpit_url)
    row = page.locator(f'tr[data-dispatch="{approved}"]')
    await row.wait_for(timeout=20_000)
    assert await row.get_attribute("data-state") == "awaiting_approval"
    assert "curtail-pv" in await row.inner_text()

    await _choose_dispatch(page, approved)
    await page.locator(".dispatch-comment input").fill("同意, 限发一小时")
    await page.locator(".dispatch-approve button").click()
    feedback = page.locator("[data-dispatch-feedback]")
    await eventually(lambda: _state_is(row, "verified"), timeout_s=20)
    await eventually(lambda: _attribute_is(feedback, "data-dispatch-feedback", "verified"), timeout_s=5)
    assert "已核验" in await feedback.inner_text()
    assert plant.device("pv-1").value("power_limit_pct") == 35
    assert "回读 35" in await page.locator(f'tr[data-dispatch="{approved}"] + tr').inner_text()

    await _choose_dispatch(page, rejected)
    await page.locator(".dispatch-comment input").fill("交接班期间不限发")
    await page.locator(".dispatch-reject button").click()
    await eventually(lambda: _state_is(page.locator(f'tr[data-dispatch="{rejected}"]'), "rejected"))
    assert plant.device("pv-1").value("power_limit_pct") == 35  # a rejected dispatch is never sent
    stored = await dispatcher.store.get(rejected)
    assert stored is not None
    assert (stored.decided_by, stored.decision_comment) == ("operator", "交接班期间不限发")
    assert await page.locator(f'tr[data-dispatch="{left}"]').get_attribute("data-state") == (
        "awaiting_approval"
    )
    if SCREENSHOTS:
        await page.screenshot(path=str(IMG_DIR / "cockpit.png"))

    # The wall's operations view lists the real dispatches, with the expected (not a measured) effect.
    wall = await browser.new_page(viewport={"width": 1920, "height": 1080})
    token = await _kiosk_token(api_url, site)
    await wall.goto(f"{cockpit_url}/bigscreen?token={token}&lang=zh&view=operations&rotate=600")
    shown = wall.locator(f'tr[data-dispatch="{approved}"]')
    await shown.wait_for(timeout=15_000)
    assert await shown.get_attribute("data-state") == "verified"
    effect = shown.locator("[data-effect]")
    assert await effect.get_attribute("data-effect") == "pending"
    assert await effect.inner_text() == "预期削减 40.0 kW · 效果待核验"
    assert await wall.locator(f'tr[data-dispatch="{left}"]').get_attribute("data-state") == (
        "awaiting_approval"
    )
    if SCREENSHOTS:
        await eventually(lambda: _number(wall.locator('[data-kpi="power-ent-e"] .kpi-value')))
        await wall.screenshot(path=str(IMG_DIR / "bigscreen-operations.png"))


async def test_operator_sends_a_manual_command_with_confirmation(
    cockpit_url: str, browser: Any, plant: SimulatedPlant
) -> None:
    page = await _signed_in(browser, cockpit_url)
    await _drill_down(page, (*TO_THE_INVERTER, "测点 · 功率限值 Power limit"))
    await page.locator('[data-command-point="pv-1.power_limit_pct"]').wait_for(timeout=10_000)
    status = page.locator("[data-command-status]")
    value, send = page.locator(".command-value input"), page.locator(".command-send button")

    await value.fill("forty")
    await send.click()
    await eventually(lambda: _attribute_is(status, "data-command-status", "invalid"), timeout_s=5)

    before = plant.device("pv-1").value("power_limit_pct")
    await value.fill("42")
    await page.locator(".command-reason input").fill("试验限发")
    await send.click()
    question = page.locator('[data-confirm="pv-1.power_limit_pct"]')
    await question.wait_for(state="visible", timeout=5_000)
    assert "确认将 42 % 写入 屋顶光伏 Roof PV · 功率限值 Power limit" in await question.inner_text()
    await page.locator(".command-cancel button").click()
    await eventually(lambda: _attribute_is(status, "data-command-status", "cancelled"), timeout_s=5)
    assert plant.device("pv-1").value("power_limit_pct") == before

    await send.click()
    await question.wait_for(state="visible", timeout=5_000)
    if SCREENSHOTS:
        await page.screenshot(path=str(IMG_DIR / "cockpit-command.png"))
    await page.locator(".command-confirm button").click()
    await eventually(lambda: _attribute_is(status, "data-command-status", "verified"), timeout_s=20)
    assert "回读 42" in await status.inner_text()
    assert plant.device("pv-1").value("power_limit_pct") == 42


async def _choose_dispatch(page: Any, dispatch_id: int) -> None:
    select = page.locator(".dispatch-select select")

    async def label() -> str | None:
        texts = await select.locator("option").all_inner_texts()
        return next((text for text in texts if text.startswith(f"#{dispatch_id} ")), None)

    await select.select_option(label=await eventually(label))


async def _attribute_is(locator: Any, name: str, value: str) -> bool:
    return await locator.count() > 0 and await locator.first.get_attribute(name) == value


async def _number(locator: Any) -> bool:
    text = (await locator.inner_text()).replace(",", "")
    try:
        float(text)
    except ValueError:
        return False
    return True


async def _shows(locator: Any, text: str) -> bool:
    return text in await locator.inner_text()


async def _contains(locator: Any, text: str) -> bool:
    return text in await locator.inner_text()


async def _state_is(locator: Any, state: str) -> bool:
    return await locator.get_attribute("data-state") == state


async def _has_option(page: Any, value: str) -> bool:
    options = await page.locator(".alarm-select select option").all_inner_texts()
    return value in options


async def _has_label(select: Any, label: str) -> bool:
    return label in await select.locator("option").all_inner_texts()
