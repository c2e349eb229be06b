"""MQTT over TLS with a client certificate and passwords, against a private Mosquitto on free ports."""

from __future__ import annotations

import asyncio
import logging
import shutil
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from _pki import Issued, issue, make_ca
from pydantic import SecretStr

from protocols.mqtt.config import MqttVersion
from protocols.mqtt.connection import MqttConnection, MqttMessage
from protocols.mqtt.security import MqttSecurityConfig, broker_connect_args, make_ssl_context
from scada.model import DeviceUnavailable
from scada.runtime import Backoff

MOSQUITTO = "/usr/sbin/mosquitto"
MOSQUITTO_PASSWD = "/usr/bin/mosquitto_passwd"
USER, PASSWORD = "gateway", "s3cret-Pa55"

pytestmark = pytest.mark.skipif(shutil.which(MOSQUITTO) is None, reason="needs /usr/sbin/mosquitto")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass(frozen=True)
class TlsBroker:
    """A private Mosquitto: one TLS listener that requires a client certificate and a password."""

    port: int
    other_name_port: int
    """A second TLS listener whose certificate names only broker.example, not 127.0.0.1."""
    ca: Issued
    client: Issued
    other_ca: Issued
    directory: Path

    def security(self, **kwargs: Any) -> MqttSecurityConfig:
        base: dict[str, Any] = {
            "ca_file": self.ca.certificate_path,
            "client_certificate": self.client.certificate_path,
            "client_key": self.client.key_path,
            "username": USER,
            "password": SecretStr(PASSWORD),
        }
        return MqttSecurityConfig(**(base | kwargs))


