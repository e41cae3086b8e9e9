#!/usr/bin/env bash
# Proof under load and faults: every imgate-bench scenario against the release server, each
# run against a fresh server and data directory, the server pinned to core 0 and the load to
# core 1 (when there are two). Any lost, duplicated-after-ack or reordered message, any error,
# fails the run.
#
#   scripts/proof.sh short   # CI: 2,000 idle connections, 10 groups of 100, 20 s of kill -9
#                            # chaos with 1:1 and group messages, 25 s of it against three
#                            # nodes on Redis, ... (~3 min)
#   scripts/proof.sh full    # the sizes of BENCHMARKS.md: 19,000 idle connections, ...
#
# Results: one summary line per scenario on stdout and in $OUT/summary.txt, JSON reports and
# server logs in $OUT (default target/proof).
set -euo pipefail
cd "$(dirname "$0")/.."
mode=${1:-short}
OUT=${2:-target/proof}
BIN=${IMGATE_BIN:-target/release/imgate}
BENCH=${IMGATE_BENCH_BIN:-target/release/imgate-bench}
SECRET=proof-secret-0123456789abcdef0123456789
case "$mode" in
short | full) ;;
*)
    echo "usage: $0 short|full [OUTDIR]" >&2
    exit 2
    ;;
esac
# imgate-bench is a workspace member of its own (bench/imgate-bench): --workspace builds it.
[ -x "$BIN" ] && [ -x "$BENCH" ] || cargo build --release --workspace --bins
rm -rf "$OUT"
mkdir -p "$OUT"

if [ "$(nproc)" -ge 2 ]; then
    pin_server=(taskset -c 0)
    pin_load=(taskset -c 1)
else
    pin_server=()
    pin_load=()
fi

server_pid=""
addr=""
admin=""
stop_server() {
    if [ -n "$server_pid" ] && kill -0 "$server_pid" 2>/dev/null; then
        kill -TERM "$server_pid"
        wait "$server_pid" || true
    fi
    server_pid=""
}
trap stop_server EXIT

