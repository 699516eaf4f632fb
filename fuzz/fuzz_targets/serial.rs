//! COM1: `vmm::buses::serial::SerialDevice` (vm-superio's 16550A) as the guest
//! reaches it through the port bus (`vmm::buses::bus::BusDevice` at 0x3F8) and as
//! the host console feeds it (`enqueue_input`).
//!
//! Selector 0-7: register access at `offset % 8`, any width; 8-11: the
//! same with the raw 32-bit offset (out of range included); 12-13: host
//! input, a write's data bytes enqueued, a read enqueues `offset % 80`
//! bytes (enough to fill the 64-byte FIFO and overflow it); 14: drain the
//! interrupt EventFd; 15: the output sink starts (write) or stops (read)
//! failing, as a closed stdout or a full disk would.
//!
//! Checks: what is not a one-byte access to registers 0..8 reads as all
//! ones and changes neither the receive FIFO nor the output; only one-byte
//! writes at offset 0 (THR) reach the output, at most one byte each;
//! `enqueue_input` never takes more than the input or the free FIFO space.
//! (`BusDevice::read` fills the caller's slice, so a read always has the
//! requested length; its content is what is checked.)
#![no_main]

use std::io::{self, Write};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use arch::layout::COM1_PORT;
use barge_fuzz::accesses;
use libfuzzer_sys::fuzz_target;
use vmm::buses::bus::BusDevice;
use vmm::buses::serial::{IrqFdTrigger, SerialDevice};

/// Counts the bytes that reach the console; fails on demand.
#[derive(Clone, Default)]
struct Console {
    bytes: Arc<AtomicUsize>,
    broken: Arc<AtomicBool>,
}

impl Write for Console {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.broken.load(Ordering::Relaxed) {
            return Err(io::Error::new(io::ErrorKind::BrokenPipe, "console closed"));
        }
        self.bytes.fetch_add(buf.len(), Ordering::Relaxed);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fuzz_target!(|input: &[u8]| {
    let trigger = IrqFdTrigger::new().expect("eventfd");
    let irq = trigger.try_clone().expect("eventfd clone");
    let console = Console::default();
    let mut serial = SerialDevice::new(trigger, Box::new(console.clone()));
    let base = u64::from(COM1_PORT);
    for access in accesses(input) {
        let output_before = console.bytes.load(Ordering::Relaxed);
        let capacity_before = serial.input_capacity();
        match access.selector {
            0..=11 => {
                let offset = if access.selector < 8 {
                    u64::from(access.offset % 8)
                } else {
                    u64::from(access.offset)
                };
                let register = offset < 8 && access.width == 1;
                let thr_write = register && offset == 0 && access.write.is_some();
                match access.write {
                    None => {
                        let mut data = vec![0; access.width];
                        serial.read(base, offset, &mut data);
                        if !register {
                            assert!(
                                data.iter().all(|b| *b == 0xff),
                                "{}-byte read at {offset:#x} gave {data:x?}",
                                access.width
                            );
                        }
                    }
                    Some(data) => serial.write(base, offset, &data),
                }
                let output = console.bytes.load(Ordering::Relaxed) - output_before;
                if thr_write {
                    assert!(output <= 1, "one THR write put out {output} bytes");
                } else {
                    assert_eq!(output, 0, "output from a non-THR access at {offset:#x}");
                }
                if !register {
                    assert_eq!(serial.input_capacity(), capacity_before);
                }
            }
            12 | 13 => {
                let bytes = match access.write {
                    Some(data) => data,
                    None => vec![b'x'; (access.offset % 80) as usize],
                };
                let taken = serial.enqueue_input(&bytes);
                assert!(taken <= bytes.len() && taken <= capacity_before);
                assert_eq!(serial.input_capacity(), capacity_before - taken);
            }
            14 => {
                let _ = irq.event_fd().read();
            }
            _ => console
                .broken
                .store(access.write.is_some(), Ordering::Relaxed),
        }
    }
});
