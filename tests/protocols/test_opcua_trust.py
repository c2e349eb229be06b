"""OPC UA trust list and user identity tokens, against simulated servers over real sockets."""

from __future__ import annotations

import shutil
import socket
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
import pytest_asyncio
from _pki import Issued, issue, make_ca
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.serialization import Encoding
from pydantic import ValidationError

from protocols.opcua.config import OpcUaDeviceConfig, OpcUaPointConfig, SecurityMode, SecurityPolicy
from protocols.opcua.driver import OpcUaDriver, OpcUaPointSpec
from protocols.opcua.security import SecurityRefused, TrustList, sha256_fingerprint
from scada.model import DeviceUnavailable, PointId
from scada.runtime import FakeClock
from simulators.opcua_secure import SecureOpcUaEndpoint
from simulators.opcua_server import OpcUaSimPoint
from simulators.physics import DevicePhysics, SimulationParams, make_physics

pytestmark = pytest.mark.asyncio(loop_scope="module")

START = datetime(2026, 3, 4, 2, 0, tzinfo=UTC)
DEVICE = "m1"
SIM_POINTS = (OpcUaSimPoint(key="active_power_kw", node_id="ns=2;s=m1.active_power_kw"),)
SPECS = [
    OpcUaPointSpec(
        point=PointId("m1.active_power_kw"), config=OpcUaPointConfig(node_id="ns=2;s=m1.active_power_kw")
    )
]
USERS = {"operator": "correct horse battery staple"}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def meter() -> DevicePhysics:
    params = SimulationParams(profile="flat", base_kw=42, peak_kw=42, noise_pct=0, seed=1)
    return make_physics("power_meter", params, tz=ZoneInfo("Asia/Shanghai"), start=START, seed=1)


class Pki:
    """Two CAs, servers issued by one of them or self-signed, a client and user certificates."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.ca = make_ca(directory, "plant-ca")
        self.other_ca = make_ca(directory, "other-ca")
        self.ca_server = issue(directory, "plc-ca-issued", self.ca, application_uri="urn:carbonos:test:plc1")
        self.self_signed_server = issue(directory, "plc-self", None, application_uri="urn:carbonos:test:plc2")
        self.client = issue(directory, "scada-client", self.ca, application_uri="urn:carbonos:scada:test")
        self.user = issue(directory, "user-alice", self.ca)
        self.stranger = issue(directory, "user-mallory", self.other_ca)

    def trust_dir(self, name: str, *certs: Issued) -> Path:
        """Return a fresh directory holding copies of ``certs`` (and a file that is no certificate)."""
        path = self.directory / name
        path.mkdir()
        (path / "README.txt").write_text("certificates trusted by the gateway\n")
        for cert in certs:
            shutil.copy(cert.certificate_path, path / cert.certificate_path.name)
        return path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("opcua-pki"))


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def ca_server(pki: Pki) -> AsyncIterator[SecureOpcUaEndpoint]:
    """Basic256Sha256 server with a CA-issued certificate; users by password or X.509 certificate.

    Its Sign endpoint offers the password token unencrypted, as a misconfigured device would.
    """
    endpoint = SecureOpcUaEndpoint(
        f"opc.tcp://127.0.0.1:{free_port()}",
        [(DEVICE, meter(), SIM_POINTS)],
        security="basic256sha256",
        certificate=pki.ca_server.certificate_path,
        private_key=pki.ca_server.key_path,
        users=USERS,
        user_certificates=[pki.user.certificate_path],
        plaintext_user_tokens=True,  # on the Sign endpoint; SignAndEncrypt's channel protects it
    )
    await endpoint.start()
    yield endpoint
    await endpoint.stop()


def secure_config(server: SecureOpcUaEndpoint, pki: Pki, **kwargs: Any) -> OpcUaDeviceConfig:
    base: dict[str, Any] = {
        "endpoint": server.endpoint_url,
        "security_policy": SecurityPolicy.BASIC256SHA256,
        "security_mode": SecurityMode.SIGN_AND_ENCRYPT,
        "certificate": pki.client.certificate_path,
        "private_key": pki.client.key_path,
        "timeout_s": 3.0,
        "subscribe": False,
    }
    return OpcUaDeviceConfig(**(base | kwargs))


async def read_once(config: OpcUaDeviceConfig) -> float | None:
    """Connect, read the meter's power, close; raise what connect raises."""
    driver = OpcUaDriver(DEVICE, config, SPECS, clock=FakeClock(START))
    try:
        await driver.connect()
        [reading] = await driver.read()
        return reading.value
    finally:
        await driver.close()


# --------------------------------------------------------------------------------------------------
# Trust list


