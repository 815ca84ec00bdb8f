//! A batch's live progress for people (`demo`, `submit --wait`): an indicatif bar on
//! stderr when it is a terminal; otherwise (CI logs, pipes) a plain line whenever the
//! counts change, at most every few seconds, so logs stay short and still show progress.

use std::io::Write;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::Value;

/// Plain progress lines are at most this frequent.
const PLAIN_EVERY: Duration = Duration::from_secs(5);

/// The counts of a batch read (`GET /v1/batches/{id}`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    pub total: u64,
    pub pending: u64,
    pub running: u64,
    pub succeeded: u64,
    pub failed: u64,
    pub canceled: u64,
}

impl Counts {
    /// From a batch's JSON (missing fields read as 0).
    pub fn of(batch: &Value) -> Counts {
        let c = &batch["counts"];
        let n = |k: &str| c[k].as_u64().unwrap_or(0);
        Counts {
            total: n("total"),
            pending: n("pending"),
            running: n("running"),
            succeeded: n("succeeded"),
            failed: n("failed"),
            canceled: n("canceled"),
        }
    }

    /// Items in a final state.
    pub fn done(&self) -> u64 {
        self.succeeded + self.failed + self.canceled
    }

    fn message(&self) -> String {
        format!(
            "succeeded {}  failed {}  running {}  pending {}",
            self.succeeded, self.failed, self.running, self.pending
        )
    }
}

/// The progress display of one batch.
pub struct BatchProgress {
    /// The bar (hidden when stderr is not a terminal).
    bar: ProgressBar,
    /// Last counts shown, so plain output repeats nothing.
    shown: Counts,
    /// When the last plain line was written.
    plain_at: Option<Instant>,
}

impl BatchProgress {
    /// A display for a batch of `total` items.
    pub fn new(total: u64) -> BatchProgress {
        let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
        let style =
            ProgressStyle::with_template("  {spinner} [{bar:30}] {pos}/{len}  {msg}  {elapsed}")
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("#>.");
        bar.set_style(style);
        bar.enable_steady_tick(Duration::from_millis(120));
        BatchProgress {
            bar,
            shown: Counts::default(),
            plain_at: None,
        }
    }

    /// Shows the batch's current counts.
    pub fn update(&mut self, batch: &Value) {
        let c = Counts::of(batch);
        self.bar.set_length(c.total.max(1));
        self.bar.set_position(c.done());
        self.bar.set_message(c.message());
        if self.bar.is_hidden()
            && c != self.shown
            && self.plain_at.is_none_or(|t| t.elapsed() >= PLAIN_EVERY)
        {
            self.plain(&c);
        }
        self.shown = c;
    }

    fn plain(&mut self, c: &Counts) {
        let mut err = std::io::stderr().lock();
        let _ = writeln!(err, "  progress {}/{}  {}", c.done(), c.total, c.message());
        self.plain_at = Some(Instant::now());
    }

    /// Leaves the final state on screen.
    pub fn finish(mut self, batch: &Value) {
        let c = Counts::of(batch);
        self.bar.set_position(c.done());
        self.bar.set_message(c.message());
        self.bar.finish();
        if self.bar.is_hidden() && c != self.shown {
            self.plain(&c);
        }
    }
}
