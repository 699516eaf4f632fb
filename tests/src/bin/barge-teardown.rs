//! `barge-teardown`: runs barge through its embedding API many times in
//! one process, with a device passed through, and checks after every run
//! that nothing stayed behind: the process's open fds (`/proc/self/fd`,
//! number and target) and its device, KVM, memfd and guest-RAM-sized
//! mappings (`/proc/self/maps`) are as they were before the first run.
//!
//! Runs in the lab host (`barge-lab run --ivshmem SIZE -- barge-teardown
//! --device $LAB_IVSHMEM0 ...`):
//! - `--runs N` good runs: a Linux guest reads the word the previous run
//!   wrote at BAR2 + 0x2000 and writes its own run number there; every run
//!   must give the same report (status, BAR placement, pages KVM mapped,
//!   memslot updates, DMA bytes) and read the previous run's number;
//! - a run stopped by a timeout while the guest is still booting;
//! - the device unbound from vfio-pci and bound again (the unbind only
//!   finishes when nothing holds the device), then one more good run;
//! - bad configurations, each with its error: the same device twice and a
//!   second device that does not exist (refused while the devices are
//!   opened), a second BAR too large for the MMIO window (refused by the
//!   planner, with the VFIO device open), an initramfs larger than guest
//!   RAM (refused after the device's BARs are mapped, registered as
//!   memslots and guest RAM is DMA-mapped).
//!
//! `--vfio-backend iommufd` opens the device through its cdev and an
//! iommufd (`barge-lab run --iommufd`); closing the iommufd is what
//! destroys its IOAS, so besides the totals every line says how many
//! iommufd (`/dev/iommu`), VFIO device cdev (`/dev/vfio/devices/vfioN`) and
//! dma-buf fds were open while the guest ran and are open after the run
//! (which must be none).
//!
//! One line per run, then `teardown: ...` with the totals; exits 1 when a
//! run differed, failed or left anything behind.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use clap::Parser;
use vmm::config::{DeviceConfig, ShmemConfig, VfioBackendKind, VfioConfig, VmConfig};
use vmm::{RunOutcome, Vm};

#[derive(Debug, Parser)]
#[command(about = "Run barge N times in one process and check nothing leaks")]
struct Args {
    /// The vfio-pci device to pass through (an ivshmem device: BAR2 is
    /// read and written by the guest).
    #[arg(long)]
    device: String,
    /// Good runs.
    #[arg(long, default_value_t = 20)]
    runs: u32,
    /// Guest kernel.
    #[arg(long, default_value = "/lab/guest/bzImage")]
    kernel: PathBuf,
    /// Guest initramfs (its init runs what follows `--` on the cmdline).
    #[arg(long, default_value = "/lab/guest/initramfs")]
    initramfs: PathBuf,
    /// Seconds a good run may take.
    #[arg(long, default_value_t = 300)]
    timeout: u64,
    /// How barge opens the device: legacy (container and group), iommufd
    /// (cdev and /dev/iommu) or auto.
    #[arg(long, default_value = "legacy")]
    vfio_backend: VfioBackendKind,
}

/// Guest RAM of every run: also the size above which an anonymous mapping
/// counts as guest RAM in the leak check.
const GUEST_RAM: u64 = 256 << 20;

/// What the process holds that a run could leak.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Holdings {
    /// fd number to its target.
    fds: BTreeMap<i32, String>,
    /// Mappings of devices, KVM, memfds, and anonymous ones of guest RAM
    /// size or more (address range, permissions, path).
    maps: Vec<String>,
}

/// The fds a run must close for the IOMMU state to go: iommufd (its last
/// close destroys the IOAS and unpins what it mapped), the VFIO device cdev
/// and dma-bufs (of a BAR exported for peer-to-peer DMA).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct IommuFds {
    iommufd: usize,
    cdev: usize,
    dmabuf: usize,
}

