#!/usr/bin/env bash
# The numbers of BENCHMARKS.md ("IM gateway" part), from one command:
#
#   bench/build-tools.sh            # once: wsload, raw-echo, tungstenite-echo from ../shared/bench
#   bench/im-numbers.sh [OUTDIR]    # ~15 minutes; every summary line goes to OUTDIR/results.txt
#
# Each run gets a fresh server and data directory; the server is pinned to core 0, the load to
# core 1. Repeated runs alternate between the servers being compared (A B A B ...).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-target/im-numbers}
TOOLS=${IMGATE_BENCH_TOOLS:-target/bench-tools/release}
BIN=target/release/imgate
BENCH=target/release/imgate-bench
SECRET=bench-secret-0123456789abcdef0123456789
ROUNDS=${ROUNDS:-3}
cargo build --release --bins
# The relay ceiling without a store: the same server with bench/no-store.patch applied (its
# commits write and keep nothing), built from a copy of this tree.
NO_STORE_BIN=target/no-store/release/imgate
nostore_src=$(mktemp -d)
git archive HEAD | tar -x -C "$nostore_src"
(cd "$nostore_src" && git apply "$OLDPWD/bench/no-store.patch")
CARGO_TARGET_DIR=$PWD/target/no-store cargo build --release --bin imgate \
    --manifest-path "$nostore_src/Cargo.toml"
rm -rf "$nostore_src"
for t in wsload raw-echo tungstenite-echo; do
    [ -x "$TOOLS/$t" ] || { echo "missing $TOOLS/$t: run bench/build-tools.sh" >&2; exit 1; }
done
rm -rf "$OUT"
mkdir -p "$OUT"
log() { echo "$*" | tee -a "$OUT/results.txt"; }

pid=""
addr=""
admin=""
stop() {
    if [ -n "$pid" ]; then
        kill -TERM "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    fi
    pid=""
}
trap stop EXIT

