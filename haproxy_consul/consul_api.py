"""How the three programs reach Consul: one settings value, its options, and the client factories.

Operators configure Consul clients with the variables of Consul's own CLI, so every program
reads the same ones (each also has a flag): `CONSUL_HTTP_ADDR`, `CONSUL_HTTP_SSL`,
`CONSUL_HTTP_SSL_VERIFY`, `CONSUL_CACERT`, `CONSUL_CAPATH`, `CONSUL_CLIENT_CERT`,
`CONSUL_CLIENT_KEY`, `CONSUL_TLS_SERVER_NAME`, `CONSUL_HTTP_TOKEN`, `CONSUL_HTTP_TOKEN_FILE`.
Precedence as in Consul's CLI (command/flags/http.go, api.NewClient): a flag wins over its
variable; a token file (flag or variable) wins over a token unless the file is empty; `https://`
in the address or `CONSUL_HTTP_SSL=true` selects TLS, and an `http://` address never turns off
TLS that was asked for explicitly.

`add_options` puts the options on a program's parser, `from_args` turns them into a frozen
`ConsulSettings`; the factories build clients from it:
- `client(settings)`: a py-consul client (the registrator's agent calls, the edge's KV and sessions);
- `ConsulHTTP(settings)`: raw reads that keep Consul's response headers (index, staleness, ACL
  filtering), for the edge's watcher and fleet and the registrator's watch on its agent (on urllib3's
  connection pool, no requests session);
- `child_env(settings)`: the same settings as variables for a `consul` subprocess (bootstrap's
  `consul leave`), so no secret ever goes into argv.

The token is never logged: it is not in any repr, and a token file is read again when it changes
(rotated by a sidecar), keeping the last good token if it becomes unreadable.
"""

from __future__ import annotations

import json
import logging
import os
import ssl
import threading
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import consul
import requests
import urllib3
from requests.adapters import HTTPAdapter

from haproxy_consul.options import EnvParser

log = logging.getLogger("consul")

DEFAULT_ADDRESS = "http://127.0.0.1:8500"
# Every variable a `consul` subprocess might read for its HTTP client; child_env sets or clears each.
CLIENT_VARIABLES = ("CONSUL_HTTP_ADDR", "CONSUL_HTTP_SSL", "CONSUL_HTTP_SSL_VERIFY", "CONSUL_CACERT",
                    "CONSUL_CAPATH", "CONSUL_CLIENT_CERT", "CONSUL_CLIENT_KEY", "CONSUL_TLS_SERVER_NAME",
                    "CONSUL_HTTP_TOKEN", "CONSUL_HTTP_TOKEN_FILE")


@dataclass(frozen=True)
class ConsulAddress:
    scheme: str
    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"


def parse_address(url: str, ssl: bool = False) -> ConsulAddress:
    """`host:port`, `http://host:port` or `https://host:port`; `ssl` makes it https whatever it says."""
    text = url.strip()
    if "//" not in text:
        text = "http://" + text
    parts = urllib.parse.urlsplit(text)
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"Consul address {url!r}: scheme must be http or https")
    try:
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"Consul address {url!r}: {exc}") from None
    if not parts.hostname:
        raise ValueError(f"Consul address {url!r} has no host")
    scheme = "https" if ssl else parts.scheme
    return ConsulAddress(scheme, parts.hostname, port or (443 if scheme == "https" else 8500))


def parse_bool(value: str | bool) -> bool:
    """Go's strconv.ParseBool, which Consul uses for CONSUL_HTTP_SSL and CONSUL_HTTP_SSL_VERIFY."""
    if isinstance(value, bool):
        return value
    if value in ("1", "t", "T", "TRUE", "true", "True"):
        return True
    if value in ("0", "f", "F", "FALSE", "false", "False"):
        return False
    raise ValueError(f"{value!r} is not true or false")


@dataclass(frozen=True)
class TLS:
    """Client-side TLS toward Consul; paths are absolute. Unused unless the address is https."""

    ca_file: str | None = None
    ca_path: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    server_name: str | None = None
    verify: bool = True


