"""SIP over TLS and the per-IP connection cap, over real sockets on loopback.

The certificates are made for each test run (tests/tls_certs.py); the client is
Python's own ssl module, verifying the server against the test CA.
"""

from __future__ import annotations

import asyncio
import os
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from gateway.config import ConfigError, Settings
from gateway.sip.events import IncomingCall
from gateway.sip.message import NameAddress, SipRequest, Via, parse_message
from gateway.sip.transport import SipEndpoint
from gateway.sip.useragent import UserAgent
from gateway.tlsconfig import client_context, load_sip_tls, server_context
from tests.tls_certs import TestCa
from tests.unit.test_sip_transport import OFFER, WAIT, App, TcpClient, request, tcp_client
from tests.waiting import wait_for

pytest_plugins = ["tests.loops"]
pytestmark = pytest.mark.usefixtures("both_loops")  # `earshot run` uses uvloop where installed


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> TestCa:
    return TestCa(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def server_pem(ca: TestCa):
    return ca.issue("earshot.test")


def sip_tls_context(ca: TestCa, server_pem, *, client_certs: bool = False) -> ssl.SSLContext:
    return server_context(str(server_pem.cert), str(server_pem.key), str(ca.pem.cert) if client_certs else "")


@pytest.fixture
async def tls_server(ca: TestCa, server_pem) -> AsyncIterator[tuple[SipEndpoint, App]]:
    ua = UserAgent(local_host="127.0.0.1", local_port=0, t1=0.02, t2=0.08)
    app = App(ua)
    endpoint = SipEndpoint(ua, app.on_event)
    app.endpoint = endpoint
    await endpoint.start("127.0.0.1", 0)
    ua.local_port = endpoint.udp_port
    await endpoint.start_tls(sip_tls_context(ca, server_pem, client_certs=True), "127.0.0.1", 0)
    ua.local_tls_port = endpoint.tls_port
    yield endpoint, app
    await endpoint.close()


def client_ssl(ca: TestCa, pem=None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(ca.pem.cert))
    if pem is not None:
        context.load_cert_chain(str(pem.cert), str(pem.key))
    return context


async def tls_client(port: int, context: ssl.SSLContext) -> TcpClient:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context, server_hostname="127.0.0.1")
    return TcpClient(reader, writer)


def tls_request(method: str, port: int, **kwargs) -> bytes:
    return request(method, "TLS", port, **kwargs)


async def test_options_over_tls_answered_on_the_same_connection(tls_server, ca) -> None:
    endpoint, _ = tls_server
    assert endpoint.tls_port > 0 and endpoint.tls_port != endpoint.tcp_port
    client = await tls_client(endpoint.tls_port, client_ssl(ca))
    client.writer.write(tls_request("OPTIONS", client.port, branch="z9hG4bKt1"))
    resp = await client.recv()
    assert resp.status == 200  # type: ignore[union-attr]
    assert Via.parse(resp.headers.get("via") or "").transport == "TLS"
    client.writer.close()


async def test_sips_call_over_tls_gets_sips_contact_and_bye_on_the_same_connection(tls_server, ca) -> None:
    endpoint, app = tls_server
    client = await tls_client(endpoint.tls_port, client_ssl(ca))
    invite = tls_request("INVITE", client.port, branch="z9hG4bKt2", call_id="tls-2", body=OFFER)
    invite = invite.replace(b"INVITE sip:earshot@", b"INVITE sips:earshot@", 1)
    client.writer.write(invite)
    trying, ok = await client.recv(), await client.recv()
    assert (trying.status, ok.status) == (100, 200)  # type: ignore[union-attr]
    assert ok.headers.get("contact") == f"<sips:earshot@127.0.0.1:{endpoint.tls_port}>"
    call = await app.next(IncomingCall)
    assert call.peer.transport == "tls"  # type: ignore[attr-defined]
    tag = NameAddress.parse(ok.headers.get("to") or "").tag or ""
    client.writer.write(tls_request("ACK", client.port, branch="z9hG4bKt2a", call_id="tls-2", to_tag=tag))
    await asyncio.sleep(0.05)
    endpoint.ua.hangup(call.dialog_id, asyncio.get_running_loop().time())  # type: ignore[attr-defined]
    endpoint.flush()
    bye = await client.recv()
    while not isinstance(bye, SipRequest):  # 2xx retransmissions (t1 is 20 ms here) before our ACK landed
        bye = await client.recv()
    assert bye.method == "BYE"
    via = Via.parse(bye.headers.get("via") or "")
    assert (via.transport, via.port) == ("TLS", endpoint.tls_port)
    client.writer.close()


