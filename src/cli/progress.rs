//! The progress bar (indicatif) behind `-p`, and the signal flag that turns
//! Ctrl-C / SIGTERM into a clean stop.

use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use super::output::human_size;
use crate::engine::{NoProgress, Progress};

/// `-p` / `-q`, shared by every command that reports progress.
#[derive(clap::Args, Clone, Copy, Debug)]
pub struct Reporting {
    /// Show a progress bar (default when stderr is a terminal)
    #[arg(short = 'p', long)]
    pub progress: bool,
    /// Print nothing but errors
    #[arg(short = 'q', long, conflicts_with = "progress")]
    pub quiet: bool,
}

impl Reporting {
    /// The bar these options ask for, if any.
    pub fn bar(&self) -> Option<Bar> {
        Bar::new(self.progress, self.quiet)
    }
}

/// The progress sink for an optional bar.
pub fn progress_of(bar: &Option<Bar>) -> &dyn Progress {
    match bar {
        Some(b) => b,
        None => &NoProgress,
    }
}

/// Progress on stderr: an indicatif bar (bytes done of the total, rate,
/// ETA) on a terminal; with `-p` and no terminal (a log, a pipe), a line
/// at every further 10 %, as `qemu-img convert -p` keeps logging too.
pub enum Bar {
    /// The bar, and the data sent so far (sync).
    Terminal(ProgressBar, AtomicU64),
    Lines(Lines),
}

pub struct Lines {
    total: AtomicU64,
    done: AtomicU64,
    /// The last tenth reported.
    reported: AtomicU64,
    /// Data sent (sync), shown when not zero.
    sent: AtomicU64,
    started: Instant,
}

impl Bar {
    /// A bar when `-p` was given, or by default when stderr is a terminal;
    /// never with `-q`.
    pub fn new(progress: bool, quiet: bool) -> Option<Bar> {
        if quiet {
            return None;
        }
        if !std::io::stderr().is_terminal() {
            return progress.then(|| {
                Bar::Lines(Lines {
                    total: AtomicU64::new(0),
                    done: AtomicU64::new(0),
                    reported: AtomicU64::new(0),
                    sent: AtomicU64::new(0),
                    started: Instant::now(),
                })
            });
        }
        let bar = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stderr());
        bar.set_style(
            ProgressStyle::with_template(
                "{wide_bar} {binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec} ETA {eta} {msg}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        bar.enable_steady_tick(Duration::from_millis(200));
        Some(Bar::Terminal(bar, AtomicU64::new(0)))
    }
}

impl Lines {
    fn line(&self, done: u64, total: u64) {
        let pct = (done * 100).checked_div(total).unwrap_or(100);
        let secs = self.started.elapsed().as_secs_f64().max(1e-3);
        let sent = match self.sent.load(Ordering::Relaxed) {
            0 => String::new(),
            s => format!(", {} sent", human_size(s)),
        };
        super::output::eprint_line(&format!(
            "{pct:>3}% {} of {}, {}/s{sent}",
            human_size(done),
            human_size(total),
            human_size((done as f64 / secs) as u64)
        ));
    }
}

impl Progress for Bar {
    fn start(&self, total: u64) {
        match self {
            Bar::Terminal(b, _) => {
                b.set_length(total);
                b.set_position(0);
            }
            Bar::Lines(l) => {
                l.total.store(total, Ordering::Relaxed);
                l.done.store(0, Ordering::Relaxed);
                l.reported.store(0, Ordering::Relaxed);
            }
        }
    }
    fn advance(&self, bytes: u64) {
        match self {
            Bar::Terminal(b, _) => b.inc(bytes),
            Bar::Lines(l) => {
                let done = l.done.fetch_add(bytes, Ordering::Relaxed) + bytes;
                let total = l.total.load(Ordering::Relaxed);
                let tenth = (done * 10).checked_div(total).unwrap_or(10).min(10);
                // One thread (the pipeline's writer) advances progress.
                if tenth > l.reported.load(Ordering::Relaxed) && tenth < 10 {
                    l.reported.store(tenth, Ordering::Relaxed);
                    l.line(done, total);
                }
            }
        }
    }
    fn sent(&self, bytes: u64) {
        match self {
            Bar::Terminal(b, sent) => {
                let now = sent.fetch_add(bytes, Ordering::Relaxed) + bytes;
                b.set_message(format!("{} sent", human_size(now)));
            }
            Bar::Lines(l) => {
                l.sent.fetch_add(bytes, Ordering::Relaxed);
            }
        }
    }
    fn grow(&self, bytes: u64) {
        match self {
            Bar::Terminal(b, _) => b.inc_length(bytes),
            Bar::Lines(l) => {
                l.total.fetch_add(bytes, Ordering::Relaxed);
            }
        }
    }
    fn finish(&self) {
        match self {
            Bar::Terminal(b, _) => b.finish_and_clear(),
            Bar::Lines(l) => {
                if l.reported.swap(11, Ordering::Relaxed) <= 10 {
                    let total = l.total.load(Ordering::Relaxed);
                    l.line(l.done.load(Ordering::Relaxed).max(total), total);
                }
            }
        }
    }
}

impl Drop for Bar {
    fn drop(&mut self) {
        if let Bar::Terminal(b, _) = self {
            b.finish_and_clear();
        }
    }
}

/// A flag set by SIGINT, SIGTERM and SIGHUP; the engine and every wait on
/// the peer poll it and stop cleanly (removing their temporary output). A
/// second signal exits at once. The handlers are installed on the first
/// call (commands that never poll the flag keep the default: a signal ends
/// them), and every call returns the same flag.
pub fn interrupt_flag() -> Arc<AtomicBool> {
    FLAG.get_or_init(|| {
        let flag = Arc::new(AtomicBool::new(false));
        for sig in [
            signal_hook::consts::SIGINT,
            signal_hook::consts::SIGTERM,
            signal_hook::consts::SIGHUP,
        ] {
            let _ = signal_hook::flag::register_conditional_shutdown(sig, 130, Arc::clone(&flag));
            let _ = signal_hook::flag::register(sig, Arc::clone(&flag));
        }
        flag
    })
    .clone()
}

static FLAG: std::sync::OnceLock<Arc<AtomicBool>> = std::sync::OnceLock::new();
