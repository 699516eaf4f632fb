//! Huge pfnmap: vfio-pci inserts 2 MiB and 1 GiB host mappings of a BAR on
//! fault only from Linux 6.12 on, on architectures with
//! `ARCH_SUPPORTS_PMD_PFNMAP` / `ARCH_SUPPORTS_PUD_PFNMAP`, through its
//! `vfio_pci_mmap_huge_fault` handler. Three checks: the kernel version,
//! the kernel's config where one can be found, and the handler in
//! /proc/kallsyms.

use std::io::Read;
use std::path::PathBuf;

use super::{CheckResult, HostView};

/// The first kernel with huge pfnmap in vfio-pci.
pub const HUGE_PFNMAP_VERSION: (u32, u32) = (6, 12);
/// vfio-pci's huge fault handler.
pub const HUGE_FAULT_HANDLER: &str = "vfio_pci_mmap_huge_fault";

/// The three checks, read under `view`.
pub fn checks(view: &HostView) -> Vec<CheckResult> {
    let release = view.proc_file("sys/kernel/osrelease");
    let mut results = vec![version_check(release.as_deref())];
    let config = release.as_deref().and_then(|r| find_config(view, r));
    results.extend(config_checks(config.as_ref()));
    let loaded = ["module/vfio_pci", "module/vfio_pci_core"]
        .iter()
        .any(|m| view.sysfs.join(m).is_dir());
    let has_handler = loaded.then(|| kallsyms_has(view, HUGE_FAULT_HANDLER));
    results.push(handler_check(has_handler));
    results
}

/// `(major, minor)` from a release string such as `6.12.95+deb12-cloud-amd64`.
pub fn parse_version(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

/// `kernel version`: 6.12 or newer.
pub fn version_check(release: Option<&str>) -> CheckResult {
    let name = "kernel version";
    let (major, minor) = HUGE_PFNMAP_VERSION;
    let fix = format!(
        "boot Linux {major}.{minor} or newer (Debian 12: linux-image-cloud-amd64 from \
         bookworm-backports); older kernels map every BAR with 4 KiB pages whatever barge does"
    );
    match release.map(|r| (r, parse_version(r))) {
        Some((release, Some(version))) if version >= HUGE_PFNMAP_VERSION => CheckResult::pass(
            name,
            format!("{release}: vfio-pci has huge pfnmap (Linux {major}.{minor}+)"),
        ),
        Some((release, Some(_))) => CheckResult::fail(
            name,
            format!("{release}: before {major}.{minor}, vfio-pci has no huge pfnmap"),
            fix,
        ),
        Some((release, None)) => CheckResult::warn(
            name,
            format!("cannot read a version from {release:?}"),
            format!("check by hand that the kernel is {major}.{minor} or newer"),
        ),
        None => CheckResult::warn(
            name,
            "cannot read /proc/sys/kernel/osrelease",
            format!("check with `uname -r` that the kernel is {major}.{minor} or newer"),
        ),
    }
}

/// The running kernel's config and where it came from: /proc/config.gz
/// (decompressed), /boot/config-<release> or /usr/lib/modules/<release>/config.
pub fn find_config(view: &HostView, release: &str) -> Option<(PathBuf, String)> {
    let gz = view.proc.join("config.gz");
    if let Ok(file) = std::fs::File::open(&gz) {
        let mut text = String::new();
        if flate2::read::GzDecoder::new(file)
            .read_to_string(&mut text)
            .is_ok()
        {
            return Some((gz, text));
        }
    }
    [
        view.root.join("boot").join(format!("config-{release}")),
        view.root
            .join("usr/lib/modules")
            .join(release)
            .join("config"),
    ]
    .into_iter()
    .find_map(|path| std::fs::read_to_string(&path).ok().map(|text| (path, text)))
}

/// A config option's value (`y`, `m`, ...); `None` when unset.
pub fn config_value<'a>(config: &'a str, option: &str) -> Option<&'a str> {
    config.lines().find_map(|line| {
        line.strip_prefix("CONFIG_")?
            .strip_prefix(option)?
            .strip_prefix('=')
    })
}

