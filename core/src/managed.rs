//! Sandboxes that manage themselves: auto-standby after an idle period, and transparent wake
//! on the next call.
//!
//! A [`Managed`] sandbox is a thread-safe handle around any tier's [`Sandbox`]. Every call goes
//! through one lock, so calls are serialised and none is lost or run twice. After each call the
//! sandbox is (re)scheduled on a process-wide idle timer: one thread sleeping on a condition
//! variable until the earliest deadline, never polling. When a deadline passes and the sandbox
//! is still idle (no call since, none running), the timer puts it in standby under the same
//! lock; a call that arrives meanwhile waits for the standby to finish, then wakes the sandbox
//! from its snapshot and runs as if it had never slept. A wake passes the sandbox's own grants
//! (the host directories given at create or at the last resume, kept in memory): the snapshot
//! it wakes from grants nothing.
//!
//! A running call holds the lock, so a caller that wants to stop it cannot reach the sandbox:
//! [`Managed::interrupt`] goes through the sandbox's [`Interrupt`] handle, taken when it was
//! wrapped and kept outside the lock. Every tier call is bounded (its deadline) and an
//! interrupted call returns promptly, so the lock is never held past either.
//!
//! # Exposed ports and wake on traffic
//!
//! Where the tier has [`Ports`] (the KVM tier), `Managed::new` installs [`PortWake`] hooks in
//! the sandbox: its listeners then stay open while it sleeps, and a connection that arrives
//! in standby wakes it exactly as a call would (the same resume, counted in
//! [`ManagedStats::wakes`]) before it is served. Opening and closing forwarded connections
//! counts as activity for the idle timer, and a sandbox with forwarded connections open is
//! never put in standby by the timer (it looks again an idle period later). The hooks hold
//! the handle's state weakly, and the forwarder calls them from its own threads, holding none
//! of its locks.
//!
//! # Terminals
//!
//! An attached terminal ([`Managed::attach_terminal`]) is someone at work: a sandbox with one
//! is never put in standby by the timer either (it looks again an idle period later). A
//! standby the caller asks for ends the attachments (the terminal's program runs on in the
//! snapshot; attach again after the wake).
//!
//! A front end that must not name a tier wraps a `Box<dyn Sandbox>` (what a
//! [`Runtime`](crate::Runtime) gives): `Managed<Box<dyn Sandbox>>` has every call of the
//! contract and of its [capabilities](crate::capability), each answering
//! [`Error::Unsupported`](crate::Error::Unsupported) where the tier lacks it.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock, Weak};
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

use crate::error::{Error, Result};
use crate::grants::Grants;
use crate::lifecycle::State;
use crate::metrics::Metrics;
use crate::network::NetworkPolicy;
use crate::network::{PortMapping, PortWake, Ports};
use crate::paths::DirEntry;
use crate::sandbox::{Command, ExecOutput, Execution, Interrupt, Processes, Sandbox};
use crate::snapshot::SnapshotId;
use crate::spec::Tier;
use crate::terminal::{TerminalLink, TerminalSize, Terminals};

/// Default idle time before auto-standby.
pub const DEFAULT_IDLE_STANDBY: Duration = Duration::from_secs(15);

/// Counters a caller can observe.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ManagedStats {
    /// Times the sandbox went to standby because it was idle.
    pub auto_standbys: u64,
    /// Times a call woke the sandbox from standby.
    pub wakes: u64,
}

struct Slot<S> {
    sb: S,
    /// Snapshot to wake from when in standby.
    standby_snapshot: Option<SnapshotId>,
    /// When the last call ended.
    last_activity: Instant,
    /// Whether the sandbox has an entry in the idle timer (at most one at a time).
    scheduled: bool,
    stats: ManagedStats,
}

