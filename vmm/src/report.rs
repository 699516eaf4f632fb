//! The JSON report `barge run --report PATH` writes when the VM ends.
//!
//! ```json
//! {
//!   "exit": { "reason": "poweroff", "status": 0 },
//!   "wall_ms": 5123,
//!   "start_to_first_run_ms": 41,
//!   "phases_ms": { "startup": 0, "checks": 2, "create_vm": 5, "open_devices": 1, "plan": 0,
//!                  "ram_allocation": 1, "ram_dma_map": 0, "bar_mapping": 3, "kernel_load": 12,
//!                  "vcpu_create": 4, "prefault": 1, "vcpu_start": 11 },
//!   "memory": [
//!     { "gpa": 0, "size": 536870912, "backing": "anonymous", "page_size": 4096 }
//!   ],
//!   "kvm_stats": { "pages_4k": 1200, "pages_2m": 250, "pages_1g": 0 },
//!   "devices": [
//!     { "bdf": "shmem0", "kind": "shmem", "guest_bdf": "0000:00:01.0", "vfio_backend": null,
//!       "bars": [
//!         { "index": 2, "size": 8589934592, "gpa": 68719476736, "hva": 140668768403456,
//!           "trapped": false, "planned_page_size": 1073741824,
//!           "planned":  { "pages_4k": 0, "pages_2m": 0, "pages_1g": 8 },
//!           "best_possible": { "pages_4k": 0, "pages_2m": 0, "pages_1g": 8 },
//!           "mapped":   { "pages_4k": 0, "pages_2m": 0, "pages_1g": 8 },
//!           "slots": 1, "slot_updates": 1, "huge_ok": true, "prefault_ms": 0.4,
//!           "p2p": null } ] }
//!   ]
//! }
//! ```
//!
//! `mapped` is measured, not inferred: after the memslots exist and before
//! the guest runs, barge pre-faults each BAR with KVM_PRE_FAULT_MEMORY and
//! takes the change of KVM's `pages_*` counters (see `bar_mapping`).
//! `huge_ok` says it equals `planned`; `best_possible` is what the BAR's
//! placement would allow without a `bar-align` cap (larger than `planned`
//! only for a BAR capped on purpose).
//!
//! Addresses and sizes are integers (bytes). `kvm_stats` holds KVM's own VM
//! counters by their KVM names (see `kvm_stats`).

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Errors writing the report.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    /// The report file cannot be created or written.
    #[error("cannot write the report to {path}: {source}; give --report a path in an existing, writable directory")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The report path is a directory.
    #[error("cannot write the report to {path}: it is a directory; give --report a file path")]
    IsDirectory { path: PathBuf },
}

/// Everything barge reports about one run.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// Why the VM ended and barge's exit status.
    pub exit: ExitReport,
    /// Wall time from process start to the VM's end, in milliseconds.
    pub wall_ms: u64,
    /// Process start to the first KVM_RUN, in milliseconds; `null` when no
    /// vCPU ever ran.
    pub start_to_first_run_ms: Option<u64>,
    /// Where the time to the first KVM_RUN went, step by step (the first
    /// boot's); `null` when no vCPU ever ran. The phases are back to back:
    /// they add up to `start_to_first_run_ms` at most (each is rounded
    /// down).
    #[serde(default)]
    pub phases_ms: Option<PhasesReport>,
    /// Guest RAM regions in address order.
    pub memory: Vec<MemoryRegionReport>,
    /// KVM's VM statistics at exit, by KVM's names (pages_4k, pages_2m, ...).
    pub kvm_stats: BTreeMap<String, u64>,
    /// Passthrough and shared-memory devices, in guest device order.
    pub devices: Vec<DeviceReport>,
    /// Guest RAM mapped into the passed-through devices' IOMMU domain
    /// (IOVA = GPA) before the guest ran; `null` without VFIO devices.
    #[serde(default)]
    pub dma: Option<DmaReport>,
}

