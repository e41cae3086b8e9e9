#!/usr/bin/env bash
# Runs every test on a fresh machine: the unit tests of the sans-IO parts and of the load
# generator's frame reader and verifier (debug build, with debug assertions), the loopback
# integration tests against the release binary, the interop tests with Python's `websockets`
# and `protobuf` (installed into a private virtualenv on first use), and the web demo's
# end-to-end test in Debian's Chromium driven by playwright-core (Chromium installed with
# apt-get, playwright-core with npm, on first use). strace (for the durability tests) and
# redis-server (for the Redis store's tests) are installed with apt-get on first use too.
# Screenshots of the browser test land in target/screenshots/.
set -euo pipefail
cd "$(dirname "$0")/.."

# The experiment BENCHMARKS.md quotes (relay with a store that writes nothing) must still apply.
if command -v git >/dev/null 2>&1 && [ -d .git ]; then
    git apply --check bench/no-store.patch
fi

# tests/durability.rs watches the server's fsyncs with strace; tests/redis_store.rs starts its
# own redis-server processes (Debian's, 7.0).
missing=""
command -v strace >/dev/null 2>&1 || missing="$missing strace"
command -v redis-server >/dev/null 2>&1 || missing="$missing redis-server"
if [ -n "$missing" ]; then
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    # shellcheck disable=SC2086
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq $missing >/dev/null
fi

cargo test --lib
# The binaries' unit tests: the server's and imgate-bench's (bench/imgate-bench, a workspace
# member of its own).
cargo test --workspace --bins
# tests/bench.rs runs target/release/imgate-bench, which `cargo test` does not build: it is
# another package's binary.
cargo build --release --workspace --bins
cargo test --release --test '*'

venv=${IMGATE_PY_VENV:-target/py-venv}
stamp=$venv/.requirements
if ! cmp -s tests/python/requirements.txt "$stamp" 2>/dev/null; then
    rm -rf "$venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check -r tests/python/requirements.txt
    cp tests/python/requirements.txt "$stamp"
fi
IMGATE_BIN=$PWD/target/release/imgate "$venv/bin/python" -m pytest -q -p no:cacheprovider tests/python

if ! command -v chromium >/dev/null 2>&1; then
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq chromium >/dev/null
fi
if ! cmp -s tests/browser/package-lock.json tests/browser/node_modules/.imgate-stamp 2>/dev/null; then
    npm ci --prefix tests/browser --no-audit --no-fund --loglevel=error
    cp tests/browser/package-lock.json tests/browser/node_modules/.imgate-stamp
fi
IMGATE_BIN=$PWD/target/release/imgate IMGATE_SCREENSHOTS=$PWD/target/screenshots \
    node --test --test-reporter=spec tests/browser/demo.test.mjs
