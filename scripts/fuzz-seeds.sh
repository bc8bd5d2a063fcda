#!/usr/bin/env bash
# Replays every fuzz target over its committed seeds (each input once), so a
# parser regression on a known input fails CI, not only a compile error.
# No cargo-fuzz needed: the targets are plain binaries linking libFuzzer;
# `-runs=0` executes the corpus and exits (non-zero on a crash or panic).
# For real fuzzing: `cd fuzz && cargo fuzz run <target> -s none`.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
cargo build --release --bins --quiet
for seeds in seeds/*/; do
  target=$(basename "$seeds")
  echo "fuzz seeds: $target"
  ./target/release/"$target" "$seeds" -runs=0 2>&1 | tail -n 1
done
