//! The `barge` command line.
//!
//! Every option value is parsed into its typed form while clap parses the
//! command line (the `--memory` and `--serial` syntaxes live in
//! [`vmm::config`]), so a malformed value is a clap usage error naming the
//! option. `--config FILE` loads a JSON [`VmConfig`] first; flags given on
//! the command line then override its fields.

use std::ffi::OsString;
use std::path::PathBuf;

use clap::error::ErrorKind;
use clap::{Args, CommandFactory, Parser, Subcommand};
use vmm::config::{
    parse_cpus, DeviceConfig, DiskConfig, MemoryConfig, NetConfig, OnReboot, SeccompMode,
    SerialConfig, ShmemConfig, VfioBackendKind, VfioConfig, VmConfig,
};

use crate::plan::PlanRequest;

const ABOUT: &str =
    "barge: a small KVM virtual machine monitor that maps PCI BARs with the largest pages";

const LONG_ABOUT: &str = "\
barge: a small KVM virtual machine monitor.

barge boots a Linux guest under KVM and reports, in JSON, how its memory got
mapped. Its purpose is passing through PCI devices with huge BARs so that
every layer maps them with the largest pages; for now it boots a guest.";

const RUN_ABOUT: &str = "Boot a Linux guest and run it until it powers off";

const RUN_LONG_ABOUT: &str = "\
Boot a Linux guest and run it until it powers off.

The guest's console is COM1 (ttyS0), connected to barge's stdin and stdout by
default. `poweroff` in the guest ends barge with status 0.

Examples:
  barge run --kernel bzImage --initramfs initramfs.cpio.gz
  barge run --kernel bzImage --cpus 2 --memory size=1G,hugepages=2M --report report.json
  barge run --config vm.json --serial file=console.log

A --config file is JSON with the same settings; flags override it:
  {\"kernel\": \"bzImage\", \"cpus\": 2, \"memory\": {\"size\": \"1G\", \"hugepages\": \"2M\"}}";

#[derive(Debug, Parser)]
#[command(name = "barge", version, about = ABOUT, long_about = LONG_ABOUT)]
#[command(
    propagate_version = true,
    subcommand_required = true,
    arg_required_else_help = true
)]
struct Cli {
    #[command(subcommand)]
    command: CliCommand,
}

// New subcommands (`bench`) go here and in [`Command`].
#[derive(Debug, Subcommand)]
enum CliCommand {
    #[command(about = RUN_ABOUT, long_about = RUN_LONG_ABOUT)]
    Run(RunArgs),
    #[command(about = PLAN_ABOUT, long_about = PLAN_LONG_ABOUT)]
    Plan(PlanArgs),
    #[command(about = BENCH_ABOUT, long_about = BENCH_LONG_ABOUT)]
    Bench(BenchArgs),
    #[command(about = HOST_CHECK_ABOUT, long_about = HOST_CHECK_LONG_ABOUT)]
    HostCheck(HostCheckCliArgs),
}

const HOST_CHECK_ABOUT: &str =
    "Check what this host gives barge (KVM, huge pfnmap, IOMMU, devices)";

const HOST_CHECK_LONG_ABOUT: &str = "\
Check what this host gives barge, in the manner of virt-host-validate.

Each check prints one line: PASS, WARN or FAIL, its name, what was found and,
when it is not PASS, what to do. Checks: KVM (/dev/kvm, KVM_PRE_FAULT_MEMORY,
the stats fd), huge pfnmap (kernel 6.12+, its config, vfio-pci's huge fault
handler), the IOMMU (groups, interrupt remapping, iommufd or the legacy
container), huge page pools and transparent huge pages, and per --device its
driver, IOMMU group, BARs (host address, size, the largest page its alignment
allows), resizable BAR and memory decode. --exercise also maps each device's
BARs into a scratch VM, pre-faults them and reports the pages KVM got.
Exit status: 0 when nothing FAILs, 1 when a check FAILs, 2 for a usage error.

Examples:
  barge host-check
  barge host-check --device vfio=0000:41:00.0 --exercise
  barge host-check --device vfio=0000:41:00.0 --json";

/// The flags of `barge host-check`.
#[derive(Debug, Clone, Default, PartialEq, Args)]
pub struct HostCheckCliArgs {
    /// A host PCI device to check for passthrough (repeatable),
    /// e.g. --device vfio=0000:41:00.0
    #[arg(long = "device", value_name = "vfio=BDF", value_parser = parse_vfio)]
    pub devices: Vec<VfioConfig>,

    /// Print a JSON array, one {"check", "status", "detail", "fix"} per check
    #[arg(long)]
    pub json: bool,

    /// Also open each device with barge's VFIO path, map its BARs into a
    /// scratch VM, pre-fault them and report the pages KVM got
    #[arg(long)]
    pub exercise: bool,
}

