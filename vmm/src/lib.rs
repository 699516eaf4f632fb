//! barge's VMM as a library: the builder, vCPU threads, exit dispatch, the
//! event loop, the report, and the embedding API test rigs use. The `barge`
//! command line is a program on top of it (the `barge` crate in `vmm/cli`).
//!
//! # Embedding
//!
//! ```no_run
//! use std::sync::{Arc, Mutex};
//! use std::time::Duration;
//!
//! let mut config = vmm::config::VmConfig::new("/path/to/vmlinux");
//! config.cpus = 1;
//! let console = Arc::new(Mutex::new(Vec::new()));
//! let outcome = vmm::Vm::new(config)
//!     .console_buffer(console.clone())
//!     .run_with_timeout(Duration::from_secs(30))
//!     .expect("the VM was built");
//! assert_eq!(outcome.exit.status, vmm::status::POWEROFF);
//! println!("{}", String::from_utf8_lossy(&console.lock().unwrap()));
//! println!("{}", outcome.report.to_json_string());
//! ```
//!
//! # Exit statuses
//!
//! See [`status`]: 0 poweroff, 1 barge error, 2 usage error, 3 guest reboot
//! with `on_reboot=stop`, 4 guest failure (triple fault, KVM internal error,
//! failed entry, crash), 5 timeout, 6 the host asked for a passed-through
//! device back (VFIO device request), 128 + the signal's number when SIGTERM
//! (143) or SIGINT (130) stopped `barge` (see [`signals`]), 159 when a
//! thread made a system call its seccomp filter forbids (see [`seccomp`]).
//!
//! # seccomp
//!
//! [`Vm::run`] confines the vCPU threads and the calling thread with
//! seccomp filters unless `config.seccomp` is [`seccomp::SeccompMode::Off`].
//! Filters stay with a thread for its life: run the VM on a thread of its
//! own if the calling thread must later do what the VMM filter forbids
//! (start processes, open sockets).
//!
//! # Timing
//!
//! `start_to_first_run_ms` and `wall_ms` count from the process start: the
//! instant `barge`'s `main` called [`mark_process_start`] (its first
//! statement, so exec and dynamic loading, well under a millisecond, are not
//! counted). An embedder that never calls it gets timings from the start of
//! each `Vm::run*` call instead, so several VMs in one test process each get
//! their own.

pub mod builder;
pub mod buses;
pub mod config;
pub mod event_loop;
pub mod host_check;
pub mod loader;
pub mod machine;
pub mod pci_devices;
pub mod platform;
pub mod progress;
pub mod report;
pub mod seccomp;
pub mod signals;

use std::io::{self, Write};
use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use crate::builder::phases::{BootPhase, PhaseClock};
use crate::builder::{boot_and_run, BuildError};
use crate::buses::console::{ConsoleOutput, RawModeGuard};
use crate::config::{OnReboot, SerialConfig, VmConfig};
use crate::machine::vcpu::StopCause;
use crate::machine::vm::SerialInput;
use crate::report::{ExitReport, PhasesReport, Report};

/// The error type of the embedding API: everything that prevents a VM from
/// being built or run. A guest that crashes is not an error: it is a
/// [`RunOutcome`] with a non-zero status.
pub type Error = BuildError;

/// barge's exit statuses.
pub mod status {
    /// The guest powered off.
    pub const POWEROFF: i32 = 0;
    /// barge could not build or run the VM (bad input, KVM errors).
    pub const ERROR: i32 = 1;
    /// The command line is malformed (as clap reports it).
    pub const USAGE: i32 = 2;
    /// The guest rebooted and `on_reboot` is `stop`.
    pub const REBOOT: i32 = 3;
    /// The guest failed: triple fault, KVM internal error, failed VM entry,
    /// guest crash event or an exit barge does not handle.
    pub const GUEST_FAILURE: i32 = 4;
    /// The embedder's timeout expired.
    pub const TIMEOUT: i32 = 5;
    /// The host asked for a passed-through device back (VFIO's device
    /// request, as when the device is unbound from vfio-pci while the guest
    /// runs): the guest was stopped and the device released (report reason
    /// `device_release_request`).
    pub const DEVICE_RELEASE_REQUEST: i32 = 6;
    /// Added to a signal's number when SIGTERM or SIGINT stopped the VM, as
    /// shells do: 143 for SIGTERM, 130 for SIGINT.
    pub const SIGNAL_BASE: i32 = 128;
    /// A thread made a system call its seccomp filter forbids (128 +
    /// SIGSYS); no report is written. See [`crate::seccomp`].
    pub const SECCOMP: i32 = SIGNAL_BASE + libc::SIGSYS;
}

