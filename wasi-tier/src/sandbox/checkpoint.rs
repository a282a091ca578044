//! Writing a checkpoint, the snapshot that checkpoint, standby and fork take. The memory goes
//! out (through `SnapshotWriter::write_layer`) as a full image or as a delta of the pages
//! written since the layer it is mapped on (squashed when the chain grows long); the
//! filesystem as an archive (or a link to the resumed snapshot's, when untouched since); then
//! the manifest with the tier state (state.rs). After a checkpoint the live memory is
//! re-mapped on what was just written, so the next delta stays small.

use dormant_core::memimage;
use dormant_core::snapshot::store::{LayerFile, LayerWrite, SnapshotWriter};
use dormant_core::snapshot::{FileRecord, MemoryRecord, TierState};
use dormant_core::{Error, LocalStore, Manifest, Operation, Result, SnapshotId, Tier, fsarchive};

use super::state::{WasiState, global_value};
use super::{Layer, Live, PendingFs, WasiSandbox};
use crate::memory::map_layers;

/// A delta chain longer than this is closed by a full checkpoint.
const MAX_DEPTH: u32 = 16;
/// More mappings than this over one memory and the next checkpoint is a full one.
const MAX_MAPPED_RUNS: usize = 8192;

impl WasiSandbox {
    /// Writes the memory layer of a checkpoint. Returns its record, its page list (for a
    /// delta), the layer it sits on, the file, and the number of mappings that remain under the
    /// new layer (so the caller can keep count after re-mapping).
    ///
    /// The plan: a delta of the pages written since the current layer; when the chain reaches
    /// `MAX_DEPTH`, a *squashed* delta (every page of the chain's deltas plus the new ones) on the
    /// chain's full image, as long as that stays under half the memory; otherwise a full image.
    fn write_memory(
        live: &mut Live,
        store: &LocalStore,
        w: &mut SnapshotWriter<'_>,
    ) -> Result<WrittenLayer> {
        let size = live.memory.data_size(&live.store);
        let data = live.memory.data(&live.store);
        let dir = w.path("");
        let io = |e: std::io::Error| Error::store("write memory of", &dir, e);
        let usable = live.layer.clone().filter(|l| {
            live.mapped_runs < MAX_MAPPED_RUNS
                && memimage::dirty_tracking_available()
                && store.contains(&l.id)
        });
        let plan = match usable {
            None => None,
            Some(l) if l.depth < MAX_DEPTH => Some((l, Vec::new(), live.mapped_runs)),
            Some(l) => match store.chain(&l.id) {
                Ok(chain) => {
                    let base = Layer {
                        id: chain[0].id.clone(),
                        depth: 0,
                    };
                    let older = chain[1..]
                        .iter()
                        .fold(Vec::new(), |acc, m| memimage::union(&acc, &m.delta_pages));
                    Some((base, older, 1))
                }
                Err(_) => None,
            },
        };
        if let Some((parent, older, runs_below)) = plan {
            let dirty = memimage::dirty_pages(data.as_ptr(), size).map_err(io)?;
            let pages = memimage::union(&older, &dirty);
            if pages.len() * memimage::PAGE * 2 <= size {
                let how = LayerWrite::Delta {
                    pages: &pages,
                    parent_depth: parent.depth,
                };
                let (record, f) = w.write_layer("memory", data, how)?;
                return Ok(WrittenLayer {
                    record,
                    pages,
                    parent: Some(parent),
                    file: f,
                    runs_below,
                });
            }
        }
        let (record, f) = w.write_layer("memory", data, LayerWrite::Full)?;
        Ok(WrittenLayer {
            record,
            pages: Vec::new(),
            parent: None,
            file: f,
            runs_below: 0,
        })
    }

