#!/usr/bin/env bash
# Import benchmark for a closure of many small paths: N paths (default 500)
# built with real Nix, each referring to the one before, written to a
# signed xz binary cache with NAR listings and served over HTTP on
# 127.0.0.1; `lazystore import` of the closure into a fresh redb store
# against `nix copy --from` of it into a fresh Nix store, in the same run,
# RUNS times each, alternating. Prints a table and the ratio of medians.
#
# Usage: bench/many_paths.sh [N]   (run as root, with nix-bin)
#   BENCH_DIR  where the cache and stores go (default /var/tmp/lazystore-many)
#   RUNS       runs of each tool (default 3)
set -euo pipefail
cd "$(dirname "$0")/.."

export NIX_CONFIG=$'experimental-features = nix-command\nsandbox = false\nbuild-users-group =\nsubstituters ='
n=${1:-500}
runs=${RUNS:-3}
work=${BENCH_DIR:-/var/tmp/lazystore-many}
rm -rf "$work"
mkdir -p "$work"

cargo build --quiet --release --bin lazystore
lazystore=${CARGO_TARGET_DIR:-$PWD/target}/release/lazystore

cat >"$work/paths.nix" <<NIX
let
  mk = name: script: derivation {
    inherit name;
    system = builtins.currentSystem;
    builder = "/bin/sh";
    args = [ "-c" script ];
  };
  paths = builtins.genList (i: mk "lazystore-bench-many-\${toString i}" (''
    /bin/mkdir -p \$out/bin \$out/share
    echo '$(date +%s%N) \${toString i}' > \$out/share/note
    printf '#!/bin/sh\necho \${toString i}\n' > \$out/bin/tool
    /bin/chmod +x \$out/bin/tool
    /bin/ln -s share/note \$out/link
  '' + (if i == 0 then "" else "echo \${builtins.elemAt paths (i - 1)} > \$out/prev\n"))) $n;
in builtins.elemAt paths ($n - 1)
NIX
echo "building $n paths…"
top=$(nix-build --no-out-link "$work/paths.nix")
count=$(nix-store --query --requisites "$top" | wc -l)
nar=0
for p in $(nix-store --query --requisites "$top"); do nar=$((nar + $(nix-store --query --size "$p"))); done
nix-store --generate-binary-cache-key many-1 "$work/key.sec" "$work/key.pub"
nix store sign -r -k "$work/key.sec" "$top"
nix copy --to "file://$work/cache?compression=xz&write-nar-listing=true" "$top"
public=$(cat "$work/key.pub")

python3 -m http.server 0 --bind 127.0.0.1 --directory "$work/cache" >"$work/http.log" 2>&1 &
server=$!
trap 'kill $server 2>/dev/null || true' EXIT
until port=$(grep -o 'port [0-9]*' "$work/http.log" | grep -o '[0-9]*'); do sleep 0.1; done
url=http://127.0.0.1:$port

seconds() {
  local start end
  start=$(date +%s.%N)
  "$@" >/dev/null 2>&1
  end=$(date +%s.%N)
  python3 -c "print(f'{$end - $start:.2f}')"
}
ours=()
theirs=()
for i in $(seq "$runs"); do
  rm -rf "$work/store" "$work/nixroot"
  mkdir -p "$work/store"
  ours+=("$(seconds "$lazystore" import --from "$url" --trusted-public-key "$public" \
    --store "redb://$work/store/store.redb" -j 8 "$top")")
  # Every path must be there, verified: the import exits non-zero otherwise.
  "$lazystore" import --from "$url" --trusted-public-key "$public" \
    --store "redb://$work/store/store.redb" "$top" | grep -q "paths: 0 imported, $count already present" || {
    echo "many_paths.sh: the import did not store every path" >&2
    exit 1
  }
  theirs+=("$(seconds nix copy --from "$url" --option trusted-public-keys "$public" \
    --to "local?root=$work/nixroot" "$top")")
done
median() { printf '%s\n' "$@" | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
mo=$(median "${ours[@]}")
mt=$(median "${theirs[@]}")
printf '\n%s paths, %s bytes of NAR, xz cache over HTTP on loopback, %s runs each\n\n' "$count" "$nar" "$runs"
printf '| tool | seconds (each run) | median |\n|---|---|---:|\n'
printf '| `lazystore import -j 8` into redb | %s | %s |\n' "${ours[*]}" "$mo"
printf '| `nix copy --from` into a fresh store | %s | %s |\n' "${theirs[*]}" "$mt"
python3 -c "print(f'\nlazystore import: {$mt / $mo:.2f} x as fast as nix copy (ratio of medians)')"
