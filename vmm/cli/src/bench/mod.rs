//! `barge bench`: how a BAR performs when KVM maps it with 4 KiB, 2 MiB or
//! 1 GiB pages.
//!
//! For every mode (`bar-align` 4k, 2m, 1g, auto) and repetition the bench
//! runs two VMs through the embedding API, each with the one device and a
//! generated guest ([`payload`]) that maps the BAR with 1 GiB guest pages,
//! so only the host and KVM side differs between modes:
//!
//! - the **pre-fault VM** (barge's normal path): barge maps the BAR and
//!   pre-faults it (KVM_PRE_FAULT_MEMORY); the report gives the pre-fault
//!   time and the pages KVM mapped (`mapped`); the guest only checks it
//!   sees the BAR and powers off;
//! - the **first-touch VM** (`prefault_bars: false`): the guest touches the
//!   BAR one read per 4 KiB (each host fault happens now), then measures
//!   warm sequential read and write bandwidth over a window and dependent
//!   random 8-byte read latency over the whole BAR, with `rdtsc`. Cycles are
//!   converted with KVM's TSC frequency (KVM_GET_TSC_KHZ).
//!
//! Outside the guest: the setup time (the run call to the first KVM_RUN:
//! open, plan, mmap, memslots, without pre-fault), and, for VFIO devices
//! where tracefs is writable, vfio-pci's faults by order ([`faults`]).
//!
//! The mode order alternates between repetitions (as given, then reversed)
//! so that the page cache of a file-backed BAR (in the lab, the outer
//! machine's) does not favour one mode. Output: [`output`].

pub mod faults;
pub mod output;
pub mod payload;

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use vmm::config::{BarAlign, DeviceConfig, SerialConfig, ShmemConfig, VfioConfig, VmConfig};
use vmm::report::{BarReport, PageCountsReport};

use self::faults::{FaultCounts, FaultProbe};
use self::payload::PayloadParams;

/// The memory BAR of the shared memory device.
pub const SHMEM_MEMORY_BAR: u8 = 2;

/// Errors of the bench. Each names what to do.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// The device cannot be read from sysfs.
    #[error("cannot read the device: {0}")]
    Sysfs(#[from] resources::sysfs::SysfsError),
    /// The BAR does not exist or is not memory.
    #[error("{device} has no memory BAR {bar}; give --bar with one of: {available}")]
    NoSuchBar {
        device: String,
        /// The BAR asked for.
        bar: u8,
        /// The memory BARs it has.
        available: String,
    },
    /// The payload cannot be generated.
    #[error(transparent)]
    Payload(#[from] payload::PayloadError),
    /// A file of the bench cannot be written.
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    /// KVM's TSC frequency cannot be read.
    #[error(
        "cannot read the TSC frequency from KVM (KVM_GET_TSC_KHZ): {0}; the bench needs /dev/kvm"
    )]
    Tsc(kvm_ioctls::Error),
    /// A VM could not be built.
    #[error("the {mode} VM could not be built: {source}")]
    Vm { mode: BenchMode, source: vmm::Error },
    /// The guest did not finish.
    #[error("the {mode} guest stopped with {reason} before finishing; its output: {console:?}")]
    Guest {
        mode: BenchMode,
        reason: String,
        console: String,
    },
    /// The report lacks the BAR.
    #[error("the {mode} run's report has no BAR {bar}")]
    NotReported { mode: BenchMode, bar: u8 },
    /// The guest found the BAR somewhere else than barge put it.
    #[error("the {mode} guest found BAR {bar} at {seen:#x} but barge placed it at {planned:#x}")]
    Misplaced {
        mode: BenchMode,
        bar: u8,
        /// Where the guest found it.
        seen: u64,
        /// Where the report says it is.
        planned: u64,
    },
}

/// A mapping mode: the `bar-align` cap the VM gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub enum BenchMode {
    /// 4 KiB pages (PTE).
    #[serde(rename = "4k")]
    Size4K,
    /// 2 MiB pages (PMD).
    #[serde(rename = "2m")]
    Size2M,
    /// 1 GiB pages (PUD).
    #[serde(rename = "1g")]
    Size1G,
    /// barge's default: the largest pages the BAR allows.
    #[serde(rename = "auto")]
    Auto,
}

impl BenchMode {
    /// Every mode, in the default order.
    pub const ALL: [BenchMode; 4] = [
        BenchMode::Size4K,
        BenchMode::Size2M,
        BenchMode::Size1G,
        BenchMode::Auto,
    ];

