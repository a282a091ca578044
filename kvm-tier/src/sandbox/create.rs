//! A new sandbox: [`KvmSandbox::create`] checks the spec, then resumes the *base snapshot* of
//! its guest image and RAM size under a new id, booting the image only the first time
//! (`base_snapshot`, recorded under the store's `bases/`); [`KvmSandbox::boot`] is that boot.
//! A new sandbox mounts its volumes in the guest once; snapshots keep the mounts. Also here:
//! the disk a boot formats, and the host directories behind the volume slots.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use dormant_core::progress::{NoProgress, Progress, ProgressEvent, Unit};

use dormant_core::snapshot::SnapshotId;
use dormant_core::snapshot::store::LocalStore;
use dormant_core::{Error, Grants, Mount, Result, Sandbox, SandboxSpec, Tier, Workload, grants};

use super::image::cut;
use super::live::agent_error;
use super::{GuestImage, KvmOptions, KvmSandbox, new_id, require_kvm, runtime};
use crate::machine::{FS_IRQS, Machine, MachineConfig, device_cmdline};
use crate::virtio::fs::VolumeAttach;

impl KvmSandbox {
    /// A new Linux sandbox (`spec.tier` must be [`Tier::Kvm`]); its guest RAM is
    /// `spec.memory_limit`.
    pub fn create(store: Arc<LocalStore>, spec: SandboxSpec) -> Result<KvmSandbox> {
        Self::create_with(store, spec, KvmOptions::default())
    }

    /// [`create`](Self::create) with the tier's options `opts`.
    pub fn create_with(
        store: Arc<LocalStore>,
        spec: SandboxSpec,
        opts: KvmOptions,
    ) -> Result<KvmSandbox> {
        Self::create_with_progress(store, spec, opts, &NoProgress)
    }

    /// [`create_with`](Self::create_with), reporting progress in [`Unit::Steps`] of
    /// [`BOOT_STEPS`]. When the base snapshot of the spec's image and RAM size is not cached
    /// yet, its first boot (minutes on hosts that emulate the guest's kernel) reports `0`
    /// while the kernel boots (stage `"boot: kernel"`, then `"boot: kernel — LINE"` with the
    /// serial console's last line as it changes), `1` once the guest's agent answered
    /// (`"boot: agent answered"`), `2` while the base is snapshotted (`"boot: snapshot of the
    /// base"`) and `3` while the sandbox resumes it (`"boot: resume the base"`). Every create
    /// ends with the final event `"sandbox ready"` (or `"sandbox ready (base cached)"`, the
    /// only event of a create whose base was cached). Errors as [`create`](Self::create)'s; a
    /// create that fails sends no final event.
    pub fn create_with_progress(
        store: Arc<LocalStore>,
        spec: SandboxSpec,
        opts: KvmOptions,
        progress: &dyn Progress,
    ) -> Result<KvmSandbox> {
        spec.validate()?;
        if spec.tier != Tier::Kvm || spec.workload != Workload::Linux {
            return Err(Error::InvalidSpec(
                "the KVM tier runs Linux workloads (SandboxSpec::linux())".into(),
            ));
        }
        if spec.mounts.len() > FS_IRQS.len() {
            return Err(Error::InvalidSpec(format!(
                "{} mounts: a Linux sandbox has at most {} volumes",
                spec.mounts.len(),
                FS_IRQS.len()
            )));
        }
        require_kvm()?;
        let image = GuestImage::for_image(spec.image.as_deref())?;
        let (base, booted) = Self::base_snapshot(&store, &image, &spec, &opts, progress)?;
        let grants = Grants::of_spec(&spec);
        let mut merged = store.manifest(&base)?.spec;
        merged.env = spec.env;
        merged.image = spec.image;
        merged.call_timeout = spec.call_timeout;
        merged.output_limit = spec.output_limit;
        merged.ports = spec.ports;
        // The base booted with the network off; the sandbox's policy applies from its resume.
        merged.network = spec.network;
        // The base snapshot has no mount points: the spec's volumes take the first slots and
        // are mounted in the guest now.
        merged.mounts = spec.mounts;
        let mounts = merged.mounts.clone();
        let network = merged.network.clone();
        let mut sb = KvmSandbox::handle(store, new_id(), merged, grants, opts);
        sb.load(&base, &mounts, &network)?;
        sb.mount_volumes()?;
        sb.sync_ports();
        let stage = if booted {
            "sandbox ready"
        } else {
            "sandbox ready (base cached)"
        };
        progress.report(&ProgressEvent::finished(stage, BOOT_STEPS, Unit::Steps));
        Ok(sb)
    }

