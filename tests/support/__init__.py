"""Helpers the integration tests share: free loopback ports, waiting, and real processes."""
