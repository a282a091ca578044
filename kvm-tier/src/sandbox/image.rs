//! What a KVM sandbox is made from and tuned by: the guest image ([`GuestImage`], the kernel
//! and initramfs `kvm-tier/guest/build.sh` builds, and the root filesystem image
//! `kvm-tier/guest/build-image.sh` builds, [`RootDisk`]) and the options of the tier that are
//! not part of the portable spec ([`KvmOptions`]), with their defaults.

use std::path::{Path, PathBuf};
use std::time::Duration;

use dormant_core::progress::{NoProgress, Progress, ProgressEvent, Unit};
use dormant_core::{Error, Result};

/// The guest kernel and initramfs, and the root filesystem image when the sandbox has one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestImage {
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
    /// The disk mounted as `/` (the `base` and `coding` images, an image of the user's);
    /// `None` for the `minimal` image, whose root is the initramfs in RAM and whose disk is a
    /// fresh ext2 filesystem at `/data`.
    pub root: Option<RootDisk>,
}

/// A root filesystem image: an ext4 file the guest mounts as `/` (mapped copy-on-write by the
/// VMM, never written).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RootDisk {
    /// The image's name (`base`, `coding`, a user image's name, or the file's path).
    pub name: String,
    /// The ext4 file.
    pub path: PathBuf,
    /// What identifies its contents (the recipe hash of a built image, a content hash of a
    /// file given by path): base snapshots are keyed by it.
    pub fingerprint: String,
}

/// The built-in Debian images (package lists in `kvm-tier/guest/images/`).
pub const BUILTIN_IMAGES: [&str; 2] = ["base", "coding"];

/// The image of a Linux sandbox whose spec names none: Debian `base`. (`"minimal"`, busybox in
/// the initramfs, was the default until the Debian images were proven in CI.)
pub const DEFAULT_IMAGE: &str = "base";

/// The recipe of root filesystem images (`kvm-tier/guest/build-image.sh`), run by
/// [`build_image`]; the package lists of the built-in images go with it.
const BUILD_IMAGE_SH: &str = include_str!("../../guest/build-image.sh");
const BASE_PACKAGES: &str = include_str!("../../guest/images/base.packages");
const CODING_PACKAGES: &str = include_str!("../../guest/images/coding.packages");

/// How [`build_image`] makes an image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageSource {
    /// A built-in image (`base`, `coding`).
    Builtin,
    /// `base` plus these Debian packages.
    Packages(Vec<String>),
    /// A root filesystem: a directory, or a tar archive (`docker export`'s output).
    Rootfs(PathBuf),
}

/// Builds the root filesystem image `name` (or finds it already built: images are cached by
/// content hash of their recipe under `<cache>/images/`) and returns its [`RootDisk`].
///
/// Debian images are made by `mmdebstrap --variant=minbase` from the host's Debian mirror
/// (suite `stable`) and `mke2fs -t ext4 -d`, which needs root and apt (the recipe installs
/// mmdebstrap when missing); the first build of `coding` takes about a minute. Errors:
/// [`Error::InvalidArgument`] for a bad name, [`Error::RuntimeMissing`] when the recipe cannot
/// run here (not root, no apt), [`Error::Runtime`] with the recipe's output when it fails.
pub fn build_image(name: &str, source: &ImageSource) -> Result<RootDisk> {
    build_image_with_progress(name, source, &NoProgress)
}

/// How many steps an image build reports: the root filesystem (packages installed by
/// mmdebstrap, or a directory or tar copied), the ext4 filesystem, the image recorded.
pub const IMAGE_BUILD_STEPS: u64 = 3;

