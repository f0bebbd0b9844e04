#!/usr/bin/env bash
# Mortar against GlusterFS (and the raw backend directory), side by side in one run, inside a
# network namespace this script creates. Prints a markdown table of figures and ratios.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: bench/compare.sh [options]        (as root)

Benchmarks Mortar against GlusterFS on this machine, in one run, with the same workloads,
and runs every workload on the raw backend directory too (the ceiling). Everything runs in
a network namespace made for the run (a veth pair with 10.231.0.1 for GlusterFS and
10.231.0.11-13 for Mortar's bricks, inside the namespace only) and its own mount namespace;
all of it is stopped and removed at the end, also on failure or Ctrl-C.

  Mortar:    a release build, 3 bricks (mortar-brick) and one FUSE mount (mortar-mount),
             default options
  GlusterFS: glusterd, one replica-3 volume with 3 bricks, mount -t glusterfs, default
             options (Debian glusterfs-server, glusterfs-client; installed if missing)
  raw:       a plain directory on the backend the bricks use
  bricks and raw directory on tmpfs, or with --disk on the disk under --workdir

Workloads, each timed alone on raw, GlusterFS and Mortar in turn, output checked:
  seq write   dd of SEQ MiB, bs=1M, conv=fsync                             MiB/s
  seq read    dd bs=1M of that file, caches dropped first                  MiB/s
  rand write  fio 4 KiB randwrite, psync, O_DIRECT, RUNTIME s, RAND MiB file  IOPS
  rand read   fio 4 KiB randread, the same, caches dropped first           IOPS
  create      N files of 4 KiB (open, one write, close), one process       files/s
  stat        list the directory and stat each file, caches dropped        files/s
  open+read   open, read, close each file by name, caches dropped          files/s
  ls -l       ls -l of the N-file directory, caches dropped                seconds
  unlink      rm of each file by name                                      files/s
  parallel    N files of 4 KiB by P writers, one directory each            files/s
  untar       tar -x of a source tarball (this repo's tracked files, COPIES times)  seconds

Options:
  --quick            small sizes, for a run of a couple of minutes:
                     --seq-mib 64 --rand-mib 64 --runtime 3 --files 1000 --copies 2
  --seq-mib M        size of the sequential file (default 512)
  --rand-mib M       size of the random-I/O file (default 256)
  --runtime S        seconds of each fio run (default 10)
  --files N          files of the small-file workloads (default 10000)
  --parallel P       writers of the parallel workload (default 4)
  --copies C         copies of the repo's sources in the untar tarball (default 20)
  --tarball FILE     untar FILE instead (an uncompressed or compressed tar)
  --disk             bricks and raw directory on disk under --workdir, not on tmpfs
  --workdir DIR      where the run's directory goes (default /var/tmp)
  --mortar-bin DIR   mortar-brick and mortar-mount from DIR instead of running
                     cargo build --release -p mortar-brick -p mortar-client
                     (into $CARGO_TARGET_DIR, default ./target)
  --timeout S        give up on a workload after S seconds (default 900)
  --json FILE        also write the results as JSON to FILE
  -h, --help         this text

Needs root, /dev/fuse, ip(8) with network namespaces and veth, fio and the GlusterFS
packages (apt-get installs glusterfs-server, glusterfs-client and fio if missing).
EOF
}

self=$(readlink -f "$0")
root=$(cd "$(dirname "$self")/.." && pwd)
argv=("$@")
quick=0; seq_mib=""; rand_mib=""; runtime=""; files=""; par=4; copies=""; tarball=""
disk=0; base=/var/tmp; mortar_bin=""; tmo=900; json=""; inner=""
while [ $# -gt 0 ]; do
  case $1 in
    -h|--help) usage; exit 0 ;;
    --quick) quick=1 ;;
    --seq-mib) seq_mib=${2:?}; shift ;;
    --rand-mib) rand_mib=${2:?}; shift ;;
    --runtime) runtime=${2:?}; shift ;;
    --files) files=${2:?}; shift ;;
    --parallel) par=${2:?}; shift ;;
    --copies) copies=${2:?}; shift ;;
    --tarball) tarball=${2:?}; shift ;;
    --disk) disk=1 ;;
    --workdir) base=${2:?}; shift ;;
    --mortar-bin) mortar_bin=${2:?}; shift ;;
    --timeout) tmo=${2:?}; shift ;;
    --json) json=${2:?}; shift ;;
    --_inner) inner=${2:?}; shift ;;  # internal: the phase inside the namespace
    *) echo "compare.sh: unknown argument: $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
