//! What a sandbox is made from: the [`SandboxSpec`].
//!
//! Every default is deny-by-default or bounded, and documented on its field: a sandbox sees no
//! host directory unless a [`Mount`] grants it, gets no host environment variable unless listed,
//! and each call is bounded in time, memory and output.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::network::{NetworkPolicy, PortMapping};
use crate::paths::guest::GuestPath;

/// Which isolation technology runs the sandbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Tier {
    /// WebAssembly/WASI instances in wasmtime.
    Wasi,
    /// KVM microVMs running Linux.
    Kvm,
}

impl Tier {
    pub fn as_str(self) -> &'static str {
        match self {
            Tier::Wasi => "wasi",
            Tier::Kvm => "kvm",
        }
    }
}

/// A tier by name: `"wasi"` or `"kvm"` (what [`Tier::as_str`] gives); any other name is
/// [`Error::InvalidArgument`], with the names to use.
impl std::str::FromStr for Tier {
    type Err = Error;

    fn from_str(name: &str) -> Result<Tier> {
        match name {
            "wasi" => Ok(Tier::Wasi),
            "kvm" => Ok(Tier::Kvm),
            other => Err(Error::InvalidArgument(format!(
                "unknown tier {other:?}: use \"wasi\" (Python sessions) or \"kvm\" (Linux \
                 microVMs)"
            ))),
        }
    }
}

impl std::fmt::Display for Tier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What runs inside the sandbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Workload {
    /// A live Python interpreter session (`run_code`), plus `exec` of WASI commands.
    Python,
    /// A WASI reactor module at this host path, driven by calling its exports; plus `exec`.
    Module { path: PathBuf },
    /// Only a filesystem; `exec` runs WASI command modules against it.
    Files,
    /// A Linux microVM (KVM tier): a shell, processes, files; `exec` runs guest programs.
    Linux,
}

/// A host directory made visible inside the sandbox.
///
/// A snapshot records a sandbox's mount points (guest path, read-only flag), never their host
/// directories: `host` is not serialized, and a mount decoded from a snapshot is
/// [detached](Mount::is_detached). Host directories come from the caller of a resume
/// ([`Grants`](crate::grants::Grants)).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mount {
    /// The host directory. It must exist. Empty for a detached mount point. Never serialized.
    #[serde(skip)]
    pub host: PathBuf,
    /// Where the guest sees it: an absolute guest path such as `/data`.
    pub guest: String,
    /// Whether the guest (and the files API) may only read.
    pub read_only: bool,
}

impl Mount {
    /// A mount point without a host directory: what a snapshot records, and what a resume
    /// leaves where the caller granted nothing and allowed that
    /// ([`Grants::detach_missing`](crate::grants::Grants::detach_missing)).
    pub fn detached(guest: &str, read_only: bool) -> Mount {
        Mount {
            host: PathBuf::new(),
            guest: guest.to_owned(),
            read_only,
        }
    }

    /// Whether no host directory is attached (an empty `host`). A detached mount point shows
    /// an empty, read-only directory in a live sandbox.
    pub fn is_detached(&self) -> bool {
        self.host.as_os_str().is_empty()
    }
}

/// Most mount points a sandbox (or a snapshot's record of one) may have.
pub const MAX_MOUNTS: usize = 64;

/// Checks mounts given by a caller: host directories that exist, valid distinct mount points
/// other than the root, at most [`MAX_MOUNTS`]. The error is a sentence for the caller.
pub(crate) fn check_mounts(mounts: &[Mount]) -> std::result::Result<(), String> {
    if mounts.len() > MAX_MOUNTS {
        return Err(format!("{} mounts (at most {MAX_MOUNTS})", mounts.len()));
    }
    let mut seen = std::collections::HashSet::new();
    for m in mounts {
        let g =
            GuestPath::parse(&m.guest).map_err(|e| format!("mount point {:?}: {e}", m.guest))?;
        if g.is_root() {
            return Err("a mount cannot replace the sandbox root".into());
        }
        if !seen.insert(g.as_str().to_owned()) {
            return Err(format!("mount point {:?} given twice", m.guest));
        }
        if m.is_detached() || !m.host.is_dir() {
            return Err(format!(
                "mount source {:?} is not a directory",
                m.host.display().to_string()
            ));
        }
    }
    Ok(())
}

