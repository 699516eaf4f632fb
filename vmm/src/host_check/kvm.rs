//! KVM: the device opens, a VM has KVM_CAP_PRE_FAULT_MEMORY, and the VM's
//! binary stats fd has the page counters barge's proof reads. [`probe`]
//! asks KVM through `machine::kvm`, `pci_devices::bar_mapping` and
//! `machine::kvm_stats`; [`kvm_checks`] turns what it found into results.

use std::path::{Path, PathBuf};

use crate::machine::kvm::open_kvm_at;
use crate::machine::kvm_stats::KvmStatsFd;
use crate::pci_devices::bar_mapping::PrefaultSupport;

use super::CheckResult;

/// The counters barge's BAR proof reads.
pub const PAGE_COUNTERS: [&str; 3] = ["pages_4k", "pages_2m", "pages_1g"];

/// What asking KVM found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvmProbe {
    /// The device node.
    pub device: PathBuf,
    /// KVM_GET_API_VERSION, or why the device did not open (barge's own error text).
    pub open: Result<i32, String>,
    /// What a scratch VM showed; `None` when the device did not open.
    pub vm: Option<Result<VmProbe, String>>,
}

/// What a scratch VM showed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmProbe {
    /// KVM_CHECK_EXTENSION(KVM_CAP_PRE_FAULT_MEMORY) on the VM.
    pub prefault: bool,
    /// The names of the statistics the VM's stats fd has, or why it has none.
    pub stats: Result<Vec<String>, String>,
}

/// Opens `device`, creates a VM, asks for KVM_CAP_PRE_FAULT_MEMORY and reads
/// the VM's stats fd once.
pub fn probe(device: &Path) -> KvmProbe {
    let kvm = match open_kvm_at(device) {
        Ok(kvm) => kvm,
        Err(e) => {
            return KvmProbe {
                device: device.to_path_buf(),
                open: Err(e.to_string()),
                vm: None,
            }
        }
    };
    let vm = kvm
        .create_vm()
        .map_err(|e| format!("KVM_CREATE_VM failed: {e}"))
        .map(|vm| VmProbe {
            prefault: PrefaultSupport::of(&vm) == PrefaultSupport::Available,
            stats: KvmStatsFd::open(&vm)
                .and_then(|fd| fd.read())
                .map(|stats| stats.into_keys().collect())
                .map_err(|e| e.to_string()),
        });
    KvmProbe {
        device: device.to_path_buf(),
        open: Ok(kvm.get_api_version()),
        vm: Some(vm),
    }
}

