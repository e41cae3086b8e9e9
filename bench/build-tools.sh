#!/usr/bin/env bash
# Builds the shared benchmark kit (wsload, raw-echo, tungstenite-echo) from ../shared/bench
# into target/bench-tools. The kit's code stays outside this project; only its binaries are
# used, by bench/compare.sh.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
kit=${1:-$root/../shared/bench}
out=${IMGATE_BENCH_TARGET:-$root/target/bench-tools}
for tool in wsload raw-echo tungstenite-echo; do
    CARGO_TARGET_DIR=$out cargo build --release --manifest-path "$kit/$tool/Cargo.toml"
done
echo "built into $out/release"