static PROCESS_START: OnceLock<Instant> = OnceLock::new();

/// Records "now" as the process start, if nothing was recorded yet. `barge`
/// calls it first thing in `main`.
pub fn mark_process_start() {
    PROCESS_START.get_or_init(Instant::now);
}

/// The process start recorded by [`mark_process_start`], if any.
pub fn process_start() -> Option<Instant> {
    PROCESS_START.get().copied()
}

/// How a run ended, and the report.
#[derive(Debug, Clone, PartialEq)]
pub struct RunOutcome {
    /// Reason and exit status (also in `report.exit`).
    pub exit: ExitReport,
    /// The full report (what `--report` writes).
    pub report: Report,
}

/// Where the console goes, as the embedder chose.
enum Console {
    /// As `config.serial` says (stdout with stdin input, a file, nothing).
    FromConfig,
    /// A sink the embedder gave.
    Custom(ConsoleOutput),
}

/// A VM to run: a configuration plus where its console goes.
pub struct Vm {
    config: VmConfig,
    console: Console,
}

impl std::fmt::Debug for Vm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vm")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// Serial output shared by every boot of one [`Vm`] (a restart reuses it).
struct SharedConsole(Arc<Mutex<ConsoleOutput>>);

impl Write for SharedConsole {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).write(data)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).flush()
    }
}

impl Vm {
    /// A VM from `config`, its console as `config.serial` says.
    pub fn new(config: VmConfig) -> Self {
        Vm {
            config,
            console: Console::FromConfig,
        }
    }

    /// Sends the guest's console output to `sink` instead (no input).
    pub fn console(mut self, sink: ConsoleOutput) -> Self {
        self.console = Console::Custom(sink);
        self
    }

    /// Appends the guest's console output to `buffer` (no input).
    pub fn console_buffer(self, buffer: Arc<Mutex<Vec<u8>>>) -> Self {
        self.console(ConsoleOutput::buffer(buffer))
    }

    /// Hands the guest's console output to `callback` as it comes (no input).
    pub fn console_callback(self, callback: impl FnMut(&[u8]) + Send + 'static) -> Self {
        self.console(ConsoleOutput::callback(callback))
    }

    /// The configuration.
    pub fn config(&self) -> &VmConfig {
        &self.config
    }

    /// Runs until the guest powers off (or reboots with `on_reboot=stop`,
    /// or fails). Writes the report if `config.report` is set.
    pub fn run(self) -> Result<RunOutcome, Error> {
        self.run_until(None)
    }

    /// Like [`Vm::run`], but stops the VM after `timeout` (status
    /// [`status::TIMEOUT`], reason "timeout").
    pub fn run_with_timeout(self, timeout: Duration) -> Result<RunOutcome, Error> {
        self.run_until(Some(Instant::now() + timeout))
    }

    fn run_until(self, deadline: Option<Instant>) -> Result<RunOutcome, Error> {
        // Files this run may create (serial log, --shmem path=): the ones
        // missing now are removed again if the VM cannot be built, so a
        // failed start leaves nothing behind.
        let new_files = NewFiles::missing_now(&self.config);
        let result = self.run_inner(deadline);
        if result.is_err() {
            new_files.remove();
        }
        result
    }

