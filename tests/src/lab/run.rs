//! `barge-lab run`: boots the lab host under QEMU full emulation with the
//! requested devices, runs a command in it and copies back what the command
//! wrote under /out. Every stage has a hard deadline; the full console log of
//! every run is kept.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use base64::Engine;

use super::initramfs::{self, HostContents};
use super::{parse_size, HostKernel, LabError, LabPaths, LabState};

/// Exit status of a run that hit a deadline (as timeout(1)).
pub const TIMEOUT_STATUS: i32 = 124;
/// Exit status when the lab itself failed (boot, modules, binding).
pub const LAB_FAILURE_STATUS: i32 = 125;

const MIN_IVSHMEM: u64 = 2 << 20;
const MAX_IVSHMEM: u64 = 64 << 30;
/// The first PCI slot the lab's devices get on the root bus.
const FIRST_SLOT: u32 = 0x10;
/// The slot of the Debian guest's disk on the root bus (clear of the
/// devices' slots and of the bridge's, 0x1e).
const DEBIAN_DISK_SLOT: u32 = 0x1d;
/// The most ivshmem devices a lab host gets.
pub const MAX_IVSHMEM_DEVICES: usize = 8;
/// The most devices of every kind: the root bus slots from [`FIRST_SLOT`]
/// to the Debian disk's.
pub const MAX_DEVICES: usize = (DEBIAN_DISK_SLOT - FIRST_SLOT) as usize;
/// Above this many bytes of ivshmem BARs the lab host's CPU gets
/// [`WIDE_PHYS_BITS`] (see [`lab_cpu`]).
const WIDE_BARS_ABOVE: u64 = 256 << 30;
/// Physical address bits of a lab host with more than [`WIDE_BARS_ABOVE`]
/// of BARs.
pub const WIDE_PHYS_BITS: u8 = 44;

/// The lab host's `-cpu`: QEMU's `max`, with its 40 physical address bits
/// under TCG, unless the ivshmem BARs add up to more than 256 GiB. With 40
/// bits SeaBIOS puts the 64-bit PCI window between 64 and 512 GiB, where
/// eight 64 GiB BARs do not fit (the eighth was left unassigned); with
/// [`WIDE_PHYS_BITS`] it puts the window near the top. Smaller sets keep
/// the layout every other lab test was measured with.
pub fn lab_cpu(devices: &[LabDevice]) -> String {
    let bars: u64 = devices
        .iter()
        .map(|device| match device {
            LabDevice::Ivshmem { size, .. } => *size,
            _ => 0,
        })
        .sum();
    if bars > WIDE_BARS_ABOVE {
        format!("max,phys-bits={WIDE_PHYS_BITS}")
    } else {
        "max".to_string()
    }
}

/// Refuses more devices than the lab host has slots for, or more than
/// [`MAX_IVSHMEM_DEVICES`] ivshmem devices.
pub fn check_device_count(devices: &[LabDevice]) -> Result<(), LabError> {
    let ivshmem = devices
        .iter()
        .filter(|d| matches!(d, LabDevice::Ivshmem { .. }))
        .count();
    if ivshmem > MAX_IVSHMEM_DEVICES {
        return Err(LabError::Usage(format!(
            "{ivshmem} --ivshmem devices: the lab host takes at most {MAX_IVSHMEM_DEVICES}"
        )));
    }
    if devices.len() > MAX_DEVICES {
        return Err(LabError::Usage(format!(
            "{} devices (--ivshmem, --nvme, --e1000e): the lab host's root bus has slots for at \
             most {MAX_DEVICES}",
            devices.len()
        )));
    }
    Ok(())
}

/// The host's end of a TCP check with a guest on the tap.
const SOCAT: &str = "/usr/bin/socat";

/// An emulated device of the lab host, passed through to barge's guests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LabDevice {
    /// ivshmem-plain over a file-backed memory backend; BAR2 is the file.
    Ivshmem { size: u64, file: Option<PathBuf> },
    /// An NVMe controller over a raw disk image.
    Nvme { image: PathBuf },
    /// An e1000e NIC with no network behind it.
    E1000e,
}

