#!/usr/bin/env bash
# The "Hostile single clients" numbers of BENCHMARKS.md, from one command:
#
#   bench/attacks.sh [OUTDIR] [A_BIN]   # ~8 minutes; the table goes to OUTDIR/attacks.txt
#
# For each attack of `imgate-bench flood --attack` (sync, empty, pings) and the garbage flood,
# a well-behaved set of users chats at a fixed rate while one attacker connection runs; the
# bench reports their round trips (p50, p99) and the server's peak RSS. Each run gets a fresh
# server pinned to core 0 and the load on core 1. With A_BIN (another build of imgate, e.g.
# the commit before a change) the runs alternate A B A B A B and the table shows both; the
# worst of the three runs is beside the median. Any failed verification fails the script.
# Last, the same A/B for relay with --durability none, the hot path these limits sit on.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-target/attacks}
A_BIN=${2:-}
B_BIN=target/release/imgate
BENCH=target/release/imgate-bench
SECRET=bench-secret-0123456789abcdef0123456789
ROUNDS=${ROUNDS:-3}
FLOOD_SECS=${FLOOD_SECS:-8}
# The server and imgate-bench (bench/imgate-bench, a workspace member of its own).
cargo build --release --workspace --bins
rm -rf "$OUT"
mkdir -p "$OUT"

pid=""
stop() {
    if [ -n "$pid" ]; then
        kill -TERM "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    fi
    pid=""
}
trap stop EXIT

# run NAME BIN ATTACK: one server, one bench run; the JSON report is OUT/NAME.json.
run() {
    local name=$1 bin=$2 attack=$3
    local server_args=() bench_args=(flood --users 20 --rate 200 --warmup 2 \
        --duration "$FLOOD_SECS" --attack "$attack" --flood-conns 200)
    if [ "$attack" = relay ]; then
        server_args=(--durability none --rate-limit 1000000 --rate-burst 1000000)
        bench_args=(relay -u 200 -k 4 -s 64 -d 8 -w 1)
    fi
    taskset -c 0 "$bin" serve --listen 127.0.0.1:0 --admin-listen 127.0.0.1:0 \
        --jwt-secret "$SECRET" --data-dir "$OUT/$name.data" --log-level error "${server_args[@]}" \
        >"$OUT/$name.server.out" 2>"$OUT/$name.server.err" &
    pid=$!
    local addr=""
    for _ in $(seq 200); do
        addr=$(grep -o 'ws://[0-9.]*:[0-9]*' "$OUT/$name.server.out" 2>/dev/null | head -n 1 || true)
        [ -n "$addr" ] && break
        sleep 0.05
    done
    [ -n "$addr" ] || { cat "$OUT/$name.server.err" >&2; exit 1; }
    local status=0
    taskset -c 1 "$BENCH" "${bench_args[0]}" --addr "${addr#ws://}" --jwt-secret "$SECRET" \
        --server-pid "$pid" "${bench_args[@]:1}" --json "$OUT/$name.json" \
        >"$OUT/$name.txt" 2>&1 || status=$?
    stop
    rm -rf "$OUT/$name.data"
    # Let the machine settle (a server that lost the fight may have held gigabytes).
    sync
    sleep 3
    if [ "$status" -ne 0 ]; then
        echo "$name failed (the bench's verification or the run itself):" >&2
        cat "$OUT/$name.txt" >&2
        # A server from before a fix may lose the fight; that is what is being shown.
        [ "$bin" = "$A_BIN" ] || exit 1
    fi
}

for attack in garbage sync empty pings relay; do
    for round in $(seq "$ROUNDS"); do
        [ -n "$A_BIN" ] && run "A-$attack-$round" "$A_BIN" "$attack"
        run "B-$attack-$round" "$B_BIN" "$attack"
    done
done

python3 - "$OUT" "$ROUNDS" "${A_BIN:+A}" <<'PY' | tee "$OUT/attacks.txt"
import json, statistics, sys, os
out, rounds, has_a = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "A"
def load(side, attack):
    runs = []
    for r in range(1, rounds + 1):
        p = os.path.join(out, f"{side}-{attack}-{r}.json")
        try:
            runs.append(json.load(open(p)))
        except (OSError, ValueError):
            runs.append(None)
    return runs
def fmt(runs, key, scale=1.0, worst=max):
    vals = [r[key] * scale for r in runs if r and r.get(key) is not None]
    if not vals:
        return "failed"
    return f"{statistics.median(vals):.1f} (worst {worst(vals):.1f})"
print("attack   server  base p99 ms   flood p50 ms       flood p99 ms       peak RSS MiB        RSS after MiB")
for attack in ["garbage", "sync", "empty", "pings"]:
    for side in (["A"] if has_a else []) + ["B"]:
        runs = load(side, attack)
        print(f"{attack:8} {side:7} {fmt(runs, 'base_p99_us', 1e-3):13} {fmt(runs, 'p50_us', 1e-3):18} "
              f"{fmt(runs, 'p99_us', 1e-3):18} {fmt(runs, 'srv_rss_peak_kib', 1/1024):19} "
              f"{fmt(runs, 'srv_rss_after_kib', 1/1024)}")
print()
print("relay --durability none, 200 users x 4 in flight: delivered/s, median (worst)")
relay = {side: load(side, "relay") for side in (["A"] if has_a else []) + ["B"]}
for side, runs in relay.items():
    print(f"{side:7} {fmt(runs, 'delivered_per_s', 1.0, min)}")
if has_a:
    a = [r["delivered_per_s"] for r in relay["A"] if r]
    b = [r["delivered_per_s"] for r in relay["B"] if r]
    if a and b:
        pairs = [y / x for x, y in zip(a, b)]
        print(f"B/A per round: {', '.join(f'{p:.3f}' for p in pairs)}; median {statistics.median(pairs):.3f}, worst {min(pairs):.3f}")
PY
