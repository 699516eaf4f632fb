//! The guest's view of a passed-through PCI function.
//!
//! Configuration space is the device's own, read through VFIO, except:
//!
//! - **BARs and ROM** (0x10..0x28, 0x30) are [`EmulatedBars`] holding the
//!   planned GPAs. Sizing works; a guest write is answered with a
//!   [`ConfigEvent::Bar`] for the VMM to log and changes nothing the VMM
//!   mapped. The device keeps its host addresses (the writes never reach
//!   it). No ROM is exposed (the ROM BAR reads 0).
//! - **Hidden capabilities** (resizable BAR, SR-IOV) are unlinked by the
//!   probe's [`crate::pci::caps::MaskPlan`]: reads get its patches laid over
//!   them, writes into their bodies are dropped. MSI and MSI-X stay visible.
//! - **Interrupts**, once the VMM wires them ([`VfioPciDevice::with_interrupts`]):
//!   the interrupt line, the MSI and MSI-X registers from Message Control on,
//!   and (through [`VfioBarAccess`]) the MSI-X table and PBA are emulated by
//!   [`super::interrupts::VfioInterrupts`] and never forwarded. Without
//!   them the registers are forwarded (vfio-pci virtualizes them).
//! - **Writes** reach the device only in the parts a guest may write: the
//!   command register (only its [`COMMAND_WRITABLE_BITS`]), the status
//!   register (its error bits are write-1-to-clear), cache line size,
//!   latency timer, interrupt line, and the visible capabilities from 0x40
//!   on. Everything else in the header (IDs, class, header type, BIST,
//!   subsystem, capability pointer, ...) ignores writes. A change of the
//!   command register is reported as [`ConfigEvent::Command`].
//!
//! Guest accesses outside the PCI access contract read all-ones and are
//! ignored on write; nothing a guest does can panic.
//!
//! BAR data accesses in trapped ranges go through [`VfioBarAccess`], a
//! cloneable handle the VMM puts on its MMIO (and I/O) bus.

use std::sync::{Arc, Mutex};

use resources::placement::DevicePlan;

use super::interrupts::VfioInterrupts;

use super::probe::VfioProbe;
use super::VfioDeviceAccess;
use crate::pci::bar::{BarError, BarKind, EmulatedBars, PlannedBar, BAR_COUNT};
use crate::pci::caps::MaskPlan;
use crate::pci::config::{
    CACHE_LINE_SIZE_OFFSET, COMMAND_WRITABLE_BITS, CONFIG_SPACE_SIZE, INTERRUPT_LINE_OFFSET,
    LATENCY_TIMER_OFFSET, STATUS_OFFSET,
};
use crate::pci::{
    access_is_valid, CommandChange, ConfigEvent, PciConfigAccess, COMMAND_MEMORY_SPACE,
    COMMAND_OFFSET,
};

/// Start of the capability area (after the type 0 header).
const CAPABILITIES_START: u16 = 0x40;
/// Start of extended configuration space.
const EXTENDED_START: u16 = 0x100;

/// Why a probed device cannot be set up with a plan. These come from the
/// VMM's own plan, not from the guest.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum VfioDeviceError {
    /// The plan places a BAR the device does not have.
    #[error("the plan places BAR {index}, which the device does not implement; plan the device from its own probe")]
    UnknownBar { index: u8 },
    /// The plan's size for a BAR is not the device's.
    #[error("the plan gives BAR {index} {planned:#x} bytes but the device's BAR has {actual:#x}; plan the device from its own probe")]
    SizeMismatch {
        index: u8,
        /// Size in the plan.
        planned: u64,
        /// Size of the region.
        actual: u64,
    },
    /// The plan does not fit the BAR registers.
    #[error(transparent)]
    Bar(#[from] BarError),
}

/// Trapped BAR accesses, forwarded to VFIO's region read/write. Cheap to
/// clone; every clone reaches the same device.
#[derive(Debug)]
pub struct VfioBarAccess<B: VfioDeviceAccess> {
    backend: Arc<B>,
    /// Region size of each BAR (0: not implemented or not exposed).
    sizes: [u64; BAR_COUNT],
    /// The MSI-X table and PBA, served before the device sees the access.
    interrupts: Option<SharedInterrupts<B>>,
}

/// A device's interrupts, shared by its config model and its BAR traps.
pub type SharedInterrupts<B> = Arc<Mutex<VfioInterrupts<B>>>;

fn lock<B: VfioDeviceAccess>(
    interrupts: &SharedInterrupts<B>,
) -> std::sync::MutexGuard<'_, VfioInterrupts<B>> {
    interrupts.lock().unwrap_or_else(|e| e.into_inner())
}

