//! Progress on long work: an indicatif bar on a terminal, or a log line every 10 seconds.

use std::io::IsTerminal;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use cloud_dump_postgres::Progress;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::args::ProgressMode;

pub fn make(mode: ProgressMode) -> Box<dyn Progress> {
    let tty = std::io::stderr().is_terminal();
    match mode {
        ProgressMode::None => Box::new(cloud_dump_postgres::NoProgress),
        ProgressMode::Bar => Box::new(Bar::new()),
        ProgressMode::Auto if tty && !crate::json_logs() => Box::new(Bar::new()),
        ProgressMode::Auto | ProgressMode::Log => Box::new(LogLines::default()),
    }
}

struct Bar {
    bar: ProgressBar,
}

impl Bar {
    fn new() -> Bar {
        let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
        bar.set_style(
            ProgressStyle::with_template(
                "{msg:8} [{elapsed_precise}] [{wide_bar}] {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta}",
            )
            .expect("valid template")
            .progress_chars("=> "),
        );
        Bar { bar }
    }
}

impl Progress for Bar {
    fn begin(&self, phase: &str, total: Option<u64>) {
        self.bar.set_message(phase.to_owned());
        self.bar.set_length(total.unwrap_or(0));
        self.bar.set_position(0);
        self.bar.reset_elapsed();
    }
    fn advance(&self, bytes: u64) {
        self.bar.inc(bytes);
        if self.bar.position() > self.bar.length().unwrap_or(0) {
            self.bar.set_length(self.bar.position());
        }
    }
    fn end(&self) {
        self.bar.finish_and_clear();
    }
}

struct Phase {
    name: String,
    total: Option<u64>,
    start: Instant,
    last_line: Instant,
}

#[derive(Default)]
struct LogLines {
    done: AtomicU64,
    phase: Mutex<Option<Phase>>,
}

fn human(b: f64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b;
    let mut i = 0;
    while v >= 1024.0 && i < units.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    format!("{v:.1} {}", units[i])
}

impl Progress for LogLines {
    fn begin(&self, phase: &str, total: Option<u64>) {
        self.done.store(0, Ordering::Relaxed);
        let now = Instant::now();
        *self.phase.lock().expect("progress lock") =
            Some(Phase { name: phase.to_owned(), total, start: now, last_line: now });
    }
    fn advance(&self, bytes: u64) {
        let done = self.done.fetch_add(bytes, Ordering::Relaxed) + bytes;
        let mut guard = self.phase.lock().expect("progress lock");
        let Some(p) = guard.as_mut() else {
            return;
        };
        if p.last_line.elapsed() < Duration::from_secs(10) {
            return;
        }
        p.last_line = Instant::now();
        let (phase, total) = (&p.name, &p.total);
        let secs = p.start.elapsed().as_secs_f64().max(0.001);
        let rate = done as f64 / secs;
        if crate::json_logs() {
            // Fields a log shipper can graph; the message stays readable.
            let total = total.unwrap_or(0);
            tracing::info!(
                progress = %phase,
                done_bytes = done,
                total_bytes = total,
                bytes_per_second = rate as u64,
                elapsed_seconds = secs as u64,
                "{phase}: {} done",
                human(done as f64)
            );
            return;
        }
        match total {
            Some(t) if *t > 0 => {
                let pct = (done as f64 * 100.0 / *t as f64).min(100.0);
                let eta = (t.saturating_sub(done)) as f64 / rate.max(1.0);
                tracing::info!(
                    "{phase}: {} of ~{} ({pct:.0}%), {}/s, ETA {eta:.0}s",
                    human(done as f64),
                    human(*t as f64),
                    human(rate)
                );
            }
            _ => tracing::info!("{phase}: {}, {}/s", human(done as f64), human(rate)),
        }
    }
    fn end(&self) {}
}
