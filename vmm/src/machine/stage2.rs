//! KVM's stage-2 (second-level) page table of this VM, read back where the
//! kernel dumps it: arm64 kernels built with `CONFIG_PTDUMP_STAGE2_DEBUGFS`
//! (Linux 6.13+) give every VM `/sys/kernel/debug/kvm/<pid>-<fd>/stage2_page_tables`,
//! in the ptdump format (`arch/arm64/kvm/ptdump.c` printing through
//! `arch/arm64/mm/ptdump.c`'s `note_page`): one line per run of leaf entries
//! of one table level and one set of attributes, the level as its number
//! (with 4 KiB pages: 1 a 1 GiB block, 2 a 2 MiB block, 3 a 4 KiB page),
//!
//! ```text
//! ---[ Guest IPA ]---
//! 0x0000000040000000-0x0000000040200000           2M 2   R W px ux  AF BLK
//! 0x0000000040200000-0x0000000040201000           4K 3   R W px ux  AF
//! 0x0000000040201000-0x0000000080000000     1046524K 3
//! ```
//!
//! A valid entry's attributes start with a blank, an invalid one's with
//! `F`, and a run of empty entries has none: only valid runs that are
//! readable or writable count as mapped. On arm64 KVM picks a device
//! BAR's stage-2 block size from the alignment of the BAR's host mapping
//! and memslot, not from the host page table's level, so this dump is the
//! only way to know what the guest got; the host's faults
//! (`machine::host_faults`) say what the host table got.
//!
//! The dump is opened when the VM is built (before seccomp confines the
//! thread) and read once the vCPUs stopped, before teardown deletes the
//! memslots: it holds what the guest touched during the run. Kernels
//! without it (every Debian kernel up to 7.3, and x86, whose proof is
//! KVM_PRE_FAULT_MEMORY and KVM's page counters) give `None`.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use crate::report::{DeviceReport, PageCountsReport};

/// Where debugfs is normally mounted.
pub const DEBUGFS: &str = "/sys/kernel/debug";
/// The dump's name in the VM's KVM debugfs folder.
const DUMP_NAME: &str = "stage2_page_tables";
/// The only translation granule whose levels are the report's 4 KiB /
/// 2 MiB / 1 GiB.
const GRANULE_4K: u64 = 4096;
/// The marker the dump begins with.
const IPA_MARKER: &str = "---[ Guest IPA ]---";

/// The open stage-2 dump of one VM.
#[derive(Debug)]
pub struct Stage2Dump {
    path: PathBuf,
    file: File,
}

impl Stage2Dump {
    /// Opens the dump of the VM `vm` created by this thread, if the kernel
    /// has one; `None` (logged at debug level) otherwise.
    pub fn open(vm: &impl AsRawFd) -> Option<Self> {
        let creator = thread_id()?;
        Self::open_in(Path::new(DEBUGFS), creator, vm.as_raw_fd())
    }

    /// [`Self::open`] with debugfs at `root`, for the VM with file
    /// descriptor `fd` created by thread `creator` (KVM names the folder
    /// after the creating thread's ID and the fd number).
    pub fn open_in(root: &Path, creator: u32, fd: i32) -> Option<Self> {
        let path = root
            .join("kvm")
            .join(format!("{creator}-{fd}"))
            .join(DUMP_NAME);
        match File::open(&path) {
            Ok(file) => Some(Stage2Dump { path, file }),
            Err(e) => {
                log::debug!(
                    "no stage-2 dump at {} ({e}): the report's `stage2` stays null \
                     (arm64 kernels need CONFIG_PTDUMP_STAGE2_DEBUGFS and debugfs mounted)",
                    path.display()
                );
                None
            }
        }
    }

