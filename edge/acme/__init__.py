"""ACME, ordered once for the whole fleet: the pure plan, the issuer loop, the protocol client,
DNS-01 through RFC 2136, and the `--acme-*` settings."""