struct Shared<S> {
    slot: Mutex<Slot<S>>,
    idle: Option<Duration>,
    /// The sandbox's interrupter, reachable while a call holds `slot`.
    interrupter: Option<Arc<dyn Interrupt>>,
    /// When a forwarded connection last opened or closed ([`PortWake::activity`]): kept
    /// outside `slot`, so that forwarding never waits for a running call.
    port_activity: Mutex<Instant>,
}

impl<S: Sandbox + 'static> Shared<S> {
    /// Resumes the sandbox from its standby snapshot if it sleeps: how every call, and a
    /// connection to an exposed port, wakes it.
    fn wake(&self, slot: &mut Slot<S>) -> Result<()> {
        if slot.sb.state() == State::Standby
            && let Some(id) = slot.standby_snapshot.clone()
        {
            slot.sb.resume(&id)?;
            slot.standby_snapshot = None;
            slot.stats.wakes += 1;
        }
        Ok(())
    }

    /// Records activity and makes sure the sandbox has an idle-timer entry.
    fn touch(self: &Arc<Self>, slot: &mut Slot<S>) {
        slot.last_activity = Instant::now();
        if let Some(idle) = self.idle
            && !slot.scheduled
            && slot.sb.state() == State::Running
        {
            slot.scheduled = true;
            let target: Arc<dyn IdleTarget> = self.clone();
            Timer::get().schedule(slot.last_activity + idle, Arc::downgrade(&target));
        }
    }
}

/// The [`PortWake`] hooks a managed sandbox's exposed ports call.
struct PortHooks<S: Sandbox + 'static>(Weak<Shared<S>>);

impl<S: Sandbox + 'static> PortWake for PortHooks<S> {
    fn wake(&self) -> Result<()> {
        let shared = self.0.upgrade().ok_or_else(|| {
            Error::runtime("wake the sandbox for a connection", "the sandbox is gone")
        })?;
        let mut slot = shared.slot.lock();
        shared.wake(&mut slot)?;
        if slot.sb.state() != State::Running {
            return Err(Error::IllegalTransition {
                op: crate::lifecycle::Operation::Resume,
                state: slot.sb.state(),
            });
        }
        shared.touch(&mut slot);
        Ok(())
    }

    fn activity(&self) {
        if let Some(shared) = self.0.upgrade() {
            *shared.port_activity.lock() = Instant::now();
        }
    }
}

/// A sandbox with auto-standby and transparent wake. Cheap to clone (clones share the sandbox).
pub struct Managed<S: Sandbox + 'static> {
    shared: Arc<Shared<S>>,
}

impl<S: Sandbox + 'static> Clone for Managed<S> {
    fn clone(&self) -> Self {
        Managed {
            shared: self.shared.clone(),
        }
    }
}

impl<S: Sandbox + 'static> std::fmt::Debug for Managed<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Managed")
            .field("idle", &self.shared.idle)
            .finish_non_exhaustive()
    }
}

trait IdleTarget: Send + Sync {
    /// The timer's entry for this target is due; returns when to look again, if ever.
    fn on_idle(&self, now: Instant) -> Option<Instant>;
}

impl<S: Sandbox + 'static> IdleTarget for Shared<S> {
    fn on_idle(&self, now: Instant) -> Option<Instant> {
        let idle = self.idle?;
        // A call is running (it holds the lock): look again one idle period from now.
        let Some(mut slot) = self.slot.try_lock() else {
            return Some(now + idle);
        };
        if slot.sb.state() != State::Running {
            slot.scheduled = false;
            return None;
        }
        let last = slot.last_activity.max(*self.port_activity.lock());
        let due = last + idle;
        if due > now {
            return Some(due);
        }
        // Forwarded connections are open, or a terminal is attached: the sandbox serves them.
        if slot.sb.ports().is_ok_and(|p| p.open_connections() > 0)
            || slot
                .sb
                .terminals()
                .is_ok_and(|t| t.attached_terminals() > 0)
        {
            return Some(now + idle);
        }
        slot.scheduled = false;
        match slot.sb.standby() {
            Ok(id) => {
                slot.standby_snapshot = Some(id);
                slot.stats.auto_standbys += 1;
            }
            Err(e) => {
                tracing::warn!(sandbox = slot.sb.id(), error = %e, "auto-standby failed; the sandbox stays running")
            }
        }
        None
    }
}

