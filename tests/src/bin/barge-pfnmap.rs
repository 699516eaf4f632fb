//! `barge-pfnmap --device BDF --case CASE`: the huge pfnmap matrix of issue
//! 14 on one vfio-pci ivshmem device, one case per run, each printing one
//! line of what it saw. Linux's huge pfnmap work (vfio-pci faulting PMD and
//! PUD entries, 6.12) was tested with a 128 MiB BAR (PMD), an 8 GiB BAR
//! (PUD), pre-fault, mprotect() and fork(); these are the same cases, on
//! BAR2 mapped by this program (its own mmap of the device fd, at the VFIO
//! region's offset, at an address aligned to min(BAR size, 1 GiB), and NOT
//! MADV_DONTFORK, unlike barge's mappings):
//!
//! - `fault`: one volatile read per 2 MiB; the host faults it took;
//! - `mprotect`: the same, then mprotect(PROT_READ) and back to
//!   PROT_READ|PROT_WRITE, the reads again, then one write per 2 MiB: the
//!   host faults of each pass;
//! - `fork`: a word written at the start and the end of the BAR, then
//!   fork(): the child reads both and `_exit`s with 0 when they are what
//!   the parent wrote; the parent reads them again after the child exits;
//! - `kvm`: a KVM VM with a memslot on the BAR (GPA 4 GiB) and one vCPU;
//!   KVM's `pages_1g`/`pages_2m`/`pages_4k` after KVM_PRE_FAULT_MEMORY of
//!   the slot, after mprotect and back (before and after pre-faulting
//!   again), and after a fork whose child exits at once.
//!
//! Host faults are counted with the kprobe the lab tests set
//! (`p:bargehf vfio_pci_mmap_huge_fault order=%si:u32`): the program clears
//! the trace before a step and reads the `order=N` lines after it, so each
//! line says `faults ORDERxCOUNT ...` for its own step (`faults none` when
//! nothing faulted, `faults ?` without the kprobe). The kprobe counts calls
//! of the handler, fallbacks included: a BAR mapped only 2 MiB-aligned
//! shows `faults 18x8 9x4096` (each GiB tried at order 18, refused, then
//! every 2 MiB at order 9), so `18x8` alone means eight 1 GiB entries.
//!
//! What the lab showed (tests/tests/pfnmap_lab.rs asserts it), the same on
//! the 6.12 and the 7.3.4 host:
//!
//! - the first touch faults once per huge page: order 18 (1 GiB) eight
//!   times on the 8 GiB BAR, order 9 (2 MiB) 64 times on the 128 MiB one;
//! - mprotect(PROT_READ) and back does NOT make the BAR fault again, at
//!   any order: the kernel changes the huge entries' protection in place
//!   (no split, no zap), and neither the reads nor a write per 2 MiB after
//!   it fault (the read faults had already mapped the entries writable).
//!   Issue 14 expected a second round of faults at the same order; there
//!   is none, which is as good: the mapping keeps its page size;
//! - fork() without MADV_DONTFORK copies the huge entries to the child
//!   (VM_PFNMAP mappings are always copied): the child reads the parent's
//!   words without a fault, and the parent's mapping is untouched;
//! - KVM: pre-fault maps the slot with 8 x 1G or 64 x 2M; mprotect and back
//!   drops all of KVM's mappings of the slot (its MMU notifier sees the
//!   change), and pre-faulting again maps the same sizes without a host
//!   fault (the host entries stayed); a fork changes nothing in KVM.

use std::collections::BTreeMap;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, ValueEnum};
use vfio_ioctls::{VfioContainer, VfioDevice};
use vmm::machine::{kvm, kvm_stats, prefault};

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Case {
    Fault,
    Mprotect,
    Fork,
    Kvm,
}

#[derive(Debug, Parser)]
#[command(about = "The huge pfnmap matrix on a vfio-pci device's BAR2")]
struct Args {
    /// The vfio-pci device (ivshmem: BAR2 is its shared memory).
    #[arg(long)]
    device: String,
    /// The case to run.
    #[arg(long, value_enum)]
    case: Case,
}