async def options_answered(port: int, context: ssl.SSLContext, branch: str) -> bool:
    """Does an OPTIONS over a new TLS connection get its 200?  False when the
    handshake fails or the server closes the connection unanswered (with TLS 1.3
    a rejected client certificate shows as the latter)."""
    try:
        client = await tls_client(port, context)
        client.writer.write(tls_request("OPTIONS", client.port, branch=branch))
        data = await asyncio.wait_for(client.reader.read(65536), WAIT)
    except (ssl.SSLError, ConnectionError):
        return False
    client.writer.close()
    return data.startswith(b"SIP/2.0 200 ")


async def test_client_certificate_required_per_trunk(tls_server, ca, tmp_path: Path) -> None:
    endpoint, _ = tls_server
    port = endpoint.tls_port
    required: set[str] = {"127.0.0.1"}
    endpoint.client_cert_required = lambda host: host in required
    # no certificate: the handshake completes, then the connection is closed unanswered
    assert not await options_answered(port, client_ssl(ca), "z9hG4bKt3")
    # a certificate from another CA: refused at the handshake
    stranger = TestCa(tmp_path, "Other CA").issue("stranger", client=True)
    assert not await options_answered(port, client_ssl(ca, stranger), "z9hG4bKt4")
    # the trunk's certificate, signed by sip_tls_ca_file's CA: served
    assert await options_answered(port, client_ssl(ca, ca.issue("trunk-a", client=True)), "z9hG4bKt5")
    await wait_for(lambda: endpoint.tls_handshake_failures == 2, WAIT, "both refusals to be counted")
    # a source whose trunk does not ask for one is served without
    required.clear()
    assert await options_answered(port, client_ssl(ca), "z9hG4bKt6")


async def test_plain_sip_on_the_tls_port_is_dropped_and_the_server_goes_on(tls_server, ca) -> None:
    endpoint, _ = tls_server
    reader, writer = await asyncio.open_connection("127.0.0.1", endpoint.tls_port)
    writer.write(request("OPTIONS", "TCP", 5060, branch="z9hG4bKt7"))
    assert await asyncio.wait_for(reader.read(), WAIT) == b""
    await wait_for(lambda: not endpoint._connections, WAIT, "the failed connection to be forgotten")
    client = await tls_client(endpoint.tls_port, client_ssl(ca))
    client.writer.write(tls_request("OPTIONS", client.port, branch="z9hG4bKt8"))
    assert (await client.recv()).status == 200  # type: ignore[union-attr]
    client.writer.close()


async def test_one_ip_gets_only_its_share_of_tcp_and_tls_connections(tls_server, ca) -> None:
    """Regression: the total cap had no per-IP share, so one address could hold all 1024
    slots.  Connections on the TLS port count before their handshake (a peer that never
    sends a ClientHello holds a slot too)."""
    endpoint, _ = tls_server
    endpoint.max_connections_per_ip = 3
    held = [await tcp_client(endpoint.tcp_port), await tcp_client(endpoint.tcp_port)]
    silent_reader, silent_writer = await asyncio.open_connection("127.0.0.1", endpoint.tls_port)  # no handshake
    await wait_for(lambda: endpoint.open_connections == 3, WAIT, "three connections to be accepted")
    # the fourth connection from 127.0.0.1, TCP or TLS, is closed at once, unanswered
    extra = await tcp_client(endpoint.tcp_port)
    extra.writer.write(request("OPTIONS", "TCP", extra.port, branch="z9hG4bKc1"))
    assert await asyncio.wait_for(extra.reader.read(), WAIT) == b""
    with pytest.raises((ssl.SSLError, ConnectionError, asyncio.IncompleteReadError)):
        await tls_client(endpoint.tls_port, client_ssl(ca))
    assert endpoint.refused_connections == 2
    # another address is not affected by 127.0.0.1's share
    reader, writer = await asyncio.open_connection("127.0.0.1", endpoint.tcp_port, local_addr=("127.0.0.2", 0))
    other = TcpClient(reader, writer)
    other.writer.write(request("OPTIONS", "TCP", other.port, branch="z9hG4bKc2"))
    assert (await other.recv()).status == 200  # type: ignore[union-attr]
    # the connections that were admitted still work; closing one frees its slot
    held[0].writer.write(request("OPTIONS", "TCP", held[0].port, branch="z9hG4bKc3"))
    assert (await held[0].recv()).status == 200  # type: ignore[union-attr]
    silent_writer.close()
    await wait_for(lambda: endpoint.open_connections == 3, WAIT, "the silent connection to be forgotten")
    again = await tcp_client(endpoint.tcp_port)
    again.writer.write(request("OPTIONS", "TCP", again.port, branch="z9hG4bKc4"))
    assert (await again.recv()).status == 200  # type: ignore[union-attr]
    for client in (*held, other, again):
        client.writer.close()