/// `kernel config pfnmap` and `kernel config vfio-pci`.
pub fn config_checks(config: Option<&(PathBuf, String)>) -> Vec<CheckResult> {
    let Some((path, text)) = config else {
        let detail = "no kernel config found (/proc/config.gz, /boot/config-$(uname -r), \
                      /usr/lib/modules/$(uname -r)/config): cannot tell";
        let fix = "install the kernel's config file (Debian ships it as /boot/config-*) \
                   or build with CONFIG_IKCONFIG_PROC; the kernel version and the vfio-pci \
                   huge fault check still apply";
        return vec![
            CheckResult::warn("kernel config pfnmap", detail, fix),
            CheckResult::warn("kernel config vfio-pci", detail, fix),
        ];
    };
    let from = path.display();
    let yes = |option| config_value(text, option) == Some("y");
    let pud = yes("ARCH_SUPPORTS_PUD_PFNMAP");
    let pmd = yes("ARCH_SUPPORTS_PMD_PFNMAP");
    let pfnmap = match (pud, pmd) {
        (true, true) => CheckResult::pass(
            "kernel config pfnmap",
            format!("{from}: ARCH_SUPPORTS_PUD_PFNMAP=y, ARCH_SUPPORTS_PMD_PFNMAP=y (1 GiB and 2 MiB BAR mappings)"),
        ),
        (false, true) => CheckResult::warn(
            "kernel config pfnmap",
            format!("{from}: ARCH_SUPPORTS_PMD_PFNMAP=y only: 2 MiB is the largest BAR mapping"),
            "1 GiB BAR mappings need an architecture with PUD pfnmap (x86-64); on this one 2 MiB \
             is the best any VMM gets",
        ),
        (pud, _) => CheckResult::fail(
            "kernel config pfnmap",
            format!(
                "{from}: ARCH_SUPPORTS_PMD_PFNMAP is not set{}: BARs get 4 KiB pages",
                if pud { "" } else { ", nor ARCH_SUPPORTS_PUD_PFNMAP" }
            ),
            "boot a kernel of Linux 6.12 or newer built with huge pfnmap (x86-64: both are \
             selected automatically with TRANSPARENT_HUGEPAGE)",
        ),
    };
    let vfio = match config_value(text, "VFIO_PCI") {
        Some(value @ ("y" | "m")) => CheckResult::pass(
            "kernel config vfio-pci",
            format!("{from}: VFIO_PCI={value}"),
        ),
        _ => CheckResult::fail(
            "kernel config vfio-pci",
            format!("{from}: VFIO_PCI is not set: no device can be passed through"),
            "boot a kernel built with CONFIG_VFIO_PCI=m (every distribution kernel has it)",
        ),
    };
    vec![pfnmap, vfio]
}

/// Whether /proc/kallsyms lists `symbol` (unprivileged readers see the
/// names, with zero addresses).
pub fn kallsyms_has(view: &HostView, symbol: &str) -> Option<bool> {
    let text = std::fs::read_to_string(view.proc.join("kallsyms")).ok()?;
    Some(
        text.lines()
            .any(|line| line.split_whitespace().nth(2) == Some(symbol)),
    )
}

