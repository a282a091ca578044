//! What a sandbox has used: [`Metrics`], as [`Sandbox::metrics`](crate::Sandbox::metrics)
//! reports it, and [`CpuClock`], the thread CPU clock the tiers measure guest calls with.
//!
//! The counters belong to a handle in this process: they start at zero when the handle is
//! created or resumed from a snapshot in a new handle (a snapshot does not carry them), and
//! accumulate across that handle's standby/resume cycles. What the store holds for a
//! sandbox is the store's to say: see [`LocalStore::sandbox_usage`](crate::LocalStore::sandbox_usage).

use std::time::Duration;

/// Resources a sandbox handle has used, and the memory it holds now.
///
/// Returned by [`Sandbox::metrics`](crate::Sandbox::metrics), which never wakes a sandbox in
/// standby: one there reports `memory_bytes == 0` and the counters it kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Metrics {
    /// CPU time the guest has run on host threads (user + system) since the handle was
    /// created or resumed: the WASI tier counts the calls into the guest, the KVM tier the
    /// vCPU threads.
    pub cpu_time: Duration,
    /// Bytes of guest memory in use now: the WASI tier's linear memory size, the KVM tier's
    /// guest RAM pages resident in this process (those the guest touched since boot or
    /// resume). Zero in standby.
    pub memory_bytes: u64,
    /// The most guest memory the sandbox may use, in bytes: the WASI tier's memory cap, the
    /// KVM tier's RAM size.
    pub memory_limit_bytes: u64,
    /// Bytes the guest wrote to its filesystem since the handle was created or resumed: the
    /// WASI tier counts file writes (the guest's `fd_write`/`fd_pwrite` on files and the files
    /// API's writes), the KVM tier the bytes written through its block device (which includes
    /// the guest filesystem's own metadata and journal).
    pub disk_bytes_written: u64,
}

/// The calling thread's CPU clock (`CLOCK_THREAD_CPUTIME_ID`): what a tier reads around the
/// calls it runs on its own thread.
#[derive(Debug, Clone, Copy)]
pub struct CpuClock;

impl CpuClock {
    /// CPU time the calling thread has used so far (user + system).
    pub fn thread_now() -> Duration {
        let t = rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
        Duration::new(
            t.tv_sec.max(0) as u64,
            t.tv_nsec.clamp(0, 999_999_999) as u32,
        )
    }

    /// Runs `f` and adds the CPU time the calling thread spent in it to `total`.
    pub fn count<T>(total: &mut Duration, f: impl FnOnce() -> T) -> T {
        let start = Self::thread_now();
        let r = f();
        *total += Self::thread_now().saturating_sub(start);
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thread_cpu_time_grows_with_work() {
        let mut total = Duration::ZERO;
        let sum = CpuClock::count(&mut total, || {
            let mut x = 0u64;
            let end = CpuClock::thread_now() + Duration::from_millis(20);
            while CpuClock::thread_now() < end {
                x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(7));
            }
            x
        });
        std::hint::black_box(sum);
        assert!(total >= Duration::from_millis(20), "{total:?}");
    }
}
