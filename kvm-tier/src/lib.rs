//! # dormant-kvm
//!
//! The KVM tier of dormant: microVMs booting a real Linux guest behind the same sandbox
//! contract as the WASI tier.
//!
//! ## Layout
//!
//! What a user of the crate sees:
//!
//! - [`KvmSandbox`] with [`KvmOptions`], [`GuestImage`] and [`KvmInterrupter`], in
//!   `sandbox/`: the handle and its `Sandbox` implementation (`mod.rs`), the guest image and
//!   options (`image.rs`), creating and booting (`create.rs`), live calls through the guest
//!   agent and the interrupter (`live.rs`), background processes (`processes.rs`),
//!   checkpoints (`checkpoint.rs`), resuming (`restore.rs`: the restore path below) and
//!   exposed guest ports, host listeners forwarded over vsock (`ports.rs`).
//! - [`KvmRuntime`], in `runtime.rs`: the tier behind dormant's tier-independent `Runtime`
//!   (create, resume, fork giving `Box<dyn Sandbox>`), and [`KvmSandbox`]'s capabilities
//!   (background processes, streaming exec) as the contract's traits.
//! - [`detect`] and [`HostKvm`]: hardware virtualization, PVM (guest kernel emulated), or none.
//! - `volume/`: the FUSE server behind virtio-fs volume slots (ABI, server, node and handle
//!   tables), with no VMM dependency.
//!
//! The VMM, private to this crate (public only with the `testing` feature, for this crate's
//! tests and examples and for the benchmarks):
//!
//! - `vm`, `vcpu`: a VM with copy-on-write guest RAM and one vCPU on its own thread, dirty-page
//!   tracking; `persist`: the `Persist` seam every stateful component implements, and the
//!   vCPU/VM's saved form.
//! - `boot`, `serial`, `virtio/`, `machine`: direct boot of an ELF `vmlinux`, the 16550
//!   console, virtio-mmio devices (`mmio` the transport, `device` the shared worker shell,
//!   `vsock/` to the guest agent, `block` for `/data`, `fs` for volume slots), wired into a
//!   `machine::Machine`.
//! - `snapshot`: checkpoints in dormant's snapshot store (full or incremental RAM, device
//!   state, disk layers).
//!
//! ## The restore path, in the order it runs
//!
//! In short here; `sandbox/restore.rs` opens with the detailed walk and holds steps 1, 2 and 6.
//!
//! 1. `KvmSandbox::from_snapshot` (→ `from_snapshot_with` → `from_snapshot_granted`): reads
//!    the manifest, resolves the grants for its mount points, makes a handle.
//! 2. `KvmSandbox::load`: asks the snapshot module for the machine, then the devices.
//! 3. `snapshot::load_machine`: reads and checks the chain of layers, maps RAM copy-on-write
//!    (`GuestRam::from_layer`, `map_layer`) and the disk (`map_disk`), decodes the vCPU/VM
//!    state (`SavedState::to_state`).
//! 4. `MicroVm::restore` (its `Persist` seam: `MicroVm::new`, then `restore_state`): a
//!    brand-new VM over that RAM takes the vCPU, irqchip, PIT and clock state.
//! 5. `Machine::restore`: every device is restored from its own state through
//!    `Persist::restore` (UART, vsock, block, fs slots, each with its transport), then
//!    `Machine::start` wires interrupts and doorbells and starts the vCPU.
//! 6. Back in `KvmSandbox::load`: `VsockHost::adopt` takes back the agent connection of the
//!    checkpoint (else `connect`), `reset_unadopted` resets the others, and `refresh_guest`
//!    gives the guest fresh entropy and the wall clock.

use std::path::Path;

mod runtime;
pub mod sandbox;
pub mod volume;

pub use runtime::KvmRuntime;
pub use sandbox::{
    BOOT_STEPS, BUILTIN_IMAGES, DEFAULT_IMAGE, FORWARD_CHUNK, GuestImage, IMAGE_BUILD_STEPS,
    ImageSource, KvmInterrupter, KvmOptions, KvmSandbox, MAX_EXPOSED_PORTS,
    MAX_FORWARDED_CONNECTIONS, RootDisk, build_image, build_image_with_progress, list_images,
};

// The VMM is private to this crate: a user needs `KvmSandbox`, its options and `detect`. The
// crate's integration tests, examples and the criterion benches reach the VMM through the
// `testing` feature, which makes these modules public; without it, what only they use is
// dead code (or an unused re-export) here, hence the `allow`.
macro_rules! vmm_modules {
    ($($name:ident),* $(,)?) => {$(
        #[cfg(feature = "testing")]
        pub mod $name;
        #[cfg(not(feature = "testing"))]
        #[allow(dead_code, unused_imports)]
        pub(crate) mod $name;
    )*};
}
vmm_modules!(
    boot, machine, net, persist, serial, snapshot, vcpu, virtio, vm
);

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