impl HostCheckCliArgs {
    /// The typed request.
    pub fn into_request(self) -> crate::host_check::HostCheckArgs {
        crate::host_check::HostCheckArgs {
            devices: self.devices.into_iter().map(|d| d.bdf).collect(),
            json: self.json,
            exercise: self.exercise,
        }
    }
}

const BENCH_ABOUT: &str = "Measure a BAR mapped with 4 KiB, 2 MiB and 1 GiB pages";

const BENCH_LONG_ABOUT: &str = "\
Measure a BAR mapped with 4 KiB, 2 MiB and 1 GiB pages.

For each mode (bar-align 4k, 2m, 1g, auto) barge runs two VMs with a built-in
guest (no kernel needed) that maps the BAR with 1 GiB guest pages: one where
barge pre-faults the BAR (pre-fault time, KVM page counts) and one where the
guest touches it first (first-touch sweep, warm sequential read and write
bandwidth, random 8-byte read latency). vfio-pci's host faults are counted by
order with a kprobe where tracefs is writable. The guest WRITES ZEROS over the
window at the BAR's start. Prints a table (or --json), the 4k/1g ratios, and
writes an SVG chart with --svg.

Examples:
  barge bench --device vfio=0000:41:00.0 --bar 1
  barge bench --shmem size=1G,hugepages=1G --reps 5 --svg bench.svg
  barge bench --device vfio=0000:00:03.0 --bar 2 --modes 4k,1g --json";

/// The flags of `barge bench`.
#[derive(Debug, Clone, PartialEq, Args)]
#[command(group(clap::ArgGroup::new("target").required(true).args(["device", "shmem"])))]
pub struct BenchArgs {
    /// The host PCI device (bound to vfio-pci), e.g. --device vfio=0000:41:00.0
    #[arg(long, value_name = "vfio=BDF", value_parser = parse_vfio)]
    pub device: Option<VfioConfig>,

    /// A shared memory device instead (the RAM-backed control; its BAR 2),
    /// e.g. --shmem size=1G,hugepages=1G
    #[arg(long, value_name = "size=SIZE[,path=FILE][,hugepages=2M|1G]", value_parser = parse_shmem)]
    pub shmem: Option<ShmemConfig>,

    /// The BAR to measure, e.g. --bar 1
    #[arg(long, value_name = "N", default_value_t = crate::bench::SHMEM_MEMORY_BAR)]
    pub bar: u8,

    /// Modes, comma-separated, in the first repetition's order,
    /// e.g. --modes 4k,1g
    #[arg(
        long,
        value_name = "4k,2m,1g,auto",
        value_delimiter = ',',
        default_value = "4k,2m,1g,auto"
    )]
    pub modes: Vec<crate::bench::BenchMode>,

    /// Repetitions of every mode (the order alternates), e.g. --reps 5
    #[arg(long, value_name = "N", default_value_t = crate::bench::defaults::REPS,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub reps: u32,

    /// Bytes of the sequential read/write window at the BAR's start
    /// (clamped to the BAR) [default: 64M], e.g. --window 256M
    #[arg(long, value_name = "SIZE", value_parser = vmm::config::parse_size)]
    pub window: Option<u64>,

    /// Passes over the window, e.g. --passes 8
    #[arg(long, value_name = "N", default_value_t = crate::bench::defaults::PASSES,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub passes: u32,

    /// Dependent random 8-byte reads over the whole BAR, e.g. --random-reads 100000
    #[arg(long, value_name = "N", default_value_t = crate::bench::defaults::RANDOM_READS,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub random_reads: u64,

    /// Seconds each VM may run, e.g. --timeout 600
    #[arg(long, value_name = "SECONDS", default_value_t = crate::bench::defaults::TIMEOUT_SECS)]
    pub timeout: u64,

    /// Print the results as JSON instead of the table
    #[arg(long)]
    pub json: bool,

    /// Write an SVG chart here, e.g. --svg bench.svg
    #[arg(long, value_name = "PATH")]
    pub svg: Option<PathBuf>,

    /// Also write the JSON here (with the table on stdout),
    /// e.g. --json-file bench.json
    #[arg(long, value_name = "PATH")]
    pub json_file: Option<PathBuf>,
}

