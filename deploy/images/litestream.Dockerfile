# Local stand-in for litestream/litestream (used only when that image can be
# neither found nor pulled; build-litestream-image.sh). The same layout as
# upstream: the static binary at /usr/local/bin/litestream as the entrypoint.
ARG RUNTIME_IMAGE=gcr.io/distroless/cc-debian12:nonroot
FROM ${RUNTIME_IMAGE}
COPY litestream /usr/local/bin/litestream
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/litestream"]
