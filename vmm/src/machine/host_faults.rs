//! The host side of a BAR mapping, observed: every call of vfio-pci's fault handler
//! `vfio_pci_mmap_huge_fault(vmf, order)` on one BAR's host mapping, by order and result,
//! counted with a return probe (kretprobe) in tracefs and a histogram trigger keyed on
//! both. A call that maps returns `VM_FAULT_NOPAGE`; one that cannot map its order returns
//! `VM_FAULT_FALLBACK` and the kernel tries a smaller one. So the mapped pages by order are
//! exactly what the host page table got, whatever the attempts were.
//!
//! This is the proof where KVM cannot pre-fault and count (aarch64: no
//! KVM_PRE_FAULT_MEMORY, no pages_4k/2m/1g statistics): the host mapping is the most KVM's
//! stage 2 can mirror. It needs root, tracefs at `/sys/kernel/tracing`, kprobe events,
//! hist triggers and `$argN` in return probes (Linux 6.9+); without them
//! [`HostFaultCounter::watch`] says why and the report says the BAR was not measured.
//! Each counter is one kprobe event of its own (`barge/b<pid>_<n>`), removed on drop.

use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

/// Where tracefs is normally mounted.
pub const TRACEFS: &str = "/sys/kernel/tracing";
/// The kprobe event group barge's counters go in.
const GROUP: &str = "barge";
/// `VM_FAULT_NOPAGE`: the handler installed the page (or block) itself.
pub const VM_FAULT_NOPAGE: u32 = 0x100;
/// `VM_FAULT_FALLBACK`: the handler could not map this order; a smaller one follows.
pub const VM_FAULT_FALLBACK: u32 = 0x800;
/// Where `struct vm_fault` keeps `address` (after `vma`, `gfp_mask` and `pgoff`).
const VM_FAULT_ADDRESS_OFFSET: u32 = 24;

static NEXT_COUNTER: AtomicU32 = AtomicU32::new(0);

/// Why faults cannot be counted.
#[derive(Debug, thiserror::Error)]
pub enum HostFaultError {
    /// tracefs refused the probe or its trigger.
    #[error(
        "cannot count the host's faults on the BAR: writing {path} failed ({source}); this \
         needs root, tracefs at {TRACEFS}, kprobe events, hist triggers and $argN in return \
         probes (Linux 6.9 or newer)"
    )]
    Tracefs {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The host faults on one BAR mapping: `(order, handler result) -> calls`.
pub type FaultCalls = BTreeMap<(u32, u32), u64>;

/// Counts vfio-pci's faults on `[hva, hva + len)` until dropped.
#[derive(Debug)]
pub struct HostFaultCounter {
    root: PathBuf,
    event: String,
    trigger: String,
}

fn append(path: &Path, text: &str) -> Result<(), HostFaultError> {
    OpenOptions::new()
        .append(true)
        .open(path)
        .and_then(|mut file| file.write_all(text.as_bytes()))
        .map_err(|source| HostFaultError::Tracefs {
            path: path.to_path_buf(),
            source,
        })
}

impl HostFaultCounter {
    /// Starts counting the faults on `[hva, hva + len)` (under tracefs at [`TRACEFS`]).
    pub fn watch(hva: u64, len: u64) -> Result<Self, HostFaultError> {
        Self::watch_in(Path::new(TRACEFS), hva, len)
    }

    /// [`Self::watch`] with tracefs at `root`.
    pub fn watch_in(root: &Path, hva: u64, len: u64) -> Result<Self, HostFaultError> {
        let n = NEXT_COUNTER.fetch_add(1, Ordering::Relaxed);
        let event = format!("b{}_{n}", std::process::id());
        append(
            &root.join("kprobe_events"),
            &format!(
                "r:{GROUP}/{event} vfio_pci_mmap_huge_fault order=$arg2:u32 \
                 addr=+{VM_FAULT_ADDRESS_OFFSET}($arg1):u64 ret=$retval:u32\n"
            ),
        )?;
        let counter = HostFaultCounter {
            root: root.to_path_buf(),
            event,
            trigger: format!(
                "hist:keys=order,ret if addr >= {hva:#x} && addr < {:#x}",
                hva.saturating_add(len)
            ),
        };
        // From here on, drop removes what was added.
        append(
            &counter.event_dir().join("trigger"),
            &format!("{}\n", counter.trigger),
        )?;
        append(&counter.event_dir().join("enable"), "1\n")?;
        Ok(counter)
    }

    /// A counter that only reads `events/barge/EVENT/hist` under `root` (a
    /// fake tracefs in tests); its drop's removals fail quietly there.
    #[cfg(test)]
    pub(crate) fn reading(root: &Path, event: &str) -> Self {
        HostFaultCounter {
            root: root.to_path_buf(),
            event: event.to_string(),
            trigger: String::new(),
        }
    }

    fn event_dir(&self) -> PathBuf {
        self.root.join("events").join(GROUP).join(&self.event)
    }

    /// How the counts are taken, for the report.
    pub fn method(&self) -> &'static str {
        "kretprobe on vfio_pci_mmap_huge_fault: calls on the BAR's host mapping by order and \
         result (tracefs hist trigger)"
    }

    /// The calls so far.
    pub fn calls(&self) -> FaultCalls {
        let text = std::fs::read_to_string(self.event_dir().join("hist")).unwrap_or_default();
        parse_hist(&text)
    }
}