impl LabDevice {
    /// `SIZE[,file=PATH]` for `--ivshmem`.
    pub fn parse_ivshmem(text: &str) -> Result<Self, String> {
        let mut parts = text.split(',');
        let size = parse_size(parts.next().unwrap_or(""))?;
        if !size.is_power_of_two() || !(MIN_IVSHMEM..=MAX_IVSHMEM).contains(&size) {
            return Err(format!(
                "--ivshmem size {text}: ivshmem needs a power of two from 2M to 64G"
            ));
        }
        let mut file = None;
        for part in parts {
            match part.split_once('=') {
                Some(("file", path)) if !path.is_empty() => file = Some(PathBuf::from(path)),
                _ => {
                    return Err(format!(
                        "--ivshmem {text}: unknown option `{part}` (expected file=PATH)"
                    ))
                }
            }
        }
        Ok(LabDevice::Ivshmem { size, file })
    }

    fn kind(&self) -> &'static str {
        match self {
            LabDevice::Ivshmem { .. } => "ivshmem",
            LabDevice::Nvme { .. } => "nvme",
            LabDevice::E1000e => "e1000e",
        }
    }
}

#[derive(Debug, Clone)]
pub struct RunOptions {
    pub devices: Vec<LabDevice>,
    /// The lab host's memory, in bytes.
    pub memory: u64,
    pub cpus: u32,
    /// The command's shell script (from `-- COMMAND...` or `--script`).
    pub script: String,
    /// Extra executables for /usr/local/bin (barge and the test programs
    /// beside barge-lab are added by the caller).
    pub binaries: Vec<PathBuf>,
    pub boot_timeout: Duration,
    pub command_timeout: Duration,
    /// Stream the host's console to stderr while it runs.
    pub stream_console: bool,
    /// Give the host an IOMMU (without one, vfio-pci cannot bind and the
    /// devices keep their host drivers).
    pub iommu: bool,
    /// Put the devices behind a conventional PCI bridge: one IOMMU group.
    pub bridge: bool,
    /// Devices (by name, e.g. `nvme0`) left with their host driver.
    pub host_drivers: Vec<String>,
    /// The host kernel, by version (`6.12`, `7.3`) or name
    /// (`trixie-backports`); the main one when `None`.
    pub host_kernel: Option<String>,
    /// Load the vfio modules `setup` rebuilt with iommufd (/dev/iommu and
    /// /dev/vfio/devices/vfioN) instead of the stock ones.
    pub iommufd: bool,
    /// Give the host the Debian guest's disk (a virtio disk, its writes kept
    /// in a temporary overlay for this run only), mounted at
    /// /lab/guest/debian.
    pub debian: bool,
    /// Make the tap `barge0` with 192.168.100.1/24 in the host (and carry
    /// socat there for the host's end of a TCP check).
    pub tap: bool,
    /// Carry the lab's QEMU into the host as a peer VMM
    /// (`qemu-system-x86_64`, with its libraries and firmware).
    pub peer_qemu: bool,
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            devices: Vec::new(),
            memory: 3 << 30,
            cpus: 2,
            script: String::new(),
            binaries: Vec::new(),
            boot_timeout: Duration::from_secs(240),
            command_timeout: Duration::from_secs(900),
            stream_console: true,
            iommu: true,
            bridge: false,
            host_drivers: Vec::new(),
            host_kernel: None,
            iommufd: false,
            debian: false,
            tap: false,
            peer_qemu: false,
        }
    }
}

/// What a run produced.
#[derive(Debug)]
pub struct RunOutcome {
    /// The command's exit status (124 on a deadline, 125 on a lab failure).
    pub status: i32,
    pub run_dir: PathBuf,
    /// What the command wrote under /out.
    pub out_dir: PathBuf,
    pub console_log: PathBuf,
    pub devices: DeviceAddresses,
    /// The console line the host printed when it was ready, with its kernel.
    pub ready_line: Option<String>,
    pub boot_time: Option<Duration>,
}

