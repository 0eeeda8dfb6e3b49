# NATS server from Debian bookworm's nats-server package, for the compose
# cluster (build-cluster-images.sh builds it). Core NATS only, no
# JetStream and no state: shindensen uses it as a doorbell between nodes,
# the database is the log. Client port 4222, monitoring (/healthz, /varz)
# on 8222; runs as the non-root user nats with a read-only root file system.
ARG BASE_IMAGE=debian:bookworm-slim
FROM ${BASE_IMAGE} AS install
COPY host-ca.crt /tmp/host-ca.crt
# The package creates the system user it runs as.
RUN apt-get -o Acquire::https::CAInfo=/tmp/host-ca.crt update -qq \
 && DEBIAN_FRONTEND=noninteractive apt-get -o Acquire::https::CAInfo=/tmp/host-ca.crt \
      -o Dpkg::Options::=--force-confold install -y -qq --no-install-recommends nats-server >/dev/null \
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /var/log/apt /var/log/dpkg.log \
      /usr/share/doc /usr/share/man /usr/share/locale /tmp/host-ca.crt \
 && /usr/sbin/nats-server --version
COPY nats-server.conf /etc/nats-server.conf

FROM scratch
COPY --from=install / /
LABEL org.opencontainers.image.title="shindensen-nats" \
      org.opencontainers.image.description="NATS server from Debian bookworm packages (shindensen compose cluster)" \
      org.opencontainers.image.base.name="debian:bookworm-slim"
ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
USER nats:nats
EXPOSE 4222 8222
# No HTTP client in the image: bash's /dev/tcp asks the monitoring port.
HEALTHCHECK --interval=5s --timeout=3s --start-period=10s --retries=3 \
  CMD ["bash", "-c", "exec 3<>/dev/tcp/127.0.0.1/8222 && printf 'GET /healthz HTTP/1.0\\r\\n\\r\\n' >&3 && head -c 12 <&3 | grep -q ' 200'"]
ENTRYPOINT ["/usr/sbin/nats-server"]
CMD ["--config", "/etc/nats-server.conf"]
