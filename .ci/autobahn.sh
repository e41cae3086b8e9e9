#!/usr/bin/env bash
# Autobahn|Testsuite conformance gate for imgate.
#
# Usage: bash .ci/autobahn.sh URL OUTDIR [CASES]
#   URL     WebSocket echo endpoint of an already-running server, e.g. ws://127.0.0.1:9001/echo
#   OUTDIR  where the spec, the wstest log and the reports (index.json, HTML) are written
#   CASES   JSON list of case patterns (default: every case of 1-10; there is no 8.*, and
#           12.*/13.* need permessage-deflate)
#
# Exit status: 0 all cases OK/INFORMATIONAL; 1 some case failed (or is missing from the report);
#              2 usage or setup error; 124 the overall time bound was hit.
#
# Environment (all optional):
#   AUTOBAHN_HOME     cache for the Python 2.7 venv   (default ~/.cache/imgate-autobahn)
#   AUTOBAHN_PY27     CPython 2.7 interpreter          (default $(pyenv root)/versions/2.7.18/bin/python)
#   AUTOBAHN_PYTHON3  Python 3 used for setup + gate   (default python3)
#   AUTOBAHN_TIMEOUT  overall bound in seconds, install included (default 900)
#
# wstest (Autobahn|Testsuite) is Python 2 only, so the script builds and caches its own
# Python 2.7 virtualenv; see shared/conformance/README.md for why these exact pins.
set -euo pipefail

DEFAULT_CASES='["1.*","2.*","3.*","4.*","5.*","6.*","7.*","9.*","10.*"]'
AGENT=imgate

