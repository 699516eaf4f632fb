//! Per `--device`: bound to vfio-pci (or the commands that bind it), its
//! IOMMU group viable (or who else is in it), each BAR's host physical
//! address, size and the largest page its physical alignment allows, the
//! resizable-BAR capability, and memory decode.
//!
//! Everything comes from the device's sysfs directory: `driver` and
//! `iommu_group` links, `resource` (through `resources::sysfs`) and
//! `config` (the first 64 bytes for anyone, all of it for root).

use std::path::Path;

use devices::pci::caps::{extended_capabilities, CapabilityId, EXT_CAP_ID_RESIZABLE_BAR};
use resources::placement::{format_size, PageSize};
use resources::sysfs::{normalize_bdf, parse_resource, SysfsBar};

use super::{CheckResult, HostView};

/// The driver barge needs.
pub const VFIO_PCI: &str = "vfio-pci";

/// Drivers VFIO accepts for the other devices of a group (besides none and
/// vfio-pci): they take no DMA ownership.
const GROUP_SAFE_DRIVERS: [&str; 2] = ["pci-stub", "pcieport"];

/// Every check of one device.
pub fn checks(view: &HostView, bdf: &str) -> Vec<CheckResult> {
    let bdf = match normalize_bdf(bdf) {
        Ok(bdf) => bdf,
        Err(e) => {
            return vec![CheckResult::fail(
                format!("{bdf} device"),
                "not a PCI address",
                e.to_string(),
            )]
        }
    };
    let dir = view.sysfs.join("bus/pci/devices").join(&bdf);
    if !dir.is_dir() {
        return vec![CheckResult::fail(
            format!("{bdf} device"),
            format!("no such device ({} does not exist)", dir.display()),
            "list the host's devices with `lspci -D` and give one of their addresses",
        )];
    }
    let vfio_pci_loaded = view.sysfs.join("bus/pci/drivers/vfio-pci").is_dir();
    let mut results = vec![driver_check(
        &bdf,
        link_name(&dir.join("driver")).as_deref(),
        vfio_pci_loaded,
    )];
    let group = link_name(&dir.join("iommu_group"));
    let members = group
        .as_deref()
        .map(|g| group_members(view, g, &bdf))
        .unwrap_or_default();
    results.push(group_check(&bdf, group.as_deref(), &members));
    let resource = dir.join("resource");
    match std::fs::read_to_string(&resource)
        .map_err(|e| e.to_string())
        .and_then(|text| parse_resource(&text).map_err(|e| e.to_string()))
    {
        Ok(bars) => results.extend(bars.iter().map(|bar| bar_check(&bdf, bar))),
        Err(e) => results.push(CheckResult::fail(
            format!("{bdf} BARs"),
            format!("cannot read {}: {e}", resource.display()),
            "check the device is present (`lspci -s BDF -v`)",
        )),
    }
    let config = std::fs::read(dir.join("config")).unwrap_or_default();
    results.extend(rebar_checks(&bdf, &config));
    results.push(decode_check(&bdf, &config));
    results
}

/// The last component of a symlink's target (a driver's or a group's name).
fn link_name(link: &Path) -> Option<String> {
    let target = std::fs::read_link(link).ok()?;
    Some(target.file_name()?.to_string_lossy().into_owned())
}

/// The other devices of IOMMU group `group` and their drivers.
fn group_members(view: &HostView, group: &str, bdf: &str) -> Vec<(String, Option<String>)> {
    let devices = view
        .sysfs
        .join("kernel/iommu_groups")
        .join(group)
        .join("devices");
    let Ok(dir) = std::fs::read_dir(&devices) else {
        return Vec::new();
    };
    let mut members: Vec<(String, Option<String>)> = dir
        .filter_map(|entry| {
            let name = entry.ok()?.file_name().to_string_lossy().into_owned();
            (name != bdf).then(|| {
                let driver = link_name(
                    &view
                        .sysfs
                        .join("bus/pci/devices")
                        .join(&name)
                        .join("driver"),
                );
                (name, driver)
            })
        })
        .collect();
    members.sort();
    members
}

/// The commands that bind `bdf` to vfio-pci (unbinding `driver` first).
pub fn bind_commands(bdf: &str, driver: Option<&str>, vfio_pci_loaded: bool) -> String {
    let mut steps = Vec::new();
    if !vfio_pci_loaded {
        steps.push("modprobe vfio-pci".to_string());
    }
    if driver.is_some() {
        steps.push(format!(
            "echo {bdf} > /sys/bus/pci/devices/{bdf}/driver/unbind"
        ));
    }
    steps.push(format!(
        "echo {VFIO_PCI} > /sys/bus/pci/devices/{bdf}/driver_override"
    ));
    steps.push(format!("echo {bdf} > /sys/bus/pci/drivers_probe"));
    steps.join("; ")
}

