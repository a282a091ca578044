#![allow(clippy::unwrap_used)]
use std::path::Path;

use rustix::fs::FileType;
use zerocopy::{FromBytes, FromZeros, Immutable, IntoBytes};

use super::abi::*;
use super::*;

struct Guest {
    s: VolumeServer,
    unique: u64,
}

impl Guest {
    fn new(root: &Path, read_only: bool) -> Guest {
        Guest {
            s: VolumeServer::open(root, read_only, None).unwrap(),
            unique: 0,
        }
    }

    /// The bytes of a request: header, then `body`.
    fn request(&self, opcode: u32, nodeid: u64, body: &[u8]) -> Vec<u8> {
        let h = InHeader {
            len: (size_of::<InHeader>() + body.len()) as u32,
            opcode,
            unique: self.unique,
            nodeid,
            uid: 0,
            gid: 0,
            pid: 1,
            padding: 0,
        };
        let mut req = h.as_bytes().to_vec();
        req.extend_from_slice(body);
        req
    }

    /// One request; the reply's body, or the errno.
    fn call(&mut self, opcode: u32, nodeid: u64, body: &[u8]) -> std::result::Result<Vec<u8>, i32> {
        self.unique += 1;
        let req = self.request(opcode, nodeid, body);
        let mut reply = Vec::new();
        self.s.handle(&req, &mut reply);
        let (out, rest) = OutHeader::read_from_prefix(&reply).unwrap();
        assert_eq!(out.unique, self.unique);
        assert_eq!(out.len as usize, reply.len());
        if out.error != 0 {
            assert!(rest.is_empty());
            Err(-out.error)
        } else {
            Ok(rest.to_vec())
        }
    }

    fn lookup(&mut self, parent: u64, name: &str) -> std::result::Result<EntryOut, i32> {
        let body = self.call(LOOKUP, parent, &cstring(name))?;
        Ok(EntryOut::read_from_prefix(&body).unwrap().0)
    }

    fn open(&mut self, node: u64, flags: i32) -> std::result::Result<u64, i32> {
        let body = self.call(OPEN, node, open_in(flags).as_bytes())?;
        let out = OpenOut::read_from_prefix(&body).unwrap().0;
        assert_eq!(out.open_flags & FOPEN_DIRECT_IO, FOPEN_DIRECT_IO);
        Ok(out.fh)
    }

    fn read(&mut self, node: u64, fh: u64, size: u32) -> std::result::Result<Vec<u8>, i32> {
        self.call(READ, node, read_in(fh, 0, size).as_bytes())
    }

    fn write(
        &mut self,
        node: u64,
        fh: u64,
        offset: u64,
        data: &[u8],
    ) -> std::result::Result<u32, i32> {
        let w = WriteIn {
            fh,
            offset,
            size: data.len() as u32,
            write_flags: 0,
            lock_owner: 0,
            flags: 0,
            padding: 0,
        };
        let mut body = w.as_bytes().to_vec();
        body.extend_from_slice(data);
        let out = self.call(WRITE, node, &body)?;
        Ok(WriteOut::read_from_prefix(&out).unwrap().0.size)
    }

    fn create(&mut self, parent: u64, name: &str) -> std::result::Result<(u64, u64), i32> {
        let out = self.call(CREATE, parent, &with_name(&create_in(), name))?;
        let (e, rest) = EntryOut::read_from_prefix(&out).unwrap();
        let o = OpenOut::read_from_prefix(rest).unwrap().0;
        Ok((e.nodeid, o.fh))
    }

    fn mkdir(&mut self, parent: u64, name: &str) -> std::result::Result<EntryOut, i32> {
        let m = MkdirIn {
            mode: 0o755,
            umask: 0,
        };
        let out = self.call(MKDIR, parent, &with_name(&m, name))?;
        Ok(EntryOut::read_from_prefix(&out).unwrap().0)
    }

    fn mknod(&mut self, parent: u64, name: &str, mode: u32) -> std::result::Result<Vec<u8>, i32> {
        let m = MknodIn {
            mode,
            rdev: 0,
            umask: 0,
            padding: 0,
        };
        self.call(MKNOD, parent, &with_name(&m, name))
    }

