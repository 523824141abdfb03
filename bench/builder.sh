#!/usr/bin/env bash
# Builder benchmark: an unmodified nix-build over a closure of >= 1 GB of NAR
# (a Rust toolchain and a Python install made into store paths with real Nix,
# and a path referring to both), whose builder reads one small file of it.
#
#   lazy:  lazystore serve (the closure imported beforehand) ->
#          scripts/lazystore-builder setup with an empty local cache -> nix-build
#   eager: nix copy --from http://... of the same closure from a binary cache
#          written by real Nix (zstd) and served by python3 -m http.server,
#          into a scratch overlay of /nix/store -> the same nix-build
#
#   upstream: lazystore serve empty, the binary cache given as --upstream
#          of the mount: the mount downloads the NARs of the paths read from
#   pull:  lazystore serve empty with the binary cache as its own --upstream
#          (a pull-through service, behind a counting relay): the builder
#          has no --upstream; its nix-db is answered from narinfos, and the
#          service fetches the NAR of the path read from
#
# Each is run in its own network namespace (servers and clients inside it),
# once on plain loopback and once with loopback throttled to 100 Mbit/s
# (tc tbf), and in its own mount namespace so the machine's store and Nix
# database are untouched. "bytes" is every byte that crossed the namespace's
# loopback (from /proc/net/dev: both directions, headers included); "wall" is
# from the start of setup (lazy) or nix copy (eager) to the end of the build.
#
# Usage: bench/builder.sh            (as root; release build; prints a table)
#   BENCH_DIR   where the cache and the store go (default
#               /var/tmp/lazystore-builder-bench); kept between runs.
#   RUST_TREE, PYTHON_TREE   the trees made into store paths.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD

export NIX_CONFIG=$'experimental-features = nix-command\nsandbox = false\nbuild-users-group =\nsubstituters ='
work=${BENCH_DIR:-/var/tmp/lazystore-builder-bench}
rust_tree=${RUST_TREE:-$HOME/.rustup/toolchains/stable-x86_64-unknown-linux-gnu}
python_tree=${PYTHON_TREE:-$HOME/.pyenv/versions/3.12.1}
lazystore=${CARGO_TARGET_DIR:-$repo/target}/release/lazystore
builder=$repo/scripts/lazystore-builder
THROTTLE=(tbf rate 100mbit burst 256kb latency 50ms)

die() {
  echo "bench/builder.sh: $*" >&2
  exit 1
}

# Every loopback byte of this network namespace so far (received; on
# loopback every byte sent is received once).
lo_bytes() { awk '$1 == "lo:" { print $2 }' /proc/net/dev; }
now() { date +%s.%N; }

# A /nix/store and Nix database that take writes into a scratch upper layer,
# over the real ones, in this mount namespace (the eager run's store).
scratch_nix() {
  local d=$1
  for t in store db; do
    local target=/nix/store
    [[ $t == db ]] && target=/nix/var/nix/db
    mkdir -p "$d/$t-aside" "$d/$t-upper" "$d/$t-work"
    mount --bind "$target" "$d/$t-aside"
    chown --reference="$target" "$d/$t-upper"
    chmod --reference="$target" "$d/$t-upper"
    mount -t overlay bench-scratch \
      -o "lowerdir=$d/$t-aside,upperdir=$d/$t-upper,workdir=$d/$t-work" "$target"
  done
}

# Starts `lazystore serve` of the redb store $2 in this network namespace
# (more serve arguments after it); prints its URL.
start_serve() {
  local name=$1 store=$2
  shift 2
  rm -f "$work/$name.serve"
  mkdir -p "$(dirname "$store")"
  "$lazystore" serve --listen 127.0.0.1:0 --store "redb://$store" "$@" \
    >"$work/$name.serve" 2>"$work/$name.serve.log" &
  local pid=$!
  echo "$pid" >>"$work/pids"
  until [[ -s $work/$name.serve ]]; do
    kill -0 "$pid" 2>/dev/null || die "lazystore serve $store died (see $work/$name.serve.log)"
    sleep 0.1
  done
  head -n 1 "$work/$name.serve"
}

