#!/usr/bin/env bash
# The README's test command: on a fresh Debian machine, as root, installs what the tests need
# (Debian packages, cargo-nextest, a Python virtualenv with Helm, the image's base for
# podman), builds the workspace and runs every test. CI (.ci/run) runs exactly this.
#
#   ./test.sh [NEXTEST ARGS...]      e.g. ./test.sh -p mortar-packaging
set -euo pipefail
case "${1:-}" in -h|--help) sed -n '2,6p' "$0"; exit 0 ;; esac
cd "$(dirname "$0")"

need=()
command -v fusermount3 >/dev/null || need+=(fuse3)
command -v setpriv >/dev/null || need+=(util-linux)
command -v umount >/dev/null || need+=(mount)
command -v ip >/dev/null || need+=(iproute2)
command -v bindfs >/dev/null || need+=(bindfs)
# Packaging tests (packaging/): the image is built and run with podman (runc: crun fails
# on this cgroup setup; aardvark-dns: container names resolve on a podman network), its
# base made with debootstrap; shell scripts are checked with shellcheck.
command -v podman >/dev/null || need+=(podman)
command -v runc >/dev/null || need+=(runc)
[ -x /usr/lib/podman/netavark ] || need+=(netavark)
[ -x /usr/lib/podman/aardvark-dns ] || need+=(aardvark-dns)
# netavark sets up container networks (the image build's RUN steps too) with iptables.
command -v iptables >/dev/null || need+=(iptables)
command -v debootstrap >/dev/null || need+=(debootstrap)
command -v shellcheck >/dev/null || need+=(shellcheck)
if [ ${#need[@]} -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${need[@]}"
fi
[ -e /dev/fuse ] || { echo ".ci/run: /dev/fuse is missing" >&2; exit 1; }
command -v cargo-nextest >/dev/null || cargo install --locked cargo-nextest
# The public POSIX suites (e2e/tests/conformance.rs): pjdfstest needs a user named `tests`
# (and `nobody`, which Debian has).
export PATH="$PATH:${CARGO_HOME:-$HOME/.cargo}/bin"
command -v pjdfstest >/dev/null || cargo install --locked pjdfstest@0.2.2
command -v fsx >/dev/null || cargo install --locked fsx@0.3.2
# The bounded fuzzing run (e2e/tests/fuzz.rs, fuzz/ci.sh).
command -v cargo-fuzz >/dev/null || cargo install --locked cargo-fuzz@0.13.2
id tests >/dev/null 2>&1 || useradd -M tests

# Helm (as a library: PyPI's helm-python-sdk bundles real Helm, render + lint offline) and
# kubernetes-validate, in a virtualenv the packaging tests look for (MORTAR_TOOLS_VENV).
tools="${MORTAR_TOOLS_VENV:-/opt/mortar-tools}"
if ! "$tools/bin/python3" -c 'import helm_python, kubernetes_validate, jsonschema, yaml' 2>/dev/null; then
  python3 -m venv "$tools" 2>/dev/null || {
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv
    python3 -m venv "$tools"
  }
  "$tools/bin/pip" install -q --disable-pip-version-check \
    'helm-python-sdk==0.2.2' 'kubernetes-validate==1.37.0'
fi

# Podman: runc (see above), and ulimits within this machine's. Rootful podman gives
# containers RLIMIT_NOFILE 1048576 by default and runs conmon with RLIMIT_NPROC 32768; root
# here lacks CAP_SYS_RESOURCE, so runc cannot raise a hard limit above the one it has, and
# every container fails with "error setting rlimit type 7 (then 6): operation not permitted".
mkdir -p /etc/containers/containers.conf.d
nofile="$(ulimit -Hn)"; [ "$nofile" = unlimited ] && nofile=1048576
nproc="$(ulimit -Hu)"; { [ "$nproc" = unlimited ] || [ "$nproc" -gt 32768 ]; } && nproc=32768
cat > /etc/containers/containers.conf.d/50-mortar-ci.conf <<EOF
# Written by mortar's .ci/run.
[containers]
default_ulimits = ["nofile=$nofile:$nofile", "nproc=$nproc:$nproc"]
[engine]
runtime = "runc"
EOF
# The image's base, made locally (no registry to pull from) under the name the Dockerfile uses.
base=docker.io/library/debian:bookworm-slim
if ! podman image exists "$base"; then
  rootfs="$(mktemp -d /var/tmp/mortar-rootfs.XXXXXX)"
  debootstrap --variant=minbase bookworm "$rootfs" http://deb.debian.org/debian >/dev/null
  tar -C "$rootfs" -c . | podman import --change 'CMD ["/bin/bash"]' - "$base" >/dev/null
  rm -rf "$rootfs"
fi

# One build, never rebuilt in place: incremental state would only take disk (it once
# filled CI's).
export CARGO_INCREMENTAL=0
cargo build --workspace
fuzz/ci.sh --build-only
cargo nextest run --workspace "$@"