    fn opendir(&mut self, node: u64) -> std::result::Result<u64, i32> {
        let out = self.call(OPENDIR, node, open_in(libc::O_RDONLY).as_bytes())?;
        Ok(OpenOut::read_from_prefix(&out).unwrap().0.fh)
    }

    fn readdir(&mut self, fh: u64, offset: u64, size: u32) -> std::result::Result<Vec<u8>, i32> {
        self.call(READDIR, ROOT_ID, read_in(fh, offset, size).as_bytes())
    }

    fn getattr(&mut self, node: u64) -> std::result::Result<Attr, i32> {
        let g = GetattrIn {
            flags: 0,
            dummy: 0,
            fh: 0,
        };
        let out = self.call(GETATTR, node, g.as_bytes())?;
        Ok(AttrOut::read_from_prefix(&out).unwrap().0.attr)
    }
}

fn cstring(s: &str) -> Vec<u8> {
    let mut v = s.as_bytes().to_vec();
    v.push(0);
    v
}

/// Fixed-size arguments, then a NUL-terminated name: the body of most requests on entries.
fn with_name(args: &(impl IntoBytes + Immutable), name: &str) -> Vec<u8> {
    let mut body = args.as_bytes().to_vec();
    body.extend_from_slice(&cstring(name));
    body
}

/// `OPEN`'s and `OPENDIR`'s arguments.
fn open_in(flags: i32) -> OpenIn {
    OpenIn {
        flags: flags as u32,
        open_flags: 0,
    }
}

/// `READ`'s and `READDIR`'s arguments.
fn read_in(fh: u64, offset: u64, size: u32) -> ReadIn {
    ReadIn {
        fh,
        offset,
        size,
        read_flags: 0,
        lock_owner: 0,
        flags: 0,
        padding: 0,
    }
}

/// `CREATE`'s arguments: a new file, read-write, mode 0644.
fn create_in() -> CreateIn {
    CreateIn {
        flags: (libc::O_RDWR | libc::O_CREAT) as u32,
        mode: 0o644,
        umask: 0,
        open_flags: 0,
    }
}

fn init(g: &mut Guest) {
    let i = InitIn {
        major: 7,
        minor: 36,
        max_readahead: 1 << 20,
        flags: FUSE_BIG_WRITES | FUSE_MAX_PAGES | (1 << 0),
    };
    let out = g.call(INIT, 0, i.as_bytes()).unwrap();
    let o = InitOut::read_from_prefix(&out).unwrap().0;
    assert_eq!((o.major, o.minor), (7, FUSE_MINOR));
    assert_eq!(o.max_write, MAX_IO);
    assert_eq!(o.flags, FUSE_BIG_WRITES | FUSE_MAX_PAGES);
}