impl IommuFds {
    /// Counts them among fd link targets.
    fn among<'a>(targets: impl IntoIterator<Item = &'a String>) -> IommuFds {
        let mut count = IommuFds::default();
        for target in targets {
            if target == "/dev/iommu" {
                count.iommufd += 1;
            } else if target.starts_with("/dev/vfio/devices/vfio") {
                count.cdev += 1;
            } else if target.starts_with("anon_inode:dmabuf") || target.starts_with("/dmabuf:") {
                count.dmabuf += 1;
            }
        }
        count
    }

    fn max(self, other: IommuFds) -> IommuFds {
        IommuFds {
            iommufd: self.iommufd.max(other.iommufd),
            cdev: self.cdev.max(other.cdev),
            dmabuf: self.dmabuf.max(other.dmabuf),
        }
    }

    fn is_none(&self) -> bool {
        *self == IommuFds::default()
    }
}

impl std::fmt::Display for IommuFds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "iommufd {} cdev {} dma-buf {}",
            self.iommufd, self.cdev, self.dmabuf
        )
    }
}

impl Holdings {
    fn iommu_fds(&self) -> IommuFds {
        IommuFds::among(self.fds.values())
    }

    fn now() -> Holdings {
        let mut fds = BTreeMap::new();
        if let Ok(entries) = std::fs::read_dir("/proc/self/fd") {
            for entry in entries.flatten() {
                let Ok(fd) = entry.file_name().to_string_lossy().parse::<i32>() else {
                    continue;
                };
                let target = std::fs::read_link(entry.path())
                    .map(|t| t.to_string_lossy().into_owned())
                    .unwrap_or_default();
                // The directory listing's own fd.
                if target.starts_with("/proc/") && target.ends_with("/fd") || target.is_empty() {
                    continue;
                }
                fds.insert(fd, target);
            }
        }
        let maps = std::fs::read_to_string("/proc/self/maps")
            .unwrap_or_default()
            .lines()
            .filter_map(interesting_mapping)
            .collect();
        Holdings { fds, maps }
    }

    /// `+added -removed` against `before`, with the items, for the log.
    fn diff(&self, before: &Holdings) -> Leak {
        let added_fds = self
            .fds
            .iter()
            .filter(|(fd, t)| before.fds.get(fd) != Some(t))
            .map(|(fd, t)| format!("fd {fd} -> {t}"))
            .collect();
        let added_maps = self
            .maps
            .iter()
            .filter(|m| !before.maps.contains(m))
            .cloned()
            .collect();
        let removed = before
            .fds
            .iter()
            .filter(|(fd, t)| self.fds.get(fd) != Some(t))
            .count()
            + before
                .maps
                .iter()
                .filter(|m| !self.maps.contains(m))
                .count();
        Leak {
            added_fds,
            added_maps,
            removed,
            open: self.iommu_fds(),
        }
    }
}

/// A `/proc/self/maps` line worth tracking: a device, KVM or memfd
/// mapping, or an anonymous one at least as large as guest RAM.
fn interesting_mapping(line: &str) -> Option<String> {
    let mut fields = line.split_whitespace();
    let range = fields.next()?;
    let perms = fields.next()?;
    let path = fields.nth(3).unwrap_or("");
    let (start, end) = range.split_once('-')?;
    let size = u64::from_str_radix(end, 16).ok()? - u64::from_str_radix(start, 16).ok()?;
    let device = ["vfio", "kvm", "memfd:", "/dev/"]
        .iter()
        .any(|needle| path.contains(needle));
    (device || (path.is_empty() && size >= GUEST_RAM)).then(|| format!("{range} {perms} {path}"))
}

#[derive(Debug)]
struct Leak {
    added_fds: Vec<String>,
    added_maps: Vec<String>,
    removed: usize,
    /// iommufd, cdev and dma-buf fds open afterwards.
    open: IommuFds,
}

impl Leak {
    fn is_clean(&self) -> bool {
        self.added_fds.is_empty()
            && self.added_maps.is_empty()
            && self.removed == 0
            && self.open.is_none()
    }

    fn summary(&self) -> String {
        let mut text = format!(
            "open after: {}; fds +{} maps +{} gone {}",
            self.open,
            self.added_fds.len(),
            self.added_maps.len(),
            self.removed
        );
        for item in self.added_fds.iter().chain(&self.added_maps) {
            text.push_str(&format!("\n    left behind: {item}"));
        }
        text
    }
}

