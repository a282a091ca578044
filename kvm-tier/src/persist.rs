//! The saved form of [`VmState`]: dormant's own versioned, plain-data type (serde), never a
//! dependency's type serialized as-is.
//!
//! General registers are named fields. The other pieces are kept as the bytes of the kernel's
//! UAPI structures (`struct kvm_sregs`, `kvm_xsave`, `kvm_lapic_state`, …): that layout is the
//! stable Linux ABI, it is what KVM reads back, and it keeps unions (irqchip, PIT) exact. Every
//! blob's length is checked against the structure before it is used, and decoding refuses
//! sequences longer than any real state has (so a hostile snapshot cannot make it allocate
//! more).

use dormant_core::SnapshotError;
use dormant_core::snapshot::bounded_vec;
use serde::{Deserialize, Serialize};

use crate::vm::{GuestRam, MicroVm, VmError, VmState};

/// One stateful component's save/restore seam (the model is Firecracker's `Persist`): its
/// saved form is a plain-data type of ours ([`Persist::State`], versioned: the vCPU/VM's by
/// [`STATE_VERSION`], each device's by `machine::DEVICES_VERSION` of the device state that
/// holds it), never a dependency's type serialized as-is. Every component implements it next
/// to its code: the VM with its vCPU, irqchip, PIT and clock (here), the UART (`serial`), and
/// each virtio device with its transport (`virtio::vsock`, `virtio::block`, `virtio::fs`);
/// `Machine::quiesce` pauses them all and saves each, `Machine::restore` restores each.
pub trait Persist: Sized {
    /// The component's saved form.
    type State;
    /// What restoring needs besides the state: the new VM's memory, its interrupt line, ...
    type Context<'a>;
    /// Why saving or restoring failed.
    type Error;

    /// The component's state; pause it first for a consistent one.
    fn save(&self) -> Result<Self::State, Self::Error>;

    /// A new component in `ctx` with `state`. The state is untrusted (it comes from a
    /// snapshot file): a state it cannot hold is an error, never a panic.
    fn restore(ctx: Self::Context<'_>, state: &Self::State) -> Result<Self, Self::Error>;
}

/// The VM with its vCPU: registers, MSRs, LAPIC, events, and the VM-wide irqchip, PIT and
/// clock. Restoring builds a brand-new VM over `ram` (dirty logging on).
impl Persist for MicroVm {
    type State = VmState;
    type Context<'a> = GuestRam;
    type Error = VmError;

    fn save(&self) -> Result<VmState, VmError> {
        self.save_state()
    }

    fn restore(ram: GuestRam, state: &VmState) -> Result<MicroVm, VmError> {
        let vm = MicroVm::new(ram, true)?;
        vm.restore_state(state)?;
        Ok(vm)
    }
}

/// Why a saved state cannot be loaded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PersistError {
    /// The state was saved by a layout version this build does not read.
    #[error("saved vCPU/VM state version {found} (this build reads {STATE_VERSION})")]
    Version { found: u32 },
    /// A saved kernel structure has the wrong length.
    #[error("saved {what} is {len} bytes, expected {expected}")]
    Length {
        what: &'static str,
        len: usize,
        expected: usize,
    },
    /// The state holds the wrong number of irqchips.
    #[error("saved vCPU/VM state has {found} {what}, expected {expected}")]
    Count {
        what: &'static str,
        found: usize,
        expected: usize,
    },
    /// The state holds more of an item (MSRs) than KVM takes.
    #[error("saved vCPU/VM state has {found} {what}, at most {limit} are accepted")]
    TooMany {
        what: &'static str,
        found: usize,
        limit: usize,
    },
}

impl From<PersistError> for SnapshotError {
    fn from(e: PersistError) -> SnapshotError {
        match e {
            PersistError::Version { found } => SnapshotError::UnsupportedStateVersion {
                what: "vCPU state",
                found: found as u64,
                supported: STATE_VERSIONS,
            },
            e => SnapshotError::Malformed(e.to_string()),
        }
    }
}

