//! Open handles: `OPEN`/`OPENDIR`, `CREATE`, `READ`, `WRITE`, `READDIR`, `FSYNC`/`FSYNCDIR` and
//! `RELEASE`/`RELEASEDIR`. Files are opened `FOPEN_DIRECT_IO` (the guest caches no volume
//! data); reads and listings are capped at [`MAX_IO`]; directory listings are cached per
//! handle within [`MAX_CACHED_ENTRIES`] altogether.

use rustix::fs::{Dir, FileType, Mode, OFlags};
use rustix::io::Errno;
use zerocopy::IntoBytes;

use super::super::Res;
use super::super::abi::{
    CreateIn, Dirent, FOPEN_DIRECT_IO, FsyncIn, OpenIn, OpenOut, ReadIn, ReleaseIn, WriteIn,
    WriteOut, cstr, take,
};
use super::super::nodes::{MAX_CACHED_ENTRIES, allowed_open_flags, is_write};
use super::super::paths::{beneath, leaf, os};
use super::attrs::entry_out;
use super::{MAX_IO, VolumeServer};

impl VolumeServer {
    /// `OPEN`, or `OPENDIR` when `dir`.
    pub(super) fn open_handle(
        &mut self,
        id: u64,
        body: &[u8],
        dir: bool,
        out: &mut Vec<u8>,
    ) -> Res<()> {
        let (o, _) = take::<OpenIn>(body)?;
        if !dir && is_write(o.flags) {
            self.writable()?;
        }
        self.table.handle_room()?;
        let path = self.table.path(id)?.to_vec();
        let flags = if dir {
            OFlags::RDONLY.bits()
        } else {
            allowed_open_flags(o.flags).bits()
        };
        let fd = self.reopen(&path, flags, dir)?;
        let fh = self.table.add_handle(path, flags, dir, fd);
        let open_flags = if dir { 0 } else { FOPEN_DIRECT_IO };
        out.extend_from_slice(
            OpenOut {
                fh,
                open_flags,
                padding: 0,
            }
            .as_bytes(),
        );
        Ok(())
    }

    pub(super) fn create(&mut self, id: u64, body: &[u8], out: &mut Vec<u8>) -> Res<()> {
        self.writable()?;
        let (c, rest) = take::<CreateIn>(body)?;
        self.table.handle_room()?;
        let (name, _) = cstr(rest)?;
        let (path, dir) = self.child(id, name)?;
        let keep = allowed_open_flags(c.flags);
        let create = OFlags::from_bits_retain(c.flags) & (OFlags::EXCL | OFlags::TRUNC);
        // Non-blocking, as in `reopen`: the name may be an existing FIFO.
        let fd = rustix::fs::openat2(
            &dir,
            os(leaf(&path)),
            keep | create | OFlags::CREATE | OFlags::NOFOLLOW | OFlags::CLOEXEC | OFlags::NONBLOCK,
            Mode::from_bits_truncate(c.mode & 0o7777),
            beneath(),
        )?;
        let st = rustix::fs::fstat(&fd)?;
        let nodeid = self.table.remember(path.clone())?;
        let fh = self.table.add_handle(path, keep.bits(), false, fd);
        out.extend_from_slice(entry_out(nodeid, &st).as_bytes());
        out.extend_from_slice(
            OpenOut {
                fh,
                open_flags: FOPEN_DIRECT_IO,
                padding: 0,
            }
            .as_bytes(),
        );
        Ok(())
    }