# Starts the binary cache's HTTP server in this network namespace; prints
# its port.
start_http() {
  local name=$1
  rm -f "$work/$name.port"
  # Its output goes nowhere: this runs inside $(…), which waits for it.
  python3 - "$work/cache" "$work/$name.port" >/dev/null 2>&1 <<'EOF' &
import functools, http.server, sys
class Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass
handler = functools.partial(Quiet, directory=sys.argv[1])
server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
open(sys.argv[2], "w").write(str(server.server_address[1]))
server.serve_forever()
EOF
  local pid=$!
  echo "$pid" >>"$work/pids"
  until [[ -s $work/$name.port ]]; do
    kill -0 "$pid" 2>/dev/null || die "the HTTP server of the binary cache died"
    sleep 0.1
  done
  cat "$work/$name.port"
}

# Starts a relay to 127.0.0.1:$2 that counts the bytes it carries into
# $work/$1.relay ("to_client to_server"); prints its port.
start_relay() {
  local name=$1 port=$2
  rm -f "$work/$name.relay-port"
  python3 "$repo/bench/throttle.py" "$port" 1e12 "$work/$name.relay" >"$work/$name.relay-port" 2>/dev/null &
  local pid=$!
  echo "$pid" >>"$work/pids"
  until [[ -s $work/$name.relay-port ]]; do
    kill -0 "$pid" 2>/dev/null || die "the counting relay died"
    sleep 0.1
  done
  cat "$work/$name.relay-port"
}

# One lazy run: setup with an empty local cache (setup arguments "$@"),
# the build, teardown. Prints "bytes seconds counters-file".
lazy_run() {
  local name=$1
  shift
  local state=$work/state-$name
  rm -f "$state/cache.redb"
  local b0 t0 b1 t1 out
  b0=$(lo_bytes) t0=$(now)
  LAZYSTORE=$lazystore "$builder" setup --state-dir "$state" "$@" "$top" \
    >>"$work/$name.log" 2>&1 || die "lazystore-builder setup failed (see $work/$name.log)"
  out=$(nix-build --no-out-link "$reader" 2>>"$work/$name.log") || die "the build of $name failed (see $work/$name.log)"
  t1=$(now) b1=$(lo_bytes)
  [[ $(cat "$out") == "$(cat "$work/expected")" ]] || die "the build of $name gave the wrong output"
  cp "$state/lazy/.lazystore/stats" "$work/$name.stats"
  "$builder" teardown --state-dir "$state" >>"$work/$name.log" 2>&1
  echo "$((b1 - b0)) $(awk "BEGIN { print $t1 - $t0 }") $work/$name.stats"
}

counter() { awk -v k="$1" '$1 == k { print $2 }' "$2"; }

# One case, inside its own network and mount namespaces: prints one line
# per run: "case run bytes seconds detail".
run_case() {
  local case=$1 throttle=$2
  top=$(cat "$work/top")
  reader=$work/reader.nix
  local public
  public=$(cat "$work/bench.pub")
  # Servers started by this case, stopped by pid when it ends.
  : >"$work/pids"
  bench_case=$case
  trap 'while read -r p; do kill "$p" 2>/dev/null || true; done <"$work/pids"
        for r in imported upstream pull; do "$builder" teardown --state-dir "$work/state-$bench_case-$r" >/dev/null 2>&1 || true; done' EXIT
  ip link set lo up
  if [[ $throttle == yes ]]; then tc qdisc add dev lo root "${THROTTLE[@]}"; fi
  local http_port grpc_url empty_url
  http_port=$(start_http "$case")
  grpc_url=$(start_serve "$case" "$work/server/store.redb")
  rm -rf "$work/empty-$case"
  mkdir -p "$work/empty-$case"
  empty_url=$(start_serve "$case-empty" "$work/empty-$case/store.redb")

  local bytes secs stats
  # Lazy, the closure imported into the service beforehand.
  read -r bytes secs stats < <(lazy_run "$case-imported" --store "$grpc_url")
  [[ -n $stats ]] || die "the lazy run of $case failed (see $work/$case-imported.log)"
  echo "$case lazy $bytes $secs $(counter remote_wire_bytes "$stats")_bytes_of_chunks"

  # Lazy, the service empty: paths from the binary cache as --upstream.
  read -r bytes secs stats < <(lazy_run "$case-upstream" --store "$empty_url" \
    --upstream "http://127.0.0.1:$http_port" --trusted-public-key "$public")
  [[ -n $stats ]] || die "the upstream run of $case failed (see $work/$case-upstream.log)"
  echo "$case upstream $bytes $secs $(counter upstream_nar_downloads "$stats")_NAR(s),_$(counter upstream_bytes_downloaded "$stats")_bytes_from_upstream"

  # Pull-through: the service empty, the binary cache behind it (through a
  # relay that counts what the service takes from it).
  local relay_port pull_url
  rm -rf "$work/pull-$case"
  relay_port=$(start_relay "$case" "$http_port")
  pull_url=$(start_serve "$case-pull" "$work/pull-$case/store.redb" \
    --upstream "http://127.0.0.1:$relay_port" --trusted-public-key "$public")
  read -r bytes secs stats < <(lazy_run "$case-pull" --store "$pull_url")
  [[ -n $stats ]] || die "the pull-through run of $case failed (see $work/$case-pull.log)"
  echo "$case pull $bytes $secs $(cut -d' ' -f1 "$work/$case.relay")_bytes_from_upstream_to_the_service,_$(counter remote_wire_bytes "$stats")_bytes_of_chunks_to_the_builder"

  # Eager: the whole closure first, then the same build.
  local scratch=$work/scratch-$case b0 t0 b1 t1 out
  rm -rf "$scratch"
  mkdir -p "$scratch"
  scratch_nix "$scratch"
  b0=$(lo_bytes) t0=$(now)
  nix copy --from "http://127.0.0.1:$http_port" --option trusted-public-keys "$public" "$top" \
    2>>"$work/$case.log" || die "nix copy --from http://127.0.0.1:$http_port failed (see $work/$case.log)"
  out=$(nix-build --no-out-link "$reader" 2>>"$work/$case.log") || die "the eager build failed (see $work/$case.log)"
  t1=$(now) b1=$(lo_bytes)
  [[ $(cat "$out") == "$(cat "$work/expected")" ]] || die "eager build of case $case gave the wrong output"
  umount /nix/var/nix/db /nix/store "$scratch/db-aside" "$scratch/store-aside"
  rm -rf --one-file-system "$scratch"
  echo "$case eager $((b1 - b0)) $(awk "BEGIN { print $t1 - $t0 }") nix_copy_then_build"
}

