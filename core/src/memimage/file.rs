//! The bytes of a layer file: a full memory image written sparse (zero pages stay holes), a
//! packed delta of some pages, the check of a file's length and CRC-32, and the page-set
//! helpers (union, runs) both need. The file format is in
//! [`snapshot::format`](crate::snapshot::format).
//!
//! A leaf: it names nothing of the crate but the format's page size, so the snapshot store and
//! [`memimage`](super)'s mapping side can both name it.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

/// The host page size this module assumes (x86-64 Linux), which is the page of the snapshot
/// format's memory layers.
pub use crate::snapshot::format::PAGE;

fn is_zero(page: &[u8]) -> bool {
    // Compare as u64 words; the compiler vectorises this.
    let (pre, words, post) = {
        // SAFETY: every bit pattern is a valid u64; align_to only reinterprets in-bounds bytes.
        unsafe { page.align_to::<u64>() }
    };
    pre.iter().all(|&b| b == 0) && words.iter().all(|&w| w == 0) && post.iter().all(|&b| b == 0)
}

/// What writing a memory layer produced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Written {
    /// Logical file length.
    pub len: u64,
    /// Bytes of data actually written (non-zero pages).
    pub stored: u64,
    /// CRC-32 of the logical content.
    pub crc32: u32,
}

/// Writes `mem` as a sparse full image: the file gets `mem.len()` bytes, zero pages stay holes.
pub fn write_full(file: &File, mem: &[u8]) -> io::Result<Written> {
    assert_eq!(mem.len() % PAGE, 0, "memory size must be page-aligned");
    file.set_len(mem.len() as u64)?;
    let mut stored = 0u64;
    let mut run_start: Option<usize> = None;
    let mut hasher = crc32fast::Hasher::new();
    let npages = mem.len() / PAGE;
    for i in 0..=npages {
        let nonzero = i < npages && {
            let page = &mem[i * PAGE..(i + 1) * PAGE];
            hasher.update(page);
            !is_zero(page)
        };
        match (nonzero, run_start) {
            (true, None) => run_start = Some(i),
            (false, Some(s)) => {
                file.write_all_at(&mem[s * PAGE..i * PAGE], (s * PAGE) as u64)?;
                stored += ((i - s) * PAGE) as u64;
                run_start = None;
            }
            _ => {}
        }
    }
    Ok(Written {
        len: mem.len() as u64,
        stored,
        crc32: hasher.finalize(),
    })
}

/// Writes the listed pages of `mem`, packed in order, to `file` (a delta layer). Pages are
/// gathered into large writes: one system call per 8 MiB, not one per run.
pub fn write_delta(file: &File, mem: &[u8], pages: &[u32]) -> io::Result<Written> {
    const FLUSH: usize = 8 << 20;
    let mut hasher = crc32fast::Hasher::new();
    let mut buf: Vec<u8> = Vec::with_capacity((pages.len() * PAGE).min(FLUSH + PAGE));
    let mut off = 0u64;
    for &p in pages {
        buf.extend_from_slice(&mem[p as usize * PAGE..(p as usize + 1) * PAGE]);
        if buf.len() >= FLUSH {
            hasher.update(&buf);
            file.write_all_at(&buf, off)?;
            off += buf.len() as u64;
            buf.clear();
        }
    }
    hasher.update(&buf);
    file.write_all_at(&buf, off)?;
    off += buf.len() as u64;
    Ok(Written {
        len: off,
        stored: off,
        crc32: hasher.finalize(),
    })
}

/// Merges two strictly increasing page lists into one (a union, strictly increasing).
pub fn union(a: &[u32], b: &[u32]) -> Vec<u32> {
    let mut out = Vec::with_capacity(a.len() + b.len());
    let (mut i, mut j) = (0, 0);
    while i < a.len() && j < b.len() {
        match a[i].cmp(&b[j]) {
            std::cmp::Ordering::Less => {
                out.push(a[i]);
                i += 1;
            }
            std::cmp::Ordering::Greater => {
                out.push(b[j]);
                j += 1;
            }
            std::cmp::Ordering::Equal => {
                out.push(a[i]);
                i += 1;
                j += 1;
            }
        }
    }
    out.extend_from_slice(&a[i..]);
    out.extend_from_slice(&b[j..]);
    out
}

/// A run of consecutive page indices.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Run {
    pub first: u32,
    pub count: u32,
}

/// Groups a strictly increasing page list into runs.
pub fn runs(pages: &[u32]) -> impl Iterator<Item = Run> + '_ {
    let mut i = 0;
    std::iter::from_fn(move || {
        let first = *pages.get(i)?;
        let mut count = 1;
        while pages.get(i + count as usize) == Some(&(first + count)) {
            count += 1;
        }
        i += count as usize;
        Some(Run { first, count })
    })
}

/// Reads a whole file and checks its length and CRC-32.
pub fn verify_file(file: &File, len: u64, crc32: u32) -> io::Result<bool> {
    if file.metadata()?.len() != len {
        return Ok(false);
    }
    let mut hasher = crc32fast::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut at = 0u64;
    while at < len {
        let n = ((len - at) as usize).min(buf.len());
        file.read_exact_at(&mut buf[..n], at)?;
        hasher.update(&buf[..n]);
        at += n as u64;
    }
    Ok(hasher.finalize() == crc32)
}
