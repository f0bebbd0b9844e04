# One image with every Mortar binary: mortar-brick, mortar-mount (+ mount.mortar), mortar,
# mortar-operator, mortar-csi. Builds with any OCI builder (docker, podman, buildah).
#
#   docker build -t mortar:0.1.0 .                      # compiles the workspace in a Rust stage
#   podman build -t mortar:0.1.0 --build-arg BINARIES=prebuilt CONTEXT
#                                                       # copies CONTEXT/prebuilt/* instead
#
# e2e/local/build-image.sh prepares such a context from target/release (or target/debug);
# CI builds that way so the Rust workspace is compiled once, on the host. The unused
# binaries-* stage is skipped by BuildKit and buildah/podman (kaniko: --skip-unused-stages).

ARG BASE_IMAGE=docker.io/library/debian:bookworm-slim
ARG RUST_IMAGE=docker.io/library/rust:1-bookworm
# source | prebuilt
ARG BINARIES=source

FROM ${RUST_IMAGE} AS binaries-source
WORKDIR /src
COPY . .
RUN cargo build --release --locked --workspace --bins \
 && mkdir /out \
 && cd target/release \
 && cp mortar-brick mortar-mount mortar mortar-operator mortar-csi /out/

FROM scratch AS binaries-prebuilt
COPY prebuilt/ /out/

FROM binaries-${BINARIES} AS binaries

FROM ${BASE_IMAGE}
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="mortar" \
      org.opencontainers.image.description="Mortar replicated shared filesystem: bricks, FUSE client, admin CLI, operator, CSI driver" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0"
# fuse3: fusermount3 and /etc/fuse.conf for the FUSE client; ca-certificates for the
# operator's API server connection outside a cluster.
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends fuse3 ca-certificates \
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin \
 && groupadd --system --gid 65532 mortar \
 && useradd --uid 65532 --gid 65532 --home-dir /nonexistent --no-create-home \
            --shell /usr/sbin/nologin mortar \
 && mkdir -p /bricks /etc/mortar /var/log/mortar
COPY --from=binaries /out/ /usr/local/bin/
# `mount -t mortar HOST:/data /mnt` runs /sbin/mount.mortar.
RUN ln -s /usr/local/bin/mortar-mount /usr/sbin/mount.mortar \
 && mortar-brick --version && mortar-mount --version && mortar --version \
 && mortar-operator --version && mortar-csi --version
# Non-root by default: the operator and the CSI controller need nothing more. Bricks (they
# keep owners and trusted.* xattrs), mounts and the CSI node plugin run as root with the
# privileges their pod spec or `podman run` grants.
USER 65532:65532
CMD ["mortar", "--help"]