#[test]
fn reads_host_files_and_writes_new_ones() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("a.txt"), b"from the host").unwrap();
    let mut g = Guest::new(dir.path(), false);
    init(&mut g);
    let e = g.lookup(ROOT_ID, "a.txt").unwrap();
    assert_eq!(e.attr.size, 13);
    assert_eq!((e.entry_valid, e.attr_valid), (0, 0), "no guest caching");
    let fh = g.open(e.nodeid, libc::O_RDONLY).unwrap();
    assert_eq!(g.read(e.nodeid, fh, 4096).unwrap(), b"from the host");
    assert_eq!(g.lookup(ROOT_ID, "missing").unwrap_err(), libc::ENOENT);

    let (node, fh) = g.create(ROOT_ID, "new.txt").unwrap();
    assert_eq!(g.write(node, fh, 0, b"hello ").unwrap(), 6);
    assert_eq!(g.write(node, fh, 6, b"volume").unwrap(), 6);
    assert_eq!(
        std::fs::read(dir.path().join("new.txt")).unwrap(),
        b"hello volume"
    );
    assert_eq!(g.getattr(node).unwrap().size, 12);

    // mkdir, readdir, rename, unlink.
    let sub = g.mkdir(ROOT_ID, "sub").unwrap();
    assert!(dir.path().join("sub").is_dir());
    let dfh = g.opendir(ROOT_ID).unwrap();
    let listing = g.readdir(dfh, 0, 4096).unwrap();
    let mut names = Vec::new();
    let mut rest = &listing[..];
    while let Ok((d, tail)) = Dirent::read_from_prefix(rest) {
        names.push(String::from_utf8(tail[..d.namelen as usize].to_vec()).unwrap());
        let rec = (size_of::<Dirent>() + d.namelen as usize).next_multiple_of(8);
        rest = &rest[rec.min(rest.len())..];
    }
    assert_eq!(names, [".", "..", "a.txt", "new.txt", "sub"]);

    let mut rn = RenameIn { newdir: sub.nodeid }.as_bytes().to_vec();
    rn.extend_from_slice(&cstring("new.txt"));
    rn.extend_from_slice(&cstring("moved.txt"));
    g.call(RENAME, ROOT_ID, &rn).unwrap();
    assert!(dir.path().join("sub/moved.txt").is_file());
    // The node follows its file, and so does the open handle.
    assert_eq!(g.getattr(node).unwrap().size, 12);
    assert_eq!(
        g.s.state()
            .handles
            .iter()
            .find(|h| h.fh == fh)
            .unwrap()
            .path,
        b"sub/moved.txt"
    );
    g.call(UNLINK, sub.nodeid, &cstring("moved.txt")).unwrap();
    assert!(!dir.path().join("sub/moved.txt").exists());
}

#[test]
fn nothing_outside_the_directory_is_reachable() {
    let outside = tempfile::tempdir().unwrap();
    std::fs::write(outside.path().join("secret"), b"host secret").unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(outside.path(), dir.path().join("out")).unwrap();
    std::os::unix::fs::symlink(outside.path().join("secret"), dir.path().join("s")).unwrap();
    std::os::unix::fs::symlink("../../../../../../../..", dir.path().join("up")).unwrap();
    let secret_mode = || {
        std::fs::metadata(outside.path().join("secret"))
            .unwrap()
            .permissions()
            .mode()
    };
    let mode_before = secret_mode();
    let mut g = Guest::new(dir.path(), false);
    init(&mut g);

    // Names are single components.
    for bad in ["..", ".", "a/b", "../x", ""] {
        assert_eq!(g.lookup(ROOT_ID, bad).unwrap_err(), libc::EINVAL, "{bad:?}");
    }
    // A symlink is reported as one (the guest resolves it in its own namespace) ...
    let out = g.lookup(ROOT_ID, "out").unwrap();
    assert_eq!(FileType::from_raw_mode(out.attr.mode), FileType::Symlink);
    let s = g.lookup(ROOT_ID, "s").unwrap();
    let up = g.lookup(ROOT_ID, "up").unwrap();
    // ... but a hostile guest treating it as a directory or file gets nowhere.
    assert!(g.lookup(out.nodeid, "secret").is_err());
    assert!(g.lookup(up.nodeid, "etc").is_err());
    assert!(g.open(s.nodeid, libc::O_RDONLY).is_err());
    assert!(g.open(out.nodeid, libc::O_RDONLY).is_err());
    let body = with_name(&create_in(), "planted");
    assert!(g.call(CREATE, out.nodeid, &body).is_err());
    // chmod and truncate of the symlink never reach its target.
    let mut sa = SetattrIn::new_zeroed();
    sa.valid = FATTR_MODE;
    sa.mode = 0o777;
    assert!(g.call(SETATTR, s.nodeid, sa.as_bytes()).is_err());
    sa.valid = FATTR_SIZE;
    sa.size = 0;
    assert!(g.call(SETATTR, s.nodeid, sa.as_bytes()).is_err());
    assert_eq!(
        std::fs::read(outside.path().join("secret")).unwrap(),
        b"host secret"
    );
    assert_eq!(secret_mode(), mode_before);
    assert!(!outside.path().join("planted").exists());
    // Unknown node ids and handles are refused.
    assert_eq!(g.getattr(999).unwrap_err(), libc::ESTALE);
    assert_eq!(g.read(ROOT_ID, 999, 10).unwrap_err(), libc::EBADF);
}

use std::os::unix::fs::PermissionsExt;

