#!/usr/bin/env bash
# Import, end to end and offline: builds a small closure with real Nix (three
# paths with references), writes it to a signed binary cache, serves that over
# HTTP on 127.0.0.1, imports it with `lazystore import`, then imports it again
# (nothing is downloaded the second time).
#
# The real use is the same command against the caches you already use:
#   lazystore import /nix/store/…-hello-2.12.1          # cache.nixos.org, its key
#   lazystore import --from https://my.cache --trusted-public-key my.cache-1:… PATH
set -euo pipefail
cd "$(dirname "$0")/../.."

if ! command -v nix-store >/dev/null; then
  echo "demo: installing nix-bin (real Nix, used to build the sample cache)" >&2
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nix-bin >/dev/null
fi
export NIX_CONFIG=$'experimental-features = nix-command\nsandbox = false\nbuild-users-group =\nsubstituters ='

cargo build --quiet --bin lazystore
lazystore=$PWD/target/debug/lazystore

work=$(mktemp -d)
server=
trap '[[ -n $server ]] && kill $server 2>/dev/null; rm -rf "$work"' EXIT

cat >"$work/closure.nix" <<EOF
let
  mk = name: script: derivation {
    inherit name;
    system = builtins.currentSystem;
    builder = "/bin/sh";
    args = [ "-c" script ];
  };
  greeting = mk "demo-greeting" "echo 'hello from a lazy store ($(date +%s%N))' > \$out";
  lib = mk "demo-lib" "/bin/mkdir -p \$out/share; echo \${greeting} > \$out/share/greeting-path";
in mk "demo-app" ''
  /bin/mkdir -p \$out/bin
  printf '#!/bin/sh\ncat \${greeting}\n' > \$out/bin/demo
  /bin/chmod +x \$out/bin/demo
  /bin/ln -s \${lib} \$out/lib
''
EOF
app=$(nix-build --no-out-link "$work/closure.nix")
nix-store --generate-binary-cache-key demo-cache-1 "$work/key.sec" "$work/key.pub"
nix store sign -r -k "$work/key.sec" "$app"
nix copy --to "file://$work/cache?compression=zstd" "$app"
echo "== closure of $app:"
nix-store --query --requisites "$app" | sed 's/^/   /'

python3 -m http.server --bind 127.0.0.1 --directory "$work/cache" 0 >"$work/http.log" 2>&1 &
server=$!
until port=$(grep -o 'port [0-9]*' "$work/http.log" | grep -o '[0-9]*'); do sleep 0.1; done

store="redb://$work/store/store.redb"
echo "== lazystore import (first time):"
"$lazystore" import --from "http://127.0.0.1:$port" --trusted-public-key "$(cat "$work/key.pub")" \
  --store "$store" "$app"
echo "== lazystore import (again: already present, no NAR downloaded):"
"$lazystore" import --from "http://127.0.0.1:$port" --trusted-public-key "$(cat "$work/key.pub")" \
  --store "$store" "$app"
