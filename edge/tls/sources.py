"""Certificate sources: a directory (`--certs`) and a Consul KV prefix (`--certs-kv`), each handing
the newest `CertSet` on (latest wins), as the Consul watcher does for services.

- `DirSource` reads `*.pem` bundles (chain and key in one file) and `name.crt` + `name.key`
  pairs, and reads again on any change in the directory (watchdog): adding, replacing or
  removing a file takes effect live.
- `KVSource` long-polls the prefix's keys (a timeout with nothing new costs a list of names, not
  every bundle again: 20 MB at 10,000 certificates) and reads the values once the index moved.
  Direct children `P/<name>` are certificate bundles (written by users or by the ACME issuer);
  `P/_acme/challenges/<token>` are HTTP-01 key authorizations, handed on as a map every edge
  serves; the rest of `P/_acme/` is the issuer's.

A bundle that does not parse is logged once (naming the file or key and why) and left out; the
others are unaffected. Parsed bundles are cached by content, so a change costs one parse, and a
set is handed on only when it changed (ACME's writes under the prefix wake the KV watch too).
Consul unreachable: logged once per outage, retried with capped backoff, and nothing is
published, so the edge keeps serving what it has.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable
from pathlib import Path

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

from edge.consul.kv import ConsulKV, KVDenied, KVUnavailable
from edge.consul.watch import Backoff
from edge.tls.certs import CertError, Certificate, CertSet, parse_bundle
from edge.tls.plan import challenges

log = logging.getLogger("edge.certs")
CHALLENGES = "_acme/challenges/"
SETTLE = 0.05        # seconds of quiet in the directory before it is read again
KV_NAME = re.compile(r"^[\x21-\x2e\x30-\x7e]{1,200}$")   # printable, no space, no `/`


class Parser:
    """parse_bundle with a cache by (name, text), each refusal logged once, and the last good
    certificate of a name kept while its new text does not parse (a file caught half-written,
    a broken replacement): a name is never left without its certificate by a bad update."""

    def __init__(self, what: str):
        self.what = what
        self._cache: dict[tuple[str, str], Certificate | None] = {}
        self._good: dict[str, Certificate] = {}
        self._set: CertSet | None = None

    def parse(self, bundles: dict[str, str]) -> CertSet | None:
        """The set these bundles make, or None when it is the one returned last time (a write
        elsewhere under the prefix, an ACME challenge): nothing to hand on."""
        fresh, new = {}, False
        for name, text in bundles.items():
            key = (name, text)
            if key not in self._cache:
                new = True
                try:
                    self._cache[key] = parse_bundle(name, text)
                except CertError as exc:
                    kept = "; its previous certificate stays in use" if name in self._good else ""
                    log.error("%s %s refused: %s%s; the other certificates are served", self.what,
                              name.split("/", 1)[1], exc, kept)
                    self._cache[key] = None
            fresh[key] = self._cache[key]
        if self._set is not None and not new and len(fresh) == len(self._cache):
            return None
        self._cache = fresh
        self._good = {name: cert if cert is not None else self._good[name]
                      for (name, _), cert in fresh.items() if cert is not None or name in self._good}
        self._set = CertSet(tuple(self._good.values()), tuple(name for (name, _), c in fresh.items() if c is None))
        return self._set


class DirSource:
    def __init__(self, directory: Path, publish: Callable[[str, CertSet], None]):
        self.directory = directory
        self.publish = publish
        self._parser = Parser(f"certificate file in {directory}:")
        self._lock = threading.Lock()
        self._timer: threading.Timer | None = None
        self._observer: Observer | None = None

    def read(self) -> dict[str, str]:
        """`dir/<file stem>` → PEM text, from bundles and crt/key pairs."""
        bundles: dict[str, str] = {}
        try:
            files = sorted(p for p in self.directory.iterdir() if p.is_file() and not p.name.startswith("."))
        except OSError as exc:
            log.error("certificate directory %s: %s", self.directory, exc)
            return bundles
        names = {p.name for p in files}
        for path in files:
            try:
                if path.suffix == ".pem":
                    bundles[f"dir/{path.name}"] = path.read_text(errors="replace")
                elif path.suffix == ".crt":
                    key = path.with_suffix(".key")
                    text = path.read_text(errors="replace")
                    bundles[f"dir/{path.name}"] = text + ("\n" + key.read_text(errors="replace")
                                                          if key.name in names else "")
            except OSError as exc:
                log.error("certificate file %s: %s", path, exc)
        return bundles

    def scan(self) -> None:
        with self._lock:
            self._timer = None
            certs = self._parser.parse(self.read())
            if certs is not None:
                self.publish("dir", certs)

    def _soon(self) -> None:
        """A write comes as several events (truncate, write, close): read once they settle."""
        with self._lock:
            if self._timer is not None:
                self._timer.cancel()
            self._timer = threading.Timer(SETTLE, self.scan)
            self._timer.daemon = True
            self._timer.start()

    def start(self) -> None:
        self.scan()
        source = self

        class Handler(FileSystemEventHandler):
            def on_any_event(self, event: FileSystemEvent) -> None:
                if event.event_type not in ("opened", "closed_no_write"):
                    source._soon()

        self._observer = Observer()
        self._observer.schedule(Handler(), str(self.directory), recursive=False)
        self._observer.daemon = True
        self._observer.start()

    def stop(self) -> None:
        if self._observer is not None:
            self._observer.stop()


class KVSource:
    def __init__(self, kv: ConsulKV, prefix: str, publish: Callable[[str, CertSet], None],
                 publish_challenges: Callable[[dict[str, str]], None], stop: threading.Event, wait: float = 30.0):
        self.kv, self.prefix = kv, prefix.strip("/") + "/"
        self.publish, self.publish_challenges = publish, publish_challenges
        self.stop, self.wait = stop, wait
        self._parser = Parser(f"certificate in Consul KV under {self.prefix}:")
        self._refused_tokens: tuple[str, ...] = ()
        self._challenges: dict[str, str] | None = None

    def split(self, entries: dict[str, str]) -> tuple[dict[str, str], dict[str, str]]:
        """(bundles as `kv/<name>` → PEM, challenge token → value)."""
        bundles, tokens = {}, {}
        for key, value in entries.items():
            rest = key[len(self.prefix):]
            if rest.startswith(CHALLENGES):
                tokens[rest[len(CHALLENGES):]] = value
            elif KV_NAME.match(rest):
                bundles[f"kv/{rest}"] = value
            elif "/" not in rest and rest:
                log.debug("ignoring key %s%r: not a certificate name", self.prefix, rest[:80])
        return bundles, tokens

    def run(self) -> None:
        """Thread body: long-poll the prefix until `stop`."""
        backoff, index, failing = Backoff(cap=10.0), 0, False
        while not self.stop.is_set():
            try:
                new_index, _ = self.kv.keys(self.prefix, index, self.wait)
                if new_index != index:         # something changed (or a first read): now the values
                    new_index, entries = self.kv.list(self.prefix)
            except KVUnavailable as exc:
                if not failing:
                    hint = (" (the edge's token needs key_prefix read on it)" if isinstance(exc, KVDenied) else "")
                    log.error("certificates in Consul KV under %s: %s%s; serving the ones we have, retrying",
                              self.prefix, exc, hint)
                failing = True
                index = 0
                self.stop.wait(backoff.next())
                continue
            if failing:
                log.info("certificates in Consul KV under %s: Consul answers again", self.prefix)
            failing = False
            backoff.reset()
            if new_index == index:
                continue
            index = new_index if new_index >= index else 0
            bundles, raw_tokens = self.split(entries)
            good, refused = challenges(raw_tokens)
            if refused != self._refused_tokens:
                for token in sorted(set(refused) - set(self._refused_tokens)):
                    log.warning("ACME challenge %s%s%s is not a token and key authorization; ignored",
                                self.prefix, CHALLENGES, token[:80])
                self._refused_tokens = refused
            certs = self._parser.parse(bundles)
            if certs is not None:
                self.publish("kv", certs)
            if good != self._challenges:
                self._challenges = good
                self.publish_challenges(good)