impl BenchArgs {
    /// The typed request; fails without a device (clap's group already
    /// requires one).
    pub fn into_request(self) -> Result<crate::bench::BenchRequest, clap::Error> {
        use crate::bench::{BenchDevice, BenchRequest};
        let device = match (self.device, self.shmem) {
            (Some(vfio), _) => BenchDevice::Vfio(vfio),
            (None, Some(shmem)) => BenchDevice::Shmem(shmem),
            (None, None) => {
                return Err(Cli::command().error(
                    ErrorKind::MissingRequiredArgument,
                    "barge bench needs --device vfio=BDF or --shmem size=SIZE",
                ))
            }
        };
        let mut modes = Vec::new();
        for mode in self.modes {
            if !modes.contains(&mode) {
                modes.push(mode);
            }
        }
        Ok(BenchRequest {
            device,
            bar: self.bar,
            modes,
            reps: self.reps,
            window: self.window.unwrap_or(crate::bench::defaults::WINDOW),
            passes: self.passes,
            random_reads: self.random_reads,
            timeout: std::time::Duration::from_secs(self.timeout),
            json: self.json,
            svg: self.svg,
            json_file: self.json_file,
        })
    }
}

const PLAN_ABOUT: &str = "Show where barge would place PCI BARs, without KVM or devices";

const PLAN_LONG_ABOUT: &str = "\
Show where barge would place PCI BARs, without KVM or devices.

For each BAR: its guest physical address (naturally aligned), the host
virtual address alignment barge maps it at, the mmap-able areas and the
largest page each can get. Host devices are read from sysfs; shared memory
uses the same --shmem syntax as barge run; a spec file describes any device.

Examples:
  barge plan --device vfio=0000:41:00.0
  barge plan --spec h100.json --phys-bits 46 --json
  barge plan --shmem size=8G,hugepages=1G --memory size=4G