struct Entry {
    due: Instant,
    seq: u64,
    target: Weak<dyn IdleTarget>,
}

impl PartialEq for Entry {
    fn eq(&self, o: &Self) -> bool {
        (self.due, self.seq) == (o.due, o.seq)
    }
}
impl Eq for Entry {}
impl PartialOrd for Entry {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Entry {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        (self.due, self.seq).cmp(&(o.due, o.seq))
    }
}

/// The process-wide idle timer.
struct Timer {
    heap: Mutex<(BinaryHeap<Reverse<Entry>>, u64)>,
    cv: Condvar,
}

impl Timer {
    fn get() -> &'static Timer {
        static TIMER: OnceLock<&'static Timer> = OnceLock::new();
        TIMER.get_or_init(|| {
            let t: &'static Timer = Box::leak(Box::new(Timer {
                heap: Mutex::new((BinaryHeap::new(), 0)),
                cv: Condvar::new(),
            }));
            std::thread::Builder::new()
                .name("dormant-idle".into())
                .spawn(move || t.run())
                .expect("spawn the idle timer thread");
            t
        })
    }

    fn schedule(&self, due: Instant, target: Weak<dyn IdleTarget>) {
        let mut h = self.heap.lock();
        h.1 += 1;
        let seq = h.1;
        let earliest = h.0.peek().is_none_or(|Reverse(e)| due < e.due);
        h.0.push(Reverse(Entry { due, seq, target }));
        if earliest {
            self.cv.notify_one();
        }
    }

    fn run(&self) {
        let mut h = self.heap.lock();
        loop {
            let now = Instant::now();
            match h.0.peek().map(|Reverse(e)| e.due) {
                None => self.cv.wait(&mut h),
                Some(due) if due > now => {
                    self.cv.wait_until(&mut h, due);
                }
                Some(_) => {
                    let Reverse(e) = h.0.pop().expect("peeked");
                    drop(h);
                    let again = e.target.upgrade().and_then(|t| t.on_idle(now));
                    h = self.heap.lock();
                    if let Some(due) = again {
                        h.1 += 1;
                        let seq = h.1;
                        h.0.push(Reverse(Entry {
                            due,
                            seq,
                            target: e.target,
                        }));
                    }
                }
            }
        }
    }
}

