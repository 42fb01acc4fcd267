# haproxy-consul: one image, three programs (edge, registrator, bootstrap).
#
# Build offline-friendly with scripts/build_image.py (`make image`): dependency wheels are built
# on the host (pip inside a build step may not reach PyPI), and BASE may be a locally imported
# debootstrap rootfs where no registry is reachable. Users get the public Debian image.
ARG BASE=debian:bookworm-slim
FROM ${BASE}

LABEL org.opencontainers.image.title="haproxy-consul" \
      org.opencontainers.image.description="Hostname-routed services: Consul-driven HAProxy edge, Docker registrator, etcd-bootstrapped Consul servers" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="0.1.0"

ENV DEBIAN_FRONTEND=noninteractive \
    PATH=/opt/haproxy-consul/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    PYTHONUNBUFFERED=1 \
    EDGE_STATE_DIR=/run/haproxy-consul \
    EDGE_HANDOVER_TIMEOUT=0 \
    BOOTSTRAP_DATA_DIR=/var/lib/consul

# System packages first (they change least): HAProxy 2.6, Python, Consul 1.8.7 from bullseye.
# HAProxy may bind :80 as the non-root user.
COPY scripts/apt-bullseye.sh /tmp/apt-bullseye.sh
RUN bash /tmp/apt-bullseye.sh \
 && apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates haproxy python3 python3-venv libcap2-bin consul/bullseye \
 && setcap cap_net_bind_service=+ep /usr/sbin/haproxy \
 && apt-get purge -y libcap2-bin && apt-get autoremove -y \
 && rm -rf /var/lib/apt/lists/* /tmp/apt-bullseye.sh \
 && useradd --system --uid 10001 --user-group --home-dir /var/lib/haproxy-consul --create-home haproxy-consul \
 && install -d -o haproxy-consul -g haproxy-consul /run/haproxy-consul /var/lib/consul

# Dependencies next, then the package itself: a code change rebuilds only the last layer.
COPY build/image/deps /tmp/deps
RUN python3 -m venv /opt/haproxy-consul \
 && /opt/haproxy-consul/bin/pip install --no-cache-dir --no-index /tmp/deps/*.whl \
 && rm -rf /tmp/deps
COPY build/image/app /tmp/app
RUN /opt/haproxy-consul/bin/pip install --no-cache-dir --no-index --no-deps /tmp/app/*.whl && rm -rf /tmp/app

# The edge runs unprivileged. The registrator needs the Docker socket's group
# (`--group-add <gid>`) and bootstrap a writable data volume (or `--user root`): see docs/.
USER haproxy-consul
WORKDIR /var/lib/haproxy-consul
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 CMD ["haproxy-consul", "health"]
ENTRYPOINT ["haproxy-consul"]
CMD ["edge"]