impl<B: VfioDeviceAccess> Clone for VfioBarAccess<B> {
    fn clone(&self) -> Self {
        Self {
            backend: Arc::clone(&self.backend),
            sizes: self.sizes,
            interrupts: self.interrupts.clone(),
        }
    }
}

impl<B: VfioDeviceAccess> VfioBarAccess<B> {
    /// Whether an access of `len` bytes at `offset` of BAR `index` is one
    /// this handle forwards: an implemented BAR, 1, 2, 4 or 8 bytes, inside
    /// the region.
    pub fn accepts(&self, index: u8, offset: u64, len: usize) -> bool {
        let Some(size) = self.sizes.get(usize::from(index)).copied() else {
            return false;
        };
        matches!(len, 1 | 2 | 4 | 8)
            && offset
                .checked_add(len as u64)
                .is_some_and(|end| end <= size)
    }

    /// Reads BAR `index` at `offset` from the device. Accesses
    /// [`Self::accepts`] refuses read all-ones.
    pub fn bar_read(&self, index: u8, offset: u64, data: &mut [u8]) {
        data.fill(0xff);
        if let Some(interrupts) = &self.interrupts {
            if lock(interrupts).bar_read(index, offset, data) {
                return;
            }
        }
        if self.accepts(index, offset, data.len()) {
            self.backend.region_read(u32::from(index), offset, data);
        } else {
            log::debug!(
                "vfio: ignored read of {} bytes at BAR {index} offset {offset:#x}",
                data.len()
            );
        }
    }

    /// Writes BAR `index` at `offset` on the device. Accesses
    /// [`Self::accepts`] refuses are ignored.
    pub fn bar_write(&self, index: u8, offset: u64, data: &[u8]) {
        if let Some(interrupts) = &self.interrupts {
            if lock(interrupts).bar_write(index, offset, data) {
                return;
            }
        }
        if self.accepts(index, offset, data.len()) {
            self.backend.region_write(u32::from(index), offset, data);
        } else {
            log::debug!(
                "vfio: ignored write of {} bytes at BAR {index} offset {offset:#x}",
                data.len()
            );
        }
    }

    /// The backend (for mapping its fd).
    pub fn backend(&self) -> &Arc<B> {
        &self.backend
    }
}

/// A passed-through PCI function (see module docs).
#[derive(Debug)]
pub struct VfioPciDevice<B: VfioDeviceAccess> {
    backend: Arc<B>,
    bars: EmulatedBars,
    mask: MaskPlan,
    /// `[start, end)` of every hidden capability's bytes.
    hidden_spans: Vec<(u16, u16)>,
    /// Bytes of config space the device has (256 or 4096).
    config_size: u16,
    bar_access: VfioBarAccess<B>,
    /// The command register's memory-space bit as the guest last wrote it.
    /// The device itself keeps memory decode on for as long as barge owns
    /// it: vfio-pci zaps every mmap of the BARs when decode goes off (and
    /// fails faults while it is off), so forwarding the guest's toggles
    /// during boot would make the host and KVM fault the BARs in again, and
    /// barge could not pre-fault them before the guest runs.
    guest_memory_enabled: bool,
    /// INTx, MSI and MSI-X, when the VMM wires them
    /// ([`Self::with_interrupts`]); without, the capabilities are the
    /// device's (vfio-pci's virtualized view) and nothing is delivered.
    interrupts: Option<SharedInterrupts<B>>,
}

impl<B: VfioDeviceAccess> VfioPciDevice<B> {
    /// Serves the interrupt line, the MSI and MSI-X capabilities and the
    /// MSI-X table and PBA (in the BAR traps) from `interrupts`. Take
    /// [`Self::bar_access`] handles after this call.
    pub fn with_interrupts(mut self, interrupts: SharedInterrupts<B>) -> Self {
        self.bar_access.interrupts = Some(Arc::clone(&interrupts));
        self.interrupts = Some(interrupts);
        self
    }

    /// The interrupts, if wired.
    pub fn interrupts(&self) -> Option<&SharedInterrupts<B>> {
        self.interrupts.as_ref()
    }

