"""Container inspect data → Consul registrations. Pure: no Docker, no Consul, no I/O.

`container_from_inspect()` normalises the Docker Engine's inspect JSON into a frozen
`Container` at the boundary; `registrations()` maps it to sorted, frozen `Registration`s with
gliderlabs/registrator's rules (bridge/bridge.go `newService`, bridge/util.go
`serviceMetaData`, consul/consul.go `buildCheck`): one service per published port, named after
the image's base name (`-<port>` appended when a container publishes several), ID
`<host>:<container>:<port>`, and the `SERVICE_*` settings from labels (which win) and
environment, where `SERVICE_<port>_<KEY>` replaces `SERVICE_<KEY>` for that port. Container
names, labels and env come from whoever can run a container: every value is checked, and a bad
one is reported as a problem and ignored, never passed on.

A container with a Docker `HEALTHCHECK` gets a TTL check whose status the loop keeps equal to
Docker's (`docker_health()`), unless it sets `SERVICE_CHECK_DOCKER_HEALTH=false`.
"""

from __future__ import annotations

import ipaddress
import re
import signal
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

NAME_RE = re.compile(r"[^a-z0-9-]+")
META_KEY_RE = re.compile(r"^[a-z0-9_-]{1,128}$")      # Consul's rule, on keys we have lower-cased
DURATION_RE = re.compile(r"^(\d+(\.\d+)?(ns|us|µs|ms|s|m|h))+$")   # Go's time.ParseDuration
METHOD_RE = re.compile(r"^[A-Z]{1,16}$")
TAG_MAX, META_VALUE_MAX, NAME_MAX, SCRIPT_MAX, OUTPUT_MAX = 255, 512, 63, 1024, 4000
META_MAX = 64                                          # Consul refuses a service with more meta pairs
TRUE = ("1", "true", "yes", "on")
FALSE = ("0", "false", "no", "off")
STATUSES = ("passing", "warning", "critical")
# Settings the registrator acts on; every other SERVICE_<KEY> becomes meta (as gliderlabs' Attrs).
INTERPRETED = ("name", "id", "tags", "ignore")
OUR_META = ("container_id", "container_name", "container_port", "host", "image")
# Signals that end a process unless it handles them; with the container's own STOPSIGNAL they
# are what `docker stop`, `docker kill` and `docker rm -f` send.
STOPPING = (signal.SIGTERM, signal.SIGKILL, signal.SIGINT, signal.SIGQUIT)
TTL_KINDS = ("ttl", "heartbeat", "docker")
NOTES_PREFIX = "haproxy-consul registrator:"


@dataclass(frozen=True, order=True)
class Port:
    private: int
    proto: str                 # "tcp" or "udp"
    host_ip: str = ""
    host_port: int | None = None


@dataclass(frozen=True)
class Container:
    id: str
    name: str
    image: str
    running: bool
    paused: bool
    health: str | None         # Docker HEALTHCHECK status: None, "starting", "healthy", "unhealthy"
    ip: str
    ports: tuple[Port, ...]
    env: tuple[tuple[str, str], ...]
    labels: tuple[tuple[str, str], ...]
    health_output: str = ""    # output of Docker's last finished probe
    stop_signal: str = ""      # the image's STOPSIGNAL, as Docker reports it (`SIGQUIT`, `3`, ...)
    stop_timeout: int = 10     # seconds `docker stop` waits before SIGKILL

    def settings(self, private: int) -> tuple[dict[str, str], frozenset[str]]:
        """The SERVICE_* settings of one port, keys lower-cased without the prefix, and which of
        them were set for this port. As gliderlabs' `serviceMetaData`: `SERVICE_<port>_<KEY>`
        replaces `SERVICE_<KEY>` for that port; for the same key a label wins over env."""
        wide: dict[str, str] = {}
        mine: dict[str, str] = {}
        for source in (self.env, self.labels):      # labels second: they win
            for key, value in source:
                if not key.startswith("SERVICE_") or key == "SERVICE_":
                    continue
                rest = key[len("SERVICE_"):].lower()
                head, sep, tail = rest.partition("_")
                if head.isdigit() and sep and tail:
                    if head == str(private):
                        mine[tail] = value
                else:
                    wide[rest] = value
        return {**wide, **mine}, frozenset(mine)


