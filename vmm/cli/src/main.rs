//! `barge`: parse the command line, run the VM, exit with its status.
//!
//! Every error is one line on stderr, `barge: error: ...`, and a non-zero
//! status (see `vmm::status`); the report (`--report`) is written by the
//! run itself.

use std::process::ExitCode;

use clap::error::ErrorKind;
mod args;
// On aarch64 the bench only says it cannot run there.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
mod bench;
mod host_check;
mod plan;

use crate::args::{self as cli, Command};

fn main() -> ExitCode {
    vmm::mark_process_start();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(
        // vfio-ioctls warns for every optional IRQ index a device lacks
        // (ERR, REQ); that is normal for most devices.
        "warn,vfio_ioctls=error",
    ))
    .format_target(false)
    .init();

    let command = match cli::parse_args(std::env::args_os()) {
        Ok(command) => command,
        Err(e) if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) => {
            // --help/--version: clap prints to stdout and exits 0.
            e.exit()
        }
        Err(e) => return fail(&clap_message(&e), vmm::status::USAGE),
    };
    match command {
        Command::Run { config, verbose } => {
            // SIGTERM/SIGINT stop the VM like a timeout; the report is
            // still written and the status is 128 + the signal's number.
            if let Err(e) = vmm::signals::install_stop_handlers() {
                return fail(&e.to_string(), vmm::status::ERROR);
            }
            run(config, verbose)
        }
        Command::Bench(request) => match bench::run(&request) {
            Ok(text) => {
                print!("{text}");
                ExitCode::SUCCESS
            }
            Err(e) => fail(&e.to_string(), vmm::status::ERROR),
        },
        Command::HostCheck(request) => match host_check::run(&request) {
            Ok((text, status)) => {
                print!("{text}");
                status_code(status)
            }
            Err(e) => fail(&e.to_string(), vmm::status::ERROR),
        },
        Command::Plan(request) => match plan::run(&request, std::path::Path::new("/sys")) {
            Ok(text) => {
                print!("{text}");
                ExitCode::SUCCESS
            }
            Err(e) => fail(&e.to_string(), vmm::status::ERROR),
        },
    }
}

/// clap's first line without its "error: " prefix (the rest is usage help).
fn clap_message(e: &clap::Error) -> String {
    let rendered = e.to_string();
    let first = rendered
        .lines()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("invalid command line");
    first.strip_prefix("error: ").unwrap_or(first).to_string()
}

/// Runs the VM and turns its outcome into barge's exit status; `verbose`
/// prints the boot phases.
fn run(config: vmm::config::VmConfig, verbose: bool) -> ExitCode {
    match vmm::Vm::new(config).run() {
        Ok(outcome) => {
            let status = outcome.exit.status;
            if verbose {
                match (
                    outcome.report.phases_ms,
                    outcome.report.start_to_first_run_ms,
                ) {
                    (Some(phases), Some(total)) => {
                        eprintln!("barge: {}", phases.summary_line(total))
                    }
                    _ => eprintln!("barge: boot phases: no vCPU ran"),
                }
            }
            match status {
                // The event loop's one warning already named the device
                // the host asked for back.
                vmm::status::POWEROFF | vmm::status::DEVICE_RELEASE_REQUEST => {}
                vmm::status::REBOOT => eprintln!(
                    "barge: the guest rebooted (status {status}; --on-reboot restart boots it again)"
                ),
                _ if status > vmm::status::SIGNAL_BASE => eprintln!(
                    "barge: the VM was stopped by {} (status {status})",
                    outcome.exit.reason.to_uppercase()
                ),
                _ => eprintln!(
                    "barge: error: the VM stopped: {} (status {status}); see the log above",
                    outcome.exit.reason
                ),
            }
            status_code(status)
        }
        Err(e) => fail(&e.to_string(), vmm::status::ERROR),
    }
}

fn fail(message: &str, status: i32) -> ExitCode {
    let one_line = message.replace('\n', "; ");
    eprintln!("barge: error: {one_line}");
    status_code(status)
}

fn status_code(status: i32) -> ExitCode {
    ExitCode::from(u8::try_from(status).unwrap_or(1))
}
