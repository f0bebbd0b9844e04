#!/usr/bin/env bash
# Self-heal speed: how fast a brick that was away or wiped is brought back in sync.
set -euo pipefail
usage() {
  cat <<'EOF'
Usage: bench/heal.sh [--files N] [--kib K] [--big-mib M] [--writer-secs S] [--dir DIR] [--tls]   (as root)

Three self-heal figures on a 3-brick volume (bricks on 127.0.9.11-13:24100, one FUSE mount),
each printed with the goal it is measured against:

  small files   N files of K KiB (default 10000 of 4) in 20 directories; brick b2 is killed,
                its directory wiped, and it is restarted: files/s until `mortar heal info`
                is empty and `mortar verify` agrees (goal: 1000 files/s or more).
  large file    one M MiB file (default 512); b2 wiped again: MiB/s of its heal until the copy
                is on the disk (syncfs), against the write bandwidth of the bricks' disk measured
                here with dd and fdatasync, the median of three runs (goal: 80% or more).
  steady writer a file appended to every 10 ms, with b2 down for S seconds (default 10) and
                back: seconds from b2's restart until nothing is left to heal while the writer
                goes on (goal: 10 s or less).

--dir DIR puts the bricks in DIR (default /var/tmp). --tls runs bricks and clients with mutual TLS
(certificates made with `mortar certs`), as `mortar local up` does; the default is plain TCP. Uses target/release binaries if built
(cargo build --release -p mortar-brick -p mortar-client), else target/debug; MORTAR_BIN=DIR
overrides. LOG=FILTER sets the bricks' log level (their logs stay in the bricks' directory
with KEEP=1).
EOF
}
files=10000; kib=4; big=512; wsecs=10; base=/var/tmp; tls=
while [ $# -gt 0 ]; do
  case $1 in
    --files) files=${2:?}; shift ;;
    --kib) kib=${2:?}; shift ;;
    --big-mib) big=${2:?}; shift ;;
    --writer-secs) wsecs=${2:?}; shift ;;
    --dir) base=${2:?}; shift ;;
    --tls) tls=1 ;;
    -h|--help) usage; exit 0 ;;
    *) usage >&2; exit 2 ;;
  esac
  shift
done
root=$(cd "$(dirname "$0")/.." && pwd)
bin=${MORTAR_BIN:-$root/target/release}; [ -x "$bin/mortar-brick" ] || bin=$root/target/debug
work=$(mktemp -d "$base/mortar-bench-heal.XXXXXX")
pids=(); writer=""
cleanup() {
  [ -n "$writer" ] && kill "$writer" 2>/dev/null
  umount -l "$work/mnt" 2>/dev/null || true
  for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  [ -n "${KEEP:-}" ] || rm -rf "$work"
}
trap cleanup EXIT
addr() { echo "127.0.9.$((11 + $1)):24100"; }
target="$(addr 0):/data"
{
  echo "volume: data"; echo "generation: 1"; echo "bricks:"
  for i in 0 1 2; do echo "  - id: b$i"; echo "    address: $(addr "$i")"; done
} > "$work/volfile.yaml"
start() {
  "$bin/mortar-brick" --id "b$1" --dir "$work/b$1" --listen "$(addr "$1")" --volfile "$work/volfile.yaml" \
    --heal-interval 1 --heal-rate-mib 0 --log-level "${LOG:-info}" "${transport[@]/@/$1}" >> "$work/b$1.log" 2>&1 &
  pids[$1]=$!
}
# Plain TCP, or each brick with its own certificate (@ stands for its index) and the
# commands and the mount with the admin's.
transport=(--insecure-plaintext)
if [ -n "$tls" ]; then
  "$bin/mortar" certs ca --out "$work/tls/ca" >/dev/null
  for i in 0 1 2; do
    "$bin/mortar" certs issue --ca "$work/tls/ca" --role brick --name "b$i" --out "$work/tls/b$i" >/dev/null
  done
  "$bin/mortar" certs issue --ca "$work/tls/ca" --role admin --name bench --out "$work/tls/admin" >/dev/null
  export MORTAR_TLS_DIR=$work/tls/admin
  transport=(--tls-dir "$work/tls/b@")
