# OATS container images: one static (musl) binary, two final targets.
#
#   API server (default target, the last stage):
#     docker build -t oats-backend-api:0.1.0 .
#   Agent image (same binary, `oats agent`: the demo agent when no LLM gateway is configured;
#   also the launcher that agents of other images get, see `oats install-launcher`):
#     docker build --target agent -t oats-agent:0.1.0 .
#
# Both final images are FROM scratch: no shell, no package manager, only
# /oats, the CA bundle, a passwd/group entry for 65532 and an empty /tmp.
# They run as 65532:65532 and work with readOnlyRootFilesystem: true.

ARG RUST_VERSION=1.95

###############################################################################
# Builder: static x86_64 musl binary
###############################################################################
FROM rust:${RUST_VERSION}-bookworm AS builder

ARG TARGET=x86_64-unknown-linux-musl

# musl-tools provides musl-gcc, needed by crates with C/asm parts (ring).
RUN apt-get update \
 && apt-get install -y --no-install-recommends musl-tools ca-certificates \
 && rm -rf /var/lib/apt/lists/*

RUN rustup target add "${TARGET}"

ENV CARGO_TERM_COLOR=never \
    CARGO_INCREMENTAL=0 \
    CC_x86_64_unknown_linux_musl=musl-gcc

WORKDIR /build

# 1) Dependencies only: build the locked dependency graph against a dummy
#    main so this (slow) layer is reused until Cargo.toml/Cargo.lock change.
#    Afterwards remove the dummy `oats` artifacts (and the dummy src/), so
#    the real build below can never reuse them.
COPY Cargo.toml Cargo.lock ./
RUN mkdir -p src \
 && echo 'fn main() {}' > src/main.rs \
 && for bin in $(grep -o 'path = "src/[^"]*\.rs"' Cargo.toml | cut -d'"' -f2); do \
      mkdir -p "$(dirname "$bin")" && echo 'fn main() {}' > "$bin"; \
    done \
 && cargo build --release --locked --target "${TARGET}" --bin oats \
 && rm -rf src \
      "target/${TARGET}/release/oats" \
      "target/${TARGET}/release/oats.d" \
      target/${TARGET}/release/deps/oats-* \
      target/${TARGET}/release/deps/liboats-* \
      target/${TARGET}/release/.fingerprint/oats-*

# 2) The real sources. COPY keeps the files' original mtimes, which can be
#    older than the dummy build: touch them so cargo always rebuilds `oats`.
#    (If the crate grows a build.rs or other non-src inputs, COPY them here.)
COPY src ./src
# The git revision reported by oats_build_info: docker build --build-arg OATS_REVISION=$(git rev-parse HEAD)
ARG OATS_REVISION=unknown
ENV OATS_REVISION=${OATS_REVISION}
RUN find src -type f -exec touch {} + \
 && cargo build --release --locked --target "${TARGET}" --bin oats \
 && install -D -m 0755 "target/${TARGET}/release/oats" /out/oats \
 && if readelf -d /out/oats | grep -q NEEDED; then \
      echo "error: /out/oats is dynamically linked" >&2; exit 1; \
    fi

# Minimal root filesystem for the scratch images.
RUN mkdir -p /rootfs/etc /rootfs/tmp \
 && chmod 1777 /rootfs/tmp \
 && echo 'nonroot:x:65532:65532:nonroot:/nonexistent:/sbin/nologin' > /rootfs/etc/passwd \
 && echo 'nonroot:x:65532:' > /rootfs/etc/group

###############################################################################
# Common runtime base (not meant to be used directly)
###############################################################################
FROM scratch AS runtime

COPY --from=builder /rootfs/ /
# CA bundle for outbound TLS (LLM providers, OTLP, ...). In-cluster API
# server TLS uses the service-account CA, not this bundle.
COPY --from=builder /etc/ssl/certs/ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
COPY --from=builder /out/oats /oats

# rustls-native-certs (and OpenSSL-style clients) honour SSL_CERT_FILE.
ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt

USER 65532:65532

###############################################################################
# Demo agent image: docker build --target agent -t oats-agent:0.1.0 .
###############################################################################
FROM runtime AS agent

LABEL org.opencontainers.image.title="oats-agent" \
      org.opencontainers.image.description="OATS agent (runs inside agent Jobs; the demo agent when no LLM gateway is configured)" \
      org.opencontainers.image.licenses="Apache-2.0"

ENTRYPOINT ["/oats", "agent"]

###############################################################################
# API server image (default target; keep this stage LAST):
#   docker build -t oats-backend-api:0.1.0 .
###############################################################################
FROM runtime AS api

LABEL org.opencontainers.image.title="oats-backend-api" \
      org.opencontainers.image.description="OATS REST API: runs LLM agents as Kubernetes Jobs" \
      org.opencontainers.image.licenses="Apache-2.0"

EXPOSE 8000
ENTRYPOINT ["/oats"]
CMD ["serve"]
