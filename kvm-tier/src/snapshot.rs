//! KVM checkpoints in dormant's snapshot store: the same manifest format, layering and crash
//! safety as the WASI tier. Guest RAM is a full sparse image or, when the VM has dirty logging
//! and sits on a parent snapshot, only the pages KVM logged as written since the parent; the
//! vCPU/VM state is the manifest's tier state ([`SavedState`]).
//!
//! KVM logs the vCPU's writes; pages written by device models (virtio queues) are tracked by
//! the guest memory's own bitmap, and [`MicroVm::dirty_pages`] returns both.
//!
//! Loading treats the snapshot as untrusted input: the tier state decodes into versioned,
//! bounded types, every memory and disk layer of the chain is checked (page lists sorted and in
//! bounds, file lengths, depths) and opened before anything is mapped, and only checked layers
//! can be mapped ([`GuestRam::map_layer`]).

use dormant_core::memimage;
use dormant_core::snapshot::layer::Layer;
use dormant_core::snapshot::store::{LayerFile, LayerWrite, LocalStore};
use dormant_core::snapshot::{
    FileRecord, LayerKind, Manifest, SnapshotId, TierState, check_version,
};
use dormant_core::{Error, Result, SandboxSpec, SnapshotError, Tier};
use serde::{Deserialize, Serialize};

use crate::machine::{DEVICES_VERSIONS, DevicesState};
use crate::persist::Persist;
use crate::persist::{STATE_VERSIONS, SavedState};
use crate::vm::{GuestRam, MicroVm, VmState};

/// The versions of [`KvmState`] this build reads; it writes the last.
const KVM_STATE_VERSIONS: &[u32] = &[1];

/// Tier state of a KVM snapshot: dormant's own type, versioned (as are the vCPU and device
/// states it holds, each with its own version).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct KvmState {
    /// Layout version, one of [`KVM_STATE_VERSIONS`]. States written before states carried a
    /// version (still in snapshots on users' disks) have none: they are version 1.
    #[serde(default = "dormant_core::snapshot::unversioned")]
    version: u32,
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
/// the parent snapshot (packed, like memory deltas). A checked [`Layer`] (never compact, never
/// empty): decoding refuses an inconsistent one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "DiskLayerRecord", into = "DiskLayerRecord")]
struct DiskLayer(Layer);

/// [`DiskLayer`] as stored in the tier state.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct DiskLayerRecord {
    size: u64,
    kind: LayerKind,
    file: FileRecord,
    depth: u32,
    blocks: Vec<u32>,
}

impl TryFrom<DiskLayerRecord> for DiskLayer {
    /// The reason, which decoding reports inside a [`SnapshotError::Malformed`].
    type Error = String;
    fn try_from(r: DiskLayerRecord) -> std::result::Result<DiskLayer, String> {
        if r.kind == LayerKind::Compact || r.size == 0 {
            return Err(format!("a {:?} disk layer of {} bytes", r.kind, r.size));
        }
        Layer::new(r.size, r.kind, r.file, r.depth, r.blocks)
            .map(DiskLayer)
            .map_err(|e| match e {
                SnapshotError::Malformed(m) => format!("disk layer: {m}"),
                e => format!("disk layer: {e}"),
            })
    }
}

impl From<DiskLayer> for DiskLayerRecord {
    fn from(d: DiskLayer) -> DiskLayerRecord {
        let (r, blocks) = d.0.into_parts();
        DiskLayerRecord {
            size: r.size,
            kind: r.kind,
            file: r.file,
            depth: r.depth,
            blocks,
        }
    }
}

/// The version fields of the states a [`KvmState`] holds, read before the whole state.
#[derive(Deserialize)]
struct KvmProbe {
    vcpu: VersionOf,
    #[serde(default)]
    devices: Option<VersionOf>,
}

#[derive(Deserialize)]
struct VersionOf {
    version: u64,
}

/// Decodes a manifest's KVM state: an unknown version of it, of its vCPU state or of its device
/// state is a typed [`SnapshotError::UnsupportedStateVersion`], refused before the rest is
/// decoded; then every field is decoded into its bounded, checked type.
fn kvm_state(m: &Manifest) -> Result<KvmState> {
    let bad = |e| Error::snapshot(&m.id, e);
    let probe: KvmProbe = m
        .tier_state
        .decode("KVM state", KVM_STATE_VERSIONS)
        .map_err(bad)?;
    check_version("vCPU state", probe.vcpu.version, STATE_VERSIONS).map_err(bad)?;
    if let Some(d) = probe.devices {
        check_version("device state", d.version, DEVICES_VERSIONS).map_err(bad)?;
    }
    m.tier_state.decode_unversioned("KVM state").map_err(bad)
}

