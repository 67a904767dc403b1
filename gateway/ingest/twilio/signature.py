"""Twilio's request signature (``X-Twilio-Signature``), as Twilio publishes it.

Twilio signs each request it makes with the account's auth token: the signature is
base64(HMAC-SHA1(auth token, URL + the POST parameters sorted by name, each name
followed by its value)). A WebSocket upgrade has no body, so for a Media Stream the
signed string is the URL alone: the ``wss://`` URL of the TwiML ``<Stream url>``.

Earshot usually sits behind a TLS proxy, so the URL it sees (``ws://``, an internal
host and port) is not the one Twilio signed. :func:`candidate_urls` rebuilds what
Twilio can have signed from the request (``X-Forwarded-Proto`` / ``-Host``, ``Host``,
the path and query) with the variations Twilio's own helper libraries accept (the
default port written or not, the query string in the URL or as parameters). Trying
several is safe: each still needs the HMAC, which only the auth token produces.

The signature covers the URL only, not the stream: anyone who captures one signed
upgrade can replay it to the same URL. Deployments that need more use an API token
in a ``<Parameter>`` (docs/twilio.md).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Iterable, Mapping
from urllib.parse import parse_qsl, urlsplit, urlunsplit

Params = Mapping[str, str] | Iterable[tuple[str, str]]

_DEFAULT_PORTS = {"https": 443, "wss": 443, "http": 80, "ws": 80}
_WS_SCHEMES = {"https": "wss", "http": "ws", "wss": "wss", "ws": "ws"}


def compute_signature(auth_token: str, url: str, params: Params = ()) -> str:
    """base64(HMAC-SHA1(auth_token, url + name1 + value1 + name2 + value2 ...)), names sorted."""
    # as Twilio's libraries do: names sorted, a name's values sorted, repeated pairs once
    pairs = sorted(set(params.items() if isinstance(params, Mapping) else params))
    data = url + "".join(name + value for name, value in pairs)
    mac = hmac.new(auth_token.encode("utf-8"), data.encode("utf-8"), hashlib.sha1)
    return base64.b64encode(mac.digest()).decode("ascii")


def port_variants(url: str) -> list[str]:
    """The URL as given, without its port, and with the scheme's default port written out.

    Twilio's helper libraries validate against both, since proxies add and drop
    default ports."""
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:  # a Host header with a port that is not a number
        return [url]
    host = parts.hostname or ""
    if ":" in host:  # IPv6 literal
        host = f"[{host}]"
    userinfo = parts.netloc.rpartition("@")[0]
    prefix = userinfo + "@" if userinfo else ""
    out = [url, urlunsplit(parts._replace(netloc=prefix + host))]
    default = _DEFAULT_PORTS.get(parts.scheme)
    if default is not None and port is None:
        out.append(urlunsplit(parts._replace(netloc=f"{prefix}{host}:{default}")))
    return list(dict.fromkeys(out))


def candidate_urls(scheme: str, headers: Mapping[str, str], path: str, query: str) -> list[tuple[str, list[tuple[str, str]]]]:
    """(URL, params) pairs Twilio can have signed for this WebSocket upgrade.

    ``headers`` are the request's (lower-case names); ``scheme`` is the one the
    server saw (``ws`` or ``wss``). Twilio only opens ``wss://`` streams, so that
    scheme is always tried, whatever a proxy says.
    """
    schemes = ["wss"]
    forwarded_proto = headers.get("x-forwarded-proto", "").split(",")[0].strip().lower()
    for s in (forwarded_proto, scheme.lower()):
        if s in _WS_SCHEMES and _WS_SCHEMES[s] not in schemes:
            schemes.append(_WS_SCHEMES[s])
    hosts = []
    for h in (headers.get("x-forwarded-host", "").split(",")[0].strip(), headers.get("host", "").strip()):
        if h and h not in hosts:
            hosts.append(h)
    query_params = parse_qsl(query, keep_blank_values=True)
    out: list[tuple[str, list[tuple[str, str]]]] = []
    for s in schemes:
        for h in hosts:
            base = f"{s}://{h}{path}"
            forms = [(base + ("?" + query if query else ""), [])]
            if query:
                forms.append((base, query_params))  # the query as parameters, as some helpers sign it
            for url, params in forms:
                for variant in port_variants(url):
                    out.append((variant, params))
    return out


def valid(auth_token: str, signature: str, candidates: Iterable[tuple[str, Params]]) -> bool:
    """Whether ``signature`` is Twilio's for one of the candidate URLs (constant-time compares)."""
    if not auth_token or not signature:
        return False
    given = signature.strip().encode("ascii", "replace")
    ok = False
    for url, params in candidates:
        ok |= hmac.compare_digest(compute_signature(auth_token, url, params).encode("ascii"), given)
    return ok
