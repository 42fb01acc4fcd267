"""Container inspect data → Consul registrations. Pure: no Docker, no Consul, no I/O.

`container_from_inspect()` normalises the Docker Engine's inspect JSON into a frozen
`Container` at the boundary; `registrations()` maps it to sorted, frozen `Registration`s with
gliderlabs/registrator's rules: one service per published port, named after the image's base
name (`-<port>` appended when a container publishes several), ID `<host>:<container>:<port>`,
and the `SERVICE_*` settings from labels (which win) and environment. Container names, labels
and env come from whoever can run a container: every value is checked, and a bad one is
reported as a problem and ignored, never passed on.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass

NAME_RE = re.compile(r"[^a-z0-9-]+")
META_KEY_RE = re.compile(r"^[A-Za-z0-9_-]{1,128}$")
DURATION_RE = re.compile(r"^\d+(\.\d+)?(ms|s|m|h)$")
TAG_MAX, META_VALUE_MAX, NAME_MAX = 255, 512, 63
TRUE = ("1", "true", "yes", "on")


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

    def setting(self, key: str) -> str | None:
        """A SERVICE_* setting: the label wins over the environment variable."""
        return dict(self.labels).get(key, dict(self.env).get(key))


@dataclass(frozen=True, order=True)
class Check:
    kind: str                  # "http", "tcp" or "ttl"
    target: str                # URL, host:port, or the TTL duration
    interval: str = "10s"
    timeout: str = "5s"


@dataclass(frozen=True, order=True)
class Registration:
    id: str
    name: str
    address: str
    port: int
    tags: tuple[str, ...] = ()
    meta: tuple[tuple[str, str], ...] = ()
    check: Check | None = None

    @property
    def container_id(self) -> str:
        return dict(self.meta).get("container_id", "")


@dataclass(frozen=True)
class Params:
    """What the mapping needs from the settings and the agent."""

    hostname: str
    ip: str | None             # --ip, else decided per port (host IP of the binding, else agent's)
    agent_ip: str
    internal: bool = False
    tags: tuple[str, ...] = ()
    ttl: int | None = None


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
    ports = []
    for key, bindings in (net.get("Ports") or {}).items():
        private, _, proto = str(key).partition("/")
        if _port(private) is None:
            continue
        for b in bindings or [None]:
            host_port = _port(b.get("HostPort")) if isinstance(b, dict) else None
            ports.append(Port(int(private), proto or "tcp", (b or {}).get("HostIp") or "", host_port))
    networks = [n for n in (net.get("Networks") or {}).values() if isinstance(n, dict)]
    ip = net.get("IPAddress") or next((n["IPAddress"] for n in networks if n.get("IPAddress")), "")
    env = []
    for item in config.get("Env") or ():
        key, sep, value = str(item).partition("=")
        if sep:
            env.append((key, value))
    health = (state.get("Health") or {}).get("Status")
    return Container(
        id=str(attrs.get("Id", "")),
        name=str(attrs.get("Name", "")).lstrip("/"),
        image=str(config.get("Image") or attrs.get("Image") or ""),
        running=bool(state.get("Running")),
        paused=bool(state.get("Paused")),
        health=health if isinstance(health, str) else None,
        ip=str(ip or ""),
        ports=tuple(sorted(set(ports))),
        env=tuple(env),
        labels=tuple(sorted((str(k), str(v)) for k, v in (config.get("Labels") or {}).items())),
    )


def _duration(value: str | None, default: str, what: str, problems: list[str]) -> str:
    if value is None:
        return default
    if DURATION_RE.match(value.strip()):
        return value.strip()
    problems.append(f"{what}={value!r} is not a duration like 10s; using {default}")
    return default


def _tags(raw: str | None) -> list[str]:
    return [clean(t.strip(), TAG_MAX) for t in (raw or "").split(",") if clean(t.strip(), TAG_MAX)]


def registrations(c: Container, p: Params) -> tuple[tuple[Registration, ...], tuple[str, ...]]:
    """The services this container should have in Consul, and what was ignored (for the log)."""
    problems: list[str] = []
    if not c.running or c.paused or c.health in ("starting", "unhealthy"):
        return (), ()
    if (c.setting("SERVICE_IGNORE") or "").strip().lower() in TRUE:
        return (), ()
    ports = [pt for pt in c.ports if p.internal or pt.host_port is not None]
    # One registration per private port and protocol (a port bound on several host IPs counts once).
    chosen: dict[tuple[int, str], Port] = {}
    for pt in ports:
        chosen.setdefault((pt.private, pt.proto), pt)
    several = len(chosen) > 1
    base = service_name(c.setting("SERVICE_NAME") or "")
    if not base:
        if c.setting("SERVICE_NAME") is not None:
            problems.append(f"SERVICE_NAME={c.setting('SERVICE_NAME')!r} has no usable character; using the image name")
        base = service_name(image_base(c.image))
    cname = clean(c.name, 255)
    out = []
    for (private, proto), pt in sorted(chosen.items()):
        pre = f"SERVICE_{private}_"
        if (c.setting(pre + "IGNORE") or "").strip().lower() in TRUE:
            continue
        explicit = c.setting(pre + "NAME")
        name = service_name(explicit) if explicit else (f"{base}-{private}" if several and base else base)
        if not name:
            problems.append(f"port {private}/{proto}: no usable service name from {c.image!r}; not registered")
            continue
        if p.internal:
            address, port = c.ip, private
        else:
            address = p.ip or (pt.host_ip if _specific(pt.host_ip) else p.agent_ip)
            port = pt.host_port
        if not address:
            problems.append(f"port {private}/{proto}: no address to register; not registered")
            continue
        sid_base = clean(c.setting("SERVICE_ID") or cname, 200)
        sid = f"{p.hostname}:{sid_base}:{private}" + (":udp" if proto == "udp" else "")
        tags = sorted({*p.tags, *_tags(c.setting("SERVICE_TAGS")), *_tags(c.setting(pre + "TAGS"))})
        meta = {"container_port": str(private), "container_name": cname, "container_id": c.id[:64],
                "image": clean(c.image, META_VALUE_MAX), "host": p.hostname}
        for key, value in _meta_settings(c):
            mkey = key[len("SERVICE_META_"):].lower()
            if META_KEY_RE.match(mkey) and mkey not in meta:
                meta[mkey] = clean(value, META_VALUE_MAX)
            else:
                problems.append(f"{key}: not a usable meta key; ignored")
        out.append(Registration(sid, name, address, port, tuple(tags), tuple(sorted(meta.items())),
                                _check(c, pre, address, port, proto, p, problems)))
    return tuple(sorted(out)), tuple(problems)


def _meta_settings(c: Container) -> list[tuple[str, str]]:
    merged = {k: v for k, v in c.env if k.startswith("SERVICE_META_")}
    merged.update({k: v for k, v in c.labels if k.startswith("SERVICE_META_")})
    return sorted(merged.items())


def _specific(ip: str) -> bool:
    try:
        return not ipaddress.ip_address(ip).is_unspecified
    except ValueError:
        return False


def _check(c: Container, pre: str, address: str, port: int, proto: str, p: Params,
           problems: list[str]) -> Check | None:
    def setting(key: str) -> str | None:
        return c.setting(pre + key) if c.setting(pre + key) is not None else c.setting("SERVICE_" + key)

    interval = _duration(setting("CHECK_INTERVAL"), "10s", "SERVICE_CHECK_INTERVAL", problems)
    timeout = _duration(setting("CHECK_TIMEOUT"), "5s", "SERVICE_CHECK_TIMEOUT", problems)
    host = f"[{address}]" if ":" in address else address
    http = setting("CHECK_HTTP")
    if http is not None and proto == "tcp":
        path = clean(http.strip(), 1024)
        if path.startswith("/") and " " not in path:
            return Check("http", f"http://{host}:{port}{path}", interval, timeout)
        problems.append(f"SERVICE_CHECK_HTTP={http!r} is not a path starting with /; ignored")
    tcp = setting("CHECK_TCP")
    if tcp is not None and proto == "tcp":
        if tcp.strip().lower() in TRUE:
            return Check("tcp", f"{host}:{port}", interval, timeout)
        problems.append(f"SERVICE_CHECK_TCP={tcp!r} is not true/false; ignored")
    if p.ttl:
        return Check("ttl", f"{p.ttl}s")
    return None
