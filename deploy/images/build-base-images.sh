#!/usr/bin/env bash
# Builds faithful local stand-ins for the Dockerfile's base images when they
# cannot be pulled (no registry here; air-gapped sites), from Debian packages:
#
#   runtime  gcr.io/distroless/cc-debian12:nonroot
#            glibc, libgcc, ca-certificates, tzdata and a `nonroot` user
#            (65532), nothing else: no shell, no package manager.
#   builder  rust:1.95-bookworm
#            Debian bookworm (debootstrap, minbase) with gcc and libc headers,
#            this machine's Rust toolchain, and this machine's CA bundle so a
#            build inside it can fetch crates through TLS inspection.
#
# An image that already exists locally, or that can be pulled, is left alone.
# BASE_IMAGES=runtime (or builder) limits the script to one of them.
# Needs root, debootstrap and apt (installs debootstrap if missing).
set -euo pipefail

RUNTIME_IMAGE=${RUNTIME_IMAGE:-gcr.io/distroless/cc-debian12:nonroot}
BUILDER_IMAGE=${BUILDER_IMAGE:-rust:1.95-bookworm}
SUITE=${SUITE:-bookworm}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
TOOLCHAIN=${TOOLCHAIN:-$(rustc --print sysroot)}
HOST_CA=${HOST_CA:-/etc/ssl/certs/ca-certificates.crt}

log() { printf '[base-images] %s\n' "$*" >&2; }

have_or_pull() {
  local image=$1
  if docker image inspect "$image" >/dev/null 2>&1; then
    log "$image: present"
    return 0
  fi
  if timeout 60 docker pull -q "$image" >/dev/null 2>&1; then
    log "$image: pulled"
    return 0
  fi
  log "$image: cannot be pulled; building it locally"
  return 1
}

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

build_runtime() {
  local root=$work/runtime debs=$work/debs
  mkdir -p "$root" "$debs"
  apt-get update -qq
  (cd "$debs" && apt-get download -qq libc6 libgcc-s1 ca-certificates tzdata)
  for deb in "$debs"/*.deb; do dpkg-deb -x "$deb" "$root"; done
  # What ca-certificates' postinst would generate: the bundle of Debian's
  # (Mozilla's) roots.
  mkdir -p "$root/etc/ssl/certs"
  find "$root/usr/share/ca-certificates" -name '*.crt' -print0 | sort -z \
    | xargs -0 cat > "$root/etc/ssl/certs/ca-certificates.crt"
  # Only what the binary needs at run time; documentation and helper scripts go.
  rm -rf "$root/usr/share/doc" "$root/usr/share/man" "$root/usr/share/lintian" \
    "$root/usr/sbin" "$root/usr/bin" "$root/sbin" "$root/usr/lib/x86_64-linux-gnu/gconv" \
    "$root/usr/share/ca-certificates" "$root/etc/ca-certificates.conf"
  mkdir -p "$root/tmp" "$root/home/nonroot" "$root/root"
  chmod 1777 "$root/tmp"
  cat > "$root/etc/passwd" <<'P'
root:x:0:0:root:/root:/sbin/nologin
nobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin
nonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin
P
  cat > "$root/etc/group" <<'G'
root:x:0:
nobody:x:65534:
nonroot:x:65532:
G
  chown 65532:65532 "$root/home/nonroot"
  tar --numeric-owner -C "$root" -c . | docker import \
    --change 'USER 65532:65532' \
    --change 'WORKDIR /home/nonroot' \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt' \
    - "$RUNTIME_IMAGE" >/dev/null
  log "$RUNTIME_IMAGE: built ($(docker image inspect -f '{{.Size}}' "$RUNTIME_IMAGE") bytes)"
}

build_builder() {
  local root=$work/builder
  command -v debootstrap >/dev/null || { apt-get update -qq; apt-get install -y -qq debootstrap >/dev/null; }
  debootstrap --variant=minbase \
    --include=ca-certificates,gcc,libc6-dev,make,pkg-config \
    "$SUITE" "$root" "$MIRROR" >"$work/debootstrap.log" 2>&1 \
    || { tail -20 "$work/debootstrap.log" >&2; exit 1; }
  # This machine's toolchain (binaries and libraries, not the docs).
  mkdir -p "$root/usr/local/rust"
  for part in bin lib libexec etc; do
    [ -e "$TOOLCHAIN/$part" ] && cp -a "$TOOLCHAIN/$part" "$root/usr/local/rust/"
  done
  mkdir -p "$root/usr/local/cargo"
  # The host's CA bundle, which includes any TLS-inspection root.
  cp "$HOST_CA" "$root/etc/ssl/certs/ca-certificates.crt"
  rm -rf "$root/var/cache/apt/archives"/*.deb "$root/var/lib/apt/lists"/* "$root/usr/share/doc"
  tar --numeric-owner -C "$root" -c . | docker import \
    --change 'ENV PATH=/usr/local/cargo/bin:/usr/local/rust/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV CARGO_HOME=/usr/local/cargo' \
    --change 'ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt' \
    --change 'WORKDIR /' \
    - "$BUILDER_IMAGE" >/dev/null
  log "$BUILDER_IMAGE: built ($(docker image inspect -f '{{.Size}}' "$BUILDER_IMAGE") bytes)"
}

# BASE_IMAGES selects which (default both): "runtime", "builder".
case ${BASE_IMAGES:-runtime builder} in *runtime*) have_or_pull "$RUNTIME_IMAGE" || build_runtime ;; esac
case ${BASE_IMAGES:-runtime builder} in *builder*) have_or_pull "$BUILDER_IMAGE" || build_builder ;; esac
