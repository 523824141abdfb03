#!/usr/bin/env bash
# A rebuild against another dependency: what the same package costs a
# lazystore store a second time when every file that names one of its
# dependencies names another store path of the same length instead, as a
# rebuild against a changed dependency does (binaries, bytecode and
# scripts included). The package is this machine's Python install (8,762
# files, 308 MB, 5,716 files naming its prefix): real Nix builds it twice,
# once against each of two dependencies named alike, each build copying
# the tree and putting the dependency's store path where the tree names its
# prefix. Both builds go to a zstd binary cache with `nix copy`, once.
# Then in one fresh redb store: the first build imported and compacted,
# the second imported (as-imported cost) and compacted (its cost with
# reference-normalised storage); stored bytes from `lazystore stats`, and
# the files on disk (packs and index) too. The target is at most 5 % extra.
#
# Usage: bench/rebuild.sh   (as root; release build: this script does not
#                            build, run `cargo build --release` first)
#   BENCH_DIR    where the corpus (binary cache) and the store go (default
#                /var/tmp/lazystore-rebuild-bench); the cache is kept and
#                reused (delete BENCH_DIR to make it again)
#   PYTHON_TREE  the install to build from (default ~/.pyenv/versions/3.12.1)
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD

export NIX_CONFIG=$'experimental-features = nix-command\nsandbox = false\nbuild-users-group =\nsubstituters ='
work=${BENCH_DIR:-/var/tmp/lazystore-rebuild-bench}
lazystore=${CARGO_TARGET_DIR:-$repo/target}/release/lazystore
tree=${PYTHON_TREE:-$HOME/.pyenv/versions/3.12.1}

die() {
  echo "bench/rebuild.sh: $*" >&2
  exit 1
}
(($(id -u) == 0)) || die "run as root (it adds to and deletes from /nix/store)"
command -v nix-build >/dev/null || die "no Nix: install nix-bin"
[[ -x $lazystore ]] ||
  die "no lazystore binary at $lazystore: build it (cargo build --release --bin lazystore) or set CARGO_TARGET_DIR"
[[ -d $tree ]] || die "no Python install at $tree (set PYTHON_TREE)"
tree=$(realpath "$tree")
mkdir -p "$work"
cache=$work/cache
dir=$work/store
rm -rf "$dir" && mkdir -p "$dir"
narinfo() { echo "$cache/$(basename "$1" | cut -c1-32).narinfo"; }
field() { awk -v f="$1:" '$1 == f { print $2 }' "$(narinfo "$2")"; }
mb() { awk -v b="$1" 'BEGIN { printf "%.1f", b / 1e6 }'; }

# The corpus, once: the two builds in the cache (lines: build dependency).
if [[ ! -s $work/builds ]] || ! while read -r p _; do [[ -s $(narinfo "$p") ]] || exit 1; done <"$work/builds"; then
  echo "corpus: building $tree twice with real Nix" >&2
  python=$(nix store add-path --name python3 "$tree")
  cat >"$work/builder.sh" <<EOF
set -e
$(command -v cp) -r "\$python" "\$out"
$(command -v chmod) -R u+w "\$out"
cd "\$out"
$(command -v grep) -rlaF -- "\$prefix" . | $(command -v xargs) -d '\n' -r $(command -v sed) -i "s|\$prefix|\$dep|g"
EOF
  : >"$work/builds.new"
  for v in 1 2; do
    mkdir -p "$work/dep$v"
    echo "$v" >"$work/dep$v/version"
    dep=$(nix store add-path --name python3-deps "$work/dep$v")
    cat >"$work/build$v.nix" <<EOF
derivation {
  name = "python3-built";
  system = builtins.currentSystem;
  builder = "/bin/sh";
  args = [ $work/builder.sh ];
  python = builtins.storePath "$python";
  dep = builtins.storePath "$dep";
  prefix = "$tree";
}
EOF
    out=$(nix-build --no-out-link "$work/build$v.nix" 2>>"$work/corpus.log") ||
      die "nix-build $work/build$v.nix failed (see $work/corpus.log)"
    nix copy --to "file://$cache?compression=zstd" "$out" 2>>"$work/corpus.log" ||
      die "nix copy of $out failed (see $work/corpus.log)"
    echo "$out $dep" >>"$work/builds.new"
  done
  mv "$work/builds.new" "$work/builds"
  # The cache has them; /nix/store need not.
  nix-store --delete $(cat "$work/builds") "$python" >/dev/null 2>>"$work/corpus.log" || true
fi
mapfile -t builds < <(cut -d' ' -f1 "$work/builds")
first=${builds[0]} second=${builds[1]}

stored() {
  "$lazystore" stats --store "redb://$dir/store.redb" --summary 2>>"$dir/stats.log" | tee -a "$dir/stats.out" |
    sed -n 's/.*; stored \([0-9.]*\) MB;.*/\1/p'
}
on_disk() { du -sB1 "$dir/store.packs" "$dir/store.redb" | awk '{ s += $1 } END { printf "%.1f", s / 1e6 }'; }
import() {
  "$lazystore" import --from "file://$cache" --no-check-sigs --store "redb://$dir/store.redb" "$1" \
    >>"$dir/import.log" 2>&1 || die "lazystore import $1 failed (see $dir/import.log)"
}
compact() {
  "$lazystore" compact --store "redb://$dir/store.redb" 2>>"$dir/compact.log" | tee -a "$dir/compact.log" ||
    die "lazystore compact failed (see $dir/compact.log)"
}

echo "the builds (NARs from nix copy, zstd; the second differs from the first only in the dependency's hash):"
printf '%-56s %9s %9s %9s\n' 'store path' 'NAR MB' 'zstd MB' 'files'
for p in "${builds[@]}"; do
  printf '%-56s %9s %9s %9s\n' "$(basename "$p")" "$(mb "$(field NarSize "$p")")" "$(mb "$(field FileSize "$p")")" \
    "$(find "$tree" -type f | wc -l)"
done
echo
import "$first"
compact "$first" >/dev/null
alone=$(stored) alone_disk=$(on_disk)
import "$second"
imported=$(stored) imported_disk=$(on_disk)
echo "the second build's compaction:"
compact | sed 's/^/  /'
both=$(stored) both_disk=$(on_disk)
[[ -n $alone && -n $imported && -n $both ]] || die "no stored bytes from lazystore stats (see $dir/stats.log)"
zstd=$(mb "$(field FileSize "$second")")
echo
echo "the second build's extra cost in a store holding the first (compacted), MB:"
printf '%-30s %10s %10s %10s %12s %12s\n' 'second build' 'first' 'both' extra 'extra/first' 'extra/zstd'
row() {
  awk -v w="$1" -v f="$2" -v b="$3" -v z="$zstd" \
    'BEGIN { printf "%-30s %10.1f %10.1f %10.1f %11.3f× %11.3f×\n", w, f, b, b - f, (b - f) / f, (b - f) / z }'
}
row 'imported (stored bytes)' "$alone" "$imported"
row 'compacted (stored bytes)' "$alone" "$both"
row 'compacted (packs + index)' "$alone_disk" "$both_disk"
awk -v f="$alone" -v b="$both" 'BEGIN { printf "target extra ≤ 5 %% of the first: %s\n", ((b - f) <= 0.05 * f ? "met" : "not met") }'
echo "($SECONDS s in all; logs in $dir)"