    /// The device's `bar-align`.
    pub fn bar_align(self) -> BarAlign {
        match self {
            BenchMode::Size4K => BarAlign::Size4K,
            BenchMode::Size2M => BarAlign::Size2M,
            BenchMode::Size1G => BarAlign::Size1G,
            BenchMode::Auto => BarAlign::Auto,
        }
    }

    /// The name used on the command line and in the output.
    pub fn name(self) -> &'static str {
        match self {
            BenchMode::Size4K => "4k",
            BenchMode::Size2M => "2m",
            BenchMode::Size1G => "1g",
            BenchMode::Auto => "auto",
        }
    }
}

impl fmt::Display for BenchMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A mode name that is not one of 4k, 2m, 1g, auto.
#[derive(Debug, thiserror::Error)]
#[error("invalid mode {0:?}: use 4k, 2m, 1g or auto (comma-separated, e.g. --modes 4k,1g)")]
pub struct InvalidMode(pub String);

impl FromStr for BenchMode {
    type Err = InvalidMode;

    fn from_str(text: &str) -> Result<Self, InvalidMode> {
        BenchMode::ALL
            .into_iter()
            .find(|m| m.name().eq_ignore_ascii_case(text.trim()))
            .ok_or_else(|| InvalidMode(text.to_string()))
    }
}

/// The device under test.
#[derive(Debug, Clone, PartialEq)]
pub enum BenchDevice {
    /// A host device bound to vfio-pci.
    Vfio(VfioConfig),
    /// barge's shared memory device (the RAM-backed control).
    Shmem(ShmemConfig),
}

impl BenchDevice {
    /// The device in a VM configuration, with `mode`'s `bar-align`.
    pub fn config(&self, mode: BenchMode) -> DeviceConfig {
        match self {
            BenchDevice::Vfio(v) => DeviceConfig::Vfio(VfioConfig {
                bar_align: mode.bar_align(),
                ..v.clone()
            }),
            BenchDevice::Shmem(s) => DeviceConfig::Shmem(ShmemConfig {
                bar_align: mode.bar_align(),
                ..s.clone()
            }),
        }
    }

    /// Its name in the output.
    pub fn name(&self) -> String {
        match self {
            BenchDevice::Vfio(v) => format!("vfio={}", v.bdf),
            BenchDevice::Shmem(s) => format!("shmem {s}"),
        }
    }
}

/// What `barge bench` was asked to do.
#[derive(Debug, Clone, PartialEq)]
pub struct BenchRequest {
    pub device: BenchDevice,
    /// The BAR to measure.
    pub bar: u8,
    /// The modes, in the order of the first repetition.
    pub modes: Vec<BenchMode>,
    /// Repetitions of every mode.
    pub reps: u32,
    /// Bytes of the sequential read/write window.
    pub window: u64,
    /// Passes over the window.
    pub passes: u32,
    /// Random 8-byte reads.
    pub random_reads: u64,
    /// Limit for each VM.
    pub timeout: Duration,
    /// Print JSON instead of the table.
    pub json: bool,
    /// Where to write the SVG chart.
    pub svg: Option<PathBuf>,
    /// Where to write the JSON as well.
    pub json_file: Option<PathBuf>,
}

/// The defaults of `barge bench`'s flags.
pub mod defaults {
    /// Repetitions.
    pub const REPS: u32 = 3;
    /// Sequential window (clamped to the BAR).
    pub const WINDOW: u64 = 64 << 20;
    /// Passes over the window.
    pub const PASSES: u32 = 4;
    /// Random reads.
    pub const RANDOM_READS: u64 = 1 << 20;
    /// Seconds each VM may take.
    pub const TIMEOUT_SECS: u64 = 3600;
}

