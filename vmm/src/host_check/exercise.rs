//! `--exercise`: per device, a scratch VM through barge's own path. The VM
//! is an ordinary [`crate::Vm`] with the device and nothing else: barge
//! opens it with VFIO, plans and maps each BAR at its planned alignment,
//! pre-faults it with KVM_PRE_FAULT_MEMORY and counts KVM's pages, exactly
//! as `barge run` does; then the payload (a tiny guest that powers off)
//! ends the run. Each BAR's result is the report's `mapped` against its
//! `planned` pages.

use std::path::Path;
use std::time::Duration;

use super::CheckResult;
use crate::config::{DeviceConfig, MemoryConfig, SeccompMode, SerialConfig, VfioConfig, VmConfig};
use crate::report::{BarReport, PageCountsReport};

/// How long a scratch VM may run (pre-faulting a large BAR with 4 KiB
/// pages is slow; the payload itself powers off at once).
pub const TIMEOUT: Duration = Duration::from_secs(120);
/// The scratch VM's RAM.
pub const MEMORY: u64 = 64 << 20;

/// The scratch VM's configuration: `kernel`, one vCPU, 64 MiB, no console,
/// the device with its default placement.
pub fn scratch_config(bdf: &str, kernel: &Path) -> VmConfig {
    let mut config = VmConfig::new(kernel);
    config.cpus = 1;
    config.memory = MemoryConfig {
        size: MEMORY,
        ..MemoryConfig::default()
    };
    config.serial = SerialConfig::Disabled;
    // The run is on a thread of its own; the filters would stay with it.
    config.seccomp = SeccompMode::Off;
    config.devices = vec![DeviceConfig::Vfio(VfioConfig {
        bdf: bdf.to_string(),
        bar_align: Default::default(),
        p2p: Default::default(),
    })];
    config
}

/// One result per BAR of the scratch VM, or one FAIL saying why it did not
/// run; a WARN without running it when `usable` is false (a static check of
/// the device failed).
pub fn checks(bdf: &str, kernel: &Path, usable: bool) -> Vec<CheckResult> {
    let name = format!("{bdf} exercise");
    if !usable {
        return vec![CheckResult::fail(
            name,
            "not run: a check of this device failed",
            "fix the device's failed checks above first",
        )];
    }
    let config = scratch_config(bdf, kernel);
    let run = std::thread::Builder::new()
        .name("host-check-vm".into())
        .spawn(move || {
            crate::Vm::new(config)
                .run_with_timeout(TIMEOUT)
                .map_err(|e| e.to_string())
        })
        .map_err(|e| e.to_string())
        .and_then(|thread| {
            thread
                .join()
                .unwrap_or_else(|_| Err("the scratch VM's thread panicked".into()))
        });
    let outcome = match run {
        Ok(outcome) => outcome,
        Err(e) => {
            return vec![CheckResult::fail(
                name,
                format!("barge could not build the scratch VM: {e}"),
                "fix what the error names (the checks above say what the host lacks)",
            )]
        }
    };
    let Some(device) = outcome.report.devices.iter().find(|d| d.bdf == bdf) else {
        return vec![CheckResult::fail(
            name,
            "the scratch VM's report has no such device",
            "report this: barge ran without the device",
        )];
    };
    device.bars.iter().map(|bar| bar_result(bdf, bar)).collect()
}

fn counts(pages: &PageCountsReport) -> String {
    let parts: Vec<String> = [
        (pages.pages_1g, "1G"),
        (pages.pages_2m, "2M"),
        (pages.pages_4k, "4K"),
    ]
    .into_iter()
    .filter(|(n, _)| *n > 0)
    .map(|(n, size)| format!("{n} x {size}"))
    .collect();
    if parts.is_empty() {
        "nothing".into()
    } else {
        parts.join(" + ")
    }
}

