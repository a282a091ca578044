#!/usr/bin/env bash
# Installs the Python module the way users do (pip install ./bindings-python, which builds the
# extension with maturin), with pytest, pytest-timeout (every test has a bounded run time) and
# mypy, into a venv of its own: target/python-venv. The agent-framework adapters' extras
# (smolagents, deepagents, openai-agents, from PyPI) come with it: their tests drive the real
# packages.
# Sourced by test.sh and bench.sh after setup.sh; sets VENV.
set -euo pipefail
VENV="target/python-venv"
echo "==> Python module: pip install ./bindings-python (with pytest, pytest-timeout and mypy) into $VENV"
if [ ! -x "$VENV/bin/python" ]; then
    "${DORMANT_PYTHON:-python3}" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "pytest>=8" "pytest-timeout>=2.3" "mypy>=1.10"
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "./bindings-python[adapters]"
