# Shared by the bench scripts that run lazystore processes on the builder
# bench's corpus (bigfile.sh, cold.sh, partial.sh, storage.sh, warm.sh):
# sourced from the repository's root. Sets $lazystore (the release binary)
# and $work (the corpus: BENCH_DIR, default /var/tmp/lazystore-builder-bench).
lazystore=${CARGO_TARGET_DIR:-$PWD/target}/release/lazystore
work=${BENCH_DIR:-/var/tmp/lazystore-builder-bench}
export NIX_CONFIG=$'experimental-features = nix-command\nsandbox = false\nbuild-users-group =\nsubstituters ='
now() { date +%s.%N; }

# builder_corpus: checks that $work holds the builder bench's corpus (its
# closure, zstd cache and store: bench/builder.sh makes them), builds the
# release binary and sets $public, the corpus's signing key.
builder_corpus() {
  [[ -s $work/closure && -d $work/cache && -s $work/server/store.redb ]] ||
    { echo "$0: no corpus in $work: run bench/builder.sh first" >&2; exit 1; }
  cargo build --quiet --release --bin lazystore
  public=$(cat "$work/bench.pub")
}
drop_caches() { sync; echo 3 >/proc/sys/vm/drop_caches; }
# Every process started below, for the caller's cleanup to kill.
pids=()

# started OUT ARGS…: runs `lazystore ARGS…` in the background, its standard
# output to OUT and its log to OUT.log, and returns once OUT has its first
# line (serve prints its URL, mount its mountpoint); its pid is in
# $started_pid.
started() {
  local out=$1
  shift
  rm -f "$out"
  "$lazystore" "$@" >"$out" 2>"$out.log" &
  started_pid=$!
  pids+=("$started_pid")
  until [[ -s $out ]]; do
    kill -0 "$started_pid" 2>/dev/null ||
      { echo "$0: lazystore $1 died (see $out.log)" >&2; exit 1; }
    sleep 0.1
  done
}

# stopped PID: kills it and waits for it.
stopped() {
  kill "$1"
  wait "$1" 2>/dev/null || true
}
