#!/usr/bin/env bash
# Two versions of a package: what a second version of a package costs in a
# lazystore store that already holds the first, against that version's own
# zstd NAR from `nix copy` (the narinfo's FileSize). Pairs found on this
# machine (two Rust toolchains, two JDKs) are made into store paths with
# real Nix and written to a zstd binary cache, once. Each pair goes into a
# fresh redb store: the older version imported and compacted, then the
# newer one imported into the same store and compacted again; the newer
# version's extra cost is the store's stored bytes (`lazystore stats`)
# after both less those after the first. The same again in a second fresh
# store without compaction, so the effect of compaction shows. Last, the
# whole corpus in one fresh store, compacted, against the sum of its zstd
# NARs (the target is at most 0.8×) and of its NARs.
#
# Usage: bench/versions.sh   (as root; release build: this script does not
#                             build, run `cargo build --release` first)
#   BENCH_DIR  where the corpus (binary cache) and the stores go (default
#              /var/tmp/lazystore-versions-bench); the cache is kept between
#              runs and reused (delete BENCH_DIR to make it again)
#   PAIRS      the pairs, space-separated, each OLD=DIR,NEW=DIR with the
#              older version first (default: rust-stable and rust-nightly
#              of ~/.rustup/toolchains, jdk-17 and jdk-25 of /usr/lib/jvm)
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD

export NIX_CONFIG=$'experimental-features = nix-command\nsandbox = false\nbuild-users-group =\nsubstituters ='
work=${BENCH_DIR:-/var/tmp/lazystore-versions-bench}
lazystore=${CARGO_TARGET_DIR:-$repo/target}/release/lazystore
pairs=${PAIRS:-"rust-stable=$HOME/.rustup/toolchains/stable-x86_64-unknown-linux-gnu,rust-nightly=$HOME/.rustup/toolchains/nightly-x86_64-unknown-linux-gnu jdk-17=/usr/lib/jvm/java-17-openjdk-amd64,jdk-25=/usr/lib/jvm/temurin-25-jdk-amd64"}

die() {
  echo "bench/versions.sh: $*" >&2
  exit 1
}
(($(id -u) == 0)) || die "run as root (it adds to and deletes from /nix/store)"
command -v nix-store >/dev/null || die "no Nix: install nix-bin"
[[ -x $lazystore ]] ||
  die "no lazystore binary at $lazystore: build it (cargo build --release --bin lazystore) or set CARGO_TARGET_DIR"
mkdir -p "$work"
cache=$work/cache
corpus=$work/corpus # lines: name store-path source-dir
touch "$corpus"
dir=$work/stores
rm -rf "$dir" && mkdir -p "$dir"

narinfo() { echo "$cache/$(basename "$1" | cut -c1-32).narinfo"; }
field() { awk -v f="$1:" '$1 == f { print $2 }' "$(narinfo "$2")"; }
avail_mb() { df --output=avail -BM "$1" | tail -n 1 | tr -dc 0-9; }
mb() { awk -v b="$1" 'BEGIN { printf "%.1f", b / 1e6 }'; }

# The store path of NAME made from DIR, in the cache: made once (the tree
# added to /nix/store, copied to the cache as zstd, deleted from the store).
corpus_path() {
  local name=$1 src=$2 p
  p=$(awk -v n="$name" -v d="$src" '$1 == n && $3 == d { print $2 }' "$corpus" | tail -n 1)
  if [[ -n $p && -s $(narinfo "$p") ]] && grep -qx 'Compression: zstd' "$(narinfo "$p")"; then
    echo "$p"
    return
  fi
  local need have
  need=$(($(du -sm --apparent-size "$src" | cut -f1) * 3 / 2 + 512))
  have=$(avail_mb /nix/store)
  echo "corpus: adding $name ($src) to the store and the cache; $have MB free, $need MB wanted" >&2
  ((have >= need)) || die "too little disk for $name: $have MB free on /nix/store, want $need MB"
  p=$(nix store add-path --name "$name" "$src")
  nix copy --to "file://$cache?compression=zstd" "$p" 2>>"$work/corpus.log" ||
    die "nix copy of $p failed (see $work/corpus.log)"
  grep -qx 'Compression: zstd' "$(narinfo "$p")" ||
    die "$(narinfo "$p") is not zstd: $(grep Compression "$(narinfo "$p")")"
  nix-store --delete "$p" >/dev/null 2>>"$work/corpus.log" ||
    echo "corpus: could not delete $p from /nix/store (kept; see $work/corpus.log)" >&2
  echo "$name $p $src" >>"$corpus"
  echo "$p"
}

