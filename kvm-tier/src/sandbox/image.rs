//! What a KVM sandbox is made from and tuned by: the guest image ([`GuestImage`], the kernel
//! and initramfs `kvm-tier/guest/build.sh` builds) and the options of the tier that are not
//! part of the portable spec ([`KvmOptions`]), with their defaults.

use std::path::PathBuf;
use std::time::Duration;

use dormant_core::{Error, Result};

/// The guest kernel and initramfs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestImage {
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
}

impl GuestImage {
    /// The image `kvm-tier/guest/build.sh` built: `$DORMANT_GUEST_KERNEL` and
    /// `$DORMANT_GUEST_INITRAMFS` when set, else `<cache>/guest/current/`, the cache being
    /// [`default_dirs::cache_dir`](dormant_core::default_dirs::cache_dir) (`$DORMANT_CACHE` when
    /// set and not empty, as build.sh reads it, else `~/.cache/dormant`).
    pub fn locate() -> Result<GuestImage> {
        let current = dormant_core::default_dirs::cache_dir().join("guest/current");
        let pick = |var: &str, name: &str| {
            std::env::var_os(var)
                .map(PathBuf::from)
                .unwrap_or_else(|| current.join(name))
        };
        let image = GuestImage {
            kernel: pick("DORMANT_GUEST_KERNEL", "vmlinux"),
            initramfs: pick("DORMANT_GUEST_INITRAMFS", "initramfs.cpio"),
        };
        for p in [&image.kernel, &image.initramfs] {
            if !p.is_file() {
                return Err(Error::RuntimeMissing {
                    what: "the Linux guest image",
                    hint: format!(
                        "{} is missing; build it with kvm-tier/guest/build.sh (scripts/setup.sh \
                         runs it) or set DORMANT_GUEST_KERNEL / DORMANT_GUEST_INITRAMFS",
                        p.display()
                    ),
                });
            }
        }
        Ok(image)
    }

    /// A short hash identifying the image's contents (for base snapshots).
    pub(super) fn fingerprint(&self) -> Result<String> {
        let mut h = blake3::Hasher::new();
        for p in [&self.kernel, &self.initramfs] {
            h.update_mmap(p).map_err(|e| Error::File {
                op: "hash",
                path: p.display().to_string(),
                source: e,
            })?;
        }
        Ok(h.finalize().to_hex()[..16].to_string())
    }
}

/// Options of the KVM tier that are not part of the portable spec.
#[derive(Debug, Clone)]
pub struct KvmOptions {
    /// Copy the guest's serial console to stderr (also `DORMANT_GUEST_CONSOLE=1`).
    pub console_echo: bool,
    /// Longest wait for a booting guest's agent. Default: 180 s on PVM hosts, 30 s otherwise.
    pub boot_timeout: Duration,
    /// Longest wait for a resumed guest's agent, and for a new connection after a call was
    /// stopped (past it the sandbox is poisoned). Default: 30 s.
    pub connect_timeout: Duration,
    /// Host-side bound of every agent request but `exec` (files, `spawn`, `signal`,
    /// `output`, one slice of `wait`, mounts; each moves at most 16 MiB): the longest the
    /// guest may keep the request waiting without moving a byte either way, and ten times
    /// that in all (a guest that trickles bytes). Past it the call fails with
    /// [`Error::Deadline`]. Default: 120 s on PVM hosts (guest kernel code is emulated; a
    /// 16 MiB file took over 2 min on a busy 2-core host), 30 s otherwise.
    pub request_timeout: Duration,
    /// Size of the sandbox's disk (`/dev/vda`, an ext2 filesystem mounted at `/data`), a
    /// multiple of 4 KiB. Sparse: only written blocks cost memory and snapshot bytes.
    /// Default: 512 MiB.
    pub disk_size: usize,
}

impl Default for KvmOptions {
    fn default() -> Self {
        let slow = crate::detect().is_slow();
        KvmOptions {
            console_echo: std::env::var_os("DORMANT_GUEST_CONSOLE").is_some_and(|v| v == "1"),
            boot_timeout: Duration::from_secs(if slow { 180 } else { 30 }),
            connect_timeout: Duration::from_secs(30),
            request_timeout: Duration::from_secs(if slow { 120 } else { 30 }),
            disk_size: 512 << 20,
        }
    }
}
