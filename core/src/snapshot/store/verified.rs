//! Which data files of a snapshot have had their CRC checked: `.verified` beside them, so that
//! a process resuming a snapshot does not read whole files again that the writer or another
//! process checked (reading a 60 MiB memory image was most of a resume in a new process).
//!
//! An entry names a file, the CRC it matched and the file's identity: device, inode, size,
//! modification and change times (nanoseconds). Any write, truncation, replacement, rename or
//! new link changes the change time, so a file changed in any way after its check is checked
//! again. (Since Linux 6.13, ext4, xfs, btrfs and tmpfs take that time fine-grained once it was
//! looked at, which recording an entry does; on older kernels a change within the same clock
//! tick as the check, a few ms, could go unseen.) What this does not catch is a change below
//! the filesystem (bit rot on the device after the check): that is found only by the first
//! check of each file.
//!
//! The marker is untrusted input like every file in the store: read with a size cap, parsed
//! without panicking, a malformed line ignored. It only ever saves a check; whoever could forge
//! it could as well rewrite the CRC in the manifest. Writing it is best effort (a read-only
//! store simply checks every time).

use std::fs::{self, File, Metadata};
use std::io::{Read, Write};
use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// The marker's name in a snapshot directory (a dot name: never a data file's, see
/// `LocalStore::open_file`).
pub(super) const MARKER: &str = ".verified";
/// Largest marker read; longer ones are ignored.
const MAX_MARKER: u64 = 64 * 1024;
/// Most entries kept.
const MAX_ENTRIES: usize = 64;

