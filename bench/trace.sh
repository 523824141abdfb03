#!/usr/bin/env bash
# Access traces: a build-shaped workload (500 small files spread over the
# builder bench's 1.6 GB closure, read in one session, in a shuffled order)
# through a mount of `lazystore serve` with an empty local cache, on
# loopback throttled to 100 Mbit/s (tc tbf, in a network namespace of its
# own), three ways in one run:
#   none:      no trace (the mount records one with --trace-dir)
#   prefetch:  `lazystore prefetch` of that trace, then the same workload
#              (the wall time counts both)
#   --prefetch: the mount given the trace; it fetches the trace's files in
#              the background once the workload reads the first of them
#   shared:    the mount given no trace but --prefetch-shared: the first
#              run's mount put its trace into the service (--share-traces)
#              under the build's name; this run's workload is the next
#              version of that build, and its first read starts the
#              prefetch of what the service's trace names
# The workload is a Nix build to the mount: its session's leader is given
# `out` (as Nix gives a builder), so the trace has a build name.
# Prints wall time, gRPC requests the service answered (its /metrics) and
# chunk bytes the builder received, and the ratios to `none`.
#
# Usage: bench/trace.sh   (as root; release build; after bench/builder.sh
#                          made its corpus)
#   BENCH_DIR  the builder bench's directory (default
#              /var/tmp/lazystore-builder-bench)
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
work=${BENCH_DIR:-/var/tmp/lazystore-builder-bench}
lazystore=${CARGO_TARGET_DIR:-$repo/target}/release/lazystore

if [[ ${1:-} != inside ]]; then
  [[ -s $work/closure && -s $work/server/store.redb ]] ||
    { echo "bench/trace.sh: no corpus in $work: run bench/builder.sh first" >&2; exit 1; }
  cargo build --quiet --release --bin lazystore
  exec unshare -n -- "$0" inside
fi

ip link set lo up
tc qdisc add dev lo root tbf rate 100mbit burst 256kb latency 50ms
now() { date +%s.%N; }
drop_caches() { sync; echo 3 >/proc/sys/vm/drop_caches; }
t=$work/trace-bench
rm -rf "$t"
mkdir -p "$t/mnt"
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  mountpoint -q "$t/mnt" && fusermount3 -u -z "$t/mnt" || true
}
trap cleanup EXIT

"$lazystore" serve --listen 127.0.0.1:0 --metrics-listen 127.0.0.1:0 \
  --store "redb://$work/server/store.redb" >"$t/serve.out" 2>"$t/serve.log" &
pids+=($!)
until [[ $(wc -l <"$t/serve.out") -ge 2 ]]; do sleep 0.1; done
grpc=$(sed -n 1p "$t/serve.out")
metrics=$(sed -n 2p "$t/serve.out")
requests() { curl -s "$metrics" | awk '/^lazystore_grpc_requests_total/ { n += $NF } END { print n + 0 }'; }

# 500 small files spread over the closure, in an order of their own.
# (The paths are not in this machine's store: their files come from the
# binary cache's listings.)
python3 - "$work" >"$t/files" <<'EOF'
import json, random, sys
work = sys.argv[1]
small = []
for path in open(f"{work}/closure").read().split():
    base = path.rsplit("/", 1)[1]
    try:
        root = json.load(open(f"{work}/cache/{base[:32]}.ls"))["root"]
    except FileNotFoundError:
        continue
    def walk(entry, at):
        if entry.get("type") == "regular" and 0 < entry.get("size", 0) < 65536:
            small.append(at)
        for name, child in sorted(entry.get("entries", {}).items()):
            walk(child, f"{at}/{name}")
    walk(root, path)
picked = small[:: max(1, len(small) // 500)][:500]
random.Random(1).shuffle(picked)
print("\n".join(picked))
EOF
[[ $(wc -l <"$t/files") -eq 500 ]] || { echo "bench/trace.sh: fewer than 500 small files" >&2; exit 1; }
sed "s|^/nix/store|$t/mnt|" "$t/files" >"$t/mounted"

# One run: a mount with a fresh cache (more mount arguments after the
# name), the page cache dropped, the workload in a session of its own.
# Prints "seconds requests remote_bytes".
run() {
  local name=$1
  shift
  rm -rf "$t/$name.redb" "$t/$name".* "$t/mount.out"
  local r0 t0 t1 r1
  r0=$(requests)
  drop_caches
  t0=$(now)
  if [[ $name == prefetch ]]; then
    "$lazystore" prefetch --store "$grpc" --cache "redb://$t/$name.redb" "$t/traces" >"$t/prefetch.out"
  fi
  "$lazystore" mount "$t/mnt" --store "$grpc" --cache "redb://$t/$name.redb" "$@" \
    >"$t/mount.out" 2>"$t/$name.log" &
  local mount_pid=$!
  pids+=("$mount_pid")
  until [[ -s $t/mount.out ]]; do sleep 0.05; done
  out=/nix/store/7rjj86a15146cq1d7sbfqbhb9ml0mbyl-trace-bench-$version \
    xargs -a "$t/mounted" -d '\n' setsid --wait cat >/dev/null
  t1=$(now)
  r1=$(requests)
  local remote
  remote=$(awk '$1 == "remote_wire_bytes" { print $2 }' "$t/mnt/.lazystore/stats")
  kill "$mount_pid"
  wait "$mount_pid" 2>/dev/null || true
  echo "$(awk "BEGIN { print $t1 - $t0 }") $((r1 - r0)) $remote"
}

version=1.0
read -r s_none q_none b_none < <(run none --trace-dir "$t/traces" --share-traces)
version=1.1
read -r s_pre q_pre b_pre < <(run prefetch)
read -r s_mnt q_mnt b_mnt < <(run mount-prefetch --prefetch "$t/traces")
read -r s_sh q_sh b_sh < <(run shared --prefetch-shared)

printf '%-12s %9s %9s %12s %10s %12s\n' run 'wall s' requests 'chunk bytes' 'wall/none' 'requests/none'
row() {
  awk -v n="$1" -v s="$2" -v q="$3" -v b="$4" -v s0="$s_none" -v q0="$q_none" \
    'BEGIN { printf "%-12s %9.2f %9d %12d %9.2f× %11.2f×\n", n, s, q, b, s / s0, q / q0 }'
}
row none "$s_none" "$q_none" "$b_none"
row prefetch "$s_pre" "$q_pre" "$b_pre"
row --prefetch "$s_mnt" "$q_mnt" "$b_mnt"
row shared "$s_sh" "$q_sh" "$b_sh"
echo "prefetch: $(cat "$t/prefetch.out")"
