//! `barge host-check`: what this host gives barge, in the manner of
//! libvirt's `virt-host-validate`. Each check is a [`CheckResult`]: PASS,
//! WARN or FAIL, a name, what was found and, when it is not PASS, what to do.
//!
//! The checks read files under a [`HostView`] (the sysfs, proc and dev roots,
//! and the root `/boot` and `/usr/lib/modules` are under), so a test gives
//! them a fake tree. Only the KVM checks and `--exercise` issue ioctls, each
//! through barge's own modules (`machine::kvm`, `machine::prefault`,
//! `machine::kvm_stats`, the builder), split into a probe and a pure function
//! over what the probe found.
//!
//! - [`kvm`]: /dev/kvm, KVM_CAP_PRE_FAULT_MEMORY, KVM_GET_STATS_FD;
//! - [`kernel`]: huge pfnmap (kernel version, kernel config, vfio-pci's huge
//!   fault handler);
//! - [`iommu`]: IOMMU groups, interrupt remapping, iommufd or the legacy
//!   container;
//! - [`memory`]: huge page pools and transparent huge pages;
//! - [`device`]: per `--device`: its driver, IOMMU group, BARs, resizable
//!   BAR, memory decode;
//! - [`exercise`]: per device, a scratch VM that maps and pre-faults its BARs.

pub mod device;
pub mod exercise;
pub mod iommu;
pub mod kernel;
pub mod kvm;
pub mod memory;

use std::path::{Path, PathBuf};

use serde::Serialize;

/// A check's outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub enum Status {
    /// What barge needs is there.
    #[serde(rename = "PASS")]
    Pass,
    /// barge runs, but gets less than it could (smaller pages, no proof), or
    /// the check could not tell.
    #[serde(rename = "WARN")]
    Warn,
    /// barge cannot do what the check is about.
    #[serde(rename = "FAIL")]
    Fail,
}

impl Status {
    /// `PASS`, `WARN` or `FAIL`.
    pub const fn name(self) -> &'static str {
        match self {
            Status::Pass => "PASS",
            Status::Warn => "WARN",
            Status::Fail => "FAIL",
        }
    }
}

/// One check: the JSON object `{"check", "status", "detail", "fix"}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CheckResult {
    /// What was checked, e.g. `kvm` or `0000:41:00.0 BAR1`.
    pub check: String,
    /// PASS, WARN or FAIL.
    pub status: Status,
    /// What was found.
    pub detail: String,
    /// What to do about it; `None` on PASS.
    pub fix: Option<String>,
}

impl CheckResult {
    /// A PASS.
    pub fn pass(check: impl Into<String>, detail: impl Into<String>) -> Self {
        Self {
            check: check.into(),
            status: Status::Pass,
            detail: detail.into(),
            fix: None,
        }
    }

    /// A WARN with what to do.
    pub fn warn(
        check: impl Into<String>,
        detail: impl Into<String>,
        fix: impl Into<String>,
    ) -> Self {
        Self {
            check: check.into(),
            status: Status::Warn,
            detail: detail.into(),
            fix: Some(fix.into()),
        }
    }

    /// A FAIL with what to do.
    pub fn fail(
        check: impl Into<String>,
        detail: impl Into<String>,
        fix: impl Into<String>,
    ) -> Self {
        Self {
            check: check.into(),
            status: Status::Fail,
            detail: detail.into(),
            fix: Some(fix.into()),
        }
    }

    /// One line: status, name, detail and, when not PASS, the fix.
    pub fn to_line(&self) -> String {
        let mut line = format!("{}  {:<28} {}", self.status.name(), self.check, self.detail);
        if let Some(fix) = &self.fix {
            line.push_str(" -- fix: ");
            line.push_str(fix);
        }
        line.replace('\n', "; ")
    }
}

/// Where the checks look: the host's own paths, or a fake tree in tests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostView {
    /// The root `boot/config-<release>` and `usr/lib/modules/<release>/config` are under.
    pub root: PathBuf,
    /// sysfs (`/sys`).
    pub sysfs: PathBuf,
    /// procfs (`/proc`).
    pub proc: PathBuf,
    /// Device nodes (`/dev`): `iommu`, `vfio/vfio`.
    pub dev: PathBuf,
    /// The KVM device node (`$BARGE_KVM_DEVICE` or `/dev/kvm` on the host).
    pub kvm: PathBuf,
}

impl HostView {
    /// This host: `/`, `/sys`, `/proc`, `/dev` and barge's KVM device path.
    pub fn host() -> Self {
        Self {
            root: PathBuf::from("/"),
            sysfs: PathBuf::from("/sys"),
            proc: PathBuf::from("/proc"),
            dev: PathBuf::from("/dev"),
            kvm: crate::machine::kvm::kvm_device_path(),
        }
    }

    /// A tree under `root`: `root/sys`, `root/proc`, `root/dev`, `root/dev/kvm`.
    pub fn under(root: &Path) -> Self {
        Self {
            root: root.to_path_buf(),
            sysfs: root.join("sys"),
            proc: root.join("proc"),
            dev: root.join("dev"),
            kvm: root.join("dev/kvm"),
        }
    }

