#!/usr/bin/env bash
# Import benchmark, one run: `lazystore import` of a >= 1 GB NAR from a zstd
# and from an xz binary cache over HTTP on 127.0.0.1, against real
# `nix copy --from http://…` of the same path into a fresh store, and against
# `zstd -d` / `xz -d -T1` of the same files (the decompression limit).
#
# Usage: importer/scripts/bench.sh [TREE]   (run as root, with nix-bin)
#   TREE      a directory to add to the Nix store as the benchmark path;
#             default: the stable Rust toolchain (1.4 GB of real binaries).
#   BENCH_DIR where caches and stores go (default /var/tmp/lazystore-bench);
#             the caches are kept between runs, the stores are not.
#   STORE     lazystore store URL scheme: redb (default) or memory.
set -euo pipefail
cd "$(dirname "$0")/../.."

export NIX_CONFIG=$'experimental-features = nix-command\nsandbox = false\nbuild-users-group =\nsubstituters ='
tree=${1:-$HOME/.rustup/toolchains/stable-x86_64-unknown-linux-gnu}
work=${BENCH_DIR:-/var/tmp/lazystore-bench}
store_kind=${STORE:-redb}
mkdir -p "$work"

cargo build --quiet --release --bin lazystore
lazystore=$PWD/target/release/lazystore
echo "binary: $lazystore"

if [[ ! -s $work/path ]]; then
  nix-store --add "$tree" >"$work/path"
fi
path=$(cat "$work/path")
if [[ ! -s $work/bench.pub ]]; then
  nix-store --generate-binary-cache-key bench-1 "$work/bench.sec" "$work/bench.pub"
fi
nix store sign -k "$work/bench.sec" "$path"
public=$(cat "$work/bench.pub")
for c in zstd xz; do
  if [[ ! -d $work/$c ]]; then
    echo "writing the $c cache (once)…"
    nix copy --to "file://$work/$c?compression=$c" "$path"
  fi
done
nar_size=$(nix-store --query --size "$path")
echo "path: $path"
echo "NAR: $nar_size bytes"

port_file=$work/port
python3 - "$work" "$port_file" <<'EOF' &
import functools, http.server, sys
class Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass
handler = functools.partial(Quiet, directory=sys.argv[1])
server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
open(sys.argv[2], "w").write(str(server.server_address[1]))
server.serve_forever()
EOF
server=$!
trap 'kill $server 2>/dev/null || true' EXIT
while [[ ! -s $port_file ]]; do sleep 0.1; done
port=$(cat "$port_file")
rm -f "$port_file"

# Runs a command under /usr/bin/time, printing "seconds max_rss_kib".
measure() {
  local log
  log=$(mktemp)
  /usr/bin/time -f '%e %M' -o "$log" "$@" >/dev/null
  cat "$log"
  rm -f "$log"
}
rate() { python3 -c "print(f'{$1 / $2 / 1e6:.0f}')"; }

printf '\n%-6s %-28s %9s %9s %10s\n' cache tool seconds 'MB/s NAR' 'RSS MiB'
for c in zstd xz; do
  rm -rf "$work/store-$c" "$work/nixroot-$c"
  mkdir -p "$work/store-$c"
  if [[ $store_kind == redb ]]; then store="redb://$work/store-$c/store.redb"; else store=memory://; fi
  read -r secs rss < <(measure "$lazystore" import --from "http://127.0.0.1:$port/$c" \
    --trusted-public-key "$public" --store "$store" "$path")
  stored=$(du -sm --apparent-size "$work/store-$c" | cut -f1)
  printf '%-6s %-28s %9s %9s %10s   (store on disk: %s MB)\n' "$c" "lazystore import ($store_kind)" "$secs" "$(rate "$nar_size" "$secs")" $((rss / 1024)) "$stored"

  read -r secs rss < <(measure nix copy --from "http://127.0.0.1:$port/$c" \
    --option trusted-public-keys "$public" --to "local?root=$work/nixroot-$c" "$path")
  printf '%-6s %-28s %9s %9s %10s\n' "$c" "nix copy --from http" "$secs" "$(rate "$nar_size" "$secs")" $((rss / 1024))
  rm -rf "$work/nixroot-$c" "$work/store-$c"

  file=$(ls "$work/$c"/nar/*)
  if [[ $c == zstd ]]; then
    read -r secs rss < <(measure zstd -d -c "$file")
  else
    read -r secs rss < <(measure xz -d -T1 -c "$file")
  fi
  printf '%-6s %-28s %9s %9s %10s\n' "$c" "$c -d (1 core)" "$secs" "$(rate "$nar_size" "$secs")" $((rss / 1024))
done
