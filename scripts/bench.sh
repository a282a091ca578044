#!/usr/bin/env bash
# The benchmark suite: criterion micro-benchmarks, then the end-to-end scenarios through the
# public API, written as one Markdown report (see benches/README.md for what each number is).
#
#   ./scripts/bench.sh                 full run: < 20 min on our 2-core machines
#   ./scripts/bench.sh --quick         smoke run: < 3 min (small sizes, few samples, no Linux boots)
#   ./scripts/bench.sh --out FILE      where the report goes (default target/bench-report.md)
#   ./scripts/bench.sh --scenario NAME one end-to-end scenario alone, no criterion (NAME: its module
#                                      in benches/src/bin/report/, e.g. coding_image)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

main() {
    local quick="" out="target/bench-report.md" only=()
    while [ $# -gt 0 ]; do
        case "$1" in
            --quick) quick="--quick" ;;
            --out) out="$2"; shift ;;
            --scenario) only=(--only "$2"); shift ;;
            *) echo "usage: $0 [--quick] [--out FILE] [--scenario NAME]" >&2; return 2 ;;
        esac
        shift
    done
    source scripts/setup.sh
    source scripts/python-env.sh
    rm -rf target/criterion
    local crit=(--warm-up-time 1 --measurement-time 3)
    local filter=""
    if [ -n "$quick" ]; then
        crit=(--warm-up-time 0.3 --measurement-time 1)
        filter="resume_in_process|first_call_after_resume|kvm_resume_tiny"
    fi
    if [ ${#only[@]} -gt 0 ]; then
        echo "==> end-to-end scenario ${only[1]} alone"
        ./target/release/dormant-bench-report $quick "${only[@]}" --out "$out" \
            --python "$VENV/bin/python" --criterion target/criterion > /dev/null
        echo "==> report: $out"
        return 0
    fi
    echo "==> criterion micro-benchmarks"
    cargo bench --quiet -p dormant-benches --bench wasi --bench kvm -- "${crit[@]}" $filter
    if [ -z "$quick" ]; then
        cargo bench --quiet -p dormant-benches --bench manage -- "${crit[@]}"
    fi
    echo "==> end-to-end scenarios"
    ./target/release/dormant-bench-report $quick --out "$out" --python "$VENV/bin/python" \
        --criterion target/criterion > /dev/null
    echo "==> report: $out"
}
main "$@"; exit $?