/// [`build_image`], reporting progress in [`Unit::Steps`] of [`IMAGE_BUILD_STEPS`]: `0`
/// while the recipe checks its cache and makes the root filesystem (stage `"image NAME:
/// packages (mmdebstrap)"` or `"image NAME: root filesystem from PATH"`, or the recipe's
/// last output line while it installs its tools), `1` while it makes the ext4 filesystem,
/// `2` once the image is built, and a final event `"image NAME ready"`. An image found in
/// the cache reports the final event only (stage `"image NAME ready (cached)"`). Errors as
/// [`build_image`]'s; a failed build sends no final event.
pub fn build_image_with_progress(
    name: &str,
    source: &ImageSource,
    progress: &dyn Progress,
) -> Result<RootDisk> {
    check_image_name(name)?;
    let dir = tempfile::Builder::new()
        .prefix("dormant-image-recipe")
        .tempdir()
        .map_err(|e| Error::runtime("prepare the image recipe", e))?;
    let script = dir.path().join("build-image.sh");
    let lists = dir.path().join("images");
    let written = std::fs::create_dir(&lists)
        .and_then(|()| std::fs::write(&script, BUILD_IMAGE_SH))
        .and_then(|()| std::fs::write(lists.join("base.packages"), BASE_PACKAGES))
        .and_then(|()| std::fs::write(lists.join("coding.packages"), CODING_PACKAGES));
    written.map_err(|e| Error::runtime("prepare the image recipe", e))?;
    let mut cmd = std::process::Command::new("bash");
    cmd.arg(&script).arg(name);
    match source {
        ImageSource::Builtin => {
            if !BUILTIN_IMAGES.contains(&name) {
                return Err(Error::InvalidArgument(format!(
                    "no built-in image {name:?} (built-in: {BUILTIN_IMAGES:?}); give Debian                      packages or a root filesystem"
                )));
            }
        }
        ImageSource::Packages(p) => {
            if let Some(bad) = p.iter().find(|p| !is_package_name(p)) {
                return Err(Error::InvalidArgument(format!(
                    "{bad:?} is not a Debian package name"
                )));
            }
            cmd.arg("--packages").arg(p.join(" "));
        }
        ImageSource::Rootfs(path) => {
            cmd.arg("--rootfs").arg(path);
        }
    }
    let mut child = cmd
        .env("DORMANT_CACHE", dormant_core::default_dirs::cache_dir())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| Error::RuntimeMissing {
            what: "bash",
            hint: format!("building an image runs its recipe with bash ({e})"),
        })?;
    let stderr = child
        .stderr
        .take()
        .map(|e| follow_recipe(name, e, progress));
    let stderr = stderr.unwrap_or_default();
    let status = child
        .wait()
        .map_err(|e| Error::runtime("build the root filesystem image", e))?;
    let (stderr, built_now) = (stderr.tail, stderr.built);
    if !status.success() {
        let tail: String = tail_lines(&stderr, 30);
        if stderr.contains("needs root") || stderr.contains("apt-get install") {
            return Err(Error::RuntimeMissing {
                what: "an image build (root, apt, mmdebstrap)",
                hint: tail,
            });
        }
        return Err(Error::runtime(
            "build the root filesystem image",
            format!("{name}: {tail}"),
        ));
    }
    let disk = RootDisk::built(name)?.ok_or_else(|| {
        Error::runtime(
            "build the root filesystem image",
            format!(
                "{name}: the recipe ended without an image: {}",
                tail_lines(&stderr, 10)
            ),
        )
    })?;
    let stage = if built_now {
        format!("image {name} ready")
    } else {
        format!("image {name} ready (cached)")
    };
    progress.report(&ProgressEvent::finished(
        stage,
        IMAGE_BUILD_STEPS,
        Unit::Steps,
    ));
    Ok(disk)
}

/// What [`follow_recipe`] kept of the recipe's stderr.
#[derive(Default)]
struct RecipeOutput {
    /// Its last [`KEPT_LINES`] lines.
    tail: String,
    /// Whether the recipe built the image (rather than finding it in the cache).
    built: bool,
}

/// How many of the recipe's last stderr lines are kept for an error's message.
const KEPT_LINES: usize = 30;
/// The longest stderr line read at once (a longer one is taken in pieces).
const MAX_LINE: u64 = 4096;
/// The longest stage text an output line gives.
const MAX_STAGE: usize = 100;