/// Version of [`SavedState`]'s layout.
pub const STATE_VERSION: u32 = 1;
/// The versions of [`SavedState`] this build reads.
pub const STATE_VERSIONS: &[u32] = &[STATE_VERSION];
/// Most MSRs a state may hold (what `KVM_SET_MSRS` takes in one call).
pub const MAX_MSRS: usize = kvm_bindings::KVM_MAX_MSR_ENTRIES;
/// Longest saved kernel structure accepted (the largest, `kvm_xsave`, is 4 KiB).
const MAX_BLOB: usize = 64 << 10;

/// General-purpose registers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Regs {
    pub rax: u64,
    pub rbx: u64,
    pub rcx: u64,
    pub rdx: u64,
    pub rsi: u64,
    pub rdi: u64,
    pub rsp: u64,
    pub rbp: u64,
    pub r8: u64,
    pub r9: u64,
    pub r10: u64,
    pub r11: u64,
    pub r12: u64,
    pub r13: u64,
    pub r14: u64,
    pub r15: u64,
    pub rip: u64,
    pub rflags: u64,
}

/// The vCPU and VM state as stored in a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedState {
    pub version: u32,
    pub regs: Regs,
    /// (index, value), at most [`MAX_MSRS`].
    #[serde(deserialize_with = "bounded_vec::<_, _, MAX_MSRS>")]
    pub msrs: Vec<(u32, u64)>,
    pub mp_state: u32,
    #[serde(deserialize_with = "bounded_vec::<_, _, MAX_BLOB>")]
    pub sregs: Vec<u8>,
    #[serde(deserialize_with = "bounded_vec::<_, _, MAX_BLOB>")]
    pub fpu: Vec<u8>,
    #[serde(deserialize_with = "bounded_vec::<_, _, MAX_BLOB>")]
    pub xsave: Vec<u8>,
    #[serde(deserialize_with = "bounded_vec::<_, _, MAX_BLOB>")]
    pub xcrs: Vec<u8>,
    #[serde(deserialize_with = "bounded_vec::<_, _, MAX_BLOB>")]
    pub lapic: Vec<u8>,
    #[serde(deserialize_with = "bounded_vec::<_, _, MAX_BLOB>")]
    pub events: Vec<u8>,
    #[serde(deserialize_with = "bounded_vec::<_, _, MAX_BLOB>")]
    pub debugregs: Vec<u8>,
    /// The two PICs and the IOAPIC (decoding refuses more than 3).
    #[serde(deserialize_with = "bounded_vec::<_, _, 3>")]
    pub irqchips: Vec<Vec<u8>>,
    #[serde(deserialize_with = "bounded_vec::<_, _, MAX_BLOB>")]
    pub pit: Vec<u8>,
    #[serde(deserialize_with = "bounded_vec::<_, _, MAX_BLOB>")]
    pub clock: Vec<u8>,
}

/// Marker for the kvm UAPI structures whose bytes are stored: plain C structures of integers
/// (and unions of integer arrays), for which every bit pattern is a valid value.
trait Pod: Default {}
impl Pod for kvm_bindings::kvm_sregs {}
impl Pod for kvm_bindings::kvm_fpu {}
impl Pod for kvm_bindings::kvm_xsave {}
impl Pod for kvm_bindings::kvm_xcrs {}
impl Pod for kvm_bindings::kvm_lapic_state {}
impl Pod for kvm_bindings::kvm_vcpu_events {}
impl Pod for kvm_bindings::kvm_debugregs {}
impl Pod for kvm_bindings::kvm_irqchip {}
impl Pod for kvm_bindings::kvm_pit_state2 {}
impl Pod for kvm_bindings::kvm_clock_data {}

fn to_bytes<T: Pod>(v: &T) -> Vec<u8> {
    // SAFETY: `T` is a plain C structure (see `Pod`); reading its `size_of` bytes is reading
    // initialised integer memory of a live value.
    unsafe { std::slice::from_raw_parts((v as *const T).cast::<u8>(), std::mem::size_of::<T>()) }
        .to_vec()
}

