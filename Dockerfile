# The image deploy/endpoints-operator.yaml and charts/endpoints-operator run:
#   docker build -t endpoints-operator:0.1.0 .
# Build stage: the official Rust image on Debian bookworm, the toolchain this repository is
# tested with; Cargo.lock pins every dependency (--locked).
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
# Cache mounts keep the registry and target folder between builds; the binary is copied out of
# the cached target folder in the same step.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin endpoints-operator \
    && install -D -m 0755 target/release/endpoints-operator /out/endpoints-operator

# Runtime: the same Debian release, whose glibc and libgcc_s are all the binary links. The user
# is the numeric non-root 65532 the Deployment's securityContext runs as (runAsUser); it needs no
# entry in /etc/passwd.
FROM debian:bookworm-slim
COPY --from=build /out/endpoints-operator /usr/local/bin/endpoints-operator
USER 65532:65532
# The status page, /metrics, /healthz and /readyz (status.listen; the deploy config binds 0.0.0.0).
EXPOSE 9480
ENTRYPOINT ["/usr/local/bin/endpoints-operator"]
# The ConfigMap is mounted at /etc/endpoints-operator.
CMD ["run", "--config", "/etc/endpoints-operator/config.toml"]