# The closure, the binary cache and the imported lazystore store: made once.
prepare() {
  mkdir -p "$work"
  if [[ -s $work/top && -s $work/deriver && -s $work/server/store.redb ]] && compgen -G "$work/cache/*.ls" >/dev/null; then
    return
  fi
  echo "preparing (once): store paths, binary cache, lazystore import into $work" >&2
  rm -rf "$work/cache" "$work/server"
  [[ -d $rust_tree ]] || die "no Rust toolchain at $rust_tree (set RUST_TREE)"
  [[ -d $python_tree ]] || die "no Python install at $python_tree (set PYTHON_TREE)"
  local rust python
  rust=$(nix store add-path --name lazystore-bench-rust "$rust_tree")
  python=$(nix store add-path --name lazystore-bench-python "$python_tree")
  local small=lib/python3.12/site-packages/README.txt
  [[ -f $python/$small ]] || die "$python_tree has no $small (set PYTHON_TREE to a Python 3.12 install)"
  cat "$python/$small" >"$work/expected"
  cat >"$work/top.nix" <<EOF
derivation {
  name = "lazystore-bench-inputs";
  system = builtins.currentSystem;
  builder = "/bin/sh";
  args = [ "-c" "echo \${builtins.storePath "$rust"} \${builtins.storePath "$python"} > \$out" ];
}
EOF
  local top
  top=$(nix-build --no-out-link "$work/top.nix")
  cat >"$work/reader.nix" <<EOF
derivation {
  name = "lazystore-bench-reader";
  system = builtins.currentSystem;
  builder = "/bin/sh";
  # The whole closure is an input; the builder reads one small file of it.
  inputs = builtins.storePath "$top";
  args = [ "-c" "/bin/cat $python/$small > \$out" ];
}
EOF
  [[ -s $work/bench.sec ]] || nix-store --generate-binary-cache-key lazystore-bench-1 "$work/bench.sec" "$work/bench.pub"
  nix store sign -r -k "$work/bench.sec" "$top"
  nix copy --to "file://$work/cache?compression=zstd&write-nar-listing=true" "$top"
  nix-store --query --requisites "$top" >"$work/closure"
  # The .drv refers to the trees (input sources): it goes too, or they stay alive.
  nix-store --query --deriver "$top" >"$work/deriver"
  local nar=0 p
  for p in $(cat "$work/closure"); do nar=$((nar + $(nix-store --query --size "$p"))); done
  echo "$nar" >"$work/nar-bytes"
  mkdir -p "$work/server"
  "$lazystore" import --from "file://$work/cache" --trusted-public-key "$(cat "$work/bench.pub")" \
    --store "redb://$work/server/store.redb" "$top" >/dev/null
  echo "$top" >"$work/top"
}