    /// A sysfs file, trimmed; `None` when it cannot be read.
    pub(crate) fn sys(&self, relative: &str) -> Option<String> {
        read_trimmed(&self.sysfs.join(relative))
    }

    /// A procfs file, trimmed; `None` when it cannot be read.
    pub(crate) fn proc_file(&self, relative: &str) -> Option<String> {
        read_trimmed(&self.proc.join(relative))
    }
}

/// A file's text without surrounding whitespace; `None` when unreadable.
pub(crate) fn read_trimmed(path: &Path) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .map(|text| text.trim().to_string())
}

/// What `barge host-check` was asked to check.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostCheckRequest {
    /// Host PCI devices (`DDDD:BB:DD.F`) to check for passthrough.
    pub devices: Vec<String>,
    /// `--exercise`: the payload kernel a scratch VM boots for each device
    /// (any ELF vmlinux that powers off; `barge` writes one). `None`: no
    /// scratch VMs.
    pub exercise_kernel: Option<PathBuf>,
}

/// Every check, in order: KVM, huge pfnmap, IOMMU, huge pages, then each
/// device (and its scratch VM with `exercise_kernel`).
pub fn run(view: &HostView, request: &HostCheckRequest) -> Vec<CheckResult> {
    let mut results = kvm::kvm_checks(&kvm::probe(&view.kvm));
    results.extend(kernel::checks(view));
    results.extend(iommu::checks(view));
    results.extend(memory::checks(view));
    for bdf in &request.devices {
        let device_results = device::checks(view, bdf);
        let usable = !device_results.iter().any(|r| r.status == Status::Fail);
        results.extend(device_results);
        if let Some(kernel) = &request.exercise_kernel {
            results.extend(exercise::checks(bdf, kernel, usable));
        }
    }
    results
}

/// `barge host-check`'s exit status: 0 when nothing FAILs, 1 otherwise.
pub fn exit_status(results: &[CheckResult]) -> i32 {
    if results.iter().any(|r| r.status == Status::Fail) {
        crate::status::ERROR
    } else {
        0
    }
}

#[cfg(test)]
pub(crate) mod fake {
    //! A fake host tree for the checks' tests.

    use std::path::{Path, PathBuf};

    use super::HostView;

    /// A temporary directory tree, removed on drop.
    pub struct FakeHost {
        pub root: PathBuf,
    }

    impl FakeHost {
        pub fn new(name: &str) -> Self {
            let root = std::env::temp_dir()
                .join(format!("barge-host-check-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&root);
            std::fs::create_dir_all(&root).unwrap();
            Self { root }
        }

        pub fn view(&self) -> HostView {
            HostView::under(&self.root)
        }

        /// Writes `contents` at `relative` (directories made as needed).
        pub fn write(&self, relative: &str, contents: impl AsRef<[u8]>) -> &Self {
            let path = self.root.join(relative);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, contents).unwrap();
            self
        }

        pub fn dir(&self, relative: &str) -> &Self {
            std::fs::create_dir_all(self.root.join(relative)).unwrap();
            self
        }

        /// A symlink at `relative` pointing at `target` (as given).
        pub fn link(&self, relative: &str, target: &str) -> &Self {
            let path = self.root.join(relative);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            let _ = std::fs::remove_file(&path);
            std::os::unix::fs::symlink(Path::new(target), path).unwrap();
            self
        }

        pub fn remove(&self, relative: &str) -> &Self {
            let path = self.root.join(relative);
            let _ = std::fs::remove_file(&path).or_else(|_| std::fs::remove_dir_all(&path));
            self
        }
    }

    impl Drop for FakeHost {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.root);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_has_status_name_detail_and_fix() {
        let pass = CheckResult::pass("kvm", "/dev/kvm opened");
        assert_eq!(
            pass.to_line(),
            format!("PASS  {:<28} /dev/kvm opened", "kvm")
        );
        let warn = CheckResult::warn("thp", "never", "echo madvise >\nX");
        assert!(
            warn.to_line().starts_with("WARN  thp"),
            "{}",
            warn.to_line()
        );
        assert!(warn.to_line().ends_with("-- fix: echo madvise >; X"));
    }

    #[test]
    fn json_has_the_four_keys_and_null_fix_on_pass() {
        let json = serde_json::to_value(vec![
            CheckResult::pass("a", "ok"),
            CheckResult::fail("b", "bad", "do it"),
        ])
        .unwrap();
        assert_eq!(
            json,
            serde_json::json!([
                {"check": "a", "status": "PASS", "detail": "ok", "fix": null},
                {"check": "b", "status": "FAIL", "detail": "bad", "fix": "do it"},
            ])
        );
    }

    #[test]
    fn exit_status_is_1_only_when_something_fails() {
        let warn = CheckResult::warn("w", "", "");
        assert_eq!(exit_status(&[CheckResult::pass("p", ""), warn.clone()]), 0);
        assert_eq!(exit_status(&[warn, CheckResult::fail("f", "", "")]), 1);
        assert_eq!(exit_status(&[]), 0);
    }
}
