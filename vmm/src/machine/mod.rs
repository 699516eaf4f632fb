//! The KVM machine: opening KVM, the VM and its memslots, vCPU threads and
//! their exits, guest RAM and the host mappings behind it, pre-faulting
//! and KVM's statistics. The thin modules here (`kvm`, `mapping`,
//! `prefault`, the mmap part of `memory`) hold the ioctls and mmaps; the
//! logic above them has no `unsafe`.

pub mod exit;
pub mod host_faults;
pub mod kvm;
pub mod kvm_stats;
pub mod mapping;
pub mod memory;
pub mod prefault;
pub mod stage2;
pub mod vcpu;
pub mod vm;

/// The `VmFlags` of the mapping of this process that holds `addr`, from
/// /proc/self/smaps (`dc`: MADV_DONTFORK).
#[cfg(test)]
pub(crate) fn smaps_vm_flags(addr: u64) -> Option<Vec<String>> {
    let smaps = std::fs::read_to_string("/proc/self/smaps").ok()?;
    let mut inside = false;
    for line in smaps.lines() {
        let first = line.split_whitespace().next().unwrap_or_default();
        if let Some((start, end)) = first.split_once('-') {
            if let (Ok(start), Ok(end)) =
                (u64::from_str_radix(start, 16), u64::from_str_radix(end, 16))
            {
                inside = (start..end).contains(&addr);
                continue;
            }
        }
        if inside {
            if let Some(flags) = line.strip_prefix("VmFlags:") {
                return Some(flags.split_whitespace().map(str::to_string).collect());
            }
        }
    }
    None
}
