"""Where the time of one new vhost goes, read from the edge's DEBUG log (timestamps in ms).

For each sample (name, wall time of the Consul write, wall time of the first 200): the watcher's
line "published X ms after the answer arrived" before the control loop's line that maps the new
route ("applied … live … + NAME-80 on be_spare_K" or "reloaded HAProxy … + NAME-80 …") splits it
into Consul (write → answer at the edge), parse (answer → snapshot), apply (snapshot → applied:
the control thread's queue, plan and runtime commands or the reload) and HAProxy (applied → first
200 seen by the client polling it). Runtime is the runtime commands alone ("live in X ms").
"""

from __future__ import annotations

import re
from datetime import datetime

STAMP = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ", re.M)
PUBLISHED = re.compile(r"published ([\d.]+) ms after the answer arrived")
LIVE = re.compile(r"live in ([\d.]+) ms")


def stamp(line: str) -> float:
    return datetime.strptime(STAMP.match(line).group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()


def breakdown(log: str, samples: list[tuple[str, float, float]]) -> dict[str, list[float]]:
    lines = [line for line in log.splitlines() if STAMP.match(line)]
    stages: dict[str, list[float]] = {"consul": [], "fetch+parse": [], "control": [], "runtime cmds": [],
                                      "applied→200": []}
    for name, wrote, answered in samples:
        at = next((i for i, line in enumerate(lines) if f"+ {name}-80 " in line
                   and ("applied" in line or "reloaded HAProxy" in line)), None)
        if at is None:
            continue
        pub = next((i for i in range(at - 1, -1, -1) if PUBLISHED.search(lines[i])), None)
        applied = stamp(lines[at])
        if pub is not None and stamp(lines[pub]) >= wrote - 0.002:
            published = stamp(lines[pub])
            parse_ms = float(PUBLISHED.search(lines[pub]).group(1))
            stages["consul"].append((published - wrote) * 1000 - parse_ms)
            stages["fetch+parse"].append(parse_ms)
            stages["control"].append((applied - published) * 1000)
        live = LIVE.search(lines[at])
        if live:
            stages["runtime cmds"].append(float(live.group(1)))
        stages["applied→200"].append((answered - applied) * 1000)
    return stages
