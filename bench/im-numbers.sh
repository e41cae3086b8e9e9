#!/usr/bin/env bash
# The numbers of BENCHMARKS.md ("IM gateway" part), from one command:
#
#   bench/build-tools.sh            # once: wsload, raw-echo, tungstenite-echo from ../shared/bench
#   bench/im-numbers.sh [OUTDIR]    # ~30 minutes; every summary line goes to OUTDIR/results.txt,
#                                   # the medians, worsts and ratios to OUTDIR/summary.txt
#   bench/im-numbers.sh --summary OUTDIR    # the summary of an earlier run's results.txt
#   bench/im-numbers.sh --fanout [OUTDIR]   # only the group fanout runs (~8 minutes), and the summary
#
# Each run gets a fresh server and data directory; the server is pinned to core 0, the load to
# core 1. Repeated runs alternate between the servers being compared (A B A B ...). Any run
# that fails (a verification included: imgate-bench exits 1) stops the script with its status,
# after logging what it printed.
set -euo pipefail
cd "$(dirname "$0")/.."

# summarize OUTDIR: medians and worsts over the rounds, and the ratios BENCHMARKS.md quotes,
# from OUTDIR/results.txt (lines "[round=R ]LABEL: key=value ..."); prints them and writes
# OUTDIR/summary.txt.
summarize() {
    python3 - "$1/results.txt" <<'PY' | tee "$1/summary.txt"
import re
import statistics
import sys

runs = {}  # label -> {round: {key: value}}
for line in open(sys.argv[1]):
    m = re.match(r"(?:round=(\d+) )?([\w.-]+): (.*)$", line.rstrip("\n"))
    if not m:
        continue
    fields = dict(kv.split("=", 1) for kv in m.group(3).split() if "=" in kv)
    runs.setdefault(m.group(2), {})[int(m.group(1) or 0)] = fields


def num(f, key):
    v = f.get(key, "").rstrip("%")
    try:
        return float(v)
    except ValueError:
        return None


def values(label, key):
    return [v for v in (num(f, key) for f in runs.get(label, {}).values()) if v is not None]


def median(label, key):
    v = values(label, key)
    return statistics.median(v) if v else None


def worst(label, key):
    v = values(label, key)
    return min(v) if v else None


def median_run(label, key):
    """The run with the median throughput (the lower middle one for an even count)."""
    rs = sorted((f for f in runs.get(label, {}).values() if num(f, key) is not None),
                key=lambda f: num(f, key))
    return rs[(len(rs) - 1) // 2] if rs else {}


def spread(label, key):
    v = values(label, key)
    if not v:
        return "-"
    return f"{min(v):.0f} %" if min(v) == max(v) else f"{min(v):.0f}-{max(v):.0f} %"


def n(x, digits=0):
    return "-" if x is None else f"{x:,.{digits}f}"


def ratio(a, b):
    return "-" if a is None or not b else f"{a / b:.3f}"


def per_round_ratio(a, b, key):
    ra, rb = runs.get(a, {}), runs.get(b, {})
    out = [num(ra[r], key) / num(rb[r], key)
           for r in sorted(set(ra) & set(rb))
           if num(ra[r], key) is not None and num(rb[r], key)]
    return out


rounds = max((len(r) for label, r in runs.items() if label.startswith(("relay-none", "fanout-"))), default=0)
print(f"Medians and worsts over {rounds} round(s).")
print()
print("echo (100 connections, 1 in flight, 32 B)")
print("  run | median msgs/s | worst msgs/s | server us/msg (median) | p99 us (median)")
for label in ["imgate-echo", "imgate-echo-wsload", "tungstenite-echo"]:
    print(f"  {label} | {n(median(label, 'msgs_per_s'))} | {n(worst(label, 'msgs_per_s'))}"
          f" | {n(median(label, 'srv_us_per_msg'), 2)} | {n(median(label, 'p99_us'))}")
print(f"  imgate / tokio-tungstenite: {ratio(median('imgate-echo', 'msgs_per_s'), median('tungstenite-echo', 'msgs_per_s'))}"
      f" by median throughput, {ratio(median('imgate-echo', 'srv_us_per_msg'), median('tungstenite-echo', 'srv_us_per_msg'))}"
      " of its CPU per message")
print(f"  imgate-bench and wsload against imgate /echo: medians {n(median('imgate-echo', 'msgs_per_s'))}"
      f" and {n(median('imgate-echo-wsload', 'msgs_per_s'))} msgs/s")
print()
print("relay (200 users, 4 in flight each, 64 B); raw-echo and /echo at 200 x 4 in msgs/s, relay in delivered/s")
print("  run | median | worst | ratio to raw-echo | p50 / p99 us (median run) | server CPU | bench CPU")
raw = median("raw-echo", "msgs_per_s")
for label, key in [("raw-echo", "msgs_per_s"), ("imgate-echo-200x4", "msgs_per_s"),
                   ("relay-none", "delivered_per_s"), ("relay-full", "delivered_per_s"),
                   ("relay-no-store", "delivered_per_s")]:
    mr = median_run(label, key)
    print(f"  {label} | {n(median(label, key))} | {n(worst(label, key))} | {ratio(median(label, key), raw)}"
          f" | {n(num(mr, 'p50_us'))} / {n(num(mr, 'p99_us'))} | {spread(label, 'srv_cpu')} | {spread(label, 'cli_cpu')}")
full_none = per_round_ratio("relay-full", "relay-none", "delivered_per_s")
print(f"  durable / none: {ratio(median('relay-full', 'delivered_per_s'), median('relay-none', 'delivered_per_s'))}"
      f" (medians); by round {', '.join(f'{x:.3f}' for x in full_none) or '-'},"
      f" worst {min(full_none):.3f}" if full_none else "  durable / none: -")
print(f"  none / raw-echo: {ratio(median('relay-none', 'delivered_per_s'), raw)};"
      f" no-store / raw-echo: {ratio(median('relay-no-store', 'delivered_per_s'), raw)};"
      f" /echo 200 x 4 / raw-echo: {ratio(median('imgate-echo-200x4', 'msgs_per_s'), raw)}")
print()
print("fanout (durable store, 1,000 members online; 250,000 deliveries/s offered; deliveries/s = arrived within the window)")
print("  shape | median deliveries/s | worst | sends/s (median) | p50 / p99 / p999 us (median run) | server CPU | sends the bench skipped (max)")
for g, m in [(1, 1000), (10, 100), (100, 10)]:
    label = f"fanout-{g}x{m}"
    mr = median_run(label, "arrived_per_s")
    print(f"  {g} x {m} | {n(median(label, 'arrived_per_s'))} | {n(worst(label, 'arrived_per_s'))}"
          f" | {n(median(label, 'send_ok_per_s'))}"
          f" | {n(num(mr, 'p50_us'))} / {n(num(mr, 'p99_us'))} / {n(num(mr, 'p999_us'))} | {spread(label, 'srv_cpu')}"
          f" | {n(max(values(label, 'rate_skipped'), default=0))}")
label = "fanout-1x1000-rate-150"
rs = [runs.get(label, {})[r] for r in sorted(runs.get(label, {}))]


def pcts(f):
    return f"{n(num(f, 'p50_us'))} / {n(num(f, 'p99_us'))} / {n(num(f, 'p999_us'))}"


p99s = values(label, "p99_us")
print(f"  1 x 1000 at 150 sends/s (150,000 deliveries/s): deliveries/s by round"
      f" {' / '.join(n(num(f, 'arrived_per_s')) for f in rs) or '-'};"
      f" p50 / p99 / p999 us by round {'; '.join(pcts(f) for f in rs) or '-'};"
      f" worst p99 {n(max(p99s) if p99s else None)} us")
print()
print("scale: 19,000 users, relay at a rate (durable store)")
print("  rate | p50 us by round | p99 us by round | p999 us by round | server p99 (worst bucket, s) | server CPU | commits (mean)")
for rate in [2000, 5000, 10000]:
    label = f"relay-19000-rate-{rate}"
    rs = [runs.get(label, {})[r] for r in sorted(runs.get(label, {}))]

    def by_round(key):
        return " / ".join(n(num(f, key)) for f in rs) or "-"

    srv_p99 = values(label, "srv_delivery_p99_le_s")
    commits = values(label, "commits")
    print(f"  {rate:,} msgs/s | {by_round('p50_us')} | {by_round('p99_us')} | {by_round('p999_us')}"
          f" | {max(srv_p99) if srv_p99 else '-'} | {spread(label, 'srv_cpu')}"
          f" | {n(statistics.mean(commits)) if commits else '-'}")
idle = runs.get("idle-19000", {}).get(0, {})
before = runs.get("kernel-before-idle", {}).get(0, {})
during = runs.get("kernel-during-idle", {}).get(0, {})
print()
print(f"idle 19,000: {n(num(idle, 'rss_bytes_per_conn'))} bytes of server RSS per connection,"
      f" {n(num(idle, 'srv_cpu_us_per_conn_s'), 3)} us of server CPU per connection per second,"
      f" survived {n(num(idle, 'survived'))} of {n(num(idle, 'conns'))}")

# The kernel lines are /proc text, not key=value.
slab = {}
for label in ["kernel-before-idle", "kernel-during-idle"]:
    for line in open(sys.argv[1]):
        if line.startswith(label + ":"):
            s = re.search(r"Slab: (\d+) kB", line)
            t = re.search(r"TCP: inuse (\d+)", line)
            slab[label] = (int(s.group(1)) if s else None, int(t.group(1)) if t else None)
(b_slab, b_tcp), (d_slab, d_tcp) = slab.get("kernel-before-idle", (None, None)), slab.get("kernel-during-idle", (None, None))
if None not in (b_slab, d_slab, b_tcp, d_tcp) and d_tcp > b_tcp:
    print(f"  kernel slab grew by {d_slab - b_slab:,} kB for {d_tcp - b_tcp:,} more TCP sockets in use:"
          f" {(d_slab - b_slab) / (d_tcp - b_tcp):.1f} kB per socket")
hic = runs.get("hiccups", {}).get(0, {})
print(f"hiccups: {hic.get('gaps_over_2ms', '-')} gaps over 2 ms in {hic.get('secs', '-')} s, largest (ms) {hic.get('largest_ms', '-')}")
storm = runs.get("storm-10000", {}).get(0, {})
print(f"storm 10,000: logged in {n(num(storm, 'login_all_ms'), 1)} ms, caught up {n(num(storm, 'caught_up_ms'), 1)} ms,"
      f" delivered {n(num(storm, 'delivered'))} of {n(num(storm, 'expected'))}")
fl = runs.get("flood", {}).get(0, {})
print(f"flood: p50 / p99 us {n(num(fl, 'base_p50_us'))} / {n(num(fl, 'base_p99_us'))} before,"
      f" {n(num(fl, 'p50_us'))} / {n(num(fl, 'p99_us'))} during; delivered/s {n(num(fl, 'delivered_per_s'))},"
      f" garbage connections/s {n(num(fl, 'garbage_per_s'))}, errors {n(num(fl, 'errors'))}")
ch = runs.get("chaos", {}).get(0, {})
viol = sum(num(ch, k) or 0 for k in ["gaps", "dups", "reorders", "missing", "mismatched", "unconfirmed",
                                     "misrouted", "wrong_fields", "corrupt", "changed"])
print(f"chaos: {n(num(ch, 'kills'))} kills ({n(num(ch, 'kills_in_flight'))} with sends on the wire),"
      f" {n(num(ch, 'send_ok'))} SendOks, deliveries {n(num(ch, 'delivered'))} / {n(num(ch, 'expected'))},"
      f" violations {n(viol)}, longest downtime {n(num(ch, 'max_downtime_ms'))} ms")
PY
}

if [ "${1:-}" = "--summary" ]; then
    summarize "${2:?usage: bench/im-numbers.sh --summary OUTDIR}"
    exit 0
fi

# --fanout: only the group fanout runs (1b), and the summary.
fanout_only=""
if [ "${1:-}" = "--fanout" ]; then
    fanout_only=1
    shift
fi
OUT=${1:-target/im-numbers}
TOOLS=${IMGATE_BENCH_TOOLS:-target/bench-tools/release}
BIN=target/release/imgate
BENCH=target/release/imgate-bench
SECRET=bench-secret-0123456789abcdef0123456789
ROUNDS=${ROUNDS:-3}
# The server and imgate-bench (bench/imgate-bench, a workspace member of its own).
cargo build --release --workspace --bins
if [ -z "$fanout_only" ]; then
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
fi
rm -rf "$OUT"
mkdir -p "$OUT"
log() { echo "$*" | tee -a "$OUT/results.txt"; }

# measure CMD...: runs one measurement and sets $line to its summary (the last line of its
# stdout). If it fails, what it printed (stdout and stderr) is logged and the script exits
# with its status.
measure() {
    local out status=0
    out=$("$@" 2>"$OUT/stderr.txt") || status=$?
    line=$(printf '%s\n' "$out" | tail -n 1)
    if [ "$status" -ne 0 ]; then
        log "FAILED (exit $status): $*"
        log "$out"
        log "$(cat "$OUT/stderr.txt")"
        exit "$status"
    fi
}

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

# other CMD...: a reference server on core 0 at a free port, polled until it accepts; sets
# $addr, $pid.
other() {
    local port
    port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
    taskset -c 0 "$@" "127.0.0.1:$port" >/dev/null 2>&1 &
    pid=$!
    addr=127.0.0.1:$port
    for _ in $(seq 200); do
        (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
        sleep 0.05
    done
}

bench() { taskset -c 1 "$BENCH" "$@" --quiet; }
wsload() { taskset -c 1 "$TOOLS/wsload" "$@"; }
UNLIMITED=(--rate-limit 1000000 --rate-burst 1000000)

# 1b. Group fanout with the durable store, 1,000 members online in three shapes (one group of
#     1,000, ten of 100, a hundred of 10): group messages at 250,000 deliveries/s offered (each
#     send is delivered to the M - 1 other members), and the latency of 1 x 1,000 at 150,000
#     deliveries/s (150 sends/s). A long --drain: a server that falls behind catches up before
#     the inboxes are verified.
fanout() {
    bench fanout --addr "$addr" --admin "${admin#http://}" --jwt-secret "$SECRET" --server-pid "$pid" \
        -d 10 -w 2 --drain 60 "$@"
}
fanout_rounds() {
    for round in $(seq "$ROUNDS"); do
        for shape in "1 1000" "10 100" "100 10"; do
            read -r g m <<<"$shape"
            rate=$(python3 -c "print(round(250000 / ($m - 1), 2))")
            imgate "fanout-${g}x$m-$round" --durability full "${UNLIMITED[@]}"
            measure fanout --groups "$g" --members "$m" --rate "$rate"
            log "round=$round fanout-${g}x$m: $line $(server_view)"
            stop
        done
        imgate "fanout-lat-$round" --durability full "${UNLIMITED[@]}"
        measure fanout --groups 1 --members 1000 --rate 150
        log "round=$round fanout-1x1000-rate-150: $line $(server_view)"
        stop
    done
}

if [ -n "$fanout_only" ]; then
    fanout_rounds
    summarize "$OUT"
    echo "done: $OUT/results.txt, $OUT/summary.txt" >&2
    exit 0
fi

# 1. Relay throughput against the raw-echo limit at the same connections and depth.
for round in $(seq "$ROUNDS"); do
    other "$TOOLS/raw-echo"
    measure wsload --raw -c 200 -k 4 -s 64 -d 8 -w 1 "ws://$addr/" --server-pid "$pid" --label wsload-raw
    log "round=$round raw-echo: $line"
    stop
    # imgate's own WebSocket engine at the same connections and depth: is the gap the engine?
    imgate echo200-$round --echo
    measure wsload -c 200 -k 4 -s 64 -d 8 -w 1 "ws://$addr/echo" --server-pid "$pid"
    log "round=$round imgate-echo-200x4: $line"
    stop
    imgate relay-none-$round --durability none "${UNLIMITED[@]}"
    measure bench relay --addr "$addr" --jwt-secret "$SECRET" --server-pid "$pid" -u 200 -k 4 -s 64 -d 8 -w 1
    log "round=$round relay-none: $line $(server_view)"
    stop
    imgate relay-full-$round --durability full "${UNLIMITED[@]}"
    measure bench relay --addr "$addr" --jwt-secret "$SECRET" --server-pid "$pid" -u 200 -k 4 -s 64 -d 8 -w 1
    log "round=$round relay-full: $line $(server_view)"
    stop
    SERVER_BIN=$NO_STORE_BIN imgate relay-nostore-$round --durability none "${UNLIMITED[@]}"
    measure bench relay --addr "$addr" --jwt-secret "$SECRET" --server-pid "$pid" -u 200 -k 4 -s 64 -d 8 -w 1
    log "round=$round relay-no-store: $line"
    stop
done

# 1b. Group fanout (fanout_rounds, above).
fanout_rounds

# 2. Echo against the tokio-tungstenite reference (and the bench against wsload).
for round in $(seq "$ROUNDS"); do
    imgate echo-$round --echo
    measure bench echo --addr "$addr" --server-pid "$pid" -c 100 -k 1 -s 32 -d 5 -w 1
    log "round=$round imgate-echo: $line"
    measure wsload -c 100 -k 1 -s 32 -d 5 -w 1 "ws://$addr/echo" --server-pid "$pid"
    log "round=$round imgate-echo-wsload: $line"
    stop
    other "$TOOLS/tungstenite-echo"
    measure bench echo --addr "$addr" --path / --server-pid "$pid" -c 100 -k 1 -s 32 -d 5 -w 1
    log "round=$round tungstenite-echo: $line"
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
    -c 19000 --hold 45 --procs 2 --src-ips 4 >"$OUT/idle.txt" 2>"$OUT/idle.err" &
idle_bench=$!
# A moment inside the 45 s hold (setup takes a few seconds), not a synchronisation.
sleep 35
log "kernel-during-idle: $(kmem)"
status=0
wait "$idle_bench" || status=$?
log "idle-19000: $(tail -n 1 "$OUT/idle.txt")"
if [ "$status" -ne 0 ]; then
    log "FAILED (exit $status): bench idle"
    log "$(cat "$OUT/idle.err")"
    exit "$status"
fi
stop
for round in 1 2; do
    for rate in 2000 5000 10000; do
        imgate scale-$rate-$round --ping-interval 10s --idle-timeout 30s --max-connections 19500 "${UNLIMITED[@]}"
        measure bench relay --addr "$addr" --jwt-secret "$SECRET" --server-pid "$pid" \
            -u 19000 --rate "$rate" -d 20 -w 2 --procs 2 --src-ips 4
        log "round=$round relay-19000-rate-$rate: $line $(server_view)"
        stop
    done
done

# 3b. Host hiccups: a busy loop on the server's core while the load's core is busy too, as
#     during the runs above; gaps it sees are time the machine did not give that core.
taskset -c 1 timeout 22 python3 -c 'while True: pass' >/dev/null 2>&1 &
busy=$!
measure taskset -c 0 python3 bench/hiccup.py 20
log "hiccups: $line"
wait "$busy" || true

# 4. Reconnect storm: 10,000 clients with 10 messages each waiting.
imgate storm --max-connections 12000 "${UNLIMITED[@]}"
measure bench storm --addr "$addr" --jwt-secret "$SECRET" --server-pid "$pid" \
    -u 10000 -m 10 --senders 50 --send-rate 10000 --src-ips 2
log "storm-10000: $line"
stop

# 5. Garbage flood while 200 users chat at 2,000 msgs/s.
imgate flood "${UNLIMITED[@]}"
measure bench flood --addr "$addr" --jwt-secret "$SECRET" --server-pid "$pid" \
    -u 200 --rate 2000 --flood-conns 500 -d 15 -w 3
log "flood: $line"
stop

# 6. kill -9 chaos with the durable store: 100 users on 2 devices each, 10 kills in 60 s; a
#    64 KiB log keeps the store moving generations, so that kills land mid-move too.
measure bench chaos -u 100 --devices 2 --rate 1000 -d 60 --kills 10 \
    --server-log "$OUT/chaos.err" \
    --server-cmd "taskset -c 0 $BIN serve --listen 127.0.0.1:0 --admin-listen 127.0.0.1:0 --jwt-secret $SECRET --data-dir $OUT/chaos.data --log-level warn --store-log-bytes 65536 ${UNLIMITED[*]}"
log "chaos: $line"

summarize "$OUT"
echo "done: $OUT/results.txt, $OUT/summary.txt" >&2