/// One repetition of one mode.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Sample {
    /// Repetition number (0-based).
    pub rep: u32,
    /// The first-touch VM's run call to its first KVM_RUN (open, plan,
    /// mmap, memslots; no pre-fault), ms.
    pub setup_ms: Option<f64>,
    /// KVM_PRE_FAULT_MEMORY of the whole BAR, ms.
    pub prefault_ms: Option<f64>,
    /// What KVM mapped the BAR with when barge pre-faulted it.
    pub mapped: Option<PageCountsReport>,
    /// vfio-pci faults by order during the pre-fault VM.
    pub prefault_host_faults: Option<FaultCounts>,
    /// vfio-pci faults by order during the first-touch VM.
    pub touch_host_faults: Option<FaultCounts>,
    /// KVM's page counters at the end of the first-touch VM (the whole VM:
    /// the BAR plus a few pages of RAM).
    pub touch_kvm_pages: PageCountsReport,
    /// The guest's first-touch sweep, ms.
    pub first_touch_ms: f64,
    /// Warm sequential reads, GiB/s.
    pub read_gib_s: f64,
    /// Warm sequential writes, GiB/s.
    pub write_gib_s: f64,
    /// Dependent random 8-byte reads, ns each.
    pub random_read_ns: f64,
    /// The guest mapped the BAR with 1 GiB pages (else 2 MiB).
    pub guest_1g_pages: bool,
    /// Where the guest found the BAR.
    pub bar_gpa: u64,
}

/// Median and range of one metric.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Stat {
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

impl Stat {
    /// The statistic of `values`; `None` when empty.
    pub fn of(values: &[f64]) -> Option<Stat> {
        let mut sorted: Vec<f64> = values.iter().copied().filter(|v| v.is_finite()).collect();
        if sorted.is_empty() {
            return None;
        }
        sorted.sort_by(f64::total_cmp);
        let n = sorted.len();
        let median = if n % 2 == 1 {
            sorted[n / 2]
        } else {
            (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0
        };
        Some(Stat {
            median,
            min: sorted[0],
            max: sorted[n - 1],
        })
    }
}

/// A measured quantity.
#[derive(Debug, Clone, Copy)]
pub struct Metric {
    /// JSON key.
    pub key: &'static str,
    /// Human label.
    pub label: &'static str,
    /// Unit.
    pub unit: &'static str,
    /// Whether smaller is better (times) or larger (bandwidth).
    pub lower_is_better: bool,
    /// The value of a sample.
    pub value: fn(&Sample) -> Option<f64>,
}

/// Every metric, in output order.
pub const METRICS: [Metric; 6] = [
    Metric {
        key: "setup_ms",
        label: "setup (open, mmap, memslots)",
        unit: "ms",
        lower_is_better: true,
        value: |s| s.setup_ms,
    },
    Metric {
        key: "prefault_ms",
        label: "pre-fault whole BAR",
        unit: "ms",
        lower_is_better: true,
        value: |s| s.prefault_ms,
    },
    Metric {
        key: "first_touch_ms",
        label: "guest first touch (no pre-fault)",
        unit: "ms",
        lower_is_better: true,
        value: |s| Some(s.first_touch_ms),
    },
    Metric {
        key: "read_gib_s",
        label: "warm sequential read",
        unit: "GiB/s",
        lower_is_better: false,
        value: |s| Some(s.read_gib_s),
    },
    Metric {
        key: "write_gib_s",
        label: "warm sequential write",
        unit: "GiB/s",
        lower_is_better: false,
        value: |s| Some(s.write_gib_s),
    },
    Metric {
        key: "random_read_ns",
        label: "warm random 8-byte read",
        unit: "ns",
        lower_is_better: true,
        value: |s| Some(s.random_read_ns),
    },
];

/// All repetitions of one mode and their statistics.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ModeResult {
    pub mode: BenchMode,
    /// Per repetition.
    pub samples: Vec<Sample>,
    /// Per metric key.
    pub stats: BTreeMap<String, Stat>,
}

impl ModeResult {
    fn new(mode: BenchMode, samples: Vec<Sample>) -> Self {
        let stats = METRICS
            .iter()
            .filter_map(|m| {
                let values: Vec<f64> = samples.iter().filter_map(m.value).collect();
                Stat::of(&values).map(|s| (m.key.to_string(), s))
            })
            .collect();
        ModeResult {
            mode,
            samples,
            stats,
        }
    }

    /// The median of `key`.
    pub fn median(&self, key: &str) -> Option<f64> {
        self.stats.get(key).map(|s| s.median)
    }
}

/// The ratios the bench is judged by (4 KiB over 1 GiB mode, medians).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Ratios {
    /// Pre-fault time 4k / 1g.
    pub prefault_4k_over_1g: Option<f64>,
    /// First-touch time 4k / 1g.
    pub first_touch_4k_over_1g: Option<f64>,
    /// Warm random-read latency 4k / 1g.
    pub random_read_4k_over_1g: Option<f64>,
}