/// `BDF BARn exercise`: what KVM mapped against the plan.
pub fn bar_result(bdf: &str, bar: &BarReport) -> CheckResult {
    let name = format!("{bdf} BAR{} exercise", bar.index);
    if bar.trapped {
        return CheckResult::pass(name, "trapped (no memslot), nothing to map");
    }
    let placed = format!("gpa {:#x} hva {:#x}", bar.gpa, bar.hva);
    if let (None, Some(host)) = (&bar.mapped, &bar.host_mapped) {
        // Where KVM cannot pre-fault (aarch64): the host mapping is the proof.
        return if bar.huge_ok {
            CheckResult::pass(
                name,
                format!(
                    "{placed}: the host mapped {} as planned (vfio-pci's faults; KVM's stage 2 \
                     not observed)",
                    counts(&host.pages)
                ),
            )
        } else {
            CheckResult::warn(
                name,
                format!(
                    "{placed}: the host mapped {}, planned {}",
                    counts(&host.pages),
                    counts(&bar.planned)
                ),
                bar.warning
                    .clone()
                    .unwrap_or_else(|| "see the kernel and BAR checks above".into()),
            )
        };
    }
    match &bar.mapped {
        None => CheckResult::warn(
            name,
            format!("{placed}: mapped, but KVM could not say with what pages (no KVM_PRE_FAULT_MEMORY or stats fd)"),
            "see the kvm pre-fault and kvm stats fd checks",
        ),
        Some(mapped) if bar.huge_ok => CheckResult::pass(
            name,
            format!(
                "{placed}: KVM mapped {} as planned{}",
                counts(mapped),
                bar.prefault_ms.map_or(String::new(), |ms| format!(", pre-fault {ms:.1} ms"))
            ),
        ),
        Some(mapped) => CheckResult::warn(
            name,
            format!("{placed}: KVM mapped {}, planned {}", counts(mapped), counts(&bar.planned)),
            bar.warning
                .clone()
                .unwrap_or_else(|| "see the kernel and BAR checks above".into()),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host_check::Status;

    fn bar(mapped: Option<PageCountsReport>, huge_ok: bool) -> BarReport {
        let planned = PageCountsReport {
            pages_4k: 0,
            pages_2m: 0,
            pages_1g: 8,
        };
        BarReport {
            index: 2,
            size: 8 << 30,
            gpa: 8 << 30,
            hva: 1 << 40,
            trapped: false,
            planned_page_size: 1 << 30,
            planned,
            best_possible: planned,
            mapped,
            proof: "kvm_prefault".into(),
            host_mapped: None,
            stage2: None,
            slots: 1,
            slot_updates: 1,
            huge_ok,
            prefault_ms: Some(5.0),
            p2p: None,
            warning: (!huge_ok).then(|| "host resource misaligned".to_string()),
            note: None,
        }
    }

    #[test]
    fn mapped_as_planned_passes_else_warns_with_the_reports_warning() {
        let planned = PageCountsReport {
            pages_4k: 0,
            pages_2m: 0,
            pages_1g: 8,
        };
        let pass = bar_result("b", &bar(Some(planned), true));
        assert_eq!(pass.status, Status::Pass);
        assert!(
            pass.detail
                .contains("KVM mapped 8 x 1G as planned, pre-fault 5.0 ms"),
            "{pass:?}"
        );
        let small = PageCountsReport {
            pages_4k: 2,
            pages_2m: 4095,
            pages_1g: 0,
        };
        let warn = bar_result("b", &bar(Some(small), false));
        assert_eq!(warn.status, Status::Warn);
        assert!(
            warn.detail
                .contains("mapped 4095 x 2M + 2 x 4K, planned 8 x 1G"),
            "{warn:?}"
        );
        assert_eq!(warn.fix.as_deref(), Some("host resource misaligned"));
        assert_eq!(bar_result("b", &bar(None, false)).status, Status::Warn);
    }

    #[test]
    fn a_device_that_failed_a_check_is_not_exercised() {
        let results = checks("0000:00:03.0", Path::new("/nonexistent"), false);
        assert_eq!(results[0].status, Status::Fail);
        assert!(results[0].detail.starts_with("not run"));
    }

    #[test]
    fn the_scratch_vm_has_only_the_device() {
        let config = scratch_config("0000:00:03.0", Path::new("k"));
        assert_eq!(config.devices.len(), 1);
        assert!(config.prefault_bars, "the exercise is the pre-fault");
        assert_eq!(config.serial, SerialConfig::Disabled);
    }
}
