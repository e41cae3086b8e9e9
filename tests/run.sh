#!/usr/bin/env bash
# Runs every test on a fresh machine: the unit tests of the sans-IO parts (debug build, with
# debug assertions), the loopback integration tests against the release binary, then the
# interop tests with Python's `websockets` and `protobuf` (installed into a private
# virtualenv on first use).
set -euo pipefail
cd "$(dirname "$0")/.."

cargo test --lib
cargo build --release --bins
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
