//! The vCPU on its own thread, behind a handle.
//!
//! The thread runs `KVM_RUN` in a loop and hands every exit to an [`ExitHandler`] (the device
//! model) on the same thread. The owner controls it through commands: [`VcpuThread::pause`]
//! kicks the vCPU out of `KVM_RUN` (`immediate_exit` plus a signal, so that a guest spinning
//! without exits stops too) and waits until the thread acknowledges; while paused, the state can
//! be captured; [`VcpuThread::resume`] lets it run again; [`VcpuThread::stop`] joins the thread
//! with a timeout and gives the VM back.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::thread::JoinHandle;
use std::time::Duration;

use vmm_sys_util::signal::SIGRTMIN;

use crate::vm::{ExitRef, MicroVm, VmError, VmState};

/// What the device model answers to an exit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Keep running the guest.
    Continue,
    /// Stop the vCPU thread (the guest asked to power off, or the device model failed).
    Stop,
}

/// The device model: handles exits on the vCPU thread (and answers reads by filling their
/// data).
pub trait ExitHandler: Send + 'static {
    fn handle(&mut self, exit: ExitRef<'_>) -> Action;

    /// The guest will not run again: its vCPU failed (a crash, guest memory KVM could not
    /// supply) or the handler stopped it. Not called when the owner stops the thread.
    fn ended(&mut self) {}
}

impl<F: FnMut(ExitRef<'_>) -> Action + Send + 'static> ExitHandler for F {
    fn handle(&mut self, exit: ExitRef<'_>) -> Action {
        self(exit)
    }
}

/// Work run on the vCPU thread while it is paused (e.g. writing a RAM image).
type PausedWork = Box<dyn FnOnce(&MicroVm) + Send>;

enum Cmd {
    Pause,
    Resume,
    Save,
    WithVm(PausedWork),
    Stop,
}

enum Reply {
    Paused,
    Resumed,
    Done,
    State(Box<VmState>),
    Error(VmError),
}

/// Why the vCPU thread ended.
#[derive(Debug)]
pub enum Ended {
    /// The owner stopped it, or the handler returned [`Action::Stop`].
    Stopped,
    /// The guest crashed the VM (triple fault, emulation failure, failed entry, …).
    Failed(VmError),
}

/// The vCPU thread's CPU time as the thread itself records it, shared with its handle.
#[derive(Debug)]
struct CpuShare {
    /// The thread's CPU time in ns when it ended; [`CpuShare::RUNNING`] until then.
    ended_ns: AtomicU64,
    /// CPU time in ns the thread spent on the owner's work while paused (writing a
    /// checkpoint's RAM image): not the guest's, subtracted from the total.
    host_work_ns: AtomicU64,
}

impl CpuShare {
    const RUNNING: u64 = u64::MAX;

    fn new() -> CpuShare {
        CpuShare {
            ended_ns: AtomicU64::new(Self::RUNNING),
            host_work_ns: AtomicU64::new(0),
        }
    }

    /// The guest's share of `total_ns` of thread CPU time.
    fn guest(&self, total_ns: u64) -> Duration {
        Duration::from_nanos(total_ns.saturating_sub(self.host_work_ns.load(Ordering::SeqCst)))
    }
}

fn thread_cpu_ns() -> u64 {
    u64::try_from(dormant_core::metrics::CpuClock::thread_now().as_nanos()).unwrap_or(u64::MAX - 1)
}

/// A running vCPU thread.
pub struct VcpuThread {
    cmd: Sender<Cmd>,
    reply: Receiver<Reply>,
    immediate_exit: usize,
    tid: libc::pthread_t,
    cpu: Arc<CpuShare>,
    join: Option<JoinHandle<(MicroVm, Ended)>>,
}

impl std::fmt::Debug for VcpuThread {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VcpuThread").finish_non_exhaustive()
    }
}

/// How long control operations wait for the vCPU thread before reporting it stuck.
const REPLY_TIMEOUT: Duration = Duration::from_secs(5);

