//! The Debian root filesystem images end to end: a sandbox on the `base` image boots the
//! initramfs, mounts the image as `/` with dormant's agent still PID 1, gives commands a login
//! environment, and keeps what it writes to its root filesystem across checkpoint, standby and
//! resume, in a copy-on-write layer of its own: the image file is never written, another
//! sandbox from the same image does not see the writes, and a checkpoint stores only the blocks
//! the sandbox changed. The `base` image is built by `kvm-tier/guest/build-image.sh` (the README's
//! test command builds it first; a test run without it builds it here, which needs root and apt).

#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use dormant_core::{Command, LocalStore, Sandbox, SandboxSpec};
use dormant_kvm::{GuestImage, KvmSandbox};

fn sh(sb: &mut KvmSandbox, script: &str) -> (String, i32) {
    let out = sb.exec(&Command::shell(script)).unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    if !err.is_empty() {
        eprintln!("stderr of {script:?}: {err}");
    }
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        out.exit_code,
    )
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
#[cfg_attr(not_root, ignore = "building the Debian image needs root")]
fn the_base_image_is_the_root_filesystem_and_each_sandbox_writes_its_own_layer() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(LocalStore::open(dir.path()).unwrap());
    let image = GuestImage::for_image(Some("base")).unwrap();
    let root = image
        .root
        .clone()
        .expect("base has a root filesystem image");
    let image_bytes = std::fs::read(&root.path).unwrap().len();
    let image_mtime = std::fs::metadata(&root.path).unwrap().modified().unwrap();
    let spec = SandboxSpec::linux()
        .image("base")
        .call_timeout(Duration::from_secs(600));
    let t = std::time::Instant::now();
    let mut sb = KvmSandbox::create(store.clone(), spec.clone()).unwrap();
    eprintln!("base image booted in {:?}", t.elapsed());

    // Debian's userland, the agent as PID 1, a login environment, bash for shell commands.
    let (out, code) = sh(
        &mut sb,
        "cat /etc/debian_version >/dev/null && echo debian; \
         echo \"pid1=$(cat /proc/1/comm) shell=${BASH_VERSION:+bash} home=$HOME lang=$LANG \
         cwd=$(pwd) user=$(id -un)\"; echo \"$PATH\"; \
         grep ' / ' /proc/mounts | cut -d' ' -f1,3; test -d /data && echo data",
    );
    assert_eq!(code, 0, "{out}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], "debian", "{out}");
    assert_eq!(
        lines[1], "pid1=dormant-agent shell=bash home=/root lang=C.UTF-8 cwd=/root user=root",
        "{out}"
    );
    assert!(
        lines[2].starts_with("/usr/local/sbin:/usr/local/bin:"),
        "{out}"
    );
    assert_eq!(lines[3], "/dev/vda ext4", "{out}");
    assert_eq!(lines[4], "data", "{out}");
    // procps and the files API work on the mounted root.
    let (ps, code) = sh(&mut sb, "ps -o pid= -p 1");
    assert_eq!((ps.trim(), code), ("1", 0));
    sb.write_file("/usr/local/share/note.txt", b"from the host\n")
        .unwrap();

    // Writes to the root filesystem survive checkpoint, standby and resume.
    sh(
        &mut sb,
        "echo kept > /etc/dormant-test; mkdir -p /opt/app; seq 1 1000 > /opt/app/n; sync",
    );
    let snap = sb.standby().unwrap();
    let mut back = KvmSandbox::from_snapshot(store.clone(), &snap).unwrap();
    let (out, code) = sh(&mut back, "cat /etc/dormant-test; wc -l < /opt/app/n");
    assert_eq!((out.as_str(), code), ("kept\n1000\n", 0));
    assert_eq!(
        back.read_file("/usr/local/share/note.txt").unwrap(),
        b"from the host\n"
    );
    // The checkpoint stored only what this sandbox changed, not the image (tens of MiB).
    let stored = store
        .usage()
        .unwrap()
        .into_iter()
        .find(|u| u.id == snap)
        .map(|u| u.stored_bytes)
        .unwrap();
    eprintln!("standby snapshot stores {stored} bytes");
    assert!(
        stored < 16 << 20,
        "a standby after small writes stored {stored} bytes"
    );

    // Another sandbox from the same image has its own layer: none of the first one's writes.
    let mut other = KvmSandbox::create(store.clone(), spec).unwrap();
    let (out, code) = sh(
        &mut other,
        "cat /etc/dormant-test 2>&1; test -e /opt/app/n; echo $?",
    );
    assert_eq!(code, 0);
    assert!(
        out.contains("No such file") && out.ends_with("1\n"),
        "{out}"
    );

    // The image file was never written.
    assert_eq!(std::fs::read(&root.path).unwrap().len(), image_bytes);
    assert_eq!(
        std::fs::metadata(&root.path).unwrap().modified().unwrap(),
        image_mtime
    );
}
