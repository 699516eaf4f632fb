//! Guest power requests: the signal vCPUs and the event loop read, and the
//! bus adapters that put the power devices (ACPI sleep control, i8042 reset)
//! on the port I/O bus.

use std::io;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// What the guest asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PowerRequest {
    /// ACPI S5 (the guest's `poweroff`).
    PowerOff,
    /// Reboot (i8042 CPU reset, ACPI reset register, KVM reset event).
    Reset,
}

const NONE: u8 = 0;
const POWER_OFF: u8 = 1;
const RESET: u8 = 2;

#[derive(Debug)]
struct PowerSignalInner {
    state: AtomicU8,
    event: EventFd,
}

/// A one-shot, shareable "the guest wants to power off/reset" flag with an
/// EventFd the event loop can wait on. The first request wins.
#[derive(Debug, Clone)]
pub struct PowerSignal {
    inner: Arc<PowerSignalInner>,
}

impl PowerSignal {
    /// A signal with nothing pending.
    pub fn new() -> io::Result<Self> {
        Ok(PowerSignal {
            inner: Arc::new(PowerSignalInner {
                state: AtomicU8::new(NONE),
                event: EventFd::new(EFD_NONBLOCK)?,
            }),
        })
    }

    /// Records `request` unless one is already pending, and wakes the event
    /// loop.
    pub fn raise(&self, request: PowerRequest) {
        let value = match request {
            PowerRequest::PowerOff => POWER_OFF,
            PowerRequest::Reset => RESET,
        };
        let _ = self
            .inner
            .state
            .compare_exchange(NONE, value, Ordering::SeqCst, Ordering::SeqCst);
        if let Err(e) = self.inner.event.write(1) {
            log::warn!("cannot signal the power request to the event loop: {e}");
        }
    }

    /// The pending request, if any (does not clear it).
    pub fn pending(&self) -> Option<PowerRequest> {
        match self.inner.state.load(Ordering::SeqCst) {
            POWER_OFF => Some(PowerRequest::PowerOff),
            RESET => Some(PowerRequest::Reset),
            _ => None,
        }
    }

    /// The EventFd written on every request.
    pub fn event_fd(&self) -> &EventFd {
        &self.inner.event
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_request_wins_and_wakes_the_eventfd() {
        let signal = PowerSignal::new().unwrap();
        assert_eq!(signal.pending(), None);
        let clone = signal.clone();
        clone.raise(PowerRequest::Reset);
        signal.raise(PowerRequest::PowerOff);
        assert_eq!(signal.pending(), Some(PowerRequest::Reset));
        assert_eq!(signal.event_fd().read().unwrap(), 2);
    }
}