#[test]
fn a_read_only_volume_refuses_every_change() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("a"), b"keep").unwrap();
    let mut g = Guest::new(dir.path(), true);
    init(&mut g);
    let a = g.lookup(ROOT_ID, "a").unwrap();
    assert_eq!(g.open(a.nodeid, libc::O_RDWR).unwrap_err(), libc::EROFS);
    assert_eq!(
        g.open(a.nodeid, libc::O_WRONLY | libc::O_TRUNC)
            .unwrap_err(),
        libc::EROFS
    );
    let fh = g.open(a.nodeid, libc::O_RDONLY).unwrap();
    assert_eq!(g.write(a.nodeid, fh, 0, b"x").unwrap_err(), libc::EROFS);
    assert_eq!(g.create(ROOT_ID, "b").unwrap_err(), libc::EROFS);
    assert_eq!(
        g.call(UNLINK, ROOT_ID, &cstring("a")).unwrap_err(),
        libc::EROFS
    );
    let mut sa = SetattrIn::new_zeroed();
    sa.valid = FATTR_SIZE;
    assert_eq!(
        g.call(SETATTR, a.nodeid, sa.as_bytes()).unwrap_err(),
        libc::EROFS
    );
    assert_eq!(g.read(a.nodeid, fh, 100).unwrap(), b"keep");
    assert_eq!(std::fs::read(dir.path().join("a")).unwrap(), b"keep");
}

#[test]
fn node_ids_and_open_handles_survive_a_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("d")).unwrap();
    std::fs::write(dir.path().join("d/f"), b"version 1").unwrap();
    std::fs::write(dir.path().join("gone"), b"x").unwrap();
    let mut g = Guest::new(dir.path(), false);
    init(&mut g);
    let d = g.lookup(ROOT_ID, "d").unwrap();
    let f = g.lookup(d.nodeid, "f").unwrap();
    let fh = g.open(f.nodeid, libc::O_RDWR).unwrap();
    let gone = g.lookup(ROOT_ID, "gone").unwrap();
    let gone_fh = g.open(gone.nodeid, libc::O_RDONLY).unwrap();
    let state = g.s.state();
    let json = serde_json::to_vec(&state).unwrap();
    drop(g);

    // While the sandbox sleeps, the host changes the directory.
    std::fs::write(dir.path().join("d/f"), b"version 2, longer").unwrap();
    std::fs::remove_file(dir.path().join("gone")).unwrap();

    let state: VolumeState = serde_json::from_slice(&json).unwrap();
    let mut g = Guest {
        s: VolumeServer::open(dir.path(), false, Some(&state)).unwrap(),
        unique: 100,
    };
    assert_eq!(g.getattr(f.nodeid).unwrap().size, 17);
    assert_eq!(g.read(f.nodeid, fh, 100).unwrap(), b"version 2, longer");
    assert_eq!(g.write(f.nodeid, fh, 0, b"V").unwrap(), 1);
    assert_eq!(
        std::fs::read(dir.path().join("d/f")).unwrap(),
        b"Version 2, longer"
    );
    assert_eq!(g.getattr(gone.nodeid).unwrap_err(), libc::ENOENT);
    assert_eq!(g.read(gone.nodeid, gone_fh, 10).unwrap_err(), libc::EIO);
    // New ids never collide with restored ones.
    let (n, h) = g.create(d.nodeid, "new").unwrap();
    assert!(n >= state.next_id && h >= state.next_id && n != h);
    // A state from another directory is not applied.
    let other = tempfile::tempdir().unwrap();
    let mut g = Guest {
        s: VolumeServer::open(other.path(), false, Some(&state)).unwrap(),
        unique: 0,
    };
    assert_eq!(g.getattr(f.nodeid).unwrap_err(), libc::ESTALE);
}