/// Everything the bench measured.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BenchResult {
    pub device: String,
    pub bar: u8,
    /// Its size in bytes.
    pub bar_size: u64,
    /// KVM's TSC frequency the guest's cycles were converted with.
    pub tsc_khz: u32,
    /// Repetitions.
    pub reps: u32,
    /// How the mode order was varied.
    pub order: String,
    /// Sequential window in bytes.
    pub window: u64,
    /// Passes over the window.
    pub passes: u32,
    /// Random reads.
    pub random_reads: u64,
    /// How host faults were counted, or why not.
    pub host_faults: String,
    /// Per mode.
    pub modes: Vec<ModeResult>,
    /// 4k/1g ratios.
    pub ratios: Ratios,
}

impl BenchResult {
    /// The result for `mode`.
    pub fn mode(&self, mode: BenchMode) -> Option<&ModeResult> {
        self.modes.iter().find(|m| m.mode == mode)
    }

    fn ratio(&self, key: &str) -> Option<f64> {
        let slow = self.mode(BenchMode::Size4K)?.median(key)?;
        let fast = self.mode(BenchMode::Size1G)?.median(key)?;
        (fast > 0.0).then_some(slow / fast)
    }
}

/// KVM's TSC frequency: none on aarch64, where the bench's payload does not run.
#[cfg(not(target_arch = "x86_64"))]
pub fn kvm_tsc_khz() -> Result<u32, BenchError> {
    Err(BenchError::Payload(
        payload::PayloadError::NotThisArchitecture,
    ))
}

/// KVM's TSC frequency (a throwaway VM with one vCPU).
#[cfg(target_arch = "x86_64")]
pub fn kvm_tsc_khz() -> Result<u32, BenchError> {
    let kvm = kvm_ioctls::Kvm::new().map_err(BenchError::Tsc)?;
    let vm = kvm.create_vm().map_err(BenchError::Tsc)?;
    let vcpu = vm.create_vcpu(0).map_err(BenchError::Tsc)?;
    vcpu.get_tsc_khz().map_err(BenchError::Tsc)
}

/// The size of the BAR under test.
pub fn bar_size(device: &BenchDevice, bar: u8, sysfs_root: &Path) -> Result<u64, BenchError> {
    match device {
        BenchDevice::Shmem(s) if bar == SHMEM_MEMORY_BAR => Ok(s.size),
        BenchDevice::Shmem(_) => Err(BenchError::NoSuchBar {
            device: "the shared memory device".into(),
            bar,
            available: SHMEM_MEMORY_BAR.to_string(),
        }),
        BenchDevice::Vfio(v) => {
            let host = resources::sysfs::read_device(&v.bdf, sysfs_root)?;
            let memory: Vec<_> = host.bars.iter().filter(|b| b.is_mem()).collect();
            memory
                .iter()
                .find(|b| b.index == bar)
                .map(|b| b.size)
                .ok_or_else(|| BenchError::NoSuchBar {
                    device: v.bdf.clone(),
                    bar,
                    available: memory
                        .iter()
                        .map(|b| b.index.to_string())
                        .collect::<Vec<_>>()
                        .join(", "),
                })
        }
    }
}

/// The `bench.KEY=HEX` lines of the guest's output.
pub fn parse_guest_values(console: &str) -> BTreeMap<String, u64> {
    console
        .lines()
        .filter_map(|l| l.trim().strip_prefix("bench."))
        .filter_map(|l| l.split_once('='))
        .filter_map(|(k, v)| Some((k.to_string(), u64::from_str_radix(v.trim(), 16).ok()?)))
        .collect()
}

/// The modes of repetition `rep`: as given, reversed every other time.
pub fn mode_order(modes: &[BenchMode], rep: u32) -> Vec<BenchMode> {
    let mut order = modes.to_vec();
    if rep % 2 == 1 {
        order.reverse();
    }
    order
}

/// What one bench VM measured: the guest's values, the BAR's report, KVM's page counters, the setup time and the host fault counts.
struct BenchVmResult {
    values: BTreeMap<String, u64>,
    bar: BarReport,
    kvm_pages: PageCountsReport,
    setup_ms: Option<f64>,
    host_faults: Option<FaultCounts>,
}

/// Runs the bench.
pub struct Bench<'a> {
    request: &'a BenchRequest,
    dir: PathBuf,
    probe: Option<FaultProbe>,
    tsc_khz: u32,
    bar_size: u64,
    progress: Box<dyn FnMut(&str) + 'a>,
}