    /// The whole dump as it is now; `None` (logged) when it cannot be read.
    pub fn read(&mut self) -> Option<String> {
        let mut text = String::new();
        let read = self
            .file
            .seek(SeekFrom::Start(0))
            .and_then(|_| self.file.read_to_string(&mut text));
        match read {
            Ok(_) => Some(text),
            Err(e) => {
                log::warn!("cannot read the stage-2 dump {}: {e}", self.path.display());
                None
            }
        }
    }
}

/// This thread's ID, from /proc/thread-self (`<pid>/task/<tid>`).
fn thread_id() -> Option<u32> {
    let link = std::fs::read_link("/proc/thread-self").ok()?;
    link.file_name()?.to_str()?.parse().ok()
}

/// One line of the dump: `[start, end)` at one table level.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stage2Run {
    pub start: u64,
    pub end: u64,
    /// The table level of the entries, as the dump numbers it (KVM's
    /// levels: 3 is the last, 4 KiB with 4 KiB pages).
    pub level: u32,
    /// Whether the entries map anything (readable or writable).
    pub mapped: bool,
}

/// The runs of `text`; lines that are not runs (the markers) are skipped.
pub fn parse(text: &str) -> Vec<Stage2Run> {
    text.lines().filter_map(parse_line).collect()
}

fn parse_line(line: &str) -> Option<Stage2Run> {
    let mut words = line.split_whitespace();
    let (start, end) = words.next()?.split_once('-')?;
    let hex = |s: &str| u64::from_str_radix(s.strip_prefix("0x")?, 16).ok();
    let (start, end) = (hex(start)?, hex(end)?);
    let _size = words.next()?;
    let level = words.next()?.parse().ok()?;
    // The attributes: the valid bit (a blank, or `F` when clear), `R`, `W`,
    // the execute-never pair (`px ux`, `PXNUXN`, ...), `AF`, `BLK`.
    let flags: Vec<&str> = words.collect();
    let mapped = flags.iter().any(|f| *f == "R" || *f == "W") && !flags.contains(&"F");
    (end > start).then_some(Stage2Run {
        start,
        end,
        level,
        mapped,
    })
}

/// Entry size of a leaf at table `level` with a 4 KiB granule (level 0
/// holds no leaves there).
fn entry_size(level: u32) -> Option<u64> {
    match level {
        3 => Some(4 << 10),
        2 => Some(2 << 20),
        1 => Some(1 << 30),
        _ => None,
    }
}

/// Whether `text` is a stage-2 dump at all (its first line is the IPA
/// marker): anything else is not counted, so a changed format gives
/// `stage2: null`, not zeros.
pub fn is_dump(text: &str) -> bool {
    text.lines().next().map(str::trim) == Some(IPA_MARKER)
}

/// The mapped entries of `runs` inside `[gpa, gpa + size)`, by size.
/// `None` unless the host's pages (the stage-2 granule KVM uses) are
/// `granule` 4 KiB.
pub fn pages_in(runs: &[Stage2Run], gpa: u64, size: u64, granule: u64) -> Option<PageCountsReport> {
    if granule != GRANULE_4K {
        return None;
    }
    let end = gpa.checked_add(size)?;
    let mut pages = PageCountsReport::default();
    for run in runs.iter().filter(|r| r.mapped) {
        let (Some(entry), from, to) = (entry_size(run.level), run.start.max(gpa), run.end.min(end))
        else {
            continue;
        };
        if to <= from {
            continue;
        }
        let count = (to - from) / entry;
        match entry {
            e if e == 4 << 10 => pages.pages_4k += count,
            e if e == 2 << 20 => pages.pages_2m += count,
            _ => pages.pages_1g += count,
        }
    }
    Some(pages)
}