impl Drop for HostFaultCounter {
    fn drop(&mut self) {
        let dir = self.event_dir();
        let _ = append(&dir.join("enable"), "0\n");
        let _ = append(&dir.join("trigger"), &format!("!{}\n", self.trigger));
        let _ = append(
            &self.root.join("kprobe_events"),
            &format!("-:{GROUP}/{}\n", self.event),
        );
    }
}

/// Calls from a hist file keyed on order and result: lines
/// `{ order:          9, ret:        256 } hitcount:        512`.
pub fn parse_hist(text: &str) -> FaultCalls {
    let mut calls = FaultCalls::new();
    for line in text.lines() {
        let Some(rest) = line.trim().strip_prefix('{') else {
            continue;
        };
        let Some((keys, hits)) = rest.split_once('}') else {
            continue;
        };
        let field = |name: &str| {
            keys.split(',')
                .filter_map(|kv| kv.split_once(':'))
                .find(|(k, _)| k.trim() == name)
                .and_then(|(_, v)| v.trim().parse::<u32>().ok())
        };
        let hits = hits
            .split("hitcount:")
            .nth(1)
            .and_then(|h| h.trim().parse::<u64>().ok());
        if let (Some(order), Some(ret), Some(hits)) = (field("order"), field("ret"), hits) {
            *calls.entry((order, ret)).or_default() += hits;
        }
    }
    calls
}

/// The pages the host mapped, by order: the calls that returned [`VM_FAULT_NOPAGE`].
pub fn mapped_by_order(calls: &FaultCalls) -> BTreeMap<u32, u64> {
    let mut mapped = BTreeMap::new();
    for ((order, ret), hits) in calls {
        if *ret == VM_FAULT_NOPAGE {
            *mapped.entry(*order).or_default() += hits;
        }
    }
    mapped
}

/// The calls that fell back to a smaller order, by order.
pub fn fallbacks_by_order(calls: &FaultCalls) -> BTreeMap<u32, u64> {
    let mut fallbacks = BTreeMap::new();
    for ((order, ret), hits) in calls {
        if *ret == VM_FAULT_FALLBACK {
            *fallbacks.entry(*order).or_default() += hits;
        }
    }
    fallbacks
}

#[cfg(test)]
mod tests {
    use super::*;

    const HIST: &str = "# event histogram\n#\n# trigger info: hist:keys=order,ret:vals=hitcount:sort=hitcount:size=2048 if addr >= 0x1000 && addr < 0x2000 [active]\n#\n\n{ order:          9, ret:       2048 } hitcount:         33\n{ order:          0, ret:        256 } hitcount:      16384\n{ order:          9, ret:        256 } hitcount:          2\n\nTotals:\n    Hits: 16419\n    Entries: 3\n    Dropped: 0\n";

    #[test]
    fn hist_lines_are_read_by_order_and_result() {
        let calls = parse_hist(HIST);
        assert_eq!(
            calls,
            FaultCalls::from([((0, 256), 16384), ((9, 256), 2), ((9, 2048), 33)])
        );
        assert_eq!(
            mapped_by_order(&calls),
            BTreeMap::from([(0, 16384), (9, 2)])
        );
        assert_eq!(fallbacks_by_order(&calls), BTreeMap::from([(9, 33)]));
        assert!(parse_hist("").is_empty());
        assert!(parse_hist("{ order: x, ret: 256 } hitcount: 3\n{ broken\n").is_empty());
    }

    #[test]
    fn a_counter_writes_its_probe_and_trigger_and_removes_them() {
        let root = std::env::temp_dir().join(format!("barge-tracefs-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root).unwrap();
        std::fs::write(root.join("kprobe_events"), "").unwrap();
        // Without the event's folder (tracefs makes it), the trigger write fails.
        let err = HostFaultCounter::watch_in(&root, 0x1000, 0x1000).unwrap_err();
        assert!(err.to_string().contains("trigger"), "{err}");
        let events = std::fs::read_to_string(root.join("kprobe_events")).unwrap();
        assert!(events.contains("r:barge/b"), "{events}");
        assert!(
            events.contains("-:barge/b"),
            "dropped on the error path: {events}"
        );

        // A fake tracefs with the folder the next event gets.
        let n = NEXT_COUNTER.load(Ordering::Relaxed);
        let dir = root.join(format!("events/barge/b{}_{n}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for file in ["trigger", "enable"] {
            std::fs::write(dir.join(file), "").unwrap();
        }
        std::fs::write(dir.join("hist"), HIST).unwrap();
        let counter = HostFaultCounter::watch_in(&root, 0x1000, 0x1000).unwrap();
        assert_eq!(
            std::fs::read_to_string(dir.join("trigger")).unwrap(),
            "hist:keys=order,ret if addr >= 0x1000 && addr < 0x2000\n"
        );
        assert_eq!(mapped_by_order(&counter.calls())[&0], 16384);
        drop(counter);
        assert!(std::fs::read_to_string(dir.join("trigger"))
            .unwrap()
            .ends_with("!hist:keys=order,ret if addr >= 0x1000 && addr < 0x2000\n"));
        assert_eq!(
            std::fs::read_to_string(dir.join("enable")).unwrap(),
            "1\n0\n"
        );
        let _ = std::fs::remove_dir_all(&root);
    }
}
