"""argparse with environment fallbacks: a flag wins over its variable, the variable over the default.

Each program builds its parser with `EnvParser`, naming the environment variable of each
option next to it, and turns the result into its own frozen settings object.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping


class EnvParser(argparse.ArgumentParser):
    """An ArgumentParser whose options may name an environment variable as their fallback."""

    def __init__(self, *args, environ: Mapping[str, str], **kwargs):
        kwargs.setdefault("formatter_class", argparse.ArgumentDefaultsHelpFormatter)
        super().__init__(*args, **kwargs)
        self.environ = environ

    def option(self, *flags: str, env: str | None = None, default=None, type=str, help: str = "", group=None,
               **kwargs):
        """Add an option whose default is `environ[env]` (converted by `type`) when that is set;
        `group`: an argument group of this parser to list it under in --help."""
        if env and self.environ.get(env, "") != "":
            raw = self.environ[env]
            try:
                default = type(raw)
            except (TypeError, ValueError) as exc:
                self.error(f"environment variable {env}={raw!r}: {exc}")
            help = f"{help} [env {env}]"
        elif env:
            help = f"{help} [env {env}]"
        return (group or self).add_argument(*flags, default=default, type=type, help=help, **kwargs)

    def flag(self, *flags: str, env: str | None = None, help: str = ""):
        """A boolean switch; the environment variable turns it on with 1/true/yes/on."""
        default = False
        if env:
            default = truthy(self.environ.get(env, ""))
            help = f"{help} [env {env}]"
        return self.add_argument(*flags, action="store_true", default=default, help=help)

    def listing(self, *flags: str, env: str | None = None, help: str = ""):
        """A repeatable option that also accepts comma-separated values; env is comma-separated."""
        help = f"{help} (repeatable, comma-separated)" + (f" [env {env}]" if env else "")
        return self.add_argument(*flags, action="append", default=None, help=help)

    def resolve_listing(self, values: list[str] | None, env: str | None) -> tuple[str, ...]:
        raw = values if values is not None else [self.environ.get(env, "")] if env else []
        return tuple(item.strip() for value in raw for item in value.split(",") if item.strip())


def truthy(value: str) -> bool:
    return value.strip().lower() in ("1", "true", "yes", "on")


def host_port(value: str, *, default_host: str = "") -> tuple[str, int]:
    """Parse `ADDR:PORT`, `:PORT` or `[v6]:PORT` into (host, port); host '' means all addresses."""
    host, sep, port = value.rpartition(":")
    if not sep:
        raise ValueError(f"{value!r} is not ADDR:PORT")
    host = host.strip("[]") if host.startswith("[") else host
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{value!r}: port must be 1-65535")
    return (host or default_host, int(port))
