//! The bench's guest: generated x86-64 machine code (no Linux), wrapped in
//! a minimal ELF64 "vmlinux" barge loads like any kernel.
//!
//! It starts in long mode on barge's boot page tables (the first 4 GiB
//! identity-mapped with 2 MiB pages, stack at `BOOT_STACK_POINTER`) and:
//!
//! 1. finds the BAR's guest physical address in the device's configuration
//!    space (device 00:01.0, the first PCI device barge adds, through the
//!    0xCF8/0xCFC ports);
//! 2. maps the BAR in its own page tables with 1 GiB pages (2 MiB pages
//!    when the vCPU lacks 1 GiB page support, CPUID 0x8000_0001 EDX bit
//!    26), identity, so only the host and KVM side differs between modes;
//! 3. with `measure` set: the first-touch sweep (one 8-byte read per 4 KiB
//!    over the whole BAR), warm sequential reads (8 loads per 64 bytes) and
//!    writes (`rep stosq`, zeros) over a window at the BAR's start, and
//!    dependent random 8-byte reads over the whole BAR (an LCG whose next
//!    address depends on the value just read), each timed with `rdtsc`
//!    behind `lfence`;
//! 4. writes `bench.KEY=VALUE` lines (16 hex digits) to COM1 and powers
//!    off through the ACPI sleep register.
//!
//! The bench writes zeros over the window: the BAR's contents are lost.

#[cfg(target_arch = "x86_64")]
use guest_programs::code_asm::IcedError;

/// Guest RAM the bench VM needs: page tables for a BAR up to 512 GiB end
/// below 8 MiB.
pub const GUEST_MEMORY: u64 = 64 << 20;
/// The largest BAR the payload maps (one PML4 entry).
pub const MAX_BAR_SIZE: u64 = 512 << 30;

/// Errors generating the payload.
#[derive(Debug, thiserror::Error)]
pub enum PayloadError {
    /// The BAR cannot be mapped by the payload.
    #[error(
        "BAR of {size:#x} bytes: the bench maps BARs of 4 KiB up to 512 GiB; choose another --bar"
    )]
    BarSize { size: u64 },
    /// A BAR index above 5.
    #[error("BAR index {0} does not exist: PCI devices have BARs 0 to 5")]
    BarIndex(u8),
    /// The assembler refused the code (a bug in the generator).
    #[cfg(target_arch = "x86_64")]
    #[error("cannot assemble the bench payload: {0}")]
    Assemble(#[from] IcedError),
    /// The payload is x86-64 code.
    #[cfg(not(target_arch = "x86_64"))]
    #[error(
        "barge bench's measuring guest is x86-64 machine code: run barge bench on an x86_64 \
         host (on aarch64, measure with a Linux guest and `barge run --report`)"
    )]
    NotThisArchitecture,
}

/// What the payload does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PayloadParams {
    /// The BAR to measure (of device 00:01.0).
    pub bar_index: u8,
    /// Its size in bytes.
    pub bar_size: u64,
    /// Run the measurements; without, only find and map the BAR, print its
    /// address and power off (the pre-fault VM).
    pub measure: bool,
    /// Bytes of the sequential read/write window (a multiple of 64, at most
    /// the BAR size).
    pub window: u64,
    /// Passes over the window, for reads and for writes each.
    pub passes: u32,
    /// Dependent random 8-byte reads.
    pub random_reads: u64,
}

impl PayloadParams {
    /// `window` clamped to the BAR and rounded down to 64 bytes (at least 64).
    pub fn effective_window(&self) -> u64 {
        (self.window.min(self.bar_size) & !63).max(64)
    }

    /// The mask the random reads apply to offsets: the largest power of two
    /// not above the BAR size, minus one, 8-byte aligned.
    pub fn random_mask(&self) -> u64 {
        let pow2 = if self.bar_size.is_power_of_two() {
            self.bar_size
        } else {
            1u64 << (63 - self.bar_size.leading_zeros())
        };
        (pow2 - 1) & !7
    }
}

#[cfg(target_arch = "x86_64")]
mod x86_64;
#[cfg(target_arch = "x86_64")]
pub use x86_64::payload_elf;

/// The payload as an ELF64 executable: x86-64 code, so not on this host.
#[cfg(not(target_arch = "x86_64"))]
pub fn payload_elf(_params: &PayloadParams) -> Result<Vec<u8>, PayloadError> {
    Err(PayloadError::NotThisArchitecture)
}
