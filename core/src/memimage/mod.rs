//! Memory images: writing guest memory to snapshot files, finding the pages written since the
//! last checkpoint, and mapping snapshot files copy-on-write over live guest memory.
//!
//! The scheme: after every checkpoint (and every resume) the live memory region is a
//! `MAP_PRIVATE` view of the snapshot's files. A page the guest writes afterwards becomes a
//! private anonymous page, which `/proc/self/pagemap` reports; those are exactly the pages the
//! next incremental checkpoint must store. Nothing is copied on resume: pages are faulted in from
//! the page cache on first touch, so resume time does not grow with memory size.
//!
//! The bytes of a layer file (full sparse images, packed deltas, their checks) and page sets
//! are in `file.rs`, a leaf that names nothing but the format's page size, so the snapshot
//! store can write and check layers without naming this module's mapping side.
//!
//! This is one of the two places (with the VMM) where dormant uses `unsafe`.

use std::fs::File;
use std::io;
use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;
use std::sync::OnceLock;

use crate::snapshot::layer::LayerFile;

pub(crate) mod file;

pub use file::{PAGE, Run, Written, runs, union, verify_file, write_delta, write_full};

fn pagemap() -> io::Result<&'static File> {
    static PAGEMAP: OnceLock<Result<File, i32>> = OnceLock::new();
    match PAGEMAP
        .get_or_init(|| File::open("/proc/self/pagemap").map_err(|e| e.raw_os_error().unwrap_or(0)))
    {
        Ok(f) => Ok(f),
        Err(code) => Err(io::Error::from_raw_os_error(*code)),
    }
}

/// Whether dirty-page tracking through `/proc/self/pagemap` works in this process.
pub fn dirty_tracking_available() -> bool {
    pagemap().is_ok()
}

/// Pages of `[base, base + len)` that are private anonymous pages of this process: written
/// since the region was mapped from a file (or touched for the first time in anonymous memory).
/// Pages only read, pages still backed by the file, and the shared zero page are not reported.
pub fn dirty_pages(base: *const u8, len: usize) -> io::Result<Vec<u32>> {
    const PRESENT: u64 = 1 << 63;
    const SWAPPED: u64 = 1 << 62;
    const FILE_OR_SHARED: u64 = 1 << 61;
    const EXCLUSIVE: u64 = 1 << 56;
    let f = pagemap()?;
    let first = base as usize / PAGE;
    let n = len.div_ceil(PAGE);
    let mut out = Vec::new();
    let mut buf = vec![0u8; 8 * n.min(64 * 1024)];
    let mut done = 0;
    while done < n {
        let chunk = (n - done).min(buf.len() / 8);
        f.read_exact_at(&mut buf[..chunk * 8], ((first + done) * 8) as u64)?;
        for (j, e) in buf[..chunk * 8].chunks_exact(8).enumerate() {
            let e = u64::from_le_bytes(e.try_into().expect("8 bytes"));
            let anon = e & PRESENT != 0 && e & FILE_OR_SHARED == 0 && e & EXCLUSIVE != 0;
            if anon || e & SWAPPED != 0 {
                out.push((done + j) as u32);
            }
        }
        done += chunk;
    }
    Ok(out)
}

/// Maps `len` bytes of `file` at `offset` over `addr`, private and copy-on-write.
///
/// # Safety
/// `addr..addr + len` must be a page-aligned part of a mapping the caller owns and that nothing
/// else reads or writes during the call; its previous contents are replaced. The file must not
/// be truncated while mapped (pages past its end would raise SIGBUS).
pub unsafe fn map_private(addr: *mut u8, len: usize, file: &File, offset: u64) -> io::Result<()> {
    use rustix::mm::{MapFlags, ProtFlags, mmap};
    if len == 0 {
        return Ok(());
    }
    // SAFETY: the caller guarantees the range is owned, page-aligned and unused during the call;
    // MAP_FIXED replaces exactly that range.
    unsafe {
        mmap(
            addr.cast(),
            len,
            ProtFlags::READ | ProtFlags::WRITE,
            MapFlags::PRIVATE | MapFlags::FIXED,
            file.as_fd(),
            offset,
        )
    }
    .map(|_| ())
    .map_err(io::Error::from)
}