async def test_a_server_issued_by_a_trusted_ca_is_accepted(ca_server: SecureOpcUaEndpoint, pki: Pki) -> None:
    config = secure_config(
        ca_server,
        pki,
        trust_list=pki.trust_dir("ca-trust", pki.ca),
        username="operator",
        password=USERS["operator"],
    )
    assert await read_once(config) == 42.0


async def test_an_untrusted_server_is_refused_with_its_subject_and_fingerprint(
    ca_server: SecureOpcUaEndpoint, pki: Pki
) -> None:
    trust_dir = pki.trust_dir("other-trust", pki.other_ca, pki.self_signed_server)
    config = secure_config(
        ca_server, pki, trust_list=trust_dir, username="operator", password=USERS["operator"]
    )
    fingerprint = sha256_fingerprint(pki.ca_server.certificate.public_bytes(Encoding.DER))
    with pytest.raises(SecurityRefused) as refused:
        await read_once(config)
    assert isinstance(refused.value, DeviceUnavailable)  # the session backs off and tries again
    assert str(refused.value) == (
        f"m1: server certificate not trusted: O=CarbonOS tests,CN=plc-ca-issued, sha256 {fingerprint}: "
        "not in the trust list and not issued by a trusted CA"
    )
    # The trust list is read at every connect: trusting the CA now lets the next connect through.
    shutil.copy(pki.ca.certificate_path, trust_dir / "plant-ca.pem")
    assert await read_once(config) == 42.0


async def test_a_pinned_certificate_still_works_alone_and_with_a_trust_list(
    ca_server: SecureOpcUaEndpoint, pki: Pki
) -> None:
    login = {"username": "operator", "password": USERS["operator"]}
    pinned = secure_config(ca_server, pki, server_certificate=pki.ca_server.certificate_path, **login)
    assert await read_once(pinned) == 42.0
    # Both set: the server must be the pinned one *and* trusted.
    both = pinned.model_copy(update={"trust_list": (pki.other_ca.certificate_path,)})
    with pytest.raises(SecurityRefused, match="not in the trust list"):
        await read_once(both)
    wrong_pin = secure_config(
        ca_server, pki, server_certificate=pki.self_signed_server.certificate_path, **login
    )
    with pytest.raises(SecurityRefused, match=r"CN=plc-ca-issued, sha256 .*: not the pinned certificate"):
        await read_once(wrong_pin)


async def test_an_empty_or_unreadable_trust_list_refuses_everything(
    ca_server: SecureOpcUaEndpoint, pki: Pki
) -> None:
    empty = secure_config(ca_server, pki, trust_list=pki.trust_dir("empty-trust"))
    with pytest.raises(SecurityRefused, match="the trust list is empty"):
        await read_once(empty)
    missing = secure_config(ca_server, pki, trust_list=pki.directory / "no-such-file.pem")
    with pytest.raises(SecurityRefused, match=r"cannot read the trust list: .*no-such-file\.pem"):
        await read_once(missing)
    junk = pki.directory / "junk.pem"
    junk.write_text("not a certificate")
    with pytest.raises(SecurityRefused, match=r"junk\.pem: not a PEM or DER certificate"):
        await read_once(secure_config(ca_server, pki, trust_list=junk))


async def test_trust_list_checks_validity_and_ca_flags(pki: Pki) -> None:
    now = datetime.now(UTC)
    expired = issue(pki.directory, "expired", pki.ca, not_after=now - timedelta(hours=1))
    trust = TrustList.load([pki.ca.certificate_path, expired.certificate_path])
    with pytest.raises(SecurityRefused, match=r"CN=expired, sha256 .*: outside its validity period"):
        trust.check(expired.certificate)  # even though it is in the list itself
    trust.check(pki.ca_server.certificate)
    # A self-signed application certificate is trusted by being in the list itself.
    TrustList.load([pki.self_signed_server.certificate_path]).check(pki.self_signed_server.certificate)
    # A leaf certificate in the list does not make what it "signs" trusted: it is no CA.
    forged = issue(pki.directory, "forged", pki.ca_server)
    with pytest.raises(SecurityRefused, match="not issued by a trusted CA"):
        TrustList.load([pki.ca_server.certificate_path]).check(forged.certificate)
    # An intermediate CA sent by the server completes the chain to a trusted root.
    intermediate = issue_ca_under(pki, "site-ca")
    leaf = issue(pki.directory, "plc-under-site-ca", intermediate)
    root_only = TrustList.load([pki.ca.certificate_path])
    root_only.check(leaf.certificate, intermediates=[intermediate.certificate])
    with pytest.raises(SecurityRefused):
        root_only.check(leaf.certificate)


def issue_ca_under(pki: Pki, name: str) -> Issued:
    """An intermediate CA: the plant CA signs a certificate with CA:TRUE."""
    child = make_ca(pki.directory, name)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(child.certificate.subject)
        .issuer_name(pki.ca.certificate.subject)
        .public_key(child.key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(child.certificate.not_valid_before_utc)
        .not_valid_after(child.certificate.not_valid_after_utc)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(child.key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(pki.ca.key.public_key()), critical=False
        )
        .sign(pki.ca.key, hashes.SHA256())
    )
    return Issued(certificate, child.key, child.certificate_path, child.key_path)


