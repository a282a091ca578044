//! `fd_readdir` in time linear in the size of the directory.
//!
//! wasmtime-wasi's preview-1 `fd_readdir` (48.0.8, and unchanged on upstream main at
//! 49.0.0-dev) serves every call by reading the whole directory again, hashing the metadata of
//! every entry (one `fstatat` each) and skipping the first `cookie` entries. wasi-libc's
//! `readdir` asks for 4 KiB at a time, so a listing of n entries costs about n²/100 stats:
//! `os.listdir` of 20,000 files took ~170 s in a Python session.
//!
//! dormant shadows `wasi_snapshot_preview1.fd_readdir`: a call at cookie 0 (or one for a
//! descriptor with nothing kept) asks wasmtime-wasi's own `fd_readdir` for the whole listing
//! once, at cookie 0, into a host buffer, through the descriptor the guest holds (so cap-std's
//! confinement and the descriptor's checks stay wasmtime-wasi's); later cookies are served from
//! that listing. The bytes are wasmtime-wasi's, so entries, `d_next`, `d_ino`, `d_type`, `.` and
//! `..` are unchanged, and a buffer that ends inside an entry gets the same truncated prefix.
//!
//! A kept listing is a snapshot taken at its cookie-0 call: entries added or removed later show
//! up at the next cookie-0 call (POSIX leaves unspecified whether they show up before a
//! `rewinddir`), and a listing in progress neither repeats nor loses an entry when the
//! directory changes under it. A listing is dropped when the guest has read its end, starts
//! again at cookie 0, or closes or renumbers the descriptor. Host memory stays bounded whatever
//! the guest does (see [`Budget::DEFAULT`](cache::Budget::DEFAULT)): a listing over its cap is
//! not kept (such a directory is served by wasmtime-wasi call by call, as before), and a store
//! keeps a bounded number of listings and bytes, dropping the least recently used.
//!
//! A read of a listing costs what one wasmtime-wasi call costs (a `readdir` and two stats per
//! entry); a first read into a small buffer serves most directories, and a directory whose
//! listing does not fit is read a second time into one of the cap's size.
//!
//! The rooms: `dirents` (a listing as wasmtime-wasi writes it, indexed by cookie), `cache` (the
//! listings a store keeps, within its `Budget`), `calls` (the host calls, and `add_to_linker`,
//! which puts them over wasmtime-wasi's), and `tests` (against wasmtime-wasi's own
//! `fd_readdir`, with their harness in `tests/guest.rs`).

mod cache;
mod calls;
mod dirents;
#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests;

pub(crate) use cache::Listings;
pub(crate) use calls::{add_to_linker, with_memory};
