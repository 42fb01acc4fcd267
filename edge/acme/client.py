"""The ACME protocol shell: one account for the fleet, one order per call, challenges published.

`AcmeClient.issue(name, csr_pem)` runs one order with the `acme` library (`ClientV2`): new
order, a challenge per pending authorization, answer, poll, finalize, download. It knows nothing
of locks, caps or backoff; `edge.acme.issuer` decides when to call it and for which name.

- **Account**: its private key (a P-256 JWK) lives in Consul KV at `P/_acme/account`, so every
  edge signs with the same account. The first edge to need one writes a new key with a
  create-only CAS; an edge that loses that race uses the winner's key. Registering an existing
  key answers with the existing account, so every edge registers at start without creating a
  second account.
- **HTTP-01**: the key authorization goes to `P/_acme/challenges/<token>`, which every edge
  serves at `/.well-known/acme-challenge/<token>`; after `http_propagation_wait` seconds the
  challenge is answered, whichever edge the CA then reaches. **DNS-01** (wildcards): a TXT
  record through RFC 2136 (`edge.acme.dns`). Both are removed when the order ends.
- **Errors** come out as two types: `AcmeUnavailable` (server unreachable, 5xx, out of nonces:
  nobody's fault, retry soon) and `OrderFailed` (this name's order failed: validation, a
  refused identifier, a rate limit, a timeout: back off this name).
- Pebble rejects 5 % of good nonces on purpose and real CAs may too: every signed request is
  retried on `badNonce` a few times (the library alone retries once).

The account key and certificate keys never reach a log line; the library's own debug output
carries only public parts (JWS payloads, CSRs, certificates).
"""

from __future__ import annotations

import datetime
import json
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import josepy as jose
import requests
from acme import challenges, errors, messages
from acme.client import ClientNetwork, ClientV2
from cryptography.hazmat.primitives.asymmetric import ec

from edge.acme.dns import Rfc2136, challenge_name
from edge.consul.kv import ConsulKV, KVUnavailable

log = logging.getLogger("edge.acme")

USER_AGENT = "haproxy-consul-edge"
NONCE_ATTEMPTS = 4          # each is the library's own try-and-retry: up to 8 signed POSTs
NETWORK_TIMEOUT = 30


class AcmeUnavailable(Exception):
    """The ACME server did not answer usefully; retry later, no name is to blame."""


class OrderFailed(Exception):
    """This order failed (the CA refused, validation failed, it timed out): back off this name."""


class Stopped(Exception):
    """The issuer was asked to stop in the middle of an order."""


def account_key_path(prefix: str) -> str:
    return f"{prefix}/_acme/account"


def challenge_key(prefix: str, token: str) -> str:
    return f"{prefix}/_acme/challenges/{token}"


class _Network(ClientNetwork):
    """The library's network with more patience for `badNonce`, which RFC 8555 says to retry."""

    def post(self, *args, **kwargs):
        for attempt in range(NONCE_ATTEMPTS):
            try:
                return super().post(*args, **kwargs)
            except messages.Error as exc:
                if exc.code != "badNonce" or attempt == NONCE_ATTEMPTS - 1:
                    raise
                log.debug("badNonce twice in a row; trying again")
        raise AssertionError("unreachable")


@dataclass(frozen=True)
class Account:
    key: jose.JWK
    regr: messages.RegistrationResource


