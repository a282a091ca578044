//! Terminals: a program on a pseudo-terminal in the sandbox, which a host program (a person at
//! `dormant shell`, a coding agent's UI) attaches to, types into and resizes.
//!
//! [`Terminals`] is a capability ([`Sandbox::terminals`](crate::Sandbox::terminals)): the KVM
//! tier has it (a real pseudo-terminal in the guest, so full-screen programs redraw after a
//! resize); the WASI tier answers [`Error::Unsupported`]. A terminal's program is a background
//! process of the sandbox ([`Processes`](crate::Processes): `wait`, `signal` by its pid) and
//! lives in the sandbox like any process: it survives checkpoint, standby and resume. An
//! attachment ([`TerminalLink`]) does not: it ends when the sandbox's machine goes away
//! (standby, kill), and after a resume [`Terminals::attach_terminal`] attaches again, first
//! receiving the output produced while nobody was attached (the newest 64 KiB).

use std::io;
use std::sync::Arc;

use crate::error::{Error, Result};

/// Largest terminal width or height, in character cells.
pub const MAX_TERMINAL_CELLS: u16 = 4096;

/// A terminal's size in character cells.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TerminalSize {
    /// Width (columns).
    pub cols: u16,
    /// Height (rows).
    pub rows: u16,
}

impl TerminalSize {
    /// A size of `cols`×`rows` cells. Errors: either outside 1 to [`MAX_TERMINAL_CELLS`]
    /// ([`Error::InvalidArgument`]).
    pub fn new(cols: u32, rows: u32) -> Result<TerminalSize> {
        let max = u32::from(MAX_TERMINAL_CELLS);
        if !(1..=max).contains(&cols) || !(1..=max).contains(&rows) {
            return Err(Error::InvalidArgument(format!(
                "terminal size {cols}x{rows}: columns and rows must be from 1 to {max}"
            )));
        }
        // Both fit in u16: checked against the cap above.
        Ok(TerminalSize {
            cols: cols as u16,
            rows: rows as u16,
        })
    }
}

/// A live attachment to a terminal: its output to read, its input to write. Shared by a
/// reading thread and writers (every method takes `&self`). Dropping the last handle detaches
/// (the program runs on).
pub trait TerminalLink: Send + Sync + std::fmt::Debug {
    /// Reads the terminal's output as it comes (raw bytes, escape sequences included):
    /// `Ok(0)` once the attachment has ended (the program and every holder of the terminal
    /// ended, the link was closed, another attachment took over, or the sandbox's machine went
    /// away).
    fn read(&self, buf: &mut [u8]) -> io::Result<usize>;
    /// Types `data` into the terminal (all of it, waiting while the program does not read).
    /// Errors once the attachment has ended.
    fn write(&self, data: &[u8]) -> io::Result<()>;
    /// Detaches now: reads return `Ok(0)`, writes fail; the program runs on.
    fn close(&self);
}

/// Programs on pseudo-terminals: [`Sandbox::terminals`](crate::Sandbox::terminals).
pub trait Terminals {
    /// Starts `argv` (empty: the sandbox's shell, `bash` where it has one, else `sh`) on a new
    /// terminal of `size`, with `TERM=xterm-256color`, in the home directory; returns its pid
    /// (a background process: [`Processes::wait`](crate::Processes::wait) and
    /// [`Processes::signal`](crate::Processes::signal) take it). Errors: a program that
    /// cannot be started is the guest's error.
    fn open_terminal(&mut self, argv: &[String], size: TerminalSize) -> Result<u32>;
    /// Sets terminal `pid`'s size (its program gets `SIGWINCH`). Errors: no such terminal.
    fn resize_terminal(&mut self, pid: u32, size: TerminalSize) -> Result<()>;
    /// Attaches to terminal `pid`: the link delivers the output nobody received yet, then
    /// the output as it comes. One attachment per terminal at a time: this one ends the
    /// previous. Errors: no such terminal.
    fn attach_terminal(&mut self, pid: u32) -> Result<Arc<dyn TerminalLink>>;
    /// Attachments open now (an idle timer does not put a sandbox with some in standby).
    fn attached_terminals(&self) -> usize;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_are_checked() {
        assert_eq!(
            TerminalSize::new(80, 24).unwrap(),
            TerminalSize { cols: 80, rows: 24 }
        );
        assert!(TerminalSize::new(4096, 4096).is_ok());
        for (c, r) in [(0, 24), (80, 0), (4097, 24), (80, 70_000), (u32::MAX, 1)] {
            match TerminalSize::new(c, r) {
                Err(Error::InvalidArgument(m)) => assert!(m.contains("from 1 to 4096"), "{m}"),
                other => panic!("{c}x{r}: {other:?}"),
            }
        }
    }
}
