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

use dormant_core::{Command, LocalStore, RichResult, Sandbox, SandboxSpec};
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
    // `base` is the default image: a spec that names none gets it.
    assert_eq!(GuestImage::for_image(None).unwrap(), image);
    assert_eq!(dormant_kvm::DEFAULT_IMAGE, "base");
    let image_bytes = std::fs::read(&root.path).unwrap().len();
    let image_mtime = std::fs::metadata(&root.path).unwrap().modified().unwrap();
    // No image named: the default, base.
    let spec = SandboxSpec::linux().call_timeout(Duration::from_secs(600));
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
    // No ext4 lazy-init thread: it would zero inode tables and prefetch block bitmaps after
    // every resume of a snapshot taken before it finished, writing into the sandbox's disk
    // delta and running ahead of the agent.
    let (lazy, code) = sh(&mut sb, "pgrep -x ext4lazyinit");
    assert_eq!(code, 1, "an ext4lazyinit thread runs: {lazy}");
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

/// A root filesystem of the user's, as `docker export` gives one (a tar archive): here busybox
/// alone, no bash, so shell commands run in its `sh`. The same tree as a directory builds too.
#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
#[cfg_attr(not_root, ignore = "building an image needs root")]
fn an_image_from_a_root_filesystem_tar_boots_and_commands_fall_back_to_sh() {
    use dormant_kvm::{ImageSource, build_image, list_images};
    let dir = tempfile::tempdir().unwrap();
    let tree = dir.path().join("rootfs");
    std::fs::create_dir_all(tree.join("bin")).unwrap();
    std::fs::create_dir_all(tree.join("etc")).unwrap();
    std::fs::copy("/bin/busybox", tree.join("bin/busybox")).unwrap();
    let list = std::process::Command::new("/bin/busybox")
        .arg("--list")
        .output()
        .unwrap();
    for applet in String::from_utf8(list.stdout).unwrap().lines() {
        if applet != "busybox" {
            std::os::unix::fs::symlink("busybox", tree.join("bin").join(applet)).unwrap();
        }
    }
    std::fs::write(tree.join("etc/motd"), "a user's root filesystem\n").unwrap();
    let tar = dir.path().join("rootfs.tar");
    let st = std::process::Command::new("tar")
        .arg("-cf")
        .arg(&tar)
        .arg("-C")
        .arg(&tree)
        .arg(".")
        .status()
        .unwrap();
    assert!(st.success());

    let from_dir = build_image(
        "dormant-test-rootfs-dir",
        &ImageSource::Rootfs(tree.clone()),
    )
    .unwrap();
    assert!(from_dir.path.is_file());
    let from_tar =
        build_image("dormant-test-rootfs-tar", &ImageSource::Rootfs(tar.clone())).unwrap();
    // Built once: a second build of the same tar is the cached image.
    assert_eq!(
        build_image("dormant-test-rootfs-tar", &ImageSource::Rootfs(tar)).unwrap(),
        from_tar
    );
    // A build leaves nothing behind but the image (its scratch directory is removed).
    let cache = from_tar.path.parent().unwrap().parent().unwrap();
    let scratch: Vec<_> = std::fs::read_dir(cache)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".build-dormant-test-rootfs-"))
        .collect();
    assert!(scratch.is_empty(), "left behind: {scratch:?}");
    let names: Vec<String> = list_images().unwrap().into_iter().map(|d| d.name).collect();
    assert!(
        names.contains(&"dormant-test-rootfs-tar".to_string()),
        "{names:?}"
    );
    // Bad input is refused before anything runs.
    assert!(matches!(
        build_image("../escape", &ImageSource::Rootfs(tree)),
        Err(dormant_core::Error::InvalidArgument(_))
    ));
    assert!(matches!(
        build_image("x", &ImageSource::Packages(vec!["bad pkg;rm".into()])),
        Err(dormant_core::Error::InvalidArgument(_))
    ));

    let store = Arc::new(LocalStore::open(dir.path().join("store")).unwrap());
    let spec = SandboxSpec::linux()
        .image("dormant-test-rootfs-tar")
        .call_timeout(Duration::from_secs(600));
    let mut sb = KvmSandbox::create(store.clone(), spec).unwrap();
    let (out, code) = sh(
        &mut sb,
        "cat /etc/motd; echo \"shell=${BASH_VERSION:-sh} pid1=$(cat /proc/1/comm) cwd=$(pwd)\"",
    );
    assert_eq!(code, 0);
    assert_eq!(
        out,
        "a user's root filesystem\nshell=sh pid1=dormant-agent cwd=/root\n"
    );
    sb.kill().unwrap();
    // The same image given by its path (an ext4 file of the user's): keyed by its contents.
    let by_path = from_tar.path.display().to_string();
    let spec = SandboxSpec::linux()
        .image(by_path.as_str())
        .call_timeout(Duration::from_secs(600));
    let mut sb = KvmSandbox::create(store.clone(), spec).unwrap();
    assert_eq!(sh(&mut sb, "cat /etc/motd").0, "a user's root filesystem\n");
    sb.kill().unwrap();
    let e =
        KvmSandbox::create(store, SandboxSpec::linux().image("/no/such/rootfs.ext4")).unwrap_err();
    assert!(matches!(&e, dormant_core::Error::File { .. }), "{e:?}");
    // An image name that was never built is a clear error.
    let e = KvmSandbox::create(
        Arc::new(LocalStore::open(dir.path().join("store2")).unwrap()),
        SandboxSpec::linux().image("no-such-image-built"),
    )
    .unwrap_err();
    assert!(
        matches!(&e, dormant_core::Error::InvalidSpec(m) if m.contains("dormant image build")),
        "{e:?}"
    );
}