/// Reads the image recipe's stderr to its end, reporting its stages (the `==>` lines
/// build-image.sh writes, and mmdebstrap's or apt's lines as the stage's text).
fn follow_recipe(name: &str, stderr: impl std::io::Read, progress: &dyn Progress) -> RecipeOutput {
    use std::io::{BufRead, Read};
    let mut reader = std::io::BufReader::new(stderr);
    let mut kept = std::collections::VecDeque::with_capacity(KEPT_LINES);
    let mut built = false;
    let mut done = 0;
    let mut stage = String::new();
    let mut line = Vec::new();
    loop {
        line.clear();
        match reader.by_ref().take(MAX_LINE).read_until(b'\n', &mut line) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        let text = String::from_utf8_lossy(&line).trim_end().to_owned();
        if kept.len() == KEPT_LINES {
            kept.pop_front();
        }
        kept.push_back(text.clone());
        let (now, what) = match text.strip_prefix("==> ") {
            Some(step) if step.starts_with(&format!("image {name}: ext4")) => {
                (1, format!("image {name}: ext4 filesystem"))
            }
            Some(step) if step.starts_with(&format!("image {name} built")) => {
                built = true;
                (2, format!("image {name} built"))
            }
            Some(step) if step.starts_with(&format!("image {name}: mmdebstrap")) => {
                (0, format!("image {name}: packages (mmdebstrap)"))
            }
            Some(step) if step.starts_with(&format!("image {name}: root filesystem")) => (
                0,
                format!("image {name}: root filesystem{}", after(step, " from")),
            ),
            Some(step) => (done, format!("image {name}: {step}")),
            // Another tool's line (mmdebstrap, apt): the current stage's detail.
            None if !text.is_empty() && !stage.is_empty() => {
                let base = stage.split(" — ").next().unwrap_or_default().to_owned();
                (done, format!("{base} — {text}"))
            }
            None => continue,
        };
        done = done.max(now);
        stage = cut(&what, MAX_STAGE);
        progress.report(&ProgressEvent::new(
            stage.clone(),
            done,
            Some(IMAGE_BUILD_STEPS),
            Unit::Steps,
        ));
    }
    RecipeOutput {
        tail: Vec::from(kept).join("\n"),
        built,
    }
}

/// The part of `s` from `marker` on (`""` without it).
fn after<'a>(s: &'a str, marker: &str) -> &'a str {
    s.find(marker).map_or("", |i| &s[i..])
}

/// `s` cut to at most `max` characters, with `…` where it was cut.
pub(super) fn cut(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_owned(),
    }
}

/// The built-in image `name` as this library's recipe makes it: the recipe runs once per
/// process and image (it answers at once when its build is cached, and rebuilds when the
/// recipe, the package lists or the host's mirror changed). Where it cannot run (a cache this
/// user cannot write), the image last built is used, with a warning.
fn builtin_image(name: &str) -> Result<RootDisk> {
    static CHECKED: std::sync::Mutex<Vec<RootDisk>> = std::sync::Mutex::new(Vec::new());
    let mut checked = CHECKED
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some(d) = checked.iter().find(|d| d.name == name) {
        return Ok(d.clone());
    }
    let disk = match build_image(name, &ImageSource::Builtin) {
        Ok(d) => d,
        Err(e) => match RootDisk::built(name)? {
            Some(d) => {
                tracing::warn!(image = name, error = %e, "the image recipe could not run; using the image last built");
                d
            }
            None => return Err(e),
        },
    };
    checked.push(disk.clone());
    Ok(disk)
}

/// An image name: letters, digits, `.`, `_`, `-`, at most 64, not starting with a dot.
fn check_image_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with(['.', '-'])
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok && name != "minimal" {
        Ok(())
    } else {
        Err(Error::InvalidArgument(format!(
            "image name {name:?}: 1-64 letters, digits, '.', '_' or '-' (and not \"minimal\", \
             the initramfs image)"
        )))
    }
}

fn is_package_name(p: &str) -> bool {
    p.len() >= 2
        && p.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric())
        && p.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"+-.:=".contains(&b))
}

fn tail_lines(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// The root filesystem images built into the cache (`<cache>/images/`), by name.
pub fn list_images() -> Result<Vec<RootDisk>> {
    let dir = dormant_core::default_dirs::cache_dir().join("images");
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_symlink()))
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| check_image_name(n).is_ok())
        .collect();
    names.sort();
    let mut out = Vec::new();
    for name in names {
        out.extend(RootDisk::built(&name)?);
    }
    Ok(out)
}

