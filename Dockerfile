# syntax=docker/dockerfile:1

# One image holds every choreo binary; compose.yaml picks the binary with `command:`.

FROM rust:1.95-bookworm AS builder
WORKDIR /src
COPY . .
# The cache mounts keep the crate registry and compiled dependencies between builds. A cache mount is not part
# of the image, so the binaries are copied out of the target directory in the same step.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p choreo-workers -p choreo-shipping -p choreoctl \
    && mkdir -p /out \
    && cp target/release/order-worker target/release/payment-worker target/release/inventory-worker \
          target/release/shipping-worker target/release/choreoctl /out/

FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/*
# A fixed numeric id, so that orchestrators can check `runAsNonRoot` without reading /etc/passwd.
RUN groupadd --system --gid 10001 choreo \
    && useradd --system --uid 10001 --gid choreo --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin choreo
COPY --from=builder /out/order-worker /out/payment-worker /out/inventory-worker /out/shipping-worker \
     /out/choreoctl /usr/local/bin/
USER 10001:10001
CMD ["choreoctl", "--help"]