/// A snapshot's handle table is untrusted: a handle recorded with flags `OPEN` never keeps
/// (create, truncate) is refused with the whole state, and on a volume granted read-only a
/// handle recorded for writing is reopened for reading only.
#[test]
fn restored_handles_never_write_what_the_snapshot_says() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("f"), b"keep me").unwrap();
    let state = |flags: u32| VolumeState {
        root: dir.path().to_path_buf(),
        nodes: vec![NodeSnap {
            id: 2,
            path: b"f".to_vec(),
            lookups: 1,
        }],
        handles: vec![HandleSnap {
            fh: 3,
            path: b"f".to_vec(),
            flags,
            dir: false,
        }],
        next_id: 10,
    };
    let truncating = (libc::O_WRONLY | libc::O_TRUNC | libc::O_CREAT | libc::O_APPEND) as u32;
    for read_only in [true, false] {
        let e = VolumeServer::open(dir.path(), read_only, Some(&state(truncating))).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::InvalidData, "{e}");
    }
    assert_eq!(std::fs::read(dir.path().join("f")).unwrap(), b"keep me");
    let appending = state((libc::O_WRONLY | libc::O_APPEND) as u32);
    let mut g = Guest {
        s: VolumeServer::open(dir.path(), true, Some(&appending)).unwrap(),
        unique: 0,
    };
    assert_eq!(g.read(2, 3, 100).unwrap(), b"keep me", "opened for reading");
    assert_eq!(g.write(2, 3, 0, b"x").unwrap_err(), libc::EROFS);
    assert_eq!(std::fs::read(dir.path().join("f")).unwrap(), b"keep me");
    // Writable volume: the write mode stays.
    let mut g = Guest {
        s: VolumeServer::open(dir.path(), false, Some(&appending)).unwrap(),
        unique: 0,
    };
    assert_eq!(g.write(2, 3, 0, b"K").unwrap(), 1);
    assert_eq!(std::fs::read(dir.path().join("f")).unwrap(), b"keep meK");
}