/// What identifies one state of a file's contents.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Identity {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl Identity {
    fn of(md: &Metadata) -> Identity {
        Identity {
            dev: md.dev(),
            ino: md.ino(),
            size: md.size(),
            mtime: (md.mtime(), md.mtime_nsec()),
            ctime: (md.ctime(), md.ctime_nsec()),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry {
    name: String,
    crc32: u32,
    id: Identity,
}

fn encode(entries: &[Entry]) -> String {
    let mut out = String::new();
    for e in entries {
        let i = &e.id;
        out.push_str(&format!(
            "{} {:08x} {} {} {} {}.{} {}.{}\n",
            e.name, e.crc32, i.dev, i.ino, i.size, i.mtime.0, i.mtime.1, i.ctime.0, i.ctime.1
        ));
    }
    out
}

/// The well-formed entries of a marker (at most [`MAX_ENTRIES`]); anything else is skipped.
fn parse(bytes: &[u8]) -> Vec<Entry> {
    let Ok(text) = std::str::from_utf8(bytes) else {
        return Vec::new();
    };
    let time = |s: &str| -> Option<(i64, i64)> {
        let (a, b) = s.split_once('.')?;
        Some((a.parse().ok()?, b.parse().ok()?))
    };
    let entry = |line: &str| -> Option<Entry> {
        let f: Vec<&str> = line.split(' ').collect();
        let [name, crc, dev, ino, size, mtime, ctime] = f[..] else {
            return None;
        };
        if name.is_empty() || name.len() > 255 || crc.len() != 8 {
            return None;
        }
        Some(Entry {
            name: name.to_string(),
            crc32: u32::from_str_radix(crc, 16).ok()?,
            id: Identity {
                dev: dev.parse().ok()?,
                ino: ino.parse().ok()?,
                size: size.parse().ok()?,
                mtime: time(mtime)?,
                ctime: time(ctime)?,
            },
        })
    };
    text.lines().filter_map(entry).take(MAX_ENTRIES).collect()
}

fn read(dir: &Path) -> Vec<Entry> {
    let Ok(f) = File::open(dir.join(MARKER)) else {
        return Vec::new();
    };
    let mut bytes = Vec::new();
    if f.take(MAX_MARKER + 1).read_to_end(&mut bytes).is_err() || bytes.len() as u64 > MAX_MARKER {
        return Vec::new();
    }
    parse(&bytes)
}

/// Whether `name` in `dir`, as `md` describes it now, had its CRC checked against `crc32`.
pub(super) fn matches(dir: &Path, name: &str, md: &Metadata, crc32: u32) -> bool {
    let id = Identity::of(md);
    read(dir)
        .iter()
        .any(|e| e.name == name && e.crc32 == crc32 && e.id == id)
}

/// Records that the files `(name, crc32)` of `dir`, as they are now, match their CRCs (best
/// effort: nothing is reported when the marker cannot be written).
pub(super) fn record(dir: &Path, files: &[(&str, u32)]) {
    let mut entries = read(dir);
    for (name, crc32) in files {
        let Ok(md) = fs::symlink_metadata(dir.join(name)) else {
            continue;
        };
        if !md.is_file() || name.contains(char::is_whitespace) {
            continue;
        }
        entries.retain(|e| e.name != *name);
        entries.push(Entry {
            name: (*name).to_string(),
            crc32: *crc32,
            id: Identity::of(&md),
        });
    }
    let skip = entries.len().saturating_sub(MAX_ENTRIES);
    let text = encode(&entries[skip..]);
    let tmp = dir.join(format!(
        "{MARKER}.{}-{:08x}",
        std::process::id(),
        rand::random::<u32>()
    ));
    let written = File::create_new(&tmp)
        .and_then(|mut f| f.write_all(text.as_bytes()))
        .and_then(|()| fs::rename(&tmp, dir.join(MARKER)));
    if written.is_err() {
        let _ = fs::remove_file(&tmp);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_recorded_file_matches_until_it_changes() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path();
        fs::write(d.join("memory.img"), b"abc").unwrap();
        let md = || fs::metadata(d.join("memory.img")).unwrap();
        assert!(!matches(d, "memory.img", &md(), 7));
        record(d, &[("memory.img", 7)]);
        assert!(matches(d, "memory.img", &md(), 7));
        assert!(!matches(d, "memory.img", &md(), 8), "another CRC");
        assert!(!matches(d, "fs.tar", &md(), 7), "another file");
        // A byte changed in place, size and name unchanged: checked again.
        use std::os::unix::fs::FileExt;
        File::options()
            .write(true)
            .open(d.join("memory.img"))
            .unwrap()
            .write_all_at(b"X", 1)
            .unwrap();
        assert!(!matches(d, "memory.img", &md(), 7));
        // Recorded again, and a second file beside it: both kept.
        record(d, &[("memory.img", 9)]);
        fs::write(d.join("fs.tar"), b"t").unwrap();
        record(d, &[("fs.tar", 1)]);
        assert!(matches(d, "memory.img", &md(), 9));
        let tar = fs::metadata(d.join("fs.tar")).unwrap();
        assert!(matches(d, "fs.tar", &tar, 1));
        // A new link changes the change time too.
        fs::hard_link(d.join("fs.tar"), d.join("other")).unwrap();
        let tar = fs::metadata(d.join("fs.tar")).unwrap();
        assert!(!matches(d, "fs.tar", &tar, 1));
        // No stray temporary files.
        let names: Vec<_> = fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.starts_with(MARKER))
            .collect();
        assert_eq!(names, [MARKER]);
    }

    #[test]
    fn a_garbled_or_oversized_marker_matches_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path();
        fs::write(d.join("f"), b"x").unwrap();
        let md = fs::metadata(d.join("f")).unwrap();
        record(d, &[("f", 5)]);
        let good = fs::read(d.join(MARKER)).unwrap();
        let mut big = good.clone();
        big.resize(MAX_MARKER as usize + 1, b'\n');
        for bad in [b"\xff\xfe".to_vec(), b"f 00000005 1 2".to_vec(), big] {
            fs::write(d.join(MARKER), &bad).unwrap();
            assert!(!matches(d, "f", &md, 5));
        }
    }

    fn entry() -> impl Strategy<Value = Entry> {
        (
            "[a-z.]{1,20}",
            any::<u32>(),
            any::<(u64, u64, u64)>(),
            any::<((i64, i64), (i64, i64))>(),
        )
            .prop_map(|(name, crc32, (dev, ino, size), (mtime, ctime))| Entry {
                name,
                crc32,
                id: Identity {
                    dev,
                    ino,
                    size,
                    mtime,
                    ctime,
                },
            })
    }

    proptest! {
        #[test]
        fn parse_never_panics_and_keeps_a_bounded_count(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
            prop_assert!(parse(&bytes).len() <= MAX_ENTRIES);
        }

        #[test]
        fn entries_round_trip(entries in proptest::collection::vec(entry(), 0..MAX_ENTRIES)) {
            prop_assert_eq!(parse(encode(&entries).as_bytes()), entries);
        }
    }
}