@dataclass(frozen=True)
class ConsulSettings:
    address: ConsulAddress = field(default_factory=lambda: parse_address(DEFAULT_ADDRESS))
    token: str | None = field(default=None, repr=False)   # an ACL secret: never in logs
    token_file: str | None = None
    tls: TLS = TLS()
    token_in_argv: bool = field(default=False, compare=False)

    def __str__(self) -> str:
        return str(self.address)

    def describe(self) -> str:
        """One log-safe line: where, how (TLS files) and whence the token, never the token."""
        parts = [str(self.address)]
        if self.address.scheme == "https":
            t = self.tls
            parts += [f"CA {t.ca_file or t.ca_path or 'system'}"]
            parts += [f"client cert {t.cert_file}"] if t.cert_file else []
            parts += [f"server name {t.server_name}"] if t.server_name else []
            parts += ["certificate NOT verified"] if not t.verify else []
        if self.token_file:
            parts.append(f"token from {self.token_file}")
        elif self.token:
            parts.append("token from " + ("the command line" if self.token_in_argv else "CONSUL_HTTP_TOKEN"))
        else:
            parts.append("no token (the agent's default token applies)")
        return ", ".join(parts)

    def warnings(self) -> tuple[str, ...]:
        out = []
        if self.token_in_argv:
            out.append("the Consul token was given with --token: it shows in `ps`; "
                       "use --token-file or CONSUL_HTTP_TOKEN_FILE instead")
        t = self.tls
        if self.address.scheme == "http" and (t.ca_file or t.ca_path or t.cert_file or t.server_name):
            out.append(f"TLS settings are ignored: {self.address} is plain HTTP "
                       "(use https:// or CONSUL_HTTP_SSL=true)")
        return tuple(out)


def add_options(p: EnvParser, address_flag: str = "--consul", address_default: str | None = DEFAULT_ADDRESS) -> None:
    """The Consul client options, each with the variable Consul's own CLI reads."""
    g = p.add_argument_group("Consul client (as Consul's own CLI: a flag wins over its variable)")
    p.option(address_flag, env="CONSUL_HTTP_ADDR", default=address_default, dest="consul_addr", group=g,
             help="Consul HTTP address: host:port, http://host:port or https://host:port")
    p.option("--consul-ssl", env="CONSUL_HTTP_SSL", default=False, type=parse_bool, nargs="?", const=True,
             metavar="BOOL", group=g, help="talk TLS to Consul whatever the address says")
    p.option("--consul-ssl-verify", env="CONSUL_HTTP_SSL_VERIFY", default=True, type=parse_bool, metavar="BOOL",
             group=g, help="false: do not verify Consul's certificate (testing only)")
    p.option("--consul-cacert", env="CONSUL_CACERT", group=g, help="CA certificate file for Consul's HTTPS")
    p.option("--consul-capath", env="CONSUL_CAPATH", group=g,
             help="directory of CA certificate files for Consul's HTTPS")
    p.option("--consul-client-cert", env="CONSUL_CLIENT_CERT", group=g,
             help="client certificate (for agents with verify_incoming)")
    p.option("--consul-client-key", env="CONSUL_CLIENT_KEY", group=g, help="key of the client certificate")
    p.option("--consul-tls-server-name", env="CONSUL_TLS_SERVER_NAME", group=g,
             help="name to send (SNI) and to verify in Consul's certificate")
    p.option("--token", env="CONSUL_HTTP_TOKEN", group=g,
             help="Consul ACL token (never logged; visible in `ps`: prefer --token-file)")
    p.option("--token-file", env="CONSUL_HTTP_TOKEN_FILE", group=g,
             help="file holding the Consul ACL token, read again when it changes; wins over --token")


def from_args(p: EnvParser, args, argv: Sequence[str] = ()) -> ConsulSettings:
    """The settings from parsed options; a bad value exits 2 through `p.error` with the reason."""
    try:
        settings = build(args.consul_addr or DEFAULT_ADDRESS, ssl=args.consul_ssl, verify=args.consul_ssl_verify,
                         ca_file=args.consul_cacert, ca_path=args.consul_capath, cert_file=args.consul_client_cert,
                         key_file=args.consul_client_key, server_name=args.consul_tls_server_name,
                         token=args.token, token_file=args.token_file,
                         token_in_argv=any(a == "--token" or a.startswith("--token=") for a in argv))
    except ValueError as exc:
        p.error(str(exc))
    return settings


def build(address: str, *, ssl: bool = False, verify: bool = True, ca_file: str | None = None,
          ca_path: str | None = None, cert_file: str | None = None, key_file: str | None = None,
          server_name: str | None = None, token: str | None = None, token_file: str | None = None,
          token_in_argv: bool = False) -> ConsulSettings:
    """Validated settings (files readable, key pair complete); ValueError says what is wrong."""
    if bool(cert_file) != bool(key_file):
        raise ValueError("a Consul client certificate needs both --consul-client-cert and --consul-client-key")
    absolute = {k: str(Path(v).absolute()) if v else None
                for k, v in dict(ca_file=ca_file, ca_path=ca_path, cert_file=cert_file, key_file=key_file,
                                 token_file=token_file).items()}
    tls = TLS(absolute["ca_file"], absolute["ca_path"], absolute["cert_file"], absolute["key_file"],
              server_name or None, verify)
    settings = ConsulSettings(parse_address(address, ssl=ssl), token or None, absolute["token_file"], tls,
                              token_in_argv=bool(token and token_in_argv))
    if settings.address.scheme == "https":
        ssl_context(tls)      # fails now, with the reason, rather than at the first request
    if settings.token_file:
        read_token_file(settings.token_file)
    return settings


