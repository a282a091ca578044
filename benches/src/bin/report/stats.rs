//! How the report turns samples into figures: [`Stats`] (median, p90 from 10 samples, p99 from
//! 100), [`time`] around one call, and the units every table uses (`fmt` for durations, `mib`
//! for bytes, `ratio` for "cold ÷ this").

use std::fmt::Write as _;
use std::time::{Duration, Instant};

/// Timings of one measurement: median always, p90 from 10 samples, p99 from 100.
pub struct Stats(Vec<Duration>);

impl Stats {
    pub fn of(mut v: Vec<Duration>) -> Stats {
        v.sort();
        Stats(v)
    }
    pub fn pct(&self, p: f64) -> Duration {
        let i = ((self.0.len() as f64 - 1.0) * p).round() as usize;
        self.0[i.min(self.0.len() - 1)]
    }
    pub fn median(&self) -> Duration {
        self.pct(0.5)
    }
    pub fn cell(&self) -> String {
        let mut s = fmt(self.median());
        if self.0.len() >= 10 {
            let _ = write!(s, " (p90 {}", fmt(self.pct(0.9)));
            if self.0.len() >= 100 {
                let _ = write!(s, ", p99 {}", fmt(self.pct(0.99)));
            }
            s.push(')');
        }
        let _ = write!(s, " n={}", self.0.len());
        s
    }
}

pub fn fmt(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s >= 1.0 {
        format!("{s:.2} s")
    } else if s >= 1e-3 {
        format!("{:.2} ms", s * 1e3)
    } else {
        format!("{:.0} µs", s * 1e6)
    }
}

pub fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1 << 20) as f64)
}

pub fn ratio(a: Duration, b: Duration) -> String {
    format!("{:.0}x", a.as_secs_f64() / b.as_secs_f64().max(1e-9))
}

pub fn time<T>(f: impl FnOnce() -> T) -> (T, Duration) {
    let t = Instant::now();
    let v = f();
    (v, t.elapsed())
}