@dataclass(frozen=True, order=True)
class Check:
    """One Consul check of a service.

    `kind`: `http` (also https), `tcp`, `grpc`, `script`, `ttl` (the container passes it itself),
    `heartbeat` (`--ttl`: the registrator passes it while it runs), `docker` (a TTL check the
    registrator keeps equal to Docker's HEALTHCHECK status)."""

    kind: str
    target: str = ""           # URL, host:port or shell command
    interval: str = ""
    timeout: str = ""
    ttl: str = ""
    method: str = ""
    tls_skip_verify: bool = False
    grpc_use_tls: bool = False
    initial_status: str = ""
    deregister_after: str = ""

    @property
    def consul_type(self) -> str:
        return "ttl" if self.kind in TTL_KINDS else self.kind

    def check_id(self, service_id: str) -> str:
        return f"service:{service_id}" + (":docker-health" if self.kind == "docker" else "")

    @property
    def notes(self) -> str:
        """The definition in words, registered as the check's notes. Consul 1.8's agent API lists a
        check's type and notes but not its definition, so the notes are what reconciliation
        compares to see a changed check (and what a human sees in Consul's UI)."""
        words = [self.kind]
        for key in ("method", "target", "interval", "timeout", "ttl", "initial_status", "deregister_after"):
            if getattr(self, key):
                words.append(f"{key.replace('_', '-')}={getattr(self, key)}")
        words += [w for w, on in (("grpc-tls", self.grpc_use_tls), ("tls-skip-verify", self.tls_skip_verify)) if on]
        return f"{NOTES_PREFIX} {' '.join(words)}"[:1024]


@dataclass(frozen=True)
class Health:
    """What a `docker` check should say: Consul status and Docker's last probe output."""

    status: str
    output: str


@dataclass(frozen=True, order=True)
class Registration:
    id: str
    name: str
    address: str
    port: int
    tags: tuple[str, ...] = ()
    meta: tuple[tuple[str, str], ...] = ()
    checks: tuple[Check, ...] = ()
    # Changes on every Docker probe: never part of "is this registration the same".
    health: Health | None = field(default=None, compare=False)

    @property
    def container_id(self) -> str:
        return dict(self.meta).get("container_id", "")

    def check_signature(self) -> tuple[tuple[str, str, str], ...]:
        """(check ID, Consul type, notes) of each check: what the agent can show of them."""
        return tuple(sorted((c.check_id(self.id), c.consul_type, c.notes) for c in self.checks))


@dataclass(frozen=True)
class Params:
    """What the mapping needs from the settings and the agent."""

    hostname: str
    ip: str | None             # --ip, else decided per port (host IP of the binding, else agent's)
    agent_ip: str
    internal: bool = False
    tags: tuple[str, ...] = ()
    ttl: int | None = None
    explicit: bool = False     # only ports with a SERVICE_NAME / SERVICE_<port>_NAME
    script_checks: bool = False
    health_ttl: str = "60s"    # TTL of the Docker health checks the registrator keeps updated


def clean(text: str, limit: int) -> str:
    """Drop control characters (newlines included) and bound the length."""
    return "".join(ch for ch in text if ch.isprintable())[:limit]


def service_name(raw: str) -> str:
    """A safe Consul/route name: lower case, `a-z 0-9 -`, at most 63 characters."""
    return NAME_RE.sub("-", raw.lower()).strip("-")[:NAME_MAX].strip("-")


def image_base(image: str) -> str:
    """`quay.io/acme/nginx:1.25` and `nginx@sha256:…` → `nginx`."""
    base = image.split("@", 1)[0].rsplit("/", 1)[-1]
    return base.split(":", 1)[0]


def split_tags(raw: str | None) -> list[str]:
    """Comma-separated tags where `\\,` is a literal comma (gliderlabs' `recParseEscapedComma`);
    pieces are stripped, cleaned, and dropped when empty."""
    pieces, current, text, i = [], [], raw or "", 0
    while i < len(text):
        if text[i] == "\\" and text[i + 1:i + 2] == ",":
            current.append(",")
            i += 2
            continue
        if text[i] == ",":
            pieces.append("".join(current))
            current = []
        else:
            current.append(text[i])
        i += 1
    pieces.append("".join(current))
    return [t for t in (clean(p.strip(), TAG_MAX) for p in pieces) if t]


