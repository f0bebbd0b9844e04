#!/usr/bin/env bash
# Round trips per operation: how many requests the bricks serve for one create, one
# open+read+close, one stat and one 1 MiB write through a mount, and how long they take there.
set -euo pipefail
usage() {
  cat <<'EOF'
Usage: bench/rpcs.sh [--n N] [--no-leases] [--tls]   (as root)

Starts 3 bricks (127.0.9.21-23, plain TCP unless --tls, directories in a tmpfs) and one
mount, runs each operation N times (default 500) and prints, per operation, the requests
the three bricks served for one operation (by method, from their metrics
mortar_brick_rpc_seconds_count) and the mean time a brick took to serve each (mortar_brick_rpc_seconds),
with the operation's rate. --no-leases mounts with -o no-leases (the mount asks the bricks on
every open, as before leases). Uses target/release binaries if built, else target/debug;
MORTAR_BIN=DIR overrides.
EOF
}
n=500; opts=""; tls=
while [ $# -gt 0 ]; do
  case $1 in
    --n) n=${2:?}; shift ;;
    --no-leases) opts="no-leases" ;;
    --tls) tls=1 ;;
    -h|--help) usage; exit 0 ;;
    *) usage >&2; exit 2 ;;
  esac
  shift
done
root=$(cd "$(dirname "$0")/.." && pwd)
bin=${MORTAR_BIN:-$root/target/release}; [ -x "$bin/mortar-brick" ] || bin=$root/target/debug
work=$(mktemp -d /tmp/mortar-rpcs.XXXXXX)
pids=()
cleanup() {
  umount -l "$work/mnt" 2>/dev/null || true
  for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  umount "$work/store" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
mkdir -p "$work/store" "$work/mnt"
mount -t tmpfs -o size=2g tmpfs "$work/store"
addr() { echo "127.0.9.$((21 + $1)):24100"; }
{
  echo "volume: data"; echo "generation: 1"; echo "bricks:"
  for i in 0 1 2; do echo "  - id: b$i"; echo "    address: $(addr "$i")"; done
} > "$work/volfile.yaml"
transport=(--insecure-plaintext); mtransport=()
if [ -n "$tls" ]; then
  "$bin/mortar" certs ca --out "$work/tls/ca" >/dev/null
  for i in 0 1 2; do
    "$bin/mortar" certs issue --ca "$work/tls/ca" --role brick --name "b$i" --out "$work/tls/b$i" >/dev/null
  done
  "$bin/mortar" certs issue --ca "$work/tls/ca" --role client --name bench --out "$work/tls/client" >/dev/null
  mtransport=(--tls-dir "$work/tls/client")
fi
for i in 0 1 2; do
  t=("${transport[@]}"); [ -n "$tls" ] && t=(--tls-dir "$work/tls/b$i")
  "$bin/mortar-brick" --id "b$i" --dir "$work/store/b$i" --listen "$(addr "$i")" \
    --volfile "$work/volfile.yaml" --log-level warn "${t[@]}" > "$work/b$i.log" 2>&1 &
  pids+=($!)
done
for i in 0 1 2; do
  until (exec 3<>"/dev/tcp/127.0.9.$((21 + i))/24100") 2>/dev/null; do sleep 0.05; done
done
"$bin/mortar-mount" "$(addr 0):/data" "$work/mnt" -f ${opts:+-o "$opts"} "${mtransport[@]}" \
  --log-file "$work/mount.log" > /dev/null 2>&1 &
pids+=($!)
for _ in $(seq 100); do mountpoint -q "$work/mnt" && break; sleep 0.1; done
mountpoint -q "$work/mnt" || { echo "the mount did not come up; its log:" >&2; cat "$work/mount.log" >&2; exit 1; }

echo "Mortar $(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo '?'), $n of each operation, 3 bricks on tmpfs, ${opts:-leases on}${tls:+, TLS}; $(nproc) CPUs"
BRICKS="$(addr 0) $(addr 1) $(addr 2)" python3 - "$work/mnt" "$n" <<'PY'
import os, sys, time, urllib.request
mnt, n = sys.argv[1], int(sys.argv[2])
bricks = os.environ["BRICKS"].split()

def metrics():
    calls, secs = {}, {}
    for b in bricks:
        host, port = b.rsplit(":", 1)
        text = urllib.request.urlopen(f"http://{host}:{int(port) + 1000}/metrics", timeout=5).read().decode()
        for line in text.splitlines():
            if line.startswith("#") or 'method="' not in line:
                continue
            name, value = line.rsplit(" ", 1)
            method = name.split('method="')[1].split('"')[0]
            if name.startswith("mortar_brick_rpc_seconds_count"):
                calls[method] = calls.get(method, 0) + float(value)
            elif name.startswith("mortar_brick_rpc_seconds_sum"):
                secs[method] = secs.get(method, 0) + float(value)
    return calls, secs

def drop_caches():
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3")

def measure(label, op, cold=False):
    if cold:
        drop_caches()
    c0, s0 = metrics()
    t0 = time.perf_counter()
    for i in range(n):
        op(i)
    dt = time.perf_counter() - t0
    c1, s1 = metrics()
    per = []
    for m in sorted(c1):
        k = c1[m] - c0.get(m, 0)
        # Pings and session streams are not the operation's.
        if k <= 0 or m in ("Session", "Health"):
            continue
        mean_us = (s1[m] - s0.get(m, 0)) / k * 1e6
        per.append(f"{m} {k / n:.2f} ({mean_us:.0f} us)")
    total = sum(c1[m] - c0.get(m, 0) for m in c1 if m not in ("Session", "Health")) / n
    print(f"| {label} | {n / dt:,.0f}/s | {dt / n * 1e6:,.0f} us | {total:.2f} | {', '.join(per) or '-'} |")

d = os.path.join(mnt, "d")
os.mkdir(d)
data4k, data1m = b"x" * 4096, b"y" * (1 << 20)
def create(i):
    fd = os.open(f"{d}/f{i}", os.O_CREAT | os.O_WRONLY | os.O_EXCL, 0o644)
    os.write(fd, data4k)
    os.close(fd)
def stat(i):
    os.stat(f"{d}/f{i}")
def openread(i):
    fd = os.open(f"{d}/f{i}", os.O_RDONLY)
    assert len(os.read(fd, 8192)) == 4096
    os.close(fd)
big = os.open(os.path.join(mnt, "big"), os.O_CREAT | os.O_WRONLY, 0o644)
def write1m(i):
    os.pwrite(big, data1m, (i % 64) << 20)
def unlink(i):
    os.unlink(f"{d}/f{i}")

print("| operation | rate | time each | brick requests per op (all bricks) | by method: per op (mean time at the brick) |")
print("|---|---:|---:|---:|---|")
measure("create+write+close 4 KiB", create)
measure("stat (kernel caches dropped)", stat, cold=True)
measure("open+read+close 4 KiB (kernel caches dropped)", openread, cold=True)
measure("open+read+close 4 KiB again", openread)
measure("1 MiB write (pwrite)", write1m)
measure("unlink", unlink)
os.close(big)
PY
