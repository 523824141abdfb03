#!/usr/bin/env bash
# Storage efficiency: what the builder benchmark's real Nix-built paths (a
# Rust toolchain and a Python install) take in a lazystore store against
# their zstd NARs from `nix copy` (the narinfos' FileSize), as imported and
# after `lazystore compact`; the import's speed against `nix copy` from the
# same zstd cache; the compaction's; and a cold `nix hash path` of each
# path through a builder's mount of `lazystore serve` (empty local cache,
# page cache dropped) of the store as imported and compacted. One run,
# the same data for every figure. Uses the corpus bench/builder.sh
# prepares: run that once first.
#
# Usage: bench/storage.sh   (as root; release build)
#   BENCH_DIR  the builder bench's directory (default
#              /var/tmp/lazystore-builder-bench)
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
builder_corpus
paths=$(grep -e -rust -e -python "$work/closure")
dir=$work/storage
secs() { awk "BEGIN{printf \"%.2f\", $2-$1}"; }
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  mountpoint -q "$dir/mnt" && fusermount3 -u -z "$dir/mnt" || true
}
trap cleanup EXIT
rm -rf "$dir" && mkdir -p "$dir/mnt"

# Import (lazystore) against `nix copy` into a fresh store, same cache.
drop_caches
t0=$(now)
"$lazystore" import --from "file://$work/cache" --trusted-public-key "$public" \
  --store "redb://$dir/store.redb" $paths >"$dir/import.log" 2>&1
t1=$(now)
drop_caches
t2=$(now)
nix copy --from "file://$work/cache" --to "local?root=$dir/nix" \
  --option trusted-public-keys "$public" $paths 2>>"$dir/import.log"
t3=$(now)
rm -rf "$dir/nix"
nar_mb=$(awk '/NarSize/ { s += $2 } END { printf "%.1f", s / 1e6 }' \
  $(for p in $paths; do echo "$work/cache/$(basename "$p" | cut -c1-32).narinfo"; done))
echo "import of $nar_mb MB of NAR from the zstd cache:"
printf '%-18s %8s %8s\n' tool seconds 'MB/s'
printf '%-18s %8s %8.0f\n' 'lazystore import' "$(secs "$t0" "$t1")" "$(awk "BEGIN{print $nar_mb/($t1-$t0)}")"
printf '%-18s %8s %8.0f\n' 'nix copy' "$(secs "$t2" "$t3")" "$(awk "BEGIN{print $nar_mb/($t3-$t2)}")"
echo "lazystore import / nix copy time: $(awk "BEGIN{printf \"%.2f×\", ($t1-$t0)/($t3-$t2)}")"

# What each path takes, as imported and compacted, against its zstd NAR.
per_path() { "$lazystore" stats --store "redb://$1" 2>/dev/null |
  awk -F'\t' '$1 ~ /^\/nix\/store/ { print $1, $5 }'; }
per_path "$dir/store.redb" >"$dir/imported.stats"
cp -r "$dir/store.redb" "$dir/compacted.redb"
cp -r --sparse=always "$dir/store.packs" "$dir/compacted.packs"
t0=$(now)
"$lazystore" compact --store "redb://$dir/compacted.redb" 2>/dev/null | tee "$dir/compact.log"
t1=$(now)
per_path "$dir/compacted.redb" >"$dir/compacted.stats"
echo "compact: $(secs "$t0" "$t1") s, $(awk "BEGIN{printf \"%.0f\", $nar_mb/($t1-$t0)}") MB/s of NAR"
echo
printf '%-8s %9s %10s %12s %10s %12s %11s\n' path 'NAR MB' 'zstd MB' 'imported MB' 'imp/zstd' 'compacted MB' 'comp/zstd'
for p in $paths; do
  info=$work/cache/$(basename "$p" | cut -c1-32).narinfo
  nar=$(awk '/^NarSize/ { print $2 / 1e6 }' "$info")
  zstd=$(awk '/^FileSize/ { print $2 / 1e6 }' "$info")
  imported=$(awk -v p="$p" '$1 == p { print $2 }' "$dir/imported.stats")
  compacted=$(awk -v p="$p" '$1 == p { print $2 }' "$dir/compacted.stats")
  awk -v n="${p##*-}" -v nar="$nar" -v z="$zstd" -v i="$imported" -v c="$compacted" \
    'BEGIN { printf "%-8s %9.1f %10.1f %12.1f %9.3f× %12.1f %10.3f×\n", n, nar, z, i, i/z, c, c/z }'
done
for s in store compacted; do
  echo "$s: on disk $(du -sm "$dir/$s.packs" | cut -f1) MiB of packs, $(du -sm "$dir/$s.redb" | cut -f1) MiB of index"
done

# Cold reads through the service, the store as imported and compacted.
echo
printf '%-8s %12s %14s %12s\n' path 'imported s' 'compacted s' 'comp/imp'
declare -A cold cpu
for s in store compacted; do
  started "$dir/serve.out" serve --listen 127.0.0.1:0 --store "redb://$dir/$s.redb"
  serve_pid=$started_pid
  grpc=$(head -n 1 "$dir/serve.out")
  for p in $paths; do
    rm -rf "$dir/cache.redb" "$dir/cache.packs"
    started "$dir/mount.out" mount "$dir/mnt" --store "$grpc" --cache "redb://$dir/cache.redb"
    drop_caches
    t0=$(now)
    nix hash path --type sha256 --base32 "$dir/mnt/$(basename "$p")" >/dev/null
    t1=$(now)
    cold[$s/${p##*-}]=$(awk "BEGIN{print $t1-$t0}")
    stopped "$started_pid"
  done
  # The service's CPU seconds (user + system) over both walks.
  cpu[$s]=$(awk -v t="$(getconf CLK_TCK)" '{ printf "%.2f", ($14 + $15) / t }' "/proc/$serve_pid/stat")
  stopped "$serve_pid"
done
for p in $paths; do
  n=${p##*-}
  awk -v n="$n" -v i="${cold[store/$n]}" -v c="${cold[compacted/$n]}" \
    'BEGIN { printf "%-8s %12.2f %14.2f %11.2f×\n", n, i, c, c/i }'
done
echo "service CPU over both walks: ${cpu[store]} s imported, ${cpu[compacted]} s compacted"
