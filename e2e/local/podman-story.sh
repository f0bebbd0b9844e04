#!/usr/bin/env bash
# Mortar without Kubernetes, in containers: three brick containers on their own podman
# network, client containers that mount the `data` volume with FUSE.
#
#   e2e/local/podman-story.sh [--image mortar:0.1.0] [--keep]
#
# The story: bricks come up; a client mounts through `mount -t mortar` (the mount.mortar
# helper), writes a tree and a 16 MiB file; the three brick directories on the host hold the
# same plain files; a second client sees the data; one brick is killed and writes go on;
# `mortar status` reports it down and `mortar verify --up-only` finds the survivors
# identical; the brick comes back, is healed, and all three copies are identical again.
# Exits non-zero at the first broken step.
# Needs root, podman and /dev/fuse. Build the image first (e2e/local/build-image.sh).
# HEAL_WAIT (seconds, default 60) bounds the wait for self-heal; EXPECT_HEAL=0 tolerates it.
# The client scripts are single-quoted on purpose: they run in the container's shell.
# shellcheck disable=SC2016
set -euo pipefail
image="mortar:0.1.0"
keep=""
while [ $# -gt 0 ]; do
  case "$1" in
    --image) image="$2"; shift 2 ;;
    --keep) keep=1; shift ;;
    -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
    *) echo "podman-story.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done

p="mortar-story-$$"
net="$p"
work="$(mktemp -d "${TMPDIR:-/tmp}/mortar-story.XXXXXX")"
step() { echo "== $*"; }
fail() { echo "podman-story.sh: FAILED: $*" >&2; exit 1; }
cleanup() {
  local rc=$?
  if [ "$rc" -ne 0 ]; then
    for c in $(podman ps -a --filter "name=^$p-" --format '{{.Names}}'); do
      echo "--- logs of $c" >&2
      podman logs --tail 30 "$c" >&2 || true
    done
  fi
  if [ -z "$keep" ]; then
    podman ps -a -q --filter "name=^$p-" | xargs -r podman rm -f -t 2 >/dev/null 2>&1 || true
    podman network rm -f "$net" >/dev/null 2>&1 || true
    rm -rf "$work"
  else
    echo "kept: containers $p-*, network $net, brick directories under $work"
  fi
}
trap cleanup EXIT

command -v podman >/dev/null || fail "podman is not installed"
[ -e /dev/fuse ] || fail "/dev/fuse is missing"
podman image exists "$image" || fail "image $image is missing (e2e/local/build-image.sh)"

step "network $net and the volfile"
podman network create "$net" >/dev/null
mkdir -p "$work/etc" "$work/b0" "$work/b1" "$work/b2"
cat > "$work/etc/volfile.yaml" <<VOL
volume: data
generation: 1
bricks:
  - id: b0
    address: b0:24100
  - id: b1
    address: b1:24100
  - id: b2
    address: b2:24100
VOL

# Bricks run as root with CAP_SYS_ADMIN: they keep every file's owner and Mortar's records
# in trusted.* extended attributes, which only CAP_SYS_ADMIN may write.
start_brick() {
  podman run -d --name "$p-b$1" --network "$net" --network-alias "b$1" \
    --user 0 --cap-add SYS_ADMIN \
    -v "$work/etc:/etc/mortar:ro" -v "$work/b$1:/bricks" \
    "$image" mortar-brick --id "b$1" --dir /bricks/data --listen 0.0.0.0:24100 \
    --volfile /etc/mortar/volfile.yaml --insecure-plaintext >/dev/null
}
# A one-shot container on the network (admin commands).
admin() { podman run --rm --network "$net" "$image" "$@"; }
# A client container: root, /dev/fuse and CAP_SYS_ADMIN to mount.
client() {
  podman run --rm --network "$net" --user 0 --device /dev/fuse --cap-add SYS_ADMIN \
    --security-opt apparmor=unconfined "$image" bash -euo pipefail -c "$1"
}

step "three bricks"
for i in 0 1 2; do start_brick "$i"; done
for _ in $(seq 1 30); do
  if admin mortar status b0:/data >/dev/null 2>&1; then break; fi
  sleep 1
done
admin mortar status b0:/data || fail "bricks did not come up"

