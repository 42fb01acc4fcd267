# haproxy-consul: one image, three programs (edge, registrator, bootstrap).
#
# Build offline-friendly with scripts/build_image.py (`make image`): dependency wheels are built
# on the host (pip inside a build step may not reach PyPI), and BASE may be a locally imported,
# slimmed debootstrap rootfs where no registry is reachable. Users get the public Debian image:
# Debian 13 "trixie", for HAProxy 3.0 (LTS) and Python 3.13 (the wheels are made for 3.13).
# Every layer removes what it downloads (apt lists, caches, .debs) in the step that made it;
# the venv holds no pip or setuptools (pip runs from Debian's wheel, outside the venv).
ARG BASE=debian:trixie-slim
# The consul binary bootstrap runs. By default Debian 11's package, Consul 1.8.7 (the last
# Debian ships; stage consul-debian). `--build-arg CONSUL_FROM=hashicorp/consul:1.20` takes
# /bin/consul from another image (the official ones have it there; Consul is a static binary),
# and CONSUL_FROM=consul-file the binary `scripts/build_image.py --consul-binary FILE` put in
# build/image/consul/.
ARG CONSUL_FROM=consul-debian

# --- system: HAProxy, Python; the user; its directories ------------------------------------------
FROM ${BASE} AS system
ENV DEBIAN_FRONTEND=noninteractive \
    PATH=/opt/haproxy-consul/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    PYTHONUNBUFFERED=1 \
    EDGE_STATE_DIR=/run/haproxy-consul \
    EDGE_HANDOVER_TIMEOUT=0 \
    BOOTSTRAP_DATA_DIR=/var/lib/consul
COPY scripts/dpkg-slim.cfg /etc/dpkg/dpkg.cfg.d/haproxy-consul-slim
# HAProxy may bind :80 as the non-root user (file capability). /var/lib/consul is owned by that
# user, so a named volume mounted there starts out writable by it (Docker copies the ownership).
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates haproxy python3 python3-pip-whl libcap2-bin \
 && setcap cap_net_bind_service=+ep /usr/sbin/haproxy \
 && apt-get purge -y libcap2-bin && apt-get autoremove -y && apt-get clean \
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /var/log/apt /var/log/dpkg.log \
 && useradd --system --uid 10001 --user-group --home-dir /var/lib/haproxy-consul --create-home haproxy-consul \
 && install -d -o haproxy-consul -g haproxy-consul /run/haproxy-consul /var/lib/consul

# --- consul: Debian 11's package in a throwaway stage; only its binary is copied ----------------
FROM ${BASE} AS consul-debian
COPY scripts/apt-bullseye.sh /tmp/apt-bullseye.sh
RUN bash /tmp/apt-bullseye.sh && apt-get update \
 && apt-get install -y --no-install-recommends consul/bullseye

# --- consul: a binary given to the build (build/image/consul/consul) ------------------------------
FROM scratch AS consul-file
COPY build/image/consul/ /bin/

FROM ${CONSUL_FROM} AS consul

# --- deps: the venv with every dependency, built in a throwaway stage so no wheel stays behind --
FROM system AS deps
COPY build/image/deps /tmp/deps
RUN python3 -m venv --without-pip /opt/haproxy-consul \
 && /opt/haproxy-consul/bin/python "$(echo /usr/share/python-wheels/pip-*.whl)/pip" install --no-cache-dir --no-index \
      --disable-pip-version-check /tmp/deps/*.whl

# --- the image: system + the venv + the package itself (a code change rebuilds only the last layers)
FROM system
ARG VERSION=0.1.0
# Where the consul stage keeps its binary: /bin/consul in the official images and consul-file.
ARG CONSUL_PATH=/bin/consul
LABEL org.opencontainers.image.title="haproxy-consul" \
      org.opencontainers.image.description="Hostname-routed services: Consul-driven HAProxy edge, Docker registrator, etcd-bootstrapped Consul servers" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}"
COPY --from=deps /opt/haproxy-consul /opt/haproxy-consul
COPY --from=consul ${CONSUL_PATH} /usr/bin/consul
COPY build/image/app /tmp/app
RUN /opt/haproxy-consul/bin/python "$(echo /usr/share/python-wheels/pip-*.whl)/pip" install --no-cache-dir --no-index \
      --no-deps --disable-pip-version-check /tmp/app/*.whl \
 && rm -rf /tmp/app

# The edge runs unprivileged. The registrator needs the Docker socket's group
# (`--group-add <gid>`) and bootstrap a data volume it owns (or `--user root`): see the README.
USER haproxy-consul
WORKDIR /var/lib/haproxy-consul
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 CMD ["haproxy-consul", "health"]
ENTRYPOINT ["haproxy-consul"]
CMD ["edge"]