/// Where a BAR went and what KVM mapped for it.
#[derive(Debug, Clone, PartialEq)]
struct BarShape {
    index: u8,
    gpa: u64,
    trapped: bool,
    planned_page_size: u64,
    /// Pages KVM mapped (4K, 2M, 1G), when the kernel can pre-fault.
    mapped: Option<(u64, u64, u64)>,
    slot_updates: u32,
}

/// What must be the same in every good run.
#[derive(Debug, Clone, PartialEq)]
struct RunShape {
    status: i32,
    reason: String,
    bars: Vec<BarShape>,
    dma_bytes: Option<u64>,
}

impl RunShape {
    fn of(outcome: &RunOutcome) -> RunShape {
        let bars = outcome
            .report
            .devices
            .iter()
            .flat_map(|d| &d.bars)
            .map(|b| BarShape {
                index: b.index,
                gpa: b.gpa,
                trapped: b.trapped,
                planned_page_size: b.planned_page_size,
                mapped: b
                    .mapped
                    .as_ref()
                    .map(|m| (m.pages_4k, m.pages_2m, m.pages_1g)),
                slot_updates: b.slot_updates,
            })
            .collect();
        RunShape {
            status: outcome.exit.status,
            reason: outcome.exit.reason.clone(),
            bars,
            dma_bytes: outcome.report.dma.as_ref().map(|d| d.bytes),
        }
    }

    fn bar2(&self) -> String {
        let Some(bar) = self.bars.iter().find(|b| b.index == 2) else {
            return "no BAR2".to_string();
        };
        match bar.mapped {
            Some((k4, m2, g1)) => format!(
                "BAR2 gpa {:#x} mapped 4Kx{k4} 2Mx{m2} 1Gx{g1}, slot updates {}",
                bar.gpa, bar.slot_updates
            ),
            None => format!("BAR2 gpa {:#x} mapped unknown", bar.gpa),
        }
    }
}

fn vfio(bdf: &str) -> DeviceConfig {
    DeviceConfig::Vfio(VfioConfig {
        bdf: bdf.to_string(),
        bar_align: Default::default(),
        p2p: Default::default(),
    })
}

fn base_config(args: &Args, cmdline: &str) -> VmConfig {
    let mut config = VmConfig::new(&args.kernel);
    config.initramfs = Some(args.initramfs.clone());
    config.memory.size = GUEST_RAM;
    config.cmdline = cmdline.to_string();
    config.devices = vec![vfio(&args.device)];
    config.vfio_backend = args.vfio_backend;
    config
}

/// What [`run_vm`] gives back.
struct VmRun {
    result: Result<RunOutcome, String>,
    console: String,
    /// The most iommufd, cdev and dma-buf fds open at once while it ran
    /// (sampled every 100 ms).
    held: IommuFds,
}

/// Runs `config` on a thread of its own (the VMM's seccomp filter stays
/// with the thread that ran it) and returns the outcome and the console.
fn run_vm(config: VmConfig, timeout: Duration) -> VmRun {
    let console = Arc::new(Mutex::new(Vec::new()));
    let buffer = console.clone();
    let vm = std::thread::spawn(move || {
        Vm::new(config)
            .console_buffer(buffer)
            .run_with_timeout(timeout)
            .map_err(|e| e.to_string())
    });
    let mut held = IommuFds::default();
    while !vm.is_finished() {
        held = held.max(Holdings::now().iommu_fds());
        std::thread::sleep(Duration::from_millis(100));
    }
    let result = vm
        .join()
        .unwrap_or_else(|_| Err("the VM thread panicked".to_string()));
    let console =
        String::from_utf8_lossy(&console.lock().unwrap_or_else(|p| p.into_inner())).into_owned();
    VmRun {
        result,
        console,
        held,
    }
}

/// The value after `READ=` on the guest's console.
fn guest_read(console: &str) -> Option<u32> {
    console.lines().find_map(|l| {
        let value = l.trim().strip_prefix("READ=")?;
        u32::from_str_radix(value.trim_start_matches("0x"), 16).ok()
    })
}

