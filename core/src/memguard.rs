//! Guest memory whose pages a filesystem may fail to supply, and what happens then.
//!
//! A live sandbox's memory is a copy-on-write mapping of its snapshot files. When the kernel
//! cannot supply a page of such a mapping (an I/O error, a file truncated behind our back, a
//! filesystem that must allocate even to read a hole and is full), the thread touching it gets
//! `SIGBUS`, whose default action ends the whole host process: every sandbox in it, or the
//! user's Python interpreter. Wasmtime handles no `SIGBUS` on Linux, and a device thread of the
//! VMM is ordinary host code.
//!
//! This module turns such a fault into an error of the one sandbox whose memory faulted. Guest
//! memory regions are registered ([`GuardedMemory::new`]); a process-wide `SIGBUS` handler,
//! installed with the first registration, looks the faulting address up in a fixed table of
//! regions (no locks, no allocation: it runs in a signal handler), replaces the page that could
//! not be read with a private zero page so that the faulting access can complete, and records
//! the fault in the region. The sandbox checks [`GuardedMemory::fault`] after every call into
//! the guest and before committing a checkpoint: a faulted sandbox is poisoned (its memory is
//! no longer what its snapshot says) and never checkpointed. Faults at any other address go to
//! the handler that was installed before ours (or the default action).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Once, OnceLock};

/// Most regions guarded at once (a live sandbox holds one or two). Past it, regions are not
/// guarded (logged), and a fault there ends the process as it would without this module.
const SLOTS: usize = 4096;

struct Slot {
    claimed: AtomicBool,
    start: AtomicUsize,
    len: AtomicUsize,
    /// Signal handlers running on this slot right now (unregistering waits for them).
    busy: AtomicUsize,
    faults: AtomicUsize,
    first_fault: AtomicUsize,
    /// Incremented at every registration, so that a [`FaultProbe`] never reads a later
    /// region's faults.
    generation: AtomicUsize,
}

#[allow(clippy::declare_interior_mutable_const)] // used only to initialise the table below
const EMPTY: Slot = Slot {
    claimed: AtomicBool::new(false),
    start: AtomicUsize::new(0),
    len: AtomicUsize::new(0),
    busy: AtomicUsize::new(0),
    faults: AtomicUsize::new(0),
    first_fault: AtomicUsize::new(0),
    generation: AtomicUsize::new(0),
};

static TABLE: [Slot; SLOTS] = [EMPTY; SLOTS];
static INSTALL: Once = Once::new();
/// The `SIGBUS` action before ours, to which faults outside guarded memory go.
static PREVIOUS: OnceLock<libc::sigaction> = OnceLock::new();
const PAGE: usize = crate::memimage::PAGE;

/// A registered region of guest memory: a `SIGBUS` inside it becomes a recorded fault of this
/// region instead of the end of the process. Unregistered when dropped (before the memory is
/// unmapped: keep it declared before the mapping's owner in a struct).
#[derive(Debug)]
pub struct GuardedMemory {
    slot: Option<usize>,
}

