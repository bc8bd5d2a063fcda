#!/usr/bin/env bash
# Mutation testing of the engine's core modules with cargo-mutants: every
# mutant (an operator flipped, a function body replaced by a default value)
# must make some engine test fail. Run it before touching these files:
#
#   scripts/mutants.sh                         # every core module (hours, see docs/TESTING.md)
#   scripts/mutants.sh engine/src/chunker.rs   # one module (minutes)
#
# Tests used: the engine's unit and integration tests (`--lib --tests`; the
# doctests only repeat what those check and would double the time per
# mutant). Results land in target/mutants/mutants.out/ (caught.txt,
# missed.txt, unviable.txt, timeout.txt). Too slow for every CI run.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v cargo-mutants >/dev/null || cargo install cargo-mutants --locked

core=(
  engine/src/chunker.rs
  engine/src/id.rs
  engine/src/random.rs
  engine/src/cbt/bitmap.rs
  engine/src/cbt/trust.rs
  engine/src/cbt/spot_check.rs
  engine/src/pipeline/input.rs
  engine/src/pipeline/restore.rs
  engine/src/store/wire.rs
  engine/src/store/blob.rs
  engine/src/store/pack.rs
  engine/src/store/index.rs
  engine/src/store/manifest.rs
  engine/src/store/extent_page.rs
  engine/src/store/catalog.rs
  engine/src/retention.rs
)
files=("$@")
[ ${#files[@]} -gt 0 ] || files=("${core[@]}")
args=()
for f in "${files[@]}"; do args+=(--file "$f"); done

# The model test of garbage collection runs 200 sequences by default;
# a handful per mutant keep the run to ~25 s per mutant.
export CAIRN_GC_SEQUENCES="${CAIRN_GC_SEQUENCES:-10}"
export CAIRN_GC_SPILL_SEQUENCES="${CAIRN_GC_SPILL_SEQUENCES:-3}"
export CAIRN_GC_S3_SEQUENCES="${CAIRN_GC_S3_SEQUENCES:-0}"
exec cargo mutants --package cairn-engine --test-package cairn-engine \
  --cargo-test-arg=--lib --cargo-test-arg=--tests \
  --jobs "${MUTANTS_JOBS:-1}" --output target/mutants \
  "${args[@]}"
