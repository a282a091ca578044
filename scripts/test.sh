#!/usr/bin/env bash
# Every check: formatting, lints, and all tests of the workspace (unit, integration, Python
# sessions, crash safety, the KVM tier), then the Python module: installed with pip into a
# venv, its stubs checked against it, and its pytest suite. Installs and builds what it needs
# first.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/setup.sh

if [ -e /dev/kvm ]; then
    echo "==> /dev/kvm present"
else
    echo "==> NOTE: no /dev/kvm on this machine: KVM tests report themselves as skipped"
fi

echo "==> cargo fmt --check"
cargo fmt --all -- --check
echo "==> cargo clippy"
cargo clippy --release --workspace --all-targets --quiet -- -D warnings
echo "==> cargo test"
mkdir -p target
cargo test --release --workspace --exclude dormant-python 2>&1 | tee target/cargo-test.log

# The Python module, installed the way users install it, into a venv of its own.
source scripts/python-env.sh
echo "==> Python stubs match the module (mypy stubtest) and type-check"
"$VENV/bin/python" -m mypy.stubtest dormant._native
"$VENV/bin/python" -m mypy --strict bindings-python/python/dormant bindings-python/tests
echo "==> pytest bindings-python/tests"
"$VENV/bin/python" -m pytest -q -rs bindings-python/tests 2>&1 | tee target/pytest.log

echo "==> benchmark suite, smoke run (scripts/bench.sh --quick: checks the suite works, not the numbers)"
./scripts/bench.sh --quick --out target/bench-report-quick.md

echo "==> test summary"
scripts/test-summary.sh target/cargo-test.log target/pytest.log