A spec file: {\"devices\":[{\"name\":\"h100\",\"bars\":[{\"index\":1,\"size\":\"128G\",\"bits\":64,\"prefetchable\":true}]}]}";

/// The flags of `barge plan`.
#[derive(Debug, Clone, Default, PartialEq, Args)]
pub struct PlanArgs {
    /// A host PCI device whose BARs to place (repeatable), read from sysfs,
    /// e.g. --device vfio=0000:41:00.0,bar-align=2m
    #[arg(long = "device", value_name = "vfio=BDF[,bar-align=auto|4k|2m|1g]", value_parser = parse_vfio)]
    pub devices: Vec<VfioConfig>,

    /// A shared memory device (repeatable), as for barge run,
    /// e.g. --shmem size=8G
    #[arg(long = "shmem", value_name = "size=SIZE[,..]", value_parser = parse_shmem)]
    pub shmem: Vec<ShmemConfig>,

    /// Devices described in JSON, e.g. --spec h100.json
    #[arg(long, value_name = "FILE.json")]
    pub spec: Option<PathBuf>,

    /// Guest RAM (only the size matters) [default: size=512M],
    /// e.g. --memory size=64G
    #[arg(long, value_name = "size=SIZE", value_parser = parse_memory)]
    pub memory: Option<MemoryConfig>,

    /// Physical address bits of the host the plan is for, 32 to 52
    /// [default: this host's], e.g. --phys-bits 46
    #[arg(long, value_name = "N")]
    pub phys_bits: Option<u8>,

    /// Print the plan as JSON instead of a table
    #[arg(long)]
    pub json: bool,
}

impl PlanArgs {
    /// The typed request.
    pub fn into_request(self) -> PlanRequest {
        PlanRequest {
            vfio: self.devices,
            shmem: self.shmem,
            spec: self.spec,
            memory_size: self
                .memory
                .map_or(vmm::config::DEFAULT_MEMORY_SIZE, |m| m.size),
            phys_bits: self.phys_bits,
            json: self.json,
        }
    }
}

/// The flags of `barge run`, each already typed; `None` when not given.
#[derive(Debug, Clone, Default, PartialEq, Args)]
pub struct RunArgs {
    /// Kernel to boot: a bzImage or an ELF vmlinux, e.g. --kernel /boot/vmlinuz
    #[arg(long, value_name = "PATH")]
    pub kernel: Option<PathBuf>,

    /// Initial ramdisk (cpio, optionally compressed), e.g. --initramfs initramfs.cpio.gz
    #[arg(long, value_name = "PATH")]
    pub initramfs: Option<PathBuf>,

    /// Kernel command line [default: "console=ttyS0 reboot=k panic=1"],
    /// e.g. --cmdline "console=ttyS0 quiet"
    #[arg(long, value_name = "STRING", allow_hyphen_values = true)]
    pub cmdline: Option<String>,

    /// Number of vCPUs, 1 to 255 [default: 1], e.g. --cpus 2
    #[arg(long, value_name = "N", value_parser = parse_cpus)]
    pub cpus: Option<u8>,

    /// Guest RAM and its backing [default: size=512M]. Keys: size (K/M/G
    /// suffixes), hugepages=2M|1G (hugetlbfs pages, reserved beforehand),
    /// shared=on (memfd, mapped shared), prefault=on (every page populated
    /// before the guest runs, on all CPUs), e.g. --memory size=1G,hugepages=2M
    #[arg(long, value_name = "size=SIZE[,hugepages=2M|1G][,shared=on][,prefault=on]", value_parser = parse_memory)]
    pub memory: Option<MemoryConfig>,

    /// Where the guest console's output goes [default: stdio]: stdio,
    /// file=PATH (appended; no input) or none, e.g. --serial file=console.log
    #[arg(long, value_name = "stdio|file=PATH|none", value_parser = parse_serial)]
    pub serial: Option<SerialConfig>,

    /// What a guest reboot does [default: stop]: stop ends barge with the
    /// reboot's status, restart boots again, e.g. --on-reboot restart
    #[arg(long, value_name = "stop|restart", value_parser = parse_on_reboot)]
    pub on_reboot: Option<OnReboot>,

    /// Write a JSON report (exit, timings, memory mapping, KVM counters)
    /// here at exit, e.g. --report report.json
    #[arg(long, value_name = "PATH")]
    pub report: Option<PathBuf>,

    /// Pass a host PCI device through with VFIO (repeatable). bar-align caps
    /// the BAR alignment to force smaller pages on purpose [default: auto];
    /// p2p maps the BARs into the IOMMU for peer-to-peer DMA [default:
    /// auto]: on (an error if refused), off, auto (a warning if refused) or
    /// background (mapped on a thread while the guest boots; the report says
    /// when), e.g. --device vfio=0000:41:00.0,bar-align=2m,p2p=background
    #[arg(long = "device", value_name = "vfio=BDF[,bar-align=auto|4k|2m|1g][,p2p=..]", value_parser = parse_vfio)]
    pub devices: Vec<VfioConfig>,

    /// Add an ivshmem-compatible shared memory device (repeatable): BAR2 is
    /// SIZE bytes (a power of two) of a memfd, of FILE with path=, or of
    /// hugetlbfs pages with hugepages=, e.g. --shmem size=8G,hugepages=1G
    #[arg(long = "shmem", value_name = "size=SIZE[,path=FILE][,hugepages=2M|1G][,bar-align=..]", value_parser = parse_shmem)]
    pub shmem: Vec<ShmemConfig>,

    /// Add a virtio-blk disk over a raw image (repeatable; the guest sees
    /// them as /dev/vda, /dev/vdb, ... in this order). readonly=on gives the
    /// guest a read-only disk; serial= is what the guest reads as its ID (at
    /// most 20 characters). A writable image is locked against a second
    /// barge, e.g. --disk path=rootfs.img --disk path=data.img,readonly=on
    #[arg(long = "disk", value_name = "path=IMAGE[,readonly=on][,serial=ID]", value_parser = parse_disk)]
    pub disks: Vec<DiskConfig>,

    /// Add a virtio-net card on an existing tap interface (repeatable; the
    /// tap must exist: ip tuntap add dev NAME mode tap). mac= sets the
    /// guest's MAC address [default: a random locally administered one],
    /// e.g. --net tap=tap0,mac=52:54:00:12:34:56
    #[arg(long = "net", value_name = "tap=NAME[,mac=MAC]", value_parser = parse_net)]
    pub nets: Vec<NetConfig>,

    /// VFIO interface for every --device [default: auto]: legacy
    /// (container/group), iommufd (device cdev) or auto (iommufd where the
    /// kernel has it), e.g. --vfio-backend legacy
    #[arg(long, value_name = "legacy|iommufd|auto", value_parser = parse_vfio_backend)]
    pub vfio_backend: Option<VfioBackendKind>,

    /// seccomp filters for barge's threads [default: on]: on (a forbidden
    /// system call ends barge with status 159), log (the kernel logs it and
    /// lets it through) or off, e.g. --seccomp off
    #[arg(long, value_name = "on|off|log", value_parser = parse_seccomp)]
    pub seccomp: Option<SeccompMode>,

    /// Load settings from a JSON file first; flags given override them,
    /// e.g. --config vm.json
    #[arg(long, value_name = "PATH")]
    pub config: Option<PathBuf>,

    /// Print where the time to the guest's first instruction went (the
    /// report's phases_ms) as one line on stderr when the run ends
    #[arg(long)]
    pub verbose: bool,
}

fn parse_seccomp(text: &str) -> Result<SeccompMode, vmm::seccomp::SeccompError> {
    text.parse()
}

fn parse_vfio(text: &str) -> Result<VfioConfig, vmm::config::DeviceConfigError> {
    text.parse()
}

fn parse_shmem(text: &str) -> Result<ShmemConfig, vmm::config::DeviceConfigError> {
    text.parse()
}

fn parse_disk(text: &str) -> Result<DiskConfig, vmm::config::DiskConfigError> {
    text.parse()
}

fn parse_net(text: &str) -> Result<NetConfig, vmm::config::NetConfigError> {
    text.parse()
}

fn parse_vfio_backend(text: &str) -> Result<VfioBackendKind, vmm::config::DeviceConfigError> {
    Ok(text.parse()?)
}

fn parse_memory(text: &str) -> Result<MemoryConfig, vmm::config::MemoryConfigError> {
    text.parse()
}

fn parse_serial(text: &str) -> Result<SerialConfig, vmm::config::ConfigError> {
    text.parse()
}

fn parse_on_reboot(text: &str) -> Result<OnReboot, vmm::config::ConfigError> {
    text.parse()
}

/// A parsed `barge` command line.
#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    /// `barge run`: the complete VM configuration (not yet validated; see
    /// [`VmConfig::validate`]), and `--verbose`.
    Run { config: VmConfig, verbose: bool },
    /// `barge plan`.
    Plan(PlanRequest),
    /// `barge bench`.
    Bench(crate::bench::BenchRequest),
    /// `barge host-check`.
    HostCheck(crate::host_check::HostCheckArgs),
}

