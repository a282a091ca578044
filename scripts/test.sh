#!/usr/bin/env bash
# Every check: formatting, lints, and all tests of the workspace (unit, integration, Python
# sessions, crash safety). Installs and builds what it needs first.
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
cargo test --release --workspace
