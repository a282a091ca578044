//! The report being written: each scenario adds its section (title and method), its tables and
//! notes to the body, and its headline figures to the summary table; `main` frames them with the
//! machine description into the Markdown document. Titles, notes and headlines are echoed on
//! stderr as the run goes.

use std::fmt::Write as _;

/// The report being written: sections in order, and the summary table's rows.
#[derive(Default)]
pub struct Report {
    pub body: String,
    pub summary: Vec<[String; 3]>,
}

impl Report {
    pub fn section(&mut self, title: &str, method: &str) {
        let _ = write!(self.body, "\n## {title}\n\n{method}\n\n");
        eprintln!("==> {title}");
    }
    pub fn table(&mut self, head: &[&str], rows: &[Vec<String>]) {
        let _ = writeln!(self.body, "| {} |", head.join(" | "));
        let _ = writeln!(
            self.body,
            "|{}",
            head.iter().map(|_| "---|").collect::<String>()
        );
        for r in rows {
            let _ = writeln!(self.body, "| {} |", r.join(" | "));
        }
        self.body.push('\n');
    }
    pub fn note(&mut self, text: &str) {
        let _ = writeln!(self.body, "{text}\n");
        eprintln!("    {text}");
    }
    pub fn headline(&mut self, what: &str, value: String, how: &str) {
        eprintln!("    {what}: {value}");
        self.summary.push([what.into(), value, how.into()]);
    }
}
