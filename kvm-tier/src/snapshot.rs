//! KVM checkpoints in dormant's snapshot store: the same manifest format, layering and crash
//! safety as the WASI tier. Guest RAM is a full sparse image or, when the VM has dirty logging
//! and sits on a parent snapshot, only the pages KVM logged as written since the parent; the
//! vCPU/VM state is the manifest's tier state ([`SavedState`]).
//!
//! KVM logs the vCPU's writes; pages written by device models (virtio queues) are tracked by
//! the guest memory's own bitmap, and [`MicroVm::dirty_pages`] returns both.

use dormant_core::memimage::{self, Written};
use dormant_core::snapshot::store::LocalStore;
use dormant_core::snapshot::{FileRecord, LayerKind, Manifest, MemoryRecord, SnapshotId};
use dormant_core::{Error, Result, SandboxSpec, SnapshotError, Tier};
use serde::{Deserialize, Serialize};

use crate::machine::DevicesState;
use crate::persist::SavedState;
use crate::vm::{GuestRam, MicroVm, VmState};

/// Tier state of a KVM snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct KvmState {
    ram_size: u64,
    vcpu: SavedState,
    /// Device models' state (absent for bare VMs without devices).
    #[serde(default)]
    devices: Option<DevicesState>,
}

fn io<'a>(op: &'static str, store: &'a LocalStore) -> impl FnOnce(std::io::Error) -> Error + 'a {
    move |e| Error::store(op, store.root(), e)
}

/// Writes a snapshot of a VM that is not running (state captured while paused). With
/// `parent`, the VM must have dirty logging on and its RAM must equal `parent` plus the writes
/// logged since (true after [`load`] of `parent` or a previous `save` that returned `parent`);
/// only those pages are stored. The dirty log is reset either way.
pub fn save(
    store: &LocalStore,
    vm: &MicroVm,
    state: &VmState,
    parent: Option<&SnapshotId>,
    sandbox_id: &str,
    spec: &SandboxSpec,
) -> Result<SnapshotId> {
    save_machine(store, vm, state, None, parent, sandbox_id, spec)
}

/// [`save`] with the device models' state.
pub fn save_machine(
    store: &LocalStore,
    vm: &MicroVm,
    state: &VmState,
    devices: Option<&DevicesState>,
    parent: Option<&SnapshotId>,
    sandbox_id: &str,
    spec: &SandboxSpec,
) -> Result<SnapshotId> {
    let id = SnapshotId::generate();
    let mut w = store.begin(&id)?;
    let ram = vm.ram().as_slice();
    let dirty = vm.dirty_pages().map_err(|e| Error::Runtime {
        op: "read the dirty log",
        message: e.to_string(),
    });
    let parent_depth = match parent {
        Some(p) => Some(store.manifest(p)?.memory.depth),
        None => None,
    };
    let (memory, pages) = match (parent_depth, dirty) {
        (Some(depth), Ok(pages)) => {
            let f = w.create("memory.delta")?;
            let Written { len, stored, crc32 } =
                memimage::write_delta(&f, ram, &pages).map_err(io("write memory", store))?;
            let rec = FileRecord {
                name: "memory.delta".into(),
                len,
                crc32,
                stored,
            };
            (
                MemoryRecord {
                    size: ram.len() as u64,
                    kind: LayerKind::Delta,
                    file: rec,
                    depth: depth + 1,
                },
                pages,
            )
        }
        (Some(_), Err(e)) => return Err(e),
        (None, _) => {
            let f = w.create("memory.img")?;
            let Written { len, stored, crc32 } =
                memimage::write_full(&f, ram).map_err(io("write memory", store))?;
            let rec = FileRecord {
                name: "memory.img".into(),
                len,
                crc32,
                stored,
            };
            (
                MemoryRecord {
                    size: ram.len() as u64,
                    kind: LayerKind::Full,
                    file: rec,
                    depth: 0,
                },
                Vec::new(),
            )
        }
    };
    let tier_state = KvmState {
        ram_size: ram.len() as u64,
        vcpu: SavedState::from_state(state),
        devices: devices.cloned(),
    };
    let manifest = Manifest {
        id: id.clone(),
        parent: parent.cloned(),
        sandbox_id: sandbox_id.into(),
        tier: Tier::Kvm,
        created_unix_ms: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0),
        spec: spec.clone(),
        memory,
        fs: None,
        fs_compact_len: None,
        tier_state: serde_json::to_value(&tier_state).expect("state serializes"),
        delta_pages: pages,
    };
    w.commit(&manifest)?;
    Ok(id)
}

/// Builds a brand-new VM from a snapshot: RAM mapped copy-on-write from the snapshot's layers,
/// state restored. Returns it not yet running, with dirty logging on so that its next `save`
/// can be incremental on `id`.
pub fn load(store: &LocalStore, id: &SnapshotId) -> Result<MicroVm> {
    load_machine(store, id).map(|(vm, _)| vm)
}

/// [`load`], also returning the device models' state to rebuild them from.
pub fn load_machine(
    store: &LocalStore,
    id: &SnapshotId,
) -> Result<(MicroVm, Option<DevicesState>)> {
    let chain = store.chain(id)?;
    let leaf = chain.last().expect("chain is never empty");
    let bad = |m: String| Error::snapshot(id, SnapshotError::Malformed(m));
    if leaf.tier != Tier::Kvm {
        return Err(Error::snapshot(
            id,
            SnapshotError::Incompatible(format!("a {} snapshot", leaf.tier)),
        ));
    }
    let st: KvmState = serde_json::from_value(leaf.tier_state.clone())
        .map_err(|e| bad(format!("KVM state: {e}")))?;
    let size = st.ram_size as usize;
    if chain.iter().any(|m| m.memory.size != st.ram_size) {
        return Err(bad("layers of different RAM sizes".into()));
    }
    let state = st.vcpu.to_state().map_err(|e| bad(e.to_string()))?;
    let files = chain
        .iter()
        .map(|m| store.memory_layer(m))
        .collect::<Result<Vec<_>>>()?;
    let base = files.first().expect("chain is never empty");
    if !base.full {
        return Err(bad("the chain does not start with a full image".into()));
    }
    let map_err = |e: crate::vm::VmError| Error::Runtime {
        op: "map guest RAM",
        message: e.to_string(),
    };
    let mut ram = GuestRam::from_image(&base.file, size).map_err(map_err)?;
    for (m, f) in chain.iter().zip(&files).skip(1) {
        ram.map_delta(&f.file, &m.delta_pages)
            .map_err(|e| Error::store("map memory of", store.snapshot_dir(&m.id), e))?;
    }
    let vm = MicroVm::new(ram, true).map_err(|e| Error::Runtime {
        op: "create the VM",
        message: e.to_string(),
    })?;
    vm.restore_state(&state).map_err(|e| Error::Runtime {
        op: "restore the vCPU",
        message: e.to_string(),
    })?;
    Ok((vm, st.devices))
}