# A store's stored bytes, as `lazystore stats --summary` reports them (MB).
stored() {
  "$lazystore" stats --store "redb://$1" --summary 2>>"$dir/stats.log" | tee -a "$dir/stats.out" |
    sed -n 's/.*; stored \([0-9.]*\) MB;.*/\1/p'
}
import() {
  local store=$1
  shift
  "$lazystore" import --from "file://$cache" --no-check-sigs --store "redb://$store" "$@" \
    >>"$dir/import.log" 2>&1 || die "lazystore import $* failed (see $dir/import.log)"
}
compact() {
  "$lazystore" compact --store "redb://$1" >>"$dir/compact.log" 2>&1 ||
    die "lazystore compact $1 failed (see $dir/compact.log)"
}
drop() { rm -rf "${1%.redb}.redb" "${1%.redb}.packs" "${1%.redb}.files"; }

echo "disk: $(avail_mb "$work") MB free in $work before"
declare -A path
names=() olds=() news=()
for pair in $pairs; do
  old=${pair%%,*} new=${pair#*,}
  old_name=${old%%=*} new_name=${new%%=*}
  old_dir=${old#*=} new_dir=${new#*=}
  missing=
  for d in "$old_dir" "$new_dir"; do [[ -d $d ]] || missing+=" $d"; done
  if [[ -n $missing ]]; then
    echo "skipping $old_name -> $new_name: no directory$missing"
    continue
  fi
  path[$old_name]=$(corpus_path "$old_name" "$(realpath "$old_dir")")
  path[$new_name]=$(corpus_path "$new_name" "$(realpath "$new_dir")")
  names+=("$old_name" "$new_name")
  olds+=("$old_name") news+=("$new_name")
done
((${#names[@]})) || die "no pair to measure"
echo "disk: $(avail_mb "$work") MB free in $work with the corpus ($(du -sm "$cache" | cut -f1) MiB of cache)"

echo
echo "corpus (NARs from nix copy, zstd):"
printf '%-14s %-44s %9s %9s %9s\n' name 'store path' 'NAR MB' 'zstd MB' zstd/NAR
for n in "${names[@]}"; do
  p=${path[$n]}
  awk -v n="$n" -v p="$(basename "$p")" -v nar="$(field NarSize "$p")" -v z="$(field FileSize "$p")" \
    'BEGIN { printf "%-14s %-44s %9.1f %9.1f %8.3f×\n", n, p, nar / 1e6, z / 1e6, z / nar }'
done

# Each pair: older version alone, then both; compacted and as imported.
rows=()
for i in "${!olds[@]}"; do
  o=${olds[$i]} n=${news[$i]}
  zstd_new=$(mb "$(field FileSize "${path[$n]}")")
  for mode in compacted imported; do
    s=$dir/$o-$n-$mode.redb
    import "$s" "${path[$o]}"
    [[ $mode == compacted ]] && compact "$s"
    first=$(stored "$s")
    import "$s" "${path[$n]}"
    [[ $mode == compacted ]] && compact "$s"
    both=$(stored "$s")
    [[ -n $first && -n $both ]] || die "no stored bytes from lazystore stats (see $dir/stats.log)"
    rows+=("$(awk -v pr="$o -> $n" -v m="$mode" -v f="$first" -v b="$both" -v z="$zstd_new" \
      'BEGIN { printf "%-28s %-10s %9.1f %9.1f %9.1f %12.1f %11.3f×", pr, m, f, b, b - f, z, (b - f) / z }')")
    drop "$s"
  done
done
echo
echo "the second version's extra cost (stored MB after both − after the first) against its zstd NAR:"
printf '%-28s %-10s %9s %9s %9s %12s %12s\n' pair store '1st MB' 'both MB' 'extra MB' '2nd zstd MB' extra/zstd
printf '%s\n' "${rows[@]}"

# The whole corpus in one fresh store, compacted.
s=$dir/all.redb
all=()
for n in "${names[@]}"; do all+=("${path[$n]}"); done
import "$s" "${all[@]}"
compact "$s"
total=$(stored "$s")
[[ -n $total ]] || die "no stored bytes from lazystore stats (see $dir/stats.log)"
summary=$(tail -n 1 "$dir/stats.out")
echo "disk: $(avail_mb "$work") MB free in $work with the whole-corpus store ($(du -sm "${s%.redb}.packs" | cut -f1) MiB of packs)"
drop "$s"
zstd_sum=0 nar_sum=0
for p in "${all[@]}"; do
  zstd_sum=$((zstd_sum + $(field FileSize "$p")))
  nar_sum=$((nar_sum + $(field NarSize "$p")))
done
echo
echo "the whole corpus (${#all[@]} paths) in one store, compacted:"
printf '%-10s %9s %9s %12s %11s\n' 'stored MB' 'zstd MB' 'NAR MB' 'stored/zstd' stored/NAR
awk -v t="$total" -v z="$zstd_sum" -v n="$nar_sum" 'BEGIN {
  printf "%-10.1f %9.1f %9.1f %11.3f× %10.3f×\n", t, z / 1e6, n / 1e6, t / (z / 1e6), t / (n / 1e6)
  printf "target stored/zstd ≤ 0.8×: %s\n", (t <= 0.8 * z / 1e6 ? "met" : "not met") }'
echo "stats: ${summary#*: }"
echo "($SECONDS s in all; logs in $dir)"
