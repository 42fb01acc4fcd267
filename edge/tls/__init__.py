"""Certificates: the pure set and plan (`certs`), where they come from (`sources`: a directory,
Consul KV), and the stage that keeps HAProxy's certificates equal to them, live."""
