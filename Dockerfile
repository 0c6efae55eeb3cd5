# ferry's container image: ferryd and ferryctl on slim Debian, run as an unprivileged user.
#
#   docker build -t ferry:0.1.0 .
#   docker run --rm --runtime=nvidia -e NVIDIA_VISIBLE_DEVICES=all \
#       -v /run/ferry:/run/ferry -v /srv/models:/var/lib/ferry/models:ro ferry:0.1.0
#
# The binaries load libcuda and NVML when they start: the NVIDIA container toolkit brings the
# host driver's libraries into the container (capabilities below). Without a GPU, the default
# configuration (device "auto") falls back to the host backend. On Kubernetes: deploy/k8s and
# docs/kubernetes.md. Needs BuildKit (the default builder since Docker 23) for the cache mounts.

# The builder: the toolchain ferry is developed and tested with (it needs at least 1.88).
ARG RUST_VERSION=1.95
FROM rust:${RUST_VERSION}-slim-bookworm AS build
WORKDIR /src
COPY . .
# The README's build of the daemon (its first command, `cargo run --release --bin ferryd`) and
# ferryctl (probes, operators); tests/k8s_manifests.rs checks the two stay the same build.
# --locked: exactly Cargo.lock's versions. The cache mounts keep downloads and build output
# between builds without putting them in a layer.
RUN --mount=type=cache,id=ferry-cargo-registry,target=/usr/local/cargo/registry \
    --mount=type=cache,id=ferry-target,target=/src/target \
    cargo build --release --locked --bin ferryd --bin ferryctl \
    && mkdir -p /out \
    && cp target/release/ferryd target/release/ferryctl /out/

# The runtime: the same Debian release as the builder, so the same glibc.
FROM debian:bookworm-slim
# uid and gid 10001 ("ferry"): deploy/k8s runs ferryd as this user and allows this group on the
# socket. /run/ferry: the socket's directory (0750, the group's). /var/lib/ferry/models: the
# model root of the default configuration (an empty directory until a volume is mounted there).
RUN groupadd --gid 10001 ferry \
    && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin ferry \
    && install -d -o 10001 -g 10001 -m 0750 /run/ferry \
    && install -d -m 0755 /var/lib/ferry/models
COPY --from=build /out/ferryd /out/ferryctl /usr/local/bin/
COPY deploy/ferryd.toml /etc/ferry/ferryd.toml
# compute: libcuda; utility: NVML. Which GPUs: NVIDIA_VISIBLE_DEVICES, set by whoever runs it.
ENV NVIDIA_DRIVER_CAPABILITIES=compute,utility
USER 10001:10001
ENTRYPOINT ["ferryd", "--config", "/etc/ferry/ferryd.toml"]
CMD ["--socket", "/run/ferry/ferryd.sock"]
