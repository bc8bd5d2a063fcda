#!/usr/bin/env bash
# Replays every fuzz target over its committed seeds (each input once), so a
# parser regression on a known input fails CI, not only a compile error.
# No cargo-fuzz needed: the targets are plain binaries linking libFuzzer;
# `-runs=0` executes the corpus and exits (non-zero on a crash or panic).
# For real fuzzing: `cd fuzz && cargo fuzz run <target> -s none`.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
# fuzz/Cargo.lock is committed: the same dependency versions as tested
# (a fresh resolution could pick versions that need a newer rustc).
cargo build --release --bins --quiet --locked
# Every target has seeds (fixup.rs is a module the targets share).
for f in fuzz_targets/*.rs; do
  target=$(basename "$f" .rs)
  [ "$target" = fixup ] && continue
  if [ ! -d "seeds/$target" ] || [ -z "$(ls -A "seeds/$target")" ]; then
    echo "fuzz seeds: target $target has no seeds in fuzz/seeds/$target" >&2
    exit 1
  fi
done
for seeds in seeds/*/; do
  target=$(basename "$seeds")
  echo "fuzz seeds: $target"
  ./target/release/"$target" "$seeds" -runs=0 2>&1 | tail -n 1
done
