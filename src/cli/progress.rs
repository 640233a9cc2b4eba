//! Progress reporting behind `-p`, `--progress=json` and SIGUSR1, and the
//! signal flag that turns Ctrl-C / SIGTERM into a clean stop.
//!
//! A [`Reporter`] is the engine's [`Progress`]: it always counts (phase,
//! bytes done of the total, bytes on the wire), so SIGUSR1 can print one
//! line whatever was asked, as qemu-img does, and shows it as asked: an
//! indicatif bar on a terminal, a line per 10 % in a log, JSON lines for
//! programs, or nothing (`-q`).

use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use super::output::human_size;
use crate::engine::{Phase, Progress};

/// How progress is shown (`--progress[=bar|json]`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ProgressFormat {
    /// A bar on a terminal, a line per 10 % otherwise
    Bar,
    /// One JSON object per line (phase, done, total, wire, rate, eta), for
    /// programs
    Json,
}

/// `-p` / `--progress=json` / `--progress-fd` / `-q`, shared by every
/// command that reports progress.
#[derive(clap::Args, Clone, Copy, Debug)]
pub struct Reporting {
    /// Show progress on stderr: a bar (the default when stderr is a
    /// terminal; a line per 10 % otherwise), or --progress=json: one JSON
    /// object per line for programs (at most twice a second and at every
    /// phase change)
    #[arg(
        short = 'p',
        long,
        value_name = "FORMAT",
        value_enum,
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "bar"
    )]
    pub progress: Option<ProgressFormat>,
    /// Write the JSON progress lines to file descriptor N instead of
    /// stderr (implies --progress=json)
    #[arg(long, value_name = "N")]
    pub progress_fd: Option<i32>,
    /// Print nothing but errors
    #[arg(short = 'q', long, conflicts_with_all = ["progress", "progress_fd"])]
    pub quiet: bool,
}

impl Reporting {
    /// The reporter these options ask for. SIGUSR1 prints a line from now
    /// on.
    pub fn reporter(&self) -> Result<Reporter> {
        let view = match (self.progress, self.progress_fd) {
            (Some(ProgressFormat::Bar), Some(_)) => {
                anyhow::bail!("--progress-fd: goes with --progress=json, not a bar")
            }
            (_, Some(fd)) => View::Json(Mutex::new(Box::new(
                crate::io::file::dup_inherited_fd(fd)
                    .with_context(|| format!("--progress-fd {fd}"))?,
            ))),
            (Some(ProgressFormat::Json), None) => View::Json(Mutex::new(Box::new(Stderr))),
            (Some(ProgressFormat::Bar), None) => View::bar(true),
            (None, None) if self.quiet => View::None,
            (None, None) => View::bar(false),
        };
        Ok(Reporter::new(view))
    }
}

/// Where JSON lines go by default: stderr, through the same never-panicking
/// writes as error lines.
struct Stderr;

impl Write for Stderr {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        std::io::stderr().write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

/// At most this often a JSON line between phase changes.
const JSON_INTERVAL: Duration = Duration::from_millis(500);

/// The engine's progress, counted and shown.
pub struct Reporter(Arc<Shared>);

struct Shared {
    state: Mutex<State>,
    view: View,
}

enum View {
    None,
    /// indicatif's bar on a terminal.
    Terminal(ProgressBar),
    /// `-p` without a terminal: a line at every further 10 %.
    Lines,
    Json(Mutex<Box<dyn Write + Send>>),
}

impl View {
    /// A bar on a terminal; in a log (a pipe, a file) only when asked.
    fn bar(asked: bool) -> View {
        if !std::io::stderr().is_terminal() {
            return if asked { View::Lines } else { View::None };
        }
        let bar = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stderr());
        bar.set_style(
            ProgressStyle::with_template(
                "{wide_bar} {binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec} ETA {eta} {msg}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        bar.enable_steady_tick(Duration::from_millis(200));
        View::Terminal(bar)
    }
}

#[derive(Clone, Copy)]
struct State {
    phase: Option<Phase>,
    total: u64,
    done: u64,
    wire: u64,
    /// Data sent (sync), shown by the bar when not zero.
    sent: u64,
    started: Instant,
    last_json: Option<Instant>,
    /// The last tenth a `-p` log line was printed for.
    tenth: u64,
}

impl State {
    fn rate(&self) -> u64 {
        let secs = self.started.elapsed().as_secs_f64();
        if secs < 1e-3 {
            return 0;
        }
        (self.done as f64 / secs) as u64
    }

