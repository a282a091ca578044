//! The listings a store keeps between calls, one per descriptor being read, and the
//! [`Budget`] that bounds their host memory (the least recently used is dropped first).

use super::dirents::Listing;

/// Bounds on the host memory a store's listings take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Budget {
    /// Bytes of the first read of a listing.
    pub first_read: usize,
    /// The largest listing kept, in bytes of preview-1 dirents.
    pub max_listing: usize,
    /// How many listings a store keeps at most (one per descriptor being read).
    pub max_kept: usize,
    /// How many bytes of listings (dirents and index) a store keeps at most.
    pub max_kept_bytes: usize,
}

impl Budget {
    /// 128 KiB first reads (about 3,000 entries with 20-byte names); listings of up to 32 MiB
    /// (about 400,000 entries with 60-byte names), at most 8 of them and 48 MiB in all.
    pub const DEFAULT: Budget = Budget {
        first_read: 128 << 10,
        max_listing: 32 << 20,
        max_kept: 8,
        max_kept_bytes: 48 << 20,
    };
}

/// The listings a store keeps, by guest descriptor.
#[derive(Debug)]
pub struct Listings {
    pub(super) kept: Vec<Kept>,
    /// Counts uses, to find the least recently used listing.
    clock: u64,
    pub(super) budget: Budget,
}

impl Default for Listings {
    fn default() -> Listings {
        Listings::with_budget(Budget::DEFAULT)
    }
}

#[derive(Debug)]
pub(super) struct Kept {
    pub(super) fd: u32,
    pub(super) listing: Listing,
    used: u64,
}

impl Listings {
    pub(crate) fn with_budget(budget: Budget) -> Listings {
        Listings {
            kept: Vec::new(),
            clock: 0,
            budget,
        }
    }

    /// Takes the listing kept for `fd` out (`keep` puts it back).
    pub(super) fn take(&mut self, fd: u32) -> Option<Listing> {
        let i = self.kept.iter().position(|k| k.fd == fd)?;
        Some(self.kept.swap_remove(i).listing)
    }

    pub(super) fn forget(&mut self, fd: u32) {
        self.kept.retain(|k| k.fd != fd);
    }

    pub(super) fn keep(&mut self, fd: u32, mut listing: Listing) {
        self.forget(fd);
        listing.bytes.shrink_to_fit();
        let size = listing.size();
        if size > self.budget.max_kept_bytes {
            return;
        }
        while self.kept.len() >= self.budget.max_kept
            || self.kept.iter().map(|k| k.listing.size()).sum::<usize>() + size
                > self.budget.max_kept_bytes
        {
            let Some(oldest) = self
                .kept
                .iter()
                .enumerate()
                .min_by_key(|(_, k)| k.used)
                .map(|(i, _)| i)
            else {
                break;
            };
            self.kept.swap_remove(oldest);
        }
        self.clock += 1;
        self.kept.push(Kept {
            fd,
            listing,
            used: self.clock,
        });
    }

    /// Number of listings kept (for tests).
    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.kept.len()
    }
}
