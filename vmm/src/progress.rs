//! Progress of the boot steps that can take long (guest RAM mapped for
//! device DMA, BARs pre-faulted at 4 KiB pages): nothing for the first
//! [`QUIET_FOR`], then on a terminal one line rewritten in place (done and
//! total, rate, time left), elsewhere (a log file, a pipe) one line per
//! tenth of the work at most, so that a log stays readable.

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use resources::size::format_size;

/// How long a step runs before its progress shows.
pub const QUIET_FOR: Duration = Duration::from_secs(2);

/// How often a terminal line is rewritten at most.
const TERMINAL_EVERY: Duration = Duration::from_millis(250);

/// Where progress goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProgressOutput {
    /// A terminal: one line, rewritten (`\r`) as the work goes on.
    Terminal,
    /// Not a terminal: a line per tenth of the work at most.
    Lines,
    /// Nowhere.
    Off,
}

impl ProgressOutput {
    /// For stderr: [`ProgressOutput::Terminal`] when it is one, else
    /// [`ProgressOutput::Lines`]; [`ProgressOutput::Off`] when `enabled` is
    /// false.
    pub fn for_stderr(enabled: bool) -> Self {
        match (enabled, std::io::stderr().is_terminal()) {
            (false, _) => ProgressOutput::Off,
            (true, true) => ProgressOutput::Terminal,
            (true, false) => ProgressOutput::Lines,
        }
    }
}

/// The progress of one step over `total` bytes.
pub struct Progress {
    what: String,
    total: u64,
    output: ProgressOutput,
    sink: Box<dyn Write + Send>,
    start: Instant,
    /// When a terminal line was last written.
    last_write: Option<Instant>,
    /// The tenths already written as lines.
    tenths_written: u64,
    /// Whether anything was written (the end then says so too).
    written: bool,
    /// Whether the last line was written.
    finished: bool,
}

impl std::fmt::Debug for Progress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Progress")
            .field("what", &self.what)
            .field("total", &self.total)
            .field("output", &self.output)
            .finish_non_exhaustive()
    }
}

impl Progress {
    /// Progress of `what` (e.g. "guest RAM DMA map") over `total` bytes, to
    /// stderr.
    pub fn start(what: &str, total: u64, output: ProgressOutput) -> Self {
        Self::start_at(
            what,
            total,
            output,
            Box::new(std::io::stderr()),
            Instant::now(),
        )
    }

    /// [`Progress::start`] writing to `sink`, started at `start`.
    pub fn start_at(
        what: &str,
        total: u64,
        output: ProgressOutput,
        sink: Box<dyn Write + Send>,
        start: Instant,
    ) -> Self {
        Progress {
            what: what.to_string(),
            total,
            output,
            sink,
            start,
            last_write: None,
            tenths_written: 0,
            written: false,
            finished: false,
        }
    }

    /// `done` of the total bytes are done.
    pub fn update(&mut self, done: u64) {
        self.update_at(done, Instant::now());
    }

    /// [`Progress::update`] at `now`.
    pub fn update_at(&mut self, done: u64, now: Instant) {
        let elapsed = now.saturating_duration_since(self.start);
        if self.output == ProgressOutput::Off || elapsed < QUIET_FOR || self.total == 0 {
            return;
        }
        let done = done.min(self.total);
        match self.output {
            ProgressOutput::Terminal => {
                if self
                    .last_write
                    .is_some_and(|at| now.saturating_duration_since(at) < TERMINAL_EVERY)
                {
                    return;
                }
                let line = self.line(done, elapsed);
                // Padded: a shorter line overwrites all of a longer one.
                let _ = write!(self.sink, "\r{line:<79}");
                let _ = self.sink.flush();
                self.last_write = Some(now);
            }
            ProgressOutput::Lines => {
                let tenths =
                    u64::try_from(u128::from(done) * 10 / u128::from(self.total)).unwrap_or(10);
                if tenths <= self.tenths_written || tenths >= 10 {
                    return;
                }
                self.tenths_written = tenths;
                let line = self.line(done, elapsed);
                let _ = writeln!(self.sink, "{line}");
            }
            ProgressOutput::Off => return,
        }
        self.written = true;
    }

    /// The step is done: when progress was shown, one last line with the
    /// time it took. (Dropped without it, as when the step fails, a
    /// terminal line is only ended.)
    pub fn finish(self) {
        self.finish_at(Instant::now());
    }

    /// [`Progress::finish`] at `now`.
    pub fn finish_at(mut self, now: Instant) {
        self.finished = true;
        if !self.written {
            return;
        }
        let elapsed = now.saturating_duration_since(self.start);
        let line = format!(
            "barge: {}: {} in {} ({})",
            self.what,
            format_size(self.total),
            clock(elapsed),
            rate(self.total, elapsed)
        );
        let _ = match self.output {
            ProgressOutput::Terminal => writeln!(self.sink, "\r{line:<79}"),
            _ => writeln!(self.sink, "{line}"),
        };
        let _ = self.sink.flush();
    }