/// Fills each mapped BAR's `stage2` in `devices` from the dump `text`.
pub fn report_bars(text: &str, devices: &mut [DeviceReport]) {
    if !is_dump(text) {
        log::warn!(
            "the stage-2 dump does not begin with `{IPA_MARKER}`: its format is not the one \
             barge reads, and `stage2` stays null"
        );
        return;
    }
    let runs = parse(text);
    let Some(granule) = host_page_size() else {
        log::warn!("cannot read the host's page size: the stage-2 dump is not counted");
        return;
    };
    if granule != GRANULE_4K {
        log::info!(
            "host pages are {granule} bytes: the stage-2 dump's levels are not the report's \
             4 KiB / 2 MiB / 1 GiB, and `stage2` stays null"
        );
    }
    for bar in devices.iter_mut().flat_map(|d| d.bars.iter_mut()) {
        if !bar.trapped {
            bar.stage2 = pages_in(&runs, bar.gpa, bar.size, granule);
        }
    }
}

/// `AT_PAGESZ` in the auxiliary vector.
const AT_PAGESZ: u64 = 6;

/// The host's base page size (the stage-2 granule KVM uses), from this
/// process's auxiliary vector; `None` if it cannot be read.
pub fn host_page_size() -> Option<u64> {
    let auxv = std::fs::read("/proc/self/auxv").ok()?;
    let words: Vec<u64> = auxv
        .chunks_exact(8)
        .map(|c| u64::from_ne_bytes(c.try_into().unwrap_or_default()))
        .collect();
    words
        .chunks_exact(2)
        .find(|pair| pair[0] == AT_PAGESZ)
        .map(|pair| pair[1])
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A dump in the format of Linux 7.3's `note_page` (levels numbered, the
    /// attributes as `stage2_pte_bits` spells them) for a VM with 512 MiB of
    /// RAM at 0x4000_0000 partly touched and a 1 GiB BAR at 0x80_0000_0000
    /// whose first 6 MiB the guest touched: two 2 MiB blocks, then 4 KiB
    /// pages; the GiB above it is one 1 GiB block.
    const DUMP: &str = "---[ Guest IPA ]---\n\
0x0000000000000000-0x0000000040000000           1G 1\n\
0x0000000040000000-0x0000000040400000           4M 2   R W px ux  AF BLK\n\
0x0000000040400000-0x0000000040401000           4K 3   R W px ux  AF    \n\
0x0000000040401000-0x0000008000000000   535818236K 3\n\
0x0000008000000000-0x0000008000400000           4M 2   R W PXNUXN AF BLK\n\
0x0000008000400000-0x0000008000600000           2M 3   R W PXNUXN AF    \n\
0x0000008000600000-0x0000008040000000        1018M 3\n\
0x0000008040000000-0x0000008080000000           1G 1   R W PXNUXN AF BLK\n";

    #[test]
    fn runs_are_read_with_their_level_and_whether_they_map() {
        assert!(is_dump(DUMP));
        let runs = parse(DUMP);
        assert_eq!(runs.len(), 8);
        assert_eq!(
            runs[1],
            Stage2Run {
                start: 0x4000_0000,
                end: 0x4040_0000,
                level: 2,
                mapped: true
            }
        );
        assert!(!runs[0].mapped && !runs[3].mapped && !runs[6].mapped);
        assert_eq!(runs[5].level, 3);
    }

    #[test]
    fn a_bar_counts_only_its_own_mapped_entries_by_size() {
        let runs = parse(DUMP);
        let bar = pages_in(&runs, 0x80_0000_0000, 1 << 30, GRANULE_4K).unwrap();
        assert_eq!(
            bar,
            PageCountsReport {
                pages_4k: 512,
                pages_2m: 2,
                pages_1g: 0
            }
        );
        // The next GiB is one PUD block; the RAM below has its own.
        let next = pages_in(&runs, 0x80_4000_0000, 1 << 30, GRANULE_4K).unwrap();
        assert_eq!((next.pages_4k, next.pages_2m, next.pages_1g), (0, 0, 1));
        let ram = pages_in(&runs, 0x4000_0000, 512 << 20, GRANULE_4K).unwrap();
        assert_eq!((ram.pages_4k, ram.pages_2m, ram.pages_1g), (1, 2, 0));
        // A range that cuts a run counts the part inside.
        let part = pages_in(&runs, 0x80_0020_0000, 2 << 20, GRANULE_4K).unwrap();
        assert_eq!(part.pages_2m, 1);
    }

    /// Dumps Linux 7.3.4 (Debian's source and cloud-arm64 config with
    /// CONFIG_PTDUMP_STAGE2_DEBUGFS=y) printed in the arm64 lab for barge's
    /// VM: 512 MiB of RAM at 0x4000_0000, the 1 GiB ivshmem BAR 2 at
    /// 0x1_0000_0000, the guest having read its second page and its last
    /// word; planned aligned, then with `bar-align=4k`.
    const LINUX_ALIGNED: &str = include_str!("testdata/stage2-linux-7.3-aligned-bar.txt");
    const LINUX_CAPPED: &str = include_str!("testdata/stage2-linux-7.3-capped-bar.txt");

    #[test]
    fn dumps_linux_printed_count_two_blocks_aligned_and_two_pages_capped() {
        let count = |text: &str, gpa: u64, size: u64| {
            assert!(is_dump(text));
            let p = pages_in(&parse(text), gpa, size, GRANULE_4K).unwrap();
            (p.pages_4k, p.pages_2m, p.pages_1g)
        };
        assert_eq!(count(LINUX_ALIGNED, 0x1_0000_0000, 1 << 30), (0, 2, 0));
        assert_eq!(count(LINUX_CAPPED, 0x1_0000_0000, 1 << 30), (2, 0, 0));
        // RAM: 2 MiB blocks, the ones KVM has aged (no AF) still mapped.
        assert_eq!(count(LINUX_ALIGNED, 0x4000_0000, 512 << 20), (0, 43, 0));
        assert_eq!(count(LINUX_CAPPED, 0x4000_0000, 512 << 20), (0, 42, 0));
    }

    #[test]
    fn invalid_entries_markers_and_other_granules_count_nothing() {
        let runs = parse(
            "---[ Guest IPA ]---\n\
             0x0000000080000000-0x0000000080200000           2M 2 F R W px ux  AF BLK\n\
             not a line\n\
             0x0000000080200000-0x0000000080100000           1M 3   R W px ux  AF    \n\
             0x0000000080200000-0x0000000080400000           2M PMD   R W x  AF BLK\n",
        );
        // The inverted line and the one with a named level are not runs.
        assert_eq!(runs.len(), 1);
        let pages = pages_in(&runs, 0x8000_0000, 4 << 20, GRANULE_4K).unwrap();
        assert_eq!(pages, PageCountsReport::default());
        assert_eq!(pages_in(&parse(DUMP), 0x4000_0000, 1 << 20, 64 << 10), None);
        // Text that does not begin with the marker is no dump at all.
        assert!(!is_dump(""));
        assert!(!is_dump(&DUMP[DUMP.find('\n').unwrap() + 1..]));
    }

    #[test]
    fn the_dump_is_found_by_creator_and_fd_and_read_again_each_time() {
        let root = std::env::temp_dir().join(format!("barge-stage2-{}", std::process::id()));
        let dir = root.join("kvm").join("1234-7");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(DUMP_NAME), DUMP).unwrap();
        assert!(Stage2Dump::open_in(&root, 1234, 8).is_none());
        let mut dump = Stage2Dump::open_in(&root, 1234, 7).unwrap();
        assert_eq!(dump.read().as_deref(), Some(DUMP));
        assert_eq!(dump.read().as_deref(), Some(DUMP));
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn this_thread_and_the_host_page_size_are_known() {
        assert!(thread_id().unwrap() > 0);
        // 4 KiB on the machines the tests run on (x86_64, the arm64 lab).
        assert_eq!(host_page_size(), Some(GRANULE_4K));
    }
}
