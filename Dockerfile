# lb in a container: a statically linked lb on an empty image (no shell, no libc), run as
# the numeric user 10001 so Kubernetes' runAsNonRoot accepts it, as PID 1.
#
# Build:  docker build -t lb .            (podman: podman build --format docker -t lb .)
# Run:    docker run -v $PWD/lb.yaml:/etc/lb/lb.yaml:ro -p 8080:8080 lb
#
# lb runs your app, so the app's files and runtime must be in the same image; most apps
# copy lb into their own image (docs/production.md, "Docker and podman"):
#   COPY --from=lb /usr/local/bin/lb /usr/local/bin/lb
#
# Without Docker Hub, build the `prebuilt` stage from a static lb built on the host:
#   RUSTFLAGS="-C target-feature=+crt-static" cargo build --release --locked \
#     --target x86_64-unknown-linux-gnu --bin lb
#   mkdir ctx && cp target/x86_64-unknown-linux-gnu/release/lb ctx/
#   podman build --format docker --target prebuilt -f Dockerfile -t lb ctx
# (BuildKit and buildah skip the stages a --target does not need, so the Rust image is
# never pulled.)

FROM docker.io/library/rust:1-slim-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src src
# Cargo.toml names the test worker binary and a bench; their sources must be present to
# parse the manifest.
COPY tests/support tests/support
COPY benches/balance.rs benches/balance.rs
# crt-static links glibc into the binary, so the final image needs no libc. The target is
# spelled out because crt-static then leaves build scripts and proc macros dynamic.
RUN host="$(rustc -vV | sed -n 's/^host: //p')" \
 && RUSTFLAGS="-C target-feature=+crt-static" \
    cargo build --release --locked --target "$host" --bin lb \
 && install -D -m 0755 "target/$host/release/lb" /out/lb

# Everything the image is apart from the binary, shared by both ways of getting one.
FROM scratch AS base
# No shell in here, so a worker `command` must be a list (argv); a plain string would
# need `sh -c`.
ENV PATH=/usr/local/bin:/usr/bin:/bin
WORKDIR /etc/lb
# Numeric, so a runtime can tell it is not root without an /etc/passwd.
USER 10001:10001
# `docker stop` and Kubernetes send SIGTERM: lb's graceful stop. Give them more time than
# `lb check` prints as the longest stop (docker stop -t, podman stop -t).
STOPSIGNAL SIGTERM
# `lb health` finds the admin address in ./lb.yaml (the WORKDIR), else 127.0.0.1:9900.
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 CMD ["lb", "health"]
# lb is PID 1: it reaps every child and handles the stop signal itself.
ENTRYPOINT ["lb"]
CMD ["--config", "/etc/lb/lb.yaml"]

# lb built on the host (the build context is a folder holding only `lb`).
FROM base AS prebuilt
COPY lb /usr/local/bin/lb

# The default: lb built from source above.
FROM base AS lb
COPY --from=build /out/lb /usr/local/bin/lb
