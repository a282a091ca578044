//! dormant's benchmarks live in `benches/` (run `cargo bench -p dormant-benches`); see the
//! README there for what each group measures. The end-to-end report (`dormant-bench-report`,
//! run by `scripts/bench.sh`) is in `src/bin/report/`: `main.rs` parses the arguments and runs
//! the scenarios in order over one shared context (`ctx.rs`); each scenario is a module named
//! after what it measures, beside the shared helpers (`stats.rs`, `markdown.rs`, `probe.rs`,
//! `machine.rs`, `workloads.rs`).
