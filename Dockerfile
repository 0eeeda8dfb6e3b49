# shindensen container image.
#
# Base images are build arguments. Where no registry can be reached,
# deploy/images/build-base-images.sh builds local stand-ins with these
# names from Debian packages (scripts/build-image does that on a failed pull).
ARG BUILDER_IMAGE=rust:1.95-bookworm
ARG RUNTIME_IMAGE=gcr.io/distroless/cc-debian12:nonroot

FROM ${BUILDER_IMAGE} AS builder
WORKDIR /src
ENV SQLX_OFFLINE=true CARGO_TERM_COLOR=never CARGO_INCREMENTAL=0

# Dependencies first, in their own layer: rebuilt only when the manifest or
# the lock file changes, not on every source edit.
# The load generator is a workspace member: its manifest (and a stub) lets
# cargo resolve the workspace; it is never built here.
COPY Cargo.toml Cargo.lock ./
COPY bench/Cargo.toml bench/Cargo.toml
COPY .cargo .cargo
RUN mkdir src bench/src \
 && echo 'fn main() {}' > src/main.rs \
 && echo 'fn main() {}' > bench/src/main.rs \
 && touch src/lib.rs \
 && cargo build --release --locked -p shindensen \
 && rm -rf src target/release/.fingerprint/shindensen-* target/release/deps/shindensen-* \
           target/release/deps/libshindensen-*

# The service. Queries are checked against the committed .sqlx data: no
# database is needed to build.
COPY migrations migrations
COPY .sqlx .sqlx
COPY src src
# The browser client, embedded in the binary (src/http/web.rs).
COPY web web
RUN cargo build --release --locked -p shindensen --bin shindensen \
 && install -D target/release/shindensen /out/shindensen \
 && mkdir -p /out/data

FROM ${RUNTIME_IMAGE}
ARG VERSION=0.1.0
ARG REVISION=unknown
LABEL org.opencontainers.image.title="shindensen" \
      org.opencontainers.image.description="Messenger backend: chats, real-time WebSocket delivery, durable history" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.licenses="MIT" \
      org.opencontainers.image.base.name="gcr.io/distroless/cc-debian12:nonroot"
COPY --from=builder /out/shindensen /usr/local/bin/shindensen
COPY --from=builder --chown=65532:65532 /out/data /data
USER 65532:65532
WORKDIR /data
ENV DATABASE_URL=sqlite:/data/shindensen.db \
    SHINDENSEN_SERVER__LISTEN=0.0.0.0:3000 \
    SHINDENSEN_LOG__FORMAT=json
VOLUME ["/data"]
EXPOSE 3000
HEALTHCHECK --interval=10s --timeout=5s --start-period=15s --retries=3 \
  CMD ["/usr/local/bin/shindensen", "healthcheck"]
ENTRYPOINT ["/usr/local/bin/shindensen"]
CMD ["serve"]