impl RootDisk {
    /// The image `name` as last built into `<cache>/images/` (`None` when it never was).
    pub fn built(name: &str) -> Result<Option<RootDisk>> {
        check_image_name(name)?;
        let link = dormant_core::default_dirs::cache_dir()
            .join("images")
            .join(name);
        let Ok(target) = std::fs::read_link(&link) else {
            return Ok(None);
        };
        let path = link.join("rootfs.ext4");
        if !path.is_file() {
            return Ok(None);
        }
        let fingerprint = target
            .file_name()
            .and_then(|f| f.to_str())
            .and_then(|f| f.rsplit_once('-'))
            .map(|(_, h)| h.to_owned())
            .ok_or_else(|| {
                Error::runtime(
                    "read the image cache",
                    format!("{}: not a link to NAME-HASH", link.display()),
                )
            })?;
        Ok(Some(RootDisk {
            name: name.to_owned(),
            path,
            fingerprint,
        }))
    }

    /// An ext4 image file given by path; its fingerprint is a hash of its contents, computed
    /// once per process for a file whose device, inode, size and modification time stay the
    /// same (a template's key and the create it leads to ask for it twice).
    pub fn file(path: &Path) -> Result<RootDisk> {
        use std::os::unix::fs::MetadataExt;
        type Seen = (std::path::PathBuf, (u64, u64, u64, i64, i64), String);
        static HASHED: std::sync::Mutex<Vec<Seen>> = std::sync::Mutex::new(Vec::new());
        let meta = std::fs::metadata(path).map_err(|e| Error::File {
            op: "open the root filesystem image",
            path: path.display().to_string(),
            source: e,
        })?;
        if !meta.is_file() || meta.len() == 0 || !meta.len().is_multiple_of(4096) {
            return Err(Error::InvalidSpec(format!(
                "root filesystem image {}: not a file whose size is a positive multiple of 4 KiB",
                path.display()
            )));
        }
        let id = (
            meta.dev(),
            meta.ino(),
            meta.len(),
            meta.mtime(),
            meta.mtime_nsec(),
        );
        let disk = |fingerprint: String| RootDisk {
            name: path.display().to_string(),
            path: path.to_owned(),
            fingerprint,
        };
        let known = HASHED
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .find(|(p, i, _)| p == path && *i == id)
            .map(|(_, _, f)| f.clone());
        if let Some(f) = known {
            return Ok(disk(f));
        }
        let mut h = blake3::Hasher::new();
        h.update_mmap(path).map_err(|e| Error::File {
            op: "hash",
            path: path.display().to_string(),
            source: e,
        })?;
        let fingerprint = h.finalize().to_hex()[..16].to_string();
        HASHED
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push((path.to_owned(), id, fingerprint.clone()));
        Ok(disk(fingerprint))
    }
}

impl GuestImage {
    /// The guest image for [`SandboxSpec::image`](dormant_core::SandboxSpec::image): `None` is
    /// [`DEFAULT_IMAGE`] (`"base"`); `"minimal"` is [`GuestImage::locate`]'s (busybox in the
    /// initramfs, no root filesystem image); `"base"` and `"coding"` add that built-in
    /// root filesystem as this library's recipe makes it ([`builtin_image`]: built on first
    /// use, rebuilt when the recipe changed); another name, an image built by `dormant image
    /// build NAME` ([`RootDisk::built`]); a path (with a `/`), that ext4 file.
    pub fn for_image(image: Option<&str>) -> Result<GuestImage> {
        let mut g = GuestImage::locate()?;
        g.root = match image {
            Some("minimal") => None,
            None => Some(builtin_image(DEFAULT_IMAGE)?),
            Some(p) if p.contains('/') => Some(RootDisk::file(Path::new(p))?),
            Some(name) if BUILTIN_IMAGES.contains(&name) => Some(builtin_image(name)?),
            Some(name) => match RootDisk::built(name).map_err(|_| unknown_image(name))? {
                Some(d) => Some(d),
                None => return Err(unknown_image(name)),
            },
        };
        Ok(g)
    }

