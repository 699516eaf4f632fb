//! Rate limiting for log lines the guest can trigger at will.
//!
//! A guest that rewrites a BAR, programs a bad MSI message or makes the host
//! refuse an interrupt setup in a loop would otherwise write one line per
//! access, without bound. Every such log site goes through
//! [`guest_warn!`](crate::guest_warn!) or [`guest_info!`](crate::guest_info!)
//! (or [`guest_log!`](crate::guest_log!) for another level), which take the
//! format arguments of `log::warn!` and give the call site its own
//! [`GuestLogLimiter`]: the first [`BURST`] lines are logged, then at most
//! one per [`INTERVAL`]; a line logged after others were dropped says how
//! many. The last line of the burst says that limiting starts. Drops are
//! counted only while the level is enabled, and a count is reported with
//! the next line that gets through (none if the guest stops). The log
//! target stays the calling module's.
//!
//! Both barge crates use the macros: `devices::guest_warn!` in `vmm`.

use std::fmt;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Lines one log site logs before limiting starts.
pub const BURST: u32 = 10;
/// After the burst, the least time between two lines of one log site.
pub const INTERVAL: Duration = Duration::from_secs(1);

/// The limiter state of one log site; usable as a `static`.
#[derive(Debug)]
pub struct GuestLogLimiter {
    state: Mutex<LimiterState>,
}

#[derive(Debug)]
struct LimiterState {
    /// Lines logged so far, up to [`BURST`].
    burst_used: u32,
    /// When the last line was logged.
    last_logged: Option<Instant>,
    /// Lines dropped since the last logged one.
    suppressed: u64,
}

/// A line the limiter lets through, and what to append to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Admitted {
    /// Lines of this log site dropped since the last logged one.
    pub suppressed: u64,
    /// This is the last line of the burst: from now on at most one per
    /// [`INTERVAL`].
    pub limiting_starts: bool,
}

/// The text appended to an admitted line (empty when there is nothing to
/// say).
impl fmt::Display for Admitted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.suppressed > 0 {
            write!(
                f,
                " ({} more such lines suppressed since the last one)",
                self.suppressed
            )?;
        }
        if self.limiting_starts {
            write!(
                f,
                " (the guest can repeat this: further such lines at most one per {INTERVAL:?})"
            )?;
        }
        Ok(())
    }
}

impl GuestLogLimiter {
    /// A limiter that has logged nothing yet.
    pub const fn new() -> Self {
        GuestLogLimiter {
            state: Mutex::new(LimiterState {
                burst_used: 0,
                last_logged: None,
                suppressed: 0,
            }),
        }
    }

    /// Whether a line may be logged at `now` (`None`: drop it, counted).
    /// `now` comes from the caller so tests can drive the clock.
    pub fn admit(&self, now: Instant) -> Option<Admitted> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if state.burst_used < BURST {
            state.burst_used += 1;
            state.last_logged = Some(now);
            return Some(Admitted {
                suppressed: 0,
                limiting_starts: state.burst_used == BURST,
            });
        }
        let due = state
            .last_logged
            .is_none_or(|last| now.saturating_duration_since(last) >= INTERVAL);
        if !due {
            state.suppressed = state.suppressed.saturating_add(1);
            return None;
        }
        state.last_logged = Some(now);
        Some(Admitted {
            suppressed: std::mem::take(&mut state.suppressed),
            limiting_starts: false,
        })
    }
}

impl Default for GuestLogLimiter {
    fn default() -> Self {
        Self::new()
    }
}

#[doc(hidden)]
pub use log as __log;

/// Logs at `level` through this call site's [`GuestLogLimiter`]:
/// `guest_log!(log::Level::Warn, "format {}", args)`. See the module docs.
#[macro_export]
macro_rules! guest_log {
    ($level:expr, $($arg:tt)+) => {{
        static LIMITER: $crate::guest_log::GuestLogLimiter =
            $crate::guest_log::GuestLogLimiter::new();
        let level: $crate::guest_log::__log::Level = $level;
        if $crate::guest_log::__log::log_enabled!(level) {
            if let ::std::option::Option::Some(admitted) =
                LIMITER.admit(::std::time::Instant::now())
            {
                $crate::guest_log::__log::log!(
                    level,
                    "{}{}",
                    ::std::format_args!($($arg)+),
                    admitted
                );
            }
        }
    }};
}

/// [`guest_log!`](crate::guest_log!) at warn level; the format arguments of `log::warn!` (no
/// `target:`).
#[macro_export]
macro_rules! guest_warn {
    ($($arg:tt)+) => {
        $crate::guest_log!($crate::guest_log::__log::Level::Warn, $($arg)+)
    };
}