#[test]
fn links_special_files_attributes_and_renames() {
    use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
    let dir = tempfile::tempdir().unwrap();
    let host = |p: &str| dir.path().join(p);
    std::fs::write(host("a"), b"0123456789").unwrap();
    std::fs::write(host("b"), b"bee").unwrap();
    let mut g = Guest::new(dir.path(), false);
    init(&mut g);
    let a = g.lookup(ROOT_ID, "a").unwrap();

    // Symlink and readlink (the target is stored as given, never resolved by the host).
    let mut body = cstring("ln");
    body.extend_from_slice(&cstring("a"));
    let ln = EntryOut::read_from_prefix(&g.call(SYMLINK, ROOT_ID, &body).unwrap())
        .unwrap()
        .0;
    assert_eq!(g.call(READLINK, ln.nodeid, &[]).unwrap(), b"a");
    assert_eq!(std::fs::read_link(host("ln")).unwrap(), Path::new("a"));

    // A hard link.
    let mut body = LinkIn {
        oldnodeid: a.nodeid,
    }
    .as_bytes()
    .to_vec();
    body.extend_from_slice(&cstring("hard"));
    g.call(LINK, ROOT_ID, &body).unwrap();
    assert_eq!(
        std::fs::metadata(host("hard")).unwrap().ino(),
        std::fs::metadata(host("a")).unwrap().ino()
    );

    // mknod: regular files and FIFOs, no devices.
    let mknod = |g: &mut Guest, name: &str, mode: u32| g.mknod(ROOT_ID, name, mode);
    mknod(&mut g, "reg", libc::S_IFREG | 0o600).unwrap();
    mknod(&mut g, "fifo", libc::S_IFIFO | 0o600).unwrap();
    assert_eq!(
        mknod(&mut g, "dev", libc::S_IFCHR | 0o600).unwrap_err(),
        libc::EPERM
    );
    assert!(host("reg").is_file());
    assert!(
        std::fs::metadata(host("fifo"))
            .unwrap()
            .file_type()
            .is_fifo()
    );
    assert!(!host("dev").exists());

    // setattr: mode, size, times; chown only to the guest's root.
    let mut sa = SetattrIn::new_zeroed();
    sa.valid = FATTR_MODE | FATTR_SIZE | FATTR_MTIME;
    sa.mode = 0o640;
    sa.size = 4;
    sa.mtime = 1_000_000_000;
    let attr = AttrOut::read_from_prefix(&g.call(SETATTR, a.nodeid, sa.as_bytes()).unwrap())
        .unwrap()
        .0
        .attr;
    assert_eq!(
        (attr.size, attr.mode & 0o777, attr.mtime),
        (4, 0o640, 1_000_000_000)
    );
    let m = std::fs::metadata(host("a")).unwrap();
    assert_eq!((m.len(), m.permissions().mode() & 0o777), (4, 0o640));
    sa.valid = FATTR_UID;
    sa.uid = 1000;
    assert_eq!(
        g.call(SETATTR, a.nodeid, sa.as_bytes()).unwrap_err(),
        libc::EPERM
    );
    sa.uid = 0;
    g.call(SETATTR, a.nodeid, sa.as_bytes()).unwrap();

    // statfs answers from the host filesystem.
    let st = StatfsOut::read_from_prefix(&g.call(STATFS, ROOT_ID, &[]).unwrap())
        .unwrap()
        .0;
    assert!(st.bsize > 0 && st.blocks > 0);

    // rename2: no-replace refuses an existing target; exchange swaps, and nodes follow.
    let b = g.lookup(ROOT_ID, "b").unwrap();
    let rename2 = |g: &mut Guest, flags: u32| {
        let mut body = Rename2In {
            newdir: ROOT_ID,
            flags,
            padding: 0,
        }
        .as_bytes()
        .to_vec();
        body.extend_from_slice(&cstring("a"));
        body.extend_from_slice(&cstring("b"));
        g.call(RENAME2, ROOT_ID, &body)
    };
    assert_eq!(
        rename2(&mut g, libc::RENAME_NOREPLACE).unwrap_err(),
        libc::EEXIST
    );
    rename2(&mut g, libc::RENAME_EXCHANGE).unwrap();
    assert_eq!(std::fs::read(host("a")).unwrap(), b"bee");
    assert_eq!(std::fs::read(host("b")).unwrap(), b"0123");
    assert_eq!(g.getattr(a.nodeid).unwrap().size, 4, "node a now names b");
    assert_eq!(g.getattr(b.nodeid).unwrap().size, 3);

    // rmdir of a non-empty directory fails, of an empty one works.
    let d = g.mkdir(ROOT_ID, "d").unwrap();
    g.create(d.nodeid, "f").unwrap();
    assert_eq!(
        g.call(RMDIR, ROOT_ID, &cstring("d")).unwrap_err(),
        libc::ENOTEMPTY
    );
    g.call(UNLINK, d.nodeid, &cstring("f")).unwrap();
    g.call(RMDIR, ROOT_ID, &cstring("d")).unwrap();
    assert!(!host("d").exists());
}

#[test]
fn a_guest_cannot_hold_unbounded_host_descriptors() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("a"), b"x").unwrap();
    let mut g = Guest::new(dir.path(), false);
    init(&mut g);
    let a = g.lookup(ROOT_ID, "a").unwrap();
    let fhs: Vec<u64> = (0..MAX_HANDLES)
        .map(|_| g.open(a.nodeid, libc::O_RDONLY).unwrap())
        .collect();
    assert_eq!(g.open(a.nodeid, libc::O_RDONLY).unwrap_err(), libc::ENFILE);
    assert_eq!(g.create(ROOT_ID, "b").unwrap_err(), libc::ENFILE);
    let r = ReleaseIn {
        fh: fhs[0],
        flags: 0,
        release_flags: 0,
        lock_owner: 0,
    };
    g.call(RELEASE, a.nodeid, r.as_bytes()).unwrap();
    assert!(g.open(a.nodeid, libc::O_RDONLY).is_ok());
}

