#!/usr/bin/env bash
# Builds the images of the compose cluster (docker-compose.cluster.yml) from
# Debian bookworm's packages, with no registry:
#
#   shindensen-postgres:local  postgresql-15 (postgres.Dockerfile)
#   shindensen-nats:local      nats-server   (nats.Dockerfile)
#   shindensen-haproxy:local   haproxy       (haproxy.Dockerfile)
#
# on a Debian base, debian:bookworm-slim when it is present or can be
# pulled. Otherwise a stand-in with that name is derived, offline, from the
# local Debian bookworm that build-base-images.sh debootstraps for the
# builder image: the same system without the compiler and the Rust
# toolchain, with Debian's own CA bundle and apt sources
# (bookworm, bookworm-updates, bookworm-security).
#
# Packages are fetched trusting this machine's CA bundle (HOST_CA; a
# TLS-inspecting proxy's root is in it) during the build only: the bundle is
# in the build context of the first stage, and each image is that stage's
# file system copied into an empty one, so no layer of it holds the bundle.
#
# Idempotent: an image that exists is left alone (REBUILD=1 builds the
# three service images again). Needs root for build-base-images.sh.
set -euo pipefail
cd "$(dirname "$0")"

DEBIAN_IMAGE=${DEBIAN_IMAGE:-debian:bookworm-slim}
BUILDER_IMAGE=${BUILDER_IMAGE:-rust:1.95-bookworm}
HOST_CA=${HOST_CA:-/etc/ssl/certs/ca-certificates.crt}
POSTGRES_IMAGE=${POSTGRES_IMAGE:-shindensen-postgres:local}
NATS_IMAGE=${NATS_IMAGE:-shindensen-nats:local}
HAPROXY_IMAGE=${HAPROXY_IMAGE:-shindensen-haproxy:local}

log() { printf '[cluster-images] %s\n' "$*" >&2; }
present() { docker image inspect "$1" >/dev/null 2>&1; }

work=$(mktemp -d)
container=""
cleanup() {
  [ -z "$container" ] || docker rm -f "$container" >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT

# The Debian stand-in: the builder's debootstrapped bookworm with every
# package that is not of priority "required" (plus apt and ca-certificates)
# removed, run with no network.
derive_debian() {
  BUILDER_IMAGE="$BUILDER_IMAGE" BASE_IMAGES=builder ./build-base-images.sh
  container=$(docker create --network none "$BUILDER_IMAGE" sh -euc '
    apt-mark auto $(dpkg-query -W -f="\${Package}\n") >/dev/null
    apt-mark manual apt ca-certificates \
      $(dpkg-query -W -f="\${Package} \${Priority}\n" | awk "\$2 == \"required\" {print \$1}") >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get autoremove --purge -y -qq >/dev/null
    rm -rf /usr/local/rust /usr/local/cargo /var/lib/apt/lists/* /var/cache/apt/*.bin
    # The CA bundle of Debian again (the builder carries the host bundle).
    update-ca-certificates --fresh >/dev/null
    rm -f /etc/apt/sources.list
    cat > /etc/apt/sources.list.d/debian.sources <<EOF
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://deb.debian.org/debian-security
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
  ')
  docker start -a "$container"
  docker export "$container" | docker import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'CMD ["bash"]' \
    - "$DEBIAN_IMAGE" >/dev/null
  docker rm "$container" >/dev/null
  container=""
  log "$DEBIAN_IMAGE: derived from $BUILDER_IMAGE ($(docker image inspect -f '{{.Size}}' "$DEBIAN_IMAGE") bytes)"
}

# build IMAGE DOCKERFILE [EXTRA FILE...]: the build context is a scratch
# directory with the Dockerfile, the host's CA bundle and the extra files.
build() {
  local image=$1 dockerfile=$2; shift 2
  if present "$image" && [ -z "${REBUILD:-}" ]; then
    log "$image: present"
    return 0
  fi
  local ctx=$work/$(basename "$dockerfile" .Dockerfile)
  mkdir -p "$ctx"
  cp "$dockerfile" "$@" "$ctx/"
  cp "$HOST_CA" "$ctx/host-ca.crt"
  docker build -q --build-arg BASE_IMAGE="$DEBIAN_IMAGE" -f "$ctx/$(basename "$dockerfile")" -t "$image" "$ctx" >/dev/null
  log "$image: built ($(docker image inspect -f '{{.Size}}' "$image") bytes)"
}

if [ -n "${REBUILD:-}" ] || ! present "$POSTGRES_IMAGE" || ! present "$NATS_IMAGE" || ! present "$HAPROXY_IMAGE"; then
  if present "$DEBIAN_IMAGE"; then
    log "$DEBIAN_IMAGE: present"
  elif timeout 60 docker pull -q "$DEBIAN_IMAGE" >/dev/null 2>&1; then
    log "$DEBIAN_IMAGE: pulled"
  else
    log "$DEBIAN_IMAGE: cannot be pulled; deriving it from the local Debian base"
    derive_debian
  fi
fi
build "$POSTGRES_IMAGE" postgres.Dockerfile postgres-entrypoint.sh
build "$NATS_IMAGE" nats.Dockerfile nats-server.conf
build "$HAPROXY_IMAGE" haproxy.Dockerfile
