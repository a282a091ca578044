//! The guest's serial console: a 16550 UART (vm-superio) at the PC's COM1 ports, its interrupt
//! on IRQ 4 through an irqfd (Linux's tty layer stalls without THRE interrupts), its output kept
//! in a bounded [`ConsoleLog`] that callers can read.

use std::io::Write;
use std::sync::Arc;

use parking_lot::{Condvar, Mutex};
use vm_superio::{Serial, SerialState, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::persist::Persist;

/// COM1's base port.
pub const COM1: u16 = 0x3f8;
/// COM1's interrupt line.
pub const COM1_IRQ: u32 = 4;
/// How much of the guest's console output is kept (the oldest bytes are dropped first).
pub const CONSOLE_KEEP: usize = 256 * 1024;

/// An interrupt line: writing the eventfd raises it (KVM irqfd).
#[derive(Debug)]
pub struct IrqLine(pub EventFd);

impl Trigger for IrqLine {
    type E = std::io::Error;

    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

#[derive(Debug, Default)]
struct LogInner {
    bytes: std::collections::VecDeque<u8>,
    /// Total bytes ever written (so waiters can tell new output from old).
    total: u64,
}

/// The guest's console output, shared between the UART and its readers.
#[derive(Debug, Clone, Default)]
pub struct ConsoleLog {
    inner: Arc<(Mutex<LogInner>, Condvar)>,
    echo: bool,
}

impl ConsoleLog {
    /// A log; with `echo` every byte is copied to the host's stderr as well.
    pub fn new(echo: bool) -> ConsoleLog {
        ConsoleLog {
            inner: Arc::default(),
            echo,
        }
    }

    /// The kept output, lossily decoded.
    pub fn text(&self) -> String {
        let g = self.inner.0.lock();
        let (a, b) = g.bytes.as_slices();
        let mut v = Vec::with_capacity(a.len() + b.len());
        v.extend_from_slice(a);
        v.extend_from_slice(b);
        String::from_utf8_lossy(&v).into_owned()
    }

    /// Waits until the kept output contains `needle`, or `timeout` passes.
    pub fn wait_for(&self, needle: &str, timeout: std::time::Duration) -> bool {
        let deadline = std::time::Instant::now() + timeout;
        let (lock, cv) = &*self.inner;
        let mut g = lock.lock();
        loop {
            let (a, b) = g.bytes.as_slices();
            let mut v = Vec::with_capacity(a.len() + b.len());
            v.extend_from_slice(a);
            v.extend_from_slice(b);
            if String::from_utf8_lossy(&v).contains(needle) {
                return true;
            }
            if cv.wait_until(&mut g, deadline).timed_out() {
                return false;
            }
        }
    }
}

impl Write for ConsoleLog {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.echo {
            let _ = std::io::stderr().write_all(buf);
        }
        let (lock, cv) = &*self.inner;
        let mut g = lock.lock();
        g.bytes.extend(buf);
        let excess = g.bytes.len().saturating_sub(CONSOLE_KEEP);
        g.bytes.drain(..excess);
        g.total += buf.len() as u64;
        cv.notify_all();
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The UART.
pub type Uart = Serial<IrqLine, vm_superio::serial::NoEvents, ConsoleLog>;

/// The UART's state in a snapshot (dormant's own type; vm-superio's is not serialized as-is).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct UartState {
    pub baud_divisor_low: u8,
    pub baud_divisor_high: u8,
    pub interrupt_enable: u8,
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
    /// Received bytes not yet read by the guest: at most the 64-byte FIFO (decoding refuses
    /// more, and so does restoring).
    #[serde(deserialize_with = "dormant_core::snapshot::bounded_vec::<_, _, 64>")]
    pub in_buffer: Vec<u8>,
}

impl UartState {
    pub fn capture(uart: &Uart) -> UartState {
        let s = uart.state();
        UartState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }

    pub fn restore(&self, irq: IrqLine, log: ConsoleLog) -> Result<Uart, String> {
        let s = SerialState {
            baud_divisor_low: self.baud_divisor_low,
            baud_divisor_high: self.baud_divisor_high,
            interrupt_enable: self.interrupt_enable,
            interrupt_identification: self.interrupt_identification,
            line_control: self.line_control,
            line_status: self.line_status,
            modem_control: self.modem_control,
            modem_status: self.modem_status,
            scratch: self.scratch,
            in_buffer: self.in_buffer.clone(),
        };
        Serial::from_state(&s, irq, vm_superio::serial::NoEvents, log)
            .map_err(|e| format!("invalid UART state: {e:?}"))
    }
}

/// The UART's registers and input FIFO ([`UartState`]); restoring needs its interrupt line and
/// the console log it writes to.
impl Persist for Uart {
    type State = UartState;
    type Context<'a> = (IrqLine, ConsoleLog);
    type Error = String;

    fn save(&self) -> Result<UartState, String> {
        Ok(UartState::capture(self))
    }

    fn restore((irq, log): (IrqLine, ConsoleLog), state: &UartState) -> Result<Uart, String> {
        state.restore(irq, log)
    }
}
