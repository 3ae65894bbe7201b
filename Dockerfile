# Tasker image: tasker-orchestrator, tasker-worker and the tasker CLI on a slim
# Debian, running as a non-root user. Migrations are embedded in the binaries
# (`tasker-orchestrator migrate`); the repository's templates are published at
# orchestrator start-up from /etc/tasker/templates.
#
# Targets:
#   runtime (the default): compiles the workspace in the Rust image.
#       docker build -t tasker:latest .
#   runtime-prebuilt: packages binaries already compiled on the host, for
#   machines that cannot pull a Rust image (or to skip the in-image compile).
#       cargo build --release --bins
#       docker build --target runtime-prebuilt -t tasker:latest .
#
# Base images are build arguments, so a site with its own registry mirror can
# point at it:
#   --build-arg RUST_IMAGE=registry.example/rust:1-bookworm
#   --build-arg RUNTIME_IMAGE=registry.example/debian:bookworm-slim
# Keep both on the same Debian release (bookworm): the binaries link against
# the build image's glibc.
#
# Stage order matters: the classic (non-BuildKit) builder builds every stage
# above the requested target, so runtime-prebuilt comes before the Rust stage
# and `--target runtime-prebuilt` never needs the Rust image.

ARG RUST_IMAGE=rust:1-bookworm
ARG RUNTIME_IMAGE=debian:bookworm-slim

# ---------------------------------------------------------------------------
# What every runtime image has: curl (the health check), CA certificates
# (sslmode=require), the user, entrypoint, templates and defaults.
FROM ${RUNTIME_IMAGE} AS runtime-base

RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends ca-certificates curl \
    && rm -rf /var/lib/apt/lists/*

RUN groupadd --system --gid 10001 tasker \
    && useradd --system --uid 10001 --gid tasker --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin tasker

COPY templates/ /etc/tasker/templates/
COPY docker/entrypoint.sh /usr/local/bin/tasker-entrypoint
COPY docker/healthcheck.sh /usr/local/bin/tasker-healthcheck

ENV TASKER_TEMPLATES_DIR=/etc/tasker/templates \
    LOG_FORMAT=json

USER 10001:10001
# Orchestrator (API, health, metrics) and worker (health, metrics) defaults.
EXPOSE 8080 8081
# SIGTERM is the graceful shutdown (exit 0 after TASKER_SHUTDOWN_TIMEOUT_MS at
# most, 30 s by default): give `docker stop` a longer timeout than that.
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 CMD ["tasker-healthcheck"]
ENTRYPOINT ["tasker-entrypoint"]
CMD ["tasker-orchestrator", "serve"]

# ---------------------------------------------------------------------------
# Binaries compiled on the host (glibc of the host must not be newer than
# the runtime image's: build on bookworm, or in the Rust image below).
FROM runtime-base AS runtime-prebuilt
COPY target/release/tasker-orchestrator target/release/tasker-worker target/release/tasker /usr/local/bin/

# ---------------------------------------------------------------------------
# The in-image compile. SQLX_OFFLINE: queries are checked against .sqlx/, no
# database needed.
FROM ${RUST_IMAGE} AS builder
ENV SQLX_OFFLINE=true
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bins \
    && mkdir -p /out \
    && cp target/release/tasker-orchestrator target/release/tasker-worker target/release/tasker /out/

# ---------------------------------------------------------------------------
FROM runtime-base AS runtime
COPY --from=builder /out/ /usr/local/bin/