/// The boot's phases from the process start to the first KVM_RUN, in
/// milliseconds, in boot order.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PhasesReport {
    /// Process start to the boot sequence (command line, configuration).
    pub startup: u64,
    /// Configuration, kernel format, report path, seccomp filters.
    pub checks: u64,
    /// /dev/kvm, CPUID, KVM_CREATE_VM.
    pub create_vm: u64,
    /// Opening VFIO devices, images, taps and shared memory.
    pub open_devices: u64,
    /// Placing the MMIO windows and BARs.
    pub plan: u64,
    /// Guest RAM allocation and its memslots.
    pub ram_allocation: u64,
    /// Guest RAM mapped into the IOMMU for device DMA (`dma.ms`, whole).
    pub ram_dma_map: u64,
    /// The rest of the devices' attachment: BAR mmaps and memslots, P2P
    /// DMA maps of BARs, interrupts.
    pub bar_mapping: u64,
    /// Kernel, initramfs, command line, ACPI and boot structures.
    pub kernel_load: u64,
    /// Buses, PCI segment, vCPUs.
    pub vcpu_create: u64,
    /// Pre-faulting the BARs and reading KVM's counters.
    pub prefault: u64,
    /// vCPU threads started, to the first KVM_RUN.
    pub vcpu_start: u64,
}

impl PhasesReport {
    /// (name, milliseconds) of each phase, in boot order.
    pub fn fields(&self) -> [(&'static str, u64); 12] {
        [
            ("startup", self.startup),
            ("checks", self.checks),
            ("create_vm", self.create_vm),
            ("open_devices", self.open_devices),
            ("plan", self.plan),
            ("ram_allocation", self.ram_allocation),
            ("ram_dma_map", self.ram_dma_map),
            ("bar_mapping", self.bar_mapping),
            ("kernel_load", self.kernel_load),
            ("vcpu_create", self.vcpu_create),
            ("prefault", self.prefault),
            ("vcpu_start", self.vcpu_start),
        ]
    }

    /// The phases' sum.
    pub fn total(&self) -> u64 {
        self.fields().iter().map(|(_, ms)| ms).sum()
    }

    /// One line: `boot phases (ms): startup 0, checks 2, ... = 41 of 41 to
    /// the first KVM_RUN; longest: prefault`.
    pub fn summary_line(&self, start_to_first_run_ms: u64) -> String {
        let fields = self.fields();
        let list: Vec<String> = fields
            .iter()
            .map(|(name, ms)| format!("{name} {ms}"))
            .collect();
        let longest = fields
            .iter()
            .max_by_key(|(_, ms)| *ms)
            .map(|(name, _)| *name)
            .unwrap_or("startup");
        format!(
            "boot phases (ms): {} = {} of {start_to_first_run_ms} to the first KVM_RUN; longest: {longest}",
            list.join(", "),
            self.total()
        )
    }
}

/// The IOMMU mapping of guest RAM for device DMA.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DmaReport {
    /// How each IOMMU domain mapped it: `type1-vaddr` (legacy container),
    /// `iommufd-vaddr` (IOMMU_IOAS_MAP of the address range) or
    /// `iommufd-memfd` (IOMMU_IOAS_MAP_FILE of memfd RAM, Linux 6.13+);
    /// joined with `+` when the VM has both a container and an IOAS.
    pub method: String,
    /// RAM regions mapped.
    pub regions: usize,
    /// Bytes mapped.
    pub bytes: u64,
    /// Time the mapping took, in milliseconds.
    pub ms: f64,
    /// `bytes` per second of that time, in GiB/s.
    pub gib_per_s: f64,
}

/// How the VM ended.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitReport {
    /// A short reason, e.g. "poweroff", "reboot", "triple-fault", "timeout".
    pub reason: String,
    /// The exit status barge returns.
    pub status: i32,
}

/// One guest RAM region and how it is backed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryRegionReport {
    /// Guest physical address.
    pub gpa: u64,
    /// Size in bytes.
    pub size: u64,
    /// Backing name, e.g. "anonymous", "hugetlbfs", "memfd", "memfd-hugetlbfs".
    pub backing: String,
    /// Page size of the host mapping in bytes (4096 for ordinary pages,
    /// even when transparent huge pages may back parts of it).
    pub page_size: u64,
}