/// `run_code` on the `coding` image: one persistent python3 in the guest, whose variables
/// survive checkpoint and standby, and of which every fork has its own copy.
#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
#[cfg_attr(not_root, ignore = "building the Debian image needs root")]
fn run_code_on_the_coding_image_keeps_its_session_and_forks_get_their_own() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(LocalStore::open(dir.path()).unwrap());
    let spec = SandboxSpec::linux()
        .image("coding")
        .memory_limit(512 << 20)
        .call_timeout(Duration::from_secs(600));
    let mut sb = KvmSandbox::create(store.clone(), spec).unwrap();
    let ex = sb
        .run_code(
            "import sys, json\ntotal = sum(range(10))\nprint('py', sys.version_info[0])\ntotal",
        )
        .unwrap();
    assert_eq!(ex.error, None);
    assert_eq!(ex.stdout, "py 3\n45\n");
    let main = RichResult {
        text: Some("45".into()),
        is_main_result: true,
        ..Default::default()
    };
    assert_eq!(ex.results, [main], "the final value is the main result");
    // Rich representations come through the driver's reply and the agent's answer.
    let ex = sb
        .run_code(
            "class Chart:\n\
             \x20   def __repr__(self): return 'Chart()'\n\
             \x20   def _repr_html_(self): return '<b>chart</b>'\n\
             \x20   def _repr_svg_(self): return '<svg/>'\n\
             \x20   def _repr_png_(self): return bytes(range(256)) * 4\n\
             print('no results from print')\n\
             Chart()",
        )
        .unwrap();
    assert_eq!(ex.stdout, "no results from print\nChart()\n");
    assert_eq!(ex.results.len(), 1, "{:?}", ex.results);
    let r = &ex.results[0];
    assert!(r.is_main_result);
    assert_eq!(r.text.as_deref(), Some("Chart()"));
    assert_eq!(r.html.as_deref(), Some("<b>chart</b>"));
    assert_eq!(r.svg.as_deref(), Some("<svg/>"));
    let png: Vec<u8> = (0..=255u8).cycle().take(1024).collect();
    assert_eq!(r.png.as_deref(), Some(&png[..]));
    assert!(sb.run_code("x = 1").unwrap().results.is_empty());
    let ex = sb.run_code("1 / 0").unwrap();
    let err = ex.error.expect("an exception is a result");
    assert_eq!(err.name, "ZeroDivisionError");
    assert!(
        err.traceback.contains("ZeroDivisionError"),
        "{}",
        err.traceback
    );

    // Checkpoint, then standby and resume: the session is guest memory.
    sb.checkpoint().unwrap();
    assert_eq!(sb.run_code("total += 1\ntotal").unwrap().stdout, "46\n");
    let snap = sb.standby().unwrap();
    let mut back = KvmSandbox::from_snapshot(store.clone(), &snap).unwrap();
    assert_eq!(back.run_code("total").unwrap().stdout, "46\n");

    // Forks: each child has its own interpreter state.
    let mut kids = back.fork(2).unwrap();
    kids[0].run_code("total = 'first'").unwrap();
    kids[1].run_code("total = 'second'").unwrap();
    assert_eq!(kids[0].run_code("total").unwrap().stdout, "'first'\n");
    assert_eq!(kids[1].run_code("total").unwrap().stdout, "'second'\n");
    assert_eq!(back.run_code("total").unwrap().stdout, "46\n");
}

