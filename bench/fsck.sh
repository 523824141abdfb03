#!/usr/bin/env bash
# fsck throughput: one store path of SIZE_MB MiB (default 2048) of
# incompressible files, imported from a file:// binary cache into a fresh
# redb store; `lazystore fsck` of the store (every chunk read, verified and
# rendered back into the NAR, hashed) against `nix hash path` of the same
# path in the Nix store (the NAR serialised from the files, hashed), RUNS
# times each, alternating. Prints a table with MB/s and peak RSS.
#
# Usage: bench/fsck.sh   (run as root, with nix-bin)
#   SIZE_MB    size of the path (default 2048)
#   BENCH_DIR  where the cache and store go (default /var/tmp/lazystore-fsck)
#   RUNS       runs of each (default 3)
set -euo pipefail
cd "$(dirname "$0")/.."

export NIX_CONFIG=$'experimental-features = nix-command\nsandbox = false\nbuild-users-group =\nsubstituters ='
size_mb=${SIZE_MB:-2048}
runs=${RUNS:-3}
work=${BENCH_DIR:-/var/tmp/lazystore-fsck}
rm -rf "$work"
mkdir -p "$work/tree"

cargo build --quiet --release --bin lazystore
lazystore=${CARGO_TARGET_DIR:-$PWD/target}/release/lazystore

echo "making a path of $size_mb MiB…"
files=16
for i in $(seq "$files"); do
  head -c "$((size_mb * 1024 * 1024 / files))" /dev/urandom >"$work/tree/f$i"
done
path=$(nix-store --add "$work/tree")
rm -rf "$work/tree"
nix-store --generate-binary-cache-key fsck-bench-1 "$work/key.sec" "$work/key.pub"
nix store sign -k "$work/key.sec" "$path"
nix copy --to "file://$work/cache?compression=none" "$path"
"$lazystore" import --from "file://$work/cache" --trusted-public-key "$(cat "$work/key.pub")" \
  --store "redb://$work/store.redb" "$path" >/dev/null
rm -rf "$work/cache"
nar=$(nix-store --query --size "$path")

# "seconds peak_rss_kib" of a command, its output discarded.
measure() {
  /usr/bin/time -f '%e %M' -o "$work/time" "$@" >/dev/null
  cat "$work/time"
}
ours=()
theirs=()
for i in $(seq "$runs"); do
  ours+=("$(measure "$lazystore" fsck --store "redb://$work/store.redb")")
  theirs+=("$(measure nix hash path "$path")")
done

python3 - "$nar" "$(printf '%s;' "${ours[@]}")" "$(printf '%s;' "${theirs[@]}")" <<'PY'
import statistics, sys
nar = int(sys.argv[1])
def runs(arg):
    return [tuple(float(x) for x in r.split()) for r in arg.split(";") if r]
print(f"one path, NAR of {nar / 2**20:.0f} MiB")
print(f"{'tool':<34} {'median':>8} {'MB/s':>7} {'peak RSS':>9}")
medians = {}
for name, rs in [("lazystore fsck (redb store)", runs(sys.argv[2])), ("nix hash path (Nix store)", runs(sys.argv[3]))]:
    t = statistics.median(r[0] for r in rs)
    rss = max(r[1] for r in rs) / 1024
    medians[name] = t
    print(f"{name:<34} {t:>7.2f}s {nar / 1e6 / t:>7.0f} {rss:>7.0f} MiB")
a, b = medians.values()
print(f"fsck / nix hash path: {b / a:.2f} x the speed")
PY