const MIB2: u64 = 2 << 20;
const GIB: u64 = 1 << 30;
/// Where the `kvm` case puts the BAR in guest physical memory.
const GPA: u64 = 4 * GIB;
const TRACE: &str = "/sys/kernel/tracing/trace";
const KPROBE: &str = "/sys/kernel/tracing/events/kprobes/bargehf";
/// The words the `fork` case writes.
const HEAD_WORD: u64 = 0x5046_4e4d_4150_0001;
const TAIL_WORD: u64 = 0x5046_4e4d_4150_0002;

/// BAR2 mapped at an aligned address; unmapped on drop.
struct BarMap {
    addr: u64,
    size: u64,
    align: u64,
}

impl BarMap {
    /// Maps `size` bytes of `fd` at `offset`, at an address aligned to
    /// min(size, 1 GiB): a PROT_NONE reservation of size + align, the BAR
    /// mapped MAP_FIXED at its aligned start, the slack unmapped.
    fn new(fd: i32, offset: u64, size: u64) -> Result<Self, String> {
        let align = size.min(GIB);
        let total = (size + align) as usize;
        // SAFETY: a fresh anonymous PROT_NONE mapping at an address the
        // kernel picks; it replaces nothing.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                total,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(format!(
                "reserving {total:#x} bytes: {}",
                std::io::Error::last_os_error()
            ));
        }
        let base = base as u64;
        let addr = base.next_multiple_of(align);
        // SAFETY: `addr..addr + size` lies inside the reservation just made,
        // which nothing else uses; MAP_FIXED replaces only that.
        let mapped = unsafe {
            libc::mmap(
                addr as *mut libc::c_void,
                size as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_FIXED,
                fd,
                offset as libc::off_t,
            )
        };
        let error = std::io::Error::last_os_error();
        // SAFETY: the slack before and after the BAR is the reservation's
        // own and nothing points into it.
        unsafe {
            if addr > base {
                libc::munmap(base as *mut libc::c_void, (addr - base) as usize);
            }
            let end = addr + size;
            if base + total as u64 > end {
                libc::munmap(
                    end as *mut libc::c_void,
                    (base + total as u64 - end) as usize,
                );
            }
        }
        if mapped == libc::MAP_FAILED {
            // SAFETY: the reservation's remaining part at `addr` is ours.
            unsafe { libc::munmap(addr as *mut libc::c_void, size as usize) };
            return Err(format!("mmap of BAR2 at {addr:#x}: {error}"));
        }
        Ok(Self { addr, size, align })
    }

    /// One volatile read per 2 MiB; returns how many were read.
    fn touch(&self) -> u64 {
        let mut n = 0;
        let mut sum = 0u64;
        for off in (0..self.size).step_by(MIB2 as usize) {
            sum = sum.wrapping_add(self.read(off));
            n += 1;
        }
        std::hint::black_box(sum);
        n
    }

    /// One volatile write (of its offset) per 2 MiB; returns how many.
    fn touch_writes(&self) -> u64 {
        let mut n = 0;
        for off in (0..self.size).step_by(MIB2 as usize) {
            self.write(off, off);
            n += 1;
        }
        n
    }

    fn read(&self, off: u64) -> u64 {
        assert!(off + 8 <= self.size);
        // SAFETY: `off + 8 <= size`, so the word lies inside the mapping,
        // which stays mapped until drop; device memory, hence volatile.
        unsafe { std::ptr::read_volatile((self.addr + off) as *const u64) }
    }

    fn write(&self, off: u64, value: u64) {
        assert!(off + 8 <= self.size);
        // SAFETY: as in `read`; the mapping is PROT_WRITE and shared memory
        // of the ivshmem device, which nothing else in this process uses.
        unsafe { std::ptr::write_volatile((self.addr + off) as *mut u64, value) }
    }

    fn protect(&self, prot: i32) -> Result<(), String> {
        // SAFETY: changes the protection of this mapping only; no reference
        // into it is live across the call.
        let ret =
            unsafe { libc::mprotect(self.addr as *mut libc::c_void, self.size as usize, prot) };
        if ret != 0 {
            return Err(format!("mprotect: {}", std::io::Error::last_os_error()));
        }
        Ok(())
    }

    fn describe(&self) -> String {
        format!(
            "BAR2 {} MiB at {:#x} (aligned to {} MiB)",
            self.size >> 20,
            self.addr,
            self.align >> 20
        )
    }
}