main() {
  (($(id -u) == 0)) || die "run as root (mount namespaces, overlays, FUSE, network namespaces)"
  local need=()
  command -v ip >/dev/null && command -v tc >/dev/null || need+=(iproute2)
  command -v nix-store >/dev/null || need+=(nix-bin)
  command -v fusermount3 >/dev/null || need+=(fuse3)
  command -v python3 >/dev/null || need+=(python3)
  if ((${#need[@]})); then
    echo "bench/builder.sh: installing ${need[*]}" >&2
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null; } ||
      die "cannot install ${need[*]}: install them (apt-get install ${need[*]}) and run again"
  fi
  cargo build --quiet --release --bin lazystore
  prepare
  # The closure must not be on this machine: the lazy run would read the
  # local copy (the store is a lower layer) and the eager one would copy
  # nothing. It lives in the cache and the lazystore store only.
  local p
  for p in $(cat "$work/closure"); do
    if [[ -e $p ]]; then
      # shellcheck disable=SC2046
      nix-store --delete $(cat "$work/deriver" "$work/closure") >/dev/null 2>"$work/delete.log" ||
        die "cannot delete the benchmark closure from this machine's store: $(tail -n 1 "$work/delete.log")"
      break
    fi
  done
  local nar
  nar=$(cat "$work/nar-bytes")
  echo "closure: $(wc -l <"$work/closure") paths, $nar bytes of NAR ($(du -sb "$work/cache/nar" | cut -f1) bytes of zstd NAR files)"
  local results=() case
  for case in loopback throttled; do
    local throttle=no
    [[ $case == throttled ]] && throttle=yes
    local r
    r=$(unshare --mount --net --propagation private "$0" __case "$case" "$throttle") ||
      die "the $case case failed (see $work/$case*.log)"
    results+=("$r")
  done
  printf '\n%-10s %-9s %13s %9s %12s %10s  %s\n' link run 'link bytes' seconds 'bytes/eager' 'wall/eager' detail
  local block c run bytes secs detail eager_bytes eager_secs
  for block in "${results[@]}"; do
    read -r _ _ eager_bytes eager_secs _ < <(grep ' eager ' <<<"$block")
    while read -r c run bytes secs detail; do
      printf '%-10s %-9s %13s %9.2f %11.3f%% %9.1f%%  %s\n' "$c" "$run" "$bytes" "$secs" \
        "$(awk "BEGIN { print 100 * $bytes / $eager_bytes }")" \
        "$(awk "BEGIN { print 100 * $secs / $eager_secs }")" "${detail//_/ }"
    done <<<"$block"
  done
  echo
  echo "lazy: the closure imported into lazystore serve beforehand; upstream: lazystore serve"
  echo "empty, the binary cache given as --upstream; pull: lazystore serve empty with the"
  echo "binary cache as its own --upstream (pull-through; the builder has none); eager: nix"
  echo "copy --from the binary cache. pull's link bytes count the service's download too."
  echo "upstream's link bytes include the mount storing the downloaded path into the service"
  echo "(gRPC, same loopback); the builder received the NAR(s) in the detail column."
  echo "throttled: loopback with tc qdisc ${THROTTLE[*]}."
  echo "targets: lazy bytes <= 2% of eager; lazy wall <= 10% of eager on the throttled link"
  # The verdict, from the throttled case's rows.
  local throttled lazy_bytes lazy_secs verdict=0
  throttled=${results[1]}
  read -r _ _ lazy_bytes lazy_secs _ < <(grep ' lazy ' <<<"$throttled")
  read -r _ _ eager_bytes eager_secs _ < <(grep ' eager ' <<<"$throttled")
  check() { # what value target
    if awk "BEGIN { exit !($2 <= $3) }"; then
      echo "met:    $1 $2% (target <= $3%)"
    else
      echo "MISSED: $1 $2% (target <= $3%)"
      verdict=1
    fi
  }
  check "lazy bytes / eager, throttled:" "$(awk "BEGIN { printf \"%.3f\", 100 * $lazy_bytes / $eager_bytes }")" 2
  check "lazy wall / eager, throttled: " "$(awk "BEGIN { printf \"%.1f\", 100 * $lazy_secs / $eager_secs }")" 10
  if ((nar < 1000000000)); then
    echo "MISSED: the closure is $nar bytes of NAR, not the 1 GB the benchmark asks for"
    verdict=1
  fi
  return "$verdict"
}

if [[ ${1:-} == __case ]]; then
  run_case "$2" "$3"
else
  main
fi