if [[ $# -lt 2 || $# -gt 3 ]]; then
    sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
fi

# --- overall time bound -----------------------------------------------------------------
# Re-run this script under `timeout`. timeout(1) puts us in a process group of our own and
# signals that whole group when the bound is hit, so wstest and pip die with us. Being a
# separate group, it would miss a signal aimed at the caller's group (CI cancelling its
# job), so TERM/INT/HUP are forwarded to it explicitly (it passes them on to the group).
if [[ -z "${_IMGATE_AUTOBAHN_BOUNDED:-}" ]]; then
    export _IMGATE_AUTOBAHN_BOUNDED=1
    limit=${AUTOBAHN_TIMEOUT:-900}
    timeout --kill-after=20 "$limit" bash "$0" "$@" &
    pid=$!
    signalled=""
    trap 'signalled=1; kill -TERM "$pid" 2>/dev/null || true' TERM INT HUP
    rc=0
    wait "$pid" || rc=$?
    # A trapped signal makes `wait` return early: wait again for the group to wind down.
    while kill -0 "$pid" 2>/dev/null; do rc=0; wait "$pid" || rc=$?; done
    if [[ -n $signalled ]]; then
        echo "autobahn: interrupted" >&2
        exit 143
    elif [[ $rc -eq 124 || $rc -eq 137 ]]; then
        echo "autobahn: TIMED OUT after ${limit}s" >&2
        exit 124
    fi
    exit "$rc"
fi

URL=$1
OUTDIR=$2
CASES=${3:-$DEFAULT_CASES}

PY3=${AUTOBAHN_PYTHON3:-python3}
AUTOBAHN_HOME=${AUTOBAHN_HOME:-$HOME/.cache/imgate-autobahn}
if [[ -z "${AUTOBAHN_PY27:-}" ]]; then
    pyroot=$(pyenv root 2>/dev/null || echo "${PYENV_ROOT:-$HOME/.pyenv}")
    AUTOBAHN_PY27=$pyroot/versions/2.7.18/bin/python
fi
VENV=$AUTOBAHN_HOME/venv
VENV_TOOL=$AUTOBAHN_HOME/virtualenv-pkg   # private install of virtualenv (run by Python 3)
STAMP=$VENV/.imgate-autobahn-stamp

log() { echo "autobahn: $*" >&2; }
die() { log "ERROR: $*"; exit 2; }

# A Python 3 PYTHONPATH/PYTHONHOME from the caller must not leak into the Python 2 venv.
unset PYTHONPATH PYTHONHOME
# Quiet, non-interactive pip (the last two silence the root-user and Python 2 EOL notices).
export PIP_NO_INPUT=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore PIP_NO_PYTHON_VERSION_WARNING=1

[[ -x "$AUTOBAHN_PY27" ]] || die "Python 2.7 not found at $AUTOBAHN_PY27 (set AUTOBAHN_PY27)"
command -v "$PY3" >/dev/null || die "$PY3 not found (set AUTOBAHN_PYTHON3)"

# --- pinned environment -----------------------------------------------------------------
# The last Python-2-compatible set (mirrors shared/conformance/autobahn-py27-requirements.txt
# and the requirements.txt inside autobahntestsuite 25.10.1, whose package metadata omits it).
VIRTUALENV_PIN=virtualenv==20.21.1   # last virtualenv that can still create a 2.7 env
TESTSUITE_PIN=autobahntestsuite==25.10.1
REQUIREMENTS='setuptools==44.0.0
txaio==2.1.0
incremental==16.10.1
pyOpenSSL==19.1.0
cryptography==3.3.2
Twisted==19.10.0
zope.interface==4.6.0
jinja2==2.11.3
markupsafe==1.1.1
Werkzeug==1.0.1
klein==17.10.0
service_identity==18.1.0
unittest2==1.1.0
six==1.16.0
autobahn[twisted,accelerate]==0.10.9
# transitive dependencies, frozen from a working install (pip freeze) for repeatability
attrs==21.4.0
Automat==22.10.0
cffi==1.15.1
constantly==15.1.0
enum34==1.1.10
hyperlink==21.0.0
idna==2.10
ipaddress==1.0.23
linecache2==1.0.0
pyasn1==0.5.1
pyasn1-modules==0.3.0
pycparser==2.21
PyHamcrest==1.10.1
traceback2==1.4.0
typing==3.10.0.0
ujson==2.0.3
wsaccel==0.6.6'
# The stamp records what the venv was built from; any change of pins/interpreter rebuilds it.
WANT_STAMP=$(printf '%s\n' "$AUTOBAHN_PY27" "$VIRTUALENV_PIN" "$TESTSUITE_PIN" "$REQUIREMENTS" | sha256sum | cut -d' ' -f1)

venv_ok() {
    [[ -f "$STAMP" && "$(cat "$STAMP")" == "$WANT_STAMP" && -x "$VENV/bin/wstest" ]] &&
        "$VENV/bin/python" -c 'import autobahntestsuite.fuzzing' >/dev/null 2>&1
}

install_venv() {
    local t0=$SECONDS
    log "installing Autobahn|Testsuite into $VENV (one-time, cached)"
    rm -rf "$VENV" "$VENV_TOOL"
    "$PY3" -m pip install --quiet --target "$VENV_TOOL" "$VIRTUALENV_PIN"
    # --no-periodic-update: no background self-update of virtualenv's embedded wheels.
    PYTHONPATH=$VENV_TOOL "$PY3" -m virtualenv --quiet --no-periodic-update \
        --app-data "$AUTOBAHN_HOME/app-data" -p "$AUTOBAHN_PY27" "$VENV"
    printf '%s\n' "$REQUIREMENTS" >"$AUTOBAHN_HOME/requirements.txt"
    "$VENV/bin/pip" install --quiet -r "$AUTOBAHN_HOME/requirements.txt"
    "$VENV/bin/pip" install --quiet --no-deps "$TESTSUITE_PIN"
    "$VENV/bin/python" -c 'import autobahntestsuite.fuzzing' ||
        die "autobahntestsuite installed but does not import"
    echo "$WANT_STAMP" >"$STAMP"   # written last: an interrupted install is redone next time
    log "install done in $((SECONDS - t0))s"
}

mkdir -p "$AUTOBAHN_HOME"
# Serialise concurrent runs that share the cache while checking/building the venv.
exec 9>"$AUTOBAHN_HOME/.lock"
flock 9
# (not `venv_ok || install_venv`: set -e is ignored inside a function run as part of ||)
if ! venv_ok; then install_venv; fi
exec 9>&-   # release the lock

# --- spec ------------------------------------------------------------------------------
mkdir -p "$OUTDIR"
OUTDIR=$(cd "$OUTDIR" && pwd)
SPEC=$OUTDIR/fuzzingclient.json
rm -f "$OUTDIR/index.json" "$OUTDIR/expected-cases.json"   # never gate on a stale report

"$PY3" - "$URL" "$OUTDIR" "$CASES" "$AGENT" "$SPEC" <<'EOF' || exit 2
import json, socket, sys
from urllib.parse import urlsplit
url, outdir, cases, agent, spec_path = sys.argv[1:]
try:
    cases = json.loads(cases)
    assert isinstance(cases, list) and cases and all(isinstance(c, str) for c in cases)
except Exception:
    sys.exit("autobahn: ERROR: CASES must be a non-empty JSON list of strings, got %r" % cases)
u = urlsplit(url)
if u.scheme not in ("ws", "wss") or not u.hostname:
    sys.exit("autobahn: ERROR: URL must be ws://HOST:PORT/PATH or wss://..., got %r" % url)
port = u.port or (443 if u.scheme == "wss" else 80)
# Fail fast and clearly if nothing listens: wstest would just write an empty report.
try:
    socket.create_connection((u.hostname, port), timeout=5).close()
except OSError as e:
    sys.exit("autobahn: ERROR: cannot connect to %s:%s (%s); is the server running?" % (u.hostname, port, e))
spec = {
    "options": {"failByDrop": False},  # wstest's own default ("spec conformance")
    "outdir": outdir,
    "servers": [{"agent": agent, "url": url}],
    "cases": cases,
    "exclude-cases": [],
    "exclude-agent-cases": {},
}
with open(spec_path, "w") as f:
    json.dump(spec, f, indent=2)
EOF

# Ask the suite itself which case ids the patterns expand to, so that a run cut short
# (server crash: wstest then writes a partial report and still exits 0) fails the gate.
"$VENV/bin/python" - "$SPEC" "$OUTDIR/expected-cases.json" <<'EOF' || die "could not expand CASES"
import json, sys
from autobahntestsuite.case import Cases, CaseSetname, CaseBasename, CaseCategories, CaseSubCategories
from autobahntestsuite.caseset import CaseSet
spec = json.load(open(sys.argv[1]))
cs = CaseSet(CaseSetname, CaseBasename, Cases, CaseCategories, CaseSubCategories)
json.dump(cs.parseSpecCases(spec), open(sys.argv[2], "w"))
EOF
[[ $(cat "$OUTDIR/expected-cases.json") != "[]" ]] || die "CASES $CASES match no test case"

# --- run --------------------------------------------------------------------------------
log "running wstest fuzzingclient against $URL (cases $CASES), log: $OUTDIR/wstest.log"
t0=$SECONDS
# wstest runs in OUTDIR so any stray files it writes stay out of the work tree.
(cd "$OUTDIR" && "$VENV/bin/wstest" -m fuzzingclient -s "$SPEC") >"$OUTDIR/wstest.log" 2>&1 || {
    tail -n 30 "$OUTDIR/wstest.log" >&2
    die "wstest exited non-zero"
}
log "wstest finished in $((SECONDS - t0))s"

# --- gate -------------------------------------------------------------------------------
# wstest exits 0 even when cases fail: the verdict comes from index.json only.
exec "$PY3" - "$OUTDIR" "$AGENT" <<'EOF'
import json, os, sys
from collections import Counter

outdir, agent = sys.argv[1:]
GOOD = {"OK", "INFORMATIONAL"}
index_path = os.path.join(outdir, "index.json")
try:
    with open(index_path) as f:
        results = json.load(f).get(agent, {})
except (OSError, ValueError) as e:
    sys.exit("autobahn: ERROR: no usable report at %s (%s)" % (index_path, e))
with open(os.path.join(outdir, "expected-cases.json")) as f:
    expected = json.load(f)

def key(case_id):
    return tuple(int(p) for p in case_id.split("."))

# Table: how many cases got each behavior (data phase) and behaviorClose (closing handshake).
beh = Counter(r.get("behavior", "?") for r in results.values())
close = Counter(r.get("behaviorClose", "?") for r in results.values())
print("\nAutobahn|Testsuite results for agent %r: %d of %d expected cases reported"
      % (agent, len(results), len(expected)))
print("  %-16s %9s %14s" % ("RESULT", "behavior", "behaviorClose"))
for name in sorted(set(beh) | set(close), key=lambda n: (n not in GOOD, n)):
    print("  %-16s %9d %14d" % (name, beh[name], close[name]))

bad = []
for cid in sorted(results, key=key):
    r = results[cid]
    if r.get("behavior") in GOOD and r.get("behaviorClose") in GOOD:
        continue
    # Say why, from the per-case report: the server's close code/reason is usually the
    # telling part (the "result" text is often generic, e.g. a timeout message).
    detail = "close=%s" % r.get("remoteCloseCode")
    try:
        with open(os.path.join(outdir, r["reportfile"])) as f:
            rep = json.load(f)
        if rep.get("remoteCloseReason"):
            detail += " %r" % rep["remoteCloseReason"]
        detail += "; " + " ".join(rep.get("result", "").split())
    except (OSError, ValueError, KeyError):
        pass
    if len(detail) > 160:
        detail = detail[:157] + "..."
    bad.append("  %-8s behavior=%-13s behaviorClose=%-13s %s"
               % (cid, r.get("behavior"), r.get("behaviorClose"), detail))
missing = sorted(set(expected) - set(results), key=key)

if bad:
    print("\nCases not OK/INFORMATIONAL (details: %s/%s_case_*.html, index.html):" % (outdir, agent))
    print("\n".join(bad))
if missing:
    print("\n%d cases missing from the report (server died? see %s/wstest.log): %s%s"
          % (len(missing), outdir, " ".join(missing[:40]), " ..." if len(missing) > 40 else ""))
failed = len(bad) + len(missing)
print("\nautobahn: %d passed, %d failed" % (len(expected) - failed, failed))
sys.exit(1 if failed or not expected else 0)
EOF
