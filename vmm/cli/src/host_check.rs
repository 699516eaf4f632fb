//! `barge host-check`: runs the library's checks (`vmm::host_check`) on this
//! host and prints them, one line each or as JSON. The only thing here
//! besides printing is the payload `--exercise` boots: a guest that powers
//! off at once, written to a temporary file.

use std::path::PathBuf;

use vmm::host_check::{self, CheckResult, HostCheckRequest, HostView};

/// What `barge host-check` was asked.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostCheckArgs {
    /// `--device vfio=BDF` addresses.
    pub devices: Vec<String>,
    /// `--json`.
    pub json: bool,
    /// `--exercise`.
    pub exercise: bool,
}

/// Errors setting the checks up (the checks themselves never fail: they
/// report).
#[derive(Debug, thiserror::Error)]
pub enum HostCheckError {
    /// The `--exercise` payload could not be written.
    #[error("cannot write the --exercise payload to {}: {source}; set TMPDIR to a writable directory", path.display())]
    Payload {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The tiny guest a scratch VM boots: an arm64 Image that powers off through PSCI
/// SYSTEM_OFF.
#[cfg(target_arch = "aarch64")]
fn payload() -> Vec<u8> {
    guest_programs::arm64::poweroff_image()
}

/// The tiny guest a scratch VM boots: power off through the ACPI sleep register.
#[cfg(target_arch = "x86_64")]
fn payload() -> Vec<u8> {
    use guest_programs::asm::{acpi_poweroff, assemble, hang};
    guest_programs::elf::elf64(&assemble(|a| {
        acpi_poweroff(a)?;
        hang(a)
    }))
}

/// Runs every check; returns the text to print and the exit status.
pub fn run(args: &HostCheckArgs) -> Result<(String, i32), HostCheckError> {
    let payload_path =
        std::env::temp_dir().join(format!("barge-host-check-{}.elf", std::process::id()));
    let mut request = HostCheckRequest {
        devices: args.devices.clone(),
        exercise_kernel: None,
    };
    if args.exercise && !args.devices.is_empty() {
        std::fs::write(&payload_path, payload()).map_err(|source| HostCheckError::Payload {
            path: payload_path.clone(),
            source,
        })?;
        request.exercise_kernel = Some(payload_path.clone());
    }
    let results = host_check::run(&HostView::host(), &request);
    if request.exercise_kernel.is_some() {
        let _ = std::fs::remove_file(&payload_path);
    }
    Ok((
        render(&results, args.json),
        host_check::exit_status(&results),
    ))
}

/// One line per check, a summary line; or the JSON array.
pub fn render(results: &[CheckResult], json: bool) -> String {
    if json {
        let mut text = serde_json::to_string_pretty(results).unwrap_or_else(|_| "[]".into());
        text.push('\n');
        return text;
    }
    let mut text: String = results.iter().map(|r| r.to_line() + "\n").collect();
    let count = |status| results.iter().filter(|r| r.status == status).count();
    text.push_str(&format!(
        "{} PASS, {} WARN, {} FAIL\n",
        count(host_check::Status::Pass),
        count(host_check::Status::Warn),
        count(host_check::Status::Fail)
    ));
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_has_a_line_per_check_and_a_summary() {
        let results = [
            CheckResult::pass("kvm", "ok"),
            CheckResult::fail("iommu groups", "none", "intel_iommu=on"),
        ];
        let text = render(&results, false);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3);
        assert!(lines[1].starts_with("FAIL  iommu groups"), "{text}");
        assert!(lines[1].ends_with("-- fix: intel_iommu=on"), "{text}");
        assert_eq!(lines[2], "1 PASS, 0 WARN, 1 FAIL");
        let json: serde_json::Value = serde_json::from_str(&render(&results, true)).unwrap();
        assert_eq!(json[1]["fix"], "intel_iommu=on");
        assert_eq!(json[0]["fix"], serde_json::Value::Null);
    }

    #[test]
    fn the_payload_is_an_elf() {
        assert_eq!(&payload()[..4], b"\x7fELF");
    }
}
