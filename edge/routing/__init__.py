"""The pure routing core: Consul values → route table → haproxy.cfg text and a plan of changes.

No I/O here (the import contracts in pyproject.toml keep it so): model, table, render and plan
take frozen values and return frozen values or text.
"""
