"""edge: the sidecar that routes `<service>-<port>.<domain>` to healthy Consul instances.

Pipeline, one module per stage (see STYLE.md):
  watch (Consul long-poll, I/O) → model (frozen values, naming) → table (routes and stable
  server slots) → render (haproxy.cfg, maps, landing page) → plan (runtime commands or a
  reload with its reason) → haproxy (atomic writes, `haproxy -c`, runtime and master sockets).
`control` runs the loop that ties them; `cli` and `settings` are the entry point.
"""
