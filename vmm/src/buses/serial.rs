//! COM1: vm-superio's 8250/16550A model on the port I/O bus.
//!
//! Output goes to any `Write` sink (the console module's stdout/file/buffer
//! sinks). The interrupt is an EventFd the builder registers as a KVM irqfd
//! on GSI 4, so raising it needs no vCPU exit. Input arrives from the event
//! loop (`event_loop.rs`) through [`SerialDevice::enqueue_input`].

use std::io::{self, Write};

use vm_superio::serial::NoEvents;
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::buses::bus::BusDevice;

/// The serial interrupt line: an EventFd registered as an irqfd.
#[derive(Debug)]
pub struct IrqFdTrigger(EventFd);

impl IrqFdTrigger {
    /// A fresh non-blocking EventFd.
    pub fn new() -> io::Result<Self> {
        Ok(IrqFdTrigger(EventFd::new(EFD_NONBLOCK)?))
    }

    /// The EventFd, for KVM_IRQFD.
    pub fn event_fd(&self) -> &EventFd {
        &self.0
    }

    /// Another handle on the same EventFd.
    pub fn try_clone(&self) -> io::Result<Self> {
        Ok(IrqFdTrigger(self.0.try_clone()?))
    }
}

impl Trigger for IrqFdTrigger {
    type E = io::Error;

    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// Where the guest's serial output goes.
pub type SerialOutput = Box<dyn Write + Send>;

/// COM1 as a bus device.
pub struct SerialDevice {
    serial: Serial<IrqFdTrigger, NoEvents, SerialOutput>,
}

impl std::fmt::Debug for SerialDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SerialDevice").finish_non_exhaustive()
    }
}

impl SerialDevice {
    /// A UART that raises `interrupt` and writes to `output`.
    pub fn new(interrupt: IrqFdTrigger, output: SerialOutput) -> Self {
        SerialDevice {
            serial: Serial::new(interrupt, output),
        }
    }

    /// Queues host input for the guest. Returns how many bytes fit in the
    /// receive FIFO (the rest is dropped: the guest is not reading).
    pub fn enqueue_input(&mut self, input: &[u8]) -> usize {
        if input.is_empty() || self.serial.fifo_capacity() == 0 {
            return 0;
        }
        match self.serial.enqueue_raw_bytes(input) {
            Ok(n) => n,
            Err(e) => {
                log::debug!("serial input dropped: {e:?}");
                0
            }
        }
    }

    /// Free space in the receive FIFO.
    pub fn input_capacity(&self) -> usize {
        self.serial.fifo_capacity()
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        // The UART has 8 byte-wide registers; anything else reads as 0xff.
        match (u8::try_from(offset), data) {
            (Ok(offset), [byte]) if offset < 8 => *byte = self.serial.read(offset),
            (_, data) => data.fill(0xff),
        }
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        if let (Ok(offset), [value]) = (u8::try_from(offset), data) {
            if offset < 8 {
                if let Err(e) = self.serial.write(offset, *value) {
                    // Output errors (closed stdout, full disk) must not stop
                    // the guest.
                    log::debug!("serial write: {e:?}");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    /// A cloneable in-memory sink.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl Write for Captured {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    const THR: u64 = 0;
    const IER: u64 = 1;
    const LSR: u64 = 5;

    fn serial() -> (SerialDevice, Captured, EventFd) {
        let trigger = IrqFdTrigger::new().unwrap();
        let irq = trigger.event_fd().try_clone().unwrap();
        let out = Captured::default();
        (SerialDevice::new(trigger, Box::new(out.clone())), out, irq)
    }

    #[test]
    fn bytes_written_to_thr_reach_the_sink() {
        let (mut dev, out, _irq) = serial();
        let mut lsr = [0u8];
        dev.read(0x3f8, LSR, &mut lsr);
        assert_ne!(lsr[0] & 0x20, 0, "transmitter holding register empty");
        for b in b"hi\n" {
            dev.write(0x3f8, THR, &[*b]);
        }
        assert_eq!(&*out.0.lock().unwrap(), b"hi\n");
    }

    #[test]
    fn input_raises_the_interrupt_when_enabled() {
        let (mut dev, _out, irq) = serial();
        dev.write(0x3f8, IER, &[0x01]); // received-data interrupt
        assert_eq!(dev.enqueue_input(b"ab"), 2);
        assert!(irq.read().unwrap() >= 1);
        let mut byte = [0u8];
        dev.read(0x3f8, THR, &mut byte);
        assert_eq!(byte[0], b'a');
    }

    #[test]
    fn odd_widths_and_offsets_are_harmless() {
        let (mut dev, out, _irq) = serial();
        let mut wide = [0u8; 4];
        dev.read(0x3f8, 0, &mut wide);
        assert_eq!(wide, [0xff; 4]);
        dev.write(0x3f8, 0, &[1, 2]);
        dev.write(0x3f8, 99, &[1]);
        let mut far = [0u8];
        dev.read(0x3f8, 1 << 40, &mut far);
        assert_eq!(far[0], 0xff);
        assert!(out.0.lock().unwrap().is_empty());
    }

    #[test]
    fn full_fifo_drops_input_without_error() {
        let (mut dev, _out, _irq) = serial();
        let cap = dev.input_capacity();
        assert_eq!(dev.enqueue_input(&vec![b'x'; cap + 10]), cap);
        assert_eq!(dev.enqueue_input(b"y"), 0);
    }
}