def stopping_signal(sig: str, stop_signal: str = "") -> bool:
    """Whether a `kill` event's signal (Docker reports its number) ends the container: SIGTERM,
    SIGKILL, SIGINT, SIGQUIT, or the container's own STOPSIGNAL. SIGHUP, SIGUSR1 and the like
    usually ask a server to reload, not to stop."""
    number = _signal_number(sig)
    return number is not None and (number in STOPPING or number == _signal_number(stop_signal))


def _signal_number(name: str) -> int | None:
    text = name.strip().upper()
    if text.isdigit():
        return int(text)
    try:
        return int(signal.Signals[text if text.startswith("SIG") else f"SIG{text}"])
    except KeyError:
        return None


def _port(value: object) -> int | None:
    try:
        port = int(str(value))
    except ValueError:
        return None
    return port if 0 < port < 65536 else None


def container_from_inspect(attrs: Mapping) -> Container:
    """Docker's inspect JSON → Container (missing or odd fields become empty values)."""
    config = attrs.get("Config") or {}
    state = attrs.get("State") or {}
    net = attrs.get("NetworkSettings") or {}
    host_config = attrs.get("HostConfig") or {}
    ports = []
    for key, bindings in (net.get("Ports") or {}).items():
        private, _, proto = str(key).partition("/")
        if _port(private) is None:
            continue
        for b in bindings or [None]:
            host_port = _port(b.get("HostPort")) if isinstance(b, dict) else None
            ports.append(Port(int(private), proto or "tcp", (b or {}).get("HostIp") or "", host_port))
    if host_config.get("NetworkMode") == "host":
        # The host's own network: no bindings, each exposed port is a host port (as gliderlabs).
        for key in config.get("ExposedPorts") or {}:
            private, _, proto = str(key).partition("/")
            if _port(private) is not None:
                ports.append(Port(int(private), proto or "tcp", "", int(private)))
    networks = [n for n in (net.get("Networks") or {}).values() if isinstance(n, dict)]
    ip = net.get("IPAddress") or next((n["IPAddress"] for n in networks if n.get("IPAddress")), "")
    env = []
    for item in config.get("Env") or ():
        key, sep, value = str(item).partition("=")
        if sep:
            env.append((key, value))
    health = state.get("Health") or {}
    probes = [p for p in health.get("Log") or () if isinstance(p, dict)]
    stop_timeout = config.get("StopTimeout")
    return Container(
        id=str(attrs.get("Id", "")),
        name=str(attrs.get("Name", "")).lstrip("/"),
        image=str(config.get("Image") or attrs.get("Image") or ""),
        running=bool(state.get("Running")),
        paused=bool(state.get("Paused")),
        health=health.get("Status") if isinstance(health.get("Status"), str) else None,
        ip=str(ip or ""),
        ports=tuple(sorted(set(ports))),
        env=tuple(env),
        labels=tuple(sorted((str(k), str(v)) for k, v in (config.get("Labels") or {}).items())),
        health_output=_output(str(probes[-1].get("Output") or "")) if probes else "",
        stop_signal=str(config.get("StopSignal") or ""),
        stop_timeout=stop_timeout if isinstance(stop_timeout, int) and stop_timeout >= 0 else 10,
    )


def _output(text: str) -> str:
    """Probe output for a check: printable text and line breaks, within Consul's 4 KB (which it
    would otherwise cut itself, adding a note, so the agent's copy would never equal ours)."""
    kept = "".join(ch for ch in text if ch.isprintable() or ch in "\n\t")
    return kept.encode()[:OUTPUT_MAX].decode(errors="ignore")


def docker_health(c: Container) -> Health:
    """Docker's HEALTHCHECK status as a Consul status: only `healthy` passes; `starting` and
    `unhealthy` are critical, so nothing is routed to the container until Docker says healthy."""
    status = "passing" if c.health == "healthy" else "critical"
    return Health(status, c.health_output or f"Docker health status: {c.health} (no probe has finished yet)")


def _duration(value: str | None, default: str, what: str, problems: list[str]) -> str:
    if value is None:
        return default
    if DURATION_RE.match(value.strip()):
        return value.strip()
    problems.append(f"{what}={value!r} is not a duration like 10s; " + (f"using {default}" if default else "ignored"))
    return default


def _flag(value: str | None, what: str, problems: list[str]) -> bool | None:
    """true/false settings; None when unset or unreadable (the latter reported)."""
    if value is None:
        return None
    if value.strip().lower() in TRUE:
        return True
    if value.strip().lower() in FALSE:
        return False
    problems.append(f"{what}={value!r} is not true/false; ignored")
    return None


