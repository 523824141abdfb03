#!/usr/bin/env bash
# gc throughput: two store paths of SIZE_MB MiB each (default 1024) of
# incompressible files, imported into a fresh redb store (2 GiB in all);
# one is deleted, then `lazystore gc` marks the other and sweeps the
# first's chunks. Prints seconds, bytes reclaimed, seconds per GB
# reclaimed and peak RSS, with `lazystore fsck` of the same store before
# the delete for scale.
#
# Usage: bench/gc.sh   (run as root, with nix-bin)
#   SIZE_MB    size of each path (default 1024)
#   BENCH_DIR  where the cache and store go (default /var/tmp/lazystore-gc)
set -euo pipefail
cd "$(dirname "$0")/.."

export NIX_CONFIG=$'experimental-features = nix-command\nsandbox = false\nbuild-users-group =\nsubstituters ='
size_mb=${SIZE_MB:-1024}
work=${BENCH_DIR:-/var/tmp/lazystore-gc}
rm -rf "$work"
mkdir -p "$work"

cargo build --quiet --release --bin lazystore
lazystore=${CARGO_TARGET_DIR:-$PWD/target}/release/lazystore

paths=()
for p in kept dropped; do
  mkdir -p "$work/$p"
  for i in $(seq 8); do
    head -c "$((size_mb * 1024 * 1024 / 8))" /dev/urandom >"$work/$p/f$i"
  done
  paths+=("$(nix-store --add "$work/$p")")
  rm -rf "${work:?}/$p"
done
nix-store --generate-binary-cache-key gc-bench-1 "$work/key.sec" "$work/key.pub"
nix store sign -k "$work/key.sec" "${paths[@]}"
nix copy --to "file://$work/cache?compression=none" "${paths[@]}"
store="redb://$work/store.redb"
"$lazystore" import --from "file://$work/cache" --trusted-public-key "$(cat "$work/key.pub")" \
  --store "$store" "${paths[@]}" >/dev/null
rm -rf "$work/cache"

/usr/bin/time -f '%e %M' -o "$work/fsck.time" "$lazystore" fsck --store "$store" >/dev/null
"$lazystore" delete --store "$store" "${paths[1]}" >/dev/null
/usr/bin/time -f '%e %M' -o "$work/gc.time" "$lazystore" gc --store "$store" >"$work/gc.out"
cat "$work/gc.out"

python3 - "$work/fsck.time" "$work/gc.time" "$work/gc.out" "$((size_mb * 2))" <<'PY'
import re, sys
fsck_s, fsck_rss = open(sys.argv[1]).read().split()
gc_s, gc_rss = open(sys.argv[2]).read().split()
reclaimed = int(re.search(r"\((\d+) reclaimed\)", open(sys.argv[3]).read()).group(1))
total_mib = int(sys.argv[4])
print(f"store of {total_mib} MiB of NAR (two paths), one deleted")
print(f"{'command':<18} {'seconds':>8} {'peak RSS':>9}  figure")
print(f"{'lazystore fsck':<18} {float(fsck_s):>8.2f} {int(fsck_rss) / 1024:>6.0f} MiB  {total_mib * 2**20 / 1e6 / float(fsck_s):.0f} MB/s checked")
print(f"{'lazystore gc':<18} {float(gc_s):>8.2f} {int(gc_rss) / 1024:>6.0f} MiB  {reclaimed / 1e6:.0f} MB reclaimed, {float(gc_s) / (reclaimed / 1e9):.2f} s per GB reclaimed")
PY
