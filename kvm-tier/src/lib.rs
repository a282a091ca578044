//! # dormant-kvm
//!
//! The KVM tier of dormant: microVMs booting a real Linux guest behind the same sandbox
//! contract as the WASI tier.
//!
//! - [`detect`]: hardware virtualization, PVM (guest kernel emulated), or none.
//! - [`vm`], [`vcpu`], [`persist`]: the VMM core — a VM with copy-on-write guest RAM and one
//!   vCPU on its own thread, its whole state captured and restored into a brand-new VM,
//!   dirty-page tracking.
//! - [`boot`], [`serial`], [`virtio`], [`machine`]: direct boot of an ELF `vmlinux`, the 16550
//!   console, virtio-mmio devices (vsock to the guest agent, a block device for `/data`, and
//!   virtio-fs volume slots served by [`volume`]), wired into a [`machine::Machine`].
//! - [`snapshot`]: checkpoints in dormant's snapshot store (full or incremental RAM, device
//!   state, disk layers).
//! - [`sandbox`]: [`sandbox::KvmSandbox`], the `Sandbox` contract over the guest agent.

use std::path::Path;

pub mod sandbox;
pub mod volume;

pub use sandbox::{GuestImage, KvmInterrupter, KvmOptions, KvmSandbox};

// The VMM is private to this crate: a user needs `KvmSandbox`, its options and `detect`. The
// crate's integration tests, examples and the criterion benches reach the VMM through the
// `testing` feature, which makes these modules public; without it, what only they use is
// dead code here, hence the `allow`.
#[cfg(feature = "testing")]
pub mod boot;
#[cfg(not(feature = "testing"))]
#[allow(dead_code)]
pub(crate) mod boot;
#[cfg(feature = "testing")]
pub mod machine;
#[cfg(not(feature = "testing"))]
#[allow(dead_code)]
pub(crate) mod machine;
#[cfg(feature = "testing")]
pub mod persist;
#[cfg(not(feature = "testing"))]
#[allow(dead_code)]
pub(crate) mod persist;
#[cfg(feature = "testing")]
pub mod serial;
#[cfg(not(feature = "testing"))]
#[allow(dead_code)]
pub(crate) mod serial;
#[cfg(feature = "testing")]
pub mod snapshot;
#[cfg(not(feature = "testing"))]
#[allow(dead_code)]
pub(crate) mod snapshot;
#[cfg(feature = "testing")]
pub mod vcpu;
#[cfg(not(feature = "testing"))]
#[allow(dead_code)]
pub(crate) mod vcpu;
#[cfg(feature = "testing")]
pub mod virtio;
#[cfg(not(feature = "testing"))]
#[allow(dead_code)]
pub(crate) mod virtio;
#[cfg(feature = "testing")]
pub mod vm;
#[cfg(not(feature = "testing"))]
#[allow(dead_code)]
pub(crate) mod vm;

#[cfg(test)]
mod restore_tests;

/// The virtualization this host offers to the KVM tier.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostKvm {
    /// No usable `/dev/kvm`.
    Unavailable,
    /// Hardware virtualization (VT-x or AMD-V): guest kernels run at native speed.
    Hardware,
    /// Pagetable-based virtualization (`kvm_pvm`, nested): guest kernel code is emulated,
    /// about 1000x slower; callers should raise timeouts.
    Pvm,
}

impl HostKvm {
    /// Whether guest kernel code runs in the slow emulated mode.
    pub fn is_slow(self) -> bool {
        self == HostKvm::Pvm
    }
}

/// Detects what `/dev/kvm` is on this host.
pub fn detect() -> HostKvm {
    detect_at(
        Path::new("/dev/kvm"),
        Path::new("/sys/module"),
        Path::new("/proc/cpuinfo"),
    )
}

fn detect_at(dev: &Path, modules: &Path, cpuinfo: &Path) -> HostKvm {
    if std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(dev)
        .is_err()
    {
        return HostKvm::Unavailable;
    }
    if modules.join("kvm_pvm").exists() {
        return HostKvm::Pvm;
    }
    let flags = std::fs::read_to_string(cpuinfo).unwrap_or_default();
    let hw = flags
        .lines()
        .filter(|l| l.starts_with("flags"))
        .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"));
    if hw { HostKvm::Hardware } else { HostKvm::Pvm }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detection_follows_the_host_facts() {
        let tmp = std::env::temp_dir().join(format!("dormant-kvm-detect-{}", std::process::id()));
        std::fs::create_dir_all(tmp.join("modules")).unwrap();
        let dev = tmp.join("kvm");
        std::fs::write(&dev, b"").unwrap();
        let cpu = tmp.join("cpuinfo");
        std::fs::write(&cpu, "flags\t: fpu vme vmx sse\n").unwrap();
        assert_eq!(
            detect_at(&tmp.join("missing"), &tmp.join("modules"), &cpu),
            HostKvm::Unavailable
        );
        assert_eq!(
            detect_at(&dev, &tmp.join("modules"), &cpu),
            HostKvm::Hardware
        );
        std::fs::create_dir_all(tmp.join("modules/kvm_pvm")).unwrap();
        assert_eq!(detect_at(&dev, &tmp.join("modules"), &cpu), HostKvm::Pvm);
        assert!(HostKvm::Pvm.is_slow());
        std::fs::remove_dir_all(&tmp).unwrap();
    }
}