impl<'a> Bench<'a> {
    /// Prepares the bench: the BAR's size (sysfs for VFIO), KVM's TSC
    /// frequency, the payloads in `dir`, the fault probe at `tracefs`
    /// (VFIO only; `None` skips it). `progress` gets a line per VM.
    pub fn new(
        request: &'a BenchRequest,
        dir: &Path,
        sysfs_root: &Path,
        tracefs: Option<&Path>,
        progress: impl FnMut(&str) + 'a,
    ) -> Result<(Self, String), BenchError> {
        let bar_size = bar_size(&request.device, request.bar, sysfs_root)?;
        let tsc_khz = kvm_tsc_khz()?;
        std::fs::create_dir_all(dir).map_err(|source| BenchError::Write {
            path: dir.to_path_buf(),
            source,
        })?;
        for measure in [false, true] {
            let params = PayloadParams {
                bar_index: request.bar,
                bar_size,
                measure,
                window: request.window,
                passes: request.passes,
                random_reads: request.random_reads,
            };
            let path = dir.join(payload_name(measure));
            std::fs::write(&path, payload::payload_elf(&params)?)
                .map_err(|source| BenchError::Write { path, source })?;
        }
        let (probe, note) = match (&request.device, tracefs) {
            (BenchDevice::Shmem(_), _) => {
                (None, "not counted: shared memory is not vfio-pci".into())
            }
            (BenchDevice::Vfio(_), None) => (None, "not counted: no tracefs given".into()),
            (BenchDevice::Vfio(_), Some(root)) => match FaultProbe::install(root) {
                Ok(probe) => {
                    let method = probe.method().to_string();
                    (Some(probe), method)
                }
                Err(e) => (None, format!("not counted: {e}")),
            },
        };
        Ok((
            Bench {
                request,
                dir: dir.to_path_buf(),
                probe,
                tsc_khz,
                bar_size,
                progress: Box::new(progress),
            },
            note,
        ))
    }

    /// Runs every repetition of every mode.
    pub fn run(mut self, host_faults: String) -> Result<BenchResult, BenchError> {
        let request = self.request;
        let mut samples: BTreeMap<BenchMode, Vec<Sample>> = BTreeMap::new();
        for rep in 0..request.reps {
            for mode in mode_order(&request.modes, rep) {
                let sample = self.sample(mode, rep)?;
                samples.entry(mode).or_default().push(sample);
            }
        }
        let modes = request
            .modes
            .iter()
            .map(|m| ModeResult::new(*m, samples.remove(m).unwrap_or_default()))
            .collect();
        let order = if request.reps > 1 {
            "alternating: modes as given in even repetitions, reversed in odd ones".to_string()
        } else {
            "as given (one repetition: not alternated)".to_string()
        };
        let mut result = BenchResult {
            device: request.device.name(),
            bar: request.bar,
            bar_size: self.bar_size,
            tsc_khz: self.tsc_khz,
            reps: request.reps,
            order,
            window: PayloadParams {
                bar_index: request.bar,
                bar_size: self.bar_size,
                measure: true,
                window: request.window,
                passes: request.passes,
                random_reads: request.random_reads,
            }
            .effective_window(),
            passes: request.passes.max(1),
            random_reads: request.random_reads.max(1),
            host_faults,
            modes,
            ratios: Ratios::default(),
        };
        result.ratios = Ratios {
            prefault_4k_over_1g: result.ratio("prefault_ms"),
            first_touch_4k_over_1g: result.ratio("first_touch_ms"),
            random_read_4k_over_1g: result.ratio("random_read_ns"),
        };
        Ok(result)
    }

