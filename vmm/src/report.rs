//! The JSON report `barge run --report PATH` writes when the VM ends.
//!
//! ```json
//! {
//!   "exit": { "reason": "poweroff", "status": 0 },
//!   "wall_ms": 5123,
//!   "start_to_first_run_ms": 41,
//!   "memory": [
//!     { "gpa": 0, "size": 536870912, "backing": "anonymous", "page_size": 4096 }
//!   ],
//!   "kvm_stats": { "pages_4k": 1200, "pages_2m": 250, "pages_1g": 0 },
//!   "devices": []
//! }
//! ```
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
        /// The report path.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The report path is a directory.
    #[error("cannot write the report to {path}: it is a directory; give --report a file path")]
    IsDirectory {
        /// The report path.
        path: PathBuf,
    },
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
    /// Guest RAM regions in address order.
    pub memory: Vec<MemoryRegionReport>,
    /// KVM's VM statistics at exit, by KVM's names (pages_4k, pages_2m, ...).
    pub kvm_stats: BTreeMap<String, u64>,
    /// Passthrough and shared-memory devices (none yet).
    pub devices: Vec<DeviceReport>,
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

/// A device's entry. There are no devices yet; the passthrough issue adds
/// per-BAR entries, so the list is always empty for now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum DeviceReport {}

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
            memory: vec![MemoryRegionReport {
                gpa: 0,
                size: 512 << 20,
                backing: "anonymous".into(),
                page_size: 4096,
            }],
            kvm_stats: BTreeMap::from([("pages_4k".to_string(), 10), ("pages_2m".to_string(), 3)]),
            devices: vec![],
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
        assert_eq!(value["memory"][0]["gpa"], 0);
        assert_eq!(value["memory"][0]["size"], 536870912u64);
        assert_eq!(value["memory"][0]["backing"], "anonymous");
        assert_eq!(value["memory"][0]["page_size"], 4096);
        assert_eq!(value["kvm_stats"]["pages_2m"], 3);
        assert_eq!(value["devices"], serde_json::json!([]));
    }

    #[test]
    fn report_without_first_run_says_null() {
        let report = Report::default();
        let value: serde_json::Value = serde_json::from_str(&report.to_json_string()).unwrap();
        assert!(value["start_to_first_run_ms"].is_null());
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