class AcmeClient:
    """Orders certificates from one ACME directory with the fleet's account."""

    def __init__(self, kv: ConsulKV, prefix: str, directory: str, email: str | None, ca_bundle: Path | None,
                 dns: Rfc2136 | None, stop: threading.Event, http_propagation_wait: float = 1.0,
                 dns_propagation_wait: float = 2.0, order_timeout: float = 120.0):
        self.kv, self.prefix, self.directory_url, self.email = kv, prefix, directory, email
        self.verify: bool | str = str(ca_bundle) if ca_bundle else True
        self.dns, self.stop = dns, stop
        self.http_wait, self.dns_wait, self.order_timeout = http_propagation_wait, dns_propagation_wait, order_timeout
        self._lock = threading.Lock()
        self._directory: messages.Directory | None = None
        self._account: Account | None = None
        self._local = threading.local()

    # --- account ---------------------------------------------------------------------------------
    def _net(self, key: jose.JWK | None, regr: messages.RegistrationResource | None) -> ClientNetwork:
        return _Network(key, account=regr, alg=jose.ES256, verify_ssl=self.verify, user_agent=USER_AGENT,
                        timeout=NETWORK_TIMEOUT)

    def _fleet_key(self) -> jose.JWK:
        """The fleet's account key from KV, or a new one stored there (create-only)."""
        key_path = account_key_path(self.prefix)
        for _ in range(3):
            found = self.kv.get(key_path)
            if found is not None:
                try:
                    return jose.JWK.from_json(json.loads(found[1])["key"])
                except (ValueError, KeyError, TypeError, jose.DeserializationError) as exc:
                    # Never overwrite it: an operator has to look (it may be a real account).
                    raise OrderFailed(f"{key_path} is not an account this program wrote ({type(exc).__name__})") \
                        from None
            key = jose.JWKEC(key=ec.generate_private_key(ec.SECP256R1()))
            doc = {"key": key.to_json(), "email": self.email, "directory": self.directory_url}
            if self.kv.put(key_path, json.dumps(doc), cas=0):
                log.info("ACME: new account key stored at %s (one account for the whole fleet)", key_path)
                return key
        raise AcmeUnavailable(f"{key_path} kept changing under us")

    def _ensure_account(self) -> Account:
        with self._lock:
            if self._account is not None:
                return self._account
            try:
                if self._directory is None:
                    self._directory = ClientV2.get_directory(self.directory_url, self._net(None, None))
                key = self._fleet_key()
                client = ClientV2(self._directory, self._net(key, None))
                reg = messages.NewRegistration.from_data(email=self.email, terms_of_service_agreed=True)
                try:
                    regr = client.new_account(reg)
                    log.info("ACME: account registered at %s", regr.uri)
                except errors.ConflictError as exc:     # this key already has an account: use it
                    regr = messages.RegistrationResource(uri=exc.location, body=messages.Registration())
                    log.info("ACME: using the fleet's account %s", regr.uri)
            except (KVUnavailable, OrderFailed, AcmeUnavailable):
                raise
            except Exception as exc:
                err = _classify(exc)
                if err is None:
                    raise
                raise err from exc
            self._account = Account(key, regr)
            return self._account

    def prepare(self) -> None:
        """Fetch the directory and register the fleet's account, once; AcmeUnavailable if down."""
        self._ensure_account()

    def _client(self) -> tuple[ClientV2, Account]:
        """This thread's client (a requests session is not shared between threads)."""
        account = self._ensure_account()
        cached = getattr(self._local, "client", None)
        if cached is None or cached[1] is not account:
            assert self._directory is not None
            cached = (ClientV2(self._directory, self._net(account.key, account.regr)), account)
            self._local.client = cached
        return cached

    def forget_account(self) -> None:
        """After the server says the account does not exist (a reset test CA): register again."""
        with self._lock:
            self._account = None

    # --- orders -----------------------------------------------------------------------------------
    def issue(self, name: str, csr_pem: bytes) -> str:
        """One order for `name` (whose key signed `csr_pem`); the full chain PEM on success."""
        client, account = self._client()
        cleanups: list[Callable[[], None]] = []
        try:
            orderr = client.new_order(csr_pem)
            answers = []
            for authzr in orderr.authorizations:
                if authzr.body.status == messages.STATUS_VALID:  # reused authorization
                    continue
                challb, cleanup = self._publish(authzr, account.key)
                cleanups.append(cleanup)
                answers.append(challb)
            if answers:
                dns_used = any(isinstance(c.chall, challenges.DNS01) for c in answers)
                self._sleep(max(self.http_wait, self.dns_wait if dns_used else 0.0))
            for challb in answers:
                client.answer_challenge(challb, challb.chall.response(account.key))
            deadline = datetime.datetime.now() + datetime.timedelta(seconds=self.order_timeout)
            self._wait_authorizations(client, orderr, deadline)
            orderr = client.finalize_order(orderr, deadline)
            return orderr.fullchain_pem
        except (Stopped, OrderFailed, AcmeUnavailable, KVUnavailable):
            raise
        except Exception as exc:
            err = _classify(exc)
            if err is None:
                raise
            if isinstance(exc, messages.Error) and exc.code == "accountDoesNotExist":
                self.forget_account()
            raise err from exc
        finally:
            for cleanup in cleanups:
                cleanup()

    def _publish(self, authzr: messages.AuthorizationResource, key: jose.JWK):
        """Publish the challenge this name is proved with; returns it and how to remove it."""
        identifier = authzr.body.identifier.value
        wildcard = bool(authzr.body.wildcard)
        wanted = challenges.DNS01 if wildcard else challenges.HTTP01
        challb = next((c for c in authzr.body.challenges if isinstance(c.chall, wanted)), None)
        if challb is None:
            raise OrderFailed(f"the CA offers no {wanted.typ} challenge for {identifier}")
        if wanted is challenges.DNS01:
            if self.dns is None:
                raise OrderFailed(f"*.{identifier} needs DNS-01: set --acme-dns-rfc2136 and its TSIG key")
            record, value = challenge_name(identifier), challb.chall.validation(key)
            dns = self.dns
            try:
                dns.add_txt(record, value)
            except Exception as exc:
                raise OrderFailed(str(exc)) from exc

            def cleanup():
                try:
                    dns.delete_txt(record, value)
                except Exception as exc:  # noqa: BLE001 - a stale TXT record is harmless; say so
                    log.warning("ACME: could not remove TXT %s: %s", record, exc)
            return challb, cleanup
        key_path = challenge_key(self.prefix, challb.chall.encode("token"))
        self.kv.put(key_path, challb.chall.key_authorization(key))

        def cleanup():
            try:
                self.kv.delete(key_path)
            except Exception as exc:  # noqa: BLE001 - a stale token is harmless; say so
                log.warning("ACME: could not remove %s: %s", key_path, exc)
        return challb, cleanup

    def _wait_authorizations(self, client: ClientV2, orderr: messages.OrderResource,
                             deadline: datetime.datetime) -> None:
        """Poll each authorization until valid; stop promptly when asked (unlike the library's
        own polling, which sleeps in a loop)."""
        for authzr in orderr.authorizations:
            interval = 0.2
            while authzr.body.status in (messages.STATUS_PENDING, messages.STATUS_PROCESSING):
                if datetime.datetime.now() > deadline:
                    raise OrderFailed(f"{authzr.body.identifier.value}: not validated within {self.order_timeout:g} s")
                self._sleep(interval)
                interval = min(2.0, interval * 1.5)
                authzr, _ = client.poll(authzr)
            if authzr.body.status != messages.STATUS_VALID:
                problems = [str(c.error) for c in authzr.body.challenges if c.error is not None]
                raise OrderFailed(f"{authzr.body.identifier.value}: authorization {authzr.body.status}: "
                                  + ("; ".join(problems) or "no reason given"))

    def _sleep(self, seconds: float) -> None:
        if self.stop.wait(seconds):
            raise Stopped()