    /// Boots the guest image in a fresh VM (with every volume slot, `spec.mounts` attached and
    /// mounted) and waits for its agent. With a root filesystem image the guest mounts it as
    /// `/` (`dormant.root=/dev/vda`); without one its disk is a fresh ext2 `/data` of
    /// `opts.disk_size`.
    pub fn boot(
        store: Arc<LocalStore>,
        image: &GuestImage,
        spec: SandboxSpec,
        opts: KvmOptions,
    ) -> Result<KvmSandbox> {
        Self::boot_reporting(store, image, spec, opts, &NoProgress)
    }

    /// [`boot`](Self::boot), reporting steps `0` (`"boot: kernel"`, with the console's last
    /// line) and `1` (`"boot: agent answered"`) of [`BOOT_STEPS`].
    fn boot_reporting(
        store: Arc<LocalStore>,
        image: &GuestImage,
        spec: SandboxSpec,
        opts: KvmOptions,
        progress: &dyn Progress,
    ) -> Result<KvmSandbox> {
        require_kvm()?;
        boot_step(progress, "boot: kernel", 0);
        let mem_size = usize::try_from(spec.memory_limit)
            .map_err(|_| Error::InvalidSpec("memory_limit does not fit this host".into()))?;
        let disk_image = match &image.root {
            // The image is mapped copy-on-write: the guest's writes never reach the file.
            Some(root) => root.path.clone(),
            None => format_disk(&store, opts.disk_size)?,
        };
        let cfg = MachineConfig {
            kernel: image.kernel.clone(),
            initramfs: Some(image.initramfs.clone()),
            mem_size,
            cmdline: cmdline(image),
            console_echo: opts.console_echo,
            disk_image: Some(disk_image),
            volume_slots: FS_IRQS.len(),
            volumes: volumes(&store, &spec.mounts)?,
        };
        let booted = Machine::boot(&cfg).map_err(runtime("boot the guest"));
        if let (Some(p), None) = (&cfg.disk_image, &image.root) {
            // The VM maps the formatted disk; its name is no longer needed.
            let _ = std::fs::remove_file(p);
        }
        let machine = booted?;
        let grants = Grants::of_spec(&spec);
        if let Some(net) = machine.net() {
            net.set_policy(spec.network.clone());
        }
        let mut sb = KvmSandbox::handle(store, new_id(), spec, grants, opts);
        let console = machine.console().clone();
        // Exposed ports reach the guest through this machine's vsock (as after a resume).
        sb.ports.attach(machine.vsock());
        sb.machine = Some(machine);
        let timeout = sb.opts.boot_timeout;
        sb.connect_watching(timeout, &console, progress)?;
        boot_step(progress, "boot: agent answered", 1);
        sb.mount_volumes()?;
        Ok(sb)
    }

