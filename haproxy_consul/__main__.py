"""`python -m haproxy_consul` is the console script."""

import sys

from haproxy_consul.cli import main

sys.exit(main())