#[test]
fn malformed_requests_get_errors_not_panics() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("a"), b"data").unwrap();
    let mut g = Guest::new(dir.path(), false);
    init(&mut g);
    // Truncated bodies for every opcode.
    for op in 1..=50 {
        if op == FORGET || op == BATCH_FORGET {
            continue;
        }
        for len in [0usize, 3, 9] {
            let _ = g.call(op, ROOT_ID, &vec![0xa5; len]);
        }
    }
    // Short or garbage buffers, lying lengths, huge counts.
    let mut reply = Vec::new();
    for req in [vec![], vec![1u8; 10], vec![0xffu8; 200]] {
        g.s.handle(&req, &mut reply);
    }
    let mut bf = BatchForgetIn {
        count: u32::MAX,
        dummy: 0,
    }
    .as_bytes()
    .to_vec();
    bf.extend_from_slice(&[7u8; 20]);
    assert_eq!(g.call_no_reply(BATCH_FORGET, &bf), 0);
    let mut seed = 0x1234_5678_u64;
    for _ in 0..2000 {
        let mut req = Vec::new();
        for _ in 0..(seed % 120) {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            req.push((seed >> 33) as u8);
        }
        if req.len() >= 8 {
            // Mostly opcodes the server knows.
            req[4] = (seed % 48) as u8;
            req[5..8].fill(0);
        }
        g.s.handle(&req, &mut reply);
    }
    // Still serving.
    let a = g.lookup(ROOT_ID, "a").unwrap();
    assert_eq!(a.attr.size, 4);
}

impl Guest {
    fn call_no_reply(&mut self, opcode: u32, body: &[u8]) -> usize {
        let req = self.request(opcode, 0, body);
        let mut reply = Vec::new();
        self.s.handle(&req, &mut reply);
        reply.len()
    }
}

/// Runs `f` on another thread: its result, or `None` if it has not returned within two
/// minutes (a hang).
fn within_minutes<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Option<T> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(std::time::Duration::from_secs(120)).ok()
}

/// A guest can make a FIFO; opening it (for reading, for writing, or by creating its name
/// again) must not wait for the FIFO's other end, which would hang the device's worker.
#[test]
fn opening_a_fifo_never_waits_for_its_other_end() {
    let dir = tempfile::tempdir().unwrap();
    let mut g = Guest::new(dir.path(), false);
    init(&mut g);
    g.mknod(ROOT_ID, "fifo", libc::S_IFIFO | 0o600).unwrap();
    let node = g.lookup(ROOT_ID, "fifo").unwrap().nodeid;
    let opened = within_minutes(move || {
        let r = g.open(node, libc::O_RDONLY);
        let w = g.open(node, libc::O_WRONLY);
        let c = g.create(ROOT_ID, "fifo").map(|_| ());
        (r.map(|_| ()), w.map(|_| ()), c)
    });
    let (r, w, c) = opened.expect("an open of a FIFO returned");
    // Whatever the answers, they came; a reader's end is there for the writer.
    assert_eq!((r, w, c), (Ok(()), Ok(()), Ok(())));
}

/// A `READDIR` asks for up to 4 GiB of entries: the reply stays within what a `READ` may
/// return, however large the directory.
#[test]
fn a_listing_never_makes_a_reply_larger_than_a_read() {
    let dir = tempfile::tempdir().unwrap();
    for i in 0..3000 {
        std::fs::write(dir.path().join(format!("{i:0>100}")), b"").unwrap();
    }
    let mut g = Guest::new(dir.path(), false);
    init(&mut g);
    let fh = g.opendir(ROOT_ID).unwrap();
    let entries = g.readdir(fh, 0, u32::MAX).unwrap();
    assert!(
        !entries.is_empty() && entries.len() <= MAX_IO as usize,
        "{} bytes of entries",
        entries.len()
    );
}

mod random {
    use super::*;
    use proptest::prelude::*;

    /// Opcodes the server knows (most requests), or anything.
    fn opcode() -> impl Strategy<Value = u32> {
        let known = [
            LOOKUP,
            FORGET,
            GETATTR,
            SETATTR,
            READLINK,
            SYMLINK,
            MKNOD,
            MKDIR,
            UNLINK,
            RMDIR,
            RENAME,
            LINK,
            OPEN,
            READ,
            WRITE,
            STATFS,
            RELEASE,
            FSYNC,
            FLUSH,
            INIT,
            OPENDIR,
            READDIR,
            RELEASEDIR,
            FSYNCDIR,
            CREATE,
            DESTROY,
            BATCH_FORGET,
            RENAME2,
        ];
        prop_oneof![9 => prop::sample::select(known.to_vec()), 1 => any::<u32>()]
    }

