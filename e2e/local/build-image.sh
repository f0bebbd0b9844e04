#!/usr/bin/env bash
# Builds the Mortar image.
#
#   e2e/local/build-image.sh [--prebuilt DIR] [--tag TAG]
#
# With --prebuilt, the binaries in DIR (target/release or target/debug, built with
# `cargo build`) are copied into the image, stripped, instead of compiling the workspace in
# a Rust build stage: that is how CI builds, so the workspace is compiled only once.
# The builder is $CONTAINER_TOOL, else podman, else docker.
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
tag="mortar:0.1.0"
prebuilt=""
while [ $# -gt 0 ]; do
  case "$1" in
    --prebuilt) prebuilt="$2"; shift 2 ;;
    --tag) tag="$2"; shift 2 ;;
    -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
    *) echo "build-image.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
tool="${CONTAINER_TOOL:-$(command -v podman || command -v docker || true)}"
[ -n "$tool" ] || { echo "build-image.sh: neither podman nor docker found" >&2; exit 1; }

if [ -z "$prebuilt" ]; then
  exec "$tool" build -t "$tag" -f "$root/Dockerfile" "$root"
fi

ctx="$(mktemp -d "${TMPDIR:-/tmp}/mortar-image.XXXXXX")"
trap 'rm -rf "$ctx"' EXIT
mkdir "$ctx/prebuilt"
for b in mortar-brick mortar-mount mortar mortar-operator mortar-csi; do
  [ -x "$prebuilt/$b" ] || { echo "build-image.sh: $prebuilt/$b missing (cargo build first)" >&2; exit 1; }
  if command -v strip >/dev/null; then
    strip -o "$ctx/prebuilt/$b" "$prebuilt/$b"
  else
    cp "$prebuilt/$b" "$ctx/prebuilt/$b"
  fi
done
cp "$root/Dockerfile" "$ctx/Dockerfile"
"$tool" build -t "$tag" --build-arg BINARIES=prebuilt -f "$ctx/Dockerfile" "$ctx"
