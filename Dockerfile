# Builds the restock-notifier image: a release build on the Rust image, then the two
# binaries on a slim Debian. protoc is vendored by the build, so none is installed.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock build.rs ./
COPY proto proto
COPY migrations migrations
COPY src src
# The operator console's page and committed bundle, embedded by src/console.rs: no
# Node.js here.
COPY console/src/index.html console/src/index.html
COPY console/dist console/dist
RUN cargo build --release --locked --bins

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 restock
COPY --from=build /src/target/release/restock-notifier /usr/local/bin/restock-notifier
COPY --from=build /src/target/release/restock-healthcheck /usr/local/bin/restock-healthcheck
USER restock
ENV RESTOCK_LISTEN=0.0.0.0:50051
EXPOSE 50051 9464
HEALTHCHECK --interval=10s --timeout=5s --start-period=20s --retries=3 \
  CMD ["restock-healthcheck", "127.0.0.1:50051"]
ENTRYPOINT ["restock-notifier"]
