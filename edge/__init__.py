"""edge: the sidecar that routes `<service>-<port>.<domain>` to healthy Consul instances.

Folders read as the pipeline (see STYLE.md):
  consul/  (I/O)  watch: Consul long-poll → frozen snapshot; kv: the KV shell; safety: the pure
                  ACL guard's decisions
  routing/ (pure) model (frozen values, naming) → table (routes and stable server slots) →
                  render (haproxy.cfg, maps, landing page) → plan (runtime commands, or a reload
                  with its reason)
  haproxy/ (I/O)  process: atomic writes, `haproxy -c`, runtime and master sockets; ownership:
                  one edge per state dir, hand-over to a successor
  tls/            certs (pure: bundles, matching, the certificate plan), sources (directory and
                  KV), stage (applies the certificate plan live)
  acme/           plan (pure), issuer (the fleet-wide loop), client, dns, settings
The wiring sits at the top: `control` runs the loop that ties the stages, `cli` and `settings`
are the entry point, `metrics` and `templates_source` feed and report it.
"""
