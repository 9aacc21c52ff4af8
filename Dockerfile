# UAPK Gateway image. The same image runs the gateway (as UID 14337, read-only root filesystem,
# writes only under /var/lib/uapk) and the `init-iptables` init container (which needs iptables).
FROM rust:1-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY crates ./crates
RUN cargo build --release --locked --bin uapk-gateway

FROM debian:bookworm-slim
LABEL org.opencontainers.image.title="uapk-gateway" \
      org.opencontainers.image.description="Egress firewall and black-box recorder for AI agents" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates=20230311* iptables=1.8.9* \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --gid 14337 uapk \
    && useradd --uid 14337 --gid 14337 --no-create-home --home-dir /var/lib/uapk --shell /usr/sbin/nologin uapk \
    && mkdir -p /var/lib/uapk /etc/uapk \
    && chown 14337:14337 /var/lib/uapk
COPY --from=build /src/target/release/uapk-gateway /usr/local/bin/uapk-gateway
USER 14337:14337
WORKDIR /var/lib/uapk
VOLUME ["/var/lib/uapk"]
EXPOSE 15080 15001 15021
ENTRYPOINT ["/usr/local/bin/uapk-gateway"]
CMD ["run", "-c", "/etc/uapk/config/gateway.yaml"]
