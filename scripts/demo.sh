#!/usr/bin/env bash
# The main job: a data-analysis agent session (cold path vs resume in a new process), and where
# /dev/kvm exists a coding agent's session in a Linux microVM (cold, from a template, and after
# standby resumed in a new process).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/setup.sh
echo
./target/release/dormant demo "$@"
if [ -e /dev/kvm ]; then
    echo
    ./target/release/dormant demo coding
fi