if [ "$quick" = 1 ]; then
  : "${seq_mib:=64}" "${rand_mib:=64}" "${runtime:=3}" "${files:=1000}" "${copies:=2}"
else
  : "${seq_mib:=512}" "${rand_mib:=256}" "${runtime:=10}" "${files:=10000}" "${copies:=20}"
fi
for v in "$seq_mib" "$rand_mib" "$runtime" "$files" "$par" "$copies" "$tmo"; do
  [[ $v =~ ^[1-9][0-9]*$ ]] || { echo "compare.sh: not a positive number: $v" >&2; exit 2; }
done
[ "$par" -le "$files" ] || { echo "compare.sh: --parallel must not exceed --files" >&2; exit 2; }

say() { printf '%s\n' "$*" >&2; }
die() { say "compare.sh: $*"; exit 1; }

# Addresses inside the namespace only (never the machine's own): GlusterFS's bricks and
# glusterd on GADDR (glusterd refuses loopback bricks), Mortar's bricks on MADDR.1-3.
NET=10.231.0
GADDR=$NET.1
MADDR=("$NET.11" "$NET.12" "$NET.13")
MPORT=24100
VOL=mortarbench

# Outer phase's clean-up: everything in the namespace, the namespace, the run's directory.
outer_cleanup() {
  set +e
  if ip netns list | awk '{print $1}' | grep -qxF "$ns"; then
    # Whatever still runs in our namespace was started by this run (glusterd, bricks, mounts).
    local pids
    pids=$(ip netns pids "$ns")
    if [ -n "$pids" ]; then
      # shellcheck disable=SC2086
      kill $pids 2>/dev/null
      for _ in $(seq 50); do [ -z "$(ip netns pids "$ns")" ] && break; sleep 0.1; done
      pids=$(ip netns pids "$ns")
      # shellcheck disable=SC2086
      [ -n "$pids" ] && kill -9 $pids 2>/dev/null
    fi
    ip netns del "$ns"
  fi
  # The store was a tmpfs of the namespace's own mount namespace (gone with it); on --disk
  # it is a directory here.
  rm -rf "$work/store" "$work/src-stage"
  if [ "$failed" = 1 ]; then
    say "failed; logs kept in $work/logs"
  else
    rm -rf "$work"
  fi
}
# =========================================================================================
# Outer phase: checks, packages, build, tarball, the namespace; then this script again in it.
# =========================================================================================
if [ -z "$inner" ]; then
  [ "$(id -u)" = 0 ] || die "needs root (network namespace, mounts, drop_caches, glusterd)"
  [ -c /dev/fuse ] || die "/dev/fuse is missing"
  command -v ip >/dev/null || die "ip (iproute2) is missing"
  need=()
  command -v glusterd >/dev/null || need+=(glusterfs-server)
  command -v mount.glusterfs >/dev/null || need+=(glusterfs-client)
  command -v fio >/dev/null || need+=(fio)
  if [ ${#need[@]} -gt 0 ]; then
    say "installing ${need[*]} ..."
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}"; } >&2 \
      || die "apt-get install ${need[*]} failed"
  fi

  if [ -z "$mortar_bin" ]; then
    say "building Mortar (release) ..."
    (cd "$root" && cargo build --release -p mortar-brick -p mortar-client) >&2
    target=${CARGO_TARGET_DIR:-$root/target}
    case $target in /*) ;; *) target=$root/$target ;; esac
    mortar_bin=$target/release
  fi
  mortar_bin=$(cd "$mortar_bin" && pwd)
  for b in mortar-brick mortar-mount; do
    [ -x "$mortar_bin/$b" ] || die "no $b in $mortar_bin"
  done
  if [ -n "$tarball" ]; then
    tarball=$(readlink -f "$tarball")
    [ -f "$tarball" ] || die "no tarball $tarball"
    tar -tf "$tarball" >/dev/null || die "$tarball is not a tar file tar can read"
  fi

  work=$(mktemp -d "$base/mortar-compare.XXXXXX")
  work=$(cd "$work" && pwd -P)
  ns=mortar-bench-$$
  failed=1
  trap outer_cleanup EXIT
  trap 'exit 130' INT TERM

  # Private copies: another build into the same target directory cannot swap them mid-run.
  mkdir -p "$work/bin" "$work/logs"
  cp "$mortar_bin/mortar-brick" "$mortar_bin/mortar-mount" "$work/bin/"
  if [ -z "$tarball" ]; then
    say "making the untar tarball: $copies copies of the repo's tracked files (git archive HEAD)"
    mkdir -p "$work/src-stage"
    for ((i = 1; i <= copies; i++)); do
      mkdir "$work/src-stage/copy$i"
      if git -C "$root" rev-parse -q --verify HEAD >/dev/null 2>&1; then
        git -C "$root" archive --format=tar HEAD | tar -xf - -C "$work/src-stage/copy$i"
      else  # not a git checkout: the sources as they are, without target/
        tar -cf - -C "$root" --exclude=./target --exclude=./.git . | tar -xf - -C "$work/src-stage/copy$i"
      fi
    done
    tar -cf "$work/src.tar" -C "$work/src-stage" .
    rm -rf "$work/src-stage"
    tarball=$work/src.tar
  fi
  rev=$(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo unknown)
  [ -n "$(git -C "$root" status --porcelain --untracked-files=no 2>/dev/null)" ] && rev="$rev (+ local changes)"
  printf '%s\n' "$rev" > "$work/rev"
  printf '%s\n' "$mortar_bin" > "$work/bin-origin"

  say "network namespace $ns: veth pair, $GADDR and ${MADDR[*]} on it"
  ip netns add "$ns"
  ip -n "$ns" link set lo up
  ip -n "$ns" link add mb0 type veth peer name mb1
  ip -n "$ns" addr add "$GADDR/24" dev mb0
  for a in "${MADDR[@]}"; do ip -n "$ns" addr add "$a/24" dev mb0; done
  ip -n "$ns" link set mb0 up
  ip -n "$ns" link set mb1 up

  extra=(--tarball "$tarball")
  [ -n "$json" ] && extra+=(--json "$(readlink -f "$json")")
  # In the background, so that a signal here is handled at once (the clean-up then stops
  # everything in the namespace, this run's inner phase included).
  rc=0
  ip netns exec "$ns" bash "$self" "${argv[@]}" "${extra[@]}" --_inner "$work" &
  wait $! || rc=$?
  [ "$rc" = 0 ] && failed=0
  exit "$rc"
fi

# =========================================================================================
# Inner phase: in the namespace (own network and mount namespace). Sets everything up,
# runs the workloads, prints the report.
# =========================================================================================
work=$inner
bin=$work/bin
logs=$work/logs
store=$work/store
mnt=$work/mnt
mkdir -p "$store" "$mnt/gluster" "$mnt/mortar" "$logs/glusterfs" "$work/glusterd"

# `ip netns exec` made this mount namespace a slave of the host's: nothing mounted here is
# seen outside. glusterd gets its own state, logs and sockets over the packaged paths.
if [ "$disk" = 0 ]; then
  mount -t tmpfs -o mode=0755 mortar-bench "$store"
fi
mkdir -p /var/lib/glusterd /var/log/glusterfs
mount --bind "$work/glusterd" /var/lib/glusterd
mount --bind "$logs/glusterfs" /var/log/glusterfs
mount -t tmpfs -o mode=0755 mortar-bench-run /run
mkdir -p /run/gluster /run/lock
backing=$(df --output=fstype "$store" | tail -1 | tr -d ' ')

glusterd_pid=""; gmounted=0; mmounted=0; vol_started=0; mpids=()
inner_cleanup() {
  set +e
  if [ "$gmounted" = 1 ]; then umount "$mnt/gluster" 2>/dev/null || umount -l "$mnt/gluster" 2>/dev/null; fi
  if [ "$mmounted" = 1 ]; then umount "$mnt/mortar" 2>/dev/null || umount -l "$mnt/mortar" 2>/dev/null; fi
  if [ "$vol_started" = 1 ]; then
    timeout 60 gluster --mode=script volume stop "$VOL" force >/dev/null 2>&1
  fi
  if [ -n "$glusterd_pid" ]; then
    kill "$glusterd_pid" 2>/dev/null
    for _ in $(seq 50); do kill -0 "$glusterd_pid" 2>/dev/null || break; sleep 0.1; done
  fi
  # Brick and self-heal daemons left over (a failed stop): their pid files are ours (/run).
  local f p
  for f in /run/gluster/vols/"$VOL"/*.pid /run/gluster/shd/"$VOL"/*.pid; do
    [ -f "$f" ] || continue
    p=$(cat "$f"); [ -n "$p" ] && kill "$p" 2>/dev/null
  done
  for p in "${mpids[@]}"; do kill "$p" 2>/dev/null; done
  for p in "${mpids[@]}"; do
    for _ in $(seq 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
  done
  # The outer phase kills anything still left in the namespace and deletes it.
}
trap inner_cleanup EXIT
trap 'exit 130' INT TERM

# --- timing and checking -------------------------------------------------------------------
now() { perl -MTime::HiRes=clock_gettime,CLOCK_MONOTONIC -e 'printf "%.6f\n", clock_gettime(CLOCK_MONOTONIC)'; }
drop_caches() {
  sync
  echo 3 > /proc/sys/vm/drop_caches
  sleep 1
}
# Data of each small file: 4096 printable bytes, written by bash's printf in one write(2).
SF_BLOB=$(head -c 3072 /dev/urandom | base64 -w0)
export SF_BLOB
sf_write() { # DIR COUNT: creates DIR/f0 .. DIR/f(COUNT-1)
  local i
  for ((i = 0; i < $2; i++)); do printf '%s' "$SF_BLOB" > "$1/f$i"; done
}
sf_parallel() { # DIR N P: N files over P writers, into DIR/p0 .. DIR/p(P-1)
  local j rc=0 pids=()
  for ((j = 0; j < $3; j++)); do
    sf_write "$1/p$j" $(( $2 / $3 + (j < $2 % $3 ? 1 : 0) )) & pids+=($!)
  done
  for j in "${pids[@]}"; do wait "$j" || rc=1; done
  return $rc
}
sf_names() { # DIR COUNT: the names sf_write made, NUL-separated (no readdir)
  local i
  for ((i = 0; i < $2; i++)); do printf '%s/f%d\0' "$1" "$i"; done
}
fio_run() { # RW FILE: one fio job; prints its IOPS (fails on a fio error or no I/O)
  local out iops
  out=$(fio --name=bench --filename="$2" --size="${rand_mib}M" --bs=4k --rw="$1" \
    --ioengine=psync --direct=1 --runtime="$runtime" --time_based --randrepeat=0 \
    --output-format=terse --terse-version=3) || return 1
  # terse v3: 5 error, 8 read IOPS, 49 write IOPS
  iops=$(awk -F';' -v rw="$1" '{ if ($5 != 0) exit 1; v = (rw == "randread") ? $8 : $49;
    if (v <= 0) exit 1; print v }' <<<"$out") || { echo "fio: $out" >&2; return 1; }
  echo "$iops"
}
export -f sf_write sf_parallel sf_names fio_run
export rand_mib runtime

declare -A dir val
fss=(raw gluster mortar)
# run FS KEY CMD CHECK EXPECT [IOPS]: times CMD (bash -c, in the FS's directory); then CHECK
# (untimed) must print EXPECT, else the run fails. Without IOPS the figure is the seconds;
# with it, CMD prints the figure itself (fio's IOPS).
run() {
  local fs=$1 key=$2 cmd=$3 check=$4 expect=$5 d out got t0 t1 rc=0
  d=${dir[$fs]}
  t0=$(now)
  out=$(cd "$d" && timeout -k 10 "$tmo" bash -c "set -eo pipefail; $cmd" 2>"$work/err") || rc=$?
  t1=$(now)
  if [ "$rc" = 0 ]; then
    got=$(cd "$d" && timeout -k 10 "$tmo" bash -c "set -eo pipefail; $check" 2>>"$work/err") || rc=$?
  fi
  if [ "$rc" != 0 ] || [ "$got" != "$expect" ]; then
    say "FAILED: $fs, $key: exit $rc$( [ "$rc" = 124 ] && echo " (timed out after $tmo s)")," \
      "check expected '$expect', got '${got:-}'; in $d: $cmd; check: $check"
    sed 's/^/  | /' "$work/err" | head -20 >&2
    exit 1
  fi
  if [ "${6:-}" = iops ]; then
    val[$fs,$key]=$out
  else
    val[$fs,$key]=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.3f", b - a }')
  fi
  say "  $(printf '%-8s %-10s' "$fs" "$key") ${val[$fs,$key]}$([ "${6:-}" = iops ] && echo " IOPS" || echo " s")"
}

# --- GlusterFS -----------------------------------------------------------------------------
say "starting glusterd ($(glusterfs --version | head -1))"
glusterd -p "$work/glusterd.pid" --log-file="$logs/glusterfs/glusterd.log"
for _ in $(seq 50); do [ -s "$work/glusterd.pid" ] && break; sleep 0.1; done
glusterd_pid=$(cat "$work/glusterd.pid")
ok=0
for _ in $(seq 100); do gluster --mode=script pool list >/dev/null 2>&1 && { ok=1; break; }; sleep 0.2; done
[ "$ok" = 1 ] || die "glusterd does not answer (gluster pool list); see $logs/glusterfs"
mkdir -p "$store/gluster/b1" "$store/gluster/b2" "$store/gluster/b3"
gluster --mode=script volume create "$VOL" replica 3 "$GADDR:$store/gluster/b1" \
  "$GADDR:$store/gluster/b2" "$GADDR:$store/gluster/b3" force >&2
gluster --mode=script volume start "$VOL" >&2
vol_started=1
mount -t glusterfs -o log-file="$logs/glusterfs/mount.log" "$GADDR:/$VOL" "$mnt/gluster"
gmounted=1

# --- Mortar --------------------------------------------------------------------------------
{
  echo "volume: data"; echo "generation: 1"; echo "bricks:"
  for i in 0 1 2; do echo "  - id: b$i"; echo "    address: ${MADDR[$i]}:$MPORT"; done
} > "$work/volfile.yaml"
say "starting Mortar: 3 bricks on ${MADDR[*]}:$MPORT ($(cat "$work/bin-origin"), git $(cat "$work/rev"))"
for i in 0 1 2; do
  "$bin/mortar-brick" --id "b$i" --dir "$store/mortar/b$i" --listen "${MADDR[$i]}:$MPORT" \
    --volfile "$work/volfile.yaml" --insecure-plaintext > "$logs/mortar-b$i.log" 2>&1 &
  mpids+=($!)
done
for i in 0 1 2; do
  ok=0
  for _ in $(seq 150); do
    if (exec 3<>"/dev/tcp/${MADDR[$i]}/$MPORT") 2>/dev/null; then ok=1; break; fi
    kill -0 "${mpids[$i]}" 2>/dev/null || die "brick b$i exited; see $logs/mortar-b$i.log"
    sleep 0.1
  done
  [ "$ok" = 1 ] || die "brick b$i does not listen after 15 s; see $logs/mortar-b$i.log"
done
"$bin/mortar-mount" "${MADDR[0]}:$MPORT:/data" "$mnt/mortar" -o "log-file=$logs/mortar-mount.log" >&2
mmounted=1

mkdir -p "$store/raw"
dir[raw]=$store/raw/cmp; dir[gluster]=$mnt/gluster/cmp; dir[mortar]=$mnt/mortar/cmp
# Both mounts must take writes before anything is timed.
for fs in "${fss[@]}"; do
  ok=0
  for _ in $(seq 150); do
    mkdir -p "${dir[$fs]}" 2>/dev/null && touch "${dir[$fs]}/.probe" 2>/dev/null && { ok=1; break; }
    sleep 0.2
  done
  [ "$ok" = 1 ] || die "$fs does not take writes after 30 s"
  rm -f "${dir[$fs]}/.probe"
done

# --- workloads -----------------------------------------------------------------------------
n=$files
seq_b=$((seq_mib * 1048576)); rand_b=$((rand_mib * 1048576))
read -r tar_files tar_bytes < <(tar -tvf "$tarball" | awk '$1 ~ /^-/ { n++; s += $3 } END { print n + 0, s + 0 }')
load=$(cut -d' ' -f1-3 /proc/loadavg)
say "workloads ($backing backend): seq $seq_mib MiB, random $rand_mib MiB for $runtime s, $n files," \
  "$par writers, untar $tar_files files; on ${fss[*]}"
each() { local fs; for fs in "${fss[@]}"; do "$@" "$fs"; done; }

outf=$work/out  # what a timed command hands to its check
w_seqw() { run "$1" seqw "dd if=/dev/zero of=seq bs=1M count=$seq_mib conv=fsync status=none" "stat -c %s seq" "$seq_b"; }
w_seqr() {
  drop_caches
  run "$1" seqr "dd if=seq of=/dev/null bs=1M 2>&1 | awk '/ bytes / {print \$1}' > $outf" "cat $outf" "$seq_b"
  rm -f "${dir[$1]}/seq"
}
w_prep_rand() { dd if=/dev/urandom of="${dir[$1]}/rand" bs=1M count="$rand_mib" conv=fsync status=none; }
w_randw() { run "$1" randw "fio_run randwrite rand" "stat -c %s rand" "$rand_b" iops; }
w_randr() { drop_caches; run "$1" randr "fio_run randread rand" "stat -c %s rand" "$rand_b" iops; rm -f "${dir[$1]}/rand"; }
w_create() { mkdir "${dir[$1]}/a"; run "$1" create "sf_write a $n" "find a -type f -size 4096c | wc -l" "$n"; }
w_stat() {
  drop_caches
  run "$1" stat "find a -maxdepth 1 -type f -print0 | xargs -0 stat -c %s | grep -c '^4096\$' > $outf" "cat $outf" "$n"
}
w_read() { drop_caches; run "$1" read "sf_names a $n | xargs -0 cat | wc -c > $outf" "cat $outf" "$((n * 4096))"; }
w_ls() { drop_caches; run "$1" ls "ls -l a > $outf" "grep -c ' f[0-9]*\$' $outf" "$n"; }
w_unlink() { run "$1" unlink "sf_names a $n | xargs -0 rm" "ls -A a | wc -l" 0; rmdir "${dir[$1]}/a"; }
w_par() {
  local j; for ((j = 0; j < par; j++)); do mkdir -p "${dir[$1]}/b/p$j"; done
  run "$1" par "sf_parallel b $n $par" "find b -type f -size 4096c | wc -l" "$n"
  rm -rf "${dir[$1]}/b"
}
w_untar() {
  mkdir "${dir[$1]}/u"
  run "$1" untar "tar -xf '$tarball' -C u" \
    "find u -type f -printf '%s\n' | awk '{ n++; s += \$1 } END { print n + 0, s + 0 }'" "$tar_files $tar_bytes"
  rm -rf "${dir[$1]}/u"
}

t_start=$(now)
each w_seqw
each w_seqr
each w_prep_rand
each w_randw
each w_randr
each w_create
each w_stat
each w_read
each w_ls
each w_unlink
each w_par
each w_untar
t_end=$(now)

# --- report --------------------------------------------------------------------------------
# Figures in table order: KEY|LABEL|UNIT|KIND|COUNT|GOAL. KIND rate: COUNT / seconds (higher
# is better); iops: fio's figure; time: the seconds (lower is better).
figs=(
  "seqw|seq write $seq_mib MiB, 1 MiB blocks + fsync|MiB/s|rate|$seq_mib|2"
  "seqr|seq read $seq_mib MiB, 1 MiB blocks, cold|MiB/s|rate|$seq_mib|2"
  "randw|4 KiB random write (fio psync, O_DIRECT)|IOPS|iops||3"
  "randr|4 KiB random read (fio psync, O_DIRECT), cold|IOPS|iops||3"
  "create|create+write+close 4 KiB files, 1 process|files/s|rate|$n|10"
  "stat|stat after listdir, cold|files/s|rate|$n|2"
  "read|open+read+close 4 KiB files by name, cold|files/s|rate|$n|3"
  "unlink|unlink|files/s|rate|$n|10"
  "ls|ls -l of a $n-file directory, cold|s|time||"
  "untar|untar of $tar_files files ($((tar_bytes / 1048576)) MiB)|s|time||"
  "par|create+write+close 4 KiB files, $par processes|files/s|rate|$n|"
)
figure() { # KEY KIND COUNT FS: the figure's value for FS
  local v=${val[$4,$1]}
  case $2 in
    rate) awk -v c="$3" -v s="$v" 'BEGIN { printf "%.6f", c / (s > 0 ? s : 1e-6) }' ;;
    *) echo "$v" ;;
  esac
}
fmt() { # VALUE UNIT: for the table
  awk -v v="$1" -v u="$2" 'BEGIN {
    if (u == "s") printf "%.3f s", v
    else if (v >= 100) printf "%.0f %s", v, u
    else printf "%.1f %s", v, u }'
}
ratio() { # MORTAR GLUSTER KIND: Mortar's speed relative to GlusterFS's (> 1: Mortar faster)
  awk -v m="$1" -v g="$2" -v k="$3" 'BEGIN {
    r = (k == "time") ? g / (m > 0 ? m : 1e-6) : m / (g > 0 ? g : 1e-6); printf "%.2f", r }'
}
met() { awk -v r="$1" -v g="$2" 'BEGIN { print (r >= g) ? "met" : "not met" }'; }

mver=$("$bin/mortar-mount" --version 2>/dev/null | head -1 || true)
gver=$(glusterfs --version | head -1)
date=$(date -u '+%Y-%m-%d %H:%M UTC')
rev=$(cat "$work/rev")
storage="tmpfs"; [ "$disk" = 1 ] && storage="disk ($backing, $work/store)"
mwarn=$(grep -hE ' (WARN|ERROR) ' "$logs"/mortar-b?.log "$logs/mortar-mount.log" 2>/dev/null || true)
gerr=$(grep -hE '\] E \[' "$logs/glusterfs/mount.log" 2>/dev/null || true)
took=$(awk -v a="$t_start" -v b="$t_end" 'BEGIN { printf "%.0f", b - a }')

echo "Mortar vs GlusterFS -- $date"
echo
echo "- host: $(uname -sr), $(nproc) CPUs, $(awk '/MemTotal/ { printf "%.0f GiB", $2 / 1048576 }' /proc/meminfo), load before the run $load"
echo "- Mortar: ${mver:-mortar-mount} from $(cat "$work/bin-origin") (this checkout: git $rev); 3 bricks (${MADDR[*]}:$MPORT), one FUSE mount, default options"
echo "- GlusterFS: $gver; replica 3, bricks $GADDR:$store/gluster/b1..b3, mount -t glusterfs, default options"
echo "- bricks and raw directory on $storage; all traffic inside a network namespace of this run"
echo "- seq $seq_mib MiB; random I/O on a $rand_mib MiB file for $runtime s per fio run; $n files of 4 KiB; $par writers; untar: $tar_files files, $((tar_bytes / 1024)) KiB"
echo "- workloads took ${took} s"
echo
echo "| figure | raw | GlusterFS | Mortar | Mortar/GlusterFS | goal |"
echo "|---|---:|---:|---:|---:|---|"
for f in "${figs[@]}"; do
  IFS='|' read -r key label unit kind count goal <<<"$f"
  r=$(figure "$key" "$kind" "$count" raw); g=$(figure "$key" "$kind" "$count" gluster)
  m=$(figure "$key" "$kind" "$count" mortar); q=$(ratio "$m" "$g" "$kind")
  gcell=""; [ -n "$goal" ] && gcell="≥ $goal: $(met "$q" "$goal")"
  echo "| $label ($unit) | $(fmt "$r" "$unit") | $(fmt "$g" "$unit") | $(fmt "$m" "$unit") | $q | $gcell |"
done
echo
echo "Mortar/GlusterFS is Mortar's speed over GlusterFS's (> 1: Mortar faster); for the figures in"
echo "seconds that is GlusterFS's time over Mortar's."
if [ -n "$mwarn" ]; then
  echo "Mortar logged $(wc -l <<<"$mwarn") warnings/errors (bricks and mount); the first ones:"
  head -5 <<<"$mwarn" | sed 's/^/    /'
else
  echo "Mortar logged no warnings or errors (bricks and mount)."
fi
if [ -n "$gerr" ]; then
  echo "The GlusterFS mount logged $(wc -l <<<"$gerr") errors; the first ones:"
  head -5 <<<"$gerr" | sed 's/^/    /'
else
  echo "The GlusterFS mount logged no errors."
fi

if [ -n "$json" ]; then
  {
    printf '{\n  "date": "%s",\n  "kernel": "%s",\n  "cpus": %d,\n  "load_before": "%s",\n' \
      "$date" "$(uname -r)" "$(nproc)" "$load"
    printf '  "mortar": "%s",\n  "mortar_git": "%s",\n  "glusterfs": "%s",\n  "backend": "%s",\n' \
      "$mver" "$rev" "$gver" "$([ "$disk" = 1 ] && echo "disk:$backing" || echo tmpfs)"
    printf '  "params": {"seq_mib": %d, "rand_mib": %d, "runtime_s": %d, "files": %d, "parallel": %d, "untar_files": %d, "untar_bytes": %d},\n' \
      "$seq_mib" "$rand_mib" "$runtime" "$n" "$par" "$tar_files" "$tar_bytes"
    printf '  "workloads_s": %s,\n  "figures": [\n' "$took"
    sep=""
    for f in "${figs[@]}"; do
      IFS='|' read -r key label unit kind count goal <<<"$f"
      r=$(figure "$key" "$kind" "$count" raw); g=$(figure "$key" "$kind" "$count" gluster)
      m=$(figure "$key" "$kind" "$count" mortar); q=$(ratio "$m" "$g" "$kind")
      gm=null
      if [ -n "$goal" ]; then gm=false; [ "$(met "$q" "$goal")" = met ] && gm=true; fi
      secs=""
      [ "$kind" != iops ] && secs=$(printf ', "seconds": {"raw": %s, "glusterfs": %s, "mortar": %s}' \
        "${val[raw,$key]}" "${val[gluster,$key]}" "${val[mortar,$key]}")
      printf '%s    {"key": "%s", "label": "%s", "unit": "%s", "higher_is_better": %s, "raw": %s, "glusterfs": %s, "mortar": %s, "mortar_over_glusterfs": %s, "goal": %s, "goal_met": %s%s}' \
        "$sep" "$key" "$label" "$unit" "$([ "$kind" = time ] && echo false || echo true)" \
        "$r" "$g" "$m" "$q" "${goal:-null}" \
        "$gm" "$secs"
      sep=$',\n'
    done
    printf '\n  ],\n  "mortar_warnings": %d,\n  "glusterfs_mount_errors": %d\n}\n' \
      "$(grep -c . <<<"$mwarn" || true)" "$(grep -c . <<<"$gerr" || true)"
  } > "$json"
  say "JSON written to $json"
fi