/// Quotes words for a POSIX shell.
pub fn shell_quote(words: &[String]) -> String {
    words
        .iter()
        .map(|w| {
            if !w.is_empty()
                && w.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_./=:,@%+".contains(c))
            {
                w.clone()
            } else {
                format!("'{}'", w.replace('\'', r"'\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// (name, BDF) of each lab device, e.g. ("ivshmem0", "0000:00:10.0").
pub type DeviceAddresses = Vec<(String, String)>;

/// The QEMU arguments and the address of each device.
fn qemu_args(
    host: &HostKernel,
    options: &RunOptions,
    debian_disk: Option<&Path>,
    run_dir: &Path,
    initrd: &Path,
) -> Result<(Vec<String>, DeviceAddresses), LabError> {
    let mut args: Vec<String> = [
        "-M",
        "q35",
        "-accel",
        "tcg",
        "-cpu",
        &lab_cpu(&options.devices),
        "-nodefaults",
        "-display",
        "none",
        "-no-reboot",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    if options.iommu {
        args.extend([
            "-device".into(),
            "intel-iommu,intremap=on,caching-mode=on".into(),
        ]);
    }
    // no_timer_check: under full emulation on a loaded machine the
    // kernel's early check that the IO-APIC timer ticks can fail and panic
    // the host ("timer doesn't work through Interrupt-remapped IO-APIC").
    let cmdline = if options.iommu {
        "console=ttyS0 intel_iommu=on no_timer_check panic=-1 loglevel=4"
    } else {
        "console=ttyS0 no_timer_check panic=-1 loglevel=4"
    };
    // Behind a conventional PCI bridge, devices share one IOMMU group.
    let (bus, bus_number) = if options.bridge {
        args.extend([
            "-device".into(),
            "pci-bridge,id=br0,chassis_nr=1,bus=pcie.0,addr=0x1e".into(),
        ]);
        ("br0", 1)
    } else {
        ("pcie.0", 0)
    };
    args.extend([
        "-smp".into(),
        options.cpus.to_string(),
        "-m".into(),
        format!("{}M", options.memory >> 20),
        "-kernel".into(),
        host.bzimage.to_string_lossy().into_owned(),
        "-initrd".into(),
        initrd.to_string_lossy().into_owned(),
        "-append".into(),
        cmdline.into(),
        "-serial".into(),
        "stdio".into(),
        "-serial".into(),
        format!("file:{}", run_dir.join("results.serial").display()),
    ]);
    if let Some(disk) = debian_disk {
        // snapshot=on: the guest's writes go to a temporary overlay QEMU
        // deletes when it exits; the cached disk is never written.
        args.extend([
            "-drive".into(),
            format!(
                "file={},format=raw,if=none,id=debian,snapshot=on",
                disk.display()
            ),
            "-device".into(),
            format!(
                "virtio-blk-pci,drive=debian,serial={},bus=pcie.0,addr=0x{DEBIAN_DISK_SLOT:x}",
                initramfs::DEBIAN_DISK_SERIAL
            ),
        ]);
    }
    check_device_count(&options.devices)?;
    let mut names = Vec::new();
    let mut counts = std::collections::HashMap::new();
    for (i, device) in options.devices.iter().enumerate() {
        let kind = device.kind();
        let n = counts.entry(kind).or_insert(0u32);
        let name = format!("{kind}{n}");
        *n += 1;
        let slot = if options.bridge {
            1 + i as u32
        } else {
            FIRST_SLOT + i as u32
        };
        let addr = format!("addr=0x{slot:x}");
        match device {
            LabDevice::Ivshmem { size, file } => {
                let file = match file {
                    Some(file) => file.clone(),
                    None => run_dir.join(format!("{name}.shm")),
                };
                ensure_backing_file(&file, *size)?;
                args.extend([
                    "-object".into(),
                    format!(
                        "memory-backend-file,id=mem-{name},size={size},mem-path={},share=on",
                        file.display()
                    ),
                    "-device".into(),
                    format!("ivshmem-plain,memdev=mem-{name},bus={bus},{addr}"),
                ]);
            }
            LabDevice::Nvme { image } => {
                args.extend(super::nvme_args(
                    image,
                    &name,
                    &format!("bus={bus},{addr}"),
                )?);
            }
            LabDevice::E1000e => {
                args.extend(["-device".into(), format!("e1000e,bus={bus},{addr}")]);
            }
        }
        names.push((name, format!("0000:{bus_number:02x}:{slot:02x}.0")));
    }
    Ok((args, names))
}

/// A sparse file of exactly `size` bytes (it costs no disk until touched).
pub(crate) fn ensure_backing_file(file: &Path, size: u64) -> Result<(), LabError> {
    let handle = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(file)
        .map_err(|e| LabError::io("cannot open the ivshmem backing file", file, e))?;
    let len = handle
        .metadata()
        .map_err(|e| LabError::io("cannot stat", file, e))?
        .len();
    if len != size {
        handle
            .set_len(size)
            .map_err(|e| LabError::io("cannot size the ivshmem backing file", file, e))?;
    }
    Ok(())
}

/// Removes the `*.shm` ivshmem backing files of a run folder when dropped:
/// only a run makes files there (`--ivshmem file=` names files elsewhere).
struct RunScratch(PathBuf);

impl Drop for RunScratch {
    fn drop(&mut self) {
        let Ok(entries) = std::fs::read_dir(&self.0) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.extension().is_some_and(|ext| ext == "shm") {
                let _ = std::fs::remove_file(&path);
            }
        }
    }
}

pub(crate) fn new_run_dir(paths: &LabPaths) -> Result<PathBuf, LabError> {
    let runs = paths.runs_dir();
    std::fs::create_dir_all(&runs).map_err(|e| LabError::io("cannot create", &runs, e))?;
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0);
    let dir = runs.join(format!("{stamp}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| LabError::io("cannot create", &dir, e))?;
    Ok(dir)
}

/// Kills QEMU if the run is left early (error, panic).
struct QemuGuard(Child);

impl Drop for QemuGuard {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// Boots the lab host with `options` and runs its command.
///
/// A lab host that hangs before BARGE-LAB-READY (seen under TCG on a
/// loaded 2-core machine: RCU stalls, one vCPU's timer never firing) is
/// booted once more, saying so: no command had run, so the retry cannot
/// hide anything the command did. A second hang is the error.
pub fn run(paths: &LabPaths, options: &RunOptions) -> Result<RunOutcome, LabError> {
    retry_hung_boot(|| run_once(paths, options))
}

/// Runs `once`, and once more when the lab host hung before it was ready
/// (see [`run`]).
pub(crate) fn retry_hung_boot(
    mut once: impl FnMut() -> Result<RunOutcome, LabError>,
) -> Result<RunOutcome, LabError> {
    match once() {
        Err(LabError::BootHung(message)) => {
            eprintln!(
                "barge-lab: the lab host hung before it was ready, before the command ran; \
                 booting it once more. The hung boot: {}",
                message.lines().next().unwrap_or_default()
            );
            once()
        }
        other => other,
    }
}

fn run_once(paths: &LabPaths, options: &RunOptions) -> Result<RunOutcome, LabError> {
    let state = LabState::load(paths)?;
    let host = state.host_kernel(options.host_kernel.as_deref())?;
    let extra_modules = extra_modules(&state, &host, options)?;
    let debian_disk = match (&state.debian, options.debian) {
        (Some(image), true) => Some(image.disk.clone()),
        (None, true) => {
            return Err(LabError::Setup(format!(
                "the lab has no Debian guest image: run `{}` (as root with apt: it builds one \
                 with mmdebstrap)",
                super::SETUP_COMMAND
            )))
        }
        (_, false) => None,
    };
    let mut binaries = options.binaries.clone();
    if options.tap {
        if !Path::new(SOCAT).exists() {
            return Err(LabError::Setup(format!(
                "--tap carries {SOCAT} into the lab host for TCP checks, and it is missing: run \
                 `{}` (it installs socat) or `apt-get install socat`",
                super::SETUP_COMMAND
            )));
        }
        binaries.push(PathBuf::from(SOCAT));
    }
    let run_dir = new_run_dir(paths)?;
    let initrd = run_dir.join("host-initramfs.cpio");
    let (args, devices) = qemu_args(&host, options, debian_disk.as_deref(), &run_dir, &initrd)?;
    // Without an IOMMU vfio-pci cannot bind: every device keeps its driver.
    let host_drivers: Vec<String> = if options.iommu {
        options.host_drivers.clone()
    } else {
        devices.iter().map(|(name, _)| name.clone()).collect()
    };
    let contents = HostContents {
        binaries: &binaries,
        devices: &devices,
        host_drivers: &host_drivers,
        command_script: &options.script,
        iommufd: options.iommufd,
        extra_modules: &extra_modules,
        debian: options.debian,
        tap: options.tap,
        peer_qemu: options.peer_qemu.then_some(state.qemu.as_path()),
    };
    let image = initramfs::host_initramfs(&state, &host, &contents)?;
    std::fs::write(&initrd, image).map_err(|e| LabError::io("cannot write", &initrd, e))?;
    eprintln!("barge-lab: host kernel {} ({})", host.version, host.name);
    for (name, bdf) in &devices {
        eprintln!("barge-lab: {name} at {bdf}");
    }
    drive(&state.qemu, &args, run_dir, devices, options)
}

/// Starts `qemu` with `args` for the run folder `run_dir` (its initramfs
/// written there), streams its console, enforces the boot and command
/// deadlines and reads the results back: what every lab architecture
/// shares once its QEMU command line is made.
pub(crate) fn drive(
    qemu_path: &Path,
    args: &[String],
    run_dir: PathBuf,
    devices: DeviceAddresses,
    options: &RunOptions,
) -> Result<RunOutcome, LabError> {
    let console_log = run_dir.join("console.log");
    let out_dir = run_dir.join("out");
    let mut outcome = RunOutcome {
        status: LAB_FAILURE_STATUS,
        run_dir: run_dir.clone(),
        out_dir: out_dir.clone(),
        console_log: console_log.clone(),
        devices,
        ready_line: None,
        boot_time: None,
    };
    std::fs::write(
        run_dir.join("qemu.args"),
        format!("{} {}\n", qemu_path.display(), shell_quote(args)),
    )
    .map_err(|e| LabError::io("cannot write", &run_dir, e))?;

    // The backing files this run made for its ivshmem devices go when the
    // run ends (after QEMU: `scratch` is dropped after `qemu`): an 8 GiB
    // BAR the guest touched is gigabytes of disk, and every lab test makes
    // a run folder.
    let _scratch = RunScratch(run_dir.clone());
    let start = Instant::now();
    let child = Command::new(qemu_path)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| LabError::io("cannot start", qemu_path, e))?;
    let mut qemu = QemuGuard(child);
    let lines = stream_console(&mut qemu.0, &console_log, options.stream_console)?;

    let mut deadline = start + options.boot_timeout;
    let mut stage = "boot to BARGE-LAB-READY";
    let mut exited = false;
    loop {
        let now = Instant::now();
        if now >= deadline {
            break;
        }
        match lines.recv_timeout((deadline - now).min(Duration::from_millis(200))) {
            Ok(line) => {
                if line.starts_with(initramfs::READY_MARKER) && outcome.ready_line.is_none() {
                    outcome.ready_line = Some(line.clone());
                    outcome.boot_time = Some(start.elapsed());
                    deadline = Instant::now() + options.command_timeout;
                    stage = "the command";
                } else if line.starts_with(initramfs::EXIT_MARKER)
                    || line.starts_with(initramfs::FAIL_MARKER)
                {
                    // The results are on their way; poweroff follows.
                    deadline = Instant::now() + Duration::from_secs(120);
                    stage = "copying results and powering off";
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                exited = true;
                break;
            }
        }
    }
    if !exited {
        let _ = qemu.0.kill();
        let _ = qemu.0.wait();
        let message = format!(
            "the lab timed out during {stage}; console log {}; its last lines:\n{}",
            console_log.display(),
            console_tail(&console_log, 30)
        );
        return Err(if outcome.ready_line.is_none() {
            LabError::BootHung(message)
        } else {
            LabError::Run(message)
        });
    }
    let qemu_status = qemu
        .0
        .wait()
        .map_err(|e| LabError::io("cannot wait for", qemu_path, e))?;
    let mut qemu_stderr = String::new();
    if let Some(mut stderr) = qemu.0.stderr.take() {
        let _ = stderr.read_to_string(&mut qemu_stderr);
    }
    let serial = std::fs::read(run_dir.join("results.serial")).unwrap_or_default();
    match parse_results(&serial) {
        Some((status, tar)) => {
            outcome.status = status;
            unpack(&tar, &out_dir)?;
        }
        None => {
            return Err(LabError::Run(format!(
                "{LAB_HOST_STOPPED} ({qemu_status}) without reporting a result{}{}; console \
                 log {}; its last lines:\n{}",
                if qemu_stderr.trim().is_empty() {
                    String::new()
                } else {
                    format!(" (QEMU said: {})", qemu_stderr.trim())
                },
                kernel_panic(&console_log)
                    .map(|line| format!("; {LAB_HOST_PANIC}: {line}"))
                    .unwrap_or_default(),
                console_log.display(),
                console_tail(&console_log, 30)
            )))
        }
    }
    Ok(outcome)
}

/// The host modules `--debian` (virtio_blk) and `--tap` (tun) need, in load
/// order with their files: cached by setup for the main host kernel only.
fn extra_modules(
    state: &LabState,
    host: &HostKernel,
    options: &RunOptions,
) -> Result<Vec<(String, PathBuf)>, LabError> {
    let wanted: Vec<&str> = [(options.debian, "virtio_blk"), (options.tap, "tun")]
        .iter()
        .filter(|(on, _)| *on)
        .map(|(_, name)| *name)
        .collect();
    if wanted.is_empty() {
        return Ok(Vec::new());
    }
    let flags = || match (options.debian, options.tap) {
        (true, true) => "--debian and --tap need",
        (true, false) => "--debian needs",
        _ => "--tap needs",
    };
    match &state.extra_modules {
        Some(extra) if extra.kernel_version == host.version => extra.load_order_for(&wanted),
        Some(extra) => Err(LabError::Usage(format!(
            "{} the host modules {} that setup caches for the main host kernel {} only, \
             not for {} ({}): drop --host-kernel",
            flags(),
            wanted.join(", "),
            extra.kernel_version,
            host.version,
            host.name
        ))),
        None => Err(LabError::Setup(format!(
            "{} the host modules {}, which the lab has not cached: run `{}`",
            flags(),
            wanted.join(", "),
            super::SETUP_COMMAND
        ))),
    }
}

/// Copies QEMU's stdout (the host console) into the log, optionally to
/// stderr, and sends each line to the returned channel.
fn stream_console(
    child: &mut Child,
    log: &Path,
    to_stderr: bool,
) -> Result<mpsc::Receiver<String>, LabError> {
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| LabError::Run("QEMU's console was not captured".into()))?;
    let mut log_file =
        std::fs::File::create(log).map_err(|e| LabError::io("cannot create", log, e))?;
    let (sender, receiver) = mpsc::channel();
    std::thread::spawn(move || {
        let mut reader = BufReader::new(stdout);
        let mut raw = Vec::new();
        loop {
            raw.clear();
            match reader.read_until(b'\n', &mut raw) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    let _ = log_file.write_all(&raw);
                    if to_stderr {
                        let _ = std::io::stderr().write_all(&raw);
                    }
                    let line = String::from_utf8_lossy(&raw)
                        .trim_end_matches(['\r', '\n'])
                        .to_string();
                    let _ = sender.send(line);
                }
            }
        }
        let _ = log_file.flush();
    });
    Ok(receiver)
}

/// How `barge-lab run`'s error begins when the lab host stopped before it
/// reported a result.
pub const LAB_HOST_STOPPED: &str = "the lab host stopped";

/// What `barge-lab run`'s error says when the lab host's kernel panicked.
pub const LAB_HOST_PANIC: &str = "the lab host kernel panicked";

/// The lab host kernel's panic line in the console `log`
/// (`Kernel panic - not syncing: ...`), if it panicked.
pub fn kernel_panic(log: &Path) -> Option<String> {
    let text = std::fs::read(log).ok()?;
    let text = String::from_utf8_lossy(&text);
    text.lines().find_map(|line| {
        line.find("Kernel panic - ")
            .map(|at| line[at..].trim().to_string())
    })
}

/// The last `lines` lines of the console `log`.
pub fn console_tail(log: &Path, lines: usize) -> String {
    let text = std::fs::read(log).unwrap_or_default();
    let text = String::from_utf8_lossy(&text);
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// The status and the tar archive framed on the results port.
pub fn parse_results(serial: &[u8]) -> Option<(i32, Vec<u8>)> {
    let text = String::from_utf8_lossy(serial);
    let mut in_body = false;
    let mut body = String::new();
    let mut status = None;
    for line in text.lines() {
        let line = line.trim_end_matches('\r');
        if line == initramfs::OUT_BEGIN {
            in_body = true;
            body.clear();
        } else if line == initramfs::OUT_END {
            in_body = false;
        } else if in_body {
            body.push_str(line.trim());
        } else if let Some(rest) = line.strip_prefix(initramfs::STATUS_MARKER) {
            status = rest.trim().parse().ok();
        }
    }
    let tar = base64::engine::general_purpose::STANDARD
        .decode(body.as_bytes())
        .ok()?;
    Some((status?, tar))
}

fn unpack(tar: &[u8], dir: &Path) -> Result<(), LabError> {
    std::fs::create_dir_all(dir).map_err(|e| LabError::io("cannot create", dir, e))?;
    if tar.is_empty() {
        return Ok(());
    }
    let mut child = Command::new("tar")
        .args(["-x", "-f", "-", "-C"])
        .arg(dir)
        .stdin(Stdio::piped())
        .spawn()
        .map_err(|e| LabError::io("cannot run tar for", dir, e))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(tar)
            .map_err(|e| LabError::io("cannot unpack results into", dir, e))?;
    }
    let status = child
        .wait()
        .map_err(|e| LabError::io("cannot unpack results into", dir, e))?;
    if !status.success() {
        return Err(LabError::Run(format!(
            "tar could not unpack the results into {}",
            dir.display()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eight_64g_ivshmem_devices_get_a_wider_cpu_and_a_ninth_is_refused() {
        let ivshmem = |size: u64| LabDevice::Ivshmem { size, file: None };
        let eight: Vec<LabDevice> = (0..8).map(|_| ivshmem(64 << 30)).collect();
        assert_eq!(lab_cpu(&eight), "max,phys-bits=44");
        assert!(check_device_count(&eight).is_ok());
        // 256 GiB and less: the layout the other tests were measured with.
        let four: Vec<LabDevice> = (0..4).map(|_| ivshmem(64 << 30)).collect();
        assert_eq!(lab_cpu(&four), "max");
        assert_eq!(lab_cpu(&[LabDevice::E1000e]), "max");
        let mut nine = eight.clone();
        nine.push(ivshmem(2 << 20));
        let err = check_device_count(&nine).unwrap_err().to_string();
        assert!(err.contains("at most 8"), "{err}");
        let many: Vec<LabDevice> = (0..14).map(|_| LabDevice::E1000e).collect();
        let err = check_device_count(&many).unwrap_err().to_string();
        assert!(err.contains("at most 13"), "{err}");
    }

    #[test]
    fn ivshmem_options_parse() {
        assert_eq!(
            LabDevice::parse_ivshmem("8G"),
            Ok(LabDevice::Ivshmem {
                size: 8 << 30,
                file: None
            })
        );
        assert_eq!(
            LabDevice::parse_ivshmem("2M,file=/tmp/x"),
            Ok(LabDevice::Ivshmem {
                size: 2 << 20,
                file: Some(PathBuf::from("/tmp/x"))
            })
        );
        assert!(LabDevice::parse_ivshmem("3G").is_err());
        assert!(LabDevice::parse_ivshmem("1M").is_err());
        assert!(LabDevice::parse_ivshmem("128G").is_err());
        assert!(LabDevice::parse_ivshmem("8G,bogus=1").is_err());
    }

    #[test]
    fn results_are_unframed_despite_carriage_returns() {
        let tar = b"not really a tar";
        let encoded = base64::engine::general_purpose::STANDARD.encode(tar);
        let serial = format!(
            "noise\r\nBARGE-LAB-OUT-BEGIN\r\n{}\r\n{}\r\nBARGE-LAB-OUT-END\r\nBARGE-LAB-STATUS 3\r\n",
            &encoded[..8],
            &encoded[8..]
        );
        assert_eq!(parse_results(serial.as_bytes()), Some((3, tar.to_vec())));
        assert_eq!(parse_results(b"BARGE-LAB-OUT-BEGIN\n"), None);
    }

    #[test]
    fn words_are_quoted_for_the_shell() {
        let words = vec![
            "echo".to_string(),
            "it's here".to_string(),
            "$X".to_string(),
        ];
        assert_eq!(shell_quote(&words), r"echo 'it'\''s here' '$X'");
    }
}