    /// A request: a header (its length usually right), fixed-size arguments of random
    /// bytes, names from a small set (some invalid), random trailing bytes.
    fn request() -> impl Strategy<Value = (u32, u64, Option<u32>, Vec<u8>)> {
        let names = prop::collection::vec(
            prop::sample::select(vec!["a", "b", "sub", "fifo", "..", ".", "x/y", ""]),
            0..3,
        );
        let node = prop_oneof![Just(ROOT_ID), 0u64..12, any::<u64>()];
        let len = prop::option::weighted(0.2, any::<u32>());
        (
            opcode(),
            node,
            len,
            prop::collection::vec(any::<u8>(), 0..96),
            names,
            prop::collection::vec(any::<u8>(), 0..8),
        )
            .prop_map(|(op, node, len, args, names, tail)| {
                let mut body = args;
                for n in names {
                    body.extend_from_slice(&cstring(n));
                }
                body.extend(tail);
                (op, node, len, body)
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig {
            cases: 64,
            failure_persistence: None,
            ..ProptestConfig::default()
        })]

        /// Random request sequences: every reply is an error or an answer to its request
        /// (its header's length and id right), never longer than a `READ` may be, and the
        /// server still serves afterwards. Run on another thread, so a hang fails the test.
        #[test]
        fn random_requests_get_bounded_answers(
            reqs in prop::collection::vec(request(), 1..60),
        ) {
            let served = within_minutes(move || {
                let dir = tempfile::tempdir().unwrap();
                std::fs::write(dir.path().join("a"), b"data").unwrap();
                std::fs::create_dir(dir.path().join("sub")).unwrap();
                let mut g = Guest::new(dir.path(), false);
                let mut reply = Vec::new();
                for (i, (op, node, len, body)) in reqs.into_iter().enumerate() {
                    g.unique = 1000 + i as u64;
                    let mut req = g.request(op, node, &body);
                    if let Some(len) = len {
                        req[0..4].copy_from_slice(&len.to_ne_bytes());
                    }
                    g.s.handle(&req, &mut reply);
                    if reply.is_empty() {
                        continue;
                    }
                    let (out, _) = OutHeader::read_from_prefix(&reply).unwrap();
                    assert_eq!(out.len as usize, reply.len());
                    assert_eq!(out.unique, g.unique);
                    assert!(reply.len() <= size_of::<OutHeader>() + MAX_IO as usize);
                }
                g.getattr(ROOT_ID).map(|a| a.mode & libc::S_IFMT)
            });
            let root = served.expect("the requests were served in time");
            prop_assert_eq!(root, Ok(libc::S_IFDIR));
        }
    }
}

/// Listings are cached per open directory handle; together they stay bounded, and a handle
/// whose listing made room reads its directory again.
#[test]
fn cached_listings_stay_bounded_across_handles() {
    let dir = tempfile::tempdir().unwrap();
    let n = MAX_CACHED_ENTRIES / 2 + 1000;
    for i in 0..n {
        std::fs::File::create(dir.path().join(format!("{i:08}"))).unwrap();
    }
    let mut g = Guest::new(dir.path(), false);
    init(&mut g);
    let readdir = |g: &mut Guest, fh: u64, offset: u64| {
        let out = g.readdir(fh, offset, 4096).unwrap();
        let (d, rest) = Dirent::read_from_prefix(&out).unwrap();
        (d.off, rest[..d.namelen as usize].to_vec())
    };
    let mut fhs = Vec::new();
    for _ in 0..3 {
        let fh = g.opendir(ROOT_ID).unwrap();
        assert_eq!(readdir(&mut g, fh, 2), (3, b"00000000".to_vec()));
        fhs.push(fh);
        let cached: usize =
            g.s.table
                .handles
                .values()
                .filter_map(|h| h.entries.as_ref().map(Vec::len))
                .sum();
        assert!(cached <= MAX_CACHED_ENTRIES, "{cached} entries cached");
    }
    // The first handle's listing was dropped; it goes on where it was.
    assert!(g.s.table.handles[&fhs[0]].entries.is_none());
    assert_eq!(readdir(&mut g, fhs[0], 502), (503, b"00000500".to_vec()));
}