/// One PCI device (VFIO or shared memory) and how its BARs got mapped.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DeviceReport {
    /// The host PCI address for VFIO devices; the device's name (`shmem0`,
    /// ...) for shared memory.
    pub bdf: String,
    /// `vfio` or `shmem`.
    pub kind: String,
    /// Where the guest sees it, e.g. `0000:00:01.0`.
    pub guest_bdf: String,
    /// For a VFIO device, the interface it was opened with: `legacy`
    /// (container and group) or `iommufd` (device cdev); `null` otherwise.
    pub vfio_backend: Option<String>,
    /// Its memory BARs, by index.
    pub bars: Vec<BarReport>,
    /// What a virtio device served during the run; absent for other
    /// devices.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub virtio: Option<VirtioReport>,
}

/// What a virtio device served, counted by its worker thread.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtioReport {
    /// Requests completed: block requests, or network frames (both ways).
    pub requests: u64,
    /// Of those, completed with an error status (block) or dropped (net).
    pub errors: u64,
    /// Bytes from guest memory to the backend: written to the image, or
    /// sent on the tap.
    pub bytes_from_guest: u64,
    /// Bytes from the backend into guest memory: read from the image, or
    /// received from the tap.
    pub bytes_to_guest: u64,
}

/// A BAR's mapping into the IOMMU domain for peer-to-peer DMA (other
/// devices writing into it).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct P2pReport {
    /// How: `type1-vaddr` (the container maps the BAR's mmap) or
    /// `iommufd-dmabuf` (IOMMU_IOAS_MAP_FILE of a dma-buf vfio-pci exports
    /// for the BAR, Linux 6.19+); joined with `+` for both domains.
    pub method: String,
    /// Bytes mapped (every mmap-able area of the BAR).
    pub bytes: u64,
    /// Time the mapping took, in milliseconds.
    pub ms: f64,
    /// With `p2p=background` only: when the mapping was done, in
    /// milliseconds after the first KVM_RUN (negative: before it). Until
    /// then a device's DMA into the BAR faulted in the IOMMU. `null` when
    /// the BAR was mapped before the guest ran.
    #[serde(default)]
    pub ready_after_first_run_ms: Option<f64>,
}

/// Page counts: how many pages of each size map something.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PageCountsReport {
    /// 4 KiB pages.
    pub pages_4k: u64,
    /// 2 MiB pages.
    pub pages_2m: u64,
    /// 1 GiB pages.
    pub pages_1g: u64,
}

impl PageCountsReport {
    /// Bytes these pages cover.
    pub fn bytes(&self) -> u64 {
        self.pages_4k * 4096 + self.pages_2m * (2 << 20) + self.pages_1g * (1 << 30)
    }
}

impl From<resources::placement::PageCounts> for PageCountsReport {
    fn from(c: resources::placement::PageCounts) -> Self {
        PageCountsReport {
            pages_4k: c.pages_4k,
            pages_2m: c.pages_2m,
            pages_1g: c.pages_1g,
        }
    }
}

/// The host page table's pages for a BAR, counted from vfio-pci's fault
/// handler (`pci_devices::bar_mapping`, `machine::host_faults`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostMappedReport {
    /// How they were counted.
    pub method: String,
    /// Pages the handler mapped, by size.
    pub pages: PageCountsReport,
    /// Calls that could not map their order and fell back to a smaller
    /// one (a misaligned address or host resource).
    pub fallbacks: u64,
}

