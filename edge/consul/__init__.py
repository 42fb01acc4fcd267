"""The edge's Consul side: the catalog watch (routes), the KV shell (certificates, ACME), and the
pure guard that keeps an ACL-filtered answer from emptying the route table."""