fi
now() { date +%s.%N; }
# CPU seconds the three bricks have used so far (the heal runs in b2's heal worker).
cpu() {
  local t=0 p
  for p in "${pids[@]}"; do t=$((t + $(awk '{print $14 + $15}' "/proc/$p/stat"))); done
  awk -v t="$t" -v hz="$(getconf CLK_TCK)" 'BEGIN { printf "%.2f", t / hz }'
}
# Waits until no brick has anything left to heal (and all three answer).
wait_healed() {
  # First until every brick listens: a `mortar` started before that retries its connection
  # with a growing pause, which would add up to a second to the time measured.
  local i
  for i in 0 1 2; do
    until (exec 3<>"/dev/tcp/127.0.9.$((11 + i))/24100") 2>/dev/null; do sleep 0.01; done
  done
  while :; do
    out=$("$bin/mortar" heal info --json "$target" 2>/dev/null || echo '"gfid"')
    grep -q '"gfid"\|"connected": false' <<<"$out" || return 0
    sleep 0.1
  done
}
kill_b2() { kill -9 "${pids[2]}"; wait "${pids[2]}" 2>/dev/null || true; }
verify() { "$bin/mortar" verify "$target" >/dev/null || { echo "verify failed after heal" >&2; exit 1; }; }
for i in 0 1 2; do start "$i"; done
sleep 1
mkdir "$work/mnt"
"$bin/mortar-mount" "$target" "$work/mnt"
echo "binaries: $bin; bricks in $work ($(df -T "$work" | awk 'NR == 2 {print $2}'))"

# 1. Small files into a wiped brick.
for d in $(seq 0 19); do mkdir "$work/mnt/d$d"; done
head -c $((kib * 1024)) /dev/urandom > "$work/sample"
fillers=()
for d in $(seq 0 19); do
  ( for f in $(seq "$d" 20 $((files - 1))); do cp "$work/sample" "$work/mnt/d$d/f$f"; done ) &
  fillers+=($!)
done
for p in "${fillers[@]}"; do wait "$p"; done
kill_b2; rm -rf "$work/b2"
t0=$(now); start 2; c0=$(cpu); wait_healed; t1=$(now); c1=$(cpu)
verify
awk -v t0="$t0" -v t1="$t1" -v n="$files" -v kib="$kib" -v cpu="$(awk -v a="$c0" -v b="$c1" 'BEGIN { print b - a }')" 'BEGIN {
  s = t1 - t0
  printf "small files:   %d files of %d KiB into a wiped brick in %.2f s: %.0f files/s (goal: 1000); bricks used %.1f CPU-s\n", n, kib, s, n / s, cpu
}'
rm -rf "${work:?}/mnt/"d*

# 2. One large file into a wiped brick, against the disk's own write bandwidth.
# The disk's figure is the median of three dd runs (one alone varies by a factor of two here),
# each timed to the disk (fdatasync), as the heal below is.
disks=()
for i in 1 2 3; do
  t0=$(now); dd if=/dev/zero of="$work/ddtest" bs=1M count="$big" conv=fdatasync status=none; t1=$(now)
  disks+=("$(awk -v t0="$t0" -v t1="$t1" -v m="$big" 'BEGIN { printf "%.1f", m / (t1 - t0) }')")
  rm -f "$work/ddtest"
done
disk=$(printf '%s\n' "${disks[@]}" | sort -n | sed -n 2p)
dd if=/dev/urandom of="$work/mnt/big" bs=1M count="$big" status=none
wait_healed
# The bricks' own writeback of that file is not the heal's to pay for: flushed first. The
# heal's time runs until its copy is on the disk (a brick does not sync a healed file, so the
# bench does, with syncfs), which is what dd's figure measures too.
sync
kill_b2; rm -rf "$work/b2"
t0=$(now); start 2; wait_healed; t1=$(now); sync -f "$work/b2"; t2=$(now)
verify
awk -v t0="$t0" -v t1="$t1" -v t2="$t2" -v m="$big" -v disk="$disk" -v disks="${disks[*]}" 'BEGIN {
  s = t2 - t0; r = m / s
  printf "large file:    %d MiB into a wiped brick in %.2f s (%.2f s to heal, %.2f s to flush): %.1f MiB/s, %.0f%% of the disk'"'"'s %.1f MiB/s (dd: %s; goal: 80%%)\n", m, s, t1 - t0, t2 - t1, r, 100 * r / disk, disk, disks
}'
rm -f "$work/mnt/big"
wait_healed

# 3. A file under steady writes, its brick away for a while.
( exec 3>>"$work/mnt/log"; while :; do head -c 4096 "$work/sample" >&3; sleep 0.01; done ) &
writer=$!
sleep 1
kill_b2
sleep "$wsecs"
t0=$(now); start 2; wait_healed; t1=$(now)
kill "$writer"; wait "$writer" 2>/dev/null || true; writer=""
wait_healed
verify
awk -v t0="$t0" -v t1="$t1" -v w="$wsecs" -v kb="$(( $(stat -c %s "$work/mnt/log") / 1024 ))" 'BEGIN {
  printf "steady writer: a file appended to every 10 ms (%d KiB in all), its brick away %d s: in sync %.2f s after the brick came back (goal: 10 s)\n", kb, w, t1 - t0
}'