/// `BDF driver`.
pub fn driver_check(bdf: &str, driver: Option<&str>, vfio_pci_loaded: bool) -> CheckResult {
    let name = format!("{bdf} driver");
    match driver {
        Some(VFIO_PCI) => CheckResult::pass(name, "bound to vfio-pci"),
        Some(other) => CheckResult::fail(
            name,
            format!("bound to {other}, not vfio-pci"),
            bind_commands(bdf, driver, vfio_pci_loaded),
        ),
        None => CheckResult::fail(
            name,
            "bound to no driver",
            bind_commands(bdf, None, vfio_pci_loaded),
        ),
    }
}

/// `BDF iommu group`: viable when every other device in it is unbound or
/// bound to vfio-pci, pci-stub or pcieport.
pub fn group_check(
    bdf: &str,
    group: Option<&str>,
    members: &[(String, Option<String>)],
) -> CheckResult {
    let name = format!("{bdf} iommu group");
    let Some(group) = group else {
        return CheckResult::fail(
            name,
            "in no IOMMU group: no IOMMU translates for it",
            "enable the IOMMU (intel_iommu=on / amd_iommu=on, VT-d / AMD-Vi in the firmware); \
             see the iommu groups check",
        );
    };
    let describe = |(member, driver): &(String, Option<String>)| {
        format!("{member} ({})", driver.as_deref().unwrap_or("no driver"))
    };
    let blockers: Vec<&(String, Option<String>)> = members
        .iter()
        .filter(|(_, driver)| {
            driver
                .as_deref()
                .is_some_and(|d| d != VFIO_PCI && !GROUP_SAFE_DRIVERS.contains(&d))
        })
        .collect();
    if blockers.is_empty() {
        let others = if members.is_empty() {
            "alone in it".to_string()
        } else {
            format!(
                "with {}",
                members.iter().map(describe).collect::<Vec<_>>().join(", ")
            )
        };
        return CheckResult::pass(name, format!("group {group} is viable: {others}"));
    }
    let fix = blockers
        .iter()
        .map(|(member, driver)| bind_commands(member, driver.as_deref(), true))
        .collect::<Vec<_>>()
        .join("; ");
    CheckResult::fail(
        name,
        format!(
            "group {group} is not viable: {} in it not bound to vfio-pci",
            blockers
                .iter()
                .map(|b| describe(b))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        format!("bind them to vfio-pci too (or unbind them): {fix}"),
    )
}

/// The largest page a BAR of `size` bytes can be mapped with, whatever its
/// address: `None` for sub-page BARs (barge traps them).
fn largest_page_for_size(size: u64) -> Option<PageSize> {
    PageSize::ALL.into_iter().rev().find(|p| size >= p.bytes())
}

/// `BDF BARn`: its host physical address, size and the largest page its
/// physical alignment allows.
pub fn bar_check(bdf: &str, bar: &SysfsBar) -> CheckResult {
    let name = format!("{bdf} BAR{}", bar.index);
    let place = format!("{:#x}+{}", bar.host_start, format_size(bar.size));
    if bar.is_io() {
        return CheckResult::pass(name, format!("I/O ports {place}: trapped by barge"));
    }
    let Some(by_size) = largest_page_for_size(bar.size) else {
        return CheckResult::pass(
            name,
            format!("{place}: smaller than a page, trapped by barge (no memslot)"),
        );
    };
    let Some(aligned) = bar.host_alignment() else {
        return CheckResult::fail(
            name,
            format!(
                "{} BAR without a host address (unassigned)",
                format_size(bar.size)
            ),
            "the firmware left it unassigned: enable Above 4G Decoding in the firmware or boot \
             with pci=realloc",
        );
    };
    let largest = aligned.min(by_size);
    let detail = format!(
        "{place}, host address {}-aligned: largest page {}",
        aligned.name(),
        largest.name()
    );
    if largest < by_size {
        CheckResult::warn(
            name,
            format!(
                "{detail} (its size allows {}; no VMM can do better)",
                by_size.name()
            ),
            format!(
                "the host placed the BAR at an address only {}-aligned: have the firmware or \
                 kernel align it (enable Above 4G Decoding / large BAR support, or boot with \
                 pci=realloc) so that it can get {} pages",
                aligned.name(),
                by_size.name()
            ),
        )
    } else {
        CheckResult::pass(name, detail)
    }
}

fn config_u16(config: &[u8], offset: usize) -> Option<u16> {
    Some(u16::from_le_bytes([
        *config.get(offset)?,
        *config.get(offset + 1)?,
    ]))
}

fn config_u32(config: &[u8], offset: usize) -> Option<u32> {
    Some(u32::from_le_bytes(
        config.get(offset..offset + 4)?.try_into().ok()?,
    ))
}

/// `BDF resizable BAR`: one result per resizable BAR, or one saying there is none.
pub fn rebar_checks(bdf: &str, config: &[u8]) -> Vec<CheckResult> {
    let name = format!("{bdf} resizable BAR");
    if config.len() == 0x100 {
        // Root reads all of it: a conventional PCI device, no extended space.
        return vec![CheckResult::pass(
            name,
            "no extended config space (conventional PCI): no resizable BAR capability",
        )];
    }
    if config.len() < 0x100 {
        return vec![CheckResult::warn(
            name,
            format!(
                "extended config space not readable ({} bytes of config)",
                config.len()
            ),
            "run barge host-check as root (sysfs gives others only the first 64 bytes)",
        )];
    }
    let Some(cap) = extended_capabilities(config)
        .capabilities
        .into_iter()
        .find(|c| c.id == CapabilityId::Extended(EXT_CAP_ID_RESIZABLE_BAR))
    else {
        return vec![CheckResult::pass(name, "no resizable BAR capability")];
    };
    let base = usize::from(cap.offset);
    let count = config_u32(config, base + 8).map_or(0, |c| ((c >> 5) & 7) as usize);
    let mut results = Vec::new();
    for entry in 0..count.clamp(1, 6) {
        let (Some(caps), Some(control)) = (
            config_u32(config, base + 4 + entry * 8),
            config_u32(config, base + 8 + entry * 8),
        ) else {
            break;
        };
        let index = control & 7;
        let current = 1u64 << (20 + ((control >> 8) & 0x3f));
        // Bits 4..=31: 1 MiB << (bit - 4) supported.
        let largest_bit = (4..32).rev().find(|bit| caps & (1 << bit) != 0);
        let largest = largest_bit.map(|bit| 1u64 << (20 + bit - 4));
        let detail = format!(
            "BAR{index}: current {}, largest supported {}",
            format_size(current),
            largest.map_or("none".into(), format_size)
        );
        let check = format!("{name} BAR{index}");
        results.push(match largest {
            Some(largest) if largest > current => CheckResult::warn(
                check,
                detail,
                format!(
                    "the device can expose {} (barge hides Resizable BAR from the guest, so \
                     resize on the host): echo {bdf} > /sys/bus/pci/devices/{bdf}/driver/unbind; \
                     echo {} > /sys/bus/pci/devices/{bdf}/resource{index}_resize; then bind it \
                     to vfio-pci again",
                    format_size(largest),
                    largest.trailing_zeros() - 20
                ),
            ),
            _ => CheckResult::pass(check, detail),
        });
    }
    results
}

/// Command register bit 1: memory space enable.
const COMMAND_MEMORY: u16 = 1 << 1;

/// `BDF memory decode`.
pub fn decode_check(bdf: &str, config: &[u8]) -> CheckResult {
    let name = format!("{bdf} memory decode");
    match config_u16(config, 4) {
        Some(command) if command & COMMAND_MEMORY != 0 => {
            CheckResult::pass(name, format!("on (command register {command:#06x})"))
        }
        Some(command) => CheckResult::warn(
            name,
            format!("off (command register {command:#06x}): the BARs do not answer now"),
            "barge turns it on when it opens the device; if a guest then reads all-ones from \
             the BARs, the device is not responding (check `lspci -vv -s BDF`)",
        ),
        None => CheckResult::warn(
            name,
            "cannot read the command register from sysfs config",
            "check the device is present (`lspci -s BDF -v`)",
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host_check::fake::FakeHost;
    use crate::host_check::Status;

    const BDF: &str = "0000:00:03.0";
    /// ivshmem: BAR0 256 bytes, BAR2 1 GiB at 1 GiB-aligned 0x1_4000_0000.
    const RESOURCE: &str = "\
0x00000000fea00000 0x00000000fea000ff 0x0000000000040200
0x0000000000000000 0x0000000000000000 0x0000000000000000
0x0000000140000000 0x000000017fffffff 0x000000000014220c
";

    fn config(command: u16) -> Vec<u8> {
        let mut c = vec![0u8; 4096];
        c[4..6].copy_from_slice(&command.to_le_bytes());
        c
    }

    fn rebar_config(caps: u32, control: u32) -> Vec<u8> {
        let mut c = config(0x2);
        // Resizable BAR at 0x100, version 1, no next.
        c[0x100..0x104]
            .copy_from_slice(&(0x0001_0000 | u32::from(EXT_CAP_ID_RESIZABLE_BAR)).to_le_bytes());
        c[0x104..0x108].copy_from_slice(&caps.to_le_bytes());
        c[0x108..0x10c].copy_from_slice(&control.to_le_bytes());
        c
    }

    fn device(host: &FakeHost, driver: Option<&str>) {
        let dir = format!("sys/bus/pci/devices/{BDF}");
        host.write(&format!("{dir}/resource"), RESOURCE)
            .write(&format!("{dir}/config"), config(0x0507))
            .dir("sys/bus/pci/drivers/vfio-pci")
            .link(
                &format!("{dir}/iommu_group"),
                "../../../../kernel/iommu_groups/4",
            )
            .dir(&format!("sys/kernel/iommu_groups/4/devices/{BDF}"));
        match driver {
            Some(d) => host.link(
                &format!("{dir}/driver"),
                &format!("../../../bus/pci/drivers/{d}"),
            ),
            None => host.remove(&format!("{dir}/driver")),
        };
    }

    #[test]
    fn a_bound_ivshmem_device_passes() {
        let host = FakeHost::new("device-pass");
        device(&host, Some("vfio-pci"));
        let results = checks(&host.view(), BDF);
        let names: Vec<&str> = results.iter().map(|r| r.check.as_str()).collect();
        assert_eq!(
            names,
            [
                "0000:00:03.0 driver",
                "0000:00:03.0 iommu group",
                "0000:00:03.0 BAR0",
                "0000:00:03.0 BAR2",
                "0000:00:03.0 resizable BAR",
                "0000:00:03.0 memory decode"
            ]
        );
        assert!(
            results.iter().all(|r| r.status == Status::Pass),
            "{results:#?}"
        );
        assert!(results[1].detail.contains("alone"), "{:?}", results[1]);
        assert!(results[2].detail.contains("trapped"));
        assert_eq!(
            results[3].detail,
            "0x140000000+1 GiB, host address 1G-aligned: largest page 1G"
        );
    }

    #[test]
    fn an_unbound_or_foreign_device_fails_with_the_bind_commands() {
        let host = FakeHost::new("device-bind");
        device(&host, Some("ivshmem"));
        let driver = &checks(&host.view(), BDF)[0];
        assert_eq!(driver.status, Status::Fail);
        assert_eq!(driver.detail, "bound to ivshmem, not vfio-pci");
        assert_eq!(
            driver.fix.as_deref(),
            Some(
                "echo 0000:00:03.0 > /sys/bus/pci/devices/0000:00:03.0/driver/unbind; \
                 echo vfio-pci > /sys/bus/pci/devices/0000:00:03.0/driver_override; \
                 echo 0000:00:03.0 > /sys/bus/pci/drivers_probe"
            )
        );
        device(&host, None);
        host.remove("sys/bus/pci/drivers/vfio-pci");
        let driver = &checks(&host.view(), BDF)[0];
        assert_eq!(driver.status, Status::Fail);
        let fix = driver.fix.as_deref().unwrap();
        assert!(
            fix.starts_with("modprobe vfio-pci; echo vfio-pci >"),
            "{fix}"
        );
        assert!(!fix.contains("unbind"), "{fix}");
    }

    #[test]
    fn a_group_with_a_bound_neighbour_is_not_viable() {
        let host = FakeHost::new("device-group");
        device(&host, Some("vfio-pci"));
        host.dir("sys/kernel/iommu_groups/4/devices/0000:00:03.1")
            .link(
                "sys/bus/pci/devices/0000:00:03.1/driver",
                "../../../bus/pci/drivers/nvme",
            )
            .dir("sys/kernel/iommu_groups/4/devices/0000:00:02.0")
            .link(
                "sys/bus/pci/devices/0000:00:02.0/driver",
                "../../../bus/pci/drivers/pcieport",
            );
        let group = &checks(&host.view(), BDF)[1];
        assert_eq!(group.status, Status::Fail, "{group:?}");
        assert_eq!(
            group.detail,
            "group 4 is not viable: 0000:00:03.1 (nvme) in it not bound to vfio-pci"
        );
        assert!(group
            .fix
            .as_deref()
            .unwrap()
            .contains("echo vfio-pci > /sys/bus/pci/devices/0000:00:03.1/driver_override"));
        host.link(
            "sys/bus/pci/devices/0000:00:03.1/driver",
            "../../../bus/pci/drivers/vfio-pci",
        );
        let group = &checks(&host.view(), BDF)[1];
        assert_eq!(group.status, Status::Pass);
        assert!(
            group
                .detail
                .contains("0000:00:02.0 (pcieport), 0000:00:03.1 (vfio-pci)"),
            "{group:?}"
        );
        host.remove(&format!("sys/bus/pci/devices/{BDF}/iommu_group"));
        assert_eq!(checks(&host.view(), BDF)[1].status, Status::Fail);
    }

    #[test]
    fn bars_get_the_page_their_host_alignment_allows() {
        let bar = |start, size| SysfsBar {
            index: 1,
            host_start: start,
            size,
            flags: 0x0014_220c,
        };
        let gib = 1u64 << 30;
        assert_eq!(
            bar_check(BDF, &bar(0x38_0000_0000, 128 * gib)).status,
            Status::Pass
        );
        // 8 GiB at an address only 2 MiB-aligned: 2M, a WARN naming 1G.
        let short = bar_check(BDF, &bar(0x1_4020_0000, 8 * gib));
        assert_eq!(short.status, Status::Warn);
        assert!(
            short.detail.contains("largest page 2M (its size allows 1G"),
            "{short:?}"
        );
        assert!(short.fix.unwrap().contains("pci=realloc"));
        // 16 MiB at a 1 GiB-aligned address: 2M by size, a PASS.
        let small = bar_check(BDF, &bar(0x1_4000_0000, 16 << 20));
        assert_eq!(small.status, Status::Pass);
        assert!(
            small.detail.ends_with("1G-aligned: largest page 2M"),
            "{small:?}"
        );
        let unassigned = bar_check(BDF, &bar(0, 8 * gib));
        assert_eq!(unassigned.status, Status::Fail);
        assert!(unassigned.fix.unwrap().contains("Above 4G Decoding"));
    }

    #[test]
    fn resizable_bar_current_and_largest() {
        // BAR1 supports 1 MiB..=8 GiB (bits 4..=17), currently 256 MiB (8).
        let caps = ((1u32 << 18) - 1) & !0xf;
        let control = 1 | (1 << 5) | (8 << 8);
        let results = rebar_checks(BDF, &rebar_config(caps, control));
        assert_eq!(results.len(), 1);
        assert_eq!(results[0].check, "0000:00:03.0 resizable BAR BAR1");
        assert_eq!(results[0].status, Status::Warn);
        assert_eq!(
            results[0].detail,
            "BAR1: current 256 MiB, largest supported 8 GiB"
        );
        let fix = results[0].fix.as_deref().unwrap();
        assert!(
            fix.contains("echo 13 > /sys/bus/pci/devices/0000:00:03.0/resource1_resize"),
            "{fix}"
        );
        let full = rebar_checks(BDF, &rebar_config(caps, 1 | (1 << 5) | (13 << 8)));
        assert_eq!(full[0].status, Status::Pass, "{full:?}");
        assert_eq!(
            rebar_checks(BDF, &config(2))[0].detail,
            "no resizable BAR capability"
        );
        let conventional = rebar_checks(BDF, &config(2)[..256]);
        assert_eq!(conventional[0].status, Status::Pass);
        assert!(conventional[0].detail.contains("conventional PCI"));
        let short = rebar_checks(BDF, &config(2)[..64]);
        assert_eq!(short[0].status, Status::Warn);
        assert!(short[0].fix.as_deref().unwrap().contains("root"));
    }

    #[test]
    fn memory_decode() {
        assert_eq!(decode_check(BDF, &config(0x0006)).status, Status::Pass);
        let off = decode_check(BDF, &config(0x0004));
        assert_eq!(off.status, Status::Warn);
        assert!(off.detail.starts_with("off"));
        assert_eq!(decode_check(BDF, &[]).status, Status::Warn);
    }

    #[test]
    fn a_missing_or_malformed_device_fails() {
        let host = FakeHost::new("device-missing");
        let results = checks(&host.view(), BDF);
        assert_eq!(results.len(), 1);
        assert_eq!(results[0].status, Status::Fail);
        assert!(results[0].fix.as_deref().unwrap().contains("lspci -D"));
        let bad = checks(&host.view(), "nonsense");
        assert_eq!(bad[0].status, Status::Fail);
        assert!(bad[0].fix.as_deref().unwrap().contains("DDDD:BB:DD.F"));
    }
}
