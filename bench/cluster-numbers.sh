#!/usr/bin/env bash
# Relay and group fanout on Redis (BENCHMARKS.md, "Cluster on Redis"): the embedded store, one
# node on Redis, and two nodes on Redis, alternating round by round, ROUNDS (default 3) rounds.
#
#   bench/cluster-numbers.sh [OUTDIR]            # about 6 minutes; results in OUTDIR/results.txt
#
# Redis is Debian's redis-server with `appendonly yes` and `appendfsync always` on a fresh
# folder. The nodes run on core 0 (both of them, when there are two: the nodes get the same
# CPU as one node), Redis and the load generator on core 1. For each run it records what
# imgate-bench measured and the CPU (user + system, from /proc) the nodes and Redis used over
# the whole run, divided by the messages delivered in it.
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=${1:-target/cluster-numbers}
ROUNDS=${ROUNDS:-3}
BIN=target/release/imgate
BENCH=target/release/imgate-bench
SECRET=bench-secret-0123456789abcdef0123456789
TICK=$(getconf CLK_TCK)
command -v redis-server >/dev/null || { echo "redis-server is missing (apt-get install redis-server)" >&2; exit 1; }
cargo build --release --workspace --bins
rm -rf "$OUT"
mkdir -p "$OUT"
log() { echo "$*" | tee -a "$OUT/results.txt"; }

pids=()
stop() {
    for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
    for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
    pids=()
}
trap stop EXIT

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# redis NAME: a fresh Redis with AOF always on core 1; sets $redis_url, $redis_pid.
redis() {
    local port dir=$OUT/$1.redis
    port=$(free_port)
    mkdir -p "$dir"
    taskset -c 1 redis-server --port "$port" --bind 127.0.0.1 --dir "$dir" --appendonly yes \
        --appendfsync always --save '' >"$OUT/$1.redis.log" 2>&1 &
    redis_pid=$!
    pids+=("$redis_pid")
    for _ in $(seq 200); do
        redis-cli -p "$port" ping >/dev/null 2>&1 && break
        sleep 0.05
    done
    redis_url=redis://127.0.0.1:$port/
}

# node NAME [flags]: an imgate on core 0; appends to $addrs and $node_pids, sets $admin.
node() {
    local name=$1 addr=""
    shift
    taskset -c 0 "$BIN" serve --listen 127.0.0.1:0 --admin-listen 127.0.0.1:0 \
        --jwt-secret "$SECRET" --log-level warn --rate-limit 1000000 --rate-burst 1000000 "$@" \
        >"$OUT/$name.out" 2>"$OUT/$name.err" &
    pids+=("$!")
    node_pids+=("$!")
    for _ in $(seq 200); do
        addr=$(grep -o 'ws://[0-9.]*:[0-9]*' "$OUT/$name.out" 2>/dev/null | head -n 1 || true)
        [ -n "$addr" ] && break
        sleep 0.05
    done
    [ -n "$addr" ] || { echo "$name did not start: $(cat "$OUT/$name.err")" >&2; exit 1; }
    addrs+=("${addr#ws://}")
    [ -n "${admin:-}" ] || admin=$(grep -o 'http://[0-9.]*:[0-9]*' "$OUT/$name.out" | head -n 1)
}

ticks() {
    local sum=0
    for p in "$@"; do sum=$((sum + $(awk '{print $14 + $15}' "/proc/$p/stat"))); done
    echo "$sum"
}

# setup KIND NAME: starts the servers of KIND (embedded, redis-1, redis-2).
setup() {
    addrs=()
    node_pids=()
    admin=""
    redis_pid=""
    case $1 in
        embedded) node "$2" --data-dir "$OUT/$2.data" --durability full ;;
        redis-1) redis "$2"; node "$2-a" --redis "$redis_url" ;;
        redis-2) redis "$2"; node "$2-a" --redis "$redis_url"; node "$2-b" --redis "$redis_url" ;;
    esac
}

# run LABEL CMD...: runs imgate-bench on core 1 and logs its summary with the CPU per message.
run() {
    local label=$1 out status=0 n0 r0 n1 r1 delivered
    shift
    n0=$(ticks "${node_pids[@]}")
    r0=$([ -n "$redis_pid" ] && ticks "$redis_pid" || echo 0)
    out=$(taskset -c 1 "$BENCH" "$@" --addr "$(IFS=,; echo "${addrs[*]}")" --jwt-secret "$SECRET" \
        --quiet 2>"$OUT/stderr.txt") || status=$?
    n1=$(ticks "${node_pids[@]}")
    r1=$([ -n "$redis_pid" ] && ticks "$redis_pid" || echo 0)
    line=$(printf '%s\n' "$out" | tail -n 1)
    if [ "$status" -ne 0 ]; then
        log "FAILED (exit $status): $label: $line"
        cat "$OUT/stderr.txt" >>"$OUT/results.txt"
        exit "$status"
    fi
    delivered=$(printf '%s\n' "$line" | grep -o ' delivered=[0-9]*' | cut -d= -f2)
    log "$label: $line nodes_cpu_us_per_msg=$(( (n1 - n0) * 1000000 / TICK / delivered )) redis_cpu_us_per_msg=$(( (r1 - r0) * 1000000 / TICK / delivered ))"
}

for round in $(seq "$ROUNDS"); do
    for kind in ${KINDS:-embedded redis-1 redis-2}; do
        setup "$kind" "relay-$kind-$round"
        run "round=$round relay-$kind" relay -u 200 -k 4 -s 64 -d 8 -w 1
        stop
        setup "$kind" "fanout-$kind-$round"
        run "round=$round fanout-$kind" fanout --admin "${admin#http://}" --groups 1 --members 1000 \
            --rate 50 -d 8 -w 1 --drain 60
        stop
    done
done