fn from_bytes<T: Pod>(what: &'static str, b: &[u8]) -> Result<T, PersistError> {
    if b.len() != std::mem::size_of::<T>() {
        return Err(PersistError::Length {
            what,
            len: b.len(),
            expected: std::mem::size_of::<T>(),
        });
    }
    let mut v = T::default();
    // SAFETY: the lengths match and every bit pattern is a valid `T` (see `Pod`); the copy
    // writes exactly the bytes of the local value.
    unsafe { std::ptr::copy_nonoverlapping(b.as_ptr(), (&mut v as *mut T).cast::<u8>(), b.len()) };
    Ok(v)
}

impl SavedState {
    pub fn from_state(s: &VmState) -> SavedState {
        let r = &s.regs;
        SavedState {
            version: STATE_VERSION,
            regs: Regs {
                rax: r.rax,
                rbx: r.rbx,
                rcx: r.rcx,
                rdx: r.rdx,
                rsi: r.rsi,
                rdi: r.rdi,
                rsp: r.rsp,
                rbp: r.rbp,
                r8: r.r8,
                r9: r.r9,
                r10: r.r10,
                r11: r.r11,
                r12: r.r12,
                r13: r.r13,
                r14: r.r14,
                r15: r.r15,
                rip: r.rip,
                rflags: r.rflags,
            },
            msrs: s.msrs.iter().map(|e| (e.index, e.data)).collect(),
            mp_state: s.mp_state.mp_state,
            sregs: to_bytes(&s.sregs),
            fpu: to_bytes(&s.fpu),
            xsave: to_bytes(&s.xsave),
            xcrs: to_bytes(&s.xcrs),
            lapic: to_bytes(&s.lapic),
            events: to_bytes(&s.events),
            debugregs: to_bytes(&s.debugregs),
            irqchips: s.irqchips.iter().map(to_bytes).collect(),
            pit: to_bytes(&s.pit),
            clock: to_bytes(&s.clock),
        }
    }

    /// The state to load into KVM, once every part has been checked: the version, each saved
    /// structure's length, three irqchips, at most [`MAX_MSRS`] MSRs. (The values themselves are
    /// KVM's to accept or refuse when they are set.)
    pub fn to_state(&self) -> Result<VmState, PersistError> {
        if self.version != STATE_VERSION {
            return Err(PersistError::Version {
                found: self.version,
            });
        }
        if self.irqchips.len() != 3 {
            return Err(PersistError::Count {
                what: "irqchips",
                found: self.irqchips.len(),
                expected: 3,
            });
        }
        if self.msrs.len() > MAX_MSRS {
            return Err(PersistError::TooMany {
                what: "MSRs",
                found: self.msrs.len(),
                limit: MAX_MSRS,
            });
        }
        let r = &self.regs;
        let regs = kvm_bindings::kvm_regs {
            rax: r.rax,
            rbx: r.rbx,
            rcx: r.rcx,
            rdx: r.rdx,
            rsi: r.rsi,
            rdi: r.rdi,
            rsp: r.rsp,
            rbp: r.rbp,
            r8: r.r8,
            r9: r.r9,
            r10: r.r10,
            r11: r.r11,
            r12: r.r12,
            r13: r.r13,
            r14: r.r14,
            r15: r.r15,
            rip: r.rip,
            rflags: r.rflags,
        };
        Ok(VmState {
            regs,
            sregs: from_bytes("sregs", &self.sregs)?,
            fpu: from_bytes("fpu", &self.fpu)?,
            xsave: from_bytes("xsave", &self.xsave)?,
            xcrs: from_bytes("xcrs", &self.xcrs)?,
            msrs: self
                .msrs
                .iter()
                .map(|&(index, data)| kvm_bindings::kvm_msr_entry {
                    index,
                    data,
                    ..Default::default()
                })
                .collect(),
            lapic: from_bytes("lapic", &self.lapic)?,
            events: from_bytes("vcpu events", &self.events)?,
            mp_state: kvm_bindings::kvm_mp_state {
                mp_state: self.mp_state,
            },
            debugregs: from_bytes("debug registers", &self.debugregs)?,
            irqchips: [
                from_bytes("irqchip 0", &self.irqchips[0])?,
                from_bytes("irqchip 1", &self.irqchips[1])?,
                from_bytes("irqchip 2", &self.irqchips[2])?,
            ],
            pit: from_bytes("pit", &self.pit)?,
            clock: from_bytes("clock", &self.clock)?,
        })
    }
}
