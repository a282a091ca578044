#!/usr/bin/env bash
# Prints how many tests ran, passed, failed and were skipped (with the reasons) from the logs
# of `cargo test` (libtest) and `pytest -rs` that scripts/test.sh keeps under target/.
set -euo pipefail
cargo_log="${1:-target/cargo-test.log}"
pytest_log="${2:-target/pytest.log}"
awk '
    /^test result: / {
        for (i = 1; i <= NF; i++) {
            if ($(i+1) ~ /^passed/) p += $i
            if ($(i+1) ~ /^failed/) f += $i
            if ($(i+1) ~ /^ignored/) g += $i
        }
        bins++
    }
    / \.\.\. ignored/ {
        line = $0; sub(/^test /, "", line); ignored[++n] = line
    }
    END {
        printf "Rust (libtest, %d test binaries): %d passed, %d failed, %d ignored\n", bins, p, f, g
        for (i = 1; i <= n; i++) printf "  ignored: %s\n", ignored[i]
    }
' "$cargo_log"
if [ -f "$pytest_log" ]; then
    summary=$(grep -E "^=*.* (passed|failed|skipped|error)" "$pytest_log" | tail -1 | sed 's/=//g; s/^ *//; s/ *$//')
    echo "Python (pytest): ${summary:-no summary line found}"
    grep -E "^SKIPPED" "$pytest_log" | sed 's/^/  /' || true
fi
