"""The request signature both sides share: what it covers, the time window, replays, the client's clock offset."""

from __future__ import annotations

import email.utils

import pytest
from hypothesis import given, strategies as st

from cis490fleet import errors, signing
from conftest import keeps_the_gil

KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))
NOW = 1_800_000_000.0
NONCE = "0123456789abcdef0123456789abcdef"
BODY = b'{"capability": {}}'


def signed_request(key=KEY, *, method="POST", target="/v1/job/claim", body=BODY, now=NOW, nonce=NONCE,
                   signer="host/ws1", headers=None) -> signing.Signed:
    hdrs = signing.signature_headers(key, signer, method, target, signing.body_sha256(body), now, nonce,
                                     headers)
    return signing.parse(hdrs.get)


def verify(signed, *, key=KEY, method="POST", target="/v1/job/claim", body=BODY, now=NOW, headers=None):
    signing.verify(key, signed, method, target, signing.body_sha256(body), now, headers)


def test_a_signed_request_verifies_with_the_same_key():
    verify(signed_request())


@pytest.mark.parametrize("change", [
    {"key": OTHER_KEY},
    {"method": "PUT"},
    {"target": "/v1/job/claim?x=1"},
    {"body": b'{"capability": {"cuda": true}}'},
    {"headers": {"x-lease": "7"}},
    {"headers": {"x-lab-host": "ws2"}},
    {"headers": {"x-fleet-identity": "host:ws2"}},
])
def test_any_change_to_a_signed_part_breaks_the_signature(change):
    with pytest.raises(errors.Unauthorized, match="signature does not match"):
        verify(signed_request(), **change)


def test_the_signer_is_signed_too():
    hdrs = signing.signature_headers(KEY, "host/ws1", "POST", "/v1/job/claim", signing.body_sha256(BODY), NOW, NONCE)
    hdrs[signing.H_SIGNER] = "host/ws2"
    with pytest.raises(errors.Unauthorized, match="signature does not match"):
        verify(signing.parse(hdrs.get))


def test_unsigned_headers_do_not_matter():
    verify(signed_request(headers={"accept": "text/plain"}), headers={"accept": "application/json"})


@pytest.mark.parametrize("skew", [-signing.WINDOW_S - 1, signing.WINDOW_S + 1])
def test_a_timestamp_outside_the_window_is_refused(skew):
    with pytest.raises(errors.Unauthorized, match="clock"):
        verify(signed_request(now=NOW + skew))


@pytest.mark.parametrize("skew", [-signing.WINDOW_S, 0, signing.WINDOW_S - 1])
def test_a_timestamp_inside_the_window_is_accepted(skew):
    verify(signed_request(now=NOW + skew))


def test_a_host_may_sign_only_seconds_ahead_of_the_receiver_and_minutes_behind():
    ahead = signing.HOST_AHEAD_S
    for skew in (-signing.WINDOW_S, 0, ahead):
        signing.verify(KEY, signed_request(now=NOW + skew), "POST", "/v1/job/claim", signing.body_sha256(BODY), NOW,
                       ahead=ahead)
    with pytest.raises(errors.Unauthorized, match=f"ahead of.*at most {ahead} s"):
        signing.verify(KEY, signed_request(now=NOW + ahead + 1), "POST", "/v1/job/claim", signing.body_sha256(BODY),
                       NOW, ahead=ahead)


def test_a_memory_that_began_now_vouches_only_for_later_signatures():
    """Whatever was accepted before ``since`` was signed at most HOST_AHEAD_S ahead: all of it is refused."""
    floor = signing.not_before(NOW + 0.5)
    assert floor == int(NOW) + 1 + signing.HOST_AHEAD_S
    accepted_last = int(NOW + 0.49 + signing.HOST_AHEAD_S)  # the newest time accepted just before
    with pytest.raises(errors.StaleSignature, match="sign it again at or after") as refused:
        signing.check_not_before("host/ws1", accepted_last, floor)
    assert refused.value.not_before == floor and errors.http_status(refused.value) == 401
    signing.check_not_before("host/ws1", floor, floor)


