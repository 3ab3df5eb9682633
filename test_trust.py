"""The gates of issue 22: a credential is had, kept and renewed only by its holder.

Each test reproduces a leak found on the registry before the fix (a
superseded certificate that kept minting certificates, ``register`` as an
unthrottled password oracle, a throttle that locked the device out, scrypt
and signatures under the registry's lock, certificates that outlived their
validity or their CA) and proves the rule that closes it.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
from datetime import timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

import ca
import fastpath
import registry
from conftest import FAST, START, FakeClock, make_csr, make_key, serve
from test_registry import PASSWORD, approved, certificate_der, csr_request, password_request, snapshot

WRONG = "not the password"


@pytest.fixture
def open_reg(reg: registry.Registry) -> registry.Registry:
    reg.unlock()
    return reg


@pytest.fixture
def fast_reg(clock: FakeClock, authority: ca.CA) -> fastpath.FastRegistry:
    """An unlocked registry on the fast path, as the server runs it."""
    instance = fastpath.FastRegistry(clock=clock, ca=authority, roles=("minimum", "operator"), settings=FAST)
    instance.unlock()
    yield instance
    instance.close()


def renew(reg: registry.Registry, certificate_pem: str, key: object) -> registry.Outcome:
    return reg.renew(certificate_der(certificate_pem), {"csr": make_csr("sensor-0001", key)})


# --- 1. Only the current certificate renews (LIFE-7.2-RENEW) ------------------


@pytest.fixture
def rekeyed(open_reg: registry.Registry, clock: FakeClock) -> tuple:
    """A device approved with key A that re-keyed to B: (key A, A's certificate, key B, B's answer, B's request)."""
    key_a, key_b = make_key(), make_key()
    admitted = approved(open_reg, csr_request("sensor-0001", key_a))
    clock.advance(days=1)
    to_b = renew(open_reg, admitted.body["certificate"], key_b)
    clock.advance(days=1)
    return key_a, admitted.body["certificate"], key_b, to_b, csr_request("sensor-0001", key_b)


def test_a_superseded_certificate_renews_nothing_and_the_device_keeps_its_name(open_reg, rekeyed) -> None:
    """Proves LIFE-7.2-RENEW: whoever holds a replaced certificate's key cannot take the user over."""
    key_a, certificate_a, _, to_b, request_b = rekeyed
    before = snapshot(open_reg)

    for key in (make_key(), key_a):  # a key of the attacker's own, and A's key again
        for _ in range(50):
            with pytest.raises(registry.Unauthorized, match="a renewal replaced this certificate") as refused:
                renew(open_reg, certificate_a, key)
            assert refused.value.status == 401
            assert refused.value.headers == registry.CHALLENGE

    assert snapshot(open_reg) == before
    # The real device, with key B, is still the user: its registration repeats and gets its certificate.
    again = open_reg.register(request_b)
    assert (again.status, again.body["certificate"]) == (201, to_b.body["certificate"])


def test_the_replaced_certificate_may_repeat_its_renewal_and_gets_the_current_certificate(open_reg, rekeyed) -> None:
    """Proves LIFE-7.2-RENEW: a lost answer is fetched again with a CSR for the current key, and nothing is issued."""
    _, certificate_a, key_b, to_b, _ = rekeyed
    before = snapshot(open_reg)

    repeated = renew(open_reg, certificate_a, key_b)

    assert repeated.status == 201
    assert repeated.body == to_b.body
    assert snapshot(open_reg) == before


def test_only_the_certificate_the_current_one_replaced_may_repeat(open_reg, rekeyed, clock) -> None:
    """Proves LIFE-7.2-RENEW: two renewals on, the first certificate repeats nothing, even with the current key."""
    _, certificate_a, key_b, to_b, _ = rekeyed
    key_c = make_key()
    to_c = renew(open_reg, to_b.body["certificate"], key_c)
    before = snapshot(open_reg)

    for certificate, key in ((certificate_a, key_c), (certificate_a, key_b), (to_b.body["certificate"], key_b)):
        with pytest.raises(registry.Unauthorized):
            renew(open_reg, certificate, key)

    assert snapshot(open_reg) == before
    assert renew(open_reg, to_b.body["certificate"], key_c).body == to_c.body  # B repeats its own renewal


def test_a_superseded_certificate_still_signs_in_until_its_not_after(open_reg, rekeyed, clock) -> None:
    """Proves LIFE-7.2-RENEW: renewal is not revocation; relying parties accept the old one until it ends."""
    _, certificate_a, _, _, _ = rekeyed
    assert open_reg.authenticate_certificate(certificate_der(certificate_a)).username == "sensor-0001"
    clock.now = x509.load_pem_x509_certificate(certificate_a.encode()).not_valid_after_utc
    with pytest.raises(registry.Unauthorized, match="expired"):
        open_reg.authenticate_certificate(certificate_der(certificate_a))


def test_the_certificate_life_table_decides_every_renewal() -> None:
    """Proves LIFE-7.2-RENEW: the table, and nothing else, says which renewals answer; every other pair is 401."""
    renewing = {(standing, event) for (standing, event), (_, answer) in registry.CERTIFICATE_LIFE.items() if answer}
    assert renewing == {
        (registry.Standing.CURRENT, registry.LifeEvent.RENEW),
        (registry.Standing.CURRENT, registry.LifeEvent.REKEY),
        (registry.Standing.SUPERSEDED, registry.LifeEvent.REPEAT),
    }
    for standing in registry.Standing:
        for event in (registry.LifeEvent.RENEW, registry.LifeEvent.REKEY, registry.LifeEvent.REPEAT):
            if (standing, event) in renewing:
                assert registry.renewal(standing, event) is registry.CERTIFICATE_LIFE[standing, event][1]
            else:
                with pytest.raises(registry.Unauthorized):
                    registry.renewal(standing, event)


# --- 2. register is throttled like whoami (REG-2.4-THROTTLE) ----------------


@pytest.fixture
def verifications(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every password the registry verifies with scrypt, in order."""
    seen: list[str] = []
    check = registry.check_password

    def counted(password: str, stored: str) -> bool:
        seen.append(password)
        return check(password, stored)

    monkeypatch.setattr(registry, "check_password", counted)
    return seen


@pytest.mark.parametrize("decided", [False, True], ids=["pending", "approved"])
def test_wrong_passwords_in_register_are_failed_sign_ins_and_throttled(open_reg, clock, verifications, decided):
    """Proves REG-2.4-THROTTLE, AUTH-5.2-THROTTLE: a stored request's password cannot be guessed through register."""
    request = password_request()
    assert open_reg.register(request).status == 202
    if decided:
        open_reg.approve("sensor-0001")
    limit = open_reg.settings.max_auth_failures
    verifications.clear()

    for _ in range(limit):
        with pytest.raises(registry.Conflict):
            open_reg.register(password_request(password=WRONG), "198.51.100.7")
    for password in (WRONG, PASSWORD):  # over the limit, not even the right one is checked
        with pytest.raises(registry.TooManyRequests) as refused:
            open_reg.register(password_request(password=password), "198.51.100.7")
        assert refused.value.status == 429
        assert refused.value.code == "too_many_requests"
        assert refused.value.headers == {"Retry-After": "60"}
    assert verifications == [WRONG] * limit

    # The owner, from its own address, is not held back; and the stranger's pause ends with the window.
    assert open_reg.register(request, "10.0.0.5").status == (201 if decided else 202)
    clock.advance(minutes=1)
    assert open_reg.register(request, "198.51.100.7").status == (201 if decided else 202)


def test_the_throttle_counts_whoami_and_register_together(open_reg, verifications):
    """Proves AUTH-5.2-THROTTLE: failed sign-ins are one count, whichever call made them."""
    approved(open_reg, password_request())
    verifications.clear()
    for attempt in range(open_reg.settings.max_auth_failures):
        if attempt % 2:
            with pytest.raises(registry.Unauthorized):
                open_reg.authenticate_password("sensor-0001", WRONG, "198.51.100.7")
        else:
            with pytest.raises(registry.Conflict):
                open_reg.register(password_request(password=WRONG), "198.51.100.7")
    with pytest.raises(registry.TooManyRequests):
        open_reg.register(password_request(), "198.51.100.7")
    with pytest.raises(registry.TooManyRequests):
        open_reg.authenticate_password("sensor-0001", PASSWORD, "198.51.100.7")
    assert len(verifications) == open_reg.settings.max_auth_failures


def test_the_fast_path_never_makes_a_wrong_password_cheaper(fast_reg, verifications):
    """Proves REG-2.4-THROTTLE: a remembered password tells a wrong one apart only by scrypt, after the throttle."""
    open_reg = fast_reg
    request = password_request()
    assert open_reg.register(request).status == 202
    assert open_reg.register(request).status == 202  # the right password is remembered
    verifications.clear()

    with pytest.raises(registry.Conflict):
        open_reg.register(password_request(password=WRONG))
    open_reg.approve("sensor-0001")
    with pytest.raises(registry.Unauthorized):
        open_reg.authenticate_password("sensor-0001", WRONG)

    assert verifications == [WRONG, WRONG]


def test_a_throttled_poll_repeated_as_bytes_is_throttled_too(fast_reg):
    """Proves REG-2.4-THROTTLE: the fast path's remembered 202 does not pass the throttle by."""
    open_reg = fast_reg
    body = b'{"username": "sensor-0001", "password": "correct horse battery staple"}'
    assert open_reg.register_body(body, "198.51.100.7").status == 202
    for _ in range(open_reg.settings.max_auth_failures):
        with pytest.raises(registry.Conflict):
            open_reg.register(password_request(password=WRONG), "198.51.100.7")
    with pytest.raises(registry.TooManyRequests):
        open_reg.register_body(body, "198.51.100.7")


# --- 3. The throttle cannot lock the device out (AUTH-5.2-KNOWN-ADDRESS) ----


def test_guesses_from_many_addresses_do_not_lock_out_the_device_at_its_known_address(open_reg, clock):
    """Proves AUTH-5.2-KNOWN-ADDRESS: the all-addresses limit spares an address the username signed in from."""
    approved(open_reg, password_request())
    assert open_reg.authenticate_password("sensor-0001", PASSWORD, "10.0.0.5").username == "sensor-0001"
    clock.advance(days=29)
    for stranger in range(10):
        for _ in range(5):
            with pytest.raises(registry.Unauthorized):
                open_reg.authenticate_password("sensor-0001", WRONG, f"198.51.100.{stranger}")

    assert open_reg.authenticate_password("sensor-0001", PASSWORD, "10.0.0.5").username == "sensor-0001"
    assert open_reg.register(password_request(), "10.0.0.5").status == 201
    with pytest.raises(registry.TooManyRequests):  # an address it never signed in from waits
        open_reg.authenticate_password("sensor-0001", PASSWORD, "10.0.0.6")


def test_a_known_address_keeps_its_own_limit_and_is_forgotten_after_the_period(open_reg, clock):
    """Proves AUTH-5.2-KNOWN-ADDRESS: a known address still has its per-address limit, for 30 days."""
    approved(open_reg, password_request())
    assert open_reg.register(password_request(), "10.0.0.5").status == 201  # a 201 poll signs in
    for _ in range(5):
        with pytest.raises(registry.Unauthorized):
            open_reg.authenticate_password("sensor-0001", WRONG, "10.0.0.5")
    with pytest.raises(registry.TooManyRequests):
        open_reg.authenticate_password("sensor-0001", PASSWORD, "10.0.0.5")

    clock.advance(days=30, minutes=1)
    for stranger in range(50):
        with pytest.raises(registry.Unauthorized):
            open_reg.authenticate_password("sensor-0001", WRONG, f"198.51.100.{stranger}")
    with pytest.raises(registry.TooManyRequests):  # no longer known: the all-addresses limit holds it too
        open_reg.authenticate_password("sensor-0001", PASSWORD, "10.0.0.5")


def test_the_failure_windows_are_bounded_and_stale_ones_are_dropped(clock):
    """Proves AUTH-5.2-BOUNDED: whatever the number of guessers, the throttle keeps at most its capacity."""
    settings = dataclasses.replace(FAST, max_throttle_entries=1_000)
    throttle = registry.SignInThrottle(settings)
    now = registry._micros(clock())
    for guesser in range(36_000):
        throttle.fail("sensor-0001", f"10.{guesser >> 16}.{guesser >> 8 & 255}.{guesser & 255}", now)
        assert len(throttle) <= 1_000
    assert throttle.wait("sensor-0001", "203.0.113.9", now) == 60  # the username's own window is the newest
    assert throttle.wait("sensor-0001", "203.0.113.9", now + registry.MINUTE) is None
    assert len(throttle) == 0


def test_unknown_usernames_are_throttled_alike(open_reg):
    """Proves AUTH-5.2-THROTTLE: a 429 does not tell which usernames exist."""
    approved(open_reg, password_request())
    for name in ("sensor-0001", "nobody-0001"):
        for _ in range(open_reg.settings.max_auth_failures):
            with pytest.raises(registry.Unauthorized):
                open_reg.authenticate_password(name, WRONG, "198.51.100.7")
        with pytest.raises(registry.TooManyRequests):
            open_reg.authenticate_password(name, WRONG, "198.51.100.7")


# --- 4. Slow work runs outside the lock ---------------------------------------


def _lock_is_free(reg: registry.Registry) -> bool:
    """Whether another thread can take the registry's lock now, or within a few seconds (others hold it briefly)."""
    taken: list[bool] = []

    def take() -> None:
        got = reg._lock.acquire(timeout=5)
        taken.append(got)
        if got:
            reg._lock.release()

    thread = threading.Thread(target=take)
    thread.start()
    thread.join()
    return taken == [True]


def test_no_key_derivation_or_signature_runs_under_the_lock(open_reg, monkeypatch, rekeyed):
    """Proves SAFE-6.6-SLOW-WORK: scrypt, certificate and CRL signatures run while the lock is free."""
    seen: list[tuple[str, bool]] = []

    def watched(name: str, work):
        def run(*args, **kwargs):
            seen.append((name, _lock_is_free(open_reg)))
            return work(*args, **kwargs)

        return run

    monkeypatch.setattr(registry, "hash_password", watched("hash", registry.hash_password))
    monkeypatch.setattr(registry, "check_password", watched("verify", registry.check_password))
    authority = open_reg.ca
    monkeypatch.setattr(authority, "issue_client_certificate", watched("sign", authority.issue_client_certificate))
    monkeypatch.setattr(authority, "sign_crl", watched("crl", authority.sign_crl))
    _, _, key_b, to_b, _ = rekeyed
    open_reg.unlock()

    assert open_reg.register(password_request("sensor-0002")).status == 202
    with pytest.raises(registry.Conflict):
        open_reg.register(password_request("sensor-0002", password=WRONG))
    open_reg.approve("sensor-0002")
    open_reg.authenticate_password("sensor-0002", PASSWORD)
    assert open_reg.register(csr_request("sensor-0003")).status == 202
    open_reg.approve("sensor-0003")
    renew(open_reg, to_b.body["certificate"], key_b)
    open_reg.remove_user("sensor-0001")

    assert {name for name, _ in seen} == {"hash", "verify", "sign", "crl"}
    assert all(free for _, free in seen), seen


def test_key_derivations_run_at_most_one_a_core_at_once(clock, authority, monkeypatch):
    """Proves SAFE-6.6-SLOW-WORK: the rest wait on the derivations' semaphore, not on the registry's lock."""
    open_reg = registry.Registry(clock=clock, ca=authority, settings=FAST)
    open_reg.unlock()
    cores = os.cpu_count() or 1
    inside, most, gate = [0], [0], threading.Event()
    count = threading.Lock()
    check = registry.check_password

    def slow(password: str, stored: str) -> bool:
        with count:
            inside[0] += 1
            most[0] = max(most[0], inside[0])
        gate.wait(timeout=30)
        with count:
            inside[0] -= 1
        return check(password, stored)

    approved(open_reg, password_request())
    monkeypatch.setattr(registry, "check_password", slow)
    threads = [
        threading.Thread(target=open_reg.authenticate_password, args=("sensor-0001", PASSWORD, f"10.0.0.{n}"))
        for n in range(cores + 3)
    ]
    for thread in threads:
        thread.start()
    for _ in range(3000):
        if inside[0] == cores:
            break
        threading.Event().wait(0.01)
    assert inside[0] == cores
    assert _lock_is_free(open_reg)  # the others wait outside the lock
    open_reg.status()
    gate.set()
    for thread in threads:
        thread.join()
    assert most[0] == cores
    open_reg.close()


# --- 6. Certificates: exact validity, never past the CA (LIFE-7.1, LIFE-7.6) --


def short_lived_ca(days: int) -> ca.CA:
    """A CA whose own certificate ends ``days`` after START."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Short-lived CA")])
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(START - timedelta(days=1))
        .not_valid_after(START + timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return ca.CA(key, certificate)


def test_a_certificate_lasts_exactly_its_validity_from_its_not_before(open_reg):
    """Proves LIFE-7.1-TIMES: notAfter = notBefore + the validity, to the second."""
    admitted = approved(open_reg, csr_request("sensor-0001"))
    certificate = x509.load_pem_x509_certificate(admitted.body["certificate"].encode())
    assert certificate.not_valid_after_utc - certificate.not_valid_before_utc == timedelta(days=365)


def test_no_certificate_outlives_its_ca(clock):
    """Proves LIFE-7.6-CA-EXPIRY: on the CA's last days a certificate ends with the CA."""
    authority = short_lived_ca(days=100)
    reg = registry.Registry(clock=clock, ca=authority, settings=FAST)
    reg.unlock()
    admitted = approved(reg, csr_request("sensor-0001"))
    certificate = x509.load_pem_x509_certificate(admitted.body["certificate"].encode())
    assert certificate.not_valid_after_utc == authority.not_after == START + timedelta(days=100)
    certificate.verify_directly_issued_by(authority.certificate)
    server = authority.issue_server_certificate(START)
    assert x509.load_pem_x509_certificate(server.certificate_pem.encode()).not_valid_after_utc == authority.not_after
    reg.close()


def test_an_expired_ca_issues_nothing_and_says_when_it_ended(clock):
    """Proves LIFE-7.6-CA-EXPIRY: an approval that needs a certificate is 503, and nothing changes."""
    authority = short_lived_ca(days=10)
    reg = registry.Registry(clock=clock, ca=authority, settings=dataclasses.replace(FAST, retention=timedelta(days=30)))
    reg.unlock()
    key = make_key()
    admitted = approved(reg, csr_request("sensor-0001", key))
    assert reg.register(csr_request("sensor-0002")).status == 202
    assert reg.register(password_request("sensor-0003")).status == 202
    clock.now = authority.not_after
    before = snapshot(reg)

    with pytest.raises(registry.CaExpired) as refused:
        reg.approve("sensor-0002")
    assert (refused.value.status, refused.value.code) == (503, "ca_expired")
    assert authority.not_after.isoformat() in refused.value.message
    assert snapshot(reg) == before
    with pytest.raises(registry.Unauthorized, match="expired"):  # what it issued ended with it
        reg.renew(certificate_der(admitted.body["certificate"]), {"csr": make_csr("sensor-0001", key)})
    assert reg.approve("sensor-0003")["username"] == "sensor-0003"  # a password needs no CA
    reg.close()


@pytest.mark.parametrize(
    ("days_left", "expected"),
    [(3000, None), (200, "ends in 200 days"), (0, "expired")],
)
def test_the_ca_says_when_it_ends_too_soon(days_left: int, expected: str | None) -> None:
    """Proves LIFE-7.6-CA-EXPIRY: the start warns when the CA has less than one certificate validity left."""
    authority = short_lived_ca(days=days_left)
    warning = authority.validity_warning(START)
    if expected is None:
        assert warning is None
    else:
        assert expected in warning
        assert authority.not_after.isoformat() in warning


@pytest.mark.parametrize(("days_later", "said"), [(3400, "ends in"), (3700, "expired at")])
def test_the_start_says_when_the_ca_ends_too_soon_or_has_ended(tmp_path, caplog, days_later: int, said: str) -> None:
    """Proves LIFE-7.6-CA-EXPIRY: the server's start warns of a CA near its end, and says when it has ended."""
    ca.CA.load_or_create(tmp_path, START)
    with (
        caplog.at_level(logging.WARNING, logger="registry.server"),
        serve(tmp_path, clock=FakeClock(START + timedelta(days=days_later))),
    ):
        pass
    [warning] = [record.getMessage() for record in caplog.records if "the registry's CA" in record.getMessage()]
    assert said in warning
