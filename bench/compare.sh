#!/usr/bin/env bash
# compare.sh — side-by-side WebSocket echo benchmark driver around wsload (shared bench kit).
# Build the kit first with bench/build-tools.sh; BENCHMARKS.md has the exact commands used.
#
# usage: bench/compare.sh [options] SERVER [SERVER ...]
#
#   SERVER is  NAME[@PATH]=COMMAND  where COMMAND contains the placeholder {addr}
#   (replaced by 127.0.0.1:PORT, a fresh free port per run) and PATH is the URL
#   path wsload connects to (default "/"). A server whose NAME is "raw" or whose
#   COMMAND mentions raw-echo is driven with `wsload --raw`.
#
#   examples:
#     T=target/bench-tools/release
#     bench/compare.sh "raw=$T/raw-echo {addr}" "tung=$T/tungstenite-echo {addr}" \
#         "imgate@/echo=target/release/imgate serve --dev --data-dir /tmp/imgate-bench-data --admin-listen 127.0.0.1:0 --echo --listen {addr} --max-connections 20000 --log-level warn"
#
# options:
#   -r, --rounds N        rounds (default 3)
#   -d, --duration S      measured seconds per echo run (default 3)
#   -w, --warmup S        warm-up seconds per echo run (default 1)
#       --configs LIST    echo configs "C,K,S C,K,S ..." (conns,inflight,size)
#                         default: "1,1,32 100,1,32 1000,1,32 100,16,32 100,1,4096 10000,1,32"
#       --idle-conns N    connections for the idle-memory mode (default 10000)
#       --idle-hold S     hold seconds for the idle-memory mode (default 3)
#       --no-idle         skip the idle-memory mode
#       --idle-only       only the idle-memory mode
#       --path NAME=PATH  URL path for server NAME (same as NAME@PATH=...)
#       --raw NAME        drive server NAME with wsload --raw
#       --ref NAME        reference server for ratios (default: the raw one)
#       --wsload PATH     wsload binary (default target/bench-tools/release/wsload)
#       --wsload-args STR extra wsload arguments (e.g. "--src-ips 4")
#       --server-cpu N    core for servers (default 0); --client-cpu N (default 1)
#       --pause S         seconds to sleep between runs (default 0.5)
#       --out DIR         keep logs/results here (default: a new /tmp/bench.XXXX)
#
# Order: for each config, for each round, every server in turn (A B C A B C …), each
# run against a freshly started server. Every wsload line is printed as it comes,
# prefixed with "RUN server=… cfg=… round=…"; then a table of medians per
# (server, config) and each server's median msgs_per_s relative to the reference.
# Exit status is non-zero if any run failed or reported errors.

set -u

ROUNDS=3
DUR=3
WARM=1
CONFIGS="1,1,32 100,1,32 1000,1,32 100,16,32 100,1,4096 10000,1,32"
IDLE_CONNS=10000
IDLE_HOLD=3
DO_ECHO=1
DO_IDLE=1
REF=""
WSLOAD=${IMGATE_BENCH_TARGET:-target/bench-tools}/release/wsload
WSLOAD_ARGS=""
SRV_CPU=0
CLI_CPU=1
PAUSE=0.5
OUT=""

declare -a NAMES=()
declare -A CMD=() PATHOF=() RAW=()
declare -a PATH_OVR=() RAW_OVR=()

die() { echo "compare.sh: $*" >&2; exit 2; }

while [ $# -gt 0 ]; do
    case "$1" in
        -r|--rounds) ROUNDS=$2; shift 2 ;;
        -d|--duration) DUR=$2; shift 2 ;;
        -w|--warmup) WARM=$2; shift 2 ;;
        --configs) CONFIGS=$2; shift 2 ;;
        --idle-conns) IDLE_CONNS=$2; shift 2 ;;
        --idle-hold) IDLE_HOLD=$2; shift 2 ;;
        --no-idle) DO_IDLE=0; shift ;;
        --idle-only) DO_ECHO=0; DO_IDLE=1; shift ;;
        --path) PATH_OVR+=("$2"); shift 2 ;;
        --raw) RAW_OVR+=("$2"); shift 2 ;;
        --ref) REF=$2; shift 2 ;;
        --wsload) WSLOAD=$2; shift 2 ;;
        --wsload-args) WSLOAD_ARGS=$2; shift 2 ;;
        --server-cpu) SRV_CPU=$2; shift 2 ;;
        --client-cpu) CLI_CPU=$2; shift 2 ;;
        --pause) PAUSE=$2; shift 2 ;;
        --out) OUT=$2; shift 2 ;;
        -h|--help) sed -n '2,/^$/p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        -*) die "unknown option $1" ;;
        *=*)
            lhs=${1%%=*}; cmd=${1#*=}
            name=${lhs%%@*}; path=/
            [ "$name" != "$lhs" ] && path=${lhs#*@}
            [ -n "$name" ] || die "empty server name in '$1'"
            [ -z "${CMD[$name]+x}" ] || die "server '$name' given twice"
            case "$cmd" in *"{addr}"*) ;; *) die "command of '$name' has no {addr}" ;; esac
            NAMES+=("$name"); CMD[$name]=$cmd; PATHOF[$name]=$path; RAW[$name]=0
            if [ "$name" = raw ] || [[ "$cmd" == *raw-echo* ]]; then RAW[$name]=1; fi
            shift ;;
        *) die "bad argument '$1' (expected NAME[@PATH]=COMMAND)" ;;
    esac