def registrations(c: Container, p: Params) -> tuple[tuple[Registration, ...], tuple[str, ...]]:
    """The services this container should have in Consul, and what was ignored (for the log)."""
    problems: list[str] = []
    if not c.running or c.paused:
        return (), ()
    ports = [pt for pt in c.ports if p.internal or pt.host_port is not None]
    # One registration per private port and protocol (a port bound on several host IPs counts once).
    chosen: dict[tuple[int, str], Port] = {}
    for pt in ports:
        chosen.setdefault((pt.private, pt.proto), pt)
    several = len(chosen) > 1
    cname = clean(c.name, 255)
    out = []
    for (private, proto), pt in sorted(chosen.items()):
        settings, own = c.settings(private)

        def get(key: str, settings=settings) -> str | None:
            value = settings.get(key)
            return value if value else None        # as gliderlabs' mapDefault: empty means unset
        if _flag(get("ignore"), "SERVICE_IGNORE", problems):
            continue
        watch_health = c.health is not None and _flag(
            get("check_docker_health"), "SERVICE_CHECK_DOCKER_HEALTH", problems) is not False
        if c.health in ("starting", "unhealthy") and not watch_health:
            continue                               # opted out: not routable until Docker says healthy
        name = _name(c, get("name"), "name" in own, private, several, p, problems)
        if not name:
            continue
        if p.internal:
            address, port = c.ip, private
        else:
            address = p.ip or (pt.host_ip if _specific(pt.host_ip) else p.agent_ip)
            port = pt.host_port
        if not address:
            problems.append(f"port {private}/{proto}: no address to register; not registered")
            continue
        sid = f"{p.hostname}:{clean(get('id') or cname, 200)}:{private}" + (":udp" if proto == "udp" else "")
        tags = {*p.tags, *split_tags(get("tags")), *(("udp",) if proto == "udp" else ())}
        meta = _meta(settings, {"container_port": str(private), "container_name": cname, "container_id": c.id[:64],
                                "image": clean(c.image, META_VALUE_MAX), "host": p.hostname}, problems)
        checks = _checks(get, address, port, proto, p, problems)
        if watch_health:
            checks.append(Check("docker", ttl=p.health_ttl))
        elif not checks and p.ttl:
            # --ttl: a heartbeat the registrator passes; gone 10 min after the registrator stops.
            checks.append(Check("heartbeat", ttl=f"{p.ttl}s", deregister_after="10m"))
        out.append(Registration(sid, name, address, port, tuple(sorted(tags)), tuple(sorted(meta.items())),
                                tuple(sorted(checks)), docker_health(c) if watch_health else None))
    return tuple(sorted(out)), tuple(problems)


def _name(c: Container, raw: str | None, for_port: bool, private: int, several: bool, p: Params,
          problems: list[str]) -> str:
    """SERVICE_<port>_NAME as given; SERVICE_NAME or the image's name with `-<port>` when the
    container publishes several ports. "" = not registered (--explicit without a name)."""
    name = service_name(raw) if raw else ""
    if raw and not name:
        problems.append(f"SERVICE_NAME={raw!r} has no usable character; "
                        + ("not registered (--explicit)" if p.explicit else "using the image name"))
    if not name and p.explicit:
        return ""
    if not name:
        for_port = False
        name = service_name(image_base(c.image))
        if not name:
            problems.append(f"port {private}: no usable service name from {c.image!r}; not registered")
            return ""
    if several and not for_port:
        suffix = f"-{private}"
        name = name[:NAME_MAX - len(suffix)].strip("-") + suffix
    return name


def _meta(settings: Mapping[str, str], ours: dict[str, str], problems: list[str]) -> dict[str, str]:
    """Every SERVICE_<KEY> the registrator does not act on becomes meta `<key>` (gliderlabs'
    Attrs); SERVICE_META_<KEY> sets `<key>` too and wins. Our own keys cannot be overridden."""
    extra: dict[str, str] = {}
    for alias in (False, True):
        for key, value in sorted(settings.items()):
            if key in INTERPRETED or key.startswith("check_") or key.startswith("meta_") is not alias:
                continue
            mkey = key[len("meta_"):] if alias else key
            if not META_KEY_RE.match(mkey) or mkey.startswith("consul-"):
                problems.append(f"SERVICE_{key.upper()}: {mkey!r} is not a usable meta key; ignored")
            elif mkey in ours:
                problems.append(f"SERVICE_{key.upper()}: meta {mkey!r} is the registrator's own; ignored")
            else:
                extra[mkey] = clean(value, META_VALUE_MAX)
    dropped = sorted(extra)[META_MAX - len(ours):]
    if dropped:
        problems.append(f"more than {META_MAX} meta keys; dropped {', '.join(dropped)}")
    return {**{k: extra[k] for k in sorted(extra)[:META_MAX - len(ours)]}, **ours}