impl Drop for BarMap {
    fn drop(&mut self) {
        // SAFETY: the mapping is this struct's own; nothing refers to it
        // after drop (the KVM VM that had a slot on it is dropped first).
        unsafe { libc::munmap(self.addr as *mut libc::c_void, self.size as usize) };
    }
}

/// The host fault orders traced since the last call (`18x8 9x1`), and
/// clears the trace.
fn faults() -> String {
    if !Path::new(KPROBE).exists() {
        return "?".to_string();
    }
    let text = std::fs::read_to_string(TRACE).unwrap_or_default();
    let _ = std::fs::write(TRACE, "");
    let mut orders: BTreeMap<u32, u32> = BTreeMap::new();
    for order in text
        .split("order=")
        .skip(1)
        .filter_map(|rest| rest.split_whitespace().next()?.parse().ok())
    {
        *orders.entry(order).or_default() += 1;
    }
    if orders.is_empty() {
        return "none".to_string();
    }
    orders
        .iter()
        .rev()
        .map(|(order, count)| format!("{order}x{count}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// `fork()`s a child that runs `child` and `_exit`s with its status; waits
/// for it and returns that status.
fn fork_with(child: impl FnOnce() -> i32) -> Result<i32, String> {
    // SAFETY: this program has one thread, so the child starts with no
    // lock held by another thread; it runs `child` (reads of the mapping)
    // and `_exit`s.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(format!("fork: {}", std::io::Error::last_os_error()));
    }
    if pid == 0 {
        let status = child();
        // SAFETY: in the child: leave at once, running none of the
        // parent's exit handlers or destructors.
        unsafe { libc::_exit(status) };
    }
    let mut status = 0;
    // SAFETY: waits for the child just created; `status` is a valid int.
    if unsafe { libc::waitpid(pid, &mut status, 0) } < 0 {
        return Err(format!("waitpid: {}", std::io::Error::last_os_error()));
    }
    if !libc::WIFEXITED(status) {
        return Err(format!("the child did not exit (wait status {status:#x})"));
    }
    Ok(libc::WEXITSTATUS(status))
}

fn case_fault(bar: &BarMap) -> Result<String, String> {
    faults();
    let n = bar.touch();
    Ok(format!(
        "fault: {}: {n} reads, faults {}",
        bar.describe(),
        faults()
    ))
}

fn case_mprotect(bar: &BarMap) -> Result<String, String> {
    faults();
    let n = bar.touch();
    let first = faults();
    bar.protect(libc::PROT_READ)?;
    let on_protect = faults();
    bar.protect(libc::PROT_READ | libc::PROT_WRITE)?;
    let on_restore = faults();
    bar.touch();
    let again = faults();
    let written = bar.touch_writes();
    let writes = faults();
    Ok(format!(
        "mprotect: {}: {n} reads, faults {first}; PROT_READ and back (faults {on_protect}, \
         {on_restore}); {n} reads again, faults {again}; {written} writes, faults {writes}",
        bar.describe()
    ))
}

fn case_fork(bar: &BarMap) -> Result<String, String> {
    let tail = bar.size - 8;
    faults();
    bar.write(0, HEAD_WORD);
    bar.write(tail, TAIL_WORD);
    let before = faults();
    let status =
        fork_with(|| i32::from(!(bar.read(0) == HEAD_WORD && bar.read(tail) == TAIL_WORD)))?;
    let in_child = faults();
    let parent_ok = bar.read(0) == HEAD_WORD && bar.read(tail) == TAIL_WORD;
    let after = faults();
    Ok(format!(
        "fork: {}: wrote head and tail (faults {before}); child exit {status} ({}, faults \
         {in_child}); parent reads {} (faults {after})",
        bar.describe(),
        if status == 0 {
            "read both"
        } else {
            "WRONG words"
        },
        if parent_ok { "both" } else { "WRONG words" }
    ))
}

fn pages(vm: &impl AsRawFd) -> String {
    match kvm_stats::read_vm_stats(vm) {
        Ok(stats) => {
            let get = |name: &str| stats.get(name).copied().unwrap_or(0);
            format!(
                "1Gx{} 2Mx{} 4Kx{}",
                get("pages_1g"),
                get("pages_2m"),
                get("pages_4k")
            )
        }
        Err(e) => format!("(stats: {e})"),
    }
}

fn case_kvm(bar: &BarMap) -> Result<String, String> {
    let kvm = kvm::open_kvm().map_err(|e| e.to_string())?;
    let vm = kvm.create_vm().map_err(|e| format!("KVM_CREATE_VM: {e}"))?;
    let memslots = kvm::MemslotLog::new();
    // SAFETY: the slot maps `bar`'s own mapping, which stays mapped (mprotect
    // changes only its protection) until `bar` is dropped, after `vm` (this
    // function's locals drop before the caller's `bar`); no vCPU runs, and
    // KVM touches it only for the pre-faults below.
    unsafe { kvm::map_guest_memory(&vm, &memslots, 0, GPA, bar.size, bar.addr) }
        .map_err(|e| e.to_string())?;
    let vcpu = vm
        .create_vcpu(0)
        .map_err(|e| format!("KVM_CREATE_VCPU: {e}"))?;
    let pre_fault = || prefault::pre_fault(&vcpu, GPA, bar.size).map_err(|e| e.to_string());
    faults();
    pre_fault()?;
    let first = format!("{} (faults {})", pages(&vm), faults());
    bar.protect(libc::PROT_READ)?;
    bar.protect(libc::PROT_READ | libc::PROT_WRITE)?;
    let after_mprotect = pages(&vm);
    pre_fault()?;
    let again = format!("{} (faults {})", pages(&vm), faults());
    let status = fork_with(|| 0)?;
    let after_fork = format!("{} (faults {}, child exit {status})", pages(&vm), faults());
    pre_fault()?;
    let fork_again = format!("{} (faults {})", pages(&vm), faults());
    Ok(format!(
        "kvm: {} at GPA {GPA:#x}: pre-fault {first}; mprotect and back {after_mprotect}; \
         pre-fault {again}; fork {after_fork}; pre-fault {fork_again}",
        bar.describe()
    ))
}

fn run(args: &Args) -> Result<String, String> {
    let sysfs = Path::new("/sys/bus/pci/devices").join(&args.device);
    let container =
        VfioContainer::new(None).map_err(|e| format!("cannot open the VFIO container: {e}"))?;
    let device = VfioDevice::new(&sysfs, Arc::new(container), false)
        .map_err(|e| format!("cannot open the VFIO device (is it bound to vfio-pci?): {e}"))?;
    let (size, offset) = (device.get_region_size(2), device.get_region_offset(2));
    if size < MIB2 {
        return Err(format!(
            "BAR2 is {size:#x} bytes: not an ivshmem device's BAR2"
        ));
    }
    let bar = BarMap::new(device.as_raw_fd(), offset, size)?;
    match args.case {
        Case::Fault => case_fault(&bar),
        Case::Mprotect => case_mprotect(&bar),
        Case::Fork => case_fork(&bar),
        Case::Kvm => case_kvm(&bar),
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(line) => {
            println!("{line}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            println!("{:?}: FAILED: {e}", args.case);
            ExitCode::FAILURE
        }
    }
}
