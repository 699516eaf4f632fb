//! Progress of the boot steps that can take long (guest RAM mapped for
//! device DMA, BARs pre-faulted at 4 KiB pages): nothing for the first
//! [`QUIET_FOR`], then on a terminal one line rewritten in place (done and
//! total, rate, time left), elsewhere (a log file, a pipe) one line per
//! tenth of the work at most, so that a log stays readable.

use std::io::{IsTerminal, Write};
use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use resources::size::format_size;

/// How long a step runs before its progress shows.
pub const QUIET_FOR: Duration = Duration::from_secs(2);

/// How often a terminal line is rewritten at most.
const TERMINAL_EVERY: Duration = Duration::from_millis(250);

/// A terminal's width when it does not say.
const DEFAULT_COLUMNS: usize = 80;

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
    /// The terminal's width: a line stays shorter, or `\r` would return to
    /// its last row only.
    columns: usize,
    /// The length of the terminal line shown now.
    shown: usize,
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
        let progress = Self::start_at(
            what,
            total,
            output,
            Box::new(std::io::stderr()),
            Instant::now(),
        );
        if output != ProgressOutput::Terminal {
            return progress;
        }
        let columns = crate::buses::console::terminal_columns(std::io::stderr().as_fd());
        progress.with_columns(columns.map_or(DEFAULT_COLUMNS, usize::from))
    }

    /// Keeps terminal lines within `columns` characters (80 unless set).
    pub fn with_columns(mut self, columns: usize) -> Self {
        self.columns = columns.max(1);
        self
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
            columns: DEFAULT_COLUMNS,
            shown: 0,
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
                let line = self.terminal_line(done, elapsed);
                let _ = write!(self.sink, "{line}");
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
                let line = self.line(done, elapsed, true);
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
            ProgressOutput::Terminal => {
                let line = self.fit(line);
                writeln!(self.sink, "{line}")
            }
            _ => writeln!(self.sink, "{line}"),
        };
        let _ = self.sink.flush();
    }

    /// The line for a terminal, fitted by [`Progress::fit`]; without the
    /// rate when it is too long with it (the time left matters more).
    fn terminal_line(&mut self, done: u64, elapsed: Duration) -> String {
        let mut line = self.line(done, elapsed, true);
        if line.chars().count() >= self.columns {
            line = self.line(done, elapsed, false);
        }
        self.fit(line)
    }

    /// `\r` and `line`, cut to the terminal's width less one (so that it
    /// never wraps) and padded with spaces over what the last line showed.
    fn fit(&mut self, line: String) -> String {
        let line: String = line.chars().take(self.columns - 1).collect();
        let length = line.chars().count();
        let width = length.max(self.shown);
        self.shown = length;
        format!("\r{line:<width$}")
    }

    /// `barge: WHAT: 1 GiB of 4 GiB (25%), 0.50 GiB/s, 6s left`, without
    /// the rate unless `with_rate`.
    fn line(&self, done: u64, elapsed: Duration, with_rate: bool) -> String {
        let percent = u128::from(done) * 100 / u128::from(self.total);
        let left = if done == 0 {
            "time left unknown".to_string()
        } else {
            let seconds = elapsed.as_secs_f64() * (self.total - done) as f64 / done as f64;
            format!("{} left", clock(Duration::from_secs_f64(seconds)))
        };
        let rate = if with_rate {
            format!(", {}", rate(done, elapsed))
        } else {
            String::new()
        };
        format!(
            "barge: {}: {} of {} ({percent}%){rate}, {left}",
            self.what,
            format_size(done),
            format_size(self.total),
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

    /// What a terminal `columns` wide shows after `text`: its rows, as
    /// `\r` (back to the row's start), `\n` and wrapping at the last
    /// column move the cursor.
    fn screen(text: &str, columns: usize) -> Vec<String> {
        let mut rows = vec![vec![' '; columns]];
        let (mut row, mut column) = (0, 0);
        for c in text.chars() {
            match c {
                '\r' => column = 0,
                '\n' => {
                    row += 1;
                    column = 0;
                }
                _ => {
                    if column == columns {
                        row += 1;
                        column = 0;
                    }
                    while rows.len() <= row {
                        rows.push(vec![' '; columns]);
                    }
                    rows[row][column] = c;
                    column += 1;
                }
            }
        }
        while rows.len() <= row {
            rows.push(vec![' '; columns]);
        }
        rows.iter()
            .map(|r| r.iter().collect::<String>().trim_end().to_string())
            .collect()
    }

    #[test]
    fn a_terminal_line_never_wraps_and_leaves_nothing_of_a_longer_one() {
        let buffer = Buffer::default();
        let t0 = Instant::now();
        let what = "pre-fault of BAR 2 of 0000:00:10.0";
        let mut progress = Progress::start_at(
            what,
            8 * GIB,
            ProgressOutput::Terminal,
            Box::new(buffer.clone()),
            t0,
        )
        .with_columns(80);
        // 12s left, then 10s, 8s...: each line a little shorter.
        for gib in 2..8 {
            progress.update_at(gib * GIB, t0 + Duration::from_secs(2 * gib));
            let rows = screen(&buffer.text(), 80);
            assert_eq!(rows.len(), 1, "one row: {rows:?}");
            // With its rate the line would be 85 characters: it goes.
            let expected = format!(
                "barge: {what}: {gib} GiB of 8 GiB ({}%), {}s left",
                gib * 100 / 8,
                2 * (8 - gib)
            );
            assert_eq!(rows[0], expected);
        }
        progress.finish_at(t0 + Duration::from_secs(16));
        let rows = screen(&buffer.text(), 80);
        assert_eq!(
            rows,
            [
                format!("barge: {what}: 8 GiB in 16s (0.50 GiB/s)"),
                String::new()
            ]
        );
        // A wide terminal keeps the rate.
        let buffer = Buffer::default();
        let mut progress = Progress::start_at(
            what,
            8 * GIB,
            ProgressOutput::Terminal,
            Box::new(buffer.clone()),
            t0,
        )
        .with_columns(120);
        progress.update_at(2 * GIB, t0 + Duration::from_secs(4));
        assert_eq!(
            screen(&buffer.text(), 120),
            [format!(
                "barge: {what}: 2 GiB of 8 GiB (25%), 0.50 GiB/s, 12s left"
            )]
        );
        drop(progress);
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
