"""bootstrap: Consul servers find each other through etcd and form one cluster."""