    fn run_inner(self, deadline: Option<Instant>) -> Result<RunOutcome, Error> {
        let start = process_start().unwrap_or_else(Instant::now);
        let (sink, input) = match self.console {
            Console::Custom(sink) => (sink, SerialInput::None),
            Console::FromConfig => {
                let sink = ConsoleOutput::from_config(&self.config.serial)?;
                let input = match self.config.serial {
                    SerialConfig::Stdio => SerialInput::Stdin,
                    _ => SerialInput::None,
                };
                (sink, input)
            }
        };
        // Raw mode only while the guest owns the terminal; restored on drop.
        let _raw_mode = match input {
            SerialInput::Stdin => RawModeGuard::stdin_if_terminal()?,
            SerialInput::None => None,
        };
        let console = Arc::new(Mutex::new(sink));
        let mut first_run = None;
        let mut phases = None;
        let outcome = loop {
            let mut boot = boot_and_run(
                &self.config,
                Box::new(SharedConsole(console.clone())),
                input,
                deadline,
            )?;
            if first_run.is_none() {
                if let Some(at) = boot.run.first_run {
                    phases = Some(boot_phases(&boot.phases, start, at));
                }
            }
            first_run = first_run.or(boot.run.first_run);
            if boot_again(&mut boot.run, self.config.on_reboot) {
                log::info!("guest rebooted; booting again (on_reboot=restart)");
                continue;
            }
            break boot;
        };
        let report = Report {
            exit: exit_report(&outcome.run.cause),
            wall_ms: millis(start.elapsed()),
            start_to_first_run_ms: first_run.map(|t| millis(t.saturating_duration_since(start))),
            phases_ms: phases,
            memory: outcome.memory,
            kvm_stats: outcome.run.kvm_stats,
            devices: outcome.devices,
            dma: outcome.dma,
        };
        if let Some(path) = &self.config.report {
            report.write_to(path)?;
        }
        Ok(RunOutcome {
            exit: report.exit.clone(),
            report,
        })
    }
}

/// The phases of a boot that first ran a vCPU at `first_run`: the time
/// from the process start (`start`) to the boot sequence is the start-up,
/// the time from the vCPU threads' start to `first_run` the vCPU start.
fn boot_phases(clock: &PhaseClock, start: Instant, first_run: Instant) -> PhasesReport {
    let mut clock = clock.clone();
    clock.end_at(BootPhase::VcpuStart, first_run);
    clock.add(
        BootPhase::Startup,
        clock.started().saturating_duration_since(start),
    );
    clock.report()
}

/// Whether to boot again after `run`: the guest reset, `on_reboot` is
/// `restart` and every vCPU stopped. A vCPU that did not stop still holds
/// the last boot's VM and devices (see [`machine::vm::BuiltVm::run`]), so
/// that run ends instead, as a barge error.
fn boot_again(run: &mut machine::vm::VmRun, on_reboot: OnReboot) -> bool {
    if run.cause != StopCause::Reset || on_reboot != OnReboot::Restart {
        return false;
    }
    if !run.vcpus_stopped {
        run.cause = StopCause::Error(
            "the guest rebooted, but a vCPU of the last boot did not stop; not booting again \
             (on_reboot=restart)"
                .into(),
        );
        return false;
    }
    true
}

/// Paths of files a run may create that did not exist before it.
#[derive(Debug)]
struct NewFiles(Vec<std::path::PathBuf>);

impl NewFiles {
    /// The serial output file and `--shmem path=` files that do not exist
    /// yet.
    fn missing_now(config: &VmConfig) -> Self {
        let serial = match &config.serial {
            SerialConfig::File(path) => Some(path.clone()),
            _ => None,
        };
        let shmem = config.devices.iter().filter_map(|device| match device {
            crate::config::devices::DeviceConfig::Shmem(shmem) => shmem.path.clone(),
            _ => None,
        });
        NewFiles(
            serial
                .into_iter()
                .chain(shmem)
                .filter(|path| std::fs::symlink_metadata(path).is_err())
                .collect(),
        )
    }

    /// Removes the ones the failed run created.
    fn remove(self) {
        for path in self.0 {
            match std::fs::remove_file(&path) {
                Ok(()) => log::debug!("removed {} (the VM did not start)", path.display()),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => log::warn!("cannot remove {}: {e}", path.display()),
            }
        }
    }
}