impl<S: Sandbox + 'static> Managed<S> {
    /// Wraps `sb`; with `idle = Some(d)` it goes to standby after `d` without calls (nor
    /// forwarded connections). A sandbox with [`Ports`] gets the hooks that wake it when a
    /// connection arrives while it sleeps (see the module docs).
    pub fn new(sb: S, idle: Option<Duration>) -> Managed<S> {
        let interrupter = sb.interrupter();
        let m = Managed {
            shared: Arc::new(Shared {
                interrupter,
                port_activity: Mutex::new(Instant::now()),
                slot: Mutex::new(Slot {
                    sb,
                    standby_snapshot: None,
                    last_activity: Instant::now(),
                    scheduled: false,
                    stats: ManagedStats::default(),
                }),
                idle,
            }),
        };
        let mut slot = m.shared.slot.lock();
        if let Ok(ports) = slot.sb.ports() {
            ports.set_wake(Some(Arc::new(PortHooks(Arc::downgrade(&m.shared)))));
        }
        m.touch(&mut slot);
        drop(slot);
        m
    }

    /// Records activity and makes sure the sandbox has an idle-timer entry.
    fn touch(&self, slot: &mut Slot<S>) {
        self.shared.touch(slot);
    }

    /// Runs `f` on the sandbox, waking it first if it is in standby. This is how every call
    /// goes; use it for tier-specific calls too.
    pub fn with<T>(&self, f: impl FnOnce(&mut S) -> Result<T>) -> Result<T> {
        let mut slot = self.shared.slot.lock();
        self.shared.wake(&mut slot)?;
        let r = f(&mut slot.sb);
        self.touch(&mut slot);
        r
    }

    /// The sandbox's lifecycle state (standby after an auto-standby until the next call).
    pub fn state(&self) -> State {
        self.shared.slot.lock().sb.state()
    }

    pub fn stats(&self) -> ManagedStats {
        self.shared.slot.lock().stats
    }

    pub fn id(&self) -> String {
        self.shared.slot.lock().sb.id().to_owned()
    }

    pub fn tier(&self) -> Tier {
        self.shared.slot.lock().sb.tier()
    }

    /// Interrupts the call running now on this sandbox, from any thread, without waiting for
    /// its lock (see [`Interrupt::interrupt`]); a no-op for a sandbox without an interrupter.
    pub fn interrupt(&self) {
        if let Some(i) = &self.shared.interrupter {
            i.interrupt();
        }
    }

    /// The wrapped sandbox's interrupter (`None` if it has none); usable while a call runs.
    pub fn interrupter(&self) -> Option<Arc<dyn Interrupt>> {
        self.shared.interrupter.clone()
    }

    /// The configured idle time (`None`: auto-standby disabled).
    pub fn idle_standby(&self) -> Option<Duration> {
        self.shared.idle
    }

    pub fn run_code(&self, code: &str) -> Result<Execution> {
        self.with(|sb| sb.run_code(code))
    }

    /// Runs code with its own deadline (see [`Sandbox::run_code_with_timeout`]).
    pub fn run_code_with_timeout(
        &self,
        code: &str,
        timeout: Option<Duration>,
    ) -> Result<Execution> {
        self.with(|sb| sb.run_code_with_timeout(code, timeout))
    }

    pub fn exec(&self, cmd: &Command) -> Result<ExecOutput> {
        self.with(|sb| sb.exec(cmd))
    }

    /// Runs a command to completion, giving its output to the callbacks: chunk by chunk as it
    /// comes where the tier streams ([`Sandbox::streaming`]), otherwise each stream whole when
    /// the command has ended, after the sandbox's lock is released (an empty stream gives no
    /// call). Returns the exit code; errors as [`Sandbox::exec`].
    pub fn exec_streaming(
        &self,
        cmd: &Command,
        on_stdout: &mut dyn FnMut(&[u8]),
        on_stderr: &mut dyn FnMut(&[u8]),
    ) -> Result<i32> {
        enum Ran {
            Streamed(i32),
            Whole(ExecOutput),
        }
        let ran = self.with(|sb| match sb.streaming() {
            Some(s) => s
                .exec_streaming(cmd, on_stdout, on_stderr)
                .map(Ran::Streamed),
            None => sb.exec(cmd).map(Ran::Whole),
        })?;
        match ran {
            Ran::Streamed(code) => Ok(code),
            Ran::Whole(out) => {
                if !out.stdout.is_empty() {
                    on_stdout(&out.stdout);
                }
                if !out.stderr.is_empty() {
                    on_stderr(&out.stderr);
                }
                Ok(out.exit_code)
            }
        }
    }

    /// Runs `f` on the sandbox's background processes, waking it first; a tier without them
    /// answers [`Error::Unsupported`](crate::Error::Unsupported) without a wake.
    fn with_processes<T>(&self, f: impl FnOnce(&mut dyn Processes) -> Result<T>) -> Result<T> {
        self.shared.slot.lock().sb.processes()?;
        self.with(|sb| f(sb.processes()?))
    }

    /// Starts a background process (see [`Processes::spawn`](crate::Processes::spawn));
    /// [`Error::Unsupported`](crate::Error::Unsupported) on a tier without them.
    pub fn spawn(&self, cmd: &Command) -> Result<u32> {
        self.with_processes(|p| p.spawn(cmd))
    }

    /// Waits for a background process (see [`Processes::wait`](crate::Processes::wait)).
    pub fn wait(&self, pid: u32, timeout: Option<Duration>) -> Result<Option<i32>> {
        self.with_processes(|p| p.wait(pid, timeout))
    }

    /// A background process's output since the previous call (see
    /// [`Processes::output`](crate::Processes::output)).
    pub fn output(&self, pid: u32) -> Result<(Vec<u8>, Vec<u8>, bool)> {
        self.with_processes(|p| p.output(pid))
    }

    /// Signals a background process (see [`Processes::signal`](crate::Processes::signal)).
    pub fn signal(&self, pid: u32, signal: i32) -> Result<()> {
        self.with_processes(|p| p.signal(pid, signal))
    }

    /// Whether something in the guest accepts TCP connections on `127.0.0.1:port` (see
    /// [`Processes::listening`]); [`Error::Unsupported`](crate::Error::Unsupported) on a tier
    /// without background processes.
    pub fn listening(&self, port: u16) -> Result<bool> {
        self.with_processes(|p| p.listening(port))
    }

    /// Runs `f` on the sandbox's ports, waking it first; a tier without them answers
    /// [`Error::Unsupported`](crate::Error::Unsupported) without a wake.
    fn with_ports<T>(&self, f: impl FnOnce(&mut dyn Ports) -> Result<T>) -> Result<T> {
        self.shared.slot.lock().sb.ports()?;
        self.with(|sb| f(sb.ports()?))
    }

    /// Exposes guest TCP port `guest_port` on the host's `127.0.0.1:host_port` (`0`: a free
    /// port) and returns that address (see [`Ports::expose`]). The listener stays open while
    /// the sandbox sleeps: a connection wakes it. [`Error::Unsupported`](crate::Error::Unsupported)
    /// on a tier without networking.
    pub fn expose(&self, guest_port: u16, host_port: u16) -> Result<SocketAddr> {
        self.with_ports(|p| p.expose(guest_port, host_port))
    }

    /// Stops exposing `guest_port` (see [`Ports::unexpose`]).
    pub fn unexpose(&self, guest_port: u16) -> Result<()> {
        self.with_ports(|p| p.unexpose(guest_port))
    }

    /// The exposed ports, by guest port (see [`Ports::exposed`]).
    pub fn exposed(&self) -> Result<Vec<PortMapping>> {
        self.with_ports(|p| Ok(p.exposed()))
    }

    /// Runs `f` on the sandbox's terminals, waking it first; a tier without them answers
    /// [`Error::Unsupported`](crate::Error::Unsupported) without a wake.
    fn with_terminals<T>(&self, f: impl FnOnce(&mut dyn Terminals) -> Result<T>) -> Result<T> {
        self.shared.slot.lock().sb.terminals()?;
        self.with(|sb| f(sb.terminals()?))
    }

    /// Starts `argv` (empty: the sandbox's shell) on a new terminal of `size`; returns its pid
    /// (see [`Terminals::open_terminal`]). [`wait`](Managed::wait) and
    /// [`signal`](Managed::signal) take the pid.
    pub fn open_terminal(&self, argv: &[String], size: TerminalSize) -> Result<u32> {
        self.with_terminals(|t| t.open_terminal(argv, size))
    }

    /// Resizes terminal `pid` (see [`Terminals::resize_terminal`]).
    pub fn resize_terminal(&self, pid: u32, size: TerminalSize) -> Result<()> {
        self.with_terminals(|t| t.resize_terminal(pid, size))
    }

    /// Attaches to terminal `pid` (see [`Terminals::attach_terminal`]): the link is used
    /// without this handle's lock, so typing never waits for a running call. While it is
    /// open the idle timer leaves the sandbox running.
    pub fn attach_terminal(&self, pid: u32) -> Result<Arc<dyn TerminalLink>> {
        self.with_terminals(|t| t.attach_terminal(pid))
    }

    /// Replaces the sandbox's egress policy (see
    /// [`Egress::set_network`](crate::Egress::set_network)), waking it first;
    /// [`Error::Unsupported`](crate::Error::Unsupported) without a wake on a tier without
    /// networking.
    pub fn set_network(&self, policy: NetworkPolicy) -> Result<()> {
        self.shared.slot.lock().sb.egress()?;
        self.with(|sb| sb.egress()?.set_network(policy))
    }

    /// The sandbox's egress policy (see [`Egress::network`](crate::Egress::network)), read
    /// without waking it; [`Error::Unsupported`](crate::Error::Unsupported) on a tier without
    /// networking.
    pub fn network(&self) -> Result<NetworkPolicy> {
        Ok(self.shared.slot.lock().sb.egress()?.network().clone())
    }

    pub fn read_file(&self, path: &str) -> Result<Vec<u8>> {
        self.with(|sb| sb.read_file(path))
    }

    pub fn write_file(&self, path: &str, data: &[u8]) -> Result<()> {
        self.with(|sb| sb.write_file(path, data))
    }

    pub fn list_dir(&self, path: &str) -> Result<Vec<DirEntry>> {
        self.with(|sb| sb.list_dir(path))
    }

    pub fn remove(&self, path: &str) -> Result<()> {
        self.with(|sb| sb.remove(path))
    }

    pub fn exists(&self, path: &str) -> Result<bool> {
        self.with(|sb| sb.exists(path))
    }

    pub fn checkpoint(&self) -> Result<SnapshotId> {
        self.with(|sb| sb.checkpoint())
    }

    /// Puts the sandbox in standby now; the next call wakes it.
    pub fn standby(&self) -> Result<SnapshotId> {
        let mut slot = self.shared.slot.lock();
        if slot.sb.state() == State::Standby
            && let Some(id) = &slot.standby_snapshot
        {
            return Ok(id.clone());
        }
        let id = slot.sb.standby()?;
        slot.standby_snapshot = Some(id.clone());
        Ok(id)
    }

    /// Replaces the sandbox's state with a snapshot's, with the host access the sandbox holds
    /// (see [`Sandbox::resume`]).
    pub fn resume(&self, id: &SnapshotId) -> Result<()> {
        let mut slot = self.shared.slot.lock();
        slot.sb.resume(id)?;
        slot.standby_snapshot = None;
        self.touch(&mut slot);
        Ok(())
    }

    /// Replaces the sandbox's state with a snapshot's, with `grants` as its host access from
    /// now on: later wakes from standby pass them again (see [`Sandbox::resume_with`]).
    pub fn resume_with(&self, id: &SnapshotId, grants: &Grants) -> Result<()> {
        let mut slot = self.shared.slot.lock();
        slot.sb.resume_with(id, grants)?;
        slot.standby_snapshot = None;
        self.touch(&mut slot);
        Ok(())
    }

    /// Forks the sandbox into `n` children (see [`Sandbox::fork`]), each managed with the
    /// same idle time.
    pub fn fork(&self, n: usize) -> Result<Vec<Managed<S>>> {
        let children = self.with(|sb| sb.fork(n))?;
        Ok(children
            .into_iter()
            .map(|c| Managed::new(c, self.shared.idle))
            .collect())
    }

    /// What the sandbox has used (see [`Sandbox::metrics`]), read without waking it: one in
    /// standby reports zero memory and the CPU time and disk writes it kept.
    pub fn metrics(&self) -> Result<Metrics> {
        self.shared.slot.lock().sb.metrics()
    }

    pub fn kill(&self) -> Result<()> {
        self.shared.slot.lock().sb.kill()
    }
}