/// Whether reading a hole of `file` through a mapping makes its filesystem allocate a page
/// (tmpfs and other memory-backed filesystems: reading a hole of a mapped tmpfs file allocates,
/// and fails with `SIGBUS` once the filesystem is full). Such a file's holes must not be mapped.
pub fn holes_allocate(file: &File) -> io::Result<bool> {
    const TMPFS_MAGIC: i64 = 0x0102_1994;
    const RAMFS_MAGIC: i64 = 0x8584_58f6;
    const HUGETLBFS_MAGIC: i64 = 0x9584_58f6;
    let st = rustix::fs::fstatfs(file)?;
    #[allow(clippy::unnecessary_cast)] // f_type's width differs between targets
    let magic = st.f_type as i64;
    Ok(matches!(magic, TMPFS_MAGIC | RAMFS_MAGIC | HUGETLBFS_MAGIC))
}

/// The data extents (offset, length) of the first `len` bytes of `file`, page-aligned (start
/// rounded down, end up), in order, adjacent ones merged, found with `SEEK_DATA`/`SEEK_HOLE`:
/// what of a sparse file needs reading.
pub fn data_extents(file: &File, len: u64) -> io::Result<Vec<(u64, u64)>> {
    use rustix::fs::{SeekFrom, seek};
    let page = PAGE as u64;
    let mut out: Vec<(u64, u64)> = Vec::new();
    let mut at = 0u64;
    while at < len {
        let start = match seek(file, SeekFrom::Data(at)) {
            Ok(s) => s,
            Err(rustix::io::Errno::NXIO) => break,
            Err(e) => return Err(e.into()),
        };
        if start >= len {
            break;
        }
        let end = seek(file, SeekFrom::Hole(start))?.min(len);
        let (s, e) = (start / page * page, end.div_ceil(page) * page);
        match out.last_mut() {
            Some((ls, ll)) if *ls + *ll >= s => *ll = (e - *ls).max(*ll),
            _ => out.push((s, e - s)),
        }
        at = end.max(start + 1);
    }
    Ok(out)
}

/// Maps a full image (`len` bytes of `file`, page `i` at offset `i * 4096`) over `addr`,
/// private and copy-on-write. Returns the number of mappings made.
///
/// Usually one mapping. On a filesystem whose holes allocate when read ([`holes_allocate`]:
/// tmpfs), the range first becomes fresh anonymous memory (zeros) and only the image's data
/// extents are mapped from the file, so that reading a zero page never needs the filesystem
/// (which, full, would answer with `SIGBUS`).
///
/// # Safety
/// As [`map_private`].
pub unsafe fn map_image(addr: *mut u8, len: usize, file: &File) -> io::Result<usize> {
    if !holes_allocate(file)? {
        // SAFETY: forwarded from the caller.
        unsafe { map_private(addr, len, file, 0)? };
        return Ok(1);
    }
    use rustix::mm::{MapFlags, ProtFlags, mmap_anonymous};
    // SAFETY: forwarded from the caller: the range is owned, page-aligned and unused.
    unsafe {
        mmap_anonymous(
            addr.cast(),
            len,
            ProtFlags::READ | ProtFlags::WRITE,
            MapFlags::PRIVATE | MapFlags::FIXED | MapFlags::NORESERVE,
        )
    }?;
    let extents = data_extents(file, len as u64)?;
    for &(off, n) in &extents {
        // SAFETY: every extent lies within the first `len` bytes (clamped above), so inside
        // the caller's range.
        unsafe { map_private(addr.add(off as usize), n as usize, file, off)? };
    }
    Ok(extents.len() + 1)
}

/// Leaves `len` bytes from `addr` out of child processes made by `fork(2)`
/// (`MADV_DONTFORK`). Guest memory must not be shared copy-on-write with a child of the host
/// process: its pages would stop being exclusive to this process, and `/proc/self/pagemap`
/// would no longer report them as written (an incremental checkpoint would miss them); a child
/// has no use for a sandbox's memory either. Mappings made later over the range need it again.
pub fn dont_fork(addr: *mut u8, len: usize) -> io::Result<()> {
    if len == 0 {
        return Ok(());
    }
    // SAFETY: madvise(MADV_DONTFORK) only sets a flag on the mappings of the range; it neither
    // reads nor changes memory, so any range is sound (an unmapped one is an error).
    unsafe { rustix::mm::madvise(addr.cast(), len, rustix::mm::Advice::LinuxDontFork) }
        .map_err(io::Error::from)
}

