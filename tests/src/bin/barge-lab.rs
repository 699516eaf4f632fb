//! `barge-lab`: sets up and runs the nested KVM + VFIO lab barge is tested in.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use barge_tests::lab::run::{self, LabDevice, RunOptions};
use barge_tests::lab::setup::{self, SetupOptions};
use barge_tests::lab::{arm64, parse_size, LabArch, LabError, LabPaths};
use clap::{Parser, Subcommand};

/// The lab: a Linux 6.12 host (or trixie-backports' 7.x: `run --host-kernel`)
/// with KVM (AMD SVM + NPT), vfio-pci with huge pfnmap faults and an
/// emulated IOMMU, booted under QEMU full emulation in a few seconds. barge
/// runs inside it against real vfio-pci devices.
#[derive(Parser)]
#[command(name = "barge-lab", version)]
struct Cli {
    #[command(subcommand)]
    command: LabCommand,
}

#[derive(Subcommand)]
enum LabCommand {
    /// Install QEMU and SeaBIOS from bookworm-backports, busybox-static, and
    /// cache the current bookworm-backports cloud kernel with its modules,
    /// the generic kernel of the same version with e1000e, that cloud
    /// kernel's vfio modules rebuilt with iommufd from its Debian headers and
    /// source, the current trixie-backports cloud kernel as a second host
    /// kernel, and a Debian bookworm guest image (mmdebstrap from the
    /// machine's mirror, with that cloud kernel and its initrd; `run
    /// --debian`) (under $BARGE_LAB_DIR, default target/lab); then the arm64
    /// lab (`--arch arm64`: that one alone): qemu-system-arm from
    /// bookworm-backports, its cloud-arm64 kernel, busybox-static:arm64 and
    /// barge cross-built for aarch64 (under target/lab/arm64). Idempotent;
    /// offline once cached. Without apt, give the x86 files by hand.
    Setup {
        /// Set up this lab only: x86_64 or arm64 (default: both).
        #[arg(long, value_enum, value_name = "ARCH")]
        arch: Option<LabArch>,
        /// A bzImage to use instead of Debian's (needs --modules).
        #[arg(long, value_name = "BZIMAGE")]
        kernel: Option<PathBuf>,
        /// The folder holding that kernel's modules (searched recursively).
        #[arg(long, value_name = "DIR")]
        modules: Option<PathBuf>,
        /// qemu-system-x86_64 10.0 or newer to use instead of the system's.
        #[arg(long, value_name = "PATH")]
        qemu: Option<PathBuf>,
        /// A static busybox to use instead of busybox-static's.
        #[arg(long, value_name = "PATH")]
        busybox: Option<PathBuf>,
        /// The generic guest kernel's bzImage to use instead of Debian's
        /// (needs --generic-modules).
        #[arg(long, value_name = "BZIMAGE")]
        generic_kernel: Option<PathBuf>,
        /// The folder holding that kernel's modules, e1000e among them.
        #[arg(long, value_name = "DIR")]
        generic_modules: Option<PathBuf>,
        /// The second host kernel's bzImage to use instead of
        /// trixie-backports' (needs --trixie-modules); `run --host-kernel`
        /// names it by its version or as trixie-backports.
        #[arg(long, value_name = "BZIMAGE")]
        trixie_kernel: Option<PathBuf>,
        /// The folder holding that kernel's modules (searched recursively).
        #[arg(long, value_name = "DIR")]
        trixie_modules: Option<PathBuf>,
        /// Resolve and download the kernel again even when one is cached.
        #[arg(long)]
        refresh: bool,
    },
    /// Boot the lab host, bind its devices to vfio-pci, run COMMAND there
    /// (its working directory is /out; what it writes there is copied back),
    /// and exit with COMMAND's status. Example:
    /// `barge-lab run --ivshmem 8G -- 'vfio-region-info $LAB_IVSHMEM0'`
    Run {
        /// The lab host's architecture: x86_64 (q35, intel-iommu) or arm64
        /// (virt with EL2, GICv3 and SMMUv3; --ivshmem and --nvme, with
        /// barge cross-built for aarch64 when it builds).
        #[arg(long, value_enum, value_name = "ARCH", default_value = "x86_64")]
        arch: LabArch,
        /// ivshmem-plain device: SIZE[,file=PATH], a power of two from 2M to
        /// 64G. BAR2 is the file (sparse; made in the run folder unless
        /// given). Inside, its BDF is in $LAB_IVSHMEM0, $LAB_IVSHMEM1, ...
        #[arg(long, value_name = "SIZE[,file=PATH]", value_parser = LabDevice::parse_ivshmem)]
        ivshmem: Vec<LabDevice>,
        /// NVMe controller over a raw disk image ($LAB_NVME0, ...).
        #[arg(long, value_name = "IMAGE")]
        nvme: Vec<PathBuf>,
        /// An e1000e NIC ($LAB_E1000E0).
        #[arg(long)]
        e1000e: bool,
        /// The lab host's memory (default 3G; 2G with --arch arm64).
        #[arg(long, value_name = "SIZE", value_parser = parse_size)]
        mem: Option<u64>,
        /// The lab host's CPUs.
        #[arg(long, default_value_t = 2)]
        cpus: u32,
        /// Run this shell script instead of COMMAND.
        #[arg(long, value_name = "FILE", conflicts_with = "command")]
        script: Option<PathBuf>,
        /// More executables to put on the host's PATH (with their libraries).
        #[arg(long = "bin", value_name = "PATH")]
        binaries: Vec<PathBuf>,
        /// Seconds the host may take to boot and bind its devices.
        #[arg(long, default_value_t = 240)]
        boot_timeout: u64,
        /// Seconds COMMAND may run.
        #[arg(long, default_value_t = 900)]
        timeout: u64,
        /// Don't stream the host's console (it is logged all the same).
        #[arg(long)]
        quiet: bool,
        /// Boot the host without an IOMMU (devices then stay unbound).
        #[arg(long)]
        no_iommu: bool,
        /// Put the devices behind one conventional PCI bridge, so they
        /// share an IOMMU group (BDFs 0000:01:01.0, 0000:01:02.0, ...).
        #[arg(long)]
        bridge: bool,
        /// Leave this device (e.g. nvme0) with its host driver instead of
        /// binding it to vfio-pci. Repeatable.
        #[arg(long = "host-driver", value_name = "NAME")]
        host_drivers: Vec<String>,
        /// The host kernel: `6.12` (bookworm-backports, the default) or
        /// `7.3` (trixie-backports; also by its suite's name), a version's
        /// start up to a dot. The guest kernel under /lab/guest stays 6.12.
        #[arg(long, value_name = "VERSION")]
        host_kernel: Option<String>,
        /// Load the vfio modules setup rebuilt with iommufd and the device
        /// cdev instead of the stock ones: /dev/iommu and
        /// /dev/vfio/devices/vfioN appear, and the group interface stays.
        #[arg(long)]
        iommufd: bool,
        /// Give the host the Debian bookworm guest that setup built, mounted
        /// at /lab/guest/debian: rootfs.img (raw ext4, writable; its writes
        /// last for this run only), vmlinuz and initrd.img. Boot it with
        /// `root=/dev/vda rw -- COMMAND`: it prints GUEST-UP once systemd
        /// reaches multi-user, runs COMMAND, prints GUEST-EXIT and powers
        /// off.
        #[arg(long)]
        debian: bool,
        /// Make the tap barge0 with 192.168.100.1/24 in the host (a guest
        /// takes 192.168.100.2/24 by convention; $LAB_TAP, $LAB_TAP_HOST,
        /// $LAB_TAP_GUEST) and carry socat there.
        #[arg(long)]
        tap: bool,
        /// Carry the lab's QEMU into the host as qemu-system-x86_64, with its
        /// libraries and firmware: a peer VMM to compare barge with.
        #[arg(long)]
        peer_qemu: bool,
        /// The command: its words are joined with spaces and run by the lab
        /// host's shell (as ssh does), so `$LAB_IVSHMEM0`, pipes and `&&`
        /// work when quoted for the outer shell.
        #[arg(last = true, value_name = "COMMAND")]
        command: Vec<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let paths = LabPaths::from_env();
    match cli.command {
        LabCommand::Setup {
            arch,
            kernel,
            modules,
            qemu,
            busybox,
            generic_kernel,
            generic_modules,
            trixie_kernel,
            trixie_modules,
            refresh,
        } => {
            let options = SetupOptions {
                kernel,
                modules,
                qemu,
                busybox,
                generic_kernel,
                generic_modules,
                trixie_kernel,
                trixie_modules,
                refresh,
            };
            match setup::setup_labs(&paths, &options, arch) {
                Ok(_) => ExitCode::SUCCESS,
                Err(e) => fail(e),
            }
        }
        LabCommand::Run {
            arch,
            ivshmem,
            nvme,
            e1000e,
            mem,
            cpus,
            script,
            binaries,
            boot_timeout,
            timeout,
            quiet,
            no_iommu,
            bridge,
            host_drivers,
            host_kernel,
            iommufd,
            debian,
            tap,
            peer_qemu,
            command,
        } => {
            let script = match (script, command.is_empty()) {
                (Some(file), _) => match std::fs::read_to_string(&file) {
                    Ok(text) => text,
                    Err(e) => return fail(LabError::io("cannot read the script", &file, e)),
                },
                (None, false) => format!("{}\n", command.join(" ")),
                (None, true) => {
                    return fail(LabError::Usage(
                        "nothing to run: give `-- COMMAND...` or `--script FILE`".into(),
                    ))
                }
            };
            let mut devices = ivshmem;
            devices.extend(nvme.into_iter().map(|image| LabDevice::Nvme { image }));
            if e1000e {
                devices.push(LabDevice::E1000e);
            }
            let mut all_binaries = match arch {
                LabArch::X86_64 => sibling_binaries(),
                LabArch::Arm64 => arm64_barge(),
            };
            all_binaries.extend(binaries);
            let memory = mem.unwrap_or(match arch {
                LabArch::X86_64 => 3 << 30,
                LabArch::Arm64 => arm64::DEFAULT_MEMORY,
            });
            let options = RunOptions {
                devices,
                memory,
                cpus,
                script,
                binaries: all_binaries,
                boot_timeout: Duration::from_secs(boot_timeout),
                command_timeout: Duration::from_secs(timeout),
                stream_console: !quiet,
                iommu: !no_iommu,
                bridge,
                host_drivers,
                host_kernel,
                iommufd,
                debian,
                tap,
                peer_qemu,
            };
            let outcome = match arch {
                LabArch::X86_64 => run::run(&paths, &options),
                LabArch::Arm64 => arm64::run(&paths, &options),
            };
            match outcome {
                Ok(outcome) => {
                    if let Some(boot) = outcome.boot_time {
                        eprintln!("barge-lab: host ready after {:.1} s", boot.as_secs_f64());
                    }
                    eprintln!(
                        "barge-lab: status {}; results in {}; console log {}",
                        outcome.status,
                        outcome.out_dir.display(),
                        outcome.console_log.display()
                    );
                    ExitCode::from(outcome.status.clamp(0, 255) as u8)
                }
                Err(e) => {
                    let status = match e {
                        LabError::Run(ref m) if m.contains("timed out") => run::TIMEOUT_STATUS,
                        LabError::BootHung(_) => run::TIMEOUT_STATUS,
                        _ => run::LAB_FAILURE_STATUS,
                    };
                    eprintln!("barge-lab: error: {e}");
                    ExitCode::from(status as u8)
                }
            }
        }
    }
}

/// barge and the test programs built beside this binary, when they exist.
fn sibling_binaries() -> Vec<PathBuf> {
    let Some(dir) = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|p| p.to_path_buf()))
    else {
        return Vec::new();
    };
    [
        "barge",
        "vfio-region-info",
        "barge-teardown",
        "barge-fork-rig",
        "barge-pfnmap",
    ]
    .iter()
    .map(|name| dir.join(name))
    .filter(|path| {
        let found = path.is_file();
        if !found {
            eprintln!(
                "barge-lab: warning: {} is not built, so the lab host has no such \
                     command: run `cargo build --workspace` first",
                path.display()
            );
        }
        found
    })
    .collect()
}

/// barge cross-built for aarch64 in this binary's target folder
/// (`cargo build --target aarch64-unknown-linux-gnu -p barge`), when it
/// exists.
fn arm64_barge() -> Vec<PathBuf> {
    let Some(barge) = std::env::current_exe()
        .ok()
        .and_then(|exe| arm64::cross_barge(&exe))
    else {
        return Vec::new();
    };
    if barge.is_file() {
        return vec![barge];
    }
    eprintln!(
        "barge-lab: warning: the arm64 barge {} is not built, so the arm64 lab host has no \
         barge: `cargo build --target {} -p barge` (setup tries it too)",
        barge.display(),
        arm64::BARGE_TARGET
    );
    Vec::new()
}

fn fail(error: LabError) -> ExitCode {
    eprintln!("barge-lab: error: {error}");
    ExitCode::from(2)
}