def _specific(ip: str) -> bool:
    try:
        return not ipaddress.ip_address(ip).is_unspecified
    except ValueError:
        return False


def _checks(get, address: str, port: int, proto: str, p: Params, problems: list[str]) -> list[Check]:
    """The container's own check, in gliderlabs' order of precedence (consul.go `buildCheck`):
    HTTP, HTTPS, command, script, TTL, TCP, gRPC; the first one set and usable is registered."""
    interval = _duration(get("check_interval"), "10s", "SERVICE_CHECK_INTERVAL", problems)
    timeout = _duration(get("check_timeout"), "5s", "SERVICE_CHECK_TIMEOUT", problems)
    host = f"[{address}]" if ":" in address else address
    check = None
    for kind in ("http", "https", "cmd", "script", "ttl", "tcp", "grpc"):
        value = get(f"check_{kind}")
        if value is None:
            continue
        what = f"SERVICE_CHECK_{kind.upper()}"
        if proto != "tcp" and kind in ("http", "https", "tcp", "grpc"):
            problems.append(f"{what} on a {proto} port; ignored")
            continue
        if kind in ("http", "https"):
            path = clean(value.strip(), 1024)
            if not path.startswith("/") or " " in path:
                problems.append(f"{what}={value!r} is not a path starting with /; ignored")
                continue
            method = (get(f"check_{kind}_method") or get("check_method") or "").strip().upper()
            if method and not METHOD_RE.match(method):
                problems.append(f"SERVICE_CHECK_{kind.upper()}_METHOD={method!r} is not an HTTP method; using GET")
                method = ""
            skip = kind == "https" and bool(_flag(get("check_tls_skip_verify"), "SERVICE_CHECK_TLS_SKIP_VERIFY",
                                                  problems))
            check = Check("http", f"{kind}://{host}:{port}{path}", interval, timeout, method=method,
                          tls_skip_verify=skip)
        elif kind == "cmd":
            problems.append("SERVICE_CHECK_CMD needs gliderlabs' check-cmd helper on the agent; ignored")
            continue
        elif kind == "script":
            if not p.script_checks:
                problems.append("SERVICE_CHECK_SCRIPT runs a command on the Consul agent's host: "
                                "ignored unless the registrator runs with --script-checks")
                continue
            script = clean(value, SCRIPT_MAX).replace("$SERVICE_IP", address).replace("$SERVICE_PORT", str(port))
            # Consul's own default (30 s) unless set: a script may well take longer than a probe.
            check = Check("script", script, interval, timeout if get("check_timeout") else "")
        elif kind == "ttl":
            ttl = _duration(value, "", what, problems)
            if not ttl:
                continue
            check = Check("ttl", ttl=ttl)
        else:                                      # tcp, grpc: `true` turns them on
            on = _flag(value, what, problems)
            if not on:
                continue
            use_tls = kind == "grpc" and bool(_flag(get("check_grpc_use_tls"), "SERVICE_CHECK_GRPC_USE_TLS",
                                                    problems))
            skip = use_tls and bool(_flag(get("check_tls_skip_verify"), "SERVICE_CHECK_TLS_SKIP_VERIFY", problems))
            check = Check(kind, f"{host}:{port}", interval, timeout, grpc_use_tls=use_tls, tls_skip_verify=skip)
        break
    if check is None:
        return []
    status = get("check_initial_status")
    if status is not None and status.strip().lower() not in STATUSES:
        problems.append(f"SERVICE_CHECK_INITIAL_STATUS={status!r} is not passing, warning or critical; ignored")
        status = None
    after = _duration(get("check_deregister_after"), "", "SERVICE_CHECK_DEREGISTER_AFTER", problems)
    return [replace(check, initial_status=(status or "").strip().lower(), deregister_after=after)]