/// Everything needed to create a sandbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SandboxSpec {
    pub tier: Tier,
    pub workload: Workload,
    /// Cap on guest memory in bytes. Default: 2 GiB.
    pub memory_limit: u64,
    /// Wall-time limit of one call (`run_code`, `exec`, an export call). Default: 60 s.
    pub call_timeout: Duration,
    /// Most bytes kept per output stream per call; more is an error. Default: 16 MiB.
    pub output_limit: usize,
    /// Environment variables the guest sees, in this order. Default: none beyond the tier's own.
    pub env: Vec<(String, String)>,
    /// Host directories granted to the guest, at most [`MAX_MOUNTS`]
    /// (a KVM sandbox: 4). Default: none. A snapshot keeps only their mount points.
    pub mounts: Vec<Mount>,
    /// The root filesystem of a Linux sandbox (KVM tier): a built-in image name (`"minimal"`,
    /// `"base"`, `"coding"`), an image of the user's built by `dormant image build`, or a path
    /// to an ext4 image file. `None` is the tier's default, `"base"` (Debian). The
    /// WASI tier takes none. Recorded in snapshots only when set, so manifests without it keep
    /// their bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// Which destinations the guest may reach ([`NetworkPolicy`]). Default: none (off). Only
    /// the KVM tier has networking. Recorded only when not off.
    #[serde(default, skip_serializing_if = "NetworkPolicy::is_off")]
    pub network: NetworkPolicy,
    /// Guest ports exposed on the host, in the order they were exposed; a resume exposes them
    /// again (on the same host ports when free). Default: none. Only the KVM tier has ports.
    /// Recorded only when some are exposed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<PortMapping>,
}

impl SandboxSpec {
    /// Default memory cap: 2 GiB.
    pub const DEFAULT_MEMORY_LIMIT: u64 = 2 << 30;
    /// Default per-call deadline: 60 s.
    pub const DEFAULT_CALL_TIMEOUT: Duration = Duration::from_secs(60);
    /// Default per-stream output cap: 16 MiB.
    pub const DEFAULT_OUTPUT_LIMIT: usize = 16 << 20;

    /// A sandbox of `tier` running `workload`, with the documented defaults.
    pub fn new(tier: Tier, workload: Workload) -> Self {
        SandboxSpec {
            tier,
            workload,
            memory_limit: Self::DEFAULT_MEMORY_LIMIT,
            call_timeout: Self::DEFAULT_CALL_TIMEOUT,
            output_limit: Self::DEFAULT_OUTPUT_LIMIT,
            env: Vec::new(),
            mounts: Vec::new(),
            image: None,
            network: NetworkPolicy::off(),
            ports: Vec::new(),
        }
    }

    /// A WASI Python session with defaults.
    pub fn python() -> Self {
        Self::new(Tier::Wasi, Workload::Python)
    }

    /// Default guest RAM of a Linux microVM: 256 MiB (its memory limit is its RAM size; boot
    /// time grows with it where guest kernels are emulated).
    pub const DEFAULT_LINUX_MEMORY: u64 = 256 << 20;

    /// A Linux microVM (KVM tier) with defaults.
    pub fn linux() -> Self {
        Self::new(Tier::Kvm, Workload::Linux).memory_limit(Self::DEFAULT_LINUX_MEMORY)
    }

    /// The default sandbox of `tier`: [`python`](Self::python) for the WASI tier,
    /// [`linux`](Self::linux) for the KVM tier.
    pub fn default_for(tier: Tier) -> Self {
        match tier {
            Tier::Wasi => Self::python(),
            Tier::Kvm => Self::linux(),
        }
    }

    pub fn memory_limit(mut self, bytes: u64) -> Self {
        self.memory_limit = bytes;
        self
    }

    pub fn call_timeout(mut self, timeout: Duration) -> Self {
        self.call_timeout = timeout;
        self
    }

    pub fn output_limit(mut self, bytes: usize) -> Self {
        self.output_limit = bytes;
        self
    }

    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    /// The Linux root filesystem image ([`SandboxSpec::image`]).
    pub fn image(mut self, image: impl Into<String>) -> Self {
        self.image = Some(image.into());
        self
    }

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

    /// The egress policy ([`NetworkPolicy`]; KVM tier only).
    pub fn network(mut self, policy: NetworkPolicy) -> Self {
        self.network = policy;
        self
    }

