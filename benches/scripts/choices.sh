#!/usr/bin/env bash
# Measures the parameter choices documented in docs/PERFORMANCE.md: chunk
# size and compression level, on the benchmark generator's image and its 2 %
# rewrite. Usage: benches/scripts/choices.sh [SIZE_GIB] [DATA_DIR] [POOL_DIR]
set -euo pipefail
cd "$(dirname "$0")/../.."
size_gib=${1:-1}
data=${2:-target/bench-data}
pools=${3:-/dev/shm/cairn-choices}
cargo build --release -q -p cairn-cli -p cairn-benches
# Generates the images (and runs the quick pipeline once).
./target/release/cairn-bench --size-gib "$size_gib" --dir "$data" --only pipeline --repeat 1 >/dev/null 2>&1
bytes=$(python3 -c "print(int($size_gib * (1 << 30)))")
base="$data/mixed-$bytes.img"
rewrite="$data/mixed-$bytes-rewrite.img"
cairn=./target/release/cairn
field() { python3 -c "import json,sys; d=json.load(sys.stdin); print(d['$1'])"; }

echo "| chunking | compression | full: MB/s | full: MB added | 2 % rewrite: MB added | chunks |"
echo "|---|---|---:|---:|---:|---:|"
run() {
  rm -rf "$pools"; $cairn init "$pools" >/dev/null
  full=$($cairn backup "$pools" --mmap --vm c --chunking "$1" --compression "$2" "$base" --json)
  again=$($cairn backup "$pools" --mmap --vm c --chunking "$1" --compression "$2" "$rewrite" --disk-name "$(basename "$base")" --json)
  python3 - "$1" "$2" "$full" "$again" <<'PY'
import json, sys
c, z, f, a = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), json.loads(sys.argv[4])
print(f"| {c} | {z} | {f['bytes_logical']/f['seconds']/1e6:.0f} | {f['bytes_new']/1e6:.1f} | {a['bytes_new']/1e6:.1f} | {f['chunks_total']} |")
PY
}
for c in fixed:16K fixed:64K fixed:256K fixed:1M fixed:4M cdc; do run "$c" fast; done
for z in none zstd:1 zstd:3 zstd:6; do run fixed:64K "$z"; done
rm -rf "$pools"
