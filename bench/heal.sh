#!/usr/bin/env bash
# Self-heal throughput: fills a 3-brick volume, wipes one brick, and times its full heal.
# Prints files/s and MiB/s. Usage: bench/heal.sh [FILES] [FILE_KIB] [BIG_MIB]
# Uses target/release binaries if built (cargo build --release), else target/debug.
set -euo pipefail
case ${1:-} in
  -h|--help)
    cat <<'EOF'
Usage: bench/heal.sh [FILES] [FILE_KIB] [BIG_MIB]        (as root)

Full-heal throughput: starts 3 bricks on 127.0.9.11-13:24100 and one FUSE mount, writes FILES
files of FILE_KIB KiB (default 2000 of 16) in 20 directories and one BIG_MIB MiB file (default
256), kills brick b2 and wipes its directory, restarts it and times the heal until
`mortar heal info` is empty; then `mortar verify`. Prints files/s and MiB/s.
Uses target/release binaries if built (cargo build --release), else target/debug.
EOF
    exit 0 ;;
esac
files=${1:-2000}; kib=${2:-16}; big=${3:-256}
root=$(cd "$(dirname "$0")/.." && pwd)
bin=$root/target/release; [ -x "$bin/mortar-brick" ] || bin=$root/target/debug
work=$(mktemp -d /tmp/mortar-bench-heal.XXXXXX)
pids=()
cleanup() {
  umount -l "$work/mnt" 2>/dev/null || true
  for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT
addr() { echo "127.0.9.$((11 + $1)):24100"; }
{
  echo "volume: data"; echo "generation: 1"; echo "bricks:"
  for i in 0 1 2; do echo "  - id: b$i"; echo "    address: $(addr $i)"; done
} > "$work/volfile.yaml"
start() {
  "$bin/mortar-brick" --id "b$1" --dir "$work/b$1" --listen "$(addr "$1")" --volfile "$work/volfile.yaml" \
    --heal-interval 1 --heal-rate-mib 0 >> "$work/b$1.log" 2>&1 &
  pids[$1]=$!
}
for i in 0 1 2; do start $i; done
sleep 1
mkdir "$work/mnt"
"$bin/mortar-mount" "$(addr 0):/data" "$work/mnt"
echo "filling: $files files of $kib KiB in 20 directories, and one $big MiB file ($bin)"
for d in $(seq 0 19); do mkdir "$work/mnt/d$d"; done
head -c $((kib * 1024)) /dev/urandom > "$work/sample"
for f in $(seq 0 $((files - 1))); do cp "$work/sample" "$work/mnt/d$((f % 20))/f$f"; done
dd if=/dev/urandom of="$work/mnt/big" bs=1M count="$big" status=none
kill -9 "${pids[2]}"; wait "${pids[2]}" 2>/dev/null || true
rm -rf "$work/b2"
t0=$(date +%s.%N)
start 2
while :; do
  out=$("$bin/mortar" heal info --json "$(addr 0):/data" 2>/dev/null || echo '"gfid"')
  grep -q '"gfid"\|"connected": false' <<<"$out" || break
  sleep 0.2
done
t1=$(date +%s.%N)
"$bin/mortar" verify "$(addr 0):/data" >/dev/null || { echo "verify failed after heal"; exit 1; }
awk -v t0="$t0" -v t1="$t1" -v n="$files" -v kib="$kib" -v big="$big" 'BEGIN {
  s = t1 - t0; mib = n * kib / 1024 + big
  printf "full heal: %d files + %d MiB file (%.0f MiB) in %.2f s: %.0f files/s, %.1f MiB/s\n", n, big, mib, s, (n + 1) / s, mib / s
}'
