//! The report being written: each scenario adds its section (title and method), its tables and
//! notes to the body, and its headline figures to the summary table; `main` frames them with the
//! machine description into the Markdown document. Titles, notes and headlines are echoed on
//! stderr as the run goes.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use crate::aims::AIMS;

/// The report being written: sections in order, the summary table's rows, and the values
/// measured for the aims ([`crate::aims::AIMS`]): `(aim, part)` → (value, whether it meets
/// its bound).
#[derive(Default)]
pub struct Report {
    pub body: String,
    pub summary: Vec<[String; 3]>,
    pub aims: BTreeMap<(usize, usize), (String, bool)>,
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
    /// Part `part` of aim `aim` (an index of [`AIMS`]) measured as `value`; `met`: within the
    /// aim's bound.
    pub fn aim(&mut self, aim: usize, part: usize, value: String, met: bool) {
        eprintln!("    aim: {} [{part}]: {value}", AIMS[aim].what);
        self.aims.insert((aim, part), (value, met));
    }

    /// The aims table: every aim, with what this run measured of it.
    pub fn aims_table(&self) -> String {
        let mut t =
            String::from("| what | 2026-11-29 | this run | aim | met |\n|---|---|---|---|---|\n");
        for (i, a) in AIMS.iter().enumerate() {
            let parts: Vec<Option<&(String, bool)>> =
                (0..a.parts).map(|p| self.aims.get(&(i, p))).collect();
            let value = parts
                .iter()
                .map(|p| p.map_or("not measured in this run", |(v, _)| v.as_str()))
                .collect::<Vec<_>>()
                .join(" / ");
            let met = parts
                .iter()
                .map(|p| match p {
                    Some((_, true)) => "yes",
                    Some((_, false)) => "no",
                    None => "–",
                })
                .collect::<Vec<_>>()
                .join(" / ");
            let _ = writeln!(
                t,
                "| {} | {} | {value} | {} | {met} |",
                a.what, a.then, a.aim
            );
        }
        t
    }
}