/// Writes `report` to `path` (for callers that build reports themselves).
pub fn write_report(report: &Report, path: &Path) -> Result<(), Error> {
    Ok(report.write_to(path)?)
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// The report's exit section for a stop cause.
pub fn exit_report(cause: &StopCause) -> ExitReport {
    let (reason, status) = match cause {
        StopCause::PowerOff => ("poweroff".to_string(), status::POWEROFF),
        StopCause::Reset => ("reboot".to_string(), status::REBOOT),
        StopCause::Failed { reason, .. } => (reason.name().to_string(), status::GUEST_FAILURE),
        StopCause::Timeout => ("timeout".to_string(), status::TIMEOUT),
        StopCause::DeviceReleaseRequest { .. } => (
            "device_release_request".to_string(),
            status::DEVICE_RELEASE_REQUEST,
        ),
        StopCause::Signal(signo) => (
            crate::signals::signal_name(*signo).to_string(),
            status::SIGNAL_BASE + signo,
        ),
        StopCause::Error(message) => {
            log::error!("{message}");
            ("error".to_string(), status::ERROR)
        }
    };
    ExitReport { reason, status }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::machine::exit::FailReason;

    #[test]
    fn stop_causes_map_to_documented_statuses() {
        let cases = [
            (StopCause::PowerOff, "poweroff", 0),
            (StopCause::Reset, "reboot", 3),
            (
                StopCause::Failed {
                    vcpu: 0,
                    reason: FailReason::TripleFault,
                },
                "triple-fault",
                4,
            ),
            (StopCause::Timeout, "timeout", 5),
            (
                StopCause::DeviceReleaseRequest {
                    bdf: "0000:41:00.0".into(),
                },
                "device_release_request",
                6,
            ),
            (StopCause::Signal(libc::SIGTERM), "sigterm", 143),
            (StopCause::Signal(libc::SIGINT), "sigint", 130),
            (StopCause::Error("x".into()), "error", 1),
        ];
        for (cause, reason, status) in cases {
            let exit = exit_report(&cause);
            assert_eq!(exit.reason, reason);
            assert_eq!(exit.status, status);
        }
    }

    fn run_ended_by(cause: StopCause, vcpus_stopped: bool) -> machine::vm::VmRun {
        machine::vm::VmRun {
            cause,
            first_run: None,
            kvm_stats: Default::default(),
            vcpus_stopped,
            memslot_updates: Default::default(),
            stage2: None,
        }
    }

    #[test]
    fn a_reboot_boots_again_only_when_every_vcpu_stopped() {
        let mut run = run_ended_by(StopCause::Reset, true);
        assert!(boot_again(&mut run, OnReboot::Restart));
        assert!(!boot_again(&mut run, OnReboot::Stop));
        assert_eq!(run.cause, StopCause::Reset);
        let mut run = run_ended_by(StopCause::PowerOff, true);
        assert!(!boot_again(&mut run, OnReboot::Restart));
        assert_eq!(run.cause, StopCause::PowerOff);

        let mut stuck = run_ended_by(StopCause::Reset, false);
        assert!(!boot_again(&mut stuck, OnReboot::Restart));
        assert_eq!(exit_report(&stuck.cause).status, status::ERROR);
        // Without a restart to refuse, the cause (and status) stays the guest's.
        let mut stuck = run_ended_by(StopCause::PowerOff, false);
        assert!(!boot_again(&mut stuck, OnReboot::Restart));
        assert_eq!(stuck.cause, StopCause::PowerOff);
    }

    #[test]
    fn a_failed_start_removes_only_the_files_it_created() {
        let dir = std::env::temp_dir().join(format!("barge-newfiles-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let existing = dir.join("existing-shm");
        std::fs::write(&existing, b"keep").unwrap();
        let console = dir.join("console.log");
        let shm = dir.join("shm");
        let mut config = VmConfig::new("/unused");
        config.serial = SerialConfig::File(console.clone());
        for path in [&existing, &shm] {
            let text = format!("size=2M,path={}", path.display());
            config
                .devices
                .push(crate::config::devices::DeviceConfig::Shmem(
                    text.parse().unwrap(),
                ));
        }
        let new_files = NewFiles::missing_now(&config);
        assert_eq!(new_files.0, vec![console.clone(), shm.clone()]);
        std::fs::write(&console, b"").unwrap();
        std::fs::write(&shm, b"").unwrap();
        new_files.remove();
        assert!(!console.exists() && !shm.exists());
        assert_eq!(std::fs::read(&existing).unwrap(), b"keep");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn process_start_is_recorded_once() {
        mark_process_start();
        let first = process_start();
        assert!(first.is_some());
        mark_process_start();
        assert_eq!(first, process_start());
    }
}
