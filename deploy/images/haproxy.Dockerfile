# HAProxy from Debian bookworm's haproxy package (2.6), for the compose
# cluster (build-cluster-images.sh builds it). The configuration is mounted
# at /usr/local/etc/haproxy/haproxy.cfg (deploy/haproxy/haproxy.cfg in
# docker-compose.cluster.yml). Runs as the non-root user haproxy (no chroot,
# no privileged ports), logs to stdout, with a read-only root file system.
# docker stop sends SIGUSR1: a soft stop (listeners close, open connections
# finish, up to the configuration's hard-stop-after).
ARG BASE_IMAGE=debian:bookworm-slim
FROM ${BASE_IMAGE} AS install
COPY host-ca.crt /tmp/host-ca.crt
# The package creates the system user it runs as.
RUN apt-get -o Acquire::https::CAInfo=/tmp/host-ca.crt update -qq \
 && DEBIAN_FRONTEND=noninteractive apt-get -o Acquire::https::CAInfo=/tmp/host-ca.crt \
      -o Dpkg::Options::=--force-confold install -y -qq --no-install-recommends haproxy >/dev/null \
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /var/log/apt /var/log/dpkg.log \
      /usr/share/doc /usr/share/man /usr/share/locale /tmp/host-ca.crt \
 && mkdir -p /usr/local/etc/haproxy \
 && /usr/sbin/haproxy -v

FROM scratch
COPY --from=install / /
LABEL org.opencontainers.image.title="shindensen-haproxy" \
      org.opencontainers.image.description="HAProxy from Debian bookworm packages (shindensen compose cluster)" \
      org.opencontainers.image.base.name="debian:bookworm-slim"
ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
USER haproxy:haproxy
WORKDIR /var/lib/haproxy
STOPSIGNAL SIGUSR1
ENTRYPOINT ["/usr/sbin/haproxy"]
CMD ["-W", "-db", "-f", "/usr/local/etc/haproxy/haproxy.cfg"]