# imgate NAME [flags]: a fresh imgate ($BIN, or $SERVER_BIN when set) on core 0.
imgate() {
    local name=$1
    shift
    taskset -c 0 "${SERVER_BIN:-$BIN}" serve --listen 127.0.0.1:0 --admin-listen 127.0.0.1:0 \
        --jwt-secret "$SECRET" --data-dir "$OUT/$name.data" --log-level warn "$@" \
        >"$OUT/$name.out" 2>"$OUT/$name.err" &
    pid=$!
    for _ in $(seq 200); do
        addr=$(grep -o 'ws://[0-9.]*:[0-9]*' "$OUT/$name.out" 2>/dev/null | head -n 1 || true)
        [ -n "$addr" ] && break
        sleep 0.05
    done
    addr=${addr#ws://}
    admin=$(grep -o 'http://[0-9.]*:[0-9]*' "$OUT/$name.out" | head -n 1 || true)
}

# The server's own view of the last run: its delivery-latency histogram (accept to the write
# of the Message; whole milliseconds) as the upper bound of the buckets holding p50 and p99,
# and its commits.
server_view() {
    curl -s "$admin/metrics" | awk '
        /^imgate_delivery_latency_seconds_bucket/ { split($0, a, "\""); le[n] = a[2]; c[n++] = $2 }
        /^imgate_store_commit_latency_seconds_sum/ { sum = $2 }
        /^imgate_store_commit_latency_seconds_count/ { cnt = $2 }
        END {
            total = c[n - 1]
            for (i = 0; i < n; i++) { if (!p50 && c[i] >= total * 0.5) p50 = le[i]; if (!p99 && c[i] >= total * 0.99) p99 = le[i] }
            printf "srv_delivery_p50_le_s=%s srv_delivery_p99_le_s=%s commits=%d mean_commit_us=%.0f", p50, p99, cnt, cnt ? sum / cnt * 1e6 : 0
        }'
}

# other CMD...: a reference server on core 0 at a free port; sets $addr, $pid.
other() {
    local port
    port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
    taskset -c 0 "$@" "127.0.0.1:$port" >/dev/null 2>&1 &
    pid=$!
    addr=127.0.0.1:$port
    sleep 0.5
}

bench() { taskset -c 1 "$BENCH" "$@" --quiet; }
UNLIMITED=(--rate-limit 1000000 --rate-burst 1000000)

# 1. Relay throughput against the raw-echo limit at the same connections and depth.
for round in $(seq "$ROUNDS"); do
    other "$TOOLS/raw-echo"
    log "round=$round raw-echo: $(taskset -c 1 "$TOOLS/wsload" --raw -c 200 -k 4 -s 64 -d 8 -w 1 \
        "ws://$addr/" --server-pid "$pid" --label wsload-raw)"
    stop
    # imgate's own WebSocket engine at the same connections and depth: is the gap the engine?
    imgate echo200-$round --echo
    log "round=$round imgate-echo-200x4: $(taskset -c 1 "$TOOLS/wsload" -c 200 -k 4 -s 64 -d 8 -w 1 \
        "ws://$addr/echo" --server-pid "$pid")"
    stop
    imgate relay-none-$round --durability none "${UNLIMITED[@]}"
    log "round=$round relay-none: $(bench relay --addr "$addr" --jwt-secret "$SECRET" \
        --server-pid "$pid" -u 200 -k 4 -s 64 -d 8 -w 1) $(server_view)"
    stop
    imgate relay-full-$round --durability full "${UNLIMITED[@]}"
    log "round=$round relay-full: $(bench relay --addr "$addr" --jwt-secret "$SECRET" \
        --server-pid "$pid" -u 200 -k 4 -s 64 -d 8 -w 1) $(server_view)"
    stop
    SERVER_BIN=$NO_STORE_BIN imgate relay-nostore-$round --durability none "${UNLIMITED[@]}"
    log "round=$round relay-no-store: $(bench relay --addr "$addr" --jwt-secret "$SECRET" \
        --server-pid "$pid" -u 200 -k 4 -s 64 -d 8 -w 1)"
    stop
done

# 2. Echo against the tokio-tungstenite reference (and the bench against wsload).
for round in $(seq "$ROUNDS"); do
    imgate echo-$round --echo
    log "round=$round imgate-echo: $(bench echo --addr "$addr" --server-pid "$pid" -c 100 -k 1 -s 32 -d 5 -w 1)"
    log "round=$round imgate-echo-wsload: $(taskset -c 1 "$TOOLS/wsload" -c 100 -k 1 -s 32 -d 5 -w 1 \
        "ws://$addr/echo" --server-pid "$pid")"
    stop
    other "$TOOLS/tungstenite-echo"
    log "round=$round tungstenite-echo: $(bench echo --addr "$addr" --path / --server-pid "$pid" -c 100 -k 1 -s 32 -d 5 -w 1)"
    stop
done

# 3. Scale: 19,000 logged-in idle connections through several ping intervals, then 19,000
#    users with 1:1 traffic among them.
#    Kernel memory: slab and TCP buffer pages before and while the 19,000 are held (both ends
#    of each loopback connection are on this machine, so half the growth is the server's).
kmem() { echo "$(awk '/^(Slab|SReclaimable|SUnreclaim):/{printf "%s %s kB ", $1, $2}' /proc/meminfo)$(grep '^TCP:' /proc/net/sockstat)"; }
imgate idle --ping-interval 10s --idle-timeout 30s --max-connections 19500
log "kernel-before-idle: $(kmem)"
bench idle --addr "$addr" --jwt-secret "$SECRET" --server-pid "$pid" \
    -c 19000 --hold 45 --procs 2 --src-ips 4 >"$OUT/idle.txt" &
idle_bench=$!
sleep 35
log "kernel-during-idle: $(kmem)"
wait "$idle_bench"
log "idle-19000: $(cat "$OUT/idle.txt")"
stop
for round in 1 2; do
    for rate in 2000 5000 10000; do
        imgate scale-$rate-$round --ping-interval 10s --idle-timeout 30s --max-connections 19500 "${UNLIMITED[@]}"
        log "round=$round relay-19000-rate-$rate: $(bench relay --addr "$addr" --jwt-secret "$SECRET" \
            --server-pid "$pid" -u 19000 --rate "$rate" -d 20 -w 2 --procs 2 --src-ips 4) $(server_view)"
        stop
    done
done

# 3b. Host hiccups: a busy loop on the server's core while the load's core is busy too, as
#     during the runs above; gaps it sees are time the machine did not give that core.
taskset -c 1 timeout 22 python3 -c 'while True: pass' >/dev/null 2>&1 &
log "hiccups: $(taskset -c 0 python3 bench/hiccup.py 20)"
wait

# 4. Reconnect storm: 10,000 clients with 10 messages each waiting.
imgate storm --max-connections 12000 "${UNLIMITED[@]}"
log "storm-10000: $(bench storm --addr "$addr" --jwt-secret "$SECRET" --server-pid "$pid" \
    -u 10000 -m 10 --senders 50 --send-rate 10000 --src-ips 2)"
stop

# 5. Garbage flood while 200 users chat at 2,000 msgs/s.
imgate flood "${UNLIMITED[@]}"
log "flood: $(bench flood --addr "$addr" --jwt-secret "$SECRET" --server-pid "$pid" \
    -u 200 --rate 2000 --flood-conns 500 -d 15 -w 3)"
stop

# 6. kill -9 chaos with the durable store: 100 users on 2 devices each, 10 kills in 60 s; a
#    64 KiB log keeps the store moving generations, so that kills land mid-move too.
log "chaos: $(taskset -c 1 "$BENCH" chaos --quiet -u 100 --devices 2 --rate 1000 -d 60 --kills 10 \
    --server-log "$OUT/chaos.err" \
    --server-cmd "taskset -c 0 $BIN serve --listen 127.0.0.1:0 --admin-listen 127.0.0.1:0 --jwt-secret $SECRET --data-dir $OUT/chaos.data --log-level warn --store-log-bytes 65536 ${UNLIMITED[*]}")"
echo "done: $OUT/results.txt" >&2
