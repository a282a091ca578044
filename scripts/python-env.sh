#!/usr/bin/env bash
# Installs the Python module the way users do (pip install ./bindings-python, which builds the
# extension with maturin), with its extras: `mcp` (the MCP server, dormant-mcp, and the SDK whose
# client its tests and benchmark drive), `adapters` (smolagents, deepagents, openai-agents, from
# PyPI: the adapters' tests drive the real packages) and `ray` (dormant.ray, sandboxes as Ray
# actors: its tests run a two-node Ray cluster on this machine); pytest, pytest-timeout (every
# test has a bounded run time) and mypy, into a venv of its own: target/python-venv.
# Sourced by test.sh and bench.sh after setup.sh; sets VENV.
set -euo pipefail
VENV="target/python-venv"
echo "==> Python module: pip install './bindings-python[mcp,adapters,ray]' (with pytest, pytest-timeout and mypy) into $VENV"
if [ ! -x "$VENV/bin/python" ]; then
    "${DORMANT_PYTHON:-python3}" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "pytest>=8" "pytest-timeout>=2.3" "mypy>=1.10"
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "./bindings-python[mcp,adapters,ray]"
