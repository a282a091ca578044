//! The CLI's progress display: an indicatif bar (or a spinner while the total is unknown) fed by
//! a long operation's [`ProgressEvent`]s, drawn on stderr (hidden where stderr is not a
//! terminal).

use std::time::Duration;

use dormant::ProgressEvent;
use dormant::progress::Unit;
use indicatif::{ProgressBar, ProgressStyle};

/// A progress bar that is a [`dormant::Progress`].
pub struct Bar(ProgressBar);

impl Bar {
    pub fn new() -> Bar {
        let bar = ProgressBar::new_spinner();
        bar.enable_steady_tick(Duration::from_millis(120));
        Bar(bar)
    }

    /// Clears the bar (the caller prints the result).
    pub fn finish(self) {
        self.0.finish_and_clear();
    }
}

impl dormant::Progress for Bar {
    fn report(&self, e: &ProgressEvent) {
        let unit = match e.unit {
            Unit::Steps => "{pos}/{len} steps",
            Unit::Chunks => "{pos}/{len} chunks",
            Unit::Bytes => "{bytes}/{total_bytes}",
        };
        match e.total {
            Some(total) => {
                let style = ProgressStyle::with_template(&format!(
                    "{{spinner}} [{{bar:30}}] {unit} {{msg}}"
                ))
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> ");
                self.0.set_style(style);
                self.0.set_length(total);
            }
            None => self.0.set_style(ProgressStyle::default_spinner()),
        }
        self.0.set_position(e.done);
        self.0.set_message(e.stage.clone());
    }
}