/// Just the disk layer of a manifest's KVM state (checked).
fn disk_layer(m: &Manifest) -> Result<Option<DiskLayer>> {
    #[derive(Deserialize)]
    struct DiskOnly {
        #[serde(default)]
        disk: Option<DiskLayer>,
    }
    let d: DiskOnly = m
        .tier_state
        .decode("KVM state", KVM_STATE_VERSIONS)
        .map_err(|e| Error::snapshot(&m.id, e))?;
    Ok(d.disk)
}

/// Writes the disk layer: a delta of the blocks `written` since the parent's disk, or a full
/// image when the parent has no disk of this size.
fn write_disk(
    w: &mut dormant_core::snapshot::store::SnapshotWriter<'_>,
    disk: &GuestRam,
    written: &[u32],
    parent: Option<&dormant_core::Manifest>,
) -> Result<DiskLayer> {
    let parent_disk = match parent {
        Some(p) => disk_layer(p)?.filter(|d| d.0.size() == disk.size() as u64),
        None => None,
    };
    let (how, blocks) = match &parent_disk {
        Some(pd) => {
            let how = LayerWrite::Delta {
                pages: written,
                parent_depth: pd.0.depth(),
            };
            (how, written.to_vec())
        }
        None => (LayerWrite::Full, Vec::new()),
    };
    let (r, _) = w.write_layer("disk", disk.as_slice(), how)?;
    Layer::new(r.size, r.kind, r.file, r.depth, blocks)
        .map(DiskLayer)
        .map_err(|e| Error::snapshot(w.id(), e))
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
        Some(d) => Some(write_disk(&mut w, d, unsaved.disk_blocks(), parent)?),
        None => None,
    };
    let (memory, pages) = match parent {
        Some(p) => {
            let pages = unsaved.ram_pages().to_vec();
            let how = LayerWrite::Delta {
                pages: &pages,
                parent_depth: p.memory.depth,
            };
            (w.write_layer("memory", ram, how)?.0, pages)
        }
        None => (w.write_layer("memory", ram, LayerWrite::Full)?.0, Vec::new()),
    };
    let tier_state = KvmState {
        version: KVM_STATE_VERSIONS[KVM_STATE_VERSIONS.len() - 1],
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
        tier_state: TierState::encode(&tier_state).map_err(|e| Error::snapshot(&id, e))?,
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

/// [`load`], also returning the device state and the disk. Every layer of the snapshot's chain
/// (memory and disk) is checked and opened before anything is mapped or a VM is created: a
/// hostile or damaged snapshot is refused with [`Error::Snapshot`].
pub fn load_machine(store: &LocalStore, id: &SnapshotId) -> Result<Loaded> {
    let chain = store.chain_for(id, Tier::Kvm)?;
    let leaf = chain.last().expect("chain is never empty");
    let bad = |m: String| Error::snapshot(id, SnapshotError::Malformed(m));
    let st = kvm_state(leaf)?;
    if st.ram_size == 0 || chain.iter().any(|m| m.memory.size != st.ram_size) {
        return Err(bad("layers of different RAM sizes".into()));
    }
    let state = st
        .vcpu
        .to_state()
        .map_err(|e| Error::snapshot(id, e.into()))?;
    let files = chain
        .iter()
        .map(|m| store.memory_layer(m))
        .collect::<Result<Vec<_>>>()?;
    let disk_files = match &st.disk {
        Some(leaf_disk) => Some(disk_layers(store, id, &chain, leaf_disk)?),
        None => None,
    };
    let base = files.first().expect("chain is never empty");
    if !base.is_full() {
        return Err(bad("the chain does not start with a full image".into()));
    }
    let map_err = |e: crate::vm::VmError| Error::runtime("map guest RAM", e);
    let mut ram = GuestRam::from_layer(base).map_err(map_err)?;
    for (m, f) in chain.iter().zip(&files).skip(1) {
        ram.map_layer(f)
            .map_err(|e| Error::store("map memory of", store.snapshot_dir(&m.id), e))?;
    }
    let disk = match disk_files {
        Some(layers) => Some(map_disk(store, &layers)?),
        None => None,
    };
    let vm = MicroVm::restore(ram, &state)
        .map_err(|e| Error::runtime("restore the VM and its vCPU", e))?;
    Ok(Loaded {
        vm,
        devices: st.devices,
        disk,
    })
}

/// The checked, opened layers of the disk of `chain`'s leaf, base first: walking back from the
/// leaf, each layer one depth below the next, of the leaf's size, down to a full image.
fn disk_layers(
    store: &LocalStore,
    id: &SnapshotId,
    chain: &[Manifest],
    leaf: &DiskLayer,
) -> Result<Vec<(SnapshotId, LayerFile)>> {
    let bad = |m: String| Error::snapshot(id, SnapshotError::Malformed(m));
    let mut layers = Vec::new();
    let mut depth = leaf.0.depth();
    for m in chain.iter().rev() {
        let Some(d) = disk_layer(m)? else {
            return Err(bad("a disk delta without a base image".into()));
        };
        if d.0.size() != leaf.0.size() {
            return Err(bad("disk layers of different sizes".into()));
        }
        if d.0.depth() != depth {
            return Err(bad(format!(
                "disk layer of snapshot {} at depth {}, expected {depth}",
                m.id,
                d.0.depth()
            )));
        }
        let full = d.0.kind() == LayerKind::Full;
        layers.push((m.id.clone(), d.0));
        if full {
            break;
        }
        depth -= 1;
    }
    if layers
        .last()
        .is_none_or(|(_, l)| l.kind() != LayerKind::Full)
    {
        return Err(bad("the disk chain does not start with a full image".into()));
    }
    layers.reverse();
    layers
        .into_iter()
        .map(|(sid, l)| Ok((sid.clone(), store.open_layer(&sid, l)?)))
        .collect()
}

/// Maps checked disk layers (base first) copy-on-write.
fn map_disk(store: &LocalStore, layers: &[(SnapshotId, LayerFile)]) -> Result<GuestRam> {
    let map_err = |e: crate::vm::VmError| Error::runtime("map the disk", e);
    let Some(((_, base), deltas)) = layers.split_first() else {
        return Err(Error::runtime("map the disk", "no disk layers"));
    };
    let mut disk = GuestRam::from_layer(base).map_err(map_err)?;
    for (sid, f) in deltas {
        disk.map_layer(f)
            .map_err(|e| Error::store("map disk of", store.snapshot_dir(sid), e))?;
    }
    Ok(disk)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::{Path, PathBuf};

    fn golden(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/golden")
            .join(name)
    }

    /// The manifests of the golden chain (`tests/golden/snapshots`, written before KVM states
    /// carried a version), oldest first.
    fn golden_manifests() -> Vec<Manifest> {
        let mut dirs: Vec<PathBuf> = std::fs::read_dir(golden("snapshots"))
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .collect();
        dirs.sort();
        dirs.iter()
            .map(|d| Manifest::decode(&std::fs::read(d.join("manifest.dsnp")).unwrap()).unwrap())
            .collect()
    }

    fn with_state(m: &Manifest, edit: impl FnOnce(&mut serde_json::Value)) -> Manifest {
        let mut v = m.tier_state.to_value();
        edit(&mut v);
        let mut m = m.clone();
        m.tier_state = TierState::encode(&v).unwrap();
        m
    }

    #[test]
    fn states_written_without_a_version_are_version_1() {
        for m in golden_manifests() {
            assert!(
                m.tier_state.to_value().get("version").is_none(),
                "the golden states predate the version field"
            );
            let st = kvm_state(&m).unwrap();
            assert_eq!(st.version, 1);
            assert!(st.devices.is_some() && st.disk.is_some());
        }
    }

    /// The current encoding of the KVM state is pinned by `tests/golden/kvm-state-v1.json`
    /// (the golden incremental snapshot's state, as this build writes it): a change of field
    /// names, order or shape fails here. Regenerate with DORMANT_BLESS=1 only together with a
    /// new state version and a reader for version 1.
    #[test]
    fn golden_v1_state_decodes_and_encodes_identically() {
        let path = golden("kvm-state-v1.json");
        let leaf = golden_manifests().pop().unwrap();
        let st = kvm_state(&leaf).unwrap();
        let encoded = TierState::encode(&st).unwrap();
        if std::env::var_os("DORMANT_BLESS").is_some() {
            std::fs::write(&path, encoded.as_json()).unwrap();
        }
        let text = std::fs::read_to_string(&path).expect("golden state present");
        assert_eq!(
            encoded.as_json(),
            text,
            "encoding changed: add a new KVM state version and keep a reader for version 1"
        );
        let m = Manifest {
            tier_state: serde_json::from_str(&text).unwrap(),
            ..leaf
        };
        assert_eq!(kvm_state(&m).unwrap(), st);
        assert!(text.starts_with("{\"version\":1,"), "{text:.40}");
    }

    /// JSON pointers of every node of `v`.
    fn pointers(v: &serde_json::Value, at: String, out: &mut Vec<String>) {
        match v {
            serde_json::Value::Object(m) => {
                for (k, x) in m {
                    pointers(x, format!("{at}/{k}"), out);
                }
            }
            serde_json::Value::Array(a) => {
                for (i, x) in a.iter().enumerate().take(8) {
                    pointers(x, format!("{at}/{i}"), out);
                }
            }
            _ => {}
        }
        out.push(at);
    }

    fn hostile_json() -> impl proptest::strategy::Strategy<Value = serde_json::Value> {
        use proptest::prelude::*;
        use serde_json::json;
        prop_oneof![
            Just(json!(null)),
            Just(json!(-1)),
            Just(json!(0)),
            Just(json!(2)),
            Just(json!(4097)),
            Just(json!(u64::MAX)),
            Just(json!(1.5)),
            Just(json!("x")),
            Just(json!([])),
            Just(json!({})),
            Just(json!([[], [], [], []])),
            Just(json!(vec![7u32; 5000])),
            any::<u64>().prop_map(|n| json!(n)),
            prop::collection::vec(any::<u32>(), 0..20).prop_map(|v| json!(v)),
        ]
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(256))]

        /// The golden KVM state with up to three of its values (anywhere: registers, blobs,
        /// device states, the disk layer) replaced by hostile ones decodes, or is refused with
        /// `Error::Snapshot`, never a panic; what decodes gives a vCPU state that converts or
        /// is refused, and disk layers that are checked.
        #[test]
        fn hostile_kvm_states_decode_or_are_refused(
            edits in proptest::collection::vec(
                (proptest::prelude::any::<proptest::sample::Index>(), hostile_json()),
                1..4,
            ),
        ) {
            let leaf = golden_manifests().pop().unwrap();
            let mut v = leaf.tier_state.to_value();
            let mut all = Vec::new();
            pointers(&v, String::new(), &mut all);
            for (at, x) in edits {
                let p = &all[at.index(all.len())];
                if let Some(slot) = v.pointer_mut(p) {
                    *slot = x;
                }
            }
            let m = Manifest {
                tier_state: TierState::encode(&v).unwrap(),
                ..leaf
            };
            match kvm_state(&m) {
                Ok(st) => {
                    let _ = st.vcpu.to_state();
                    if let Some(d) = &st.disk {
                        proptest::prop_assert!(Layer::new(
                            d.0.size(),
                            d.0.kind(),
                            d.0.file().clone(),
                            d.0.depth(),
                            d.0.pages().to_vec()
                        )
                        .is_ok());
                    }
                }
                Err(e) => proptest::prop_assert!(matches!(e, Error::Snapshot { .. }), "{e:?}"),
            }
        }
    }

    fn unsupported(m: &Manifest) -> (&'static str, u64) {
        match kvm_state(m) {
            Err(Error::Snapshot {
                source:
                    SnapshotError::UnsupportedStateVersion {
                        what,
                        found,
                        supported,
                    },
                ..
            }) => {
                assert_eq!(supported, &[1]);
                (what, found)
            }
            other => panic!("expected an unsupported version, got {other:?}"),
        }
    }

    #[test]
    fn unknown_versions_are_typed_errors_not_parse_errors() {
        let leaf = golden_manifests().pop().unwrap();
        // A future state whose layout this build cannot parse at all still says which version.
        let future =
            with_state(
                &leaf,
                |v| *v = serde_json::json!({"version": 2, "a completely": ["different", "layout"]}),
            );
        assert_eq!(unsupported(&future), ("KVM state", 2));
        let m = with_state(&leaf, |v| v["devices"]["version"] = 7.into());
        assert_eq!(unsupported(&m), ("device state", 7));
        let m = with_state(&leaf, |v| v["vcpu"]["version"] = 3.into());
        assert_eq!(unsupported(&m), ("vCPU state", 3));
        let m = with_state(&leaf, |v| v["version"] = u64::MAX.into());
        assert_eq!(unsupported(&m), ("KVM state", u64::MAX));
        // A version that is not a number is malformed.
        let m = with_state(&leaf, |v| v["version"] = "1".into());
        assert!(matches!(
            kvm_state(&m),
            Err(Error::Snapshot {
                source: SnapshotError::Malformed(_),
                ..
            })
        ));
    }
}