/// One BAR: where it is, what barge planned and what KVM mapped.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct BarReport {
    /// BAR index.
    pub index: u8,
    /// Size in bytes.
    pub size: u64,
    /// Guest physical address.
    pub gpa: u64,
    /// Host virtual address of the BAR's mapping; 0 when trapped.
    pub hva: u64,
    /// No memslot: every access is emulated (sub-page BARs, nothing mmap-able).
    pub trapped: bool,
    /// The largest page the plan allows (bytes); 0 when trapped.
    pub planned_page_size: u64,
    /// The plan's page counts (with any bar-align cap): what `huge_ok`
    /// compares against.
    pub planned: PageCountsReport,
    /// The best page counts this BAR's placement allows without a
    /// bar-align cap: equal to `planned` unless bar-align caps the BAR on
    /// purpose.
    pub best_possible: PageCountsReport,
    /// What KVM mapped when barge pre-faulted the BAR (the change of KVM's
    /// pages_4k/2m/1g counters); `null` when it could not pre-fault.
    pub mapped: Option<PageCountsReport>,
    /// What `huge_ok` rests on: `kvm_prefault` (KVM_PRE_FAULT_MEMORY and
    /// KVM's page counters, `mapped`), `host_faults` (vfio-pci's fault
    /// handler on the BAR's host mapping, `host_mapped`: where KVM cannot
    /// pre-fault or count, as on aarch64; KVM's own table is `stage2`),
    /// `trapped` (nothing to map), or `none` (nothing measured: `huge_ok`
    /// is false).
    #[serde(default)]
    pub proof: String,
    /// The host page table's pages for the BAR before the guest ran, from
    /// the calls of vfio-pci's fault handler on its mapping (the P2P DMA
    /// map faults the whole BAR in); `null` when they were not counted.
    #[serde(default)]
    pub host_mapped: Option<HostMappedReport>,
    /// KVM's stage-2 entries over the BAR's guest physical range once the
    /// vCPUs stopped, by size, read from the kernel's stage-2 dump
    /// (`machine::stage2`: arm64 kernels with
    /// CONFIG_PTDUMP_STAGE2_DEBUGFS): what the guest touched, at the block
    /// size KVM chose; `null` where the kernel has no dump (x86, whose
    /// proof is `mapped`, and every Debian kernel). On arm64 KVM picks a
    /// BAR's block size from the alignment of its host mapping and memslot,
    /// so it can differ from `host_mapped`.
    #[serde(default)]
    pub stage2: Option<PageCountsReport>,
    /// Memslots the BAR has (one per mmap-able area).
    pub slots: u32,
    /// KVM_SET_USER_MEMORY_REGION calls barge issued for this BAR's slots
    /// over the whole run (sets, resizes and deletes, counted where the
    /// ioctl is issued): equal to `slots` (1 for a BAR in one piece) when
    /// nothing was torn down and re-created.
    pub slot_updates: u32,
    /// KVM got what was planned: `mapped` equals `planned` (false when
    /// `mapped` is null).
    pub huge_ok: bool,
    /// How long the pre-fault took, in milliseconds.
    pub prefault_ms: Option<f64>,
    /// Its peer-to-peer DMA mapping; `null` when it has none (`p2p=off`, a
    /// trapped BAR, not a VFIO device, or a refusal with `p2p=auto`: then
    /// `warning` says why).
    pub p2p: Option<P2pReport>,
    /// When `mapped` differs from `planned`, or a `p2p=auto` mapping was
    /// refused, why (also on stderr).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warning: Option<String>,
    /// For a BAR that got its plan while `bar-align` caps it below
    /// `best_possible`: what the cap costs (information, not a shortfall;
    /// also in the log at info level).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

impl Report {
    /// The report as pretty JSON.
    pub fn to_json_string(&self) -> String {
        // Plain structs, string keys: serialization cannot fail; never panic.
        serde_json::to_string_pretty(self).unwrap_or_else(|_| "{}".to_string())
    }

    /// Writes the report as pretty JSON to `path`, replacing the file.
    pub fn write_to(&self, path: impl AsRef<Path>) -> Result<(), ReportError> {
        let path = path.as_ref();
        if path.is_dir() {
            return Err(ReportError::IsDirectory {
                path: path.to_path_buf(),
            });
        }
        let write_error = |source| ReportError::Write {
            path: path.to_path_buf(),
            source,
        };
        let mut file = File::create(path).map_err(write_error)?;
        let mut json = self.to_json_string();
        json.push('\n');
        file.write_all(json.as_bytes()).map_err(write_error)?;
        file.flush().map_err(write_error)
    }
}

