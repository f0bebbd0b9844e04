#!/usr/bin/env bash
# Small-file benchmark: Mortar against GlusterFS, both as 3-way replicas on this machine,
# same workloads and parameters, in one run. Prints a table of seconds, rates and ratios.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: bench/smallfile.sh [options]

Small-file performance of Mortar against GlusterFS on this machine, in one run.
Mortar: a release build, `mortar local up` (3 bricks on 127.0.0.11-13:24100, one FUSE
mount). GlusterFS: glusterd started here, one replica-3 volume with three bricks in
directories on this host, mounted with `mount -t glusterfs`. Default volume options on both.

Workloads, each on both file systems in a fresh directory, timed one by one:
  create+write N files of SIZE KiB in one directory, one process
  create+write N files split over P processes, one directory each
  stat the one-writer directory's N files by name (a lookup each), caches dropped first
  find + stat every file (2N; readdirplus fills the kernel cache), caches dropped first
  read every file back with cat (2N), caches dropped first
  ls -l of the one-writer directory (N entries), caches dropped first
  rm -rf of everything (2N files)
  one BIG MiB file: dd write (bs=1M, conv=fsync), then dd read with caches dropped

Options:
  --files N         files per create workload (default 2000)
  --size KIB        file size in KiB, 1..1024 (default 4)
  --parallel P      writers of the parallel create (default 4)
  --big-mib M       size of the large-file line in MiB, 0 skips it (default 256)
  --mortar-bin DIR  use mortar, mortar-brick, mortar-mount from DIR instead of running
                    cargo build --release -p mortar-brick -p mortar-client
                    (which builds into $CARGO_TARGET_DIR, default ./target)
  --no-gluster      run Mortar only
  --gluster-host H  address of this host for the GlusterFS bricks (default: the first
                    non-loopback address of `hostname -I`; glusterd refuses 127.0.0.1)
  --workdir DIR     where bricks and mounts go (default /var/tmp)
  --timeout S       give up on a workload after S seconds (default 600)
  --json FILE       also write the results as JSON to FILE
  -h, --help        this text

Needs root, /dev/fuse, and for GlusterFS the Debian packages glusterfs-server and
glusterfs-client (installed with apt-get if missing). Everything it starts is stopped and
removed at the end, also on failure or Ctrl-C; a glusterd that was already running is left
running. Bricks 127.0.0.11-13:24100 must be free (no other `mortar local up`).
EOF
}

files=2000; kib=4; par=4; big=256; mortar_bin=""; gluster=1; ghost=""; base=/var/tmp
tmo=600; json=""
while [ $# -gt 0 ]; do
  case $1 in
    -h|--help) usage; exit 0 ;;
    --files) files=${2:?}; shift ;;
    --size) kib=${2:?}; shift ;;
    --parallel) par=${2:?}; shift ;;
    --big-mib) big=${2:?}; shift ;;
    --mortar-bin) mortar_bin=${2:?}; shift ;;
    --no-gluster) gluster=0 ;;
    --gluster-host) ghost=${2:?}; shift ;;
    --workdir) base=${2:?}; shift ;;
    --timeout) tmo=${2:?}; shift ;;
    --json) json=${2:?}; shift ;;
    *) echo "smallfile.sh: unknown argument: $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
for v in "$files" "$kib" "$par" "$big" "$tmo"; do
  [[ $v =~ ^[0-9]+$ ]] || { echo "smallfile.sh: not a number: $v" >&2; exit 2; }
done
if [ "$files" -lt 1 ] || [ "$par" -lt 1 ] || [ "$kib" -lt 1 ] || [ "$kib" -gt 1024 ]; then
  echo "smallfile.sh: need --files >= 1, --parallel >= 1, 1 <= --size <= 1024" >&2; exit 2
fi
[ "$(id -u)" = 0 ] || { echo "smallfile.sh: needs root (FUSE mounts, drop_caches, glusterd)" >&2; exit 1; }
[ -c /dev/fuse ] || { echo "smallfile.sh: /dev/fuse is missing" >&2; exit 1; }

root=$(cd "$(dirname "$0")/.." && pwd)
say() { printf '%s\n' "$*" >&2; }

