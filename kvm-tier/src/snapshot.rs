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
    /// The disk's contents in this snapshot (absent without a disk).
    #[serde(default)]
    disk: Option<DiskLayer>,
}

/// A snapshot's layer of disk contents: a full sparse image, or the 4 KiB blocks written since
/// the parent snapshot (packed, like memory deltas).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct DiskLayer {
    size: u64,
    kind: LayerKind,
    file: FileRecord,
    depth: u32,
    blocks: Vec<u32>,
}

fn disk_layer(m: &dormant_core::Manifest) -> Result<Option<DiskLayer>> {
    let st: KvmState = serde_json::from_value(m.tier_state.clone())
        .map_err(|e| Error::snapshot(&m.id, SnapshotError::Malformed(format!("KVM state: {e}"))))?;
    Ok(st.disk)
}

/// Writes the disk layer: a delta of the blocks `written` since the parent's disk, or a full
/// image when the parent has no disk of this size.
fn write_disk(
    store: &LocalStore,
    w: &mut dormant_core::snapshot::store::SnapshotWriter<'_>,
    disk: &GuestRam,
    written: &[u32],
    parent: Option<&dormant_core::Manifest>,
) -> Result<DiskLayer> {
    let parent_disk = match parent {
        Some(p) => disk_layer(p)?.filter(|d| d.size == disk.size() as u64),
        None => None,
    };
    let bytes = disk.as_slice();
    Ok(match parent_disk {
        Some(pd) => {
            let f = w.create("disk.delta")?;
            let Written { len, stored, crc32 } =
                memimage::write_delta(&f, bytes, written).map_err(io("write disk", store))?;
            DiskLayer {
                size: bytes.len() as u64,
                kind: LayerKind::Delta,
                file: FileRecord {
                    name: "disk.delta".into(),
                    len,
                    crc32,
                    stored,
                },
                depth: pd.depth + 1,
                blocks: written.to_vec(),
            }
        }
        None => {
            let f = w.create("disk.img")?;
            let Written { len, stored, crc32 } =
                memimage::write_full(&f, bytes).map_err(io("write disk", store))?;
            DiskLayer {
                size: bytes.len() as u64,
                kind: LayerKind::Full,
                file: FileRecord {
                    name: "disk.img".into(),
                    len,
                    crc32,
                    stored,
                },
                depth: 0,
                blocks: Vec::new(),
            }
        }
    })
}

/// What a VM wrote since its parent snapshot and no committed snapshot holds yet: RAM pages
/// (KVM's dirty log plus the devices' writes) and disk blocks.
///
/// Reading KVM's dirty log (and the devices' bitmaps) clears it, so every checkpoint first
/// moves what was logged into this set, and only a checkpoint that commits empties it
/// ([`Unsaved::clear`]). A checkpoint that fails at any step (a full disk, an I/O error, a
/// parent deleted meanwhile) therefore loses nothing: the next one stores these pages too.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Unsaved {
    ram: Vec<u32>,
    disk: Vec<u32>,
    /// The dirty log could not be read once: what was written is unknown, only a full image is
    /// safe until one commits.
    unknown: bool,
}

impl Unsaved {
    /// Moves what `vm` and `disk` logged since the last collection into the set.
    pub fn collect(&mut self, vm: &MicroVm, disk: Option<&GuestRam>) {
        match vm.dirty_pages() {
            Ok(pages) => self.ram = memimage::union(&self.ram, &pages),
            Err(e) => {
                tracing::warn!(error = %e, "reading the dirty log failed; the next checkpoint is a full image");
                self.unknown = true;
            }
        }
        if let Some(d) = disk {
            self.disk = memimage::union(&self.disk, &d.take_device_dirty_pages());
        }
    }

    /// After a committed checkpoint: nothing is unsaved any more.
    pub fn clear(&mut self) {
        *self = Unsaved::default();
    }

    /// RAM pages written since the parent (sorted).
    pub fn ram_pages(&self) -> &[u32] {
        &self.ram
    }

    /// Disk blocks written since the parent (sorted).
    pub fn disk_blocks(&self) -> &[u32] {
        &self.disk
    }

    /// Whether an incremental checkpoint is possible (the dirty log was always readable).
    pub fn is_known(&self) -> bool {
        !self.unknown
    }
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
    let mut unsaved = Unsaved::default();
    unsaved.collect(vm, None);
    let parent = parent.map(|p| store.manifest(p)).transpose()?;
    save_machine(
        store,
        vm,
        state,
        None,
        None,
        parent.as_ref(),
        &unsaved,
        sandbox_id,
        spec,
    )
}

