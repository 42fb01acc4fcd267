"""`haproxy-consul SUBCOMMAND ...`: picks the program and hands it argv and the environment.

Only this module and each program's own `cli` decide exit codes.
"""

from __future__ import annotations

import importlib
import os
import sys

from haproxy_consul import __version__

PROGRAMS = {
    "edge": "edge.cli",
    "registrator": "registrator.cli",
    "bootstrap": "bootstrap.cli",
    "health": "haproxy_consul.health",
}

USAGE = f"""usage: haproxy-consul {{{",".join(PROGRAMS)}}} [options]

  edge         route <service>-<port>.<domain> to healthy Consul instances through HAProxy
  registrator  register the published ports of this host's containers in Consul
  bootstrap    form the Consul server cluster through etcd and run the agent
  health       the container's health check for whichever of the three it runs

haproxy-consul {__version__}; `haproxy-consul PROGRAM --help` for options.
"""


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help", "help"):
        sys.stdout.write(USAGE)
        return 0
    if args[0] == "--version":
        print(f"haproxy-consul {__version__}")
        return 0
    module = PROGRAMS.get(args[0])
    if module is None:
        sys.stderr.write(f"haproxy-consul: unknown program {args[0]!r}\n\n{USAGE}")
        return 2
    return importlib.import_module(module).main(args[1:], dict(os.environ))


if __name__ == "__main__":
    sys.exit(main())
