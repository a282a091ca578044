//! `dormant template build FILE`: a template recipe as a small TOML file, with the fields of
//! Python's `dormant.Template`:
//!
//! ```toml
//! name = "shop-api"
//! image = "minimal"              # implies tier = "kvm"; without one the tier is "wasi"
//! tier = "kvm"                   # optional
//! memory_mib = 256               # optional
//! run = ["mkdir -p /www", "echo hi > /www/index.html"]
//! start = "httpd -f -p 8080 -h /www"
//! ready_port = 8080              # or ready_cmd = "wget -qO- http://127.0.0.1:8080/"
//!
//! [env]
//! MODE = "demo"
//!
//! [files]                        # guest path = inline text, or { path = "host file" }
//! "/www/about.txt" = "about us"
//! "/data/sales.csv" = { path = "sales.csv" }
//!
//! [volumes]                      # guest path = host directory, or { path = ..., read_only = true }
//! "/mnt/wheels" = "./wheels"
//! ```
//!
//! Relative host paths are resolved against the TOML file's directory.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use dormant::{Error, Ready, Result, Template, Tier};
use serde::Deserialize;

/// Largest template file read.
const MAX_FILE: u64 = 1 << 20;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TemplateFile {
    name: String,
    tier: Option<String>,
    image: Option<String>,
    memory_mib: Option<u64>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    #[serde(default)]
    run: Vec<String>,
    start: Option<String>,
    ready_port: Option<u16>,
    ready_cmd: Option<String>,
    #[serde(default)]
    files: BTreeMap<String, FileSource>,
    #[serde(default)]
    volumes: BTreeMap<String, VolumeSource>,
}

/// A file's contents: inline text, or a host file's bytes.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum FileSource {
    Text(String),
    Host { path: PathBuf },
}

/// A volume: a host directory, read-write, or with its mode given.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum VolumeSource {
    Dir(PathBuf),
    Host {
        path: PathBuf,
        #[serde(default)]
        read_only: bool,
    },
}

fn bad(file: &Path, what: impl std::fmt::Display) -> Error {
    Error::InvalidArgument(format!("template file {}: {what}", file.display()))
}

/// The recipe in TOML file `path`.
pub fn load(path: &Path) -> Result<Template> {
    use std::io::Read;
    let mut text = String::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(MAX_FILE + 1).read_to_string(&mut text))
        .map_err(|e| Error::File {
            op: "read",
            path: path.display().to_string(),
            source: e,
        })?;
    if text.len() as u64 > MAX_FILE {
        return Err(bad(path, format!("larger than {MAX_FILE} bytes")));
    }
    let f: TemplateFile = toml::from_str(&text).map_err(|e| bad(path, e))?;
    let base = path.parent().unwrap_or(Path::new("."));
    let host = |p: &Path| base.join(p);
    let tier = match &f.tier {
        Some(t) => t.parse::<Tier>()?,
        None if f.image.is_some() => Tier::Kvm,
        None => Tier::Wasi,
    };
    let mut t = Template::new(f.name, tier);
    t.spec.image = f.image;
    if let Some(mib) = f.memory_mib {
        t.spec.memory_limit = mib
            .checked_mul(1 << 20)
            .ok_or_else(|| bad(path, "memory_mib is too large"))?;
    }
    t.spec.env = f.env.into_iter().collect();
    t.run = f.run;
    t.start = f.start;
    t.ready = match (f.ready_port, f.ready_cmd) {
        (Some(_), Some(_)) => return Err(bad(path, "give ready_port or ready_cmd, not both")),
        (Some(port), None) => Some(Ready::Port(port)),
        (None, Some(cmd)) => Some(Ready::Command(cmd)),
        (None, None) => None,
    };
    for (guest, src) in f.files {
        let data = match src {
            FileSource::Text(s) => s.into_bytes(),
            FileSource::Host { path: p } => {
                let p = host(&p);
                std::fs::read(&p).map_err(|e| Error::File {
                    op: "read",
                    path: p.display().to_string(),
                    source: e,
                })?
            }
        };
        t.files.push((guest, data));
    }
    for (guest, src) in f.volumes {
        let (dir, read_only) = match src {
            VolumeSource::Dir(d) => (d, false),
            VolumeSource::Host { path, read_only } => (path, read_only),
        };
        t = t.mount(host(&dir), guest, read_only);
    }
    Ok(t)
}
