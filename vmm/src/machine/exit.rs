//! vCPU exit dispatch as a pure function over the buses.
//!
//! [`handle_exit`] takes a plain-data [`VmExit`] (translated from KVM's
//! `kvm_run` by `vcpu.rs`), routes port and MMIO accesses to the [`Buses`],
//! and returns what the vCPU loop should do next plus the bytes to hand back
//! to the guest for reads. It never panics on guest-controlled input:
//! unclaimed reads return all-ones, unclaimed writes are ignored, both logged
//! at debug level.
//!
//! Every port and MMIO access is also logged at trace level under the
//! [`TRACE_TARGET`] target, one [`AccessTrace`] line each
//! (`RUST_LOG=warn,barge::exit=trace`); the fuzz seeds are recorded this way.

use std::fmt;

use crate::buses::bus::Buses;
use crate::buses::power::{PowerEvent, PowerSignal};

/// The log target of the per-access trace.
pub const TRACE_TARGET: &str = "barge::exit";

/// One port or MMIO access as a trace line:
/// `exit <in|out|mmio-read|mmio-write> <address:#x> <length> <data>`, the
/// data being the bytes written, or returned for reads, in guest order as
/// lowercase hex without separators (`-` when empty).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AccessTrace<'a> {
    /// `in`, `out`, `mmio-read` or `mmio-write`.
    pub kind: &'static str,
    /// Port number or guest physical address.
    pub addr: u64,
    /// Bytes written or read.
    pub data: &'a [u8],
}

impl fmt::Display for AccessTrace<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "exit {} {:#x} {} ",
            self.kind,
            self.addr,
            self.data.len()
        )?;
        if self.data.is_empty() {
            return f.write_str("-");
        }
        self.data.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

/// Logs one access at trace level (nothing is formatted when that is off).
fn trace_access(kind: &'static str, addr: u64, data: &[u8]) {
    log::trace!(target: TRACE_TARGET, "{}", AccessTrace { kind, addr, data });
}

/// KVM_SYSTEM_EVENT_SHUTDOWN.
pub const SYSTEM_EVENT_SHUTDOWN: u32 = 1;
/// KVM_SYSTEM_EVENT_RESET.
pub const SYSTEM_EVENT_RESET: u32 = 2;
/// KVM_SYSTEM_EVENT_CRASH.
pub const SYSTEM_EVENT_CRASH: u32 = 3;

/// One vCPU exit, as plain data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmExit<'a> {
    /// The guest read `len` bytes from an I/O port.
    IoIn {
        /// Port number.
        port: u16,
        /// Total bytes read (element size x count for string I/O).
        len: usize,
    },
    /// The guest wrote `data` to an I/O port.
    IoOut {
        /// Port number.
        port: u16,
        /// Bytes written.
        data: &'a [u8],
    },
    /// The guest read `len` bytes at an unbacked guest physical address.
    MmioRead {
        /// Guest physical address.
        addr: u64,
        /// Access size in bytes.
        len: usize,
    },
    /// The guest wrote `data` at an unbacked guest physical address.
    MmioWrite {
        /// Guest physical address.
        addr: u64,
        /// Bytes written.
        data: &'a [u8],
    },
    /// HLT with no in-kernel LAPIC to handle it.
    Hlt,
    /// KVM_EXIT_SHUTDOWN: the guest triple-faulted.
    Shutdown,
    /// KVM_EXIT_INTERNAL_ERROR: KVM could not emulate something.
    InternalError,
    /// KVM_EXIT_FAIL_ENTRY: the hardware refused to enter the guest.
    FailEntry {
        /// hardware_entry_failure_reason.
        hardware_reason: u64,
        /// The CPU the entry failed on.
        cpu: u32,
    },
    /// KVM_EXIT_SYSTEM_EVENT (PSCI-style shutdown/reset/crash).
    SystemEvent {
        /// KVM_SYSTEM_EVENT_* type.
        kind: u32,
    },
    /// Any other exit barge does not expect.
    Unexpected {
        /// What KVM reported, for the log.
        what: String,
    },
}

