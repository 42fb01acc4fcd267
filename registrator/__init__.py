"""registrator: keeps the local Consul agent's services equal to this host's published container ports."""
