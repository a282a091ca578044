//! dormant's benchmarks live in `benches/` (run `cargo bench -p dormant-benches`); see the
//! README there for what each group measures.