    pub(super) fn read(&mut self, body: &[u8], out: &mut Vec<u8>) -> Res<()> {
        let (r, _) = take::<ReadIn>(body)?;
        let size = r.size.min(MAX_IO) as usize;
        let fd = self.handle_fd(r.fh)?;
        let start = out.len();
        out.resize(start + size, 0);
        let mut done = 0;
        while done < size {
            match rustix::io::pread(fd, &mut out[start + done..], r.offset + done as u64) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(Errno::INTR) => {}
                Err(e) => return Err(e),
            }
        }
        out.truncate(start + done);
        Ok(())
    }

    pub(super) fn write(&mut self, body: &[u8], out: &mut Vec<u8>) -> Res<()> {
        self.writable()?;
        let (w, data) = take::<WriteIn>(body)?;
        let data = data.get(..w.size as usize).ok_or(Errno::INVAL)?;
        let append = self
            .table
            .handles
            .get(&w.fh)
            .is_some_and(|h| OFlags::from_bits_retain(h.flags).contains(OFlags::APPEND));
        let fd = self.handle_fd(w.fh)?;
        let mut done = 0;
        while done < data.len() {
            // An O_APPEND descriptor appends whatever the offset.
            let r = if append {
                rustix::io::write(fd, &data[done..])
            } else {
                rustix::io::pwrite(fd, &data[done..], w.offset + done as u64)
            };
            match r {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(Errno::INTR) => {}
                Err(e) if done == 0 => return Err(e),
                Err(_) => break,
            }
        }
        out.extend_from_slice(
            WriteOut {
                size: done as u32,
                padding: 0,
            }
            .as_bytes(),
        );
        Ok(())
    }

    pub(super) fn release(&mut self, body: &[u8]) -> Res<()> {
        let (r, _) = take::<ReleaseIn>(body)?;
        self.table.handles.remove(&r.fh);
        Ok(())
    }

    pub(super) fn fsync(&mut self, body: &[u8]) -> Res<()> {
        let (f, _) = take::<FsyncIn>(body)?;
        let fd = self.handle_fd(f.fh)?;
        // A read-only descriptor of a directory may refuse fsync: nothing to flush.
        match rustix::fs::fsync(fd) {
            Ok(()) | Err(Errno::BADF | Errno::INVAL) => Ok(()),
            Err(e) => Err(e),
        }
    }

    pub(super) fn readdir(&mut self, body: &[u8], out: &mut Vec<u8>) -> Res<()> {
        let (r, _) = take::<ReadIn>(body)?;
        let fresh =
            r.offset == 0 || (self.table.handles.get(&r.fh)).is_none_or(|h| h.entries.is_none());
        if fresh {
            let fd = self.handle_fd(r.fh)?;
            let mut entries = Vec::new();
            for e in Dir::read_from(fd)? {
                let e = e?;
                let kind = FileType::as_raw_mode(e.file_type()) >> 12;
                entries.push((e.ino(), kind, e.file_name().to_bytes().to_vec()));
            }
            entries.sort_by(|a, b| a.2.cmp(&b.2));
            // The listings cached for other handles make room: a guest holding many handles
            // on a large directory cannot multiply it in host memory. An evicted handle reads
            // its directory again at its next READDIR.
            let handles = &mut self.table.handles;
            let cached: usize = (handles.iter())
                .filter(|&(&fh, _)| fh != r.fh)
                .filter_map(|(_, h)| h.entries.as_ref().map(Vec::len))
                .sum();
            if cached + entries.len() > MAX_CACHED_ENTRIES {
                for h in handles.values_mut() {
                    h.entries = None;
                }
            }
            if let Some(h) = handles.get_mut(&r.fh) {
                h.entries = Some(entries);
            }
        }
        let h = self.table.handles.get(&r.fh).ok_or(Errno::BADF)?;
        let entries = h.entries.as_deref().unwrap_or_default();
        // The guest's size is capped like a READ's: a listing never makes a larger reply.
        let limit = out.len() + r.size.min(MAX_IO) as usize;
        for (i, (ino, kind, name)) in entries.iter().enumerate().skip(r.offset as usize) {
            let rec = size_of::<Dirent>() + name.len();
            let padded = rec.next_multiple_of(8);
            if out.len() + padded > limit {
                break;
            }
            let d = Dirent {
                ino: *ino,
                off: i as u64 + 1,
                namelen: name.len() as u32,
                kind: *kind,
            };
            out.extend_from_slice(d.as_bytes());
            out.extend_from_slice(name);
            out.resize(out.len() + (padded - rec), 0);
        }
        Ok(())
    }
}
