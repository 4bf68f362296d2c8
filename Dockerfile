# syntax=docker/dockerfile:1
# Build: the release binary, with dependencies cached in their own layer.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin coven \
    && cp target/release/coven /usr/local/bin/coven

# Run: a small Debian with CA certificates (Discord is HTTPS) and curl for healthchecks,
# as an unprivileged user.
FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates curl \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --no-create-home coven
COPY --from=build /usr/local/bin/coven /usr/local/bin/coven
ENV LOG_FORMAT=json
USER coven
EXPOSE 3000 3001 3100
ENTRYPOINT ["/usr/local/bin/coven"]
CMD ["demo", "--bind", "0.0.0.0:3000", "--sim-bind", "0.0.0.0:3100"]
