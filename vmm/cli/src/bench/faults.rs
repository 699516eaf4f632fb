//! Counting vfio-pci's faults on a BAR, by order, with a kprobe on
//! `vfio_pci_mmap_huge_fault(struct vm_fault *vmf, unsigned int order)`
//! (the page-fault handler calls it with order 0). vfio-pci's own
//! dynamic-debug line is rate-limited and undercounts; the kprobe sees
//! every call.
//!
//! Counts come from a histogram trigger keyed by order (every hit counts,
//! however many) where the kernel has hist triggers, else from the trace
//! buffer's lines (which can overflow: the result says so). Needs a
//! writable tracefs (root, /sys/kernel/tracing mounted); without one the
//! bench says so and reports no counts.

use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};

/// Where tracefs is normally mounted.
pub const TRACEFS: &str = "/sys/kernel/tracing";
const GROUP: &str = "barge_bench";
const EVENT: &str = "hf";
const HIST: &str = "hist:keys=order";

/// Host faults by order (0 = 4 KiB, 9 = 2 MiB, 18 = 1 GiB).
pub type FaultCounts = BTreeMap<u32, u64>;

/// Errors installing the probe (the bench goes on without counts).
#[derive(Debug, thiserror::Error)]
pub enum FaultProbeError {
    /// tracefs cannot be written.
    #[error("cannot add a kprobe in {root}/kprobe_events ({source}); host fault counts need root and a mounted tracefs with kprobes")]
    Install {
        /// tracefs root.
        root: PathBuf,
        source: std::io::Error,
    },
}

/// An installed kprobe; removed on drop.
#[derive(Debug)]
pub struct FaultProbe {
    root: PathBuf,
    hist: bool,
}

fn append(path: &Path, text: &str) -> std::io::Result<()> {
    let mut file = OpenOptions::new().append(true).open(path)?;
    file.write_all(text.as_bytes())
}

impl FaultProbe {
    /// Adds and enables the kprobe under `root` (normally [`TRACEFS`]).
    pub fn install(root: &Path) -> Result<Self, FaultProbeError> {
        let events = root.join("kprobe_events");
        let definition = format!("p:{GROUP}/{EVENT} vfio_pci_mmap_huge_fault order=%si:u32\n");
        // A leftover from an interrupted run is removed first (best effort).
        let _ = append(&events, &format!("-:{GROUP}/{EVENT}\n"));
        append(&events, &definition).map_err(|source| FaultProbeError::Install {
            root: root.to_path_buf(),
            source,
        })?;
        let mut probe = FaultProbe {
            root: root.to_path_buf(),
            hist: false,
        };
        probe.hist = append(&probe.event_dir().join("trigger"), &format!("{HIST}\n")).is_ok();
        append(&probe.event_dir().join("enable"), "1\n").map_err(|source| {
            FaultProbeError::Install {
                root: root.to_path_buf(),
                source,
            }
        })?;
        Ok(probe)
    }

    fn event_dir(&self) -> PathBuf {
        self.root.join("events").join(GROUP).join(EVENT)
    }

    /// How the counts are taken, for the output.
    pub fn method(&self) -> &'static str {
        if self.hist {
            "kprobe on vfio_pci_mmap_huge_fault, calls by order (hist trigger; a call that cannot map its order falls back to a smaller one)"
        } else {
            "kprobe on vfio_pci_mmap_huge_fault, calls by order (trace buffer lines: may overflow; a call that cannot map its order falls back to a smaller one)"
        }
    }

    /// Forgets the counts so far.
    pub fn reset(&self) {
        if self.hist {
            let _ = append(
                &self.event_dir().join("trigger"),
                &format!("{HIST}:clear\n"),
            );
        }
        // Opening `trace` for writing with truncation clears the buffer.
        let _ = std::fs::write(self.root.join("trace"), "");
    }

    /// The faults since the last [`Self::reset`].
    pub fn counts(&self) -> FaultCounts {
        if self.hist {
            let text = std::fs::read_to_string(self.event_dir().join("hist")).unwrap_or_default();
            parse_hist(&text)
        } else {
            let text = std::fs::read_to_string(self.root.join("trace")).unwrap_or_default();
            parse_trace(&text)
        }
    }
}