/// Why a VM stopped abnormally.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FailReason {
    /// KVM_EXIT_SHUTDOWN.
    TripleFault,
    /// KVM_EXIT_INTERNAL_ERROR.
    InternalError,
    /// KVM_EXIT_FAIL_ENTRY.
    FailEntry {
        /// hardware_entry_failure_reason.
        hardware_reason: u64,
        cpu: u32,
    },
    /// KVM_SYSTEM_EVENT_CRASH.
    GuestCrash,
    /// An exit barge does not handle.
    Unexpected(String),
}

impl FailReason {
    /// Short machine-readable name used as the report's exit reason.
    pub fn name(&self) -> &'static str {
        match self {
            FailReason::TripleFault => "triple-fault",
            FailReason::InternalError => "internal-error",
            FailReason::FailEntry { .. } => "fail-entry",
            FailReason::GuestCrash => "guest-crash",
            FailReason::Unexpected(_) => "unexpected-exit",
        }
    }
}

impl fmt::Display for FailReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FailReason::TripleFault => write!(f, "guest triple fault (KVM_EXIT_SHUTDOWN)"),
            FailReason::InternalError => write!(f, "KVM internal error (KVM_EXIT_INTERNAL_ERROR)"),
            FailReason::FailEntry {
                hardware_reason,
                cpu,
            } => write!(
                f,
                "VM entry failed on host cpu {cpu} (KVM_EXIT_FAIL_ENTRY, hardware reason {hardware_reason:#x})"
            ),
            FailReason::GuestCrash => write!(f, "guest reported a crash (KVM_SYSTEM_EVENT_CRASH)"),
            FailReason::Unexpected(what) => write!(f, "unexpected vCPU exit: {what}"),
        }
    }
}

/// What the vCPU loop does after an exit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitAction {
    /// Re-enter the guest.
    Continue,
    /// The guest asked to power off.
    PowerOff,
    /// The guest asked to reboot.
    Reset,
    /// Stop the VM with an error.
    Fail(FailReason),
}

/// The result of handling one exit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExitOutcome {
    /// What to do next.
    pub action: ExitAction,
    /// For `IoIn`/`MmioRead`: the bytes the guest reads (same length as the
    /// access). Empty otherwise.
    pub read_data: Vec<u8>,
}

impl ExitOutcome {
    fn action(action: ExitAction) -> Self {
        ExitOutcome {
            action,
            read_data: Vec::new(),
        }
    }
}

/// Handles one exit: dispatches I/O to the buses, maps the rest to actions.
///
/// After a write, a power request raised by a device (ACPI sleep, i8042
/// reset) turns into `PowerOff`/`Reset` so the writing vCPU stops at once.
pub fn handle_exit(exit: &VmExit<'_>, buses: &Buses, power: &PowerSignal) -> ExitOutcome {
    match exit {
        VmExit::IoIn { port, len } => {
            let mut data = vec![0xff; *len];
            pio_read(buses, *port, &mut data);
            trace_access("in", u64::from(*port), &data);
            ExitOutcome {
                action: ExitAction::Continue,
                read_data: data,
            }
        }
        VmExit::IoOut { port, data } => {
            trace_access("out", u64::from(*port), data);
            pio_write(buses, *port, data);
            ExitOutcome::action(pending_power_action(power))
        }
        VmExit::MmioRead { addr, len } => {
            let mut data = vec![0xff; *len];
            if !buses.mmio.read(*addr, &mut data) {
                log::debug!("unclaimed MMIO read of {len} bytes at {addr:#x}");
                data.fill(0xff);
            }
            trace_access("mmio-read", *addr, &data);
            ExitOutcome {
                action: ExitAction::Continue,
                read_data: data,
            }
        }
        VmExit::MmioWrite { addr, data } => {
            trace_access("mmio-write", *addr, data);
            if !buses.mmio.write(*addr, data) {
                log::debug!("unclaimed MMIO write of {data:x?} at {addr:#x}");
            }
            ExitOutcome::action(pending_power_action(power))
        }
        // Without an in-kernel LAPIC there is nothing to wake the vCPU;
        // with one (barge's case) KVM never reports HLT. Keep running.
        VmExit::Hlt => ExitOutcome::action(ExitAction::Continue),
        VmExit::Shutdown => ExitOutcome::action(ExitAction::Fail(FailReason::TripleFault)),
        VmExit::InternalError => ExitOutcome::action(ExitAction::Fail(FailReason::InternalError)),
        VmExit::FailEntry {
            hardware_reason,
            cpu,
        } => ExitOutcome::action(ExitAction::Fail(FailReason::FailEntry {
            hardware_reason: *hardware_reason,
            cpu: *cpu,
        })),
        VmExit::SystemEvent { kind } => ExitOutcome::action(match *kind {
            SYSTEM_EVENT_SHUTDOWN => ExitAction::PowerOff,
            SYSTEM_EVENT_RESET => ExitAction::Reset,
            SYSTEM_EVENT_CRASH => ExitAction::Fail(FailReason::GuestCrash),
            other => ExitAction::Fail(FailReason::Unexpected(format!("system event {other}"))),
        }),
        VmExit::Unexpected { what } => {
            ExitOutcome::action(ExitAction::Fail(FailReason::Unexpected(what.clone())))
        }
    }
}

