//! What an import shows while it runs: progress bars for paths and NAR bytes
//! when stderr is a terminal, one plain line per finished path otherwise
//! (logs, CI), or nothing.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use indicatif::{HumanBytes, MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use lazystore_castore::error_chain;

use crate::error::PathError;

/// How an import reports progress.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProgressMode {
    /// Progress bars on stderr, for a terminal.
    Bars,
    /// One line on stderr per path imported or failed, and warnings.
    Lines,
    /// Nothing; warnings go to `tracing`.
    Quiet,
}

/// How often the bars pick up the byte counters.
const TICK: Duration = Duration::from_millis(100);

/// The live view of a run, shared by its tasks.
pub(crate) struct Progress {
    mode: ProgressMode,
    bars: Option<Bars>,
    /// NAR bytes that have passed the size check, for the bytes bar.
    nar_bytes: Arc<AtomicU64>,
}

struct Bars {
    multi: MultiProgress,
    paths: ProgressBar,
    bytes: ProgressBar,
}

impl Progress {
    pub(crate) fn new(mode: ProgressMode) -> Arc<Progress> {
        let bars = (mode == ProgressMode::Bars).then(|| {
            let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stderr());
            let paths = multi.add(ProgressBar::new(0));
            paths.set_style(
                ProgressStyle::with_template("{spinner} paths [{bar:30}] {pos}/{len} {wide_msg}")
                    .expect("valid template")
                    .progress_chars("=> "),
            );
            let bytes = multi.add(ProgressBar::new(0));
            bytes.set_style(
                ProgressStyle::with_template(
                    "  NAR   [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}",
                )
                .expect("valid template")
                .progress_chars("=> "),
            );
            paths.enable_steady_tick(TICK);
            Bars {
                multi,
                paths,
                bytes,
            }
        });
        let progress = Arc::new(Progress {
            mode,
            bars,
            nar_bytes: Arc::new(AtomicU64::new(0)),
        });
        if progress.bars.is_some() {
            let weak = Arc::downgrade(&progress);
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(TICK);
                loop {
                    tick.tick().await;
                    let Some(progress) = weak.upgrade() else {
                        break;
                    };
                    let Some(bars) = &progress.bars else { break };
                    if bars.bytes.is_finished() {
                        break;
                    }
                    // A retried download counts its bytes twice; the bar
                    // must not run past its end for that.
                    let done = progress.nar_bytes.load(Ordering::Relaxed);
                    let total = bars.bytes.length().unwrap_or(0);
                    bars.bytes.set_position(done.min(total));
                }
            });
        }
        progress
    }

    /// The counter NAR readers add their bytes to.
    pub(crate) fn nar_counter(&self) -> Arc<AtomicU64> {
        self.nar_bytes.clone()
    }

    /// A path was added to the plan.
    pub(crate) fn path_found(&self) {
        if let Some(bars) = &self.bars {
            bars.paths.inc_length(1);
        }
    }

    /// A NAR of `nar_size` bytes is about to be downloaded.
    pub(crate) fn nar_expected(&self, nar_size: u64) {
        if let Some(bars) = &self.bars {
            bars.bytes.inc_length(nar_size);
        }
    }

    /// A path was published, found present, or failed; `line` says which
    /// (and is shown in line mode only if `notable`).
    pub(crate) fn path_done(&self, line: &str, notable: bool) {
        match (&self.bars, self.mode) {
            (Some(bars), _) => {
                bars.paths.inc(1);
                bars.paths.set_message(line.to_owned());
            }
            (None, ProgressMode::Lines) if notable => eprintln!("lazystore: {line}"),
            _ => tracing::debug!("{line}"),
        }
    }

    /// Something the user must see whatever the mode.
    pub(crate) fn warn(&self, message: &str) {
        match (&self.bars, self.mode) {
            (Some(bars), _) => {
                let _ = bars.multi.println(format!("lazystore: warning: {message}"));
            }
            (None, ProgressMode::Lines) => eprintln!("lazystore: warning: {message}"),
            _ => tracing::warn!("{message}"),
        }
    }

    /// A path failed: shown above the bars, or as a line, with its causes.
    pub(crate) fn error(&self, error: &PathError) {
        let message = error_chain(error);
        match (&self.bars, self.mode) {
            (Some(bars), _) => {
                bars.paths.inc(1);
                let _ = bars.multi.println(format!("lazystore: error: {message}"));
            }
            (None, ProgressMode::Lines) => eprintln!("lazystore: error: {message}"),
            _ => tracing::info!("{message}"),
        }
    }

    /// Ends the bars, leaving the screen to the summary.
    pub(crate) fn finish(&self) {
        if let Some(bars) = &self.bars {
            bars.bytes.finish_and_clear();
            bars.paths.finish_and_clear();
            let _ = bars.multi.clear();
        }
    }
}

/// `1.5 MiB` and the like.
pub(crate) fn bytes(n: u64) -> String {
    HumanBytes(n).to_string()
}
