//! Host access on resume: it comes from the caller, never from a snapshot.
//!
//! A snapshot is a file that anyone able to write the store can forge, so nothing in it may
//! grant access to the host. It records only *where* the guest saw host directories (each
//! mount point's guest path and read-only flag: [`Mount::host`] is never serialized) and, for a
//! WebAssembly module workload, the module's content hash. Whoever resumes it passes
//! [`Grants`]: the host directory for each of the snapshot's mount points and, for a module
//! workload, the module file, whose content must hash to the snapshot's.
//!
//! [`Grants::resolve`] matches the caller's grants against the snapshot's mount points:
//!
//! - a mount point the caller gives a directory for gets that directory, with the caller's
//!   read-only flag: a read-only grant of a mount point the snapshot had writable stays
//!   read-only; a writable grant of one the snapshot had read-only is refused
//!   ([`GrantError::MountWidened`]), because the guest mounted it read-only and cannot be
//!   made to see it otherwise;
//! - a mount point the caller gives nothing for is an error naming it
//!   ([`GrantError::MountMissing`]) unless the caller allows detaching it
//!   ([`Grants::detach_missing`]): it then shows an empty, read-only directory;
//! - a mount point the snapshot did not have is refused ([`GrantError::MountNotInSnapshot`]):
//!   a resumed guest cannot take a new mount consistently on every tier (a WASI interpreter
//!   reads its preopened directories once), so a resume only re-grants the snapshot's own.
//!
//! Sandbox handles keep the grants they were created or resumed with, so that whatever resumes
//! on the caller's behalf (auto-standby's wake, `fork`, `Sandbox::resume` of the same handle)
//! passes them along.

use std::path::{Path, PathBuf};

use crate::error::{Error, GrantError, Result, SnapshotError};
use crate::ids::SnapshotId;
use crate::paths::guest::GuestPath;
use crate::spec::{Mount, SandboxSpec, Workload, check_mounts};

pub use crate::sandbox_dirs::detached_dir;
pub use crate::spec::MAX_MOUNTS;

/// The host access a caller grants to a resumed sandbox. Default: nothing (no host directory,
/// no module file; a recorded mount point without a grant is an error).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Grants {
    /// Host directories for the snapshot's mount points, matched by guest path (after
    /// normalisation: `/data/` and `/data` are one mount point).
    pub mounts: Vec<Mount>,
    /// Whether a mount point of the snapshot that `mounts` does not cover is detached (it shows
    /// an empty, read-only directory) instead of failing the resume. Default: false.
    pub detach_missing: bool,
    /// The module file of a `Workload::Module` snapshot (WASI tier). Its content must hash to
    /// the module hash the snapshot recorded; the path the snapshot recorded is never opened.
    pub module: Option<PathBuf>,
}

impl Grants {
    /// No host access.
    pub fn new() -> Grants {
        Grants::default()
    }

    /// The grants of a sandbox created from `spec`: its mounts and its module file.
    pub fn of_spec(spec: &SandboxSpec) -> Grants {
        Grants {
            mounts: spec.mounts.clone(),
            detach_missing: false,
            module: match &spec.workload {
                Workload::Module { path } => Some(path.clone()),
                _ => None,
            },
        }
    }

    /// Grants `host` for the snapshot's mount point `guest`.
    pub fn mount(
        mut self,
        host: impl Into<PathBuf>,
        guest: impl Into<String>,
        read_only: bool,
    ) -> Self {
        self.mounts.push(Mount {
            host: host.into(),
            guest: guest.into(),
            read_only,
        });
        self
    }

    /// See [`Grants::detach_missing`](field@Grants::detach_missing).
    pub fn detach_missing(mut self, detach: bool) -> Self {
        self.detach_missing = detach;
        self
    }

    /// Names the module file of a `Workload::Module` snapshot.
    pub fn module(mut self, path: impl Into<PathBuf>) -> Self {
        self.module = Some(path.into());
        self
    }

