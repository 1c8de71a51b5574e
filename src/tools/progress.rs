//! Progress of long commands (`demo`, `dlq replay`, `dlq purge`, `dlq list --summary`): an
//! indicatif bar on standard error. indicatif draws only when standard error is a terminal
//! and hides itself otherwise, so piped output and CI logs get no control characters; the
//! commands print their results on standard output either way.

use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};

/// How often a counter's spinner turns while nothing else changes.
const TICK: Duration = Duration::from_millis(120);

/// A bar for `total` things of a known number, labelled `what`.
pub(crate) fn bar(total: u64, what: &str) -> ProgressBar {
    let bar = ProgressBar::new(total);
    if let Ok(style) =
        ProgressStyle::with_template("{prefix} [{bar:32}] {pos}/{len} ({elapsed}) {msg}")
    {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_prefix(what.to_owned());
    bar
}

/// A counter for things of an unknown number (a filter's matches), labelled `what`.
pub(crate) fn counter(what: &str) -> ProgressBar {
    let bar = ProgressBar::new_spinner();
    if let Ok(style) = ProgressStyle::with_template("{spinner} {prefix} {pos} ({elapsed}) {msg}") {
        bar.set_style(style);
    }
    bar.set_prefix(what.to_owned());
    bar.enable_steady_tick(TICK);
    bar
}