    /// Checks the spec for values no tier can honour.
    pub fn validate(&self) -> Result<()> {
        if self.memory_limit < (1 << 20) {
            return Err(Error::InvalidSpec(format!(
                "memory_limit of {} bytes is below the minimum of 1 MiB",
                self.memory_limit
            )));
        }
        if self.call_timeout.is_zero() {
            return Err(Error::InvalidSpec("call_timeout must be positive".into()));
        }
        if self.output_limit == 0 {
            return Err(Error::InvalidSpec("output_limit must be positive".into()));
        }
        for (k, _) in &self.env {
            if k.is_empty() || k.contains('=') || k.contains('\0') {
                return Err(Error::InvalidSpec(format!(
                    "invalid environment variable name {k:?}"
                )));
            }
        }
        check_mounts(&self.mounts).map_err(Error::InvalidSpec)?;
        match &self.image {
            Some(_) if self.tier != Tier::Kvm => {
                return Err(Error::InvalidSpec(
                    "an image is a Linux root filesystem: only the KVM tier takes one".into(),
                ));
            }
            Some(i) if i.is_empty() || i.contains('\0') => {
                return Err(Error::InvalidSpec(format!("invalid image name {i:?}")));
            }
            _ => {}
        }
        self.network.validate()?;
        if self.tier != Tier::Kvm && (!self.network.is_off() || !self.ports.is_empty()) {
            return Err(Error::Unsupported {
                op: "networking",
                what: format!(
                    "the {} tier: WASI preview 1 has no sockets (use the KVM tier)",
                    self.tier
                ),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiers_parse_by_name_and_unknown_names_list_the_tiers() {
        for tier in [Tier::Wasi, Tier::Kvm] {
            assert_eq!(tier.as_str().parse::<Tier>().unwrap(), tier);
            assert_eq!(SandboxSpec::default_for(tier).tier, tier);
            SandboxSpec::default_for(tier).validate().unwrap();
        }
        match "firecracker".parse::<Tier>() {
            Err(Error::InvalidArgument(m)) => {
                assert!(
                    m.contains("\"firecracker\"") && m.contains("\"wasi\""),
                    "{m}"
                )
            }
            other => panic!("want InvalidArgument, got {other:?}"),
        }
        assert_eq!(SandboxSpec::default_for(Tier::Kvm), SandboxSpec::linux());
        assert_eq!(SandboxSpec::default_for(Tier::Wasi), SandboxSpec::python());
    }

    #[test]
    fn only_the_kvm_tier_takes_an_image_and_an_unset_one_is_not_serialized() {
        SandboxSpec::linux().image("coding").validate().unwrap();
        let e = SandboxSpec::python()
            .image("coding")
            .validate()
            .unwrap_err();
        assert!(
            matches!(e, Error::InvalidSpec(ref m) if m.contains("KVM")),
            "{e:?}"
        );
        assert!(SandboxSpec::linux().image("").validate().is_err());
        let json = serde_json::to_string(&SandboxSpec::linux()).unwrap();
        assert!(!json.contains("image"), "{json}");
        let spec = SandboxSpec::linux().image("base");
        let back: SandboxSpec =
            serde_json::from_str(&serde_json::to_string(&spec).unwrap()).unwrap();
        assert_eq!(back, spec);
    }

    #[test]
    fn defaults_are_valid() {
        SandboxSpec::python().validate().unwrap();
    }

    #[test]
    fn a_serialized_spec_names_no_host_directory() {
        let spec = SandboxSpec::python().mount("/srv/secret-host-dir", "/data", true);
        let json = serde_json::to_string(&spec).unwrap();
        assert!(!json.contains("secret-host-dir"), "{json}");
        let back: SandboxSpec = serde_json::from_str(&json).unwrap();
        assert_eq!(back.mounts, vec![Mount::detached("/data", true)]);
        // A host path in the bytes (a forged or an older snapshot) is not read either.
        let forged = json.replace(r#""guest":"/data""#, r#""host":"/etc","guest":"/data""#);
        assert_ne!(forged, json);
        let back: SandboxSpec = serde_json::from_str(&forged).unwrap();
        assert!(back.mounts[0].is_detached(), "{forged}");
    }

    #[test]
    fn bad_values_are_refused() {
        assert!(SandboxSpec::python().memory_limit(10).validate().is_err());
        assert!(
            SandboxSpec::python()
                .call_timeout(Duration::ZERO)
                .validate()
                .is_err()
        );
        assert!(SandboxSpec::python().env("A=B", "c").validate().is_err());
        assert!(
            SandboxSpec::python()
                .mount("/nonexistent-dir-x", "/data", false)
                .validate()
                .is_err()
        );
        assert!(
            SandboxSpec::python()
                .mount("/tmp", "/", false)
                .validate()
                .is_err()
        );
        assert!(
            SandboxSpec::python()
                .mount("/tmp", "/a/../..", false)
                .validate()
                .is_err()
        );
    }

    #[test]
    fn networking_is_refused_on_the_wasi_tier_and_kept_only_when_set() {
        let pol = NetworkPolicy::parse(["host"], [""; 0]).unwrap();
        let spec = SandboxSpec::python().network(pol.clone());
        assert!(matches!(spec.validate(), Err(Error::Unsupported { .. })));
        let mut spec = SandboxSpec::python();
        spec.ports.push(PortMapping {
            guest_port: 80,
            host_port: 8080,
        });
        assert!(matches!(spec.validate(), Err(Error::Unsupported { .. })));
        let linux = SandboxSpec::linux().network(pol);
        linux.validate().unwrap();
        let json = serde_json::to_string(&linux).unwrap();
        assert!(
            json.contains(r#""network":{"allow":["host"],"deny":[]}"#),
            "{json}"
        );
        assert_eq!(serde_json::from_str::<SandboxSpec>(&json).unwrap(), linux);
        let plain = serde_json::to_string(&SandboxSpec::linux()).unwrap();
        assert!(
            !plain.contains("network") && !plain.contains("ports"),
            "{plain}"
        );
    }
}