    /// Matches these grants against `recorded`, the mount points of snapshot `id` (its
    /// manifest's `spec.mounts`, whose host paths are ignored). Returns the sandbox's mounts
    /// in the snapshot's order (which the tiers rely on: WASI preopen order, KVM volume slots):
    /// each with the caller's host directory and read-only flag, or [detached](Mount::is_detached)
    /// with the snapshot's flag when the caller allowed that.
    ///
    /// Errors: [`Error::InvalidArgument`] for a grant that is itself invalid (no such
    /// directory, a bad or repeated guest path); [`Error::Snapshot`] for a snapshot whose mount
    /// points are malformed; [`Error::Grant`] when the grants do not fit the snapshot (see the
    /// module documentation).
    pub fn resolve(&self, id: &SnapshotId, recorded: &[Mount]) -> Result<Vec<Mount>> {
        check_mounts(&self.mounts).map_err(Error::InvalidArgument)?;
        let bad = |m: String| Error::snapshot(id, SnapshotError::Malformed(m));
        if recorded.len() > MAX_MOUNTS {
            return Err(bad(format!(
                "{} mount points (at most {MAX_MOUNTS})",
                recorded.len()
            )));
        }
        let mut points = Vec::with_capacity(recorded.len());
        for r in recorded {
            let g = GuestPath::parse(&r.guest)
                .map_err(|e| bad(format!("mount point {:?}: {e}", r.guest)))?;
            if g.is_root() || points.contains(&g) {
                return Err(bad(format!(
                    "mount point {:?} is the root or repeated",
                    r.guest
                )));
            }
            points.push(g);
        }
        let grant_err = |source: GrantError| Error::Grant {
            id: id.clone(),
            source,
        };
        let granted: Vec<GuestPath> = self
            .mounts
            .iter()
            .map(|m| GuestPath::parse(&m.guest))
            .collect::<Result<_>>()?;
        if let Some((m, _)) = self
            .mounts
            .iter()
            .zip(&granted)
            .find(|(_, g)| !points.contains(g))
        {
            return Err(grant_err(GrantError::MountNotInSnapshot {
                guest: m.guest.clone(),
                recorded: recorded.iter().map(|r| r.guest.clone()).collect(),
            }));
        }
        let mut out = Vec::with_capacity(recorded.len());
        for (r, point) in recorded.iter().zip(&points) {
            match granted.iter().position(|g| g == point) {
                Some(i) => {
                    let m = &self.mounts[i];
                    if r.read_only && !m.read_only {
                        return Err(grant_err(GrantError::MountWidened {
                            guest: r.guest.clone(),
                        }));
                    }
                    out.push(Mount {
                        host: m.host.clone(),
                        // The guest's own spelling: a WASI interpreter matches preopen names.
                        guest: r.guest.clone(),
                        read_only: m.read_only,
                    });
                }
                None if self.detach_missing => out.push(Mount::detached(&r.guest, r.read_only)),
                None => {
                    return Err(grant_err(GrantError::MountMissing {
                        guest: r.guest.clone(),
                        read_only: r.read_only,
                    }));
                }
            }
        }
        Ok(out)
    }
}

