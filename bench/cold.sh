#!/usr/bin/env bash
# Cold builders: `nix hash path` (reads every file) of a large tree through
# a builder's mount of `lazystore serve` with an empty local cache, against
# eager `nix copy --from` of the same path from its zstd binary cache on
# the same loopback (then the hash of the copy), and against the native
# filesystem cold, with the mount's peak RSS. Page cache dropped before each cold measure. Uses the
# corpus bench/builder.sh prepares (a Rust toolchain and a Python install
# as store paths, their binary cache and a lazystore store): run that
# once first.
#
# Usage: bench/cold.sh   (as root; release build)
#   BENCH_DIR  the builder bench's directory (default
#              /var/tmp/lazystore-builder-bench)
#   PAIRS      lazy/eager pairs per tree (default 3): one pair's ratio
#              moves by a tenth or more with the machine's load, so the
#              table gives the median ratio and every pair's
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
builder_corpus
declare -A native_s

# Mounts at $work/cold-mnt with the mount arguments given; sets mount_pid
# once it is mounted.
start_mount() {
  mkdir -p "$work/cold-mnt"
  started "$work/cold.mount" mount "$work/cold-mnt" "$@"
  mount_pid=$started_pid
}
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  mountpoint -q "$work/cold-mnt" && fusermount3 -u -z "$work/cold-mnt" || true
  # The cache's packs too: left behind, every run's were kept (16 GB).
  rm -rf "$work/cold-cache.redb" "$work/cold-cache.packs" "$work/cold-cache.files"
}
trap cleanup EXIT

rm -f "$work/cold.port"
started "$work/cold.serve" serve --listen 127.0.0.1:0 --store "redb://$work/server/store.redb"
serve_pid=$started_pid
grpc=$(head -n 1 "$work/cold.serve")

python3 - "$work/cache" "$work/cold.port" >/dev/null 2>&1 <<'EOF' &
import functools, http.server, sys
class Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass
handler = functools.partial(Quiet, directory=sys.argv[1])
server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
open(sys.argv[2], "w").write(str(server.server_address[1]))
server.serve_forever()
EOF
pids+=($!)
until [[ -s $work/cold.port ]]; do sleep 0.1; done
http="http://127.0.0.1:$(cat "$work/cold.port")"

# One cold lazy walk of $p: sets lazy_s, lazy_hash, rss_mib.
lazy_once() {
  rm -rf "$work/cold-cache.redb" "$work/cold-cache.packs" "$work/cold-cache.files"
  start_mount --store "$grpc" --cache "redb://$work/cold-cache.redb"
  drop_caches
  local t0 t1
  t0=$(now)
  lazy_hash=$(nix hash path --type sha256 --base32 "$work/cold-mnt/$(basename "$p")")
  t1=$(now)
  lazy_s=$(awk "BEGIN{print $t1-$t0}")
  rss_mib=$(awk '/VmHWM/ { printf "%d", $2 / 1024 }' "/proc/$mount_pid/status")
  stopped "$mount_pid"
}

# One eager copy of $p from its binary cache into a fresh store, then the
# hash of the copy: sets eager_s, eager_hash; the copy stays.
eager_once() {
  rm -rf "$work/cold-eager"
  drop_caches
  local t0 t1
  t0=$(now)
  nix copy --from "$http" --to "local?root=$work/cold-eager" --option trusted-public-keys "$public" "$p" 2>>"$work/cold.log"
  eager_hash=$(nix hash path --type sha256 --base32 "$work/cold-eager$p")
  t1=$(now)
  eager_s=$(awk "BEGIN{print $t1-$t0}")
}

# The median of the numbers given.
median() { printf '%s\n' "$@" | sort -g | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }

# PAIRS pairs of one lazy and one eager measure per tree, the order
# alternating (lazy first, then eager first) so a drift of the machine
# falls on both; each pair's ratio, and the medians.
pairs=${PAIRS:-3}
printf '%-8s %9s %8s %9s %8s %12s %-22s %12s %14s\n' tree files 'lazy s' 'eager s' 'native s' 'lazy/eager' 'each pair' 'lazy/native' 'mount RSS MiB'
for p in $(grep -e -rust -e -python "$work/closure"); do
  name=${p##*-}
  files=$(python3 -c "
import json,sys
def count(e):
    t=e.get('type')
    return 1 if t=='regular' else sum(count(c) for c in e.get('entries',{}).values()) if t=='directory' else 0
print(count(json.load(open(sys.argv[1]))['root']))" "$work/cache/$(basename "$p" | cut -c1-32).ls")
  lazies=() eagers=() ratios=() peak=0
  for i in $(seq "$pairs"); do
    if (( i % 2 )); then lazy_once; eager_once; else eager_once; lazy_once; fi
    [[ $lazy_hash == "$eager_hash" ]] || { echo "bench/cold.sh: $name hashes differ" >&2; exit 1; }
    lazies+=("$lazy_s") eagers+=("$eager_s")
    ratios+=("$(awk "BEGIN{printf \"%.2f\", $lazy_s/$eager_s}")")
    (( rss_mib > peak )) && peak=$rss_mib
  done

  # Native: the last copy, cold.
  drop_caches
  t4=$(now)
  nix hash path --type sha256 --base32 "$work/cold-eager$p" >/dev/null
  t5=$(now)
  native_s[$name]=$(awk "BEGIN{print $t5-$t4}")
  lazy_med=$(median "${lazies[@]}") eager_med=$(median "${eagers[@]}")
  each=$(IFS=' '; echo "${ratios[*]}")
  awk -v n="$name" -v f="$files" -v l="$lazy_med" -v e="$eager_med" -v r="$(median "${ratios[@]}")" \
    -v each="$each" -v nat="${native_s[$name]}" -v rss="$peak" \
    'BEGIN { printf "%-8s %9d %8.2f %9.2f %8.2f %11.2f× %-22s %11.2f× %14d\n", n, f, l, e, nat, r, each, l/nat, rss }'
  rm -rf "$work/cold-eager"
done

# A mount of the local store itself (no service, no cache), against the
# native cold times above: the service lets go of the store first.
stopped "$serve_pid"
echo
printf '%-8s %16s %8s %12s\n' tree 'local mount s' 'native s' 'local/native'
for p in $(grep -e -rust -e -python "$work/closure"); do
  name=${p##*-}
  start_mount --store "redb://$work/server/store.redb"
  drop_caches
  t0=$(now)
  nix hash path --type sha256 --base32 "$work/cold-mnt/$(basename "$p")" >/dev/null
  t1=$(now)
  stopped "$mount_pid"
  awk -v n="$name" -v l="$(awk "BEGIN{print $t1-$t0}")" -v nat="${native_s[$name]}" \
    'BEGIN { printf "%-8s %16.2f %8.2f %11.2f×\n", n, l, nat, nat/l }'
done
