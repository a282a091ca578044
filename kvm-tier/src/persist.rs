//! The saved form of [`VmState`]: dormant's own versioned, plain-data type (serde), never a
//! dependency's type serialized as-is.
//!
//! General registers are named fields. The other pieces are kept as the bytes of the kernel's
//! UAPI structures (`struct kvm_sregs`, `kvm_xsave`, `kvm_lapic_state`, …): that layout is the
//! stable Linux ABI, it is what KVM reads back, and it keeps unions (irqchip, PIT) exact. Every
//! blob's length is checked against the structure before it is used.

use serde::{Deserialize, Serialize};

use crate::vm::VmState;

/// Why a saved state cannot be loaded.
#[derive(Debug, thiserror::Error)]
#[error("saved vCPU/VM state: {0}")]
pub struct PersistError(String);

/// Version of [`SavedState`]'s layout.
pub const STATE_VERSION: u32 = 1;

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
    pub msrs: Vec<(u32, u64)>,
    pub mp_state: u32,
    pub sregs: Vec<u8>,
    pub fpu: Vec<u8>,
    pub xsave: Vec<u8>,
    pub xcrs: Vec<u8>,
    pub lapic: Vec<u8>,
    pub events: Vec<u8>,
    pub debugregs: Vec<u8>,
    pub irqchips: Vec<Vec<u8>>,
    pub pit: Vec<u8>,
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

fn from_bytes<T: Pod>(what: &str, b: &[u8]) -> Result<T, PersistError> {
    if b.len() != std::mem::size_of::<T>() {
        return Err(PersistError(format!(
            "{what} is {} bytes, expected {}",
            b.len(),
            std::mem::size_of::<T>()
        )));
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

    pub fn to_state(&self) -> Result<VmState, PersistError> {
        if self.version != STATE_VERSION {
            return Err(PersistError(format!(
                "version {} (this build reads {STATE_VERSION})",
                self.version
            )));
        }
        if self.irqchips.len() != 3 {
            return Err(PersistError(format!(
                "{} irqchips, expected 3",
                self.irqchips.len()
            )));
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
