"""Twilio's request signature: base64(HMAC-SHA1(auth token, URL + sorted POST params)).

The first vectors are the ones Twilio publishes in its own helper library's tests
(twilio-python, tests/unit/test_request_validator.py: token ``12345``). The
WebSocket vector (URL only, no parameters) was computed from the published
algorithm with OpenSSL, independently of this code:

    printf 'wss://example.com/twilio/media' | openssl dgst -sha1 -hmac 'twilio-auth-token-0123' -binary | base64
"""

from __future__ import annotations

from gateway.ingest.twilio.signature import candidate_urls, compute_signature, port_variants, valid

TWILIO_TOKEN = "12345"
TWILIO_URL = "https://mycompany.com/myapp.php?foo=1&bar=2"
TWILIO_PARAMS = {"CallSid": "CA1234567890ABCDE", "Digits": "1234", "From": "+14158675309", "To": "+18005551212",
                 "Caller": "+14158675309"}

WS_TOKEN = "twilio-auth-token-0123"
WS_URL = "wss://example.com/twilio/media"
WS_SIGNATURE = "pDmlQRFM6TBra6YTfOCPwHIPHDw="


def test_twilios_published_vectors():
    assert compute_signature(TWILIO_TOKEN, TWILIO_URL, TWILIO_PARAMS) == "RSOYDt4T1cUTdK1PDd93/VVr8B8="
    # repeated names: sorted by name, then by value
    dup = [("Sid", "CA123"), ("SidAccount", "AC123"), ("Digits", "5678"), ("Digits", "1234")]
    assert compute_signature(TWILIO_TOKEN, TWILIO_URL, dup) == "IK+Dwps556ElfBT0I3Rgjkr1wJU="


def test_twilios_published_port_vectors_validate_through_the_port_variants():
    with_443 = "kvajT1Ptam85bY51eRf/AJRuM3w="  # Twilio signed https://mycompany.com:443/...
    assert valid(TWILIO_TOKEN, with_443, [(u, TWILIO_PARAMS) for u in port_variants(TWILIO_URL)])
    on_1234 = TWILIO_URL.replace(".com", ".com:1234")  # a proxy added a port Twilio did not sign
    assert valid(TWILIO_TOKEN, "RSOYDt4T1cUTdK1PDd93/VVr8B8=", [(u, TWILIO_PARAMS) for u in port_variants(on_1234)])


def test_websocket_upgrade_is_signed_over_the_url_alone():
    assert compute_signature(WS_TOKEN, WS_URL) == WS_SIGNATURE
    assert compute_signature(WS_TOKEN, WS_URL, {}) == WS_SIGNATURE


def test_the_url_twilio_signed_is_rebuilt_behind_a_tls_proxy():
    headers = {"host": "127.0.0.1:8080", "x-forwarded-host": "example.com", "x-forwarded-proto": "https"}
    candidates = candidate_urls("ws", headers, "/twilio/media", "")
    assert (WS_URL, []) in candidates
    assert valid(WS_TOKEN, WS_SIGNATURE, candidates)
    # a proxy that passes Host through and says nothing else: Twilio only opens wss://
    assert valid(WS_TOKEN, WS_SIGNATURE, candidate_urls("ws", {"host": "example.com"}, "/twilio/media", ""))


def test_a_query_string_is_signed_in_the_url_or_as_parameters():
    url = WS_URL + "?b=2&a=1"
    in_url = compute_signature(WS_TOKEN, url)
    as_params = compute_signature(WS_TOKEN, WS_URL, {"a": "1", "b": "2"})
    for sig in (in_url, as_params):
        assert valid(WS_TOKEN, sig, candidate_urls("ws", {"host": "example.com"}, "/twilio/media", "b=2&a=1"))


def test_wrong_token_tampered_or_missing_signature_fails():
    candidates = candidate_urls("wss", {"host": "example.com"}, "/twilio/media", "")
    assert not valid("another-token", WS_SIGNATURE, candidates)
    assert not valid(WS_TOKEN, WS_SIGNATURE.replace("p", "q", 1), candidates)
    assert not valid(WS_TOKEN, "", candidates)
    assert not valid("", WS_SIGNATURE, candidates)
    assert not valid(WS_TOKEN, "not ascii: \u00e9", candidates)
    # another path or host is another URL
    assert not valid(WS_TOKEN, WS_SIGNATURE, candidate_urls("wss", {"host": "example.com"}, "/twilio/other", ""))
    assert not valid(WS_TOKEN, WS_SIGNATURE, candidate_urls("wss", {"host": "evil.example"}, "/twilio/media", ""))


def test_a_host_header_with_a_bad_port_does_not_raise():
    assert port_variants("wss://example.com:notaport/twilio/media") == ["wss://example.com:notaport/twilio/media"]
    assert not valid(WS_TOKEN, WS_SIGNATURE, candidate_urls("ws", {"host": "example.com:x"}, "/twilio/media", ""))