# --- Mortar binaries -----------------------------------------------------------------------
if [ -z "$mortar_bin" ]; then
  say "building Mortar (release) ..."
  (cd "$root" && cargo build --release -p mortar-brick -p mortar-client) >&2
  target=${CARGO_TARGET_DIR:-$root/target}
  case $target in /*) ;; *) target=$root/$target ;; esac
  mortar_bin=$target/release
fi
mortar_bin=$(cd "$mortar_bin" && pwd)
for b in mortar mortar-brick mortar-mount; do
  [ -x "$mortar_bin/$b" ] || { say "no $b in $mortar_bin"; exit 1; }
done
for i in 11 12 13; do
  if (exec 3<>"/dev/tcp/127.0.0.$i/24100") 2>/dev/null; then
    say "127.0.0.$i:24100 is already in use (another mortar local up?); stop it first"; exit 1
  fi
done

# --- clean up everything we start, whatever happens ------------------------------------------
work=$(mktemp -d "$base/mortar-bench-smallfile.XXXXXX")
work=$(cd "$work" && pwd -P)
mortar_up=0; vol=""; gmnt=""; glusterd_pid=""; mlog=""; failed=1
cleanup() {
  set +e
  if [ -n "$gmnt" ] && mountpoint -q "$gmnt"; then umount "$gmnt" 2>/dev/null || umount -l "$gmnt"; fi
  if [ -n "$vol" ]; then
    gluster --mode=script volume stop "$vol" force >/dev/null 2>&1
    gluster --mode=script volume delete "$vol" >/dev/null 2>&1
    # glusterd's delete hook asks glusterd for its working directory: let it finish first.
    for _ in $(seq 50); do pgrep -f -- "--volname=$vol" >/dev/null || break; sleep 0.2; done
  fi
  if [ -n "$glusterd_pid" ]; then
    kill "$glusterd_pid" 2>/dev/null
    for _ in $(seq 50); do kill -0 "$glusterd_pid" 2>/dev/null || break; sleep 0.2; done
  fi
  # Brick and self-heal processes of our volume name our directories on their command line.
  for p in $(pgrep -f -- "$work/gluster" 2>/dev/null); do kill "$p" 2>/dev/null; done
  [ "$mortar_up" = 1 ] && "$mortar_bin/mortar" local down --dir "$work/mortar" >/dev/null
  if [ "$failed" = 1 ]; then
    rm -rf "$work"/mortar/b? "$work"/gluster/b?
    say "failed; logs kept in $work (Mortar bricks: $work/mortar/logs, mount:" \
      "/var/log/mortar/, GlusterFS: /var/log/glusterfs/)"
  else
    rm -rf "$work" "$mlog"
  fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- timing helpers --------------------------------------------------------------------------
if perl -MTime::HiRes=clock_gettime,CLOCK_MONOTONIC -e 1 2>/dev/null; then
  now() { perl -MTime::HiRes=clock_gettime,CLOCK_MONOTONIC -e 'printf "%.6f\n", clock_gettime(CLOCK_MONOTONIC)'; }
  clock="CLOCK_MONOTONIC"
else
  now() { date +%s.%N; }
  clock="date +%s.%N (wall clock)"
fi
drops=yes
drop_caches() {
  sync
  echo 3 > /proc/sys/vm/drop_caches 2>/dev/null || drops=no
  sleep 1
}

# Data of every small file: printable random bytes, written by bash's printf in one write(2).
SF_BLOB=$(head -c $((kib * 768)) /dev/urandom | base64 -w0)
export SF_BLOB
sf_write() { # DIR COUNT: create DIR/f0..f(COUNT-1), each SIZE bytes
  local i
  for ((i = 0; i < $2; i++)); do printf '%s' "$SF_BLOB" > "$1/f$i"; done
}
sf_parallel() { # DIR N P: N files over P writers, DIR/p0 .. DIR/p(P-1)
  local j rc=0 pids=()
  for ((j = 0; j < $3; j++)); do
    sf_write "$1/p$j" $(( $2 / $3 + (j < $2 % $3 ? 1 : 0) )) & pids+=($!)
  done
  for j in "${pids[@]}"; do wait "$j" || rc=1; done
  return $rc
}
sf_names() { # DIR COUNT: the names sf_write made, NUL-separated (no readdir needed)
  local i
  for ((i = 0; i < $2; i++)); do printf '%s/f%d\0' "$1" "$i"; done
}
export -f sf_write sf_parallel sf_names

declare -A secs
# run FS KEY EXPECT CMD: times CMD (bash -c, cwd = the FS's run directory); its stdout must
# be EXPECT (a count or a size) or the run fails.
run() {
  local fs=$1 key=$2 expect=$3 cmd=$4 dir out t0 t1 rc=0
  dir=${rundir[$fs]}
  t0=$(now)
  out=$(cd "$dir" && timeout -k 10 "$tmo" bash -c "set -o pipefail; $cmd" 2>"$work/err") || rc=$?
  t1=$(now)
  if [ "$rc" != 0 ] || [ "$out" != "$expect" ]; then
    say "FAILED: $fs, workload $key: exit $rc$( [ "$rc" = 124 ] && echo " (timed out after $tmo s)")," \
      "expected output '$expect', got '$out'; in $dir: $cmd"
    sed 's/^/  | /' "$work/err" | head -20 >&2
    exit 1
  fi
  secs[$fs,$key]=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.3f", b - a }')
  say "  $fs $key: ${secs[$fs,$key]} s"
}

# --- Mortar ----------------------------------------------------------------------------------
declare -A rundir
fss=(mortar)
say "starting Mortar: $mortar_bin/mortar local up --dir $work/mortar --mount $work/mortar-mnt"
mortar_up=1
"$mortar_bin/mortar" local up --dir "$work/mortar" --mount "$work/mortar-mnt" >&2
rundir[mortar]=$work/mortar-mnt/smallfile
mlog=${work#/}/mortar-mnt; mlog=/var/log/mortar/mount-${mlog//\//-}.log  # the mount's own log

# --- GlusterFS -------------------------------------------------------------------------------
gver="not run"; gwhy=""
start_gluster() {
  if ! command -v glusterd >/dev/null || ! command -v mount.glusterfs >/dev/null; then
    say "installing glusterfs-server glusterfs-client ..."
    DEBIAN_FRONTEND=noninteractive apt-get install -y glusterfs-server glusterfs-client >&2 \
      || { gwhy="apt-get install glusterfs-server glusterfs-client failed"; return 1; }
  fi
  gver=$(glusterfs --version | head -1)
  if [ -z "$ghost" ]; then
    for a in $(hostname -I); do
      case $a in 127.*|::1|*:*) ;; *) ghost=$a; break ;; esac
    done
  fi
  [ -n "$ghost" ] || { gwhy="no non-loopback IPv4 address (hostname -I); use --gluster-host"; return 1; }
  if pgrep -x glusterd >/dev/null; then
    say "using the glusterd already running (it stays running)"
  else
    say "starting glusterd"
    glusterd -p "$work/glusterd.pid" || { gwhy="glusterd failed to start (/var/log/glusterfs/glusterd.log)"; return 1; }
    for _ in $(seq 50); do [ -s "$work/glusterd.pid" ] && break; sleep 0.1; done
    glusterd_pid=$(cat "$work/glusterd.pid" 2>/dev/null || true)
  fi
  local ok=0
  for _ in $(seq 100); do
    gluster --mode=script pool list >/dev/null 2>&1 && { ok=1; break; }; sleep 0.2
  done
  [ "$ok" = 1 ] || { gwhy="glusterd does not answer (gluster pool list)"; return 1; }
  vol=mortarbench$$
  mkdir -p "$work/gluster/b1" "$work/gluster/b2" "$work/gluster/b3" "$work/gluster-mnt"
  out=$(gluster --mode=script volume create "$vol" replica 3 "$ghost:$work/gluster/b1" \
    "$ghost:$work/gluster/b2" "$ghost:$work/gluster/b3" force 2>&1) \
    || { gwhy="volume create: $(head -1 <<<"$out")"; return 1; }
  out=$(gluster --mode=script volume start "$vol" 2>&1) \
    || { gwhy="volume start: $(head -1 <<<"$out")"; return 1; }
  out=$(mount -t glusterfs "$ghost:/$vol" "$work/gluster-mnt" 2>&1) \
    || { gwhy="mount -t glusterfs: $(head -1 <<<"$out")"; return 1; }
  gmnt=$work/gluster-mnt
}
if [ "$gluster" = 1 ]; then
  if start_gluster; then
    fss+=(gluster)
    rundir[gluster]=$gmnt/smallfile
  else
    say "GlusterFS could not be set up: ${out:-$gwhy}"
    say "going on with Mortar only"
  fi
else
  gwhy="--no-gluster"
fi

# Both mounts must take writes before anything is timed (clients connect in the background).
for fs in "${fss[@]}"; do
  ok=0
  for _ in $(seq 150); do
    mkdir -p "${rundir[$fs]}" 2>/dev/null && touch "${rundir[$fs]}/.probe" 2>/dev/null && { ok=1; break; }
    sleep 0.2
  done
  [ "$ok" = 1 ] || { say "$fs mount does not take writes after 30 s"; exit 1; }
  rm -f "${rundir[$fs]}/.probe"
done

# --- workloads -------------------------------------------------------------------------------
n=$files; n2=$((2 * files)); bytes=$((kib * 1024))
keys=(create1 createP statn stat read ls rm)
declare -A label count unit
label[create1]="create+write, 1 writer";      count[create1]=$n
label[createP]="create+write, $par writers";  count[createP]=$n
label[statn]="stat by name, one dir (cold)";  count[statn]=$n
label[stat]="find + stat all (cold cache)";   count[stat]=$n2
label[read]="read all, cat (cold cache)";     count[read]=$n2
label[ls]="ls -l one dir (cold cache)";       count[ls]=$n
label[rm]="rm -rf all";                       count[rm]=$n2
for k in "${keys[@]}"; do unit[$k]=files; done
if [ "$big" -gt 0 ]; then
  keys+=(bigw bigr)
  label[bigw]="$big MiB file, dd write+fsync"; count[bigw]=$big; unit[bigw]=MiB
  label[bigr]="$big MiB file, dd read (cold)"; count[bigr]=$big; unit[bigr]=MiB
fi

load=$(cut -d' ' -f1-3 /proc/loadavg)
say "running: $n files of $kib KiB, $par parallel writers, each workload on: ${fss[*]}"
for fs in "${fss[@]}"; do mkdir -p "${rundir[$fs]}/a"; done
for fs in "${fss[@]}"; do run "$fs" create1 "" "sf_write a $n"; done
for fs in "${fss[@]}"; do
  for ((j = 0; j < par; j++)); do mkdir -p "${rundir[$fs]}/b/p$j"; done
done
for fs in "${fss[@]}"; do run "$fs" createP "" "sf_parallel b $n $par"; done
for fs in "${fss[@]}"; do
  drop_caches; run "$fs" statn "$n" "sf_names a $n | xargs -0 stat -c %s | wc -l"
done
for fs in "${fss[@]}"; do
  drop_caches; run "$fs" stat "$n2" "find a b -type f -print0 | xargs -0 stat -c %s | wc -l"
done
for fs in "${fss[@]}"; do
  drop_caches; run "$fs" read "$((n2 * bytes))" "find a b -type f -print0 | xargs -0 cat | wc -c"
done
for fs in "${fss[@]}"; do
  drop_caches; run "$fs" ls "$((n + 1))" "ls -l a | wc -l"
done
for fs in "${fss[@]}"; do run "$fs" rm "0" "rm -rf a b && ls -A | wc -l"; done
if [ "$big" -gt 0 ]; then
  for fs in "${fss[@]}"; do
    run "$fs" bigw "$((big * 1048576))" \
      "dd if=/dev/zero of=big bs=1M count=$big conv=fsync status=none && stat -c %s big"
  done
  for fs in "${fss[@]}"; do
    drop_caches; run "$fs" bigr "$((big * 1048576))" "dd if=big bs=1M status=none | wc -c"
  done
  for fs in "${fss[@]}"; do rm -f "${rundir[$fs]}/big"; done
fi

# --- report ----------------------------------------------------------------------------------
rev=$(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo unknown)
[ -n "$(git -C "$root" status --porcelain --untracked-files=no 2>/dev/null)" ] && rev="$rev (+ local changes)"
mver=$("$mortar_bin/mortar" --version 2>/dev/null | head -1 || true)
date=$(date -u '+%Y-%m-%d %H:%M UTC')
# Anything Mortar logged above INFO while the benchmark ran (bricks and the mount).
mwarn=$(grep -hE ' (WARN|ERROR) ' "$work"/mortar/logs/b?.log "$mlog" 2>/dev/null || true)
rate() { awk -v c="$1" -v s="$2" 'BEGIN { if (s == "" || s <= 0) print "-"; else printf "%.1f", c / s }'; }
figures() { # KEY: sets ms gs (seconds), mr gr (rates), ratio; "-" (or empty seconds) if not run
  ms=${secs[mortar,$1]:-}; gs=${secs[gluster,$1]:-}
  mr=$(rate "${count[$1]}" "$ms"); gr=$(rate "${count[$1]}" "$gs")
  ratio=$(awk -v a="$mr" -v b="$gr" 'BEGIN { if (a == "-" || b == "-" || b <= 0) print "-"; else printf "%.2f", a / b }')
}
num() { if [ -z "$1" ] || [ "$1" = - ]; then echo null; else echo "$1"; fi; }
{
  echo "Mortar vs GlusterFS, small files -- $date"
  echo "  host:      $(uname -sr), $(nproc) CPUs, load before run $load"
  echo "  Mortar:    ${mver:-mortar} git $rev (binaries: $mortar_bin); 3 bricks 127.0.0.11-13, one FUSE mount, default options"
  if [[ " ${fss[*]} " == *" gluster "* ]]; then
    echo "  GlusterFS: $gver; replica 3 volume, bricks $ghost:$work/gluster/b1..b3, mount -t glusterfs, default options"
  else
    echo "  GlusterFS: not run ($gwhy)"
  fi
  echo "  all bricks in $work ($(df --output=fstype "$work" | tail -1), one disk)"
  echo "  N=$n files of $kib KiB, P=$par writers, clock $clock, caches dropped: $drops"
  echo
  printf '%-32s %6s %9s %9s %15s %15s %6s\n' workload count "Mortar s" "Gluster s" "Mortar rate" "Gluster rate" ratio
  for k in "${keys[@]}"; do
    figures "$k"
    mc="$mr ${unit[$k]}/s"; gc="$gr ${unit[$k]}/s"
    [ "$mr" = - ] && mc=-
    [ "$gr" = - ] && gc=-
    printf '%-32s %6s %9s %9s %15s %15s %6s\n' "${label[$k]}" "${count[$k]}" "${ms:--}" "${gs:--}" \
      "$mc" "$gc" "$ratio"
  done
  echo
  if [ -n "$mwarn" ]; then
    echo "Mortar logged $(wc -l <<<"$mwarn") warnings/errors during the run; the first ones:"
    head -5 <<<"$mwarn" | sed 's/^/  /'
  else
    echo "Mortar logged no warnings or errors during the run (bricks and mount)."
  fi
  echo "rates are count/seconds (files/s, or MiB/s for the large file); ratio = Mortar rate / GlusterFS rate (> 1: Mortar faster)"
}

if [ -n "$json" ]; then
  {
    printf '{\n  "date": "%s",\n  "kernel": "%s",\n  "mortar_git": "%s",\n  "glusterfs": "%s",\n' \
      "$date" "$(uname -r)" "$rev" "$gver"
    printf '  "files": %d,\n  "file_kib": %d,\n  "parallel": %d,\n  "big_mib": %d,\n  "caches_dropped": %s,\n  "results": [\n' \
      "$n" "$kib" "$par" "$big" "$([ "$drops" = yes ] && echo true || echo false)"
    sep=""
    for k in "${keys[@]}"; do
      figures "$k"
      printf '%s    {"workload": "%s", "label": "%s", "count": %d, "unit": "%s", "mortar_s": %s, "glusterfs_s": %s, "mortar_per_s": %s, "glusterfs_per_s": %s, "ratio": %s}' \
        "$sep" "$k" "${label[$k]}" "${count[$k]}" "${unit[$k]}" "$(num "$ms")" "$(num "$gs")" \
        "$(num "$mr")" "$(num "$gr")" "$(num "$ratio")"
      sep=$',\n'
    done
    printf '\n  ]\n}\n'
  } > "$json"
  say "JSON written to $json"
fi
failed=0
