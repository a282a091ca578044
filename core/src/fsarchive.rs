//! The sandbox's own filesystem inside a snapshot: a tar archive of its root directory.
//!
//! Symlinks are archived as links (never followed), so a link pointing outside the sandbox
//! cannot pull host files into a snapshot. Extraction goes through the `tar` crate's
//! `unpack`, which refuses entries that would land outside the destination.

use std::fs::File;
use std::io::{self, BufReader, BufWriter, Write};
use std::path::Path;

use crate::memimage::Written;

struct Hashing<W> {
    inner: W,
    hasher: crc32fast::Hasher,
    len: u64,
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.len += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Archives the tree under `root` into `out`.
pub fn pack(root: &Path, out: &File) -> io::Result<Written> {
    let w = Hashing {
        inner: BufWriter::with_capacity(1 << 20, out),
        hasher: crc32fast::Hasher::new(),
        len: 0,
    };
    let mut b = tar::Builder::new(w);
    b.follow_symlinks(false);
    b.mode(tar::HeaderMode::Complete);
    b.append_dir_all(".", root)?;
    let mut w = b.into_inner()?;
    w.flush()?;
    Ok(Written {
        len: w.len,
        stored: w.len,
        crc32: w.hasher.finalize(),
    })
}

/// Extracts an archive made by [`pack`] into the (empty) directory `dest`.
pub fn unpack(archive: &File, dest: &Path) -> io::Result<()> {
    use std::io::Seek;
    (&*archive).seek(io::SeekFrom::Start(0))?;
    let mut a = tar::Archive::new(BufReader::with_capacity(1 << 20, archive));
    a.set_preserve_permissions(true);
    a.set_preserve_mtime(true);
    a.set_overwrite(true);
    a.unpack(dest)
}

/// Removes everything inside `dir` (not `dir` itself), e.g. after an extraction that failed
/// half-way.
pub fn clear(dir: &Path) -> io::Result<()> {
    for ent in std::fs::read_dir(dir)? {
        let ent = ent?;
        if ent.file_type()?.is_dir() {
            std::fs::remove_dir_all(ent.path())?;
        } else {
            std::fs::remove_file(ent.path())?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_keeps_links_as_links() {
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("src");
        std::fs::create_dir_all(src.join("a/b")).unwrap();
        std::fs::write(src.join("a/b/f.txt"), b"data").unwrap();
        std::fs::write(tmp.path().join("host-secret"), b"secret").unwrap();
        std::os::unix::fs::symlink(tmp.path().join("host-secret"), src.join("link")).unwrap();
        let f = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(tmp.path().join("fs.tar"))
            .unwrap();
        let w = pack(&src, &f).map_err(|e| format!("{e:?}")).unwrap();
        assert!(crate::memimage::verify_file(&f, w.len, w.crc32).unwrap());
        let dst = tmp.path().join("dst");
        std::fs::create_dir(&dst).unwrap();
        unpack(&f, &dst).unwrap();
        assert_eq!(std::fs::read(dst.join("a/b/f.txt")).unwrap(), b"data");
        let md = std::fs::symlink_metadata(dst.join("link")).unwrap();
        assert!(
            md.file_type().is_symlink(),
            "the link stays a link; host content not archived"
        );
    }
}