/// `vfio-pci huge fault`: `None` when vfio-pci is not loaded, else whether
/// kallsyms has the handler (`None` inside when kallsyms is unreadable).
pub fn handler_check(has_handler: Option<Option<bool>>) -> CheckResult {
    let name = "vfio-pci huge fault";
    match has_handler {
        None => CheckResult::warn(
            name,
            "vfio-pci is not loaded: cannot look for its huge fault handler",
            "modprobe vfio-pci",
        ),
        Some(None) => CheckResult::warn(
            name,
            "cannot read /proc/kallsyms",
            format!("run as root, or look for {HUGE_FAULT_HANDLER} in /proc/kallsyms by hand"),
        ),
        Some(Some(true)) => CheckResult::pass(
            name,
            format!("{HUGE_FAULT_HANDLER} in /proc/kallsyms: vfio-pci maps BARs with huge pages"),
        ),
        Some(Some(false)) => CheckResult::fail(
            name,
            format!("vfio-pci is loaded but /proc/kallsyms has no {HUGE_FAULT_HANDLER}: BARs get 4 KiB pages"),
            "boot Linux 6.12 or newer with huge pfnmap (its vfio-pci has the handler)",
        ),
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;
    use crate::host_check::fake::FakeHost;
    use crate::host_check::Status;

    const GOOD_CONFIG: &str = "CONFIG_X=y\nCONFIG_ARCH_SUPPORTS_PMD_PFNMAP=y\n\
        CONFIG_ARCH_SUPPORTS_PUD_PFNMAP=y\nCONFIG_VFIO_PCI_CORE=m\nCONFIG_VFIO_PCI=m\n";

    #[test]
    fn versions_parse_and_612_is_the_line() {
        assert_eq!(parse_version("6.12.95+deb12-cloud-amd64"), Some((6, 12)));
        assert_eq!(parse_version("7.3.4"), Some((7, 3)));
        assert_eq!(parse_version("garbage"), None);
        assert_eq!(version_check(Some("6.12.0")).status, Status::Pass);
        assert_eq!(version_check(Some("7.0.1")).status, Status::Pass);
        let old = version_check(Some("6.11.9"));
        assert_eq!(old.status, Status::Fail);
        assert!(old.fix.unwrap().contains("6.12 or newer"));
        assert_eq!(version_check(Some("5.15.0")).status, Status::Fail);
        assert_eq!(version_check(Some("x")).status, Status::Warn);
        assert_eq!(version_check(None).status, Status::Warn);
    }

    #[test]
    fn config_values_are_read_exactly() {
        assert_eq!(config_value(GOOD_CONFIG, "VFIO_PCI"), Some("m"));
        assert_eq!(config_value(GOOD_CONFIG, "VFIO"), None);
        assert_eq!(
            config_value("# CONFIG_VFIO_PCI is not set\n", "VFIO_PCI"),
            None
        );
    }

    fn statuses(config: &str) -> Vec<Status> {
        config_checks(Some(&(PathBuf::from("/boot/config-x"), config.to_string())))
            .iter()
            .map(|r| r.status)
            .collect()
    }

    #[test]
    fn config_pass_warn_fail() {
        assert_eq!(statuses(GOOD_CONFIG), [Status::Pass, Status::Pass]);
        let pmd_only = GOOD_CONFIG.replace("CONFIG_ARCH_SUPPORTS_PUD_PFNMAP=y\n", "");
        assert_eq!(statuses(&pmd_only), [Status::Warn, Status::Pass]);
        let none = "CONFIG_VFIO_PCI=y\n";
        assert_eq!(statuses(none), [Status::Fail, Status::Pass]);
        let no_vfio = GOOD_CONFIG.replace("CONFIG_VFIO_PCI=m\n", "");
        let results = config_checks(Some(&(PathBuf::from("c"), no_vfio)));
        assert_eq!(results[1].status, Status::Fail);
        assert!(results[1]
            .fix
            .as_deref()
            .unwrap()
            .contains("CONFIG_VFIO_PCI"));
        let missing = config_checks(None);
        assert!(missing.iter().all(|r| r.status == Status::Warn));
        assert!(missing[0].fix.as_deref().unwrap().contains("/boot/config-"));
    }

    #[test]
    fn config_is_found_in_proc_boot_or_modules() {
        let host = FakeHost::new("kconfig");
        let view = host.view();
        assert!(find_config(&view, "6.12.1").is_none());
        host.write("usr/lib/modules/6.12.1/config", "CONFIG_A=y\n");
        let (path, _) = find_config(&view, "6.12.1").unwrap();
        assert!(path.ends_with("usr/lib/modules/6.12.1/config"));
        host.write("boot/config-6.12.1", "CONFIG_B=y\n");
        let (path, text) = find_config(&view, "6.12.1").unwrap();
        assert!(path.ends_with("boot/config-6.12.1"), "{path:?}");
        assert_eq!(text, "CONFIG_B=y\n");
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(GOOD_CONFIG.as_bytes()).unwrap();
        host.write("proc/config.gz", gz.finish().unwrap());
        let (path, text) = find_config(&view, "6.12.1").unwrap();
        assert!(path.ends_with("proc/config.gz"));
        assert_eq!(text, GOOD_CONFIG);
    }

    #[test]
    fn the_handler_is_looked_for_only_when_vfio_pci_is_loaded() {
        let host = FakeHost::new("kallsyms");
        host.write("proc/sys/kernel/osrelease", "6.12.95+deb12-cloud-amd64\n");
        let handler = |host: &FakeHost| checks(&host.view()).pop().unwrap();
        let unloaded = handler(&host);
        assert_eq!(unloaded.status, Status::Warn);
        assert_eq!(unloaded.fix.as_deref(), Some("modprobe vfio-pci"));
        host.dir("sys/module/vfio_pci");
        assert_eq!(handler(&host).status, Status::Warn); // no kallsyms
        host.write(
            "proc/kallsyms",
            "0000000000000000 t vfio_pci_mmap_huge_faults [x]\n",
        );
        let missing = handler(&host);
        assert_eq!(missing.status, Status::Fail);
        assert!(missing.fix.as_deref().unwrap().contains("6.12"));
        host.write(
            "proc/kallsyms",
            "0000000000000000 T foo\n0000000000000000 t vfio_pci_mmap_huge_fault\t[vfio_pci_core]\n",
        );
        let found = handler(&host);
        assert_eq!(found.status, Status::Pass, "{found:?}");
        assert_eq!(found.fix, None);
        assert_eq!(checks(&host.view())[0].status, Status::Pass);
    }
}
