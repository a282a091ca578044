//! Where `GuestImage::locate` looks for the guest image: the same cache directory as
//! `kvm-tier/guest/build.sh` writes it to, and as the rest of dormant uses
//! (`dormant_core::default_dirs::cache_dir`). The environment is the process's, so each case
//! runs in a child process of this test binary with its own.

#![allow(clippy::unwrap_used)] // helpers outside #[test] functions unwrap too

use std::path::Path;
use std::process::Command;

use dormant_kvm::GuestImage;

/// The cache root handed to the child (`XDG_CACHE_HOME`); it prints what `locate` found.
const CHILD_ENV: &str = "DORMANT_TEST_GUEST_IMAGE_CHILD";

#[test]
#[ignore = "child-process helper of an_empty_dormant_cache_means_the_default_cache_as_in_build_sh"]
fn helper_locate_child() {
    assert!(
        std::env::var_os(CHILD_ENV).is_some(),
        "started by the parent test"
    );
    match GuestImage::locate() {
        Ok(image) => println!("KERNEL {}", image.kernel.display()),
        Err(e) => println!("ERROR {e}"),
    }
}

/// Runs `locate` in a child whose only guest image is `<xdg>/dormant/guest/current/`, with
/// `DORMANT_CACHE` set to `cache`.
fn locate_in_child(xdg: &Path, cache: &str) -> String {
    let o = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "helper_locate_child",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, "1")
        .env("XDG_CACHE_HOME", xdg)
        .env("DORMANT_CACHE", cache)
        .env_remove("DORMANT_GUEST_KERNEL")
        .env_remove("DORMANT_GUEST_INITRAMFS")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(
        o.status.success(),
        "child failed: {stdout}\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    stdout
}

#[test]
fn an_empty_dormant_cache_means_the_default_cache_as_in_build_sh() {
    let xdg = tempfile::tempdir().unwrap();
    let current = xdg.path().join("dormant/guest/current");
    std::fs::create_dir_all(&current).unwrap();
    std::fs::write(current.join("vmlinux"), b"kernel").unwrap();
    std::fs::write(current.join("initramfs.cpio"), b"initramfs").unwrap();

    // build.sh reads `${DORMANT_CACHE:-…}`: empty is unset, so the image is in the default.
    let out = locate_in_child(xdg.path(), "");
    let want = format!("KERNEL {}\n", current.join("vmlinux").display());
    assert!(out.contains(&want), "{out}");

    // A cache that is named is the only place looked at.
    let other = tempfile::tempdir().unwrap();
    let out = locate_in_child(xdg.path(), other.path().to_str().unwrap());
    assert!(out.contains("ERROR "), "{out}");
    assert!(
        out.contains(
            &other
                .path()
                .join("guest/current/vmlinux")
                .display()
                .to_string()
        ),
        "{out}"
    );
}