    /// What a base snapshot is keyed by: everything that was booted (image contents, RAM,
    /// disk, volume slots, kernel command line with its device part and the network's MTU, so
    /// a change of the device set is a new base). Also the KVM runtime's
    /// [`fingerprint`](dormant_core::Runtime::fingerprint), which templates' cache keys hold.
    pub(crate) fn base_key(
        image: &GuestImage,
        spec: &SandboxSpec,
        opts: &KvmOptions,
    ) -> Result<String> {
        // The command line is part of what was booted (a base booted with another one, e.g.
        // before a workaround was added to it, is not this base).
        // The network device's MTU too: the guest sizes its buffers by it at boot.
        let cmdline = format!(
            "{} {} net-mtu={}",
            cmdline(image),
            device_cmdline(true, FS_IRQS.len()),
            crate::net::MTU
        );
        // A root filesystem image has its own size; `disk_size` is the minimal image's disk.
        let disk_size = if image.root.is_some() {
            0
        } else {
            opts.disk_size
        };
        Ok(format!(
            "kvm-{}-{}m-{}d-{}v-{}",
            image.fingerprint()?,
            spec.memory_limit >> 20,
            disk_size >> 20,
            FS_IRQS.len(),
            &blake3::hash(cmdline.as_bytes()).to_hex()[..8]
        ))
    }

    /// Boots the image once per (image, RAM size) and keeps the booted guest as a snapshot:
    /// the base's id, and whether it was booted now (reported to `progress`) rather than found.
    fn base_snapshot(
        store: &Arc<LocalStore>,
        image: &GuestImage,
        spec: &SandboxSpec,
        opts: &KvmOptions,
        progress: &dyn Progress,
    ) -> Result<(SnapshotId, bool)> {
        let key = Self::base_key(image, spec, opts)?;
        let dir = store.root().join("bases");
        let record = dir.join(&key);
        let _lock = {
            std::fs::create_dir_all(&dir).map_err(|e| Error::store("create", &dir, e))?;
            dormant_core::fsutil::FileLock::acquire(&dir.join(format!("{key}.lock")), true)
        }
        .map_err(|e| Error::store("lock", &dir, e))?;
        if let Ok(text) = std::fs::read_to_string(&record)
            && let Ok(id) = text.trim().parse::<SnapshotId>()
            && store.manifest(&id).is_ok()
        {
            return Ok((id, false));
        }
        let mut base_spec = spec.clone();
        base_spec.mounts.clear();
        // Shared by every sandbox of its key, whatever their policies.
        base_spec.network = dormant_core::NetworkPolicy::off();
        let mut booted =
            Self::boot_reporting(store.clone(), image, base_spec, opts.clone(), progress)?;
        boot_step(progress, "boot: snapshot of the base", 2);
        let id = booted.checkpoint()?;
        booted.release();
        dormant_core::fsutil::write_atomic(&record, id.to_string().as_bytes())
            .map_err(|e| Error::store("record base snapshot", &record, e))?;
        boot_step(progress, "boot: resume the base", 3);
        Ok((id, true))
    }

    /// [`connect`](Self::connect) with a booting guest's console watched meanwhile: each new
    /// last line of it is reported as step 0, `"boot: kernel — LINE"`.
    fn connect_watching(
        &mut self,
        timeout: Duration,
        console: &crate::serial::ConsoleLog,
        progress: &dyn Progress,
    ) -> Result<()> {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::scope(|s| {
            s.spawn(|| {
                let _ = tx.send(self.connect(timeout));
            });
            let mut last = String::new();
            loop {
                match rx.recv_timeout(CONSOLE_POLL) {
                    Ok(r) => return r,
                    Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                    // The connecting thread panicked: the scope re-raises its panic.
                    Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                        return Err(Error::runtime(
                            "start the guest",
                            "the connecting thread ended",
                        ));
                    }
                }
                let text = console.text();
                let line = text
                    .lines()
                    .map(str::trim)
                    .rfind(|l| !l.is_empty())
                    .unwrap_or_default();
                if line != last {
                    last = line.to_owned();
                    let stage = format!("boot: kernel — {}", cut(line, CONSOLE_LINE));
                    boot_step(progress, &stage, 0);
                }
            }
        })
    }

    /// Mounts every volume in the guest (slot `i` at `spec.mounts[i].guest`), in one round
    /// trip. A new sandbox does it once; the mounts are guest state that snapshots keep.
    fn mount_volumes(&mut self) -> Result<()> {
        use dormant_agent::proto::Request;
        if self.spec.mounts.is_empty() {
            return Ok(());
        }
        let requests: Vec<(Request, &[u8])> = self
            .spec
            .mounts
            .iter()
            .enumerate()
            .map(|(i, m)| {
                let r = Request::Mount {
                    source: crate::virtio::fs::tag(i),
                    target: m.guest.clone(),
                    fstype: "virtiofs".into(),
                    read_only: m.read_only,
                };
                (r, &[][..])
            })
            .collect();
        let mounts = self.spec.mounts.clone();
        let answers = self
            .live_agent()?
            .pipeline(&requests)
            .map_err(|e| agent_error("mount a volume", "", e))?;
        for (a, m) in answers.into_iter().zip(&mounts) {
            a.map_err(|e| agent_error("mount a volume", &m.guest, e))?;
        }
        Ok(())
    }
}