    fn sample(&mut self, mode: BenchMode, rep: u32) -> Result<Sample, BenchError> {
        (self.progress)(&format!(
            "rep {}/{} mode {mode}: pre-fault VM",
            rep + 1,
            self.request.reps
        ));
        let prefaulted = self.run_vm(mode, false)?;
        (self.progress)(&format!(
            "rep {}/{} mode {mode}: first-touch VM",
            rep + 1,
            self.request.reps
        ));
        let touched = self.run_vm(mode, true)?;
        let value = |key: &str| touched.values.get(key).copied().unwrap_or(0) as f64;
        let ms = |cycles: f64| cycles / f64::from(self.tsc_khz);
        let window_bytes = (self.request.window.min(self.bar_size) & !63).max(64) as f64
            * f64::from(self.request.passes.max(1));
        let gib_s = |cycles: f64| {
            let seconds = ms(cycles) / 1000.0;
            if seconds > 0.0 {
                window_bytes / f64::from(1u32 << 30) / seconds
            } else {
                f64::INFINITY
            }
        };
        Ok(Sample {
            rep,
            setup_ms: touched.setup_ms,
            prefault_ms: prefaulted.bar.prefault_ms,
            mapped: prefaulted.bar.mapped,
            prefault_host_faults: prefaulted.host_faults,
            touch_host_faults: touched.host_faults,
            touch_kvm_pages: touched.kvm_pages,
            first_touch_ms: ms(value("first_touch_cycles")),
            read_gib_s: gib_s(value("read_cycles")),
            write_gib_s: gib_s(value("write_cycles")),
            random_read_ns: ms(value("random_cycles")) * 1e6
                / self.request.random_reads.max(1) as f64,
            guest_1g_pages: touched.values.get("gbpages") == Some(&1),
            bar_gpa: touched.values.get("bar_gpa").copied().unwrap_or(0),
        })
    }

    fn run_vm(&mut self, mode: BenchMode, measure: bool) -> Result<BenchVmResult, BenchError> {
        let mut config = VmConfig::new(self.dir.join(payload_name(measure)));
        config.memory.size = payload::GUEST_MEMORY;
        config.serial = SerialConfig::Disabled;
        config.cmdline = String::new();
        config.devices = vec![self.request.device.config(mode)];
        config.prefault_bars = !measure;
        let console = Arc::new(Mutex::new(Vec::new()));
        if let Some(probe) = &self.probe {
            probe.reset();
        }
        let called = Instant::now();
        let outcome = vmm::Vm::new(config)
            .console_buffer(console.clone())
            .run_with_timeout(self.request.timeout)
            .map_err(|source| BenchError::Vm { mode, source })?;
        let host_faults = self.probe.as_ref().map(FaultProbe::counts);
        let console = String::from_utf8_lossy(&console.lock().unwrap_or_else(|p| p.into_inner()))
            .into_owned();
        let values = parse_guest_values(&console);
        if outcome.exit.reason != "poweroff" || values.get("done") != Some(&1) {
            return Err(BenchError::Guest {
                mode,
                reason: outcome.exit.reason,
                console,
            });
        }
        let report = &outcome.report;
        let bar = report
            .devices
            .first()
            .and_then(|d| d.bars.iter().find(|b| b.index == self.request.bar))
            .cloned()
            .ok_or(BenchError::NotReported {
                mode,
                bar: self.request.bar,
            })?;
        let seen = values.get("bar_gpa").copied().unwrap_or(0);
        if seen != bar.gpa {
            return Err(BenchError::Misplaced {
                mode,
                bar: self.request.bar,
                seen,
                planned: bar.gpa,
            });
        }
        // start_to_first_run_ms counts from the process start when barge's
        // main marked it, else from this call.
        let offset_ms = vmm::process_start()
            .map(|start| called.saturating_duration_since(start).as_secs_f64() * 1000.0)
            .unwrap_or(0.0);
        let setup_ms = report
            .start_to_first_run_ms
            .map(|ms| (ms as f64 - offset_ms).max(0.0));
        let stat = |name: &str| report.kvm_stats.get(name).copied().unwrap_or(0);
        Ok(BenchVmResult {
            values,
            bar,
            kvm_pages: PageCountsReport {
                pages_4k: stat("pages_4k"),
                pages_2m: stat("pages_2m"),
                pages_1g: stat("pages_1g"),
            },
            setup_ms,
            host_faults,
        })
    }
}

fn payload_name(measure: bool) -> &'static str {
    if measure {
        "bench-touch.elf"
    } else {
        "bench-prefault.elf"
    }
}

