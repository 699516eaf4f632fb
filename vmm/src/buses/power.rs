//! Guest power requests: the signal vCPUs and the event loop read, and the
//! bus adapters that put the power devices (ACPI sleep control, i8042 reset)
//! on the port I/O bus.

use std::io;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;

use devices::acpi::AcpiSleepControl;
use devices::i8042::I8042;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::buses::bus::BusDevice;

pub use devices::PowerEvent;

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
    pub fn raise(&self, request: PowerEvent) {
        let value = match request {
            PowerEvent::PowerOff => POWER_OFF,
            PowerEvent::Reset => RESET,
        };
        let _ = self
            .inner
            .state
            .compare_exchange(NONE, value, Ordering::SeqCst, Ordering::SeqCst);
        if let Err(e) = self.inner.event.write(1) {
            devices::guest_warn!("cannot signal the power request to the event loop: {e}");
        }
    }

    /// The pending request, if any (does not clear it).
    pub fn pending(&self) -> Option<PowerEvent> {
        match self.inner.state.load(Ordering::SeqCst) {
            POWER_OFF => Some(PowerEvent::PowerOff),
            RESET => Some(PowerEvent::Reset),
            _ => None,
        }
    }

    /// The EventFd written on every request.
    pub fn event_fd(&self) -> &EventFd {
        &self.inner.event
    }
}

/// The ACPI sleep control/status/reset register on the port I/O bus.
#[derive(Debug)]
pub struct AcpiSleepBusDevice {
    model: AcpiSleepControl,
    signal: PowerSignal,
}

impl AcpiSleepBusDevice {
    /// Wraps a fresh register that raises its events on `signal`.
    pub fn new(signal: PowerSignal) -> Self {
        AcpiSleepBusDevice {
            model: AcpiSleepControl::new(),
            signal,
        }
    }
}

impl BusDevice for AcpiSleepBusDevice {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        self.model.read(offset, data);
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        if let Some(event) = self.model.write(offset, data) {
            devices::guest_info!("guest requested {event:?} through the ACPI sleep/reset register");
            self.signal.raise(event);
        }
    }
}

/// The i8042 controller (only its CPU reset line matters) on the port I/O
/// bus.
#[derive(Debug)]
pub struct I8042BusDevice {
    model: I8042,
    signal: PowerSignal,
}

impl I8042BusDevice {
    /// Wraps a fresh controller that raises its events on `signal`.
    pub fn new(signal: PowerSignal) -> Self {
        I8042BusDevice {
            model: I8042::new(),
            signal,
        }
    }
}

impl BusDevice for I8042BusDevice {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        self.model.read(offset, data);
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        if let Some(event) = self.model.write(offset, data) {
            devices::guest_info!("guest requested {event:?} through the i8042 controller");
            self.signal.raise(event);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acpi_s5_write_raises_power_off() {
        let signal = PowerSignal::new().unwrap();
        let mut dev = AcpiSleepBusDevice::new(signal.clone());
        dev.write(0x600, 0, &[0x80]);
        assert_eq!(signal.pending(), None);
        dev.write(0x600, 0, &[devices::acpi::s5_write_value()]);
        assert_eq!(signal.pending(), Some(PowerEvent::PowerOff));
    }

    #[test]
    fn i8042_pulse_reset_raises_reset() {
        let signal = PowerSignal::new().unwrap();
        let mut dev = I8042BusDevice::new(signal.clone());
        dev.write(
            0x60,
            devices::i8042::COMMAND_OFFSET,
            &[devices::i8042::CMD_PULSE_RESET],
        );
        assert_eq!(signal.pending(), Some(PowerEvent::Reset));
    }

    #[test]
    fn first_request_wins_and_wakes_the_eventfd() {
        let signal = PowerSignal::new().unwrap();
        assert_eq!(signal.pending(), None);
        let clone = signal.clone();
        clone.raise(PowerEvent::Reset);
        signal.raise(PowerEvent::PowerOff);
        assert_eq!(signal.pending(), Some(PowerEvent::Reset));
        assert_eq!(signal.event_fd().read().unwrap(), 2);
    }
}