impl VcpuThread {
    /// Starts running `vm`'s vCPU on a new thread, exits going to `handler`. Fails (and drops
    /// the VM) only when no thread can be started.
    pub fn start(mut vm: MicroVm, mut handler: impl ExitHandler) -> std::io::Result<VcpuThread> {
        let (cmd_tx, cmd_rx) = mpsc::channel::<Cmd>();
        let (reply_tx, reply_rx) = mpsc::channel::<Reply>();
        let (tid_tx, tid_rx) = mpsc::channel::<(usize, libc::pthread_t)>();
        let cpu = Arc::new(CpuShare::new());
        let theirs = cpu.clone();
        let join = std::thread::Builder::new()
            .name("dormant-vcpu".into())
            .spawn(move || {
                crate::vm::install_kick_handler();
                let ptr = vm.immediate_exit_ptr() as usize;
                // SAFETY: pthread_self is always valid for the calling thread.
                let _ = tid_tx.send((ptr, unsafe { libc::pthread_self() }));
                let ended = run_thread(&mut vm, &mut handler, &cmd_rx, &reply_tx, &theirs);
                theirs.ended_ns.store(thread_cpu_ns(), Ordering::SeqCst);
                (vm, ended)
            })?;
        let (immediate_exit, tid) = tid_rx
            .recv()
            .map_err(|_| std::io::Error::other("the vCPU thread ended before reporting its id"))?;
        Ok(VcpuThread {
            cmd: cmd_tx,
            reply: reply_rx,
            immediate_exit,
            tid,
            cpu,
            join: Some(join),
        })
    }

    fn kick(&self) {
        // SAFETY: `immediate_exit` points into the vCPU's kvm_run mapping, owned by the VM the
        // thread holds until it is joined (in `stop` or on drop), after which no kick is sent.
        unsafe { std::ptr::write_volatile(self.immediate_exit as *mut u8, 1) };
        // SAFETY: `tid` is the vCPU thread, alive until joined; the signal has a no-op handler.
        unsafe { libc::pthread_kill(self.tid, SIGRTMIN()) };
    }

    fn call(&self, cmd: Cmd) -> Result<Reply, VmError> {
        self.cmd
            .send(cmd)
            .map_err(|_| VmError::UnhandledExit("the vCPU thread has ended".into()))?;
        // Every command is served between two KVM_RUNs: get the guest out of the current one.
        self.kick();
        match self.reply.recv_timeout(REPLY_TIMEOUT) {
            Ok(Reply::Error(e)) => Err(e),
            Ok(r) => Ok(r),
            Err(RecvTimeoutError::Timeout) => Err(VmError::Deadline(REPLY_TIMEOUT)),
            Err(RecvTimeoutError::Disconnected) => {
                Err(VmError::UnhandledExit("the vCPU thread has ended".into()))
            }
        }
    }

    /// Stops the guest at the next instruction boundary and waits until it is paused.
    pub fn pause(&self) -> Result<(), VmError> {
        self.call(Cmd::Pause).map(|_| ())
    }

    /// Lets a paused guest run again.
    pub fn resume(&self) -> Result<(), VmError> {
        self.call(Cmd::Resume).map(|_| ())
    }

    /// Captures the state of a paused guest.
    pub fn save_state(&self) -> Result<VmState, VmError> {
        match self.call(Cmd::Save)? {
            Reply::State(s) => Ok(*s),
            _ => Err(VmError::UnhandledExit(
                "unexpected reply from the vCPU thread".into(),
            )),
        }
    }

    /// Runs `f` with the VM while the guest is paused (on the vCPU thread), e.g. to write its
    /// RAM image consistently with a state captured by [`Self::save_state`].
    pub fn with_paused_vm(&self, f: impl FnOnce(&MicroVm) + Send + 'static) -> Result<(), VmError> {
        self.call(Cmd::WithVm(Box::new(f))).map(|_| ())
    }