# start_server NAME [serve flags...]: a fresh server on 127.0.0.1:0; sets $addr, $admin (its
# admin API), $server_pid.
start_server() {
    local name=$1
    shift
    "${pin_server[@]}" "$BIN" serve --listen 127.0.0.1:0 --admin-listen 127.0.0.1:0 \
        --jwt-secret "$SECRET" --data-dir "$OUT/$name.data" --log-level warn "$@" \
        >"$OUT/$name.server.out" 2>"$OUT/$name.server.err" &
    server_pid=$!
    for _ in $(seq 200); do
        addr=$(grep -o 'ws://[0-9.]*:[0-9]*' "$OUT/$name.server.out" 2>/dev/null | head -n 1 || true)
        [ -n "$addr" ] && break
        sleep 0.05
    done
    if [ -z "$addr" ]; then
        cat "$OUT/$name.server.err" >&2
        echo "server for $name did not start" >&2
        exit 1
    fi
    addr=${addr#ws://}
    admin=$(grep -o 'http://[0-9.]*:[0-9]*' "$OUT/$name.server.out" | head -n 1 || true)
    admin=${admin#http://}
}

# run NAME SCENARIO [bench flags...]: runs one scenario against the current server.
run() {
    local name=$1 scenario=$2
    shift 2
    echo "--- $name: imgate-bench $scenario $*" >&2
    "${pin_load[@]}" "$BENCH" "$scenario" --addr "$addr" --jwt-secret "$SECRET" \
        --server-pid "$server_pid" --json "$OUT/$name.json" "$@" | tee -a "$OUT/summary.txt"
}

# Settings that take the server's per-connection send limits out of a load test's way.
UNLIMITED=(--rate-limit 1000000 --rate-burst 1000000)

if [ "$mode" = short ]; then
    IDLE=(--conns 2000 --hold 5)
    IDLE_SERVER=(--ping-interval 1s --idle-timeout 4s)
    RELAY=(--users 200 --inflight 4 --duration 5 --warmup 1)
    FANOUT=(--groups 10 --members 100 --rate 200 --duration 5 --warmup 1)
    STORM=(--users 1000 --msgs 5)
    ECHO=(--conns 100 --inflight 1 --duration 3 --warmup 1)
    FLOOD=(--users 50 --rate 2000 --flood-conns 200 --duration 5)
    ATTACK=(--users 20 --rate 200 --warmup 1 --duration 3)
    CHAOS=(--users 50 --rate 1000 --duration 20 --kills 5 --groups 4 --group-members 5 --group-share 0.3)
    CLUSTER_CHAOS=(--users 100 --devices 2 --rate 1000 --duration 25 --kills 5 --redis-kills 1 --redis-down-ms 3000 --groups 4 --group-members 5 --group-share 0.3)
else
    IDLE=(--conns 19000 --hold 40 --procs 2 --src-ips 4)
    IDLE_SERVER=(--ping-interval 10s --idle-timeout 30s --max-connections 19500)
    RELAY=(--users 1000 --inflight 4 --duration 10 --warmup 2)
    FANOUT=(--groups 1 --members 1000 --rate 150 --duration 10 --warmup 2)
    STORM=(--users 10000 --msgs 10 --src-ips 2)
    ECHO=(--conns 1000 --inflight 1 --duration 10 --warmup 2)
    FLOOD=(--users 200 --rate 5000 --flood-conns 1000 --duration 20)
    ATTACK=(--users 20 --rate 200 --warmup 2 --duration 10)
    CHAOS=(--users 200 --rate 2000 --duration 120 --kills 20 --groups 20 --group-members 5 --group-share 0.3)
    CLUSTER_CHAOS=(--users 300 --devices 2 --rate 3000 --duration 120 --kills 20 --redis-kills 2 --redis-down-ms 6000 --groups 20 --group-members 5 --group-share 0.3)
fi

start_server idle "${IDLE_SERVER[@]}"
run idle idle "${IDLE[@]}"
stop_server

start_server relay-none --durability none "${UNLIMITED[@]}"
run relay-none relay "${RELAY[@]}"
stop_server

start_server relay-full --durability full "${UNLIMITED[@]}"
run relay-full relay "${RELAY[@]}"
stop_server

# Group messages: every member's inbox checked; the groups made through the admin API.
start_server fanout --durability full "${UNLIMITED[@]}"
run fanout fanout --admin "$admin" "${FANOUT[@]}"
stop_server

start_server storm --max-connections 12000 "${UNLIMITED[@]}"
run storm storm "${STORM[@]}"
stop_server

start_server echo --echo
run echo echo "${ECHO[@]}"
stop_server

start_server flood "${UNLIMITED[@]}"
run flood flood "${FLOOD[@]}"
stop_server

# One hostile client at a time (output bounded before it is built, a share of each turn).
for attack in sync empty pings; do
    start_server "attack-$attack"
    run "attack-$attack" flood --attack "$attack" "${ATTACK[@]}"
    stop_server
done

# Chaos starts (and kills, and restarts) its own server on a fixed data directory. A 64 KiB
# log keeps the store moving generations all the time, so that kills land mid-move too. It
# makes its groups through the server's admin API (the address from the server's output) and
# sends 30% of the members' messages to their group; each kill waits for a group send on the
# wire, and every acknowledged group message must be in every other member's inbox.
echo "--- chaos: imgate-bench chaos ${CHAOS[*]}" >&2
"${pin_load[@]}" "$BENCH" chaos --jwt-secret "$SECRET" --json "$OUT/chaos.json" \
    --server-log "$OUT/chaos.server.err" "${CHAOS[@]}" \
    --server-cmd "${pin_server[*]} $BIN serve --listen 127.0.0.1:0 --admin-listen 127.0.0.1:0 --jwt-secret $SECRET --data-dir $OUT/chaos.data --log-level warn --store-log-bytes 65536 ${UNLIMITED[*]}" |
    tee -a "$OUT/summary.txt"

# Cluster chaos: three nodes on one Redis (AOF, fsync always), which the bench starts, kills
# and restarts as well. Each kill -9 takes a random node, or Redis; a reconnecting device
# moves to the next node. Every SendOk must reach every device of every recipient, in order.
redis_port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
mkdir -p "$OUT/cluster-chaos.redis"
node="${pin_server[*]} $BIN serve --listen 127.0.0.1:0 --admin-listen 127.0.0.1:0 --jwt-secret $SECRET --redis redis://127.0.0.1:$redis_port/ --node-lease 1s --log-level warn ${UNLIMITED[*]}"
echo "--- cluster-chaos: imgate-bench chaos ${CLUSTER_CHAOS[*]}" >&2
"${pin_load[@]}" "$BENCH" chaos --jwt-secret "$SECRET" --json "$OUT/cluster-chaos.json" \
    --server-log "$OUT/cluster-chaos.server.err" "${CLUSTER_CHAOS[@]}" \
    --redis-cmd "redis-server --port $redis_port --bind 127.0.0.1 --dir $OUT/cluster-chaos.redis --appendonly yes --appendfsync always --save ''" \
    --server-cmd "$node" --server-cmd "$node" --server-cmd "$node" |
    tee -a "$OUT/summary.txt"

echo "all scenarios passed; summaries in $OUT/summary.txt" >&2
