"""Templates from disk: the bundled `templates/` or the user's `--templates DIR`, watched live.

`load()` reads every `*.j2` file into a name → source mapping for the pure renderer. `watch()`
calls back on any change in the directory (watchdog); the control loop then re-renders and
applies the result only if it renders and passes `haproxy -c`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

import edge

log = logging.getLogger("edge.templates")


def bundled() -> Path:
    """`edge/templates` in an installed wheel, `templates/` beside `edge/` in a checkout."""
    here = Path(edge.__file__).resolve().parent
    for candidate in (here / "templates", here.parent / "templates"):
        if (candidate / "haproxy.cfg.j2").is_file():
            return candidate
    raise FileNotFoundError(f"bundled templates not found beside {here}")


def load(directory: Path) -> Mapping[str, str]:
    return {p.name: p.read_text(encoding="utf-8") for p in sorted(directory.glob("*.j2")) if p.is_file()}


class _Handler(FileSystemEventHandler):
    def __init__(self, on_change: Callable[[], None]):
        self.on_change = on_change

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.event_type in ("opened", "closed_no_write"):
            return
        if not str(event.src_path).endswith(".j2") and not str(getattr(event, "dest_path", "")).endswith(".j2"):
            return
        log.debug("template event: %s %s", event.event_type, event.src_path)
        self.on_change()


def watch(directory: Path, on_change: Callable[[], None]) -> Observer:
    observer = Observer()
    observer.schedule(_Handler(on_change), str(directory), recursive=False)
    observer.daemon = True
    observer.start()
    return observer