/// How many steps [`KvmSandbox::create_with_progress`] reports: kernel, agent, snapshot of
/// the base, resume.
pub const BOOT_STEPS: u64 = 4;

/// Reports step `done` of a first boot's [`BOOT_STEPS`].
fn boot_step(progress: &dyn Progress, stage: &str, done: u64) {
    progress.report(&ProgressEvent::new(
        stage,
        done,
        Some(BOOT_STEPS),
        Unit::Steps,
    ));
}

/// How often a booting guest's console is looked at for progress.
const CONSOLE_POLL: Duration = Duration::from_millis(250);
/// The most characters of a console line a boot's stage shows.
const CONSOLE_LINE: usize = 100;

/// The kernel command line `image` boots with: the base one, plus `dormant.root=/dev/vda` when
/// its disk is the root filesystem.
fn cmdline(image: &GuestImage) -> String {
    let base = crate::boot::base_cmdline(crate::detect().is_slow());
    match image.root {
        Some(_) => format!("{base} dormant.root=/dev/vda"),
        None => base,
    }
}

/// A fresh ext2 filesystem image of `size` bytes (sparse) in the store's scratch space, made by
/// the host's `mke2fs` (formatting inside the guest is slow where its kernel is emulated).
fn format_disk(store: &LocalStore, size: usize) -> Result<PathBuf> {
    if size < (8 << 20) || !size.is_multiple_of(4096) {
        return Err(Error::InvalidArgument(format!(
            "disk size {size} is not a multiple of 4 KiB of at least 8 MiB"
        )));
    }
    let dir = store.root().join("tmp");
    std::fs::create_dir_all(&dir).map_err(|e| Error::store("create", &dir, e))?;
    let path = dir.join(format!("{}-disk-{}.img", std::process::id(), new_id()));
    let out = std::process::Command::new("mke2fs")
        .args(["-q", "-F", "-t", "ext2", "-b", "4096", "-m", "0"])
        .arg(&path)
        .arg(format!("{}k", size / 1024))
        .env("PATH", "/usr/sbin:/sbin:/usr/bin:/bin")
        .output();
    match out {
        Ok(o) if o.status.success() => Ok(path),
        Ok(o) => {
            let _ = std::fs::remove_file(&path);
            Err(Error::runtime(
                "format the sandbox's disk",
                String::from_utf8_lossy(&o.stderr).into_owned(),
            ))
        }
        Err(e) => Err(Error::RuntimeMissing {
            what: "mke2fs",
            hint: format!("the KVM tier formats its disk with mke2fs ({e}); install e2fsprogs"),
        }),
    }
}

/// The host directories of `mounts`, in volume-slot order: a detached mount point gets the
/// store's empty directory, read-only.
pub(super) fn volumes(store: &LocalStore, mounts: &[Mount]) -> Result<Vec<VolumeAttach>> {
    let attached = if mounts.iter().any(Mount::is_detached) {
        grants::attachable(mounts, &grants::detached_dir(store)?)
    } else {
        mounts.to_vec()
    };
    Ok(attached
        .into_iter()
        .map(|m| VolumeAttach {
            host: m.host,
            read_only: m.read_only,
        })
        .collect())
}
