# lb in a container. Build:  docker build -t lb .
# Run:    docker run -v $PWD/lb.yaml:/etc/lb/lb.yaml -p 8080:8080 lb
# lb must live beside your app's runtime, so most apps copy the binary into their own image:
#   COPY --from=lb /usr/local/bin/lb /usr/local/bin/lb

FROM rust:1-slim-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src src
# Cargo.toml names the test worker binary; its source must be present to parse the manifest.
COPY tests/support tests/support
RUN cargo build --release --locked --bin lb

FROM debian:bookworm-slim
RUN useradd --system --uid 10001 --no-create-home --home-dir /nonexistent lb \
 && mkdir -p /etc/lb
COPY --from=build /src/target/release/lb /usr/local/bin/lb
USER lb
WORKDIR /etc/lb
# lb runs as PID 1: it reaps every child and handles SIGTERM (docker stop) gracefully.
ENTRYPOINT ["lb"]
CMD ["--config", "/etc/lb/lb.yaml"]