    pub(super) fn do_checkpoint(&mut self) -> Result<SnapshotId> {
        self.lifecycle.check(Operation::Checkpoint)?;
        let id = SnapshotId::generate();
        let root = self.root()?;
        let store = self.store.clone();
        let mut w = store.begin(&id)?;
        let module_hash = self.module.as_ref().map(|m| m.hash.clone());
        let stdlib_hash = self
            .module
            .as_ref()
            .and_then(|m| m.python_lib.as_ref())
            .map(|(_, h)| h.clone());
        let (memory, pages, parent, mem_file, state) = match self.live.as_mut() {
            Some(live) => {
                let mut globals = Vec::with_capacity(live.globals.len());
                for (name, g) in &live.globals {
                    globals.push(global_value(name, g.get(&mut live.store))?);
                }
                let l = Self::write_memory(live, &store, &mut w)?;
                let state = WasiState {
                    version: WasiState::current_version(),
                    module_hash,
                    stdlib_hash,
                    clock_ns: live.clock.now_ns(),
                    globals,
                };
                (
                    l.record,
                    l.pages,
                    l.parent,
                    Some((l.file, l.runs_below)),
                    state,
                )
            }
            None => {
                // No instance (a files-only sandbox): an empty memory image.
                let (rec, _) = w.write_layer("memory", &[], LayerWrite::Full)?;
                (
                    rec,
                    Vec::new(),
                    None,
                    None,
                    WasiState {
                        version: WasiState::current_version(),
                        module_hash,
                        stdlib_hash,
                        clock_ns: 0,
                        globals: Vec::new(),
                    },
                )
            }
        };
        if let Some(addr) = self.live.as_ref().and_then(|l| l.guard.fault()) {
            // The image just written holds a lost page as zeros: never commit it.
            return Err(self.lose_memory(addr));
        }
        if self.pending_fs.as_ref().is_some_and(|p| p.record.is_none()) {
            self.materialize()?;
        }
        let fs_record = match &self.pending_fs {
            // Untouched since resume: the archive is the resumed snapshot's, byte for byte.
            Some(PendingFs {
                snapshot,
                record: Some(record),
                ..
            }) => {
                w.link_from(snapshot, &record.name)?;
                record.clone()
            }
            _ => {
                let fs_file = w.create("fs.tar")?;
                let fsw = fsarchive::pack(&root, &fs_file)
                    .map_err(|e| Error::store("archive", &root, e))?;
                FileRecord {
                    name: "fs.tar".into(),
                    len: fsw.len,
                    crc32: fsw.crc32,
                    stored: fsw.stored,
                }
            }
        };
        let manifest = Manifest {
            id: id.clone(),
            parent: parent.as_ref().map(|p| p.id.clone()),
            sandbox_id: self.id.clone(),
            tier: Tier::Wasi,
            created_unix_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0),
            spec: self.spec.clone(),
            memory,
            fs: Some(fs_record),
            fs_compact_len: None,
            tier_state: TierState::encode(&state).map_err(|e| Error::snapshot(&id, e))?,
            delta_pages: pages,
        };
        w.commit(&manifest)?;
        self.lifecycle.set_last_good(id.clone());
        // Re-base the live memory on what was just written, so that the next checkpoint sees
        // only pages written from now on.
        if let (Some(live), Some((f, runs_below))) = (self.live.as_mut(), mem_file) {
            // A checkpoint writes only full images and deltas.
            let mapped = manifest
                .memory_layer()
                .and_then(|layer| LayerFile::new(layer, f))
                .map_err(std::io::Error::other)
                .and_then(|layer| map_layers(&mut live.store, &live.memory, &[&layer]));
            match mapped {
                Ok(n) => {
                    live.mapped_runs = runs_below + n;
                    live.layer = Some(Layer {
                        id: id.clone(),
                        depth: manifest.memory.depth,
                    });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "could not re-map memory after checkpoint; the next checkpoint will be full");
                    live.layer = None;
                }
            }
        }
        Ok(id)
    }
}

/// What [`WasiSandbox::write_memory`] wrote.
struct WrittenLayer {
    record: MemoryRecord,
    pages: Vec<u32>,
    parent: Option<Layer>,
    file: std::fs::File,
    runs_below: usize,
}
