"""The HAProxy side: the process and its files and sockets, and who owns them (one edge per state
dir, a clean hand-over to the next)."""
