//! The IOMMU: groups exist (vfio-pci needs one per device), interrupts are
//! remapped (a device cannot forge MSIs), and a VFIO interface barge can
//! open: iommufd (`/dev/iommu`) or the legacy container (`/dev/vfio/vfio`).
//!
//! Interrupt remapping is read without dmesg: the kernel command line
//! (`intremap=off`, `nointremap` turn it off), the interrupt chips in
//! /proc/interrupts (remapped ones are named `IR-...`: `IR-PCI-MSI`,
//! `IR-IO-APIC`), and the Intel IOMMU's extended capability register in
//! sysfs (bit 3, IR).

use super::{CheckResult, HostView};

/// The three checks, read under `view`.
pub fn checks(view: &HostView) -> Vec<CheckResult> {
    let groups = std::fs::read_dir(view.sysfs.join("kernel/iommu_groups"))
        .map(|dir| dir.count())
        .ok();
    let cmdline = view.proc_file("cmdline").unwrap_or_default();
    let interrupts = view.proc_file("interrupts");
    let ecaps = intel_ecaps(view);
    let unsafe_interrupts = view
        .sys("module/vfio_iommu_type1/parameters/allow_unsafe_interrupts")
        .is_some_and(|v| v == "Y");
    vec![
        groups_check(groups, &cmdline),
        remapping_check(&cmdline, interrupts.as_deref(), &ecaps, unsafe_interrupts),
        interface_check(
            view.dev.join("iommu").exists(),
            view.dev.join("vfio/vfio").exists(),
        ),
    ]
}

/// The extended capability registers of the Intel IOMMUs (`dmar*`).
fn intel_ecaps(view: &HostView) -> Vec<u64> {
    let Ok(dir) = std::fs::read_dir(view.sysfs.join("class/iommu")) else {
        return Vec::new();
    };
    let mut ecaps: Vec<u64> = dir
        .filter_map(|entry| {
            let text = super::read_trimmed(&entry.ok()?.path().join("intel-iommu/ecap"))?;
            u64::from_str_radix(text.trim_start_matches("0x"), 16).ok()
        })
        .collect();
    ecaps.sort_unstable();
    ecaps
}

/// Whether a kernel command line has `word` as one of its parameters.
fn has_param(cmdline: &str, word: &str) -> bool {
    cmdline.split_whitespace().any(|p| p == word)
}

/// `iommu groups`: how many; none means no IOMMU is on.
pub fn groups_check(groups: Option<usize>, cmdline: &str) -> CheckResult {
    let name = "iommu groups";
    match groups {
        Some(count) if count > 0 => {
            CheckResult::pass(name, format!("{count} under /sys/kernel/iommu_groups"))
        }
        _ => {
            let off = ["intel_iommu=off", "amd_iommu=off", "iommu=off"]
                .into_iter()
                .find(|p| has_param(cmdline, p));
            let detail = match off {
                Some(param) => format!("no IOMMU groups: the kernel command line has {param}"),
                None => {
                    "no IOMMU groups under /sys/kernel/iommu_groups: no IOMMU is enabled".into()
                }
            };
            CheckResult::fail(
                name,
                detail,
                "enable VT-d / AMD-Vi in the firmware and boot with intel_iommu=on \
                 (AMD: amd_iommu=on) and iommu=pt; vfio-pci cannot bind without a group",
            )
        }
    }
}

/// ecap bit 3: interrupt remapping supported.
const ECAP_IR: u64 = 1 << 3;

/// `interrupt remapping`.
pub fn remapping_check(
    cmdline: &str,
    interrupts: Option<&str>,
    intel_ecaps: &[u64],
    unsafe_interrupts: bool,
) -> CheckResult {
    let name = "interrupt remapping";
    let unsafe_note = if unsafe_interrupts {
        " (vfio_iommu_type1 allow_unsafe_interrupts=Y)"
    } else {
        ""
    };
    if let Some(param) = ["intremap=off", "nointremap"]
        .into_iter()
        .find(|p| has_param(cmdline, p))
    {
        return CheckResult::fail(
            name,
            format!("turned off: the kernel command line has {param}{unsafe_note}"),
            format!(
                "remove {param} from the kernel command line; without interrupt remapping a \
                 passed-through device can send any interrupt"
            ),
        );
    }
    let remapped = interrupts.is_some_and(|text| {
        text.lines()
            .any(|line| line.split_whitespace().any(|w| w.starts_with("IR-")))
    });
    if remapped {
        return CheckResult::pass(
            name,
            format!("in use: /proc/interrupts has IR- (remapped) interrupt chips{unsafe_note}"),
        );
    }
    if intel_ecaps.iter().any(|e| e & ECAP_IR != 0) {
        return CheckResult::warn(
            name,
            format!("the IOMMU supports it (ecap IR) but no interrupt in /proc/interrupts is remapped{unsafe_note}"),
            "boot with intel_iommu=on and without intremap=off; check the firmware does not opt out of x2APIC",
        );
    }
    CheckResult::warn(
        name,
        format!("unknown: no remapped (IR-) interrupt chip in /proc/interrupts{unsafe_note}"),
        "enable the IOMMU (intel_iommu=on / amd_iommu=on) and interrupt remapping in the \
         firmware; `dmesg | grep -i remapping` tells for sure",
    )
}