    /// CPU time the thread has spent running the guest (and serving its exits) so far, or in
    /// all once it has ended; work the owner ran on it while paused is not counted.
    pub fn cpu_time(&self) -> Duration {
        let ended = self.cpu.ended_ns.load(Ordering::SeqCst);
        if ended != CpuShare::RUNNING {
            return self.cpu.guest(ended);
        }
        let mut clock: libc::clockid_t = 0;
        // SAFETY: `tid` is this handle's thread, not yet joined (joining consumes the handle),
        // so the pthread_t is valid; `clock` is a valid place for the result.
        let rc = unsafe { libc::pthread_getcpuclockid(self.tid, &mut clock) };
        if rc == 0 {
            let mut ts = libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            };
            // SAFETY: `ts` is a valid place for the result; a clock of a thread that has
            // exited since gives an error, not undefined behaviour.
            if unsafe { libc::clock_gettime(clock, &mut ts) } == 0 {
                let ns = (ts.tv_sec.max(0) as u64)
                    .saturating_mul(1_000_000_000)
                    .saturating_add(ts.tv_nsec.max(0) as u64);
                return self.cpu.guest(ns);
            }
        }
        // The thread ended meanwhile: it recorded its total before ending.
        match self.cpu.ended_ns.load(Ordering::SeqCst) {
            CpuShare::RUNNING => Duration::ZERO,
            ns => self.cpu.guest(ns),
        }
    }

    /// [`Self::stop`], and the thread's CPU time in all (see [`Self::cpu_time`]).
    pub fn stop_counted(self) -> (MicroVm, Ended, Duration) {
        let cpu = self.cpu.clone();
        let (vm, ended) = self.stop();
        let total = cpu.guest(cpu.ended_ns.load(Ordering::SeqCst));
        (vm, ended, total)
    }

    /// Whether the thread has ended on its own (the guest crashed or the handler stopped it).
    pub fn is_finished(&self) -> bool {
        self.join.as_ref().is_none_or(|j| j.is_finished())
    }

    /// Stops the thread (kicking the guest out if it runs) and returns the VM and why the thread
    /// ended.
    pub fn stop(mut self) -> (MicroVm, Ended) {
        let _ = self.cmd.send(Cmd::Stop);
        let join = self.join.take().expect("joined once");
        if !join.is_finished() {
            self.kick();
        }
        join.join().expect("the vCPU thread does not panic")
    }
}

impl Drop for VcpuThread {
    fn drop(&mut self) {
        if let Some(join) = self.join.take() {
            let _ = self.cmd.send(Cmd::Stop);
            if !join.is_finished() {
                self.kick();
            }
            let _ = join.join();
        }
    }
}

fn run_thread(
    vm: &mut MicroVm,
    handler: &mut dyn ExitHandler,
    cmds: &Receiver<Cmd>,
    replies: &Sender<Reply>,
    cpu: &CpuShare,
) -> Ended {
    let mut paused = false;
    loop {
        // Re-arm before looking for commands: a kick that lands after this point makes the next
        // KVM_RUN return at once, and the command it announces is then found below.
        vm.set_immediate_exit(false);
        // Serve commands: all pending ones while running, blocking while paused.
        loop {
            let cmd = if paused {
                match cmds.recv() {
                    Ok(c) => c,
                    Err(_) => return Ended::Stopped,
                }
            } else {
                match cmds.try_recv() {
                    Ok(c) => c,
                    Err(mpsc::TryRecvError::Empty) => break,
                    Err(mpsc::TryRecvError::Disconnected) => {
                        vm.complete_pending_io();
                        return Ended::Stopped;
                    }
                }
            };
            match cmd {
                Cmd::Pause => {
                    if !paused {
                        vm.complete_pending_io();
                    }
                    paused = true;
                    let _ = replies.send(Reply::Paused);
                }
                Cmd::Resume => {
                    paused = false;
                    let _ = replies.send(Reply::Resumed);
                }
                Cmd::Save => {
                    let r = if paused {
                        vm.save_state()
                            .map(|s| Reply::State(Box::new(s)))
                            .unwrap_or_else(Reply::Error)
                    } else {
                        Reply::Error(VmError::UnhandledExit(
                            "pause the vCPU before saving its state".into(),
                        ))
                    };
                    let _ = replies.send(r);
                }
                Cmd::WithVm(f) => {
                    let r = if paused {
                        let start = thread_cpu_ns();
                        f(vm);
                        let spent = thread_cpu_ns().saturating_sub(start);
                        cpu.host_work_ns.fetch_add(spent, Ordering::SeqCst);
                        Reply::Done
                    } else {
                        Reply::Error(VmError::UnhandledExit(
                            "pause the vCPU before using its VM".into(),
                        ))
                    };
                    let _ = replies.send(r);
                }
                Cmd::Stop => {
                    vm.complete_pending_io();
                    return Ended::Stopped;
                }
            }
        }
        match vm.run_exit() {
            Ok(Some(exit)) => {
                if handler.handle(exit) == Action::Stop {
                    handler.ended();
                    return Ended::Stopped;
                }
            }
            Ok(None) => {} // kicked out of KVM_RUN: serve the command that asked for it
            Err(e) => {
                handler.ended();
                return Ended::Failed(e);
            }
        }
    }
}