/// Maps a checked snapshot layer over the `len` bytes of memory at `base`, copy-on-write: a full
/// image over its first `layer.size()` bytes, a delta's runs of pages (packed in its file) over
/// their places. Returns the number of mappings made.
///
/// The layer's pages are strictly increasing and inside its size, and its file is as long as
/// they need (both checked when the [`LayerFile`] was built), so every mapping lies inside
/// `base..base + len` once the layer's size is checked against `len` here, and reads of it never
/// fall past the file's end.
///
/// Errors: `InvalidInput` (nothing mapped) when the layer is larger than `len`; the mmap error
/// otherwise (earlier runs stay mapped).
///
/// # Safety
/// `base..base + len` must be a page-aligned part of a mapping the caller owns and that nothing
/// else reads or writes during the call, as for [`map_private`].
pub unsafe fn map_layer(base: *mut u8, len: usize, layer: &LayerFile) -> io::Result<usize> {
    if layer.size() > len as u64 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "a layer of {} bytes does not fit in {len} bytes of memory",
                layer.size()
            ),
        ));
    }
    let file = layer.file();
    if layer.is_full() {
        if layer.size() == 0 {
            return Ok(0);
        }
        // SAFETY: forwarded from the caller; `layer.size() <= len`, and the file holds
        // `layer.size()` bytes.
        return unsafe { map_image(base, layer.size() as usize, file) };
    }
    let mut off = 0u64;
    let mut n = 0;
    for run in runs(layer.layer().pages()) {
        let run_len = run.count as usize * PAGE;
        // SAFETY: forwarded from the caller: every page is below `layer.size() / PAGE`, so the
        // run lies inside `base..base + len`; the packed file holds `off + run_len` bytes.
        unsafe { map_private(base.add(run.first as usize * PAGE), run_len, file, off)? };
        off += run_len as u64;
        n += 1;
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustix::mm::{MapFlags, ProtFlags};

    struct Anon {
        ptr: *mut u8,
        len: usize,
    }
    impl Anon {
        fn new(len: usize) -> Anon {
            // SAFETY: a fresh anonymous mapping with no address hint.
            let ptr = unsafe {
                rustix::mm::mmap_anonymous(
                    std::ptr::null_mut(),
                    len,
                    ProtFlags::READ | ProtFlags::WRITE,
                    MapFlags::PRIVATE,
                )
            }
            .unwrap();
            Anon {
                ptr: ptr.cast(),
                len,
            }
        }
        #[allow(clippy::mut_from_ref)] // test helper over a raw mapping, used single-threaded
        fn slice(&self) -> &mut [u8] {
            // SAFETY: the mapping is live for self's lifetime; tests use it single-threaded.
            unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
        }
    }
    impl Drop for Anon {
        fn drop(&mut self) {
            // SAFETY: unmapping the mapping this value owns.
            unsafe { rustix::mm::munmap(self.ptr.cast(), self.len).unwrap() };
        }
    }

    #[test]
    fn union_merges_sorted_lists() {
        assert_eq!(union(&[1, 4, 9], &[2, 4, 10, 11]), vec![1, 2, 4, 9, 10, 11]);
        assert_eq!(union(&[], &[3]), vec![3]);
    }

    #[test]
    fn runs_group_consecutive_pages() {
        let r: Vec<_> = runs(&[1, 2, 3, 7, 9, 10]).collect();
        assert_eq!(
            r,
            vec![
                Run { first: 1, count: 3 },
                Run { first: 7, count: 1 },
                Run { first: 9, count: 2 }
            ]
        );
    }

    #[test]
    fn full_image_is_sparse_and_maps_back() {
        let tmp = tempfile::tempdir().unwrap();
        let mem = Anon::new(64 * PAGE);
        mem.slice()[5 * PAGE] = 7;
        mem.slice()[40 * PAGE + 100] = 9;
        let f = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(tmp.path().join("m"))
            .unwrap();
        let w = write_full(&f, mem.slice()).unwrap();
        assert_eq!(w.len, 64 * PAGE as u64);
        assert_eq!(w.stored, 2 * PAGE as u64);
        assert!(verify_file(&f, w.len, w.crc32).unwrap());
        use std::os::unix::fs::MetadataExt;
        assert!(
            f.metadata().unwrap().blocks() * 512 <= 4 * PAGE as u64,
            "zero pages must be holes"
        );

        let target = Anon::new(64 * PAGE);
        // SAFETY: target is owned by this test and unused during the call.
        unsafe { map_private(target.ptr, 64 * PAGE, &f, 0).unwrap() };
        assert_eq!(target.slice()[5 * PAGE], 7);
        assert_eq!(target.slice()[40 * PAGE + 100], 9);
        assert!(
            dirty_pages(target.ptr, target.len).unwrap().is_empty(),
            "nothing written yet"
        );
        // Copy-on-write: writing the mapping does not change the file.
        target.slice()[5 * PAGE] = 1;
        target.slice()[63 * PAGE] = 1;
        let _read_only_touch = target.slice()[20 * PAGE];
        assert_eq!(dirty_pages(target.ptr, target.len).unwrap(), vec![5, 63]);
        let mut b = [0u8; 1];
        f.read_exact_at(&mut b, 5 * PAGE as u64).unwrap();
        assert_eq!(b[0], 7);
    }

    #[test]
    fn delta_layers_apply_in_order() {
        let tmp = tempfile::tempdir().unwrap();
        let mem = Anon::new(16 * PAGE);
        for i in 0..16 {
            mem.slice()[i * PAGE] = i as u8;
        }
        let base = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(tmp.path().join("b"))
            .unwrap();
        write_full(&base, mem.slice()).unwrap();
        // SAFETY: mem is owned by this test.
        unsafe { map_private(mem.ptr, mem.len, &base, 0).unwrap() };
        mem.slice()[3 * PAGE] = 33;
        mem.slice()[4 * PAGE + 1] = 44;
        mem.slice()[10 * PAGE] = 100;
        let dirty = dirty_pages(mem.ptr, mem.len).unwrap();
        assert_eq!(dirty, vec![3, 4, 10]);
        let delta = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(tmp.path().join("d"))
            .unwrap();
        let w = write_delta(&delta, mem.slice(), &dirty).unwrap();
        assert_eq!(w.stored, 3 * PAGE as u64);

        let layer = crate::snapshot::layer::Layer::new(
            16 * PAGE as u64,
            crate::snapshot::LayerKind::Delta,
            crate::snapshot::FileRecord {
                name: "memory.delta".into(),
                len: w.len,
                crc32: w.crc32,
                stored: w.stored,
            },
            1,
            dirty,
        )
        .unwrap();
        let delta = LayerFile::new(layer, delta).unwrap();
        let fresh = Anon::new(16 * PAGE);
        // SAFETY: fresh is owned by this test.
        unsafe {
            map_private(fresh.ptr, fresh.len, &base, 0).unwrap();
            assert!(map_layer(fresh.ptr, 8 * PAGE, &delta).is_err(), "too small");
            assert_eq!(map_layer(fresh.ptr, fresh.len, &delta).unwrap(), 2);
        }
        assert_eq!(fresh.slice(), mem.slice());
    }

    /// On tmpfs, reading a hole through a file mapping allocates a page of the filesystem (and
    /// raises SIGBUS once it is full): `map_image` maps only the data extents there, so reading
    /// every page of the image leaves the file's allocation as it was.
    #[test]
    fn images_on_tmpfs_are_mapped_without_their_holes() {
        // Every Linux system has a tmpfs at /dev/shm.
        let shm = std::path::Path::new("/dev/shm");
        let tmp = tempfile::tempdir_in(shm).unwrap();
        let f = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(tmp.path().join("img"))
            .unwrap();
        assert!(holes_allocate(&f).unwrap(), "/dev/shm is tmpfs");
        let npages = 64;
        let mem = Anon::new(npages * PAGE);
        mem.slice()[PAGE + 3] = 1;
        mem.slice()[2 * PAGE] = 2;
        mem.slice()[40 * PAGE + 9] = 3;
        write_full(&f, mem.slice()).unwrap();
        use std::os::unix::fs::MetadataExt;
        let blocks = f.metadata().unwrap().blocks();
        assert_eq!(
            data_extents(&f, (npages * PAGE) as u64).unwrap(),
            vec![
                (PAGE as u64, 2 * PAGE as u64),
                (40 * PAGE as u64, PAGE as u64)
            ]
        );
        let target = Anon::new(npages * PAGE);
        target.slice().fill(0xee);
        // SAFETY: target is owned by this test and unused during the call.
        let n = unsafe { map_image(target.ptr, npages * PAGE, &f).unwrap() };
        assert_eq!(n, 3, "an anonymous base and two data extents");
        assert_eq!(
            target.slice(),
            mem.slice(),
            "holes read as zeros, data as written"
        );
        assert_eq!(
            f.metadata().unwrap().blocks(),
            blocks,
            "reading the holes allocated nothing in the filesystem"
        );
        // Writes stay private.
        target.slice()[PAGE + 3] = 9;
        let mut b = [0u8; 1];
        f.read_exact_at(&mut b, PAGE as u64 + 3).unwrap();
        assert_eq!(b[0], 1);
    }
}