impl RunArgs {
    /// Builds the VM configuration: the `--config` file (if any) with every
    /// flag given laid over it. Fails when no kernel is named anywhere or
    /// the file cannot be loaded.
    pub fn into_config(self) -> Result<VmConfig, clap::Error> {
        let mut config = match &self.config {
            Some(path) => VmConfig::from_json_file(path).map_err(|e| {
                Cli::command().error(ErrorKind::InvalidValue, format!("--config: {e}"))
            })?,
            None => {
                let Some(kernel) = &self.kernel else {
                    return Err(Cli::command().error(
                        ErrorKind::MissingRequiredArgument,
                        "barge run needs a kernel: give --kernel PATH (or --config FILE naming one)",
                    ));
                };
                VmConfig::new(kernel)
            }
        };
        let RunArgs {
            kernel,
            initramfs,
            cmdline,
            cpus,
            memory,
            serial,
            on_reboot,
            report,
            devices,
            shmem,
            disks,
            nets,
            vfio_backend,
            seccomp,
            config: _,
            verbose: _,
        } = self;
        if let Some(kernel) = kernel {
            config.kernel = kernel;
        }
        if initramfs.is_some() {
            config.initramfs = initramfs;
        }
        if let Some(cmdline) = cmdline {
            config.cmdline = cmdline;
        }
        if let Some(cpus) = cpus {
            config.cpus = cpus;
        }
        if let Some(memory) = memory {
            config.memory = memory;
        }
        if let Some(serial) = serial {
            config.serial = serial;
        }
        if let Some(on_reboot) = on_reboot {
            config.on_reboot = on_reboot;
        }
        if let Some(seccomp) = seccomp {
            config.seccomp = seccomp;
        }
        if report.is_some() {
            config.report = report;
        }
        // Devices given as flags come after the file's: VFIO devices, then
        // shared memory, then disks, then network cards, each in command-line order.
        config
            .devices
            .extend(devices.into_iter().map(DeviceConfig::Vfio));
        config
            .devices
            .extend(shmem.into_iter().map(DeviceConfig::Shmem));
        config
            .devices
            .extend(disks.into_iter().map(DeviceConfig::Disk));
        config
            .devices
            .extend(nets.into_iter().map(DeviceConfig::Net));
        if let Some(backend) = vfio_backend {
            config.vfio_backend = backend;
        }
        Ok(config)
    }
}