    /// The device with its memory BARs at the GPAs of `plan` (the planner's
    /// output for `probe.device_input(..)`), and the I/O BARs listed in
    /// `io_ports` as `(index, port)`. I/O BARs not listed are hidden (read
    /// as unimplemented).
    pub fn new(
        backend: Arc<B>,
        probe: &VfioProbe,
        plan: &DevicePlan,
        io_ports: &[(u8, u16)],
    ) -> Result<Self, VfioDeviceError> {
        let mut specs = Vec::new();
        let mut sizes = [0u64; BAR_COUNT];
        for placement in &plan.bars {
            let index = placement.index;
            let bar = probe
                .bar(index)
                .filter(|bar| bar.kind != BarKind::Io)
                .ok_or(VfioDeviceError::UnknownBar { index })?;
            if bar.size() != placement.size {
                return Err(VfioDeviceError::SizeMismatch {
                    index,
                    planned: placement.size,
                    actual: bar.size(),
                });
            }
            specs.push(PlannedBar {
                index,
                kind: bar.kind,
                size: bar.size(),
                gpa: placement.gpa,
            });
            sizes[usize::from(index)] = bar.size();
        }
        for (index, port) in io_ports {
            let bar = probe
                .bar(*index)
                .filter(|bar| bar.kind == BarKind::Io)
                .ok_or(VfioDeviceError::UnknownBar { index: *index })?;
            specs.push(PlannedBar {
                index: *index,
                kind: BarKind::Io,
                size: bar.size(),
                gpa: u64::from(*port),
            });
            sizes[usize::from(*index)] = bar.size();
        }
        let bars = EmulatedBars::new(&specs)?;
        let hidden_spans = hidden_spans(&probe.mask, probe.config_size);
        let config_size = probe.config_size.min(CONFIG_SPACE_SIZE as u64) as u16;
        let bar_access = VfioBarAccess {
            backend: Arc::clone(&backend),
            sizes,
            interrupts: None,
        };
        let device = Self {
            backend,
            bars,
            mask: probe.mask.clone(),
            hidden_spans,
            config_size,
            bar_access,
            guest_memory_enabled: false,
            interrupts: None,
        };
        let command = device.device_command();
        if command & COMMAND_MEMORY_SPACE == 0 {
            device.backend.config_write(
                u64::from(COMMAND_OFFSET),
                &(command | COMMAND_MEMORY_SPACE).to_le_bytes(),
            );
        }
        Ok(device)
    }

    /// The command register as the guest sees it: the device's, with the
    /// memory-space bit the guest wrote.
    fn guest_command(&self) -> u16 {
        let command = self.device_command() & !COMMAND_MEMORY_SPACE;
        if self.guest_memory_enabled {
            command | COMMAND_MEMORY_SPACE
        } else {
            command
        }
    }

    /// The handle for trapped BAR accesses.
    pub fn bar_access(&self) -> VfioBarAccess<B> {
        self.bar_access.clone()
    }

    /// The emulated BARs (planned GPAs, what the guest wrote).
    pub fn bars(&self) -> &EmulatedBars {
        &self.bars
    }

    /// The backend.
    pub fn backend(&self) -> &Arc<B> {
        &self.backend
    }

    /// Reads BAR `index` at `offset` (see [`VfioBarAccess::bar_read`]).
    pub fn bar_read(&self, index: u8, offset: u64, data: &mut [u8]) {
        self.bar_access.bar_read(index, offset, data);
    }

    /// Writes BAR `index` at `offset` (see [`VfioBarAccess::bar_write`]).
    pub fn bar_write(&self, index: u8, offset: u64, data: &[u8]) {
        self.bar_access.bar_write(index, offset, data);
    }

    /// Whether the guest may write the config byte at `offset` (other than
    /// the command register, which is merged through its mask).
    fn byte_writable(&self, offset: u16) -> bool {
        match offset {
            o if o == STATUS_OFFSET || o == STATUS_OFFSET + 1 => true,
            o if o == CACHE_LINE_SIZE_OFFSET || o == LATENCY_TIMER_OFFSET => true,
            o if o == INTERRUPT_LINE_OFFSET => true,
            o if o < CAPABILITIES_START => false,
            o if o >= self.config_size => false,
            o => !self
                .hidden_spans
                .iter()
                .any(|(start, end)| (*start..*end).contains(&o)),
        }
    }

    fn device_command(&self) -> u16 {
        let mut data = [0xff; 2];
        self.backend
            .config_read(u64::from(COMMAND_OFFSET), &mut data);
        u16::from_le_bytes(data)
    }
}

/// The byte spans of the hidden capabilities: from each one's offset up to
/// the next capability of the same list by address (or the list's end).
fn hidden_spans(mask: &MaskPlan, config_size: u64) -> Vec<(u16, u16)> {
    let config_end = config_size.min(CONFIG_SPACE_SIZE as u64) as u16;
    mask.masked
        .iter()
        .map(|hidden| {
            let extended = hidden.offset >= EXTENDED_START;
            let list_end = if extended {
                config_end
            } else {
                EXTENDED_START.min(config_end)
            };
            let end = mask
                .found
                .iter()
                .map(|cap| cap.offset)
                .filter(|offset| *offset > hidden.offset && (*offset >= EXTENDED_START) == extended)
                .min()
                .unwrap_or(list_end);
            (hidden.offset, end)
        })
        .collect()
}

