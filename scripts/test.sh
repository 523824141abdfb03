#!/usr/bin/env bash
# The test suite: formatting, lints, every test of the workspace (real Nix,
# real servers on 127.0.0.1), and the fuzz crate's build.
set -euo pipefail
cd "$(dirname "$0")/.."
# A one-shot build gains nothing from incremental state, which would double the
# target directory.
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"

for tool in nix nix-store; do
  command -v "$tool" >/dev/null || {
    echo "test.sh: $tool is missing; the tests use real Nix as their oracle. Try: apt-get install nix-bin" >&2
    exit 1
  }
done

command -v "${GARAGE_BIN:-garage}" >/dev/null || {
  echo "test.sh: garage is missing; the S3 store's tests run a real Garage cluster. Try: cargo install garage --no-default-features --features bundled-libs,lmdb,sqlite --locked" >&2
  exit 1
}

cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
cargo test --workspace
# The fuzz crate is its own workspace; checking it keeps the targets compiling
# (in the same target directory, so the shared dependencies are reused).
cargo check --manifest-path fuzz/Cargo.toml --target-dir "${CARGO_TARGET_DIR:-target}"
