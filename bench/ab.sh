#!/usr/bin/env bash
# An A/B of two imgate builds on the engine and IM hot paths, from one command:
#
#   bench/ab.sh A_BIN [OUTDIR]     # ~10 minutes; the table goes to OUTDIR/ab.txt
#
# A_BIN is another build of imgate (e.g. the commit before a change, built in a worktree);
# B is target/release/imgate. Every run gets a fresh server pinned to core 0, the load on
# core 1, and the runs alternate A B A B A B:
#   - /echo with wsload at (100 connections, 1 in flight, 32 B), (1000, 1, 32 B), (100, 16, 32 B)
#     (bench/compare.sh), and the server's RSS per idle /echo connection at 10,000;
#   - relay, 200 users x 4 in flight x 64 B, with --durability none and full (imgate-bench);
#   - server RSS per logged-in idle /ws connection at 10,000 (imgate-bench idle).
# The table shows, per measure, the median and the worst of the rounds for A and B and the
# median of the per-round ratios B/A (throughput: higher is better; bytes: lower is better).
# Any failed run or verification fails the script. Needs bench/build-tools.sh first.
set -euo pipefail
cd "$(dirname "$0")/.."
A_BIN=${1:?usage: bench/ab.sh A_BIN [OUTDIR]}
OUT=${2:-target/ab}
B_BIN=target/release/imgate
BENCH=target/release/imgate-bench
TOOLS=target/bench-tools/release
SECRET=bench-secret-0123456789abcdef0123456789
ROUNDS=${ROUNDS:-3}
[ -x "$A_BIN" ] || { echo "no A build at $A_BIN" >&2; exit 1; }
[ -x "$TOOLS/wsload" ] || { echo "missing $TOOLS/wsload: run bench/build-tools.sh" >&2; exit 1; }
cargo build --release --workspace
rm -rf "$OUT"
mkdir -p "$OUT"

serve_echo() {
    echo "$1 serve --dev --jwt-secret $SECRET --data-dir $OUT/echo-\$RANDOM.data --admin-listen 127.0.0.1:0 --echo --listen {addr} --max-connections 20000 --log-level warn"
}
bench/compare.sh --rounds "$ROUNDS" --configs "100,1,32 1000,1,32 100,16,32" \
    --idle-conns 10000 --ref A --out "$OUT/echo" \
    "A@/echo=$(serve_echo "$A_BIN")" "B@/echo=$(serve_echo "$B_BIN")" >"$OUT/echo.txt"

pid=""
stop() {
    if [ -n "$pid" ]; then
        kill -TERM "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    fi
    pid=""
}
trap stop EXIT

# imgate BIN NAME [flags]: a fresh server on core 0; sets $addr and $pid.
imgate() {
    local bin=$1 name=$2
    shift 2
    taskset -c 0 "$bin" serve --listen 127.0.0.1:0 --admin-listen 127.0.0.1:0 \
        --jwt-secret "$SECRET" --data-dir "$OUT/$name.data" --log-level warn \
        --rate-limit 1000000 --rate-burst 1000000 "$@" >"$OUT/$name.out" 2>"$OUT/$name.err" &
    pid=$!
    addr=""
    for _ in $(seq 200); do
        addr=$(grep -o 'ws://[0-9.]*:[0-9]*' "$OUT/$name.out" 2>/dev/null | head -n 1 || true)
        [ -n "$addr" ] && break
        sleep 0.05
    done
    addr=${addr#ws://}
}

# run LABEL CMD...: one measurement; its summary line goes to results.tsv.
run() {
    local label=$1 line
    shift
    line=$(taskset -c 1 "$BENCH" "$@" --quiet | tail -n 1)
    printf '%s\t%s\n' "$label" "$line" >>"$OUT/results.tsv"
    echo "$label: $line"
}

for round in $(seq "$ROUNDS"); do
    for side in A B; do
        bin=$A_BIN
        [ "$side" = B ] && bin=$B_BIN
        for durability in none full; do
            imgate "$bin" "relay-$durability-$side-$round" --durability "$durability"
            run "relay-$durability $side $round" relay --addr "$addr" --jwt-secret "$SECRET" \
                --server-pid "$pid" -u 200 -k 4 -s 64 -d 8 -w 1
            stop
        done
        imgate "$bin" "idle-$side-$round" --max-connections 12000
        run "idle-ws $side $round" idle --addr "$addr" --jwt-secret "$SECRET" \
            --server-pid "$pid" -c 10000 --hold 10 --src-ips 2
        stop
    done
done

python3 - "$OUT" <<'EOF' | tee "$OUT/ab.txt"
import glob, statistics, sys
out = sys.argv[1]
runs = {}  # (measure, side) -> {round: value}
def kv(line):
    return dict(p.split("=", 1) for p in line.split() if "=" in p)
for path in glob.glob(f"{out}/echo/results*"):
    for row in open(path):
        name, cfg, rnd, line = row.rstrip("\n").split("\t", 3)
        f = kv(line)
        key = "bytes_per_conn" if cfg.startswith("idle") else "msgs_per_s"
        runs.setdefault((f"/echo {cfg} {key}", name), {})[int(rnd)] = float(f[key])
for row in open(f"{out}/results.tsv"):
    label, line = row.rstrip("\n").split("\t", 1)
    measure, side, rnd = label.split()
    f = kv(line)
    key = "rss_bytes_per_conn" if measure == "idle-ws" else "delivered_per_s"
    runs.setdefault((f"{measure} {key}", side), {})[int(rnd)] = float(f[key])
measures = sorted({m for m, _ in runs})
print(f"{'measure':44} {'A median':>11} {'A worst':>11} {'B median':>11} {'B worst':>11} {'B/A':>7}")
for m in measures:
    a, b = runs.get((m, "A"), {}), runs.get((m, "B"), {})
    lower_better = "bytes" in m
    worst = max if lower_better else min
    ratios = [b[r] / a[r] for r in a if r in b and a[r] > 0]
    cells = [statistics.median(a.values()), worst(a.values()), statistics.median(b.values()), worst(b.values())]
    print(f"{m:44} " + " ".join(f"{c:11.0f}" for c in cells) + f" {statistics.median(ratios):7.3f}")
EOF
