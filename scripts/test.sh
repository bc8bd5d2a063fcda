#!/usr/bin/env bash
# Runs every test of the workspace on a fresh machine: installs what the tests
# need first (nothing is assumed beyond the base machine's Rust toolchain).
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
# The NBD/CBT tests use real parts: qemu-img, qemu-io and qemu-nbd make and
# export qcow2 images with dirty bitmaps; nbdinfo is the reference client.
for tool in qemu-img qemu-io qemu-nbd; do
  command -v "$tool" >/dev/null 2>&1 || { need_apt+=(qemu-utils); break; }
done
command -v nbdinfo >/dev/null 2>&1 || need_apt+=(libnbd-bin)
if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update
    DEBIAN_FRONTEND=noninteractive apt-get install -y "${need_apt[@]}"
  else
    sudo apt-get update
    sudo DEBIAN_FRONTEND=noninteractive apt-get install -y "${need_apt[@]}"
  fi
fi

# The object-pool tests run against a real S3-compatible server on
# 127.0.0.1: s3s-fs (0.14.1: later versions need a newer rustc). About 3–4
# minutes to build the first time.
if ! command -v s3s-fs >/dev/null 2>&1 && [ ! -x "${CARGO_HOME:-$HOME/.cargo}/bin/s3s-fs" ]; then
  cargo install s3s-fs@0.14.1 --locked --features binary
fi
export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"

# Tests create multi-GiB sparse and data files under the temp directory.
export TMPDIR="${TMPDIR:-/tmp}"
# A hang fails the run instead of using up CI's time: every `cairn` the
# CLI tests start is killed after 5 minutes (tests/common), every pause
# point and server wait in the tests has its own limit, and the whole run
# is stopped after 60 minutes (it takes ~10).
timeout --kill-after=30s 60m cargo test --workspace --locked "$@"