/// Checks, before the VM boots, that a report can be written to `path`:
/// the path is not a directory and the file can be opened for writing. An
/// existing file is left untouched; a file this check creates is removed.
pub fn check_writable(path: impl AsRef<Path>) -> Result<(), ReportError> {
    let path = path.as_ref();
    if path.is_dir() {
        return Err(ReportError::IsDirectory {
            path: path.to_path_buf(),
        });
    }
    let existed = path.exists();
    OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(|source| ReportError::Write {
            path: path.to_path_buf(),
            source,
        })?;
    if !existed {
        // Best effort: a leftover empty file is harmless.
        let _ = std::fs::remove_file(path);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("barge-report-test-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create temp dir");
        dir
    }

    fn sample_report() -> Report {
        Report {
            exit: ExitReport {
                reason: "poweroff".into(),
                status: 0,
            },
            wall_ms: 1234,
            start_to_first_run_ms: Some(56),
            phases_ms: Some(PhasesReport {
                checks: 2,
                ram_dma_map: 3,
                vcpu_start: 50,
                ..Default::default()
            }),
            memory: vec![MemoryRegionReport {
                gpa: 0,
                size: 512 << 20,
                backing: "anonymous".into(),
                page_size: 4096,
            }],
            kvm_stats: BTreeMap::from([("pages_4k".to_string(), 10), ("pages_2m".to_string(), 3)]),
            devices: vec![DeviceReport {
                bdf: "shmem0".into(),
                kind: "shmem".into(),
                guest_bdf: "0000:00:01.0".into(),
                vfio_backend: None,
                virtio: None,
                bars: vec![BarReport {
                    index: 2,
                    size: 8 << 30,
                    gpa: 64 << 30,
                    hva: 0x7f00_0000_0000,
                    planned_page_size: 1 << 30,
                    planned: PageCountsReport {
                        pages_1g: 8,
                        ..Default::default()
                    },
                    best_possible: PageCountsReport {
                        pages_1g: 8,
                        ..Default::default()
                    },
                    mapped: Some(PageCountsReport {
                        pages_1g: 8,
                        ..Default::default()
                    }),
                    slots: 1,
                    slot_updates: 1,
                    huge_ok: true,
                    prefault_ms: Some(0.5),
                    ..Default::default()
                }],
            }],
            dma: Some(DmaReport {
                method: "type1-vaddr".into(),
                regions: 1,
                bytes: 512 << 20,
                ms: 2.0,
                gib_per_s: 250.0,
            }),
        }
    }

    #[test]
    fn report_json_has_the_documented_shape() {
        let value: serde_json::Value =
            serde_json::from_str(&sample_report().to_json_string()).unwrap();
        assert_eq!(value["exit"]["reason"], "poweroff");
        assert_eq!(value["exit"]["status"], 0);
        assert_eq!(value["wall_ms"], 1234);
        assert_eq!(value["start_to_first_run_ms"], 56);
        let phases = value["phases_ms"].as_object().unwrap();
        assert_eq!(phases.len(), 12);
        // Written in boot order, one key per field.
        let json = sample_report().to_json_string();
        let at: Vec<usize> = PhasesReport::default()
            .fields()
            .iter()
            .map(|(name, _)| json.find(&format!("\"{name}\":")).unwrap())
            .collect();
        assert!(at.windows(2).all(|w| w[0] < w[1]), "{json}");
        assert_eq!(phases["ram_dma_map"], 3);
        assert_eq!(phases["vcpu_start"], 50);
        assert_eq!(value["memory"][0]["gpa"], 0);
        assert_eq!(value["memory"][0]["size"], 536870912u64);
        assert_eq!(value["memory"][0]["backing"], "anonymous");
        assert_eq!(value["memory"][0]["page_size"], 4096);
        assert_eq!(value["dma"]["bytes"], 536870912u64);
        assert_eq!(value["dma"]["gib_per_s"], 250.0);
        assert_eq!(value["dma"]["method"], "type1-vaddr");
        assert!(value["devices"][0]["vfio_backend"].is_null());
        assert!(value["devices"][0]["bars"][0]["p2p"].is_null());
        assert_eq!(value["kvm_stats"]["pages_2m"], 3);
        let bar = &value["devices"][0]["bars"][0];
        assert_eq!(value["devices"][0]["bdf"], "shmem0");
        assert_eq!(value["devices"][0]["kind"], "shmem");
        assert_eq!(bar["index"], 2);
        assert_eq!(bar["gpa"], 64u64 << 30);
        assert_eq!(bar["planned_page_size"], 1 << 30);
        assert_eq!(bar["mapped"]["pages_1g"], 8);
        assert_eq!(bar["mapped"]["pages_4k"], 0);
        assert_eq!(bar["planned"]["pages_1g"], 8);
        assert_eq!(bar["best_possible"]["pages_1g"], 8);
        assert!(bar.get("expected").is_none());
        assert_eq!(bar["slot_updates"], 1);
        assert_eq!(bar["huge_ok"], true);
        assert!(bar.get("warning").is_none());
    }

    #[test]
    fn phases_summary_names_each_phase_the_sum_and_the_longest() {
        let phases = PhasesReport {
            checks: 2,
            prefault: 30,
            vcpu_start: 9,
            ..Default::default()
        };
        assert_eq!(phases.total(), 41);
        let line = phases.summary_line(43);
        assert!(
            line.starts_with("boot phases (ms): startup 0, checks 2, create_vm 0, "),
            "{line}"
        );
        assert!(
            line.ends_with(
                "prefault 30, vcpu_start 9 = 41 of 43 to the first KVM_RUN; longest: prefault"
            ),
            "{line}"
        );
    }

    #[test]
    fn report_without_first_run_says_null() {
        let report = Report::default();
        let value: serde_json::Value = serde_json::from_str(&report.to_json_string()).unwrap();
        assert!(value["start_to_first_run_ms"].is_null());
        assert!(value["phases_ms"].is_null());
    }

    #[test]
    fn write_to_writes_and_replaces() {
        let dir = temp_dir("write");
        let path = dir.join("report.json");
        std::fs::write(&path, "old contents that are longer than nothing").unwrap();
        let report = sample_report();
        report.write_to(&path).unwrap();
        let read: Report = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        assert_eq!(read, report);
    }

    #[test]
    fn write_to_a_missing_directory_names_the_path() {
        let dir = temp_dir("write-missing");
        let path = dir.join("no-such-dir/report.json");
        let err = sample_report().write_to(&path).unwrap_err().to_string();
        assert!(err.contains(&path.display().to_string()), "{err}");
        assert!(err.contains("writable directory"), "{err}");
    }

    #[test]
    fn write_to_a_directory_is_refused() {
        let dir = temp_dir("write-dir");
        let err = sample_report().write_to(&dir).unwrap_err().to_string();
        assert!(err.contains("it is a directory"), "{err}");
    }

    #[test]
    fn check_writable_leaves_no_file_and_keeps_existing_ones() {
        let dir = temp_dir("check");
        let new = dir.join("new.json");
        check_writable(&new).unwrap();
        assert!(!new.exists());
        let existing = dir.join("existing.json");
        std::fs::write(&existing, "keep me").unwrap();
        check_writable(&existing).unwrap();
        assert_eq!(std::fs::read_to_string(&existing).unwrap(), "keep me");
    }

    #[test]
    fn check_writable_rejects_bad_paths() {
        let dir = temp_dir("check-bad");
        let err = check_writable(dir.join("missing/r.json"))
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("cannot write the report to"), "{err}");
        assert!(err.contains("missing/r.json"), "{err}");
        assert!(matches!(
            check_writable(&dir),
            Err(ReportError::IsDirectory { .. })
        ));
        let file = dir.join("plain-file");
        std::fs::write(&file, "x").unwrap();
        let below_a_file = file.join("r.json");
        let err = check_writable(&below_a_file).unwrap_err().to_string();
        assert!(err.contains("plain-file/r.json"), "{err}");
    }
}
