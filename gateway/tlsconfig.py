"""TLS contexts for SIP over TLS, built once at start from the settings.

Every problem with the certificate, key or CA file is turned into a
:class:`~gateway.config.ConfigError` naming the setting and the file, at
start, so that a gateway never comes up listening on 5061 with a context that
fails every handshake (or, worse, silently without TLS).

Policy (docs/tls-srtp.md):

- TLS 1.2 or later, OpenSSL's default cipher list.
- Server side: a client certificate is asked for only when ``sip_tls_ca_file``
  is set; it is then *optional* at the handshake (a trunk that presents one
  must present a valid one) and required per trunk (``tls_client_cert``) by
  the transport once it knows which trunk the connection belongs to.
- Client side (our own requests on a new connection, e.g. a BYE after the
  caller's connection dropped): the peer's certificate is verified against
  ``sip_tls_ca_file`` (or the system store) with host name checking, and our
  certificate is presented for peers that want mutual TLS.
"""

from __future__ import annotations

import os
import ssl
from dataclasses import dataclass

from .config import ConfigError, Settings

__all__ = ["SipTls", "client_context", "load_sip_tls", "server_context"]


def _no_password() -> str:
    # Without a callback OpenSSL prompts on the terminal for an encrypted key: a daemon would hang.
    raise ConfigError("sip_tls_key_file: the private key is encrypted; give an unencrypted key (file mode 0600)")


def _readable(setting: str, path: str) -> None:
    if not os.path.exists(path):
        raise ConfigError(f"{setting}: {path}: no such file")
    if not os.path.isfile(path):
        raise ConfigError(f"{setting}: {path}: not a regular file")
    try:
        with open(path, "rb") as f:
            f.read(1)
    except OSError as exc:
        raise ConfigError(f"{setting}: {path}: cannot be read ({exc.strerror})") from None


def _load_chain(context: ssl.SSLContext, cert_file: str, key_file: str) -> None:
    _readable("sip_tls_cert_file", cert_file)
    if key_file:
        _readable("sip_tls_key_file", key_file)
    try:
        context.load_cert_chain(cert_file, key_file or None, password=_no_password)
    except ConfigError:
        raise
    except ssl.SSLError as exc:
        where = f"{cert_file}" + (f" / {key_file}" if key_file else "")
        raise ConfigError(f"sip_tls_cert_file/sip_tls_key_file: {where}: not a PEM certificate chain with its "
                          f"matching private key ({exc.reason or exc})") from None


def _load_ca(context: ssl.SSLContext, ca_file: str) -> None:
    _readable("sip_tls_ca_file", ca_file)
    try:
        context.load_verify_locations(cafile=ca_file)
    except ssl.SSLError as exc:
        raise ConfigError(f"sip_tls_ca_file: {ca_file}: not PEM CA certificates ({exc.reason or exc})") from None


def server_context(cert_file: str, key_file: str = "", ca_file: str = "") -> ssl.SSLContext:
    """The listener's context; raises :class:`ConfigError`."""
    if not cert_file:
        raise ConfigError("sip_tls_cert_file: required when sip_tls is true (a PEM certificate chain)")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    _load_chain(context, cert_file, key_file)
    if ca_file:
        _load_ca(context, ca_file)
        context.verify_mode = ssl.CERT_OPTIONAL
    return context


def client_context(cert_file: str = "", key_file: str = "", ca_file: str = "") -> ssl.SSLContext:
    """For connections we open; verifies the peer (``ca_file`` or the system store)."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=None)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if ca_file:
        _load_ca(context, ca_file)
    if cert_file:
        _load_chain(context, cert_file, key_file)
    return context


@dataclass(frozen=True)
class SipTls:
    server: ssl.SSLContext
    client: ssl.SSLContext
    client_certs: bool  # a CA file is configured: client certificates are asked for and verified


def load_sip_tls(settings: Settings) -> SipTls | None:
    """Both contexts when ``sip_tls`` is on, else None; raises :class:`ConfigError`."""
    if not settings.sip_tls:
        return None
    s = settings
    return SipTls(
        server=server_context(s.sip_tls_cert_file, s.sip_tls_key_file, s.sip_tls_ca_file),
        client=client_context(s.sip_tls_cert_file, s.sip_tls_key_file, s.sip_tls_ca_file),
        client_certs=bool(s.sip_tls_ca_file),
    )