# --------------------------------------------------------------------------------------------------
# User identity tokens


async def test_a_wrong_password_is_refused_by_the_server(ca_server: SecureOpcUaEndpoint, pki: Pki) -> None:
    trust = pki.trust_dir("ca-trust-pw", pki.ca)
    right = secure_config(ca_server, pki, trust_list=trust, username="operator", password=USERS["operator"])
    assert await read_once(right) == 42.0
    wrong = right.model_copy(update={"password": "guess"})
    with pytest.raises(SecurityRefused, match=r"BadUserAccessDenied .*wrong username or password") as refused:
        await read_once(wrong)
    assert "guess" not in str(refused.value)
    # No identity at all: this server offers no anonymous token.
    with pytest.raises(SecurityRefused, match="BadIdentityTokenRejected"):
        await read_once(secure_config(ca_server, pki, trust_list=trust))


async def test_an_x509_user_certificate_signs_in(ca_server: SecureOpcUaEndpoint, pki: Pki) -> None:
    trust = pki.trust_dir("ca-trust-x509", pki.ca)
    alice = secure_config(
        ca_server,
        pki,
        trust_list=trust,
        user_certificate=pki.user.certificate_path,
        user_private_key=pki.user.key_path,
    )
    assert await read_once(alice) == 42.0
    mallory = alice.model_copy(
        update={"user_certificate": pki.stranger.certificate_path, "user_private_key": pki.stranger.key_path}
    )
    with pytest.raises(SecurityRefused, match="BadUserAccessDenied"):
        await read_once(mallory)
    # The key must belong to the certificate: the server checks the signature made with it.
    mismatched = alice.model_copy(update={"user_private_key": pki.stranger.key_path})
    with pytest.raises(SecurityRefused, match="BadIdentityTokenInvalid"):
        await read_once(mismatched)


async def test_a_password_is_not_sent_where_the_token_policy_leaves_it_readable(
    ca_server: SecureOpcUaEndpoint, pki: Pki
) -> None:
    # The server's Sign endpoint announces a UserName token policy of security None: the password
    # would be readable by anyone on the network, although the channel is "secure".
    config = secure_config(
        ca_server,
        pki,
        security_mode=SecurityMode.SIGN,
        trust_list=pki.trust_dir("ca-trust-sign", pki.ca),
        username="operator",
        password=USERS["operator"],
    )
    with pytest.raises(SecurityRefused, match="the password would travel in plain text"):
        await read_once(config)
    # Over SignAndEncrypt the channel protects it: accepted.
    assert await read_once(config.model_copy(update={"security_mode": SecurityMode.SIGN_AND_ENCRYPT})) == 42.0
    # The operator may accept the risk explicitly.
    assert await read_once(config.model_copy(update={"allow_plaintext_password": True})) == 42.0


async def test_a_plaintext_password_on_security_none_needs_explicit_consent(pki: Pki) -> None:
    with pytest.raises(ValidationError, match="allow_plaintext_password"):
        OpcUaDeviceConfig(endpoint="opc.tcp://127.0.0.1:4840", username="operator", password="pw")
    with pytest.raises(ValidationError, match="trust_list needs security_policy basic256sha256"):
        OpcUaDeviceConfig(endpoint="opc.tcp://127.0.0.1:4840", trust_list=(pki.ca.certificate_path,))
    with pytest.raises(ValidationError, match="either username/password or user_certificate"):
        OpcUaDeviceConfig(
            endpoint="opc.tcp://127.0.0.1:4840",
            security_policy=SecurityPolicy.BASIC256SHA256,
            security_mode=SecurityMode.SIGN,
            certificate=pki.client.certificate_path,
            private_key=pki.client.key_path,
            username="operator",
            password="pw",
            user_certificate=pki.user.certificate_path,
            user_private_key=pki.user.key_path,
        )
    server = SecureOpcUaEndpoint(
        f"opc.tcp://127.0.0.1:{free_port()}", [(DEVICE, meter(), SIM_POINTS)], users=USERS
    )
    await server.start()
    try:
        consent = OpcUaDeviceConfig(
            endpoint=server.endpoint_url,
            username="operator",
            password=USERS["operator"],
            allow_plaintext_password=True,
            subscribe=False,
            timeout_s=3.0,
        )
        assert "correct horse" not in repr(consent)
        assert await read_once(consent) == 42.0
        with pytest.raises(SecurityRefused, match="BadUserAccessDenied"):
            await read_once(consent.model_copy(update={"password": "guess"}))
    finally:
        await server.stop()