impl Drop for FaultProbe {
    fn drop(&mut self) {
        let dir = self.event_dir();
        let _ = append(&dir.join("enable"), "0\n");
        if self.hist {
            let _ = append(&dir.join("trigger"), &format!("!{HIST}\n"));
        }
        let _ = append(
            &self.root.join("kprobe_events"),
            &format!("-:{GROUP}/{EVENT}\n"),
        );
    }
}

/// Counts from a hist file: lines `{ order:          0 } hitcount:     512`.
pub fn parse_hist(text: &str) -> FaultCounts {
    let mut counts = FaultCounts::new();
    for line in text.lines() {
        let Some(rest) = line.trim().strip_prefix("{ order:") else {
            continue;
        };
        let mut parts = rest.split('}');
        let order = parts.next().and_then(|o| o.trim().parse::<u32>().ok());
        let hits = parts
            .next()
            .and_then(|h| h.split("hitcount:").nth(1))
            .and_then(|h| h.trim().parse::<u64>().ok());
        if let (Some(order), Some(hits)) = (order, hits) {
            *counts.entry(order).or_default() += hits;
        }
    }
    counts
}

/// Counts from trace lines `... hf: (vfio_pci_mmap_huge_fault+0x0/...) order=18`.
pub fn parse_trace(text: &str) -> FaultCounts {
    let mut counts = FaultCounts::new();
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        if !line.contains(&format!(" {EVENT}:")) {
            continue;
        }
        if let Some(order) = line
            .split("order=")
            .nth(1)
            .and_then(|o| o.split_whitespace().next())
            .and_then(|o| o.parse::<u32>().ok())
        {
            *counts.entry(order).or_default() += 1;
        }
    }
    counts
}

/// `18:8 0:3`-style text, or `-` when there were none.
pub fn describe(counts: &FaultCounts) -> String {
    if counts.is_empty() {
        return "-".to_string();
    }
    counts
        .iter()
        .rev()
        .map(|(order, n)| format!("{}x{n}", order_name(*order)))
        .collect::<Vec<_>>()
        .join(" ")
}

/// "4K", "2M", "1G" or "order N".
pub fn order_name(order: u32) -> String {
    match order {
        0 => "4K".to_string(),
        9 => "2M".to_string(),
        18 => "1G".to_string(),
        n => format!("o{n}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hist_output_is_parsed_by_order() {
        let text = "# event histogram\n#\n# trigger info: hist:keys=order:vals=hitcount:sort=hitcount:size=2048 [active]\n#\n\n{ order:          0 } hitcount:        512\n{ order:         18 } hitcount:          8\n\nTotals:\n    Hits: 520\n    Entries: 2\n    Dropped: 0\n";
        assert_eq!(parse_hist(text), FaultCounts::from([(0, 512), (18, 8)]));
        assert!(parse_hist("").is_empty());
    }

    #[test]
    fn trace_lines_are_counted_by_order() {
        let text = "# tracer: nop\n#\n           barge-123     [001] d..1.   12.3: hf: (vfio_pci_mmap_huge_fault+0x0/0x1c0) order=18\n           barge-123     [001] d..1.   12.4: hf: (vfio_pci_mmap_huge_fault+0x0/0x1c0) order=18\n           barge-123     [000] .....   12.5: hf: (vfio_pci_mmap_huge_fault+0x0/0x1c0) order=0\n  other-1 [000] ..... 1.0: bargehf: (x) order=9\n";
        assert_eq!(parse_trace(text), FaultCounts::from([(0, 1), (18, 2)]));
    }

    #[test]
    fn counts_are_described_largest_first() {
        assert_eq!(describe(&FaultCounts::from([(0, 3), (18, 8)])), "1Gx8 4Kx3");
        assert_eq!(describe(&FaultCounts::new()), "-");
        assert_eq!(order_name(5), "o5");
    }

    #[test]
    fn a_missing_tracefs_is_a_clear_error() {
        let err = FaultProbe::install(Path::new("/nonexistent/tracing")).unwrap_err();
        assert!(err.to_string().contains("need root"), "{err}");
    }
}