/// The mounts to attach for `mounts`: each attached one as it is, each detached one as
/// `detached` (see [`detached_dir`]), read-only.
pub fn attachable(mounts: &[Mount], detached: &Path) -> Vec<Mount> {
    mounts
        .iter()
        .map(|m| {
            if m.is_detached() {
                Mount {
                    host: detached.to_path_buf(),
                    guest: m.guest.clone(),
                    read_only: true,
                }
            } else {
                m.clone()
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id() -> SnapshotId {
        SnapshotId::parse("s-0000019a00000000-0123456789abcdef0123456789abcdef").unwrap()
    }

    /// Mount points as a snapshot records them (no host directory).
    fn recorded(points: &[(&str, bool)]) -> Vec<Mount> {
        points
            .iter()
            .map(|(g, ro)| Mount::detached(g, *ro))
            .collect()
    }

    fn grant_error(r: Result<Vec<Mount>>) -> GrantError {
        match r {
            Err(Error::Grant { id: i, source }) => {
                assert_eq!(i, id());
                source
            }
            other => panic!("expected a grant error, got {other:?}"),
        }
    }

    #[test]
    fn grants_fill_the_snapshots_mount_points_in_its_order() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        let snap = recorded(&[("/data", false), ("/ref/", true)]);
        let g = Grants::new()
            .mount(b.path(), "/ref", true)
            .mount(a.path(), "/data/", false);
        let got = g.resolve(&id(), &snap).unwrap();
        assert_eq!(
            got,
            vec![
                Mount {
                    host: a.path().into(),
                    guest: "/data".into(),
                    read_only: false
                },
                Mount {
                    host: b.path().into(),
                    guest: "/ref/".into(),
                    read_only: true
                },
            ],
            "snapshot order and spelling, the caller's directories"
        );
    }

    #[test]
    fn a_mount_point_without_a_grant_is_an_error_naming_it() {
        let a = tempfile::tempdir().unwrap();
        let snap = recorded(&[("/data", false), ("/secrets", true)]);
        let g = Grants::new().mount(a.path(), "/data", false);
        let e = grant_error(g.resolve(&id(), &snap));
        assert!(
            matches!(&e, GrantError::MountMissing { guest, read_only: true } if guest == "/secrets"),
            "{e:?}"
        );
        let text = e.to_string();
        assert!(
            text.contains("/secrets") && text.contains("detach_missing"),
            "{text}"
        );
    }

    #[test]
    fn detach_missing_leaves_the_mount_point_without_a_directory() {
        let snap = recorded(&[("/data", false)]);
        let got = Grants::new()
            .detach_missing(true)
            .resolve(&id(), &snap)
            .unwrap();
        assert_eq!(got.len(), 1);
        assert!(got[0].is_detached());
        assert_eq!((got[0].guest.as_str(), got[0].read_only), ("/data", false));
        let shown = attachable(&got, Path::new("/empty"));
        assert_eq!(
            shown,
            vec![Mount {
                host: "/empty".into(),
                guest: "/data".into(),
                read_only: true
            }],
            "a detached mount point shows the empty directory, read-only"
        );
    }

    #[test]
    fn a_grant_for_a_mount_point_the_snapshot_lacks_is_refused() {
        let a = tempfile::tempdir().unwrap();
        let snap = recorded(&[("/data", false)]);
        let g = Grants::new()
            .mount(a.path(), "/data", false)
            .mount(a.path(), "/extra", false);
        let e = grant_error(g.resolve(&id(), &snap));
        assert!(
            matches!(&e, GrantError::MountNotInSnapshot { guest, .. } if guest == "/extra"),
            "{e:?}"
        );
    }

    #[test]
    fn read_only_is_the_callers_and_never_widened() {
        let a = tempfile::tempdir().unwrap();
        // Writable in the snapshot, granted read-only: read-only.
        let got = Grants::new()
            .mount(a.path(), "/data", true)
            .resolve(&id(), &recorded(&[("/data", false)]))
            .unwrap();
        assert!(got[0].read_only);
        // Read-only in the snapshot, granted writable: refused, not silently narrowed.
        let e = grant_error(
            Grants::new()
                .mount(a.path(), "/data", false)
                .resolve(&id(), &recorded(&[("/data", true)])),
        );
        assert!(matches!(&e, GrantError::MountWidened { guest } if guest == "/data"));
    }

    #[test]
    fn bad_grants_and_malformed_mount_points_are_refused() {
        let a = tempfile::tempdir().unwrap();
        let snap = recorded(&[("/data", false)]);
        assert!(matches!(
            Grants::new()
                .mount("/nonexistent-dir-x", "/data", false)
                .resolve(&id(), &snap),
            Err(Error::InvalidArgument(_))
        ));
        assert!(matches!(
            Grants::new()
                .mount(a.path(), "/data", false)
                .mount(a.path(), "/data/.", false)
                .resolve(&id(), &snap),
            Err(Error::InvalidArgument(_))
        ));
        for bad in [
            recorded(&[("/", false)]),
            recorded(&[("/../..", false)]),
            recorded(&[("/a", false), ("/a/", true)]),
            recorded(&[("/a\0", false)]),
            (0..=MAX_MOUNTS)
                .map(|i| Mount::detached(&format!("/m{i}"), false))
                .collect(),
        ] {
            assert!(
                matches!(
                    Grants::new().detach_missing(true).resolve(&id(), &bad),
                    Err(Error::Snapshot {
                        source: SnapshotError::Malformed(_),
                        ..
                    })
                ),
                "{bad:?}"
            );
        }
    }
}