impl GuardedMemory {
    /// Guards `len` bytes from `base` (page-aligned). If the table is full the region is not
    /// guarded (a warning is logged) and [`Self::fault`] never reports anything.
    pub fn new(base: *const u8, len: usize) -> GuardedMemory {
        INSTALL.call_once(install);
        let start = base as usize;
        if start == 0 || len == 0 {
            return GuardedMemory { slot: None };
        }
        for (i, s) in TABLE.iter().enumerate() {
            if s.claimed
                .compare_exchange(false, true, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
            {
                s.generation.fetch_add(1, Ordering::AcqRel);
                s.faults.store(0, Ordering::Relaxed);
                s.first_fault.store(0, Ordering::Relaxed);
                s.len.store(len, Ordering::Relaxed);
                s.start.store(start, Ordering::Release);
                return GuardedMemory { slot: Some(i) };
            }
        }
        tracing::warn!(
            "more than {SLOTS} guest memory regions at once: this one is not guarded against \
             SIGBUS"
        );
        GuardedMemory { slot: None }
    }

    /// The first address in this region the filesystem could not supply since it was
    /// registered (its page now reads as zeros), if any.
    pub fn fault(&self) -> Option<usize> {
        let s = &TABLE[self.slot?];
        (s.faults.load(Ordering::Acquire) > 0).then(|| s.first_fault.load(Ordering::Acquire))
    }

    /// A handle that reads this region's faults from elsewhere (e.g. the owner of a machine
    /// whose RAM lives on its vCPU thread) without keeping the region registered.
    pub fn probe(&self) -> FaultProbe {
        FaultProbe {
            slot: self
                .slot
                .map(|i| (i, TABLE[i].generation.load(Ordering::Acquire))),
        }
    }

    /// The error a sandbox reports (and is poisoned with) after a fault in its memory.
    pub fn fault_message(addr: usize) -> String {
        format!(
            "a page of the sandbox's memory (host address {addr:#x}) could not be read from its \
             snapshot files (I/O error, a file truncated or removed by hand, or a full filesystem \
             that had to allocate it); the live memory no longer matches any snapshot"
        )
    }
}

/// Reads the faults of a [`GuardedMemory`] (see [`GuardedMemory::probe`]); after the region is
/// unregistered it still reports what happened while it was.
#[derive(Debug, Clone, Copy)]
pub struct FaultProbe {
    slot: Option<(usize, usize)>,
}

impl FaultProbe {
    /// As [`GuardedMemory::fault`].
    pub fn fault(&self) -> Option<usize> {
        let (i, generation) = self.slot?;
        let s = &TABLE[i];
        let faulted = s.faults.load(Ordering::Acquire) > 0;
        let addr = s.first_fault.load(Ordering::Acquire);
        // Re-read: the slot may have been claimed again meanwhile.
        (faulted && s.generation.load(Ordering::Acquire) == generation).then_some(addr)
    }
}

impl Drop for GuardedMemory {
    fn drop(&mut self) {
        let Some(i) = self.slot else { return };
        let s = &TABLE[i];
        s.start.store(0, Ordering::Release);
        // A handler that matched this slot before the store may still be replacing a page.
        while s.busy.load(Ordering::Acquire) != 0 {
            std::hint::spin_loop();
        }
        s.claimed.store(false, Ordering::Release);
    }
}

fn install() {
    // SAFETY: a zeroed sigaction is a valid "no handler" value for the out-parameter, and
    // `sigaction` with a null new action only reads the current one.
    let mut prev: libc::sigaction = unsafe { std::mem::zeroed() };
    // SAFETY: the action is fully initialised: our handler (SA_SIGINFO form), an empty mask,
    // and flags that run it on the alternate stack when there is one and let it re-enter.
    let ok = unsafe {
        let mut act: libc::sigaction = std::mem::zeroed();
        act.sa_sigaction = on_sigbus as *const () as usize;
        act.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK | libc::SA_NODEFER;
        libc::sigemptyset(&mut act.sa_mask);
        libc::sigaction(libc::SIGBUS, &act, &mut prev) == 0
    };
    if ok {
        let _ = PREVIOUS.set(prev);
    } else {
        tracing::warn!(
            error = %std::io::Error::last_os_error(),
            "could not install the SIGBUS handler: guest memory faults will end the process"
        );
    }
}

/// Replaces the page at `addr` with a private zero page if `addr` lies in a registered region.
fn recover(addr: usize) -> bool {
    for s in &TABLE {
        let start = s.start.load(Ordering::Acquire);
        if start == 0 || addr < start || addr - start >= s.len.load(Ordering::Acquire) {
            continue;
        }
        s.busy.fetch_add(1, Ordering::AcqRel);
        let mut fixed = false;
        if s.start.load(Ordering::Acquire) == start {
            let page = addr & !(PAGE - 1);
            // SAFETY: the page lies in a region its owner registered as guest memory and has
            // not unregistered (checked after raising `busy`, which unregistering waits for);
            // replacing it with a private anonymous page only changes what that sandbox's
            // memory reads, and the sandbox is poisoned because of it. mmap is a plain system
            // call, safe to make in a signal handler.
            let r = unsafe {
                libc::mmap(
                    page as *mut libc::c_void,
                    PAGE,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                    -1,
                    0,
                )
            };
            if r != libc::MAP_FAILED {
                let _ = s.first_fault.compare_exchange(
                    0,
                    addr.max(1),
                    Ordering::AcqRel,
                    Ordering::Relaxed,
                );
                s.faults.fetch_add(1, Ordering::AcqRel);
                fixed = true;
            }
        }
        s.busy.fetch_sub(1, Ordering::AcqRel);
        return fixed;
    }
    false
}

extern "C" fn on_sigbus(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo for an SA_SIGINFO handler; `si_code > 0` means
    // a fault raised by the kernel, whose `si_addr` is the faulting address.
    let (code, addr) = unsafe { ((*info).si_code, (*info).si_addr() as usize) };
    // SAFETY: errno is thread-local; saved and restored around the system calls made here.
    let errno = unsafe { *libc::__errno_location() };
    let handled = code > 0 && recover(addr);
    // SAFETY: as above.
    unsafe { *libc::__errno_location() = errno };
    if handled {
        return;
    }
    forward(sig, info, ctx);
}

/// Hands a fault that is not ours to the action installed before ours.
fn forward(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    let prev = PREVIOUS.get();
    match prev {
        Some(p) if p.sa_sigaction != libc::SIG_DFL && p.sa_sigaction != libc::SIG_IGN => {
            if p.sa_flags & libc::SA_SIGINFO != 0 {
                // SAFETY: the previous handler was installed with SA_SIGINFO, so it has this
                // signature; we call it as the kernel would have.
                let f: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
                    unsafe { std::mem::transmute(p.sa_sigaction) };
                f(sig, info, ctx);
            } else {
                // SAFETY: a handler installed without SA_SIGINFO takes only the signal number.
                let f: extern "C" fn(libc::c_int) = unsafe { std::mem::transmute(p.sa_sigaction) };
                f(sig);
            }
        }
        _ => {
            // The default action: restore it and let the signal end the process (a fault
            // raised by the kernel repeats when the instruction runs again; one sent by a
            // process is raised again).
            // SAFETY: resetting a disposition to SIG_DFL and raising a signal are
            // async-signal-safe; `info` is valid as in `on_sigbus`.
            unsafe {
                libc::signal(sig, libc::SIG_DFL);
                if (*info).si_code <= 0 {
                    libc::raise(sig);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// A file mapped and then truncated: reading past its new end is a SIGBUS, which the
    /// guard turns into a recorded fault (the page reads as zeros) instead of killing the
    /// test process.
    #[test]
    fn a_truncated_mapping_is_a_recorded_fault_not_a_crash() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("image");
        let mut f = std::fs::File::create(&path).unwrap();
        f.write_all(&vec![7u8; 4 * PAGE]).unwrap();
        let f = std::fs::File::options()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        // SAFETY: a fresh private mapping of a file this test owns, unmapped below.
        let base = unsafe {
            rustix::mm::mmap(
                std::ptr::null_mut(),
                4 * PAGE,
                rustix::mm::ProtFlags::READ | rustix::mm::ProtFlags::WRITE,
                rustix::mm::MapFlags::PRIVATE,
                &f,
                0,
            )
        }
        .unwrap() as *mut u8;
        let guard = GuardedMemory::new(base, 4 * PAGE);
        // SAFETY: reads inside the live mapping.
        assert_eq!(unsafe { std::ptr::read_volatile(base) }, 7);
        assert!(guard.fault().is_none());
        f.set_len(PAGE as u64).unwrap();
        // SAFETY: inside the mapping; the page past the file's end faults and is replaced.
        let v = unsafe { std::ptr::read_volatile(base.add(2 * PAGE + 5)) };
        assert_eq!(v, 0, "the lost page reads as zeros");
        assert_eq!(guard.fault(), Some(base as usize + 2 * PAGE + 5));
        // SAFETY: page 0 is still backed by the file.
        assert_eq!(unsafe { std::ptr::read_volatile(base) }, 7);
        drop(guard);
        // SAFETY: unmapping the mapping made above.
        unsafe { rustix::mm::munmap(base.cast(), 4 * PAGE).unwrap() };
    }
}
