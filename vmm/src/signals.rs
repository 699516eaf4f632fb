//! SIGTERM and SIGINT for the `barge` binary: the handler only records the
//! signal number in an atomic (async-signal-safe); the event loop sees it
//! within its poll interval and stops the VM as a timeout would, with
//! [`crate::machine::vcpu::StopCause::Signal`], so the report is still written.
//!
//! The handlers are installed with `SA_RESETHAND`: a second SIGTERM (or
//! SIGINT) while barge is stopping ends it at once, the default way.
//! Embedders that never call [`install_stop_handlers`] are unaffected.
//!
//! With `--serial stdio` on a terminal, stdin is in raw mode (ISIG off), so
//! Ctrl-C goes to the guest; SIGINT then only comes from `kill`.

use std::io;
use std::sync::atomic::{AtomicI32, Ordering};

/// Errors installing the handlers.
#[derive(Debug, thiserror::Error)]
pub enum SignalError {
    /// sigaction failed.
    #[error("cannot install the {name} handler: {source}; barge cannot stop cleanly on {name}")]
    Install {
        name: &'static str,
        source: io::Error,
    },
}

/// The first stop signal received, 0 while none.
static PENDING_STOP_SIGNAL: AtomicI32 = AtomicI32::new(0);

/// Records `signo` in `slot` unless a signal is already recorded (the first
/// one wins). Only an atomic compare-exchange: async-signal-safe.
fn record_signal(slot: &AtomicI32, signo: libc::c_int) {
    let _ = slot.compare_exchange(0, signo, Ordering::SeqCst, Ordering::SeqCst);
}

extern "C" fn on_stop_signal(signo: libc::c_int) {
    record_signal(&PENDING_STOP_SIGNAL, signo);
}

/// The signals that stop the VM.
pub const STOP_SIGNALS: [libc::c_int; 2] = [libc::SIGTERM, libc::SIGINT];

/// Installs the SIGTERM and SIGINT handlers (process-wide).
pub fn install_stop_handlers() -> Result<(), SignalError> {
    for signo in STOP_SIGNALS {
        // SAFETY: `sigaction` is plain data; all-zero is a valid value (empty
        // mask, no flags) that is filled in below.
        let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
        action.sa_sigaction = on_stop_signal as extern "C" fn(libc::c_int) as usize;
        action.sa_flags = libc::SA_RESTART | libc::SA_RESETHAND;
        // SAFETY: `action.sa_mask` is a valid sigset_t owned by this frame.
        unsafe { libc::sigemptyset(&mut action.sa_mask) };
        // SAFETY: `action` is fully initialised and outlives the call; the
        // handler only does an atomic compare-exchange, which is
        // async-signal-safe; the old action is not requested (null).
        let rc = unsafe { libc::sigaction(signo, &action, std::ptr::null_mut()) };
        if rc != 0 {
            return Err(SignalError::Install {
                name: signal_name(signo),
                source: io::Error::last_os_error(),
            });
        }
    }
    Ok(())
}

/// The stop signal received since [`install_stop_handlers`], if any.
pub fn pending_stop_signal() -> Option<libc::c_int> {
    match PENDING_STOP_SIGNAL.load(Ordering::SeqCst) {
        0 => None,
        signo => Some(signo),
    }
}

/// A signal's name as the report spells it: "sigterm", "sigint", or
/// "signal" for any other.
pub fn signal_name(signo: libc::c_int) -> &'static str {
    match signo {
        libc::SIGTERM => "sigterm",
        libc::SIGINT => "sigint",
        _ => "signal",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // The process-wide slot is left alone here: a pending signal would stop
    // every other test's event loop. The integration test
    // (vmm/cli/tests/signals.rs) sends real signals to a `barge` process.

    #[test]
    fn first_recorded_signal_wins() {
        let slot = AtomicI32::new(0);
        record_signal(&slot, libc::SIGTERM);
        record_signal(&slot, libc::SIGINT);
        assert_eq!(slot.load(Ordering::SeqCst), libc::SIGTERM);
    }

    #[test]
    fn names_follow_the_report_spelling() {
        assert_eq!(signal_name(libc::SIGTERM), "sigterm");
        assert_eq!(signal_name(libc::SIGINT), "sigint");
        assert_eq!(signal_name(libc::SIGHUP), "signal");
    }

    #[test]
    fn no_signal_is_pending_without_one() {
        assert_eq!(pending_stop_signal(), None);
    }
}
