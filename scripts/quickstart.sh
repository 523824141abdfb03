#!/usr/bin/env bash
# Quick start, offline: makes a store path with real Nix, then shows what
# lazystore makes of its NAR and checks the round trip against Nix's own hash.
#
# Today this exercises the ingest/render core (NAR -> chunks + directories ->
# NAR). Import from binary caches and the FUSE mount are still to come.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v nix-store >/dev/null; then
  echo "quickstart: installing nix-bin (real Nix, used to make the sample store path)" >&2
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nix-bin >/dev/null
fi
export NIX_CONFIG=$'experimental-features = nix-command\nsandbox = false\nbuild-users-group =\nsubstituters ='

cargo build --quiet
lazystore=target/debug/lazystore

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
tree=$work/sample
mkdir -p "$tree/bin" "$tree/share/doc" "$tree/empty"
printf '#!/bin/sh\necho hello from a lazy store\n' >"$tree/bin/hello"
chmod +x "$tree/bin/hello"
head -c 3000000 /dev/urandom >"$tree/share/blob.bin"
cp "$tree/share/blob.bin" "$tree/share/same-bytes.bin"
echo "sample tree" >"$tree/share/doc/README"
ln -s ../share/doc/README "$tree/bin/readme-link"

path=$(nix-store --add "$tree")
echo "== store path: $path"
echo "== nix hash path: sha256:$(nix hash path --type sha256 --base32 "$path")"
echo "== lazystore nar-check:"
nix-store --dump "$path" | "$lazystore" nar-check -