def _classify(exc: Exception) -> Exception | None:
    """The library's and requests' errors as ours: whose fault, and is it worth retrying soon."""
    if isinstance(exc, requests.RequestException):
        return AcmeUnavailable(f"{type(exc).__name__}: {exc}")
    if isinstance(exc, messages.Error):
        if exc.code in ("badNonce", "serverInternal", "accountDoesNotExist"):
            return AcmeUnavailable(str(exc))
        return OrderFailed(str(exc))
    if isinstance(exc, errors.NonceError):
        return AcmeUnavailable(str(exc))
    if isinstance(exc, errors.ClientError) and exc.args and isinstance(exc.args[0], requests.Response):
        response = exc.args[0]
        if response.status_code >= 500 or response.status_code == 429:
            return AcmeUnavailable(f"HTTP {response.status_code} from {response.url}")
        return OrderFailed(f"HTTP {response.status_code} from {response.url}")
    if isinstance(exc, errors.ValidationError | errors.IssuanceError | errors.TimeoutError | errors.Error):
        return OrderFailed(f"{type(exc).__name__}: {exc}")
    if isinstance(exc, ValueError | jose.DeserializationError):
        return OrderFailed(f"unexpected answer from the CA: {type(exc).__name__}: {exc}")
    return None   # not the CA's answer: a bug of ours, raised as it is