def test_no_signature_headers_is_none_and_partial_ones_are_refused():
    assert signing.parse({}.get) is None
    hdrs = signing.signature_headers(KEY, "host/ws1", "GET", "/v1/jobs", signing.EMPTY_SHA256, NOW, NONCE)
    del hdrs[signing.H_NONCE]
    with pytest.raises(errors.Unauthorized, match=signing.H_NONCE):
        signing.parse(hdrs.get)


@pytest.mark.parametrize("name, value", [
    (signing.H_SIGNER, "operator/alice"), (signing.H_SIGNER, "host/../x"), (signing.H_TIME, "1e9"),
    (signing.H_TIME, "-5"), (signing.H_NONCE, "xyz"), (signing.H_SIGNATURE, "00"),
])
def test_malformed_signature_headers_are_refused_naming_the_header(name, value):
    hdrs = signing.signature_headers(KEY, "host/ws1", "GET", "/v1/jobs", signing.EMPTY_SHA256, NOW, NONCE)
    hdrs[name] = value
    with pytest.raises(errors.Unauthorized, match=name):
        signing.parse(hdrs.get)


def test_a_nonce_is_accepted_once():
    memory = signing.NonceMemory()
    memory.check_and_add("host/ws1", NONCE, int(NOW), NOW)
    with pytest.raises(errors.Unauthorized, match="replay"):
        memory.check_and_add("host/ws1", NONCE, int(NOW), NOW + 1)
    memory.check_and_add("host/ws2", NONCE, int(NOW), NOW + 1)  # nonces are per signer


def test_the_memory_forgets_what_the_window_refuses_anyway():
    memory = signing.NonceMemory(window=10)
    memory.check_and_add("host/ws1", NONCE, int(NOW), NOW)
    memory.check_and_add("host/ws1", "f" * 32, int(NOW) + 20, NOW + 20)
    assert len(memory) == 1


@given(st.lists(st.integers(0, 50), min_size=1, max_size=200))
def test_a_full_memory_never_lets_a_replay_through(offsets):
    """Forgetting the oldest pair raises the floor to its time: every pair seen before is still refused."""
    memory = signing.NonceMemory(capacity=8, window=1000)
    seen = []
    for i, off in enumerate(offsets):
        nonce = f"{i:032x}"
        try:
            memory.check_and_add("host/ws1", nonce, int(NOW) + off, NOW + 50)
        except errors.Unauthorized:
            continue
        seen.append((nonce, int(NOW) + off))
        assert len(memory) <= 8
    for nonce, ts in seen:
        with pytest.raises(errors.Unauthorized):
            memory.check_and_add("host/ws1", nonce, ts, NOW + 50)


def test_parse_key_names_the_source():
    assert signing.parse_key("ab" * 32 + "\n", "f") == bytes([0xAB]) * 32
    with pytest.raises(errors.ConfigError, match="host.key does not hold a key"):
        signing.parse_key("secret", "host.key")


def test_the_clock_offset_comes_from_the_date_header():
    date = email.utils.formatdate(NOW + 120, usegmt=True)
    assert signing.clock_offset(date, NOW) == pytest.approx(120, abs=1)
    assert signing.clock_offset(None, NOW) is None
    assert signing.clock_offset("yesterday", NOW) is None


def test_the_offset_changes_only_beyond_the_date_headers_resolution():
    assert signing.corrected_offset(0.0, 0.9) == 0.0
    assert signing.corrected_offset(0.0, -0.6) == 0.0
    assert signing.corrected_offset(0.0, 119.6) == 120.0
    assert signing.corrected_offset(120.0, None) == 120.0


def test_a_client_with_a_slow_clock_signs_within_the_window_once_corrected():
    server_now, client_now = NOW, NOW - 3600
    offset = signing.corrected_offset(0.0, signing.clock_offset(email.utils.formatdate(server_now, usegmt=True),
                                                                client_now))
    verify(signed_request(now=client_now + offset), now=server_now)



def test_signing_and_verifying_keep_the_gil():
    """A server verifies each signed request on one of many handler threads; a check that lets go of the GIL
    (as ``hmac.digest`` does on every call) makes each request wait for it to come back from another thread."""
    assert keeps_the_gil(lambda: verify(signed_request())), "signing or verifying let go of the GIL"