step "client 1: mount -t mortar, write a tree and 16 MiB, read back"
client '
  mkdir -p /mnt/data
  mount -t mortar -o backup-volfile-servers=b1:b2 b0:/data /mnt/data
  mkdir -p /mnt/data/app/logs
  echo "hello from client 1" > /mnt/data/app/hello.txt
  ln -s hello.txt /mnt/data/app/link
  chmod 640 /mnt/data/app/hello.txt
  head -c 16777216 /dev/urandom > /mnt/data/app/blob
  sha256sum /mnt/data/app/blob | cut -d" " -f1 > /mnt/data/app/blob.sha256
  sync
  [ "$(cat /mnt/data/app/hello.txt)" = "hello from client 1" ]
  sha256sum -c <(echo "$(cat /mnt/data/app/blob.sha256)  /mnt/data/app/blob")
  umount /mnt/data
'

step "every brick holds the same plain files"
want="$(sha256sum "$work/b0/data/app/blob" | cut -d' ' -f1)"
[ "$want" = "$(cat "$work/b0/data/app/blob.sha256")" ] || fail "b0's blob differs from what was written"
for i in 1 2; do
  [ "$(sha256sum "$work/b$i/data/app/blob" | cut -d' ' -f1)" = "$want" ] || fail "b$i's blob differs"
  cmp -s "$work/b0/data/app/hello.txt" "$work/b$i/data/app/hello.txt" || fail "b$i's hello.txt differs"
  [ "$(readlink "$work/b$i/data/app/link")" = hello.txt ] || fail "b$i's symlink differs"
  [ "$(stat -c %a "$work/b$i/data/app/hello.txt")" = 640 ] || fail "b$i's mode differs"
done
admin mortar verify b0:/data || fail "mortar verify found differences"

step "client 2 sees client 1's data"
client '
  mkdir -p /mnt/data
  mortar-mount b1:/data /mnt/data
  [ "$(cat /mnt/data/app/hello.txt)" = "hello from client 1" ]
  sha256sum -c <(echo "$(cat /mnt/data/app/blob.sha256)  /mnt/data/app/blob")
  umount /mnt/data
'

step "brick b2 killed: writes go on with two of three"
podman kill -s KILL "$p-b2" >/dev/null
client '
  mkdir -p /mnt/data
  mortar-mount -o backup-volfile-servers=b1 b0:/data /mnt/data
  echo "written while b2 was down" > /mnt/data/app/degraded.txt
  sync
  [ "$(cat /mnt/data/app/degraded.txt)" = "written while b2 was down" ]
  sha256sum -c <(echo "$(cat /mnt/data/app/blob.sha256)  /mnt/data/app/blob")
  umount /mnt/data
'
status="$(admin mortar status b0:/data || true)"
echo "$status"
echo "$status" | grep -E '^b2 +b2:24100 +no ' >/dev/null || fail "mortar status does not report b2 down"
echo "$status" | grep -E '^b0 +b0:24100 +yes ' >/dev/null || fail "mortar status does not report b0 up"
admin mortar verify --up-only b0:/data || fail "the surviving bricks differ"

step "brick b2 back"
podman rm -f "$p-b2" >/dev/null
start_brick 2
for _ in $(seq 1 30); do
  if admin mortar status b0:/data >/dev/null 2>&1; then break; fi
  sleep 1
done
admin mortar status b0:/data || fail "b2 did not come back"
admin mortar heal info b0:/data || true

# Self-heal brings b2 up to date by itself: the story waits for it and fails if the bricks
# do not converge (EXPECT_HEAL=0 only reports what it saw).
step "heal: waiting up to ${HEAL_WAIT:-60}s for heal pending 0"
healed=""
for _ in $(seq 1 "${HEAL_WAIT:-60}"); do
  if admin mortar status b0:/data 2>/dev/null | grep -E 'heal pending 0$' >/dev/null; then
    healed=1; break
  fi
  sleep 1
done
if [ -n "$healed" ]; then
  admin mortar verify b0:/data || fail "bricks differ after heal"
  echo "healed: all three bricks identical"
elif [ "${EXPECT_HEAL:-1}" = 1 ]; then
  admin mortar heal info b0:/data || true
  fail "heal did not finish"
else
  echo "NOTE: heal still pending after ${HEAL_WAIT:-60}s (EXPECT_HEAL=0)"
fi

step "podman story passed"