    fn eta(&self) -> Option<u64> {
        let rate = self.rate();
        (rate > 0 && self.total >= self.done).then(|| (self.total - self.done).div_ceil(rate))
    }

    /// The JSON line (README: "Progress for programs"); `phase` is "done"
    /// on the last one.
    fn json(&self, phase: &str) -> String {
        let v = serde_json::json!({
            "phase": phase,
            "done": self.done,
            "total": self.total,
            "wire": self.wire,
            "rate": self.rate(),
            "eta": self.eta(),
            "elapsed": super::output::seconds(self.started.elapsed()),
        });
        v.to_string()
    }

    /// `-p`'s line in a log: ` 40% 1.2 GiB of 3 GiB, 110 MiB/s, 20 MiB sent`.
    fn log_line(&self) -> String {
        let pct = (self.done * 100).checked_div(self.total).unwrap_or(100);
        let sent = match self.sent {
            0 => String::new(),
            s => format!(", {} sent", human_size(s)),
        };
        format!(
            "{pct:>3}% {} of {}, {}/s{sent}",
            human_size(self.done),
            human_size(self.total),
            human_size(self.rate())
        )
    }

    /// SIGUSR1's line: the phase, the share done to 0.01 %, the wire.
    fn line(&self) -> String {
        let pct = (self.done as f64 * 100.0 / self.total.max(1) as f64).min(100.0);
        let wire = match self.wire {
            0 => String::new(),
            w => format!(", {} on the wire", human_size(w)),
        };
        let phase = self.phase.map_or("starting", Phase::name);
        format!(
            "{phase}: {pct:.2}% {} of {}, {}/s{wire}",
            human_size(self.done),
            human_size(self.total),
            human_size(self.rate())
        )
    }
}

impl Reporter {
    fn new(view: View) -> Reporter {
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                phase: None,
                total: 0,
                done: 0,
                wire: 0,
                sent: 0,
                started: Instant::now(),
                last_json: None,
                tenth: 0,
            }),
            view,
        });
        usr1::watch(&shared);
        Reporter(shared)
    }

    fn update(&self, f: impl FnOnce(&mut State)) {
        let Ok(mut s) = self.0.state.lock() else {
            return;
        };
        f(&mut s);
    }

    /// The operation succeeded: the last JSON line (`"phase": "done"`),
    /// and the bar goes away.
    pub fn done(&self) {
        let Ok(s) = self.0.state.lock() else { return };
        match &self.0.view {
            View::Json(out) => write_json(out, &s.json("done")),
            View::Terminal(b) => b.finish_and_clear(),
            View::Lines => {
                let mut last = *s;
                last.done = last.done.max(last.total);
                super::output::eprint_line(&last.log_line())
            }
            _ => {}
        }
    }
}

fn write_json(out: &Mutex<Box<dyn Write + Send>>, line: &str) {
    if let Ok(mut o) = out.lock() {
        // A reader that went away must not stop the work: progress is
        // advisory.
        let _ = writeln!(o, "{line}");
        let _ = o.flush();
    }
}

impl Shared {
    /// One line on request (SIGUSR1).
    fn print_now(&self) {
        let Ok(s) = self.state.lock() else { return };
        match &self.view {
            View::Json(out) => write_json(out, &s.json(s.phase.map_or("starting", Phase::name))),
            View::Terminal(b) => b.println(s.line()),
            _ => super::output::eprint_line(&s.line()),
        }
    }