async def test_our_tls_connection_verifies_the_peer(tls_server, ca, server_pem, tmp_path: Path) -> None:
    """A BYE whose TLS connection is gone goes out on a new one, which checks the peer's
    certificate against the CA file: to a trusted peer it arrives, to another it does not."""
    endpoint, app = tls_server
    endpoint.tls_client_context = client_context(ca_file=str(ca.pem.cert))
    received: asyncio.Queue[bytes] = asyncio.Queue()

    async def pbx(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            received.put_nowait(data)

    pbx_server = await asyncio.start_server(pbx, "127.0.0.1", 0, ssl=sip_tls_context(ca, server_pem))
    pbx_port = pbx_server.sockets[0].getsockname()[1]
    client = await tls_client(endpoint.tls_port, client_ssl(ca))
    client.writer.write(tls_request("INVITE", client.port, branch="z9hG4bKt9", call_id="tls-9", body=OFFER,
                                    contact_port=pbx_port))
    trying, ok = await client.recv(), await client.recv()
    assert ok.status == 200  # type: ignore[union-attr]
    tag = NameAddress.parse(ok.headers.get("to") or "").tag or ""
    client.writer.write(tls_request("ACK", client.port, branch="z9hG4bKt9a", call_id="tls-9", to_tag=tag))
    call = await app.next(IncomingCall)
    client.writer.close()
    await wait_for(lambda: not endpoint._connections, WAIT, "the caller's connection to close")
    endpoint.ua.hangup(call.dialog_id, asyncio.get_running_loop().time())  # type: ignore[attr-defined]
    endpoint.flush()
    data = await asyncio.wait_for(received.get(), WAIT)
    assert data.startswith(b"BYE "), data[:80]
    pbx_server.close()


# -- configuration ----------------------------------------------------------


def test_tls_config_errors_name_the_setting_and_the_file(ca, server_pem, tmp_path: Path) -> None:
    missing = tmp_path / "missing.pem"
    with pytest.raises(ConfigError, match=f"sip_tls_cert_file: {missing}: no such file"):
        server_context(str(missing))
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    with pytest.raises(ConfigError, match="not a PEM certificate chain with its matching private key"):
        server_context(str(garbage))
    other_key = ca.issue("other").key
    with pytest.raises(ConfigError, match="matching private key"):
        server_context(str(server_pem.cert), str(other_key))
    with pytest.raises(ConfigError, match=f"sip_tls_ca_file: {garbage}: not PEM CA certificates"):
        server_context(str(server_pem.cert), str(server_pem.key), str(garbage))
    with pytest.raises(ConfigError, match="sip_tls_cert_file: required"):
        server_context("")
    # an encrypted key would make OpenSSL prompt on the terminal: refused instead
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_private_key(server_pem.key.read_bytes(), None)
    encrypted = tmp_path / "encrypted.key"
    encrypted.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                            serialization.BestAvailableEncryption(b"secret")))
    with pytest.raises(ConfigError, match="encrypted"):
        server_context(str(server_pem.cert), str(encrypted))
    with pytest.raises(ConfigError, match=f"sip_tls_cert_file: {tmp_path}: not a regular file"):
        server_context(str(tmp_path))
    unreadable = tmp_path / "unreadable.pem"
    unreadable.write_bytes(server_pem.cert.read_bytes())
    unreadable.chmod(0)
    try:
        if not os.access(unreadable, os.R_OK):  # root reads it anyway: then there is no error to see
            with pytest.raises(ConfigError, match="cannot be read"):
                server_context(str(unreadable))
    finally:
        unreadable.chmod(0o600)


def test_settings_tls_off_by_default_and_checked(server_pem) -> None:
    assert load_sip_tls(Settings()) is None
    with pytest.raises(ConfigError, match="sip_tls_cert_file"):
        Settings(sip_tls=True).validate()
    with pytest.raises(ConfigError, match="sip_tls_port"):
        Settings(sip_tls=True, sip_tls_cert_file="x", sip_tls_port=5060).validate()
    with pytest.raises(ConfigError, match="sip_tcp_max_per_ip"):
        Settings(sip_tcp_max_per_ip=0).validate()
    tls = load_sip_tls(Settings(sip_tls=True, sip_tls_cert_file=str(server_pem.cert),
                                sip_tls_key_file=str(server_pem.key)))
    assert tls is not None and not tls.client_certs
    assert tls.server.minimum_version >= ssl.TLSVersion.TLSv1_2


async def test_earshot_run_stops_at_start_naming_a_missing_certificate(tmp_path: Path, capsys) -> None:
    """`earshot run`'s own path: the error is printed and the exit status is 2, before
    anything listens."""
    from gateway.cli import _run

    missing = tmp_path / "sip.crt"
    settings = Settings(sip_tls=True, sip_tls_cert_file=str(missing), http_port=0)
    assert await _run(settings) == 2
    assert f"earshot: configuration error: sip_tls_cert_file: {missing}: no such file" in capsys.readouterr().err