def write_password_file(path: Path) -> None:
    """Write a Mosquitto password file with mosquitto_passwd (PBKDF2-SHA512 hashes)."""
    subprocess.run([MOSQUITTO_PASSWD, "-b", "-c", str(path), USER, PASSWORD], check=True, capture_output=True)


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsBroker]:
    if shutil.which(MOSQUITTO_PASSWD) is None:
        pytest.skip("needs mosquitto_passwd")
    directory = tmp_path_factory.mktemp("mqtt-tls")
    ca = make_ca(directory, "mqtt-ca")
    server = issue(directory, "broker", ca)
    misnamed = issue(directory, "broker-example", ca, dns_names=("broker.example",), ip_addresses=())
    client = issue(directory, "gateway-client", ca)
    other_ca = make_ca(directory, "rogue-ca")
    passwords = directory / "passwd"
    write_password_file(passwords)
    port, other_name_port = free_port(), free_port()
    config = directory / "mosquitto.conf"
    config.write_text(
        "\n".join(
            [
                "user root",  # stay the user that owns the temporary files (no privilege drop)
                "persistence false",
                "per_listener_settings false",
                "allow_anonymous false",
                f"password_file {passwords}",
                "log_dest stderr",
                f"listener {port} 127.0.0.1",
                f"cafile {ca.certificate_path}",
                f"certfile {server.certificate_path}",
                f"keyfile {server.key_path}",
                "require_certificate true",
                f"listener {other_name_port} 127.0.0.1",
                f"cafile {ca.certificate_path}",
                f"certfile {misnamed.certificate_path}",
                f"keyfile {misnamed.key_path}",
                "require_certificate true",
                "",
            ]
        )
    )
    process = subprocess.Popen(
        [MOSQUITTO, "-c", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        deadline = time.monotonic() + 5
        while True:
            try:
                for listening in (port, other_name_port):
                    socket.create_connection(("127.0.0.1", listening), timeout=0.2).close()
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    _, stderr = process.communicate(timeout=1)
                    pytest.fail(f"mosquitto did not start: {stderr.decode(errors='replace')}")
                time.sleep(0.02)
        yield TlsBroker(port, other_name_port, ca, client, other_ca, directory)
    finally:
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if process.stderr is not None:
            process.stderr.close()


class Collect:
    """A message handler that keeps what it receives."""

    def __init__(self) -> None:
        self.messages: list[MqttMessage] = []
        self.arrived = asyncio.Event()

    def handle_message(self, message: MqttMessage) -> None:
        self.messages.append(message)
        self.arrived.set()

    def connection_lost(self, reason: str) -> None:
        del reason


class NoDeadLetters:
    def reject(self, *, origin: str, payload: bytes, reason: str) -> None:
        raise AssertionError(f"unexpected dead letter from {origin}: {reason}")


def connection(url: str, security: MqttSecurityConfig | None, version: MqttVersion) -> MqttConnection:
    return MqttConnection(
        url,
        client_id=f"tls-test-{version.value}",
        version=version,
        timeout_s=2.0,
        dead_letters=NoDeadLetters(),
        security=security,
        backoff=Backoff(initial_s=5.0, max_s=5.0),  # one attempt per test: no retry inside it
    )


async def first_attempt(conn: MqttConnection) -> str:
    """Start, let the first attempt finish, close; return why it failed ('' if it connected)."""
    await conn.start()
    try:
        return "" if conn.connected else conn.last_error
    finally:
        await conn.close()


@pytest.mark.parametrize("version", [MqttVersion.V5, MqttVersion.V311])
async def test_tls_with_client_certificate_and_password_publishes_and_receives(
    broker: TlsBroker, version: MqttVersion
) -> None:
    conn = connection(f"mqtts://localhost:{broker.port}", broker.security(), version)
    await conn.start()
    try:
        await conn.wait_connected(2.0)
        handler = Collect()
        topic = f"carbonos/tls-test/{version.value}/telemetry"
        await conn.register(topic, handler, qos=1)
        conn.publish(topic, b'{"values": {"p": 1.5}}', qos=1)
        async with asyncio.timeout(2):
            await handler.arrived.wait()
        assert [m.payload for m in handler.messages] == [b'{"values": {"p": 1.5}}']
    finally:
        await conn.close()


@pytest.mark.parametrize("version", [MqttVersion.V5, MqttVersion.V311])
async def test_a_wrong_password_is_refused_and_never_logged(
    broker: TlsBroker, version: MqttVersion, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    conn = connection(
        f"mqtts://127.0.0.1:{broker.port}", broker.security(password=SecretStr("guess-x9")), version
    )
    error = await first_attempt(conn)
    # Mosquitto answers a wrong password with "not authorised" (5 / 0x87), not "bad user name or password".
    assert "credentials refused by the broker (check username and password)" in error
    assert "not authori" in error.lower()
    assert "guess-x9" not in caplog.text
    assert "guess-x9" not in repr(conn)
    # wait_connected() gives sessions the same reason.
    conn = connection(
        f"mqtts://127.0.0.1:{broker.port}", broker.security(password=SecretStr("guess-x9")), version
    )
    await conn.start()
    try:
        with pytest.raises(DeviceUnavailable, match="credentials refused"):
            await conn.wait_connected(0.1)
    finally:
        await conn.close()


async def test_a_broker_certificate_from_another_ca_is_refused(broker: TlsBroker) -> None:
    conn = connection(
        f"mqtts://127.0.0.1:{broker.port}",
        broker.security(ca_file=broker.other_ca.certificate_path),
        MqttVersion.V5,
    )
    error = await first_attempt(conn)
    assert error.startswith(
        f"cannot connect to 127.0.0.1:{broker.port}: TLS: broker certificate not trusted:"
    )


async def test_a_broker_certificate_for_another_host_name_is_refused(broker: TlsBroker) -> None:
    # Issued by the trusted CA, but for broker.example: connecting to 127.0.0.1 must not accept it.
    conn = connection(f"mqtts://127.0.0.1:{broker.other_name_port}", broker.security(), MqttVersion.V5)
    error = await first_attempt(conn)
    assert "TLS: broker certificate not trusted: IP address mismatch" in error


async def test_plain_mqtt_to_the_tls_port_fails_clearly(broker: TlsBroker) -> None:
    conn = connection(
        f"mqtt://127.0.0.1:{broker.port}",
        MqttSecurityConfig(username=USER, password=SecretStr(PASSWORD)),
        MqttVersion.V5,
    )
    error = await first_attempt(conn)
    assert error == (
        f"cannot connect to 127.0.0.1:{broker.port}: the broker closed the connection before CONNACK "
        "(if the port is a TLS listener, use an mqtts:// URL)"
    )


async def test_without_a_client_certificate_the_broker_breaks_off_the_handshake(broker: TlsBroker) -> None:
    conn = connection(
        f"mqtts://127.0.0.1:{broker.port}",
        broker.security(client_certificate=None, client_key=None),
        MqttVersion.V5,
    )
    error = await first_attempt(conn)
    assert (
        "the broker closed the connection before CONNACK (with TLS: does the broker require a client" in error
    )


# --------------------------------------------------------------------------------------------------
# URL and option parsing (no broker)


@pytest.mark.parametrize(
    ("url", "options", "expected"),
    [
        ("mqtt://broker", {}, ("broker", 1883, False, None, None)),
        ("mqtts://broker", {}, ("broker", 8883, True, None, None)),
        ("mqtts://broker:9883", {}, ("broker", 9883, True, None, None)),
        ("mqtts://gw:p%40ss@broker", {}, ("broker", 8883, True, "gw", "p@ss")),
        (
            "mqtts://broker",
            {"username": "gw", "password": SecretStr("pw")},
            ("broker", 8883, True, "gw", "pw"),
        ),
        ("mqtt://[::1]:1884", {}, ("::1", 1884, False, None, None)),
    ],
)
def test_broker_connect_args(url: str, options: dict[str, Any], expected: tuple[Any, ...]) -> None:
    args = broker_connect_args(url, MqttSecurityConfig(**options))
    assert (args.host, args.port, args.tls, args.username, args.password) == expected
    if args.password:
        assert args.password not in repr(args)
        assert args.password not in args.display


@pytest.mark.parametrize(
    ("url", "options", "message"),
    [
        ("http://broker", {}, "expected an mqtt://host"),
        ("mqtt://broker", {"ca_file": Path("ca.pem")}, "need an mqtts:// URL"),
        ("mqtts://a:b@broker", {"username": "c"}, "both in the URL and in the settings"),
    ],
)
def test_bad_broker_options_are_refused(url: str, options: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        broker_connect_args(url, MqttSecurityConfig(**options))


def test_option_pairs_and_unreadable_files_are_named(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="client_certificate and client_key go together"):
        MqttSecurityConfig(client_certificate=tmp_path / "c.pem")
    with pytest.raises(ValueError, match="password needs username"):
        MqttSecurityConfig(password=SecretStr("x"))
    with pytest.raises(OSError, match=r"ca_file .*missing\.pem"):
        make_ssl_context(MqttSecurityConfig(ca_file=tmp_path / "missing.pem"))
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate")
    with pytest.raises(ssl.SSLError, match=r"ca_file .*junk\.pem"):
        make_ssl_context(MqttSecurityConfig(ca_file=junk))
