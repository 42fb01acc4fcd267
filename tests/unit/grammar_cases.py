"""Helpers for the grammar tests: a parse result as short comparable strings."""

from edge.routing.routers import Parsed


def routes(parsed: Parsed) -> list[str]:
    """Each router as `<match> <options>` (the way `edge routes` shows it)."""
    return sorted(" ".join((r.describe(), *r.options())) for r in parsed.routers)


def options(parsed: Parsed) -> dict[str, object]:
    return {name: value for name, value, _ in parsed.options}


def warnings(parsed: Parsed) -> list[str]:
    return [str(p) for p in parsed.problems]
