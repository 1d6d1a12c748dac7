# nbdfault: an NBD server that fails requests on YAML policies, as a small non-root image.
#
#   docker build -t nbdfault .
#   docker run --rm -p 127.0.0.1:10809:10809 -p 127.0.0.1:10810:10810 nbdfault
#
# Configuration file, environment, volumes, the control token: docs/docker.md.

# ---------------------------------------------------------------------------------------------
# The workspace's skeleton: its manifests and Cargo.lock, with every Rust source replaced by a
# stub and every other file left out. It changes only when a manifest, the lock file or the set of
# source files does, so the dependencies below are compiled in a layer of their own and rebuilt
# only then, whatever targets the manifests declare.
FROM rust:1.95-bookworm AS skeleton
WORKDIR /src
COPY . .
RUN set -eu; \
    find . -type f ! -name Cargo.toml ! -name Cargo.lock ! -name '*.rs' -delete; \
    find . -type f -name '*.rs' -exec sh -c 'for file; do printf "fn main() {\n}\n" > "$file"; done' sh {} +

# ---------------------------------------------------------------------------------------------
# Build stage: the official Rust image, the toolchain this project is tested with.
FROM rust:1.95-bookworm AS builder
WORKDIR /src

# The release profile keeps line tables for backtraces; the image ships a stripped binary instead
# (about 5 MB rather than 33 MB). Environment, so Cargo.toml stays the one developers use.
ENV CARGO_PROFILE_RELEASE_DEBUG=false \
    CARGO_PROFILE_RELEASE_STRIP=symbols \
    CARGO_TERM_COLOR=never

# The dependencies, from the skeleton. --locked: exactly the versions in Cargo.lock, or the build
# fails.
COPY --from=skeleton /src ./
RUN cargo build --release --locked -p nbdfault

# The real sources. They are touched so that they are newer than the stubs' build, which cargo
# then never keeps, whatever times COPY gave them.
# /rootfs/var/lib/nbdfault becomes the state directory; a named volume mounted there starts with
# its owner, the runtime's nonroot user.
COPY . .
RUN set -eux; \
    find . -type f -name '*.rs' -exec touch {} +; \
    cargo build --release --locked -p nbdfault; \
    target/release/nbdfault --version; \
    mkdir -p /rootfs/var/lib/nbdfault

# ---------------------------------------------------------------------------------------------
# Runtime: glibc and libgcc only, no shell, no package manager; user nonroot (65532).
FROM gcr.io/distroless/cc-debian12:nonroot

LABEL org.opencontainers.image.title="nbdfault" \
      org.opencontainers.image.description="An NBD server that fails requests asynchronously, on YAML policies" \
      org.opencontainers.image.source="https://github.com/nbdfault/nbdfault" \
      org.opencontainers.image.documentation="https://github.com/nbdfault/nbdfault/blob/main/docs/docker.md" \
      org.opencontainers.image.licenses="MIT OR Apache-2.0"

COPY --from=builder /src/target/release/nbdfault /usr/local/bin/nbdfault
COPY docker/nbdfault.yaml /etc/nbdfault/nbdfault.yaml
COPY --from=builder --chown=65532:65532 /rootfs/var/lib/nbdfault /var/lib/nbdfault

# The configuration file is read from NBDFAULT_CONFIG: mount your own over it. Addresses come from
# the environment, which wins over the file. Inside a container they listen on every interface, or
# published ports could not reach them; NBD has no authentication and the control API can rewrite
# every export, so publish them on trusted addresses only, and set NBDFAULT_CONTROL_TOKEN when the
# control port is reachable by others (docs/docker.md). `nbdfault ctl` (and so the health check)
# finds the control API from NBDFAULT_CONTROL too, reading 0.0.0.0 as 127.0.0.1.
ENV NBDFAULT_CONFIG=/etc/nbdfault/nbdfault.yaml \
    NBDFAULT_LISTEN=0.0.0.0:10809 \
    NBDFAULT_CONTROL=0.0.0.0:10810

USER 65532:65532
WORKDIR /var/lib/nbdfault
EXPOSE 10809 10810

# `nbdfault ctl health` exits non-zero unless the control API answers; it sends the token from
# NBDFAULT_CONTROL_TOKEN or NBDFAULT_CONTROL_TOKEN_FILE when there is one. No curl or shell needed.
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
    CMD ["/usr/local/bin/nbdfault", "ctl", "health"]

# The server is PID 1 and handles SIGTERM itself (stops accepting, finishes in-flight requests,
# flushes, exits 0), so `docker stop` is quick without --init. Arguments go to `nbdfault serve`.
ENTRYPOINT ["/usr/local/bin/nbdfault", "serve"]