struct Tally {
    failures: Vec<String>,
}

impl Tally {
    fn check(&mut self, ok: bool, what: impl Into<String>) {
        if !ok {
            let what = what.into();
            println!("  FAILED: {what}");
            self.failures.push(what);
        }
    }
}

/// The good runs so far: each guest reads what the previous one wrote at
/// BAR2 + 0x2000, writes its own number there, and must get run 1's report.
#[derive(Default)]
struct GoodRuns {
    first: Option<RunShape>,
    /// Runs whose report matched run 1's (run 1 included).
    same: u32,
    previous_write: Option<u32>,
    /// The iommufd, cdev and dma-buf fds every run holds while its guest
    /// runs (run 1's).
    expected_held: Option<IommuFds>,
}

impl GoodRuns {
    /// Runs guest number `number`, prints one line starting with `label`,
    /// and records in `tally` what went wrong, leaks against `before`
    /// included.
    fn run(&mut self, args: &Args, label: &str, number: u32, before: &Holdings, tally: &mut Tally) {
        let cmdline = format!(
            "console=ttyS0 panic=-1 -- a=$(pcibar 1af4:1110 2);\
             echo READ=$(devmem $((a+0x2000)) 32);devmem $((a+0x2000)) 32 {number}"
        );
        let VmRun {
            result,
            console,
            held,
        } = run_vm(
            base_config(args, &cmdline),
            Duration::from_secs(args.timeout),
        );
        let leak = Holdings::now().diff(before);
        tally.check(
            self.expected_held.is_none_or(|expected| held == expected),
            format!(
                "{label}: held {held} while running, not {:?}",
                self.expected_held
            ),
        );
        tally.check(leak.is_clean(), format!("{label}: left something behind"));
        let outcome = match result {
            Ok(outcome) => outcome,
            Err(e) => {
                println!("{label}: error: {e}; {}", leak.summary());
                tally.check(false, format!("{label}: {e}\n{console}"));
                return;
            }
        };
        let shape = RunShape::of(&outcome);
        let read = guest_read(&console);
        println!(
            "{label}: status {} ({}), guest read {}, {}, dma {} bytes; held while running: \
             {held}; {}",
            shape.status,
            shape.reason,
            read.map_or("nothing".to_string(), |r| format!("{r:#x}")),
            shape.bar2(),
            shape.dma_bytes.unwrap_or(0),
            leak.summary()
        );
        tally.check(
            shape.status == 0,
            format!("{label}: status {}", shape.status),
        );
        tally.check(
            console.contains("GUEST-EXIT 0"),
            format!("{label}: the guest command failed:\n{console}"),
        );
        if let Some(expected) = self.previous_write {
            tally.check(
                read == Some(expected),
                format!("{label}: read {read:?}, expected {expected:#x}"),
            );
        }
        self.previous_write = Some(number);
        self.expected_held.get_or_insert(held);
        match &self.first {
            None => {
                self.first = Some(shape);
                self.same += 1;
            }
            Some(first) if *first == shape => self.same += 1,
            Some(first) => tally.check(
                false,
                format!("{label}: {shape:?} differs from run 1: {first:?}"),
            ),
        }
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    let before = Holdings::now();
    let mut tally = Tally {
        failures: Vec::new(),
    };
    println!(
        "barge-teardown: {} runs with {} passed through ({} backend); holding {} fds, {} \
         tracked mappings",
        args.runs,
        args.device,
        args.vfio_backend,
        before.fds.len(),
        before.maps.len()
    );

    let mut good = GoodRuns::default();
    for run in 1..=args.runs {
        good.run(
            &args,
            &format!("run {run}/{}", args.runs),
            run,
            &before,
            &mut tally,
        );
    }

    // Stopped while the guest boots: the device is torn down mid-use.
    let VmRun { result, held, .. } = run_vm(
        base_config(&args, "console=ttyS0 panic=-1 -- sleep 600"),
        Duration::from_secs(3),
    );
    let leak = Holdings::now().diff(&before);
    let status = result.as_ref().map(|o| o.exit.status);
    println!(
        "timeout: {}; held while running: {held}; {}",
        match &result {
            Ok(o) => format!("status {} ({})", o.exit.status, o.exit.reason),
            Err(e) => format!("error: {e}"),
        },
        leak.summary()
    );
    tally.check(
        status == Ok(vmm::status::TIMEOUT),
        format!("timeout run: {result:?}"),
    );
    tally.check(leak.is_clean(), "the timeout run left something behind");

    // The device rebinds: vfio-pci's unbind waits until nobody holds the
    // device, so it only finishes if every run let go of it.
    match rebind(&args.device) {
        Ok(text) => println!("rebind: {text}"),
        Err(e) => {
            println!("rebind: {e}");
            tally.check(false, format!("rebind: {e}"));
        }
    }
    good.run(&args, "after rebind", args.runs + 1, &before, &mut tally);

    let bad = bad_cases(&args);
    let bad_count = bad.len();
    for (name, config, expected) in bad {
        let VmRun { result, .. } = run_vm(config, Duration::from_secs(args.timeout));
        let leak = Holdings::now().diff(&before);
        match result {
            Ok(outcome) => {
                println!(
                    "bad {name}: ran (status {}): expected an error",
                    outcome.exit.status
                );
                tally.check(false, format!("bad {name}: no error"));
            }
            Err(e) => {
                println!("bad {name}: error: {e}; {}", leak.summary());
                tally.check(
                    e.contains(expected),
                    format!("bad {name}: error does not say {expected:?}"),
                );
            }
        }
        tally.check(leak.is_clean(), format!("bad {name} left something behind"));
    }

    let _ = std::fs::remove_file(big_initramfs_path());
    println!(
        "teardown: {} runs and 1 after the rebind, {} with the same report as run 1, \
         1 timeout stop, 1 rebind, {bad_count} bad configurations, {} failures",
        args.runs,
        good.same,
        tally.failures.len()
    );
    if tally.failures.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// The sparse file the initramfs case loads (removed at the end).
fn big_initramfs_path() -> PathBuf {
    std::env::temp_dir().join(format!("barge-teardown-initramfs-{}", std::process::id()))
}

/// Unbinds `bdf` from its driver (with a deadline: the unbind blocks while
/// the device is held) and lets the kernel probe it again.
fn rebind(bdf: &str) -> Result<String, String> {
    let device = Path::new("/sys/bus/pci/devices").join(bdf);
    let driver_of = || {
        std::fs::read_link(device.join("driver"))
            .ok()
            .and_then(|d| d.file_name().map(|n| n.to_string_lossy().into_owned()))
    };
    let driver = driver_of().ok_or_else(|| format!("{bdf} has no driver"))?;
    let unbind = Path::new("/sys/bus/pci/drivers")
        .join(&driver)
        .join("unbind");
    let (done, finished) = mpsc::channel();
    let name = bdf.to_string();
    std::thread::spawn(move || {
        let _ = done.send(std::fs::write(unbind, name));
    });
    match finished.recv_timeout(Duration::from_secs(30)) {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(format!("cannot unbind {bdf} from {driver}: {e}")),
        Err(_) => {
            return Err(format!(
                "unbinding {bdf} from {driver} did not finish in 30 s: something still holds it"
            ))
        }
    }
    std::fs::write("/sys/bus/pci/drivers_probe", bdf)
        .map_err(|e| format!("cannot probe {bdf} again: {e}"))?;
    let again = driver_of().ok_or_else(|| format!("{bdf} was not bound again"))?;
    if again != driver {
        return Err(format!("{bdf} came back bound to {again}, not {driver}"));
    }
    Ok(format!(
        "{bdf} unbound from {driver} and bound to {again} again"
    ))
}

/// Configurations that open and map the device, then fail: (name, config,
/// a part of the expected error).
fn bad_cases(args: &Args) -> Vec<(&'static str, VmConfig, &'static str)> {
    let plain = "console=ttyS0 panic=-1 -- true";
    let mut twice = base_config(args, plain);
    twice.devices.push(vfio(&args.device));

    let mut missing = base_config(args, plain);
    missing.devices.push(vfio("0000:00:1f.7"));

    // A 1 TiB BAR does not fit the lab's MMIO64 window (40 physical
    // address bits).
    let mut too_large = base_config(args, plain);
    let shmem: ShmemConfig = "size=1T".parse().expect("shmem size=1T parses");
    too_large.devices.push(DeviceConfig::Shmem(shmem));

    // An initramfs larger than guest RAM is found when it is loaded.
    let big_initramfs = big_initramfs_path();
    let _ = std::fs::File::create(&big_initramfs).and_then(|f| f.set_len(GUEST_RAM * 2));
    let mut initramfs = base_config(args, plain);
    initramfs.initramfs = Some(big_initramfs);

    vec![
        ("same-device-twice", twice, "is passed through twice"),
        ("second-device-missing", missing, "0000:00:1f.7"),
        (
            "bar-beyond-window",
            too_large,
            "does not fit in the MMIO64 window",
        ),
        (
            "initramfs-larger-than-ram",
            initramfs,
            "is larger than the guest memory",
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_kvm_memfd_and_guest_ram_mappings_are_tracked() {
        let tracked = [
            "7f0000000000-7f0040000000 rw-s 20000000000 00:0f 1041 anon_inode:[vfio-device]",
            "7f1000000000-7f1000001000 rw-s 00000000 00:0f 1040 anon_inode:kvm-vcpu:0",
            "7f2000000000-7f2004000000 rw-s 00000000 00:01 77 /memfd:barge-shmem (deleted)",
            "7f3000000000-7f3010000000 rw-p 00000000 00:00 0 ",
        ];
        for line in tracked {
            assert!(interesting_mapping(line).is_some(), "{line}");
        }
        let ignored = [
            // A thread stack, a malloc arena and the binary itself.
            "7f4000000000-7f4000800000 rw-p 00000000 00:00 0 ",
            "7f5000000000-7f5004000000 ---p 00000000 00:00 0 ",
            "55d000000000-55d000100000 r-xp 00000000 fd:00 12 /usr/local/bin/barge-teardown",
        ];
        for line in ignored {
            assert!(interesting_mapping(line).is_none(), "{line}");
        }
    }

    #[test]
    fn iommufd_cdev_and_dmabuf_fds_are_counted() {
        let targets = [
            "/dev/iommu",
            "/dev/vfio/devices/vfio0",
            "/dev/vfio/devices/vfio1",
            "anon_inode:dmabuf",
            "/dmabuf: (deleted)",
            "/dev/vfio/vfio",
            "/dev/vfio/3",
            "anon_inode:kvm-vm",
        ]
        .map(String::from);
        let count = IommuFds::among(&targets);
        assert_eq!(
            count,
            IommuFds {
                iommufd: 1,
                cdev: 2,
                dmabuf: 2
            }
        );
        assert_eq!(count.to_string(), "iommufd 1 cdev 2 dma-buf 2");
        let after = Holdings {
            fds: BTreeMap::from([(9, "/dev/iommu".to_string())]),
            maps: Vec::new(),
        };
        // Open before and after is still not clean: none may stay open.
        assert!(!after.diff(&after).is_clean());
    }

    #[test]
    fn a_new_fd_or_mapping_is_a_leak() {
        let before = Holdings {
            fds: BTreeMap::from([(0, "/dev/null".to_string())]),
            maps: Vec::new(),
        };
        assert!(before.diff(&before).is_clean());
        let mut after = before.clone();
        after.fds.insert(7, "/dev/vfio/1".to_string());
        after
            .maps
            .push("7f00-7f10 rw-s anon_inode:[vfio-device]".to_string());
        let leak = after.diff(&before);
        assert!(!leak.is_clean());
        assert_eq!(leak.added_fds, ["fd 7 -> /dev/vfio/1"]);
        assert!(leak
            .summary()
            .starts_with("open after: iommufd 0 cdev 0 dma-buf 0; fds +1 maps +1 gone 0"));
        assert_eq!(before.diff(&after).removed, 2);
    }
}
