#!/usr/bin/env bash
# Warm, open-heavy reads: `nix hash path` (opens and reads every file) and
# `find -type f | xargs stat` of the builder bench's Rust toolchain and
# Python install through a builder's mount of `lazystore serve` whose
# local cache and page cache already hold them (each walked twice first),
# against the same trees on the native filesystem, warm too (a copy made
# by `nix copy` from the zstd cache, walked twice first). Both mount
# modes: the default (no passthrough: the kernel sends no opens) and
# `--passthrough` (every open and release a round trip to the mount).
# Each figure is the best of three runs. Uses the corpus bench/builder.sh
# prepares: run that once first.
#
# Usage: bench/warm.sh   (as root; release build)
#   BENCH_DIR  the builder bench's directory (default
#              /var/tmp/lazystore-builder-bench)
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
builder_corpus
mnt=$work/warm-mnt
native=$work/warm-native
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  mountpoint -q "$mnt" && fusermount3 -u -z "$mnt" || true
  rm -rf "$native" "$work/warm-cache.redb" "$work/warm-cache.packs" "$work/warm-cache.files"
}
trap cleanup EXIT
mkdir -p "$mnt"

hash() { nix hash path --type sha256 --base32 "$1" >/dev/null; }
stats() { find "$1" -type f -print0 | xargs -0 stat >/dev/null; }
# best CMD DIR: the least of three timed runs, in seconds.
best() {
  local b= t0 t1
  for _ in 1 2 3; do
    t0=$(now)
    "$1" "$2"
    t1=$(now)
    b=$(awk -v b="$b" -v t="$(awk "BEGIN{print $t1-$t0}")" 'BEGIN { print (b == "" || t < b) ? t : b }')
  done
  echo "$b"
}

paths=$(grep -e -rust -e -python "$work/closure")
rm -rf "$native"
nix copy --from "file://$work/cache" --to "local?root=$native" --option trusted-public-keys "$public" \
  $paths 2>>"$work/warm.log"

started "$work/warm.serve" serve --listen 127.0.0.1:0 --store "redb://$work/server/store.redb"
grpc=$(head -n 1 "$work/warm.serve")

printf '%-8s %-15s %-6s %9s %9s %12s\n' tree mount walk 'lazy s' 'native s' 'lazy/native'
for mode in default --passthrough; do
  rm -rf "$work/warm-cache.redb" "$work/warm-cache.packs" "$work/warm-cache.files"
  args=(--store "$grpc" --cache "redb://$work/warm-cache.redb")
  [[ $mode == default ]] || args+=("$mode")
  started "$work/warm.mount" mount "$mnt" "${args[@]}"
  mount_pid=$started_pid
  for p in $paths; do
    name=${p##*-}
    lazy=$mnt/$(basename "$p")
    # Fill the local cache and the page caches. (A path read as a walk
    # has no file written out for passthrough: with --passthrough what is
    # measured is the round trip of every open and release.)
    for walk in 1 2; do hash "$lazy"; hash "$native$p"; done
    for walk in hash stats; do
      l=$(best "$walk" "$lazy")
      n=$(best "$walk" "$native$p")
      awk -v t="$name" -v m="$mode" -v w="$walk" -v l="$l" -v n="$n" \
        'BEGIN { printf "%-8s %-15s %-6s %9.3f %9.3f %11.2f×\n", t, m, w, l, n, n / l }'
    done
  done
  passthrough_opens=$(awk '$1 == "passthrough_opens" { print $2 }' "$mnt/.lazystore/stats")
  stopped "$mount_pid"
  echo "($mode: $passthrough_opens passthrough opens)"
done
echo "targets (lazy/native speed): hash ≥ 0.8×, stats ≥ 0.9×"
