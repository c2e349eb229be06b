"""``scada demo`` as a user runs it: a real process serving live data, stopped with Ctrl-C (SIGINT)."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import aiohttp
import psutil
import pytest

SCADA = str(Path(sys.executable).with_name("scada"))

SITE = """
site: {{id: demo-test, name: Demo test}}
hierarchy: [{{id: g, name: G, level: group}}]
devices:
  - id: meter
    node: g
    kind: power_meter
    protocol: modbus_tcp
    poll_period_s: 0.5
    modbus: {{host: 127.0.0.1, port: {port}, unit_id: 1}}
    simulation: {{profile: flat, base_kw: 75, seed: 3}}
    points:
      - {{key: active_power_kw, kind: power, unit: kW, carrier: electricity, modbus: {{address: 0, type: float32}}}}
"""


@pytest.fixture
def data_dir() -> Iterator[Path]:
    """A data directory outside pytest's private tmp tree: embedded PostgreSQL runs as another user."""
    path = Path(tempfile.mkdtemp(prefix="scada-demo-test-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.mark.slow
@pytest.mark.parametrize("services", ["local", "embedded"])
async def test_demo_serves_live_data_and_stops_cleanly_on_sigint(
    services: str,
    data_dir: Path,
    pg_url: str,
    redis_url: str,
    stream_prefix: str,
    unused_tcp_port_factory: Callable[[], int],
) -> None:
    site = data_dir / "site.yaml"
    site.write_text(SITE.format(port=unused_tcp_port_factory()), encoding="utf-8")
    http_port = unused_tcp_port_factory()
    cockpit_port = unused_tcp_port_factory()
    env = {
        **os.environ,
        "SCADA_HTTP_PORT": str(http_port),
        "SCADA_COCKPIT_PORT": str(cockpit_port),
        "SCADA_DATA_DIR": str(data_dir / "data"),
        "SCADA_STREAM_PREFIX": stream_prefix,
    }
    if services == "local":  # the test's own database and Redis prefix on the local services
        env |= {"SCADA_DB_URL": pg_url, "SCADA_REDIS_URL": redis_url}
    else:  # zero set-up: PostgreSQL, Redis and MQTT started by the demo itself, and stopped with it
        env |= {"SCADA_DB_URL": "embedded", "SCADA_REDIS_URL": "embedded", "SCADA_MQTT_URL": "embedded"}
    proc = await asyncio.create_subprocess_exec(
        SCADA,
        "demo",
        "-c",
        str(site),
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output: list[str] = []
    try:
        assert proc.stdout is not None
        async with asyncio.timeout(60):
            while not any("Press Ctrl-C to stop." in line for line in output):
                line = (await proc.stdout.readline()).decode()
                assert line, "demo exited early:\n" + "".join(output)
                output.append(line)
        text = "".join(output)
        assert f"http://127.0.0.1:{http_port}/api/v1/points/meter.active_power_kw/latest" in text
        assert f"http://127.0.0.1:{cockpit_port}/bigscreen" in text
        children = psutil.Process(proc.pid).children(recursive=True)
        assert children, "the demo runs its simulators (and embedded services) in child processes"
        if services == "embedded":
            assert "postgresql: embedded, redis: embedded, mqtt: embedded" in text
            assert any("postgres" in p for p in _processes_using(data_dir))  # the check below can see it

        # The demo prints a first login: the bootstrap admin with a password kept in the data dir.
        login = json.loads(text.split("/api/v1/auth/login ", 1)[1].splitlines()[0])
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http:
            base = f"http://127.0.0.1:{http_port}/api/v1"
            async with http.post(f"{base}/auth/login", json=login) as response:
                assert response.status == 200, await response.text()
                token = (await response.json())["access_token"]
            async with http.get(f"{base}/points/meter.active_power_kw/latest") as response:
                assert response.status == 401  # nothing without a token
            url = f"{base}/points/meter.active_power_kw/latest"
            async with asyncio.timeout(30):
                while True:
                    async with http.get(url, headers={"Authorization": f"Bearer {token}"}) as response:
                        if response.status == 200:
                            body = await response.json()
                            break
                    await asyncio.sleep(0.2)
        assert body["quality"] == "good"
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
            async with asyncio.timeout(30):
                while True:  # the demo's cockpit process serves the big screen
                    try:
                        async with http.get(f"http://127.0.0.1:{cockpit_port}/bigscreen") as page:
                            if page.status == 200:
                                break
                    except aiohttp.ClientError:
                        pass
                    await asyncio.sleep(0.5)
        assert 60 < body["value"] < 90

        proc.send_signal(signal.SIGINT)
        async with asyncio.timeout(30):
            rest = (await proc.stdout.read()).decode()
            code = await proc.wait()
        assert code == 0, rest
        assert "Traceback" not in rest
        assert "stopped" in rest
        await asyncio.sleep(0.2)
        assert not [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
        assert not _processes_using(data_dir), "an embedded service outlived the demo"
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


def _processes_using(directory: Path) -> list[str]:
    """Return processes whose command line or working directory lies under ``directory``.

    Embedded PostgreSQL detaches from its parent (pg_ctl), so a child-process check alone would miss it.
    """
    found = []
    for proc in psutil.process_iter(["pid", "cmdline", "cwd"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if str(directory) in cmdline or str(directory) in (proc.info["cwd"] or ""):
            found.append(f"{proc.info['pid']}: {cmdline}")
    return found