def read_token_file(path: str) -> str:
    try:
        return Path(path).read_text().strip()
    except OSError as exc:
        raise ValueError(f"Consul token file: {exc}") from None


# --- TLS ---------------------------------------------------------------------------------------
def ssl_context(tls: TLS) -> ssl.SSLContext:
    """The client context: the given CAs only (else the system's), the client pair if any.

    `CONSUL_CAPATH` is read as Consul reads it: every file under the directory must hold PEM
    certificates (no OpenSSL hash links needed).
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        if tls.ca_file:
            ctx.load_verify_locations(cafile=tls.ca_file)
        if tls.ca_path:
            files = sorted(p for p in Path(tls.ca_path).rglob("*") if p.is_file())
            if not Path(tls.ca_path).is_dir():
                raise ValueError(f"Consul CA path {tls.ca_path} is not a directory")
            for path in files:
                try:
                    ctx.load_verify_locations(cadata=path.read_text())
                except (ssl.SSLError, UnicodeDecodeError) as exc:
                    raise ValueError(f"Consul CA path: no PEM certificate in {path} ({exc})") from None
        if not tls.ca_file and not tls.ca_path:
            ctx.load_default_certs()
        if tls.cert_file:
            ctx.load_cert_chain(tls.cert_file, tls.key_file)
    except (OSError, ssl.SSLError) as exc:
        raise ValueError(f"Consul TLS files: {exc}") from None
    if not tls.verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


class _TLSAdapter(HTTPAdapter):
    """Every HTTPS connection uses our context and server name; requests' own CA handling is off
    (it would load certifi into the shared context, trusting public CAs beside the operator's)."""

    def __init__(self, tls: TLS):
        self.tls = tls
        self.context = ssl_context(tls)
        super().__init__()

    def build_connection_pool_key_attributes(self, request, verify, cert=None):
        host_params, _ = super().build_connection_pool_key_attributes(request, verify, cert)
        pool = {"ssl_context": self.context, "cert_reqs": "CERT_REQUIRED" if self.tls.verify else "CERT_NONE"}
        if self.tls.server_name:
            pool["server_hostname"] = self.tls.server_name
        if not self.tls.verify:
            pool["assert_hostname"] = False
        return host_params, pool

    def cert_verify(self, conn, url, verify, cert):
        """Nothing: the context already holds the CAs and the client pair."""


def session(settings: ConsulSettings) -> requests.Session:
    """A requests session for Consul (one per thread: sessions are not shared between threads)."""
    s = requests.Session()
    if settings.address.scheme == "https":
        s.mount("https://", _TLSAdapter(settings.tls))
        if not settings.tls.verify:   # asked for explicitly, and said once at start (`describe`)
            urllib3.disable_warnings(urllib3.exceptions.InsecureRequestWarning)
    return s


# --- the token ---------------------------------------------------------------------------------
class TokenSource:
    """The current token: the file's content when a file is set (read again whenever it changes),
    else the token itself."""

    def __init__(self, settings: ConsulSettings):
        self.token, self.path = settings.token, settings.token_file
        self._lock = threading.Lock()
        self._stamp: tuple | None = None
        self._from_file: str | None = None
        self._warned = False

    def current(self) -> str | None:
        if not self.path:
            return self.token
        with self._lock:
            try:
                st = os.stat(self.path)
                stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
                if stamp != self._stamp:
                    self._from_file = read_token_file(self.path)
                    if self._stamp is not None:
                        log.info("Consul token file %s changed; using its new token", self.path)
                    self._stamp, self._warned = stamp, False
            except (OSError, ValueError) as exc:
                if not self._warned:
                    log.warning("cannot read the Consul token file (%s); keeping the last token read", exc)
                    self._warned = True
            return self._from_file or self.token


# --- py-consul ---------------------------------------------------------------------------------
class _Consul(consul.Consul):
    """py-consul with our session (TLS) and token source. py-consul's constructor assigns
    `CONSUL_HTTP_TOKEN` from the process environment to `token`, overriding the settings'
    precedence: that assignment is ignored, the token always comes from `TokenSource`."""

    def __init__(self, settings: ConsulSettings, datacenter: str | None, timeout: float):
        self._tokens = TokenSource(settings)
        a = settings.address
        super().__init__(host=a.host, port=a.port, scheme=a.scheme, dc=datacenter or None,
                         connections_timeout=timeout)
        self.http.session = session(settings)

    @property
    def token(self) -> str | None:
        return self._tokens.current()

    @token.setter
    def token(self, _ignored) -> None:
        pass


def client(settings: ConsulSettings, datacenter: str | None = None, timeout: float = 10.0) -> consul.Consul:
    """A new py-consul client (one per thread: a requests session is not shared between threads)."""
    return _Consul(settings, datacenter, timeout)


def factory(settings: ConsulSettings, datacenter: str | None = None, timeout: float = 10.0
            ) -> Callable[[], consul.Consul]:
    """A zero-argument maker of clients, for code that makes one per thread (e.g. edge.consul.kv)."""
    return lambda: client(settings, datacenter, timeout)


def child_env(settings: ConsulSettings, environ: Mapping[str, str]) -> dict[str, str]:
    """`environ` with the Consul client variables replaced by these settings, for a `consul` child."""
    env = {k: v for k, v in environ.items() if k not in CLIENT_VARIABLES}
    t = settings.tls
    env["CONSUL_HTTP_ADDR"] = str(settings.address)
    env["CONSUL_HTTP_SSL"] = "true" if settings.address.scheme == "https" else "false"
    env["CONSUL_HTTP_SSL_VERIFY"] = "true" if t.verify else "false"
    for name, value in (("CONSUL_CACERT", t.ca_file), ("CONSUL_CAPATH", t.ca_path),
                        ("CONSUL_CLIENT_CERT", t.cert_file), ("CONSUL_CLIENT_KEY", t.key_file),
                        ("CONSUL_TLS_SERVER_NAME", t.server_name), ("CONSUL_HTTP_TOKEN_FILE", settings.token_file),
                        ("CONSUL_HTTP_TOKEN", settings.token)):
        if value:
            env[name] = value
    return env


# --- raw reads with Consul's headers -------------------------------------------------------------
class ConsulError(Exception):
    """Base of the errors a Consul read raises."""


class ConsulUnavailable(ConsulError):
    """No usable answer: connection refused, timeout, 5xx, a body that is not JSON. Retry later."""


class ConsulTLSError(ConsulUnavailable):
    """The TLS handshake failed (unknown CA, name mismatch, client certificate refused)."""


class ConsulRefused(ConsulError):
    """A 4xx answer: this request will not work as it is."""

    def __init__(self, status: int, path: str, text: str):
        super().__init__(f"{path}: {status} {text.strip()[:200]}")
        self.status = status


class ConsulDenied(ConsulRefused):
    """403: an ACL denies it (or the token is unknown)."""


@dataclass(frozen=True)
class Answer:
    """One read: the decoded body and what Consul's headers say about it."""

    body: object
    index: int = 0
    last_contact_ms: int = 0          # how long since the answering server heard from the leader
    known_leader: bool = True
    filtered_by_acls: bool = False    # X-Consul-Results-Filtered-By-ACLs (Consul >= 1.11)
    default_acl_policy: str = ""      # X-Consul-Default-ACL-Policy (Consul >= 1.12)


def _int(value: str | None) -> int:
    try:
        return int(value or 0)
    except ValueError:
        return 0


class ConsulHTTP:
    """GETs against the Consul HTTP API that return `Answer`s; typed errors per failure kind.

    Straight on urllib3's connection pool (shared by the threads; each long-poll holds one
    connection while it waits): requests' session machinery cost ~2 ms of CPU per answer here
    against ~0.7 ms, which is most of what a fleet follower spends per change. Environment proxy
    variables are not consulted: this talks to the local agent. `on_request(path, outcome)` is
    told of every request (`ok`, `unavailable`, `tls`, `denied`, `refused`): the edge counts them
    for its metrics.
    """

    def __init__(self, settings: ConsulSettings, datacenter: str | None = None, timeout: float = 10.0,
                 on_request: Callable[[str, str], None] | None = None):
        self.settings, self.datacenter, self.timeout = settings, datacenter, timeout
        self.base = str(settings.address)
        self.tokens = TokenSource(settings)
        self.on_request = on_request or (lambda path, outcome: None)
        a, t = settings.address, settings.tls
        if a.scheme == "https":
            tls = {"ssl_context": ssl_context(t), "cert_reqs": "CERT_REQUIRED" if t.verify else "CERT_NONE"}
            if t.server_name:
                tls.update(server_hostname=t.server_name, assert_hostname=t.server_name)
            if not t.verify:
                tls["assert_hostname"] = False
                urllib3.disable_warnings(urllib3.exceptions.InsecureRequestWarning)
            self._pool = urllib3.HTTPSConnectionPool(a.host, a.port, maxsize=256, **tls)
        else:
            self._pool = urllib3.HTTPConnectionPool(a.host, a.port, maxsize=256)

    def get(self, path: str, params: Sequence[tuple[str, str]] = (), wait: float | None = None,
            raw: bool = False) -> Answer:
        """`raw`: the body as bytes, for a caller that decodes it itself (faster, into its own types)."""
        params = list(params)
        if self.datacenter:
            params.append(("dc", self.datacenter))
        token = self.tokens.current()
        headers = {"X-Consul-Token": token} if token else {}
        # A blocking query answers after `wait` plus up to wait/16 of jitter.
        timeout = urllib3.Timeout(connect=self.timeout, read=self.timeout + (wait + wait / 16 if wait else 0))
        url = f"{path}?{urllib.parse.urlencode(params)}" if params else path
        try:
            r = self._pool.urlopen("GET", url, headers=headers, retries=False, timeout=timeout)
        except urllib3.exceptions.SSLError as exc:
            self.on_request(path, "tls")
            raise ConsulTLSError(f"TLS with Consul at {self.base} failed: {_reason(exc)}") from exc
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            self.on_request(path, "unavailable")
            raise ConsulUnavailable(f"{self.base}{path}: {_reason(exc)}") from exc
        text = lambda: r.data.decode("utf-8", "replace")  # noqa: E731 - only read on an error
        if r.status == 403:
            self.on_request(path, "denied")
            raise ConsulDenied(403, path, text())
        if 400 <= r.status < 500:
            self.on_request(path, "refused")
            raise ConsulRefused(r.status, path, text())
        if r.status != 200:
            self.on_request(path, "unavailable")
            raise ConsulUnavailable(f"{path}: {r.status} {text().strip()[:200]}")
        try:
            body = r.data if raw else json.loads(r.data) if r.data else None
        except ValueError as exc:
            self.on_request(path, "unavailable")
            raise ConsulUnavailable(f"{path}: the answer is not JSON ({exc})") from exc
        self.on_request(path, "ok")
        h = r.headers
        return Answer(body, _int(h.get("X-Consul-Index")), _int(h.get("X-Consul-LastContact")),
                      h.get("X-Consul-KnownLeader", "true") == "true",
                      h.get("X-Consul-Results-Filtered-By-ACLs", "") == "true",
                      h.get("X-Consul-Default-ACL-Policy", ""))


def _reason(exc: Exception) -> str:
    """The innermost message of a requests/urllib3 error (their outer texts repeat the URL), with a
    hint for the TLS failures an operator can fix with a setting."""
    inner: object = exc
    for _ in range(4):
        nested = getattr(inner, "reason", None) or (inner.args[0] if getattr(inner, "args", None) else None)
        if not isinstance(nested, BaseException):
            break
        inner = nested
    text = str(inner)
    for marker, hint in TLS_HINTS:
        if marker in text:
            text += f" ({hint})"
            break
    return text if len(text) < 400 else text[:400] + "..."


TLS_HINTS = (
    ("BAD_CERTIFICATE", "Consul wants a client certificate it trusts: CONSUL_CLIENT_CERT, CONSUL_CLIENT_KEY"),
    ("CERTIFICATE_REQUIRED", "Consul wants a client certificate: CONSUL_CLIENT_CERT, CONSUL_CLIENT_KEY"),
    ("Hostname mismatch", "the name Consul's certificate holds: CONSUL_TLS_SERVER_NAME"),
    ("CERTIFICATE_VERIFY_FAILED", "the CA of Consul's certificate: CONSUL_CACERT or CONSUL_CAPATH"),
    ("WRONG_VERSION_NUMBER", "is that port plain HTTP? use http:// or the agent's HTTPS port"),
)


def from_command_line(argv: Sequence[str], environ: Mapping[str, str], address_flag: str = "--consul"
                      ) -> ConsulSettings:
    """The Consul settings a program's command line and environment give, ignoring its other
    options (for `haproxy-consul health`, which reads PID 1's command line)."""
    p = EnvParser(prog="consul settings", environ=environ, add_help=False)
    add_options(p, address_flag)
    args, _ = p.parse_known_args(list(argv))
    return from_args(p, args, argv)
