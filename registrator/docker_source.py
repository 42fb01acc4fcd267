"""The Docker shell: container events (reconnecting), listing and inspect, as frozen Containers.

Raw inspect JSON is converted by `registrator.mapping.container_from_inspect` right here, at the
boundary. Errors are `DockerUnavailable`; the loop decides what to do with them. A socket this
user may not open says what to do about it (the socket's group, or root).
"""

from __future__ import annotations

import logging
import os
import urllib.parse
from collections.abc import Iterator

import docker
import requests
from docker.errors import DockerException, NotFound

from registrator.mapping import Container, container_from_inspect

log = logging.getLogger("registrator.docker")

EVENTS = ("start", "die", "stop", "kill", "destroy", "pause", "unpause", "health_status")


class DockerUnavailable(Exception):
    """The Docker Engine did not answer (or answered garbage)."""


class DockerSource:
    def __init__(self, url: str, timeout: float = 10.0):
        self.url = url
        self.timeout = timeout
        self._client: docker.APIClient | None = None

    def _api(self) -> docker.APIClient:
        if self._client is None:
            try:
                self._client = docker.APIClient(base_url=self.url, timeout=self.timeout, version="auto")
            except (DockerException, requests.RequestException) as exc:
                raise self._unavailable(self.url, exc) from exc
        return self._client

    def _unavailable(self, what: str, exc: Exception) -> DockerUnavailable:
        self._reset()
        return DockerUnavailable(f"{what}: {exc}{permission_hint(self.url, exc)}")

    def _reset(self) -> None:
        if self._client is not None:
            self._client.close()
        self._client = None

    def open_events(self) -> Iterator[tuple[str, str, str]]:
        """Connect to the event stream now; iterate for (action, container id, signal), the
        signal being set on `kill` events only. Connecting before listing containers is what
        makes sure nothing started in between is missed."""
        try:
            stream = self._api().events(decode=True, filters={"type": "container", "event": list(EVENTS)})
        except (DockerException, requests.RequestException) as exc:
            raise self._unavailable("event stream", exc) from exc
        return self._events(stream)

    def _events(self, stream) -> Iterator[tuple[str, str, str]]:
        try:
            for event in stream:
                action = str(event.get("Action") or event.get("status") or "").split(":", 1)[0]
                actor = event.get("Actor") or {}
                cid = str(actor.get("ID") or event.get("id") or "")
                if action in EVENTS and cid:
                    yield action, cid, str((actor.get("Attributes") or {}).get("signal") or "")
        except (DockerException, requests.RequestException, ValueError) as exc:
            raise self._unavailable("event stream", exc) from exc

    def ping(self) -> None:
        """Whether the engine takes a new connection and answers `/_ping` on it; DockerUnavailable
        when it does not. A connection already open proves nothing: told to stop, dockerd 20.10
        closes its socket at once, and then stops its containers while the connections it had
        keep answering until it exits."""
        try:
            fresh = docker.APIClient(base_url=self.url, timeout=self.timeout, version=self._api().api_version)
            try:
                fresh.ping()
            finally:
                fresh.close()
        except (DockerException, requests.RequestException) as exc:
            raise self._unavailable("ping", exc) from exc

    def running(self) -> list[Container]:
        try:
            ids = [c["Id"] for c in self._api().containers(quiet=True)]
        except (DockerException, requests.RequestException) as exc:
            raise self._unavailable("list containers", exc) from exc
        found = [self.inspect(cid) for cid in ids]
        return [c for c in found if c is not None]

    def inspect(self, cid: str) -> Container | None:
        """None when the container is gone."""
        try:
            return container_from_inspect(self._api().inspect_container(cid))
        except NotFound:
            return None
        except (DockerException, requests.RequestException) as exc:
            raise self._unavailable(f"inspect {cid[:12]}", exc) from exc

    def exists(self) -> set[str]:
        """IDs of every container, running or not."""
        try:
            return {c["Id"] for c in self._api().containers(all=True, quiet=True)}
        except (DockerException, requests.RequestException) as exc:
            raise self._unavailable("list containers", exc) from exc


def permission_hint(url: str, exc: Exception) -> str:
    """What to do when this user may not open the engine's unix socket."""
    if "Permission denied" not in str(exc) and "PermissionError" not in repr(exc):
        return ""
    path = urllib.parse.urlsplit(url).path if url.startswith("unix:") else url
    try:
        gid = os.stat(path).st_gid
    except OSError:
        return f"; this user (uid {os.getuid()}) may not open {path}: run as root or in the socket's group"
    return (f"; this user (uid {os.getuid()}) may not open {path}: give it the socket's group "
            f"(docker run --group-add {gid}) or run it as root")