fn pending_power_action(power: &PowerSignal) -> ExitAction {
    match power.pending() {
        Some(PowerEvent::PowerOff) => ExitAction::PowerOff,
        Some(PowerEvent::Reset) => ExitAction::Reset,
        None => ExitAction::Continue,
    }
}

/// Whether a port access of `len` bytes is one access (byte/word/dword);
/// other lengths come from string I/O (`rep insb`/`outsb`) and are replayed
/// one byte at a time. kvm-ioctls hands over only the total length, so a
/// `rep outsw` of one element looks like an `outw`, which is what it is.
fn is_single_access(len: usize) -> bool {
    matches!(len, 1 | 2 | 4)
}

fn pio_read(buses: &Buses, port: u16, data: &mut [u8]) {
    let claimed = if is_single_access(data.len()) {
        buses.pio.read(u64::from(port), data)
    } else {
        let mut all = true;
        for byte in data.iter_mut() {
            let mut one = [0xffu8];
            all &= buses.pio.read(u64::from(port), &mut one);
            *byte = one[0];
        }
        all
    };
    if !claimed {
        log::debug!("unclaimed port read of {} bytes at {port:#x}", data.len());
        data.fill(0xff);
    }
}

fn pio_write(buses: &Buses, port: u16, data: &[u8]) {
    let claimed = if is_single_access(data.len()) {
        buses.pio.write(u64::from(port), data)
    } else {
        data.iter()
            .all(|byte| buses.pio.write(u64::from(port), std::slice::from_ref(byte)))
    };
    if !claimed {
        log::debug!("unclaimed port write of {data:x?} at {port:#x}");
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;
    use crate::buses::bus::BusDevice;

    /// A scratch register file: reads return what was written.
    struct Scratch {
        bytes: [u8; 8],
    }

    impl BusDevice for Scratch {
        fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
            for (i, b) in data.iter_mut().enumerate() {
                *b = self.bytes.get(offset as usize + i).copied().unwrap_or(0xee);
            }
        }
        fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
            for (i, b) in data.iter().enumerate() {
                if let Some(slot) = self.bytes.get_mut(offset as usize + i) {
                    *slot = *b;
                }
            }
        }
    }

    /// Raises a power request when written, like the ACPI sleep register.
    struct PowerButton {
        signal: PowerSignal,
    }

    impl BusDevice for PowerButton {
        fn read(&mut self, _base: u64, _offset: u64, data: &mut [u8]) {
            data.fill(0);
        }
        fn write(&mut self, _base: u64, _offset: u64, data: &[u8]) {
            match data.first() {
                Some(1) => self.signal.raise(PowerEvent::PowerOff),
                Some(2) => self.signal.raise(PowerEvent::Reset),
                _ => {}
            }
        }
    }

    fn buses_with_scratch() -> Buses {
        let mut buses = Buses::default();
        buses
            .pio
            .insert(
                0x70,
                8,
                "scratch",
                Arc::new(Mutex::new(Scratch { bytes: [0; 8] })),
            )
            .unwrap();
        buses
            .mmio
            .insert(
                0xfee0_0000,
                8,
                "scratch",
                Arc::new(Mutex::new(Scratch { bytes: [0; 8] })),
            )
            .unwrap();
        buses
    }

    #[test]
    fn port_write_then_read_round_trips() {
        let buses = buses_with_scratch();
        let power = PowerSignal::new().unwrap();
        let out = handle_exit(
            &VmExit::IoOut {
                port: 0x71,
                data: &[0x12, 0x34],
            },
            &buses,
            &power,
        );
        assert_eq!(out.action, ExitAction::Continue);
        assert!(out.read_data.is_empty());
        let out = handle_exit(&VmExit::IoIn { port: 0x71, len: 2 }, &buses, &power);
        assert_eq!(out.action, ExitAction::Continue);
        assert_eq!(out.read_data, vec![0x12, 0x34]);
    }

    #[test]
    fn unclaimed_port_read_is_all_ones_and_write_is_ignored() {
        let buses = buses_with_scratch();
        let power = PowerSignal::new().unwrap();
        for len in [1, 2, 4] {
            let out = handle_exit(&VmExit::IoIn { port: 0x80, len }, &buses, &power);
            assert_eq!(out.read_data, vec![0xff; len]);
            assert_eq!(out.action, ExitAction::Continue);
        }
        let out = handle_exit(
            &VmExit::IoOut {
                port: 0x80,
                data: &[0],
            },
            &buses,
            &power,
        );
        assert_eq!(out.action, ExitAction::Continue);
    }

    #[test]
    fn unclaimed_mmio_read_is_all_ones() {
        let buses = buses_with_scratch();
        let power = PowerSignal::new().unwrap();
        let out = handle_exit(
            &VmExit::MmioRead {
                addr: 0xd000_0000,
                len: 8,
            },
            &buses,
            &power,
        );
        assert_eq!(out.read_data, vec![0xff; 8]);
        let out = handle_exit(
            &VmExit::MmioWrite {
                addr: 0xd000_0000,
                data: &[1, 2, 3, 4],
            },
            &buses,
            &power,
        );
        assert_eq!(out.action, ExitAction::Continue);
    }

    #[test]
    fn mmio_write_then_read_round_trips() {
        let buses = buses_with_scratch();
        let power = PowerSignal::new().unwrap();
        handle_exit(
            &VmExit::MmioWrite {
                addr: 0xfee0_0004,
                data: &[9, 8, 7, 6],
            },
            &buses,
            &power,
        );
        let out = handle_exit(
            &VmExit::MmioRead {
                addr: 0xfee0_0004,
                len: 4,
            },
            &buses,
            &power,
        );
        assert_eq!(out.read_data, vec![9, 8, 7, 6]);
    }

    #[test]
    fn string_io_is_replayed_byte_by_byte() {
        let buses = buses_with_scratch();
        let power = PowerSignal::new().unwrap();
        // rep outsb of 3 bytes to one port: the last byte wins.
        handle_exit(
            &VmExit::IoOut {
                port: 0x70,
                data: &[1, 2, 3],
            },
            &buses,
            &power,
        );
        let out = handle_exit(&VmExit::IoIn { port: 0x70, len: 3 }, &buses, &power);
        assert_eq!(out.read_data, vec![3, 3, 3]);
    }

    #[test]
    fn zero_length_and_odd_accesses_do_not_panic() {
        let buses = buses_with_scratch();
        let power = PowerSignal::new().unwrap();
        let out = handle_exit(&VmExit::IoIn { port: 0x77, len: 0 }, &buses, &power);
        assert!(out.read_data.is_empty());
        // Reads past the scratch device's bytes are the device's business.
        let out = handle_exit(
            &VmExit::MmioRead {
                addr: 0xfee0_0007,
                len: 8,
            },
            &buses,
            &power,
        );
        assert_eq!(out.read_data.len(), 8);
        handle_exit(
            &VmExit::IoOut {
                port: 0xffff,
                data: &[],
            },
            &buses,
            &power,
        );
    }

    #[test]
    fn device_power_request_stops_the_writing_vcpu() {
        let mut buses = Buses::default();
        let power = PowerSignal::new().unwrap();
        buses
            .pio
            .insert(
                0x600,
                1,
                "button",
                Arc::new(Mutex::new(PowerButton {
                    signal: power.clone(),
                })),
            )
            .unwrap();
        let out = handle_exit(
            &VmExit::IoOut {
                port: 0x600,
                data: &[0],
            },
            &buses,
            &power,
        );
        assert_eq!(out.action, ExitAction::Continue);
        let out = handle_exit(
            &VmExit::IoOut {
                port: 0x600,
                data: &[1],
            },
            &buses,
            &power,
        );
        assert_eq!(out.action, ExitAction::PowerOff);

        let power = PowerSignal::new().unwrap();
        let mut buses = Buses::default();
        buses
            .mmio
            .insert(
                0x1000,
                1,
                "button",
                Arc::new(Mutex::new(PowerButton {
                    signal: power.clone(),
                })),
            )
            .unwrap();
        let out = handle_exit(
            &VmExit::MmioWrite {
                addr: 0x1000,
                data: &[2],
            },
            &buses,
            &power,
        );
        assert_eq!(out.action, ExitAction::Reset);
    }

    #[test]
    fn fatal_exits_fail_with_their_reason() {
        let buses = Buses::default();
        let power = PowerSignal::new().unwrap();
        let cases = [
            (VmExit::Shutdown, FailReason::TripleFault),
            (VmExit::InternalError, FailReason::InternalError),
            (
                VmExit::FailEntry {
                    hardware_reason: 0x21,
                    cpu: 3,
                },
                FailReason::FailEntry {
                    hardware_reason: 0x21,
                    cpu: 3,
                },
            ),
            (
                VmExit::SystemEvent {
                    kind: SYSTEM_EVENT_CRASH,
                },
                FailReason::GuestCrash,
            ),
            (
                VmExit::Unexpected {
                    what: "KVM_EXIT_DEBUG".into(),
                },
                FailReason::Unexpected("KVM_EXIT_DEBUG".into()),
            ),
        ];
        for (exit, reason) in cases {
            let out = handle_exit(&exit, &buses, &power);
            assert_eq!(out.action, ExitAction::Fail(reason));
        }
        assert_eq!(FailReason::TripleFault.name(), "triple-fault");
        assert!(FailReason::FailEntry {
            hardware_reason: 0x21,
            cpu: 3
        }
        .to_string()
        .contains("0x21"));
    }

    #[test]
    fn access_trace_is_one_parseable_line() {
        let line = AccessTrace {
            kind: "out",
            addr: 0xcf8,
            data: &[0x10, 0x08, 0x00, 0x80],
        }
        .to_string();
        assert_eq!(line, "exit out 0xcf8 4 10080080");
        let line = AccessTrace {
            kind: "mmio-read",
            addr: 0xe000_8000,
            data: &[0xff, 0x0a],
        }
        .to_string();
        assert_eq!(line, "exit mmio-read 0xe0008000 2 ff0a");
        let line = AccessTrace {
            kind: "in",
            addr: 0x3f8,
            data: &[],
        }
        .to_string();
        assert_eq!(line, "exit in 0x3f8 0 -");
    }

    #[test]
    fn system_events_map_to_power_actions() {
        let buses = Buses::default();
        let power = PowerSignal::new().unwrap();
        let shutdown = VmExit::SystemEvent {
            kind: SYSTEM_EVENT_SHUTDOWN,
        };
        assert_eq!(
            handle_exit(&shutdown, &buses, &power).action,
            ExitAction::PowerOff
        );
        let reset = VmExit::SystemEvent {
            kind: SYSTEM_EVENT_RESET,
        };
        assert_eq!(
            handle_exit(&reset, &buses, &power).action,
            ExitAction::Reset
        );
        let odd = VmExit::SystemEvent { kind: 99 };
        assert!(matches!(
            handle_exit(&odd, &buses, &power).action,
            ExitAction::Fail(FailReason::Unexpected(_))
        ));
        assert_eq!(
            handle_exit(&VmExit::Hlt, &buses, &power).action,
            ExitAction::Continue
        );
    }
}