/// `kvm`, `kvm pre-fault` and `kvm stats fd` from a probe.
pub fn kvm_checks(probe: &KvmProbe) -> Vec<CheckResult> {
    let device = probe.device.display();
    let api = match &probe.open {
        Ok(api) => *api,
        Err(e) => {
            return vec![
                CheckResult::fail("kvm", format!("cannot open {device}"), e.clone()),
                CheckResult::fail(
                    "kvm pre-fault",
                    "not checked: no KVM",
                    "make KVM available first (see the kvm check)",
                ),
                CheckResult::fail(
                    "kvm stats fd",
                    "not checked: no KVM",
                    "make KVM available first (see the kvm check)",
                ),
            ];
        }
    };
    let vm = match &probe.vm {
        Some(Ok(vm)) => vm,
        Some(Err(e)) => {
            return vec![CheckResult::fail(
                "kvm",
                format!("{device} opened (API {api}) but {e}"),
                "check `dmesg` for KVM errors; the kvm_intel/kvm_amd module may be \
                 loaded without virtualization enabled in the firmware",
            )];
        }
        None => {
            return vec![CheckResult::fail(
                "kvm",
                format!("{device} opened (API {api}), no VM created"),
                "report this: the probe created no VM",
            )]
        }
    };
    let mut results = vec![CheckResult::pass(
        "kvm",
        format!("{device} opened (API {api}), a VM created"),
    )];
    results.push(if vm.prefault {
        CheckResult::pass(
            "kvm pre-fault",
            "KVM_CAP_PRE_FAULT_MEMORY: barge pre-faults every BAR and reports the pages KVM mapped",
        )
    } else {
        CheckResult::warn(
            "kvm pre-fault",
            "no KVM_CAP_PRE_FAULT_MEMORY: BARs are still mapped aligned, but the report's \
             `mapped` is null (the guest's first touch faults them in)",
            "run a Linux 6.10 or newer kernel on an x86 host with EPT/NPT \
             (two-dimensional paging)",
        )
    });
    results.push(match &vm.stats {
        Ok(names) => {
            let missing: Vec<&str> = PAGE_COUNTERS
                .into_iter()
                .filter(|c| !names.iter().any(|n| n == c))
                .collect();
            if missing.is_empty() {
                CheckResult::pass(
                    "kvm stats fd",
                    format!(
                        "KVM_GET_STATS_FD: {} statistics, pages_4k/2m/1g among them",
                        names.len()
                    ),
                )
            } else {
                CheckResult::warn(
                    "kvm stats fd",
                    format!(
                        "KVM_GET_STATS_FD has {} statistics but not {}: page sizes are not measured",
                        names.len(),
                        missing.join(", ")
                    ),
                    "run an x86 Linux 5.14 or newer kernel (the page counters are x86 KVM's)",
                )
            }
        }
        Err(e) => CheckResult::warn(
            "kvm stats fd",
            format!("no stats fd: {e}"),
            "run Linux 5.14 or newer; without it the report has no KVM page counters",
        ),
    });
    results
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host_check::Status;

    fn probe_with(prefault: bool, stats: Result<Vec<String>, String>) -> KvmProbe {
        KvmProbe {
            device: PathBuf::from("/dev/kvm"),
            open: Ok(12),
            vm: Some(Ok(VmProbe { prefault, stats })),
        }
    }

    fn counters() -> Vec<String> {
        ["pages_4k", "pages_2m", "pages_1g", "remote_tlb_flush"]
            .map(String::from)
            .to_vec()
    }

    fn statuses(results: &[CheckResult]) -> Vec<(&str, Status)> {
        results
            .iter()
            .map(|r| (r.check.as_str(), r.status))
            .collect()
    }

    #[test]
    fn everything_there_passes() {
        let results = kvm_checks(&probe_with(true, Ok(counters())));
        assert_eq!(
            statuses(&results),
            [
                ("kvm", Status::Pass),
                ("kvm pre-fault", Status::Pass),
                ("kvm stats fd", Status::Pass)
            ]
        );
        assert!(results[0].detail.contains("API 12"), "{:?}", results[0]);
        assert!(results.iter().all(|r| r.fix.is_none()));
    }

    #[test]
    fn no_prefault_or_no_counters_warns_with_the_kernel_needed() {
        let results = kvm_checks(&probe_with(false, Ok(vec!["pages_4k".into()])));
        assert_eq!(results[1].status, Status::Warn);
        assert!(results[1].fix.as_deref().unwrap().contains("6.10"));
        assert_eq!(results[2].status, Status::Warn);
        assert!(
            results[2].detail.contains("pages_2m, pages_1g"),
            "{:?}",
            results[2]
        );
        let results = kvm_checks(&probe_with(true, Err("ENOTTY".into())));
        assert_eq!(results[2].status, Status::Warn);
        assert!(results[2].fix.as_deref().unwrap().contains("5.14"));
    }

    #[test]
    fn no_device_fails_all_three_with_barges_own_error() {
        let results = kvm_checks(&probe(Path::new("/nonexistent/kvm")));
        assert_eq!(
            statuses(&results),
            [
                ("kvm", Status::Fail),
                ("kvm pre-fault", Status::Fail),
                ("kvm stats fd", Status::Fail)
            ]
        );
        let fix = results[0].fix.as_deref().unwrap();
        assert!(
            fix.contains("load the kvm_intel or kvm_amd module"),
            "{fix}"
        );
    }

    #[test]
    fn a_vm_that_cannot_be_created_fails() {
        let probe = KvmProbe {
            device: PathBuf::from("/dev/kvm"),
            open: Ok(12),
            vm: Some(Err("KVM_CREATE_VM failed: EBUSY".into())),
        };
        let results = kvm_checks(&probe);
        assert_eq!(statuses(&results), [("kvm", Status::Fail)]);
        assert!(results[0].detail.contains("EBUSY"));
    }

    /// Needs /dev/kvm: the probe finds the stats fd's page counters on this host.
    #[test]
    fn the_probe_reads_this_hosts_kvm() {
        if !guest_programs::testing::kvm_or_skip("the_probe_reads_this_hosts_kvm") {
            return;
        }
        let results = kvm_checks(&probe(Path::new("/dev/kvm")));
        assert_eq!(results[0].status, Status::Pass, "{results:?}");
        assert_eq!(results[2].status, Status::Pass, "{results:?}");
    }
}