/// Parses `barge`'s arguments (the first is the program name, as in
/// `std::env::args_os()`). `--help` and `--version` come back as errors of
/// kind `DisplayHelp`/`DisplayVersion`; `error.exit()` prints them (or the
/// usage error) and exits with the right status.
pub fn parse_args<I, T>(args: I) -> Result<Command, clap::Error>
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let cli = Cli::try_parse_from(args)?;
    match cli.command {
        CliCommand::Run(run) => {
            let verbose = run.verbose;
            Ok(Command::Run {
                config: run.into_config()?,
                verbose,
            })
        }
        CliCommand::Plan(plan) => Ok(Command::Plan(plan.into_request())),
        CliCommand::Bench(bench) => Ok(Command::Bench(bench.into_request()?)),
        CliCommand::HostCheck(check) => Ok(Command::HostCheck(check.into_request())),
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use vmm::config::{HugePageSize, DEFAULT_CMDLINE};

    use super::*;

    /// The full `barge --help` text.
    fn help_text() -> String {
        Cli::command().render_long_help().to_string()
    }

    /// The full `barge run --help` text.
    fn run_help_text() -> String {
        let mut command = Cli::command();
        command.build();
        command
            .find_subcommand_mut("run")
            .map(|run| run.render_long_help().to_string())
            .unwrap_or_default()
    }

    fn run(args: &[&str]) -> Result<VmConfig, clap::Error> {
        let mut full = vec!["barge", "run"];
        full.extend_from_slice(args);
        match parse_args(full)? {
            Command::Run { config, .. } => Ok(config),
            _ => panic!("barge run parsed as another command"),
        }
    }

    fn run_err(args: &[&str]) -> String {
        run(args).expect_err("should fail").to_string()
    }

    #[test]
    fn kernel_alone_gets_defaults() {
        let config = run(&["--kernel", "/k"]).unwrap();
        assert_eq!(config, VmConfig::new("/k"));
        assert_eq!(config.cmdline, DEFAULT_CMDLINE);
    }

    #[test]
    fn every_option_is_parsed() {
        let config = run(&[
            "--kernel",
            "/boot/bzImage",
            "--initramfs",
            "/boot/initrd",
            "--cmdline",
            "console=ttyS0 quiet",
            "--cpus",
            "4",
            "--memory",
            "size=2G,hugepages=1G,shared=on",
            "--serial",
            "file=/tmp/console.log",
            "--on-reboot",
            "restart",
            "--report",
            "/tmp/report.json",
        ])
        .unwrap();
        assert_eq!(config.kernel, Path::new("/boot/bzImage"));
        assert_eq!(config.initramfs.as_deref(), Some(Path::new("/boot/initrd")));
        assert_eq!(config.cmdline, "console=ttyS0 quiet");
        assert_eq!(config.cpus, 4);
        assert_eq!(config.memory.size, 2 << 30);
        assert_eq!(config.memory.hugepages, Some(HugePageSize::Size1G));
        assert!(config.memory.shared);
        assert_eq!(config.serial, SerialConfig::File("/tmp/console.log".into()));
        assert_eq!(config.on_reboot, OnReboot::Restart);
        assert_eq!(
            config.report.as_deref(),
            Some(Path::new("/tmp/report.json"))
        );
    }

    #[test]
    fn equals_form_and_serial_none_work() {
        let config = run(&["--kernel=/k", "--serial=none", "--memory=size=64M"]).unwrap();
        assert_eq!(config.serial, SerialConfig::Disabled);
        assert_eq!(config.memory.size, 64 << 20);
    }

    #[test]
    fn cmdline_may_start_with_a_hyphen() {
        let config = run(&["--kernel", "/k", "--cmdline", "-v console=ttyS0"]).unwrap();
        assert_eq!(config.cmdline, "-v console=ttyS0");
    }

    #[test]
    fn config_file_is_loaded_and_flags_override_it() {
        let dir = std::env::temp_dir().join(format!("barge-cli-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("vm.json");
        std::fs::write(
            &path,
            r#"{"kernel": "/from-file", "cpus": 2, "cmdline": "file-cmdline",
                "memory": {"size": "1G"}, "report": "/file-report.json"}"#,
        )
        .unwrap();
        let path = path.to_str().unwrap();

        let config = run(&["--config", path]).unwrap();
        assert_eq!(config.kernel, Path::new("/from-file"));
        assert_eq!(config.cpus, 2);
        assert_eq!(config.memory.size, 1 << 30);

        let config = run(&[
            "--config",
            path,
            "--kernel",
            "/flag",
            "--cpus",
            "3",
            "--memory",
            "size=256M",
        ])
        .unwrap();
        assert_eq!(config.kernel, Path::new("/flag"));
        assert_eq!(config.cpus, 3);
        assert_eq!(config.memory.size, 256 << 20);
        assert_eq!(config.cmdline, "file-cmdline", "not given as a flag: kept");
        assert_eq!(
            config.report.as_deref(),
            Some(Path::new("/file-report.json"))
        );
    }

    #[test]
    fn bad_config_file_is_a_clear_error() {
        let err = run_err(&["--config", "/no/such/vm.json"]);
        assert!(
            err.contains("cannot read the configuration file /no/such/vm.json"),
            "{err}"
        );
    }

    #[test]
    fn missing_kernel_says_what_to_give() {
        let err = run_err(&["--cpus", "2"]);
        assert!(err.contains("give --kernel PATH"), "{err}");
    }

    #[test]
    fn cpus_out_of_range_are_refused() {
        let err = run_err(&["--kernel", "/k", "--cpus", "0"]);
        assert!(err.contains("--cpus"), "{err}");
        assert!(err.contains("cpus must be at least 1"), "{err}");
        let err = run_err(&["--kernel", "/k", "--cpus", "256"]);
        assert!(err.contains("give a number from 1 to 255"), "{err}");
        let err = run_err(&["--kernel", "/k", "--cpus", "many"]);
        assert!(err.contains("give a number from 1 to 255"), "{err}");
    }

    #[test]
    fn malformed_memory_values_are_refused() {
        for (value, expected) in [
            (
                "size=512M,colour=red",
                "unknown key \"colour\"; valid keys: size, hugepages, shared",
            ),
            ("512M", "expected key=value but found \"512M\""),
            ("size=12Q", "invalid size \"12Q\""),
            ("size=512M,hugepages=4M", "use hugepages=2M or hugepages=1G"),
            ("size=512M,size=1G", "key \"size\" is given twice"),
            ("hugepages=2M", "missing size="),
            ("size=512M,shared=maybe", "is not on or off"),
        ] {
            let err = run_err(&["--kernel", "/k", "--memory", value]);
            assert!(err.contains("--memory"), "{value}: {err}");
            assert!(err.contains(expected), "{value}: {err}");
        }
    }

    #[test]
    fn malformed_serial_and_reboot_values_are_refused() {
        let err = run_err(&["--kernel", "/k", "--serial", "tty"]);
        assert!(err.contains("use stdio, none or file=PATH"), "{err}");
        let err = run_err(&["--kernel", "/k", "--serial", "file="]);
        assert!(err.contains("use stdio, none or file=PATH"), "{err}");
        let err = run_err(&["--kernel", "/k", "--on-reboot", "halt"]);
        assert!(err.contains("use stop or restart"), "{err}");
    }

    #[test]
    fn devices_and_shmem_are_repeatable_and_typed() {
        let config = run(&[
            "--kernel",
            "/k",
            "--device",
            "vfio=0000:41:00.0",
            "--shmem",
            "size=8G,hugepages=1G",
            "--device",
            "vfio=42:00.0,bar-align=4k",
            "--shmem",
            "size=2M,path=/dev/shm/x",
            "--vfio-backend",
            "legacy",
        ])
        .unwrap();
        let kinds: Vec<String> = config
            .devices
            .iter()
            .map(|d| match d {
                DeviceConfig::Vfio(v) => v.to_string(),
                DeviceConfig::Shmem(s) => s.to_string(),
                DeviceConfig::Disk(d) => d.to_string(),
                DeviceConfig::Net(n) => n.to_string(),
            })
            .collect();
        assert_eq!(
            kinds,
            [
                "vfio=0000:41:00.0",
                "vfio=0000:42:00.0,bar-align=4k",
                "size=8G,hugepages=1G",
                "size=2M,path=/dev/shm/x"
            ]
        );
        assert_eq!(config.vfio_backend, VfioBackendKind::Legacy);
    }

    #[test]
    fn malformed_device_and_shmem_values_are_refused() {
        for (flag, value, expected) in [
            ("--device", "vfio=zz", "not a PCI address"),
            (
                "--device",
                "vfio=41:00.0,bar-align=3m",
                "use auto, 4k, 2m or 1g",
            ),
            ("--device", "nvme=41:00.0", "unknown device \"nvme\""),
            ("--shmem", "size=3G", "must be a power of two"),
            (
                "--shmem",
                "size=1G,hugepages=4M",
                "use hugepages=2M or hugepages=1G",
            ),
            ("--shmem", "hugepages=2M", "missing size="),
            ("--vfio-backend", "cdev", "use legacy, iommufd or auto"),
        ] {
            let err = run_err(&["--kernel", "/k", flag, value]);
            assert!(err.contains(flag), "{value}: {err}");
            assert!(err.contains(expected), "{value}: {err}");
        }
    }

    #[test]
    fn repeated_and_unknown_flags_are_refused() {
        let err = run_err(&["--kernel", "/k", "--cpus", "1", "--cpus", "2"]);
        assert!(err.contains("cannot be used multiple times"), "{err}");
        let err = run_err(&["--kernel", "/k", "--vcpus", "2"]);
        assert!(err.contains("unexpected argument '--vcpus'"), "{err}");
    }

    #[test]
    fn no_subcommand_or_unknown_subcommand_is_an_error() {
        assert!(parse_args(["barge"]).is_err());
        let err = parse_args(["barge", "frobnicate"]).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidSubcommand);
    }

    #[test]
    fn help_explains_every_option_with_an_example() {
        let err = parse_args(["barge", "run", "--help"]).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::DisplayHelp);
        let help = run_help_text();
        for needle in [
            "--kernel",
            "--initramfs",
            "--cmdline",
            "--cpus",
            "--memory",
            "--serial",
            "--on-reboot",
            "--report",
            "--config",
            "e.g. --memory size=1G,hugepages=2M",
            "e.g. --serial file=console.log",
            "Examples:",
        ] {
            assert!(help.contains(needle), "{needle} missing from:\n{help}");
        }
        let top = help_text();
        assert!(top.contains("run"), "{top}");
        assert!(top.contains("largest pages"), "{top}");
        assert_eq!(
            parse_args(["barge", "--version"]).unwrap_err().kind(),
            ErrorKind::DisplayVersion
        );
    }

    #[test]
    fn host_check_flags_are_parsed() {
        let Command::HostCheck(request) = parse_args([
            "barge",
            "host-check",
            "--device",
            "vfio=41:00.0",
            "--device",
            "vfio=0000:42:00.0",
            "--json",
            "--exercise",
        ])
        .unwrap() else {
            panic!("host-check expected");
        };
        assert_eq!(request.devices, ["0000:41:00.0", "0000:42:00.0"]);
        assert!(request.json && request.exercise);
        let Command::HostCheck(bare) = parse_args(["barge", "host-check"]).unwrap() else {
            panic!("host-check expected");
        };
        assert_eq!(bare, crate::host_check::HostCheckArgs::default());
        let err = parse_args(["barge", "host-check", "--device", "vfio=nonsense"]).unwrap_err();
        assert!(err.to_string().contains("DDDD:BB:DD.F"), "{err}");
    }

    #[test]
    fn plan_flags_are_parsed() {
        let Command::Plan(request) = parse_args([
            "barge",
            "plan",
            "--device",
            "vfio=41:00.0,bar-align=2m",
            "--shmem",
            "size=8G",
            "--spec",
            "h100.json",
            "--memory",
            "size=4G",
            "--phys-bits",
            "46",
            "--json",
        ])
        .unwrap() else {
            panic!("plan expected");
        };
        assert_eq!(request.vfio[0].bdf, "0000:41:00.0");
        assert_eq!(request.shmem[0].size, 8 << 30);
        assert_eq!(request.spec.as_deref(), Some(Path::new("h100.json")));
        assert_eq!(request.memory_size, 4 << 30);
        assert_eq!(request.phys_bits, Some(46));
        assert!(request.json);
        let Command::Plan(request) = parse_args(["barge", "plan", "--shmem", "size=2M"]).unwrap()
        else {
            panic!("plan expected");
        };
        assert_eq!(request.memory_size, 512 << 20);
        assert_eq!(request.phys_bits, None);
        let err = parse_args(["barge", "plan", "--phys-bits", "many"]).unwrap_err();
        assert!(err.to_string().contains("--phys-bits"), "{err}");
    }

    #[test]
    fn bench_flags_are_parsed_with_defaults() {
        use crate::bench::{BenchDevice, BenchMode};
        let Command::Bench(request) =
            parse_args(["barge", "bench", "--device", "vfio=00:03.0", "--bar", "2"]).unwrap()
        else {
            panic!("bench expected");
        };
        assert!(matches!(&request.device, BenchDevice::Vfio(v) if v.bdf == "0000:00:03.0"));
        assert_eq!(request.bar, 2);
        assert_eq!(request.modes, BenchMode::ALL.to_vec());
        assert_eq!(request.reps, 3);
        assert_eq!(request.window, 64 << 20);
        assert!(!request.json);
        let Command::Bench(request) = parse_args([
            "barge",
            "bench",
            "--shmem",
            "size=2M",
            "--modes",
            "1g,4k,1g",
            "--reps",
            "1",
            "--window",
            "64K",
            "--passes",
            "1",
            "--random-reads",
            "100",
            "--json",
            "--svg",
            "/tmp/b.svg",
            "--timeout",
            "60",
            "--json-file",
            "/tmp/b.json",
        ])
        .unwrap() else {
            panic!("bench expected");
        };
        assert!(matches!(&request.device, BenchDevice::Shmem(s) if s.size == 2 << 20));
        assert_eq!(request.modes, [BenchMode::Size1G, BenchMode::Size4K]);
        assert_eq!(
            (request.reps, request.window, request.passes),
            (1, 64 << 10, 1)
        );
        assert_eq!(request.random_reads, 100);
        assert_eq!(request.timeout, std::time::Duration::from_secs(60));
        assert!(request.json);
        assert_eq!(request.svg.as_deref(), Some(Path::new("/tmp/b.svg")));
        assert_eq!(request.json_file.as_deref(), Some(Path::new("/tmp/b.json")));
    }

    #[test]
    fn bench_bad_input_is_refused() {
        for (args, expected) in [
            (vec!["--bar", "2"], "required arguments were not provided"),
            (
                vec!["--shmem", "size=2M", "--device", "vfio=00:03.0"],
                "cannot be used with",
            ),
            (
                vec!["--shmem", "size=2M", "--modes", "3m"],
                "use 4k, 2m, 1g or auto",
            ),
            (vec!["--shmem", "size=2M", "--reps", "0"], "--reps"),
            (
                vec!["--shmem", "size=2M", "--window", "lots"],
                "invalid size",
            ),
        ] {
            let mut full = vec!["barge", "bench"];
            full.extend(args);
            let err = parse_args(full).unwrap_err().to_string();
            assert!(err.contains(expected), "{expected}: {err}");
        }
    }

    #[test]
    fn clap_definition_is_consistent() {
        Cli::command().debug_assert();
    }
}