/// [`guest_log!`](crate::guest_log!) at info level; the format arguments of `log::info!` (no
/// `target:`).
#[macro_export]
macro_rules! guest_info {
    ($($arg:tt)+) => {
        $crate::guest_log!($crate::guest_log::__log::Level::Info, $($arg)+)
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    fn admitted(suppressed: u64, limiting_starts: bool) -> Option<Admitted> {
        Some(Admitted {
            suppressed,
            limiting_starts,
        })
    }

    #[test]
    fn the_burst_is_logged_then_one_line_per_interval_with_the_drop_count() {
        let limiter = GuestLogLimiter::new();
        let t0 = Instant::now();
        for i in 0..BURST - 1 {
            assert_eq!(limiter.admit(t0), admitted(0, false), "burst line {i}");
        }
        assert_eq!(limiter.admit(t0), admitted(0, true));
        // Within the interval after the burst's last line: dropped, counted.
        for _ in 0..5 {
            assert_eq!(limiter.admit(t0 + INTERVAL / 2), None);
        }
        assert_eq!(limiter.admit(t0 + INTERVAL), admitted(5, false));
        assert_eq!(limiter.admit(t0 + INTERVAL + INTERVAL / 2), None);
        assert_eq!(limiter.admit(t0 + 2 * INTERVAL), admitted(1, false));
        // Nothing dropped in between: nothing to report.
        assert_eq!(limiter.admit(t0 + 5 * INTERVAL), admitted(0, false));
    }

    #[test]
    fn a_flood_is_bounded_by_its_duration() {
        let limiter = GuestLogLimiter::new();
        let t0 = Instant::now();
        // A million lines over ten seconds.
        let logged = (0..1_000_000u32)
            .filter(|i| {
                let now = t0 + Duration::from_micros(u64::from(*i) * 10);
                limiter.admit(now).is_some()
            })
            .count();
        assert_eq!(logged, BURST as usize + 9);
    }

    #[test]
    fn a_clock_going_backwards_does_not_panic_or_admit() {
        let limiter = GuestLogLimiter::new();
        let t0 = Instant::now() + INTERVAL;
        for _ in 0..BURST {
            limiter.admit(t0);
        }
        assert_eq!(limiter.admit(t0 - INTERVAL), None);
    }

    #[test]
    fn notes_say_what_was_dropped_and_when_limiting_starts() {
        let quiet = Admitted {
            suppressed: 0,
            limiting_starts: false,
        };
        assert_eq!(quiet.to_string(), "");
        let dropped = Admitted {
            suppressed: 7,
            ..quiet
        };
        assert_eq!(
            dropped.to_string(),
            " (7 more such lines suppressed since the last one)"
        );
        let last = Admitted {
            limiting_starts: true,
            ..quiet
        };
        assert_eq!(
            last.to_string(),
            " (the guest can repeat this: further such lines at most one per 1s)"
        );
    }

    /// Keeps the records this module's tests log (other tests' are ignored).
    struct Capture(Mutex<Vec<(log::Level, String)>>);

    impl log::Log for Capture {
        fn enabled(&self, _: &log::Metadata<'_>) -> bool {
            true
        }

        fn log(&self, record: &log::Record<'_>) {
            if record.target() == module_path!() {
                let mut records = self.0.lock().unwrap_or_else(|p| p.into_inner());
                records.push((record.level(), record.args().to_string()));
            }
        }

        fn flush(&self) {}
    }

    static CAPTURE: Capture = Capture(Mutex::new(Vec::new()));

    #[test]
    fn each_call_site_limits_its_own_lines_under_the_callers_target() {
        // The only test in this crate that installs a logger.
        log::set_logger(&CAPTURE).unwrap();
        log::set_max_level(log::LevelFilter::Trace);
        for i in 0..3 * BURST {
            crate::guest_warn!("a {i}");
            crate::guest_info!("b {}", i);
        }
        let records = CAPTURE.0.lock().unwrap().clone();
        let lines = |level| -> Vec<String> {
            records
                .iter()
                .filter(|(l, _)| *l == level)
                .map(|(_, text)| text.clone())
                .collect()
        };
        for (level, prefix) in [(log::Level::Warn, "a"), (log::Level::Info, "b")] {
            let lines = lines(level);
            // The loop takes microseconds; only a stall of a whole INTERVAL
            // could let one more line through.
            assert!(
                (BURST as usize..=BURST as usize + 1).contains(&lines.len()),
                "{lines:?}"
            );
            assert_eq!(lines[0], format!("{prefix} 0"));
            assert_eq!(
                lines[BURST as usize - 1],
                format!(
                    "{prefix} {} (the guest can repeat this: further such lines at most one per 1s)",
                    BURST - 1
                )
            );
        }
    }
}