done
[ ${#NAMES[@]} -gt 0 ] || die "no servers given (try --help)"
for p in "${PATH_OVR[@]+"${PATH_OVR[@]}"}"; do
    n=${p%%=*}; [ -n "${CMD[$n]+x}" ] || die "--path: unknown server $n"; PATHOF[$n]=${p#*=}
done
for n in "${RAW_OVR[@]+"${RAW_OVR[@]}"}"; do
    [ -n "${CMD[$n]+x}" ] || die "--raw: unknown server $n"; RAW[$n]=1
done
if [ -z "$REF" ]; then
    for n in "${NAMES[@]}"; do [ "${RAW[$n]}" = 1 ] && { REF=$n; break; }; done
fi
[ -x "$WSLOAD" ] || die "wsload not found at $WSLOAD"

# --- file descriptors: both the server and wsload inherit this shell's limit.
need=$IDLE_CONNS
for cfg in $CONFIGS; do c=${cfg%%,*}; [ "$c" -gt "$need" ] && need=$c; done
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null
nofile=$(ulimit -n)
if [ "$nofile" != unlimited ] && [ "$nofile" -lt $((need + 64)) ]; then
    echo "compare.sh: WARNING: ulimit -n is $nofile (hard $(ulimit -Hn)), runs with $need connections will fail" >&2
fi

[ -n "$OUT" ] || OUT=$(mktemp -d /tmp/bench.XXXXXX)
mkdir -p "$OUT"
RES=$OUT/results.tsv   # kind server cfg round key=value...
: > "$RES"
echo "# compare.sh: servers=${NAMES[*]} ref=${REF:-none} rounds=$ROUNDS duration=${DUR}s warmup=${WARM}s ulimit_n=$nofile out=$OUT"
for n in "${NAMES[@]}"; do echo "#   $n: path=${PATHOF[$n]} raw=${RAW[$n]} cmd=${CMD[$n]}"; done

# --- helpers
port_busy() { [ -n "$(ss -Htan "sport = :$1" 2>/dev/null)" ]; }
free_port() {   # below the ephemeral range, so wsload's source ports never collide
    local p i
    for i in $(seq 1 200); do
        p=$((20000 + RANDOM % 12000))
        port_busy "$p" || { echo "$p"; return 0; }
    done
    return 1
}

SPID=""
start_server() {   # $1 name, $2 port, $3 log  -> sets SPID (the server's own pid)
    local cmd=${CMD[$1]//\{addr\}/127.0.0.1:$2} i
    taskset -c "$SRV_CPU" bash -c "exec $cmd" >"$3" 2>&1 </dev/null &
    SPID=$!
    for i in $(seq 1 200); do           # up to 10 s for the listener to appear
        if ! kill -0 "$SPID" 2>/dev/null; then
            echo "compare.sh: server $1 exited at start-up (see $3):" >&2; tail -5 "$3" >&2
            SPID=""; return 1
        fi
        [ -n "$(ss -Hltn "sport = :$2" 2>/dev/null)" ] && { sleep 0.1; return 0; }
        sleep 0.05
    done
    echo "compare.sh: server $1 did not listen on :$2 within 10 s" >&2
    stop_server; return 1
}
stop_server() {
    [ -n "$SPID" ] || return 0
    kill -TERM "$SPID" 2>/dev/null
    local i
    for i in $(seq 1 60); do kill -0 "$SPID" 2>/dev/null || break; sleep 0.05; done
    kill -KILL "$SPID" 2>/dev/null
    wait "$SPID" 2>/dev/null
    SPID=""
}
trap 'stop_server; exit 130' INT TERM

FAILED=0
run_one() {   # $1 name, $2 cfg label, $3 round, rest: wsload args (before URL)
    local name=$1 cfg=$2 round=$3; shift 3
    local port log line rc extra=""
    port=$(free_port) || { echo "compare.sh: no free port" >&2; FAILED=1; return; }
    log=$OUT/${name}_${cfg}_r${round}
    if ! start_server "$name" "$port" "$log.server"; then
        echo "RUN server=$name cfg=$cfg round=$round FAILED (server start)"; FAILED=1; return
    fi
    [ "${RAW[$name]}" = 1 ] && extra="--raw"
    # shellcheck disable=SC2086
    line=$(timeout 120 taskset -c "$CLI_CPU" "$WSLOAD" "$@" $extra $WSLOAD_ARGS \
               --server-pid "$SPID" --label "$name" "ws://127.0.0.1:$port${PATHOF[$name]}" \
               2>"$log.wsload")
    rc=$?
    stop_server
    if [ -z "$line" ]; then
        echo "RUN server=$name cfg=$cfg round=$round FAILED rc=$rc: $(tail -2 "$log.wsload" | tr '\n' ' ')"
        FAILED=1
    else
        echo "RUN server=$name cfg=$cfg round=$round rc=$rc | $line"
        [ $rc -ne 0 ] && { FAILED=1; echo "    wsload stderr: $(tail -2 "$log.wsload" | tr '\n' ' ')"; }
        printf '%s\t%s\t%s\t%s\n' "$name" "$cfg" "$round" "$line" >> "$RES"
    fi
    sleep "$PAUSE"
}

# --- runs
if [ "$DO_ECHO" = 1 ]; then
    for cfg in $CONFIGS; do
        IFS=, read -r c k s <<< "$cfg"
        label="c${c}_k${k}_s${s}"
        for round in $(seq 1 "$ROUNDS"); do
            for n in "${NAMES[@]}"; do
                run_one "$n" "$label" "$round" -c "$c" -k "$k" -s "$s" -d "$DUR" -w "$WARM"
            done
        done
    done
fi
if [ "$DO_IDLE" = 1 ]; then
    label="idle_c${IDLE_CONNS}"
    for round in $(seq 1 "$ROUNDS"); do
        for n in "${NAMES[@]}"; do
            run_one "$n" "$label" "$round" --idle -c "$IDLE_CONNS" -d "$IDLE_HOLD"
        done
    done
fi

# --- medians
echo
echo "# medians over rounds (ratio = median msgs_per_s / median msgs_per_s of ${REF:-<no ref>} for the same config)"
awk -F'\t' -v ref="$REF" '
function med(key,   n, i, j, t, a) {
    n = split(vals[key], a, " ")
    if (n == 0) return ""
    for (i = 2; i <= n; i++) { t = a[i] + 0; for (j = i - 1; j >= 1 && a[j] + 0 > t; j--) a[j + 1] = a[j]; a[j + 1] = t }
    return (n % 2) ? a[(n + 1) / 2] + 0 : (a[n / 2] + a[n / 2 + 1]) / 2
}
{
    srv = $1; cfg = $2
    if (!((srv, cfg) in seen)) {
        seen[srv, cfg] = 1
        if (!(cfg in cseen)) { cseen[cfg] = 1; cfgs[++nc] = cfg }
        if (!(srv in sseen)) { sseen[srv] = 1; srvs[++ns] = srv }
    }
    cnt[srv, cfg]++
    nf = split($4, kv, " ")
    for (i = 1; i <= nf; i++) {
        if (split(kv[i], p, "=") != 2) continue
        v = p[2]; sub(/%$/, "", v)
        if (p[1] == "errors") err[srv, cfg] += v
        else vals[srv SUBSEP cfg SUBSEP p[1]] = vals[srv SUBSEP cfg SUBSEP p[1]] " " v
    }
}
END {
    printf "%-8s %-18s %3s %10s %8s %10s %9s %9s %6s %6s %4s\n", "server", "config", "n", "msgs_per_s", "ratio", "srv_us/msg", "p50_us", "p99_us", "srvcpu", "clicpu", "err"
    for (ci = 1; ci <= nc; ci++) {
        cfg = cfgs[ci]
        if (cfg ~ /^idle/) continue
        r = (ref != "" && (ref, cfg) in seen) ? med(ref SUBSEP cfg SUBSEP "msgs_per_s") : ""
        for (si = 1; si <= ns; si++) {
            srv = srvs[si]
            if (!((srv, cfg) in seen)) continue
            m = med(srv SUBSEP cfg SUBSEP "msgs_per_s")
            ratio = (r != "" && r > 0) ? sprintf("%.3f", m / r) : "-"
            printf "%-8s %-18s %3d %10.0f %8s %10.2f %9.1f %9.1f %5s%% %5s%% %4d\n", srv, cfg, cnt[srv, cfg], m, ratio,
                med(srv SUBSEP cfg SUBSEP "srv_us_per_msg"), med(srv SUBSEP cfg SUBSEP "p50_us"),
                med(srv SUBSEP cfg SUBSEP "p99_us"), med(srv SUBSEP cfg SUBSEP "srv_cpu"),
                med(srv SUBSEP cfg SUBSEP "cli_cpu"), err[srv, cfg]
        }
    }
    for (ci = 1; ci <= nc; ci++) {
        cfg = cfgs[ci]
        if (cfg !~ /^idle/) continue
        printf "\n%-8s %-18s %3s %14s %8s %8s %4s\n", "server", "config", "n", "bytes_per_conn", "held", "dropped", "err"
        for (si = 1; si <= ns; si++) {
            srv = srvs[si]
            if (!((srv, cfg) in seen)) continue
            printf "%-8s %-18s %3d %14.0f %8.0f %8.0f %4d\n", srv, cfg, cnt[srv, cfg],
                med(srv SUBSEP cfg SUBSEP "bytes_per_conn"), med(srv SUBSEP cfg SUBSEP "held"),
                med(srv SUBSEP cfg SUBSEP "dropped"), err[srv, cfg]
        }
    }
}' "$RES"
echo "# raw results: $RES (logs in $OUT)"
exit $FAILED
