#!/usr/bin/env bash
# What checking a published path costs the server: `lazystore import` of
# one signed path of SIZE_MB MiB of incompressible files (default 1024),
# from a file:// binary cache into a `lazystore serve` on 127.0.0.1 over a
# fresh redb store, with and without --trusted-public-key (with it, the
# server hashes the NAR of the tree it stored before publishing the
# PathInfo). Alternating, RUNS times each; prints a table, the ratio of
# medians and the cost per GiB.
#
# Usage: bench/publish_verify.sh   (run as root, with nix-bin)
#   SIZE_MB    size of the path (default 1024)
#   BENCH_DIR  where the cache and stores go (default /var/tmp/lazystore-publish)
#   RUNS       runs of each (default 3)
set -euo pipefail
cd "$(dirname "$0")/.."

export NIX_CONFIG=$'experimental-features = nix-command\nsandbox = false\nbuild-users-group =\nsubstituters ='
size_mb=${SIZE_MB:-1024}
runs=${RUNS:-3}
work=${BENCH_DIR:-/var/tmp/lazystore-publish}
rm -rf "$work"
mkdir -p "$work/tree"

cargo build --quiet --release --bin lazystore
lazystore=${CARGO_TARGET_DIR:-$PWD/target}/release/lazystore

echo "making a path of $size_mb MiB…"
files=8
for i in $(seq "$files"); do
  head -c "$((size_mb * 1024 * 1024 / files))" /dev/urandom >"$work/tree/f$i"
done
path=$(nix-store --add "$work/tree")
rm -rf "$work/tree"
nix-store --generate-binary-cache-key publish-bench-1 "$work/key.sec" "$work/key.pub"
nix store sign -k "$work/key.sec" "$path"
nix copy --to "file://$work/cache?compression=none" "$path"
public=$(cat "$work/key.pub")
nar=$(nix-store --query --size "$path")

server=
trap '[ -n "$server" ] && kill "$server" 2>/dev/null || true' EXIT

# Serves a fresh store with the flags given; sets $server and $url.
serve() {
  rm -rf "$work/store" && mkdir -p "$work/store"
  : >"$work/serve.out"
  "$lazystore" serve --listen 127.0.0.1:0 --store "redb://$work/store/store.redb" "$@" \
    >"$work/serve.out" 2>"$work/serve.log" &
  server=$!
  url=
  until [ -n "$url" ]; do
    sleep 0.05
    url=$(head -n 1 "$work/serve.out")
  done
}

# Seconds `lazystore import` of the path into $url takes.
import_seconds() {
  local start end
  start=$(date +%s.%N)
  "$lazystore" import --from "file://$work/cache" --trusted-public-key "$public" \
    --store "$url" "$path" >/dev/null
  end=$(date +%s.%N)
  python3 -c "print(f'{$end - $start:.2f}')"
}

plain=()
checked=()
for i in $(seq "$runs"); do
  serve
  plain+=("$(import_seconds)")
  kill "$server" && wait "$server" || true
  serve --trusted-public-key "$public"
  checked+=("$(import_seconds)")
  grep -q refused "$work/serve.log" && {
    echo "publish_verify.sh: the server refused the path:" >&2
    cat "$work/serve.log" >&2
    exit 1
  }
  kill "$server" && wait "$server" || true
  server=
done

python3 - "$nar" "${plain[*]}" "${checked[*]}" <<'PY'
import statistics, sys
nar = int(sys.argv[1])
plain = [float(x) for x in sys.argv[2].split()]
checked = [float(x) for x in sys.argv[3].split()]
gib = nar / 2**30
print(f"one path, NAR of {nar / 2**20:.0f} MiB, imported into lazystore serve over gRPC")
print(f"{'server':<32} {'min':>7} {'median':>7} {'max':>7}")
for name, xs in [("no keys", plain), ("--trusted-public-key", checked)]:
    print(f"{name:<32} {min(xs):>6.2f}s {statistics.median(xs):>6.2f}s {max(xs):>6.2f}s")
p, c = statistics.median(plain), statistics.median(checked)
print(f"checked / unchecked: {c / p:.2f} x; the check costs {(c - p) / gib:.2f} s per GiB")
PY
