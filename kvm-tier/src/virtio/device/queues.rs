//! The device's queues during one round of its worker: [`Queues::serve`] pops the next chain of
//! a queue, checks it, hands it to the device as a [`Chain`] and gives it back as used, at most
//! [`CHAINS_PER_ROUND`] per queue per round.

use virtio_queue::{Queue, QueueT};

use super::chain::{Chain, ChainReader, ChainWriter, Cursor, Desc, Request, collect};
use crate::vm::GuestMemory;

/// The most chains served from one queue per wakeup of the worker before it checks pause and
/// stop again.
pub const CHAINS_PER_ROUND: usize = 64;

/// The device's queues during one round of work (see
/// [`DeviceLogic::process`](super::DeviceLogic::process)).
#[derive(Debug)]
pub struct Queues<'a> {
    pub(super) queues: &'a mut [Queue],
    pub(super) mem: &'a GuestMemory,
    pub(super) descs: &'a mut Vec<Desc>,
    pub(super) served: &'a mut [usize],
    pub(super) max_readable: usize,
    pub(super) max_writable: usize,
    pub(super) used: bool,
    pub(super) more: bool,
    pub(super) refused: u64,
}

impl Queues<'_> {
    /// Takes the next chain of queue `q` and lets `serve` answer it (`serve` returns the bytes
    /// it wrote into the guest's buffers); the chain then goes back to the guest as used. A
    /// chain whose descriptors are unsound (too many, outside guest memory, readable after
    /// writable) goes back unserved, `serve` not called; one longer than the device's caps
    /// comes as [`Chain::OverCaps`]. Returns `false` when there is no chain, or this round's
    /// share of `q` is used up.
    pub fn serve(&mut self, q: usize, serve: impl FnOnce(Chain<'_, '_>) -> u32) -> bool {
        let (Some(queue), Some(served)) = (self.queues.get_mut(q), self.served.get_mut(q)) else {
            return false;
        };
        if *served >= CHAINS_PER_ROUND {
            self.more = true;
            return false;
        }
        let mem = self.mem;
        let Some(chain) = queue.pop_descriptor_chain(mem) else {
            return false;
        };
        *served += 1;
        let head = chain.head_index();
        let written = match collect(chain, mem, self.descs, self.max_readable, self.max_writable) {
            Ok(c) => {
                let (r, w) = self.descs.split_at(c.readable);
                let mut req = Request {
                    reader: ChainReader(Cursor::new(mem, r)),
                    writer: ChainWriter(Cursor::new(mem, w)),
                };
                if c.over_caps {
                    self.refused += 1;
                    tracing::debug!(queue = q, "virtio chain over the device's caps");
                    serve(Chain::OverCaps(&mut req))
                } else {
                    serve(Chain::Request(&mut req))
                }
            }
            Err(why) => {
                self.refused += 1;
                tracing::debug!(?why, queue = q, "virtio chain returned unserved");
                0
            }
        };
        // A head index outside the queue is refused by virtio-queue; nothing to give back.
        let _ = queue.add_used(mem, head, written);
        self.used = true;
        true
    }
}