/// [`save`] with the device models' state and the disk's contents, and what was written since
/// `parent` given by the caller (who keeps it until the commit succeeds, see [`Unsaved`]).
///
/// With `parent` (and a known `unsaved` set) RAM is stored as a delta of `unsaved`'s pages,
/// and the disk as a delta of its blocks when `parent` has a disk of the same size; otherwise
/// as full sparse images. Nothing is visible in the store unless the whole snapshot commits.
#[allow(clippy::too_many_arguments)]
pub fn save_machine(
    store: &LocalStore,
    vm: &MicroVm,
    state: &VmState,
    devices: Option<&DevicesState>,
    disk: Option<&GuestRam>,
    parent: Option<&Manifest>,
    unsaved: &Unsaved,
    sandbox_id: &str,
    spec: &SandboxSpec,
) -> Result<SnapshotId> {
    let id = SnapshotId::generate();
    let mut w = store.begin(&id)?;
    let ram = vm.ram().as_slice();
    let parent = parent.filter(|_| unsaved.is_known());
    let disk_fault = disk.and_then(GuestRam::fault);
    let disk = match disk {
        Some(d) => Some(write_disk(store, &mut w, d, unsaved.disk_blocks(), parent)?),
        None => None,
    };
    let (memory, pages) = match parent {
        Some(p) => {
            let pages = unsaved.ram_pages().to_vec();
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
                    depth: p.memory.depth + 1,
                },
                pages,
            )
        }
        None => {
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
        disk,
    };
    // A page the snapshot files could not supply was read as zeros while writing: this image
    // is not the guest's memory.
    if let Some(addr) = vm.ram().fault().or(disk_fault) {
        return Err(Error::Trap {
            message: dormant_core::memguard::GuardedMemory::fault_message(addr),
            last_good: None,
        });
    }
    let manifest = Manifest {
        id: id.clone(),
        parent: parent.map(|p| p.id.clone()),
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
    load_machine(store, id).map(|l| l.vm)
}

/// What [`load_machine`] rebuilds.
#[derive(Debug)]
pub struct Loaded {
    pub vm: MicroVm,
    /// The device models' state to rebuild them from.
    pub devices: Option<DevicesState>,
    /// The disk's contents, mapped copy-on-write from the snapshot's layers.
    pub disk: Option<GuestRam>,
}

/// [`load`], also returning the device state and the disk.
pub fn load_machine(store: &LocalStore, id: &SnapshotId) -> Result<Loaded> {
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
    let disk = match &st.disk {
        Some(leaf_disk) => Some(load_disk(store, id, &chain, leaf_disk)?),
        None => None,
    };
    Ok(Loaded {
        vm,
        devices: st.devices,
        disk,
    })
}

/// Maps the disk of `chain`'s leaf: its full base image, then each delta, copy-on-write.
fn load_disk(
    store: &LocalStore,
    id: &SnapshotId,
    chain: &[dormant_core::Manifest],
    leaf: &DiskLayer,
) -> Result<GuestRam> {
    let bad = |m: String| Error::snapshot(id, SnapshotError::Malformed(m));
    // The layers of the leaf's disk: walk back from the leaf until the full image.
    let mut layers = Vec::new();
    for m in chain.iter().rev() {
        let Some(d) = disk_layer(m)? else {
            return Err(bad("a disk delta without a base image".into()));
        };
        if d.size != leaf.size {
            return Err(bad("disk layers of different sizes".into()));
        }
        let full = d.kind == LayerKind::Full;
        layers.push((m, d));
        if full {
            break;
        }
    }
    layers.reverse();
    let Some((base_m, base)) = layers.first() else {
        return Err(bad("no disk layers".into()));
    };
    if base.kind != LayerKind::Full {
        return Err(bad("the disk chain does not start with a full image".into()));
    }
    let map_err = |e: crate::vm::VmError| Error::Runtime {
        op: "map the disk",
        message: e.to_string(),
    };
    let base_file = store.open_file(&base_m.id, &base.file, true)?;
    let mut disk = GuestRam::from_image(&base_file, leaf.size as usize).map_err(map_err)?;
    for (m, d) in layers.iter().skip(1) {
        let f = store.open_file(&m.id, &d.file, true)?;
        disk.map_delta(&f, &d.blocks)
            .map_err(|e| Error::store("map disk of", store.snapshot_dir(&m.id), e))?;
    }
    Ok(disk)
}