    /// `barge: WHAT: 1 GiB of 4 GiB (25%), 0.50 GiB/s, 6s left`.
    fn line(&self, done: u64, elapsed: Duration) -> String {
        let percent = u128::from(done) * 100 / u128::from(self.total);
        let left = if done == 0 {
            "time left unknown".to_string()
        } else {
            let seconds = elapsed.as_secs_f64() * (self.total - done) as f64 / done as f64;
            format!("{} left", clock(Duration::from_secs_f64(seconds)))
        };
        format!(
            "barge: {}: {} of {} ({percent}%), {}, {left}",
            self.what,
            format_size(done),
            format_size(self.total),
            rate(done, elapsed)
        )
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        if self.written && !self.finished && self.output == ProgressOutput::Terminal {
            let _ = writeln!(self.sink);
            let _ = self.sink.flush();
        }
    }
}

/// `0.19 GiB/s`: GiB per second, two decimals, as the report gives DMA
/// rates.
fn rate(bytes: u64, elapsed: Duration) -> String {
    let seconds = elapsed.as_secs_f64().max(1e-9);
    format!("{:.2} GiB/s", bytes as f64 / (1u64 << 30) as f64 / seconds)
}

/// `4s`, `2m 05s`, `1h 02m`.
fn clock(duration: Duration) -> String {
    let seconds = duration.as_secs();
    match seconds {
        0..=59 => format!("{seconds}s"),
        60..=3599 => format!("{}m {:02}s", seconds / 60, seconds % 60),
        _ => format!("{}h {:02}m", seconds / 3600, seconds / 60 % 60),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl Write for Buffer {
        fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(data);
            Ok(data.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Buffer {
        fn text(&self) -> String {
            String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
        }
    }

    const GIB: u64 = 1 << 30;

    /// Runs a step of `total` bytes done evenly over `seconds`, updated
    /// every 10 ms.
    fn run(output: ProgressOutput, total: u64, seconds: u64) -> String {
        let buffer = Buffer::default();
        let t0 = Instant::now();
        let mut progress = Progress::start_at(
            "guest RAM DMA map",
            total,
            output,
            Box::new(buffer.clone()),
            t0,
        );
        let steps = seconds * 100;
        for step in 0..=steps {
            let now = t0 + Duration::from_millis(step * 10);
            progress.update_at(total / steps * step, now);
        }
        progress.finish_at(t0 + Duration::from_secs(seconds));
        buffer.text()
    }

    #[test]
    fn a_short_step_prints_nothing() {
        for output in [
            ProgressOutput::Terminal,
            ProgressOutput::Lines,
            ProgressOutput::Off,
        ] {
            assert_eq!(run(output, 64 * GIB, 1), "", "{output:?}");
        }
    }

    #[test]
    fn lines_come_once_per_tenth_at_most_after_two_seconds() {
        let text = run(ProgressOutput::Lines, 64 * GIB, 20);
        let lines: Vec<&str> = text.lines().collect();
        // 2 s in, 10% is done: lines for 10% to 90%, then the end.
        assert_eq!(lines.len(), 10, "{text}");
        assert!(!text.contains('\r'));
        assert!(
            lines[0].starts_with("barge: guest RAM DMA map: 6.4")
                && lines[0].ends_with(" GiB of 64 GiB (10%), 3.20 GiB/s, 17s left"),
            "{}",
            lines[0]
        );
        assert!(lines[8].contains("(90%)"), "{}", lines[8]);
        assert_eq!(
            lines[9],
            "barge: guest RAM DMA map: 64 GiB in 20s (3.20 GiB/s)"
        );
    }

    #[test]
    fn a_terminal_gets_one_line_rewritten_and_a_newline_at_the_end() {
        let text = run(ProgressOutput::Terminal, 64 * GIB, 20);
        assert_eq!(text.matches('\n').count(), 1, "{text:?}");
        assert!(text.ends_with('\n'), "{text:?}");
        assert!(
            text.trim_end().ends_with("64 GiB in 20s (3.20 GiB/s)"),
            "{text:?}"
        );
        // Every 250 ms from 2 s to 20 s, and the end.
        let rewrites = text.matches('\r').count();
        assert!((70..=75).contains(&rewrites), "{rewrites}");
        assert!(text.starts_with("\rbarge: guest RAM DMA map: "), "{text:?}");
        assert!(run(ProgressOutput::Off, 64 * GIB, 20).is_empty());
    }

    #[test]
    fn a_step_that_fails_ends_the_terminal_line_without_claiming_the_end() {
        let buffer = Buffer::default();
        let t0 = Instant::now();
        let mut progress = Progress::start_at(
            "pre-fault",
            GIB,
            ProgressOutput::Terminal,
            Box::new(buffer.clone()),
            t0,
        );
        progress.update_at(GIB / 4, t0 + Duration::from_secs(3));
        drop(progress);
        let text = buffer.text();
        assert!(text.contains("(25%)") && text.ends_with('\n'), "{text:?}");
        assert_eq!(text.matches('\n').count(), 1, "{text:?}");
        assert!(!text.contains(" in "), "{text:?}");
    }

    #[test]
    fn clock_and_rate_read_well() {
        assert_eq!(clock(Duration::from_secs(4)), "4s");
        assert_eq!(clock(Duration::from_secs(125)), "2m 05s");
        assert_eq!(clock(Duration::from_secs(3720)), "1h 02m");
        assert_eq!(rate(GIB, Duration::from_secs(4)), "0.25 GiB/s");
    }
}
