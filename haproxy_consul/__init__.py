"""Shared plumbing for the three haproxy-consul programs.

The console script `haproxy-consul` dispatches to `edge`, `registrator` or `bootstrap`
(`haproxy_consul.cli`). The helpers here are the only code those programs share: option
parsing with environment fallbacks (`options`), logging set-up (`logs`) and the Consul
client factory (`consul_api`). The programs never import each other.
"""

__version__ = "0.1.0"