    /// The image `kvm-tier/guest/build.sh` built: `$DORMANT_GUEST_KERNEL` and
    /// `$DORMANT_GUEST_INITRAMFS` when set, else `<cache>/guest/current/`, the cache being
    /// [`default_dirs::cache_dir`](dormant_core::default_dirs::cache_dir) (`$DORMANT_CACHE` when
    /// set and not empty, as build.sh reads it, else `~/.cache/dormant`).
    pub fn locate() -> Result<GuestImage> {
        let current = dormant_core::default_dirs::cache_dir().join("guest/current");
        let pick = |var: &str, name: &str| {
            std::env::var_os(var)
                .map(PathBuf::from)
                .unwrap_or_else(|| current.join(name))
        };
        let image = GuestImage {
            kernel: pick("DORMANT_GUEST_KERNEL", "vmlinux"),
            initramfs: pick("DORMANT_GUEST_INITRAMFS", "initramfs.cpio"),
            root: None,
        };
        for p in [&image.kernel, &image.initramfs] {
            if !p.is_file() {
                return Err(Error::RuntimeMissing {
                    what: "the Linux guest image",
                    hint: format!(
                        "{} is missing; build it with kvm-tier/guest/build.sh (scripts/setup.sh \
                         runs it) or set DORMANT_GUEST_KERNEL / DORMANT_GUEST_INITRAMFS",
                        p.display()
                    ),
                });
            }
        }
        Ok(image)
    }

    /// A short hash identifying the image's contents (for base snapshots).
    pub(super) fn fingerprint(&self) -> Result<String> {
        let mut h = blake3::Hasher::new();
        for p in [&self.kernel, &self.initramfs] {
            h.update_mmap(p).map_err(|e| Error::File {
                op: "hash",
                path: p.display().to_string(),
                source: e,
            })?;
        }
        if let Some(root) = &self.root {
            h.update(b"root ");
            h.update(root.fingerprint.as_bytes());
        }
        Ok(h.finalize().to_hex()[..16].to_string())
    }
}

fn unknown_image(name: &str) -> Error {
    Error::InvalidSpec(format!(
        "no image {name:?}: the images are \"minimal\", {BUILTIN_IMAGES:?}, images built with \
         `dormant image build NAME`, or a path to an ext4 file"
    ))
}

/// Options of the KVM tier that are not part of the portable spec.
#[derive(Debug, Clone)]
pub struct KvmOptions {
    /// Copy the guest's serial console to stderr (also `DORMANT_GUEST_CONSOLE=1`).
    pub console_echo: bool,
    /// Longest wait for a booting guest's agent. Default: 180 s on PVM hosts, 30 s otherwise.
    pub boot_timeout: Duration,
    /// Longest wait for a resumed guest's agent, and for a new connection after a call was
    /// stopped (past it the sandbox is poisoned). Default: 30 s.
    pub connect_timeout: Duration,
    /// Host-side bound of every agent request but `exec` (files, `spawn`, `signal`,
    /// `output`, one slice of `wait`, mounts; each moves at most 16 MiB): the longest the
    /// guest may keep the request waiting without moving a byte either way, and ten times
    /// that in all (a guest that trickles bytes). Past it the call fails with
    /// [`Error::Deadline`]. Default: 120 s on PVM hosts (guest kernel code is emulated; a
    /// 16 MiB file took over 2 min on a busy 2-core host), 30 s otherwise.
    pub request_timeout: Duration,
    /// Size of the `minimal` image's disk (`/dev/vda`, an ext2 filesystem mounted at `/data`),
    /// a multiple of 4 KiB. Sparse: only written blocks cost memory and snapshot bytes.
    /// Default: 512 MiB. An image with a root filesystem has that image's size instead.
    pub disk_size: usize,
}

impl Default for KvmOptions {
    fn default() -> Self {
        let slow = crate::detect().is_slow();
        KvmOptions {
            console_echo: std::env::var_os("DORMANT_GUEST_CONSOLE").is_some_and(|v| v == "1"),
            boot_timeout: Duration::from_secs(if slow { 180 } else { 30 }),
            connect_timeout: Duration::from_secs(30),
            request_timeout: Duration::from_secs(if slow { 120 } else { 30 }),
            disk_size: 512 << 20,
        }
    }
}