/// An image given by path is keyed by its contents: hashed once per process while the file
/// stays the same, hashed again once it changed.
#[test]
fn an_image_files_fingerprint_follows_its_contents() {
    use dormant_kvm::RootDisk;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("root.ext4");
    std::fs::write(&path, vec![1u8; 8192]).unwrap();
    let first = RootDisk::file(&path).unwrap();
    assert_eq!(RootDisk::file(&path).unwrap(), first);
    std::fs::write(&path, vec![2u8; 8192]).unwrap();
    let changed = RootDisk::file(&path).unwrap();
    assert_ne!(changed.fingerprint, first.fingerprint);
    assert_eq!(RootDisk::file(&path).unwrap(), changed);
    // Not a whole number of 4 KiB blocks: refused.
    std::fs::write(&path, vec![2u8; 100]).unwrap();
    assert!(RootDisk::file(&path).is_err());
}

/// An image build reports its stages in order, and a cached image the final event only.
#[test]
#[cfg_attr(not_root, ignore = "building an image needs root")]
fn an_image_build_reports_its_stages_and_a_cached_one_its_end() {
    use dormant_core::progress::{ProgressEvent, Unit};
    use dormant_kvm::{IMAGE_BUILD_STEPS, ImageSource, build_image_with_progress};
    let dir = tempfile::tempdir().unwrap();
    let tree = dir.path().join("rootfs");
    std::fs::create_dir_all(tree.join("etc")).unwrap();
    std::fs::write(tree.join("etc/motd"), "progress\n").unwrap();
    let name = "dormant-test-progress";
    let build = || {
        let events = std::sync::Mutex::new(Vec::new());
        let collect = |e: &ProgressEvent| events.lock().unwrap().push(e.clone());
        let disk =
            build_image_with_progress(name, &ImageSource::Rootfs(tree.clone()), &collect).unwrap();
        assert!(disk.path.is_file());
        events.into_inner().unwrap()
    };
    // The tree is new (its files' times are part of the recipe): this build makes the image.
    let events = build();
    // A tool's output lines (mke2fs's) come as "STAGE — LINE" with the stage's step.
    let mut steps: Vec<(String, u64, bool)> = Vec::new();
    for e in &events {
        match e.stage.split_once(" — ") {
            Some((stage, _)) => {
                let last = steps.last().unwrap();
                assert_eq!((stage, e.done), (last.0.as_str(), last.1), "{events:?}");
            }
            None => steps.push((e.stage.clone(), e.done, e.finished)),
        }
    }
    let from = format!("image {name}: root filesystem from {}", tree.display());
    let from = if from.chars().count() > 100 {
        let cut: String = from.chars().take(100).collect();
        format!("{cut}…")
    } else {
        from
    };
    assert_eq!(
        steps,
        [
            (from, 0, false),
            (format!("image {name}: ext4 filesystem"), 1, false),
            (format!("image {name} built"), 2, false),
            (format!("image {name} ready"), 3, true),
        ]
    );
    for e in &events {
        assert_eq!((e.total, e.unit), (Some(IMAGE_BUILD_STEPS), Unit::Steps));
    }
    assert_eq!(
        build(),
        [ProgressEvent::finished(
            format!("image {name} ready (cached)"),
            IMAGE_BUILD_STEPS,
            Unit::Steps
        )]
    );
}