/// `vfio interface`: iommufd or the legacy container.
pub fn interface_check(iommufd: bool, container: bool) -> CheckResult {
    let name = "vfio interface";
    match (iommufd, container) {
        (true, true) => CheckResult::pass(
            name,
            "/dev/iommu (iommufd) and /dev/vfio/vfio (legacy container): --vfio-backend auto picks iommufd",
        ),
        (true, false) => CheckResult::pass(
            name,
            "/dev/iommu (iommufd): --vfio-backend iommufd or auto",
        ),
        (false, true) => CheckResult::pass(
            name,
            "/dev/vfio/vfio (legacy container; no /dev/iommu, so auto uses the container)",
        ),
        (false, false) => CheckResult::fail(
            name,
            "neither /dev/iommu (iommufd) nor /dev/vfio/vfio (legacy container)",
            "modprobe vfio-pci (it loads vfio and vfio_iommu_type1); for iommufd also modprobe iommufd",
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host_check::fake::FakeHost;
    use crate::host_check::Status;

    #[test]
    fn groups() {
        assert_eq!(groups_check(Some(3), "").status, Status::Pass);
        let none = groups_check(Some(0), "");
        assert_eq!(none.status, Status::Fail);
        assert!(none.fix.as_deref().unwrap().contains("intel_iommu=on"));
        let off = groups_check(None, "quiet intel_iommu=off");
        assert_eq!(off.status, Status::Fail);
        assert!(off.detail.contains("intel_iommu=off"), "{off:?}");
    }

    #[test]
    fn remapping() {
        let interrupts = " 24:  0  IR-PCI-MSIX-0000:00:03.0  0-edge  nvme\n";
        let on = remapping_check("", Some(interrupts), &[], false);
        assert_eq!(on.status, Status::Pass, "{on:?}");
        let off = remapping_check("a intremap=off", Some(interrupts), &[], false);
        assert_eq!(off.status, Status::Fail);
        assert!(off.fix.as_deref().unwrap().contains("remove intremap=off"));
        let plain = "  1:  9  IO-APIC  1-edge  i8042\n";
        let capable = remapping_check("", Some(plain), &[0xf0_0000_0000_0008], false);
        assert_eq!(capable.status, Status::Warn);
        assert!(capable.detail.contains("ecap IR"));
        let unknown = remapping_check("", None, &[0x2], true);
        assert_eq!(unknown.status, Status::Warn);
        assert!(unknown.detail.contains("allow_unsafe_interrupts"));
        assert!(unknown.fix.as_deref().unwrap().contains("dmesg"));
    }

    #[test]
    fn interface() {
        assert_eq!(interface_check(true, true).status, Status::Pass);
        assert_eq!(interface_check(true, false).status, Status::Pass);
        assert!(interface_check(false, true)
            .detail
            .contains("legacy container"));
        let none = interface_check(false, false);
        assert_eq!(none.status, Status::Fail);
        assert!(none.fix.as_deref().unwrap().contains("modprobe vfio-pci"));
    }

    #[test]
    fn read_from_a_fake_tree() {
        let host = FakeHost::new("iommu");
        host.dir("sys/kernel/iommu_groups/0/devices")
            .dir("sys/kernel/iommu_groups/1/devices")
            .write("proc/cmdline", "console=ttyS0 intel_iommu=on\n")
            .write("proc/interrupts", "  0:  1  IR-IO-APIC  2-edge  timer\n")
            .write("sys/class/iommu/dmar0/intel-iommu/ecap", "f00f5e\n")
            .write("dev/vfio/vfio", "");
        let results = checks(&host.view());
        let statuses: Vec<Status> = results.iter().map(|r| r.status).collect();
        assert_eq!(statuses, [Status::Pass; 3], "{results:?}");
        assert!(results[0].detail.starts_with("2 "), "{results:?}");
        host.write("proc/interrupts", "  0:  1  IO-APIC  2-edge  timer\n");
        assert!(checks(&host.view())[1].detail.contains("ecap IR"));
        host.remove("dev/vfio/vfio");
        assert_eq!(checks(&host.view())[2].status, Status::Fail);
    }
}