/// Runs `barge bench` as the CLI does: progress on stderr, the table or
/// JSON as the returned text, the SVG written where asked.
pub fn run(request: &BenchRequest) -> Result<String, BenchError> {
    let dir = std::env::temp_dir().join(format!("barge-bench-{}", std::process::id()));
    let tracefs = Path::new(faults::TRACEFS);
    let result = {
        let (bench, note) = Bench::new(request, &dir, Path::new("/sys"), Some(tracefs), |line| {
            eprintln!("barge bench: {line}")
        })?;
        bench.run(note)
    };
    let _ = std::fs::remove_dir_all(&dir);
    let result = result?;
    let files = [
        (&request.svg, output::svg as fn(&BenchResult) -> String),
        (&request.json_file, output::json),
    ];
    for (path, render) in files {
        if let Some(path) = path {
            std::fs::write(path, render(&result)).map_err(|source| BenchError::Write {
                path: path.clone(),
                source,
            })?;
        }
    }
    Ok(if request.json {
        output::json(&result)
    } else {
        output::table(&result)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_parse_and_alternate() {
        assert_eq!("4K".parse::<BenchMode>().unwrap(), BenchMode::Size4K);
        assert_eq!(" auto".parse::<BenchMode>().unwrap(), BenchMode::Auto);
        let err = "3m".parse::<BenchMode>().unwrap_err().to_string();
        assert!(err.contains("use 4k, 2m, 1g or auto"), "{err}");
        assert_eq!(mode_order(&BenchMode::ALL, 0), BenchMode::ALL.to_vec());
        let reversed: Vec<_> = BenchMode::ALL.into_iter().rev().collect();
        assert_eq!(mode_order(&BenchMode::ALL, 1), reversed);
    }

    #[test]
    fn stats_give_median_and_range() {
        let s = Stat::of(&[3.0, 1.0, 2.0]).unwrap();
        assert_eq!((s.median, s.min, s.max), (2.0, 1.0, 3.0));
        assert_eq!(Stat::of(&[4.0, 1.0]).unwrap().median, 2.5);
        assert!(Stat::of(&[]).is_none());
        assert!(Stat::of(&[f64::INFINITY]).is_none());
    }

    #[test]
    fn guest_values_are_hex_and_other_lines_are_ignored() {
        let values = parse_guest_values(
            "bench.bar_gpa=0000000100000000\nnoise\nbench.first_touch_cycles=00000000000003e8\nbench.bad=zz\n",
        );
        assert_eq!(values.get("bar_gpa"), Some(&(1 << 32)));
        assert_eq!(values.get("first_touch_cycles"), Some(&1000));
        assert_eq!(values.len(), 2);
    }

    #[test]
    fn devices_get_the_mode_as_bar_align_and_shmem_has_bar_2() {
        let shmem = BenchDevice::Shmem("size=2M".parse().unwrap());
        let DeviceConfig::Shmem(config) = shmem.config(BenchMode::Size4K) else {
            panic!("shmem expected");
        };
        assert_eq!(config.bar_align, BarAlign::Size4K);
        assert_eq!(bar_size(&shmem, 2, Path::new("/sys")).unwrap(), 2 << 20);
        let err = bar_size(&shmem, 0, Path::new("/sys")).unwrap_err();
        assert!(
            err.to_string().contains("give --bar with one of: 2"),
            "{err}"
        );
        let vfio = BenchDevice::Vfio("vfio=41:00.0".parse().unwrap());
        let DeviceConfig::Vfio(config) = vfio.config(BenchMode::Size2M) else {
            panic!("vfio expected");
        };
        assert_eq!(config.bar_align, BarAlign::Size2M);
        assert_eq!(vfio.name(), "vfio=0000:41:00.0");
    }

    #[test]
    fn vfio_bar_size_comes_from_sysfs() {
        let root = std::env::temp_dir().join(format!("barge-bench-sysfs-{}", std::process::id()));
        let dev = root.join("bus/pci/devices/0000:41:00.0");
        std::fs::create_dir_all(&dev).unwrap();
        // BAR0 256 bytes 32-bit, BAR2 1 GiB 64-bit prefetchable memory.
        std::fs::write(
            dev.join("resource"),
            "0x00000000fe000000 0x00000000fe0000ff 0x0000000000040200\n\
             0x0000000000000000 0x0000000000000000 0x0000000000000000\n\
             0x0000004000000000 0x000000403fffffff 0x000000000014220c\n",
        )
        .unwrap();
        let vfio = BenchDevice::Vfio("vfio=41:00.0".parse().unwrap());
        assert_eq!(bar_size(&vfio, 2, &root).unwrap(), 1 << 30);
        let err = bar_size(&vfio, 1, &root).unwrap_err().to_string();
        assert!(err.contains("no memory BAR 1"), "{err}");
        assert!(err.contains("one of: 0, 2"), "{err}");
        let _ = std::fs::remove_dir_all(&root);
    }
}
