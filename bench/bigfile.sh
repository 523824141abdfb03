#!/usr/bin/env bash
# Cold read of one large file: the largest file of the builder bench's Rust
# toolchain (libLLVM, about 200 MB) read whole (`cat > /dev/null`) through
# a builder's mount of `lazystore serve` with an empty local cache, against
# a native cold read of the same file from a copy of the path on this
# machine's disk; page cache dropped before each, RUNS times each,
# alternating. Uses the corpus bench/builder.sh prepares: run that once
# first.
#
# Usage: bench/bigfile.sh   (as root; release build)
#   BENCH_DIR  the builder bench's directory (default
#              /var/tmp/lazystore-builder-bench)
#   RUNS       runs of each (default 3)
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${RUNS:-3}
. bench/lib.sh
builder_corpus
rust=$(grep -e -rust "$work/closure")
dir=$work/bigfile
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  mountpoint -q "$dir/mnt" && fusermount3 -u -z "$dir/mnt" || true
}
trap cleanup EXIT
rm -rf "$dir" && mkdir -p "$dir/mnt"

# The native copy: the path from its binary cache into a scratch store.
nix copy --from "file://$work/cache" --to "local?root=$dir/native" \
  --option trusted-public-keys "$public" "$rust" 2>"$dir/copy.log"
file=$(cd "$dir/native$rust" && find . -type f -printf '%s %P\n' | sort -n | tail -n 1 | cut -d' ' -f2-)
size=$(stat -c %s "$dir/native$rust/$file")

started "$dir/serve.out" serve --listen 127.0.0.1:0 --store "redb://$work/server/store.redb"
grpc=$(head -n 1 "$dir/serve.out")

lazy=() native=()
for i in $(seq "$runs"); do
  rm -rf "$dir/cache.redb" "$dir/cache.packs" "$dir/cache.files"
  started "$dir/mount.out" mount "$dir/mnt" --store "$grpc" --cache "redb://$dir/cache.redb"
  drop_caches
  t0=$(now)
  cat "$dir/mnt/$(basename "$rust")/$file" >/dev/null
  t1=$(now)
  lazy+=("$(awk "BEGIN{print $t1-$t0}")")
  stopped "$started_pid"
  drop_caches
  t0=$(now)
  cat "$dir/native$rust/$file" >/dev/null
  t1=$(now)
  native+=("$(awk "BEGIN{print $t1-$t0}")")
done
rm -rf "$dir/native"

median() { printf '%s\n' "$@" | sort -n | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }
l=$(median "${lazy[@]}") n=$(median "${native[@]}")
echo "cold read of $file ($size bytes), $runs runs each, medians:"
printf '%-34s %8s %9s\n' read seconds 'MB/s'
printf '%-34s %8.3f %9.0f\n' 'through serve, empty local cache' "$l" "$(awk "BEGIN{print $size/1e6/$l}")"
printf '%-34s %8.3f %9.0f\n' 'native, from disk' "$n" "$(awk "BEGIN{print $size/1e6/$n}")"
echo "lazy / native speed: $(awk "BEGIN{printf \"%.2f×\", $n/$l}") (runs: lazy ${lazy[*]}; native ${native[*]})"
