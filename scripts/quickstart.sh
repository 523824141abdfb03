#!/usr/bin/env bash
# Quick start, end to end and offline: builds a small closure with real Nix,
# writes it to a signed binary cache served over HTTP on 127.0.0.1, imports
# it into a `lazystore serve` store, mounts that store with FUSE through
# gRPC (empty local cache), runs a program from the mount and reads a file,
# and prints what was fetched against what the mount presents.
#
# The real use is the same commands against the caches you already use:
#   lazystore import /nix/store/…-hello-2.12.1        # from cache.nixos.org, with its key
#   lazystore import --from https://my.cache --trusted-public-key my.cache-1:… PATH
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v nix-store >/dev/null || need+=(nix-bin)
command -v fusermount3 >/dev/null || need+=(fuse3)
command -v python3 >/dev/null || need+=(python3)   # serves the binary cache over HTTP
if ((${#need[@]})); then
  echo "quickstart: installing ${need[*]}" >&2
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
export NIX_CONFIG=$'experimental-features = nix-command\nsandbox = false\nbuild-users-group =\nsubstituters ='

# LAZYSTORE_BIN: a lazystore already built (the test that runs this script).
if [[ -n ${LAZYSTORE_BIN:-} ]]; then
  lazystore=$LAZYSTORE_BIN
else
  cargo build --quiet --bin lazystore
  lazystore=$PWD/target/debug/lazystore
fi

work=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  fusermount3 -u "$work/mnt" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

# A closure of three paths: an app, a library holding a 30 MB data file
# nobody reads, and a greeting the app prints.
cat >"$work/closure.nix" <<NIX
let
  mk = name: script: derivation {
    inherit name;
    system = builtins.currentSystem;
    builder = "/bin/sh";
    args = [ "-c" script ];
  };
  greeting = mk "demo-greeting" "echo 'hello from a lazy store ($(date +%s%N))' > \$out";
  lib = mk "demo-lib" ''
    /bin/mkdir -p \$out/share
    echo \${greeting} > \$out/share/greeting-path
    /usr/bin/head -c 30000000 /dev/urandom > \$out/share/big-data.bin
  '';
in mk "demo-app" ''
  /bin/mkdir -p \$out/bin
  printf '#!/bin/sh\ncat \${greeting}\n' > \$out/bin/demo
  /bin/chmod +x \$out/bin/demo
  /bin/ln -s \${lib} \$out/lib
''
NIX
app=$(nix-build --no-out-link "$work/closure.nix")
lib=$(nix-store --query --references "$app" | grep demo-lib)
nix-store --generate-binary-cache-key demo-cache-1 "$work/key.sec" "$work/key.pub"
nix store sign -r -k "$work/key.sec" "$app"
nix copy --to "file://$work/cache?compression=zstd" "$app"
echo "== closure of $app:"
nix-store --query --requisites "$app" | sed 's/^/   /'

python3 -m http.server --bind 127.0.0.1 --directory "$work/cache" 0 >"$work/http.log" 2>&1 &
pids+=($!)
until port=$(grep -o 'port [0-9]*' "$work/http.log" | grep -o '[0-9]*'); do sleep 0.1; done

echo "== lazystore serve (the central store, redb):"
mkdir -p "$work/server" "$work/builder"
"$lazystore" serve --listen 127.0.0.1:0 --store "redb://$work/server/store.redb" >"$work/serve.out" &
pids+=($!)
until grep -q . "$work/serve.out"; do sleep 0.1; done
server=$(head -1 "$work/serve.out")
echo "   $server"

echo "== lazystore import (from the binary cache into the service):"
"$lazystore" import --from "http://127.0.0.1:$port" --trusted-public-key "$(cat "$work/key.pub")" \
  --store "$server" "$app"

echo "== lazystore mount (through gRPC, empty local cache):"
mkdir "$work/mnt"
"$lazystore" mount "$work/mnt" --store "$server" --cache "redb://$work/builder/cache.redb" \
  >"$work/mount.out" &
pids+=($!)
until grep -q . "$work/mount.out"; do sleep 0.1; done
mnt=$work/mnt
echo "   mounted at $mnt"

echo "== a program run from the mount:"
"$mnt/$(basename "$app")/bin/demo"
echo "== ls -l of the library (metadata only: nothing fetched for it):"
ls -l "$mnt/$(basename "$lib")/share" | sed 's/^/   /'
echo "== what the mount fetched, against what it presents:"
sed 's/^/   /' "$mnt/.lazystore/stats"
