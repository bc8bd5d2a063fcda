#!/usr/bin/env bash
# Runs every test of the workspace on a fresh machine: installs what the tests
# need first (nothing is assumed beyond the base machine's Rust toolchain).
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
# qemu-img is used by the CBT tests as they land; install it when missing.
command -v qemu-img >/dev/null 2>&1 || need_apt+=(qemu-utils)
if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update
    DEBIAN_FRONTEND=noninteractive apt-get install -y "${need_apt[@]}"
  else
    sudo apt-get update
    sudo DEBIAN_FRONTEND=noninteractive apt-get install -y "${need_apt[@]}"
  fi
fi

# Tests create multi-GiB sparse and data files under the temp directory.
export TMPDIR="${TMPDIR:-/tmp}"
cargo test --workspace --locked "$@"
