# PostgreSQL 15 from Debian bookworm's packages, for the compose cluster
# (build-cluster-images.sh builds it; docker-compose.cluster.yml runs it).
#
# - First start on an empty data directory (the volume at PGDATA): initdb
#   with superuser POSTGRES_USER (default shindensen) and POSTGRES_PASSWORD
#   (required then, ignored later: the password lives in the database), a
#   database POSTGRES_DB (default: the user's name), scram-sha-256 for every
#   TCP client, trust on the container's own Unix socket.
# - Listens on 0.0.0.0:5432; runs as the non-root user postgres (999:999,
#   the owner of the volume); nothing written outside PGDATA,
#   /var/run/postgresql and /tmp, so the root file system can be read-only.
# - docker stop sends SIGINT: a fast shutdown (clients are disconnected,
#   the checkpoint runs), not SIGTERM's wait for every client to leave.
ARG BASE_IMAGE=debian:bookworm-slim
FROM ${BASE_IMAGE} AS install
COPY host-ca.crt /tmp/host-ca.crt
# The user first, with fixed ids (the package would take the next free
# ones); no main cluster from the package: the entrypoint makes its own.
RUN groupadd --system --gid 999 postgres \
 && useradd --system --uid 999 --gid postgres --home-dir /var/lib/postgresql --shell /bin/bash postgres \
 && mkdir -p /etc/postgresql-common \
 && echo 'create_main_cluster = false' > /etc/postgresql-common/createcluster.conf \
 && apt-get -o Acquire::https::CAInfo=/tmp/host-ca.crt update -qq \
 && DEBIAN_FRONTEND=noninteractive apt-get -o Acquire::https::CAInfo=/tmp/host-ca.crt \
      -o Dpkg::Options::=--force-confold install -y -qq --no-install-recommends postgresql-15 >/dev/null \
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /var/log/apt /var/log/dpkg.log \
      /usr/share/doc /usr/share/man /usr/share/locale /tmp/host-ca.crt \
 && mkdir -p /var/lib/postgresql/data /var/run/postgresql \
 && chown postgres:postgres /var/lib/postgresql /var/lib/postgresql/data /var/run/postgresql \
 && chmod 0700 /var/lib/postgresql/data \
 && /usr/lib/postgresql/15/bin/postgres --version
COPY postgres-entrypoint.sh /usr/local/bin/shindensen-postgres

FROM scratch
COPY --from=install / /
LABEL org.opencontainers.image.title="shindensen-postgres" \
      org.opencontainers.image.description="PostgreSQL 15 from Debian bookworm packages (shindensen compose cluster)" \
      org.opencontainers.image.base.name="debian:bookworm-slim"
ENV PATH=/usr/lib/postgresql/15/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    LANG=C.UTF-8 \
    PGDATA=/var/lib/postgresql/data
USER postgres:postgres
WORKDIR /var/lib/postgresql
VOLUME ["/var/lib/postgresql/data"]
EXPOSE 5432
STOPSIGNAL SIGINT
HEALTHCHECK --interval=5s --timeout=5s --start-period=30s --retries=3 \
  CMD ["pg_isready", "--quiet", "--host=127.0.0.1"]
ENTRYPOINT ["/usr/local/bin/shindensen-postgres"]