    /// After the counts changed: whatever the view shows now.
    fn show(&self, s: &mut State, phase_changed: bool) {
        match &self.view {
            View::None => {}
            View::Terminal(b) => {
                b.set_length(s.total);
                b.set_position(s.done);
                let sent = match s.sent {
                    0 => String::new(),
                    n => format!(", {} sent", human_size(n)),
                };
                b.set_message(format!("{}{sent}", s.phase.map_or("", Phase::name)));
            }
            View::Lines => {
                let tenth = (s.done * 10).checked_div(s.total).unwrap_or(0).min(10);
                if tenth > s.tenth && tenth < 10 {
                    s.tenth = tenth;
                    super::output::eprint_line(&s.log_line());
                }
            }
            View::Json(out) => {
                let now = Instant::now();
                let due = s
                    .last_json
                    .map_or(true, |t| now.duration_since(t) >= JSON_INTERVAL);
                if phase_changed || due {
                    s.last_json = Some(now);
                    let phase = s.phase.map_or("starting", Phase::name);
                    write_json(out, &s.json(phase));
                }
            }
        }
    }
}

impl Progress for Reporter {
    fn start(&self, total: u64) {
        self.update(|s| {
            s.total = total;
            s.done = 0;
            s.tenth = 0;
        });
    }
    fn advance(&self, bytes: u64) {
        let Ok(mut s) = self.0.state.lock() else {
            return;
        };
        s.done += bytes;
        self.0.show(&mut s, false);
    }
    fn sent(&self, bytes: u64) {
        self.update(|s| s.sent += bytes);
    }
    fn grow(&self, bytes: u64) {
        self.update(|s| s.total += bytes);
    }
    fn wire(&self, bytes: u64) {
        self.update(|s| s.wire += bytes);
    }
    fn phase(&self, phase: Phase) {
        let Ok(mut s) = self.0.state.lock() else {
            return;
        };
        if s.phase == Some(phase) {
            return;
        }
        s.phase = Some(phase);
        self.0.show(&mut s, true);
    }
    fn finish(&self) {}
}

impl Drop for Reporter {
    fn drop(&mut self) {
        if let View::Terminal(b) = &self.0.view {
            b.finish_and_clear();
        }
    }
}

/// SIGUSR1: one progress line from the current reporter. The signal's
/// default action ends the process, so the handler is installed before any
/// work starts and stays (a late signal prints nothing).
mod usr1 {
    use super::*;

    static CURRENT: OnceLock<Mutex<Weak<Shared>>> = OnceLock::new();

    pub(super) fn watch(shared: &Arc<Shared>) {
        let mut first = false;
        let current = CURRENT.get_or_init(|| {
            first = true;
            Mutex::new(Weak::new())
        });
        if let Ok(mut c) = current.lock() {
            *c = Arc::downgrade(shared);
        }
        if !first {
            return;
        }
        let Ok(mut signals) = signal_hook::iterator::Signals::new([signal_hook::consts::SIGUSR1])
        else {
            return;
        };
        let _ = std::thread::Builder::new()
            .name("sigusr1".into())
            .spawn(move || {
                for _ in signals.forever() {
                    let shared = CURRENT
                        .get()
                        .and_then(|c| c.lock().ok().and_then(|w| w.upgrade()));
                    if let Some(s) = shared {
                        s.print_now();
                    }
                }
            });
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
        let signal = Arc::new(AtomicUsize::new(0));
        for sig in [
            signal_hook::consts::SIGINT,
            signal_hook::consts::SIGTERM,
            signal_hook::consts::SIGHUP,
        ] {
            let status = 128 + sig as u32;
            let _ = signal_hook::flag::register_conditional_shutdown(
                sig,
                status as i32,
                Arc::clone(&flag),
            );
            let _ = signal_hook::flag::register_usize(sig, Arc::clone(&signal), sig as usize);
            let _ = signal_hook::flag::register(sig, Arc::clone(&flag));
        }
        let _ = SIGNALLED.set(signal);
        flag
    })
    .clone()
}

/// The exit status of a command that failed after a signal asked it to
/// stop: 128 + the signal's number, as a shell reports a process the signal
/// ended (130 for Ctrl-C); `None` without such a signal.
pub fn interrupted_status() -> Option<u8> {
    let sig = SIGNALLED.get()?.load(Ordering::Relaxed);
    (sig != 0).then(|| u8::try_from(128 + sig).ok()).flatten()
}

static FLAG: OnceLock<Arc<AtomicBool>> = OnceLock::new();
static SIGNALLED: OnceLock<Arc<AtomicUsize>> = OnceLock::new();
