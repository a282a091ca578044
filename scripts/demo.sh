#!/usr/bin/env bash
# The main job: a data-analysis agent session (cold path vs resume in a new process).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/setup.sh
echo
exec ./target/release/dormant demo "$@"