impl<B: VfioDeviceAccess> PciConfigAccess for VfioPciDevice<B> {
    fn config_read(&mut self, offset: u16, data: &mut [u8]) {
        if !access_is_valid(offset, data.len(), CONFIG_SPACE_SIZE) {
            data.fill(0xff);
            return;
        }
        if EmulatedBars::contains(offset) {
            self.bars.read(offset, data);
            return;
        }
        data.fill(0xff);
        if usize::from(offset) + data.len() <= usize::from(self.config_size) {
            self.backend.config_read(u64::from(offset), data);
        }
        self.mask.overlay(offset, data);
        let command_low = usize::from(COMMAND_OFFSET);
        let start = usize::from(offset);
        if (start..start + data.len()).contains(&command_low) {
            let byte = &mut data[command_low - start];
            *byte = (*byte & !(COMMAND_MEMORY_SPACE as u8))
                | (self.guest_command() as u8 & COMMAND_MEMORY_SPACE as u8);
        }
        if let Some(interrupts) = &self.interrupts {
            lock(interrupts).config_read(offset, data);
        }
    }

    fn config_write(&mut self, offset: u16, data: &[u8]) -> Option<ConfigEvent> {
        if !access_is_valid(offset, data.len(), CONFIG_SPACE_SIZE) {
            log::debug!(
                "vfio: ignored config write of {} bytes at {offset:#x}",
                data.len()
            );
            return None;
        }
        if EmulatedBars::contains(offset) {
            return self.bars.write(offset, data).map(ConfigEvent::Bar);
        }
        let start = usize::from(offset);
        let end = start + data.len();
        let command_range = usize::from(COMMAND_OFFSET)..usize::from(COMMAND_OFFSET) + 2;
        let mut event = None;
        if start < command_range.end && end > command_range.start {
            // Merge the written command bytes through the write mask.
            let old = self.guest_command();
            let mut bytes = old.to_le_bytes();
            for (i, value) in data.iter().enumerate() {
                if command_range.contains(&(start + i)) {
                    bytes[start + i - command_range.start] = *value;
                }
            }
            let written = u16::from_le_bytes(bytes);
            let new = (old & !COMMAND_WRITABLE_BITS) | (written & COMMAND_WRITABLE_BITS);
            self.guest_memory_enabled = new & COMMAND_MEMORY_SPACE != 0;
            self.backend.config_write(
                u64::from(COMMAND_OFFSET),
                &(new | COMMAND_MEMORY_SPACE).to_le_bytes(),
            );
            event = CommandChange::between(old, new).map(ConfigEvent::Command);
        }
        // The interrupt registers are emulated, never forwarded.
        let interrupts = self.interrupts.clone();
        let mut interrupts = interrupts.as_ref().map(lock);
        if let Some(interrupts) = &mut interrupts {
            interrupts.config_write(offset, data);
        }
        let emulated = |position: usize| {
            interrupts
                .as_ref()
                .is_some_and(|i| i.owns_config_byte(position as u16))
        };
        // Forward the other writable bytes, in runs.
        let mut run_start = None;
        for position in start..=end {
            let writable = position < end
                && !command_range.contains(&position)
                && !emulated(position)
                && self.byte_writable(position as u16);
            match (writable, run_start) {
                (true, None) => run_start = Some(position),
                (false, Some(run)) => {
                    self.backend
                        .config_write(run as u64, &data[run - start..position - start]);
                    run_start = None;
                }
                _ => {}
            }
        }
        event
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pci::bar::{BarWrite, ROM_BAR_INDEX};
    use crate::pci::caps::{extended_capabilities, standard_capabilities, CapabilityId};
    use crate::pci::config::{BAR0_OFFSET, ROM_BAR_OFFSET};
    use crate::pci::{COMMAND_BUS_MASTER, COMMAND_IO_SPACE, COMMAND_MEMORY_SPACE};
    use crate::vfio::fake::{pattern_byte, FakeRegion, FakeVfioDevice, FakeWrite};
    use crate::vfio::CONFIG_REGION_INDEX;
    use resources::placement::{BarRange, PageSize};

    const GIB: u64 = 1 << 30;
    const MIB: u64 = 1 << 20;

    struct Rig {
        fake: Arc<FakeVfioDevice>,
        device: VfioPciDevice<FakeVfioDevice>,
        plan: DevicePlan,
    }

    fn rig_with(fake: FakeVfioDevice, io_ports: &[(u8, u16)]) -> Rig {
        let fake = Arc::new(fake);
        let probe = VfioProbe::read(&*fake).unwrap();
        let input = probe.device_input("gpu", None);
        let ram = resources::ram_regions(2 * GIB).unwrap();
        let windows = resources::Windows::new(&ram, 46).unwrap();
        let plan = resources::plan(&[input], &windows).unwrap();
        let plan = plan.devices[0].clone();
        let device = VfioPciDevice::new(Arc::clone(&fake), &probe, &plan, io_ports).unwrap();
        fake.clear_writes();
        Rig { fake, device, plan }
    }

    fn rig() -> Rig {
        rig_with(FakeVfioDevice::gpu_like(), &[])
    }

    fn read(device: &mut impl PciConfigAccess, offset: u16, len: usize) -> Vec<u8> {
        let mut data = vec![0x5a; len];
        device.config_read(offset, &mut data);
        data
    }

    fn read32(device: &mut impl PciConfigAccess, offset: u16) -> u32 {
        u32::from_le_bytes(read(device, offset, 4).try_into().unwrap())
    }

    fn guest_view(device: &mut impl PciConfigAccess) -> Vec<u8> {
        (0..CONFIG_SPACE_SIZE as u16)
            .step_by(4)
            .flat_map(|offset| read(device, offset, 4))
            .collect()
    }

    fn gpa(plan: &DevicePlan, index: u8) -> u64 {
        plan.bars.iter().find(|bar| bar.index == index).unwrap().gpa
    }

    #[test]
    fn identity_and_capabilities_are_the_devices() {
        let Rig {
            fake, mut device, ..
        } = rig();
        let config = fake.config_bytes();
        for offset in [0x00u16, 0x08, 0x2c, 0x60, 0x68, 0x78, 0xb4, 0xb8, 0xbc] {
            assert_eq!(
                read(&mut device, offset, 4),
                config[usize::from(offset)..usize::from(offset) + 4],
                "{offset:#x}"
            );
        }
    }

    #[test]
    fn bars_read_planned_gpas_not_host_addresses() {
        let Rig {
            mut device, plan, ..
        } = rig();
        let bar0 = gpa(&plan, 0);
        let bar1 = gpa(&plan, 1);
        let bar3 = gpa(&plan, 3);
        assert_eq!(read32(&mut device, 0x10), bar0 as u32);
        assert_eq!(read32(&mut device, 0x14), bar1 as u32 | 0xc);
        assert_eq!(read32(&mut device, 0x18), (bar1 >> 32) as u32);
        assert_eq!(read32(&mut device, 0x1c), bar3 as u32 | 0xc);
        assert_eq!(read32(&mut device, 0x20), (bar3 >> 32) as u32);
        assert_eq!(
            read32(&mut device, 0x24),
            0,
            "I/O BAR without a port is hidden"
        );
        assert_eq!(read32(&mut device, 0x30), 0, "no ROM");
        assert_eq!(bar1 % (128 * GIB), 0);
    }

    #[test]
    fn bar_sizing_works_and_moves_nothing() {
        let Rig {
            fake,
            mut device,
            plan,
        } = rig();
        let bar1 = gpa(&plan, 1);
        let event = device.config_write(0x14, &[0xff; 4]);
        assert_eq!(
            event,
            Some(ConfigEvent::Bar(BarWrite {
                index: 1,
                address: bar1 & !0xffff_ffff,
                matches_plan: bar1 & 0xffff_ffff == 0,
                sizing: true
            }))
        );
        device.config_write(0x18, &[0xff; 4]);
        assert_eq!(read32(&mut device, 0x14), 0x0000_000c);
        assert_eq!(read32(&mut device, 0x18), !(((128 * GIB) >> 32) as u32 - 1));
        device.config_write(0x14, &(bar1 as u32).to_le_bytes());
        let event = device.config_write(0x18, &((bar1 >> 32) as u32).to_le_bytes());
        assert!(matches!(
            event,
            Some(ConfigEvent::Bar(BarWrite {
                index: 1,
                matches_plan: true,
                sizing: false,
                ..
            }))
        ));
        // A move is reported, reads back as written, and never reaches the device.
        let event = device.config_write(0x10, &0x8000_0000u32.to_le_bytes());
        assert!(matches!(
            event,
            Some(ConfigEvent::Bar(BarWrite {
                index: 0,
                matches_plan: false,
                ..
            }))
        ));
        assert_eq!(device.bars().guest_address(0), Some(0x8000_0000));
        assert_eq!(device.bars().specs().next().unwrap().gpa, gpa(&plan, 0));
        // Writes to the ROM BAR and the hidden I/O BAR change nothing.
        assert_eq!(device.config_write(ROM_BAR_OFFSET, &[0xff; 4]), None);
        assert_eq!(device.config_write(0x24, &[0xff; 4]), None);
        assert_eq!(device.bars().size(ROM_BAR_INDEX), None);
        assert!(fake.writes().is_empty(), "{:?}", fake.writes());
        assert_eq!(
            fake.config_bytes()[0x10..0x14],
            0xa200_0000u32.to_le_bytes()
        );
    }

    #[test]
    fn bar_register_bytes_read_at_every_width() {
        let Rig {
            mut device, plan, ..
        } = rig();
        let value = (gpa(&plan, 1) as u32 | 0xc).to_le_bytes();
        for offset in 0x14..0x18u16 {
            assert_eq!(
                read(&mut device, offset, 1),
                [value[usize::from(offset - 0x14)]]
            );
        }
        assert_eq!(read(&mut device, 0x14, 2), value[..2]);
        assert_eq!(read(&mut device, 0x16, 2), value[2..]);
    }

    #[test]
    fn io_bar_with_a_port_is_emulated_and_sized() {
        let Rig { mut device, .. } = rig_with(FakeVfioDevice::gpu_like(), &[(5, 0xc080)]);
        assert_eq!(read32(&mut device, 0x24), 0xc081);
        device.config_write(0x24, &[0xff; 4]);
        assert_eq!(read32(&mut device, 0x24), 0xffff_ff81);
        let access = device.bar_access();
        let mut data = [0; 2];
        access.bar_read(5, 0x7e, &mut data);
        assert_eq!(data, [pattern_byte(5, 0x7e), pattern_byte(5, 0x7f)]);
    }

    #[test]
    fn hidden_capabilities_are_unlinked_for_the_guest() {
        let Rig { mut device, .. } = rig();
        let view = guest_view(&mut device);
        let standard: Vec<_> = standard_capabilities(&view)
            .capabilities
            .iter()
            .map(|cap| cap.id)
            .collect();
        assert_eq!(
            standard,
            [0x01, 0x05, 0x10, 0x11].map(CapabilityId::Standard),
            "MSI and MSI-X stay visible"
        );
        let extended: Vec<_> = extended_capabilities(&view)
            .capabilities
            .iter()
            .map(|cap| (cap.id, cap.offset))
            .collect();
        assert_eq!(
            extended,
            [
                (CapabilityId::Extended(0x01), 0x100),
                (CapabilityId::Extended(0x1e), 0x258),
                (CapabilityId::Extended(0x0b), 0xc1c)
            ]
        );
        // Every width of the patched AER header agrees.
        let header = &view[0x100..0x104];
        for len in [1usize, 2] {
            for offset in (0x100..0x104u16).step_by(len) {
                let start = usize::from(offset - 0x100);
                assert_eq!(read(&mut device, offset, len), header[start..start + len]);
            }
        }
    }

    #[test]
    fn writes_into_hidden_capabilities_are_dropped() {
        let Rig {
            fake, mut device, ..
        } = rig();
        for offset in [0x250u16, 0x254, 0x256, 0xbb0, 0xbb4, 0xbc0, 0xc18] {
            assert_eq!(device.config_write(offset, &[0xff, 0xff]), None);
        }
        assert!(fake.writes().is_empty(), "{:?}", fake.writes());
        // The neighbours are still writable.
        device.config_write(0x258 + 4, &[1]);
        device.config_write(0xc1c + 4, &[2]);
        device.config_write(0x104, &[3]);
        assert_eq!(
            fake.writes()
                .iter()
                .map(|w| (w.offset, w.data.clone()))
                .collect::<Vec<_>>(),
            [(0x25c, vec![1]), (0xc20, vec![2]), (0x104, vec![3])]
        );
    }

    #[test]
    fn command_writes_are_masked_forwarded_and_reported() {
        let Rig {
            fake, mut device, ..
        } = rig();
        let event = device.config_write(
            COMMAND_OFFSET,
            &(COMMAND_MEMORY_SPACE | COMMAND_BUS_MASTER | 0x8000).to_le_bytes(),
        );
        let Some(ConfigEvent::Command(change)) = event else {
            panic!("{event:?}");
        };
        assert_eq!(change.old, 0);
        assert_eq!(change.new, COMMAND_MEMORY_SPACE | COMMAND_BUS_MASTER);
        assert_eq!(change.memory_toggled(), Some(true));
        assert_eq!(
            fake.writes(),
            [FakeWrite {
                region: CONFIG_REGION_INDEX,
                offset: 4,
                data: (COMMAND_MEMORY_SPACE | COMMAND_BUS_MASTER)
                    .to_le_bytes()
                    .to_vec()
            }]
        );
        // Same value again: forwarded, no event.
        assert_eq!(
            device.config_write(
                COMMAND_OFFSET,
                &(COMMAND_MEMORY_SPACE | COMMAND_BUS_MASTER).to_le_bytes()
            ),
            None
        );
        // A byte write of the high half keeps the low half.
        let event = device.config_write(COMMAND_OFFSET + 1, &[0x04]);
        assert!(matches!(event, Some(ConfigEvent::Command(c)) if c.new == 0x0406));
        // A dword write covers command and status: status forwarded as written.
        fake.clear_writes();
        let event =
            device.config_write(COMMAND_OFFSET, &[COMMAND_IO_SPACE as u8, 0x00, 0x00, 0xf9]);
        assert!(matches!(event, Some(ConfigEvent::Command(c)) if c.new == 0x0001));
        // The guest turned memory decode off; the device keeps it on.
        assert_eq!(
            fake.writes()
                .iter()
                .map(|w| (w.offset, w.data.clone()))
                .collect::<Vec<_>>(),
            [(4, vec![0x03, 0x00]), (6, vec![0x00, 0xf9])]
        );
        let mut command = [0u8; 2];
        device.config_read(COMMAND_OFFSET, &mut command);
        assert_eq!(
            u16::from_le_bytes(command),
            0x0001,
            "the guest sees its own bit"
        );
    }

    #[test]
    fn memory_decode_is_on_in_the_device_from_the_start() {
        let Rig { device, .. } = rig();
        assert_ne!(device.device_command() & COMMAND_MEMORY_SPACE, 0);
        assert_eq!(device.guest_command() & COMMAND_MEMORY_SPACE, 0);
    }

    #[test]
    fn read_only_header_bytes_ignore_writes() {
        let Rig {
            fake, mut device, ..
        } = rig();
        let before = fake.config_bytes();
        for offset in (0x00..0x04u16)
            .chain(0x08..0x0c)
            .chain(0x28..0x30)
            .chain(0x34..0x3c)
        {
            assert_eq!(device.config_write(offset, &[0xab]), None);
        }
        device.config_write(0x0e, &[0xff, 0xff]);
        assert!(fake.writes().is_empty(), "{:?}", fake.writes());
        assert_eq!(fake.config_bytes(), before);
        // A dword at 0x0c forwards only cache line size and latency timer.
        device.config_write(0x0c, &[0x10, 0x20, 0x80, 0xff]);
        // A dword at 0x3c forwards only the interrupt line.
        device.config_write(0x3c, &[0x0b, 0x04, 0xff, 0xff]);
        assert_eq!(
            fake.writes()
                .iter()
                .map(|w| (w.offset, w.data.clone()))
                .collect::<Vec<_>>(),
            [(0x0c, vec![0x10, 0x20]), (0x3c, vec![0x0b])]
        );
    }

    #[test]
    fn capability_writes_at_every_width_are_forwarded() {
        let Rig {
            fake, mut device, ..
        } = rig();
        for (offset, len) in [
            (0xb6u16, 2usize),
            (0x6a, 2),
            (0x80, 4),
            (0x81, 1),
            (0x7c, 4),
        ] {
            fake.clear_writes();
            let data: Vec<u8> = (1..=len as u8).collect();
            device.config_write(offset, &data);
            assert_eq!(
                fake.writes(),
                [FakeWrite {
                    region: CONFIG_REGION_INDEX,
                    offset: u64::from(offset),
                    data
                }]
            );
        }
    }

    #[test]
    fn accesses_outside_the_contract_never_panic() {
        let Rig {
            fake, mut device, ..
        } = rig();
        for offset in [
            0u16,
            1,
            2,
            3,
            0x10,
            0x13,
            0x3f,
            0xfff,
            0xffe,
            0x1000,
            u16::MAX,
        ] {
            for len in 0..=9usize {
                let mut data = vec![0x5a; len];
                device.config_read(offset, &mut data);
                let valid = access_is_valid(offset, len, CONFIG_SPACE_SIZE);
                if !valid {
                    assert!(data.iter().all(|b| *b == 0xff), "{offset:#x} {len}");
                }
                let event = device.config_write(offset, &vec![0xff; len]);
                if !valid {
                    assert_eq!(event, None);
                }
            }
        }
        // Only valid accesses reached the device (and none in the header's
        // read-only bytes or BARs).
        assert!(fake.writes().iter().all(|w| {
            access_is_valid(w.offset as u16, w.data.len(), CONFIG_SPACE_SIZE)
                && !(0x10..0x28).contains(&w.offset)
        }));
    }

    #[test]
    fn conventional_device_reads_all_ones_past_256_bytes() {
        let Rig {
            fake, mut device, ..
        } = rig_with(FakeVfioDevice::gpu_like().with_config_size(256), &[]);
        assert_eq!(read32(&mut device, 0x100), 0xffff_ffff);
        assert_eq!(read32(&mut device, 0xffc), 0xffff_ffff);
        assert_eq!(read32(&mut device, 0xfc), 0);
        device.config_write(0x100, &[1, 2, 3, 4]);
        assert!(fake.writes().is_empty());
    }

    #[test]
    fn trapped_bar_accesses_are_forwarded_and_bounds_checked() {
        let Rig { fake, device, .. } = rig();
        let access = device.bar_access();
        for len in [1usize, 2, 4, 8] {
            let mut data = vec![0; len];
            access.bar_read(0, 0xb9_0000, &mut data);
            let expected: Vec<u8> = (0..len as u64)
                .map(|i| pattern_byte(0, 0xb9_0000 + i))
                .collect();
            assert_eq!(data, expected);
            access.bar_write(0, 0x10, &vec![0xee; len]);
        }
        assert_eq!(fake.writes().len(), 4);
        fake.clear_writes();
        let end = 16 * MIB;
        let mut data = [0u8; 4];
        for (index, offset, len) in [
            (0u8, end - 2, 4usize),
            (0, end, 1),
            (0, u64::MAX, 4),
            (0, 0, 3),
            (0, 0, 16),
            (0, 0, 0),
            (2, 0, 4),
            (4, 0, 4),
            (5, 0, 4),
            (6, 0, 4),
            (7, 0, 4),
            (255, 0, 4),
        ] {
            let mut data = vec![0u8; len];
            access.bar_read(index, offset, &mut data);
            assert!(data.iter().all(|b| *b == 0xff), "{index} {offset:#x} {len}");
            access.bar_write(index, offset, &vec![1; len]);
        }
        assert!(fake.writes().is_empty(), "{:?}", fake.writes());
        device.bar_read(1, 128 * GIB - 4, &mut data);
        assert_eq!(data[3], pattern_byte(1, 128 * GIB - 1));
        device.bar_write(3, 32 * MIB - 8, &[7; 8]);
        assert_eq!(fake.writes().len(), 1);
    }

    #[test]
    fn plans_that_do_not_match_the_device_are_refused() {
        let fake = Arc::new(FakeVfioDevice::gpu_like());
        let probe = VfioProbe::read(&*fake).unwrap();
        let ram = resources::ram_regions(2 * GIB).unwrap();
        let windows = resources::Windows::new(&ram, 46).unwrap();
        let input = probe.device_input("gpu", Some(PageSize::Size2M));
        let good = resources::plan(&[input], &windows).unwrap().devices[0].clone();
        let mut plan = good.clone();
        plan.bars[0].index = 2;
        assert_eq!(
            VfioPciDevice::new(Arc::clone(&fake), &probe, &plan, &[]).unwrap_err(),
            VfioDeviceError::UnknownBar { index: 2 }
        );
        let mut plan = good.clone();
        plan.bars[0].size = 8 * MIB;
        assert!(matches!(
            VfioPciDevice::new(Arc::clone(&fake), &probe, &plan, &[]).unwrap_err(),
            VfioDeviceError::SizeMismatch { index: 0, .. }
        ));
        let mut plan = good.clone();
        plan.bars[1].gpa += 4096;
        assert!(matches!(
            VfioPciDevice::new(Arc::clone(&fake), &probe, &plan, &[]).unwrap_err(),
            VfioDeviceError::Bar(BarError::Misaligned { index: 1, .. })
        ));
        assert_eq!(
            VfioPciDevice::new(Arc::clone(&fake), &probe, &good, &[(0, 0xc000)]).unwrap_err(),
            VfioDeviceError::UnknownBar { index: 0 }
        );
        assert!(VfioPciDevice::new(fake, &probe, &good, &[(5, 0xc000)]).is_ok());
    }

    #[test]
    fn sparse_bar_device_still_reads_its_bars() {
        let fake = FakeVfioDevice::gpu_like().with_region(
            0,
            FakeRegion::mmap(16 * MIB).sparse(vec![BarRange::new(0, 0xb9_0000)]),
        );
        let Rig {
            mut device, plan, ..
        } = rig_with(fake, &[]);
        assert_eq!(read32(&mut device, BAR0_OFFSET), gpa(&plan, 0) as u32);
    }
}
