//! The live path (open, plan, attach, teardown) over the fake VFIO host and
//! device, the fake KVM interrupt side and a real KVM VM for the memslots.

use std::fs::File;
use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use devices::interrupts::fake::FakeKvmIrqs;
use devices::interrupts::{InterruptRouter, KvmIrqs};
use devices::vfio::fake::FakeIrqCall;
use devices::vfio::fake::{
    pattern_byte, FakeEvent, FakeJournal, FakeRegion, FakeVfioDevice, FakeVfioHost,
};
use devices::vfio::host::OpenedBackend;
use devices::vfio::{BarRange, INTX_IRQ_INDEX, MSIX_IRQ_INDEX, REQ_IRQ_INDEX};
use kvm_ioctls::VmFd;
use resources::gsi::{RouteKind, KVM_MAX_IRQ_ROUTES};
use resources::placement::{BarPlacement, DevicePlan, PageSize};
use vm_memory::{GuestAddress, GuestMemoryBackend};

use super::*;
use crate::buses::bus::Buses;
use crate::config::MemoryConfig;
use crate::machine::{kvm, memory};
use crate::pci_devices::bar_mapping::{self, map_bar_areas, SlotAllocator};

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
const BDF: &str = "0000:41:00.0";
const OTHER_BDF: &str = "0000:42:00.0";
/// Guest RAM of the rig: one region.
const RAM_SIZE: u64 = 2 * MIB;
/// MSI-X Message Control of [`small_device`].
const MSIX_CONTROL: u16 = 0x42;

/// A memfd standing in for the VFIO device fd (regions at `index << 40`
/// need a file that large: sparse, costs nothing), with `marker` at BAR2's
/// region offset + 1 MiB.
fn device_fd(marker: &[u8]) -> File {
    let fd = memory::create_memfd(None, 5 << 40).unwrap();
    fd.write_all_at(marker, (2 << 40) + MIB).unwrap();
    fd
}

/// A small device: BAR0 64 KiB 32-bit with MSI-X (4 vectors) in its first
/// page (table at +0, PBA at +0x800), BAR2 64 MiB 64-bit prefetchable,
/// BAR4 256 bytes (sub-page, trapped); INTA; its fd has `marker` at BAR2's
/// region offset + 1 MiB.
fn small_device(marker: &[u8]) -> FakeVfioDevice {
    let mut c = vec![0u8; 4096];
    c[0..4].copy_from_slice(&0x1110_1af4u32.to_le_bytes());
    c[0x06] = 0x10;
    c[0x18] = 0x0c;
    c[0x34] = 0x40;
    c[0x3d] = 1; // INTA
    c[0x40] = 0x11; // MSI-X, 4 entries, table BAR0 +0, PBA BAR0 +0x800
    c[0x42] = 3;
    c[0x48..0x4c].copy_from_slice(&0x800u32.to_le_bytes());
    FakeVfioDevice::new(&c)
        .with_region(0, FakeRegion::mmap(64 << 10))
        .with_region(2, FakeRegion::mmap(64 * MIB))
        .with_region(4, FakeRegion::trapped(256))
        .with_irqs(MSIX_IRQ_INDEX, 4)
        .with_fd(device_fd(marker))
}

/// Reads `len` bytes of this process's memory at `addr` (through
/// /proc/self/mem: no raw pointers).
fn read_mapped(addr: u64, len: usize) -> Vec<u8> {
    let mut data = vec![0; len];
    File::open("/proc/self/mem")
        .unwrap()
        .read_exact_at(&mut data, addr)
        .unwrap();
    data
}

/// A VM (for memslots), guest RAM (for DMA), the fake KVM interrupt side
/// and the shared host over a fake VFIO host.
struct Rig {
    vm: Arc<VmFd>,
    ram: memory::GuestRam,
    kvm: Arc<FakeKvmIrqs>,
    journal: FakeJournal,
    host: Arc<SharedVfioHost<FakeVfioHost>>,
    slots: SlotAllocator,
    memslots: kvm::MemslotLog,
}

impl Rig {
    fn new(host: FakeVfioHost) -> Self {
        Self::with_ram(host, &MemoryConfig::default())
    }

    /// The rig with guest RAM backed as `memory` says.
    fn with_ram(host: FakeVfioHost, memory: &MemoryConfig) -> Self {
        let vm = Arc::new(kvm::open_kvm().unwrap().create_vm().unwrap());
        let ram = memory::create_guest_memory(&[(0, RAM_SIZE)], memory).unwrap();
        let kvm = Arc::new(FakeKvmIrqs::default());
        let journal = host.journal();
        let irqs: Arc<dyn KvmIrqs> = kvm.clone();
        let host = SharedVfioHost::new(
            host,
            Some(Arc::new(
                InterruptRouter::new(irqs, KVM_MAX_IRQ_ROUTES).unwrap(),
            )),
        );
        Self {
            vm,
            ram,
            kvm,
            journal,
            host,
            slots: SlotAllocator::new(1),
            memslots: kvm::MemslotLog::new(),
        }
    }

    /// The rig with `device` at [`BDF`].
    fn with(device: FakeVfioDevice) -> Self {
        Self::new(FakeVfioHost::new().with_device(BDF, device))
    }

    /// Opens the device of `--device` value `config`.
    fn open(&self, config: &str) -> VfioSetup<FakeVfioHost> {
        self.open_with_sysfs(config, Path::new("/nonexistent"))
    }

    fn open_with_sysfs(&self, config: &str, sysfs: &Path) -> VfioSetup<FakeVfioHost> {
        VfioSetup::open(&config.parse().unwrap(), &self.host, sysfs)
            .unwrap()
            .with_kernel_release("6.12.0-1-amd64")
    }

    fn attach_with(
        &mut self,
        setup: VfioSetup<FakeVfioHost>,
        plan: &DevicePlan,
    ) -> Result<AttachedDevice, DeviceSetupError> {
        let mut ctx = AttachContext {
            vm: &self.vm,
            ram: &self.ram,
            slots: &mut self.slots,
            memslots: &self.memslots,
            progress: crate::progress::ProgressOutput::Off,
            thread_init: None,
            count_host_faults: false,
            requester_id: 1 << 3,
        };
        Box::new(setup).attach(plan, &mut ctx)
    }

    /// Plans `setup` alone and attaches it.
    fn attach(&mut self, setup: VfioSetup<FakeVfioHost>) -> (AttachedDevice, DevicePlan) {
        let plan = plan_for(&[&setup]).remove(0);
        let attached = self.attach_with(setup, &plan).unwrap();
        (attached, plan)
    }

    /// The DMA mappings made so far, as `(iova, size, hva)`.
    fn dma_maps(&self) -> Vec<(u64, u64, u64)> {
        self.journal
            .events()
            .into_iter()
            .filter_map(|event| match event {
                FakeEvent::DmaMap { iova, size, hva } => Some((iova, size, hva)),
                _ => None,
            })
            .collect()
    }

    /// Guest RAM's one region as `(gpa, size, hva)`.
    fn ram_region(&self) -> (u64, u64, u64) {
        let hva = self.ram.memory.get_host_address(GuestAddress(0)).unwrap();
        (0, RAM_SIZE, hva as u64)
    }
}

fn plan_for(setups: &[&VfioSetup<FakeVfioHost>]) -> Vec<DevicePlan> {
    let ram = resources::ram_regions(GIB).unwrap();
    let windows = resources::Windows::new(&ram, 40).unwrap();
    let inputs: Vec<_> = setups.iter().map(|setup| setup.plan_input()).collect();
    resources::plan(&inputs, &windows).unwrap().devices
}

fn bar(attached: &AttachedDevice, index: u8) -> &MappedBar {
    attached
        .resources
        .bars()
        .iter()
        .find(|bar| bar.placement.index == index)
        .unwrap()
}

fn placement(plan: &DevicePlan, index: u8) -> &BarPlacement {
    plan.bars.iter().find(|bar| bar.index == index).unwrap()
}

/// The traps as `(gpa, size)`, sorted.
fn trap_ranges(attached: &AttachedDevice) -> Vec<(u64, u64)> {
    let mut ranges: Vec<_> = attached.traps.iter().map(|t| (t.gpa, t.size)).collect();
    ranges.sort_unstable();
    ranges
}

/// The device's traps on an MMIO bus, as the builder puts them.
fn on_bus(attached: &mut AttachedDevice) -> Buses {
    let mut buses = Buses::default();
    for trap in attached.traps.drain(..) {
        buses
            .mmio
            .insert(trap.gpa, trap.size, trap.name, trap.device)
            .unwrap();
    }
    buses
}

#[test]
fn bars_are_placed_at_the_planned_gpa_and_hva_and_mapped_at_their_region_offset() {
    if !guest_programs::testing::kvm_or_skip(
        "bars_are_placed_at_the_planned_gpa_and_hva_and_mapped_at_their_region_offset",
    ) {
        return;
    }
    let mut rig = Rig::with(small_device(b"BARGE"));
    let (attached, plan) = rig.attach(rig.open(&format!("vfio={BDF}")));
    let bars: Vec<u8> = attached
        .resources
        .bars()
        .iter()
        .map(|b| b.placement.index)
        .collect();
    assert_eq!(bars, [0, 2, 4]);
    for bar in attached.resources.bars() {
        let planned = placement(&plan, bar.placement.index);
        assert_eq!(&bar.placement, planned);
        assert_eq!(bar.areas.len(), planned.areas.len());
        for (mapped, area) in bar.areas.iter().zip(&planned.areas) {
            assert_eq!((mapped.gpa, mapped.size), (area.gpa, area.size));
            assert_eq!(mapped.hva, bar.hva() + area.hva_offset());
        }
        if !planned.areas.is_empty() {
            assert_eq!(bar.hva() % planned.hva_modulus(), planned.hva_phase());
        }
    }
    // BAR2, all mmap-able: its host address agrees with its GPA modulo the
    // largest page that fits, and the mapping shows the region's bytes.
    let bar2 = bar(&attached, 2);
    assert_eq!(bar2.placement.hva_align, 64 * MIB);
    assert_eq!(bar2.hva() % (64 * MIB), bar2.placement.gpa % (64 * MIB));
    assert_eq!(read_mapped(bar2.hva() + MIB, 5), b"BARGE");
    // BAR0: its first page (MSI-X table and PBA) traps, the rest is one area.
    let bar0 = bar(&attached, 0);
    assert_eq!(bar0.areas.len(), 1);
    assert_eq!(bar0.areas[0].offset, 4096);
    // BAR4 (256 bytes) has no memory at all.
    let bar4 = bar(&attached, 4);
    assert!(bar4.placement.trapped() && bar4.areas.is_empty() && bar4.mapping.is_none());
    // One memslot per area, numbered from the allocator.
    let slots: Vec<u32> = attached
        .resources
        .bars()
        .iter()
        .flat_map(|bar| bar.areas.iter().map(|area| area.slot))
        .collect();
    assert_eq!(slots, [1, 2]);
}

#[test]
fn bar_align_caps_move_the_hva_phase() {
    if !guest_programs::testing::kvm_or_skip("bar_align_caps_move_the_hva_phase") {
        return;
    }
    let mut rig = Rig::with(small_device(b""));
    let (attached, _plan) = rig.attach(rig.open(&format!("vfio={BDF},bar-align=4k")));
    let bar2 = bar(&attached, 2);
    assert_eq!(bar2.placement.areas[0].page_size, PageSize::Size4K);
    assert_eq!(bar2.hva() % 4096, 0);
    assert_ne!(
        bar2.hva() % (2 * MIB),
        bar2.placement.gpa % (2 * MIB),
        "off the 2 MiB phase"
    );
}

#[test]
fn sub_page_bars_the_msix_pages_and_sparse_holes_trap_and_reach_the_device() {
    if !guest_programs::testing::kvm_or_skip(
        "sub_page_bars_the_msix_pages_and_sparse_holes_trap_and_reach_the_device",
    ) {
        return;
    }
    let sparse = small_device(b"").with_region(
        2,
        FakeRegion::mmap(64 * MIB).sparse(vec![
            BarRange::new(0, 16 * MIB),
            BarRange::new(32 * MIB, 32 * MIB),
        ]),
    );
    let mut rig = Rig::with(sparse);
    let setup = rig.open(&format!("vfio={BDF}"));
    let fake = Arc::clone(setup.device());
    let (mut attached, plan) = rig.attach(setup);
    let (bar0, bar2, bar4) = (
        placement(&plan, 0).gpa,
        placement(&plan, 2).gpa,
        placement(&plan, 4).gpa,
    );
    assert_eq!(
        trap_ranges(&attached),
        [(bar0, 4096), (bar4, 256), (bar2 + 16 * MIB, 16 * MIB)]
    );
    let areas: Vec<_> = bar(&attached, 2)
        .areas
        .iter()
        .map(|a| (a.offset, a.size))
        .collect();
    assert_eq!(areas, [(0, 16 * MIB), (32 * MIB, 32 * MIB)]);
    let buses = on_bus(&mut attached);
    // The sub-page BAR and the hole read the device's regions.
    let mut data = [0u8; 4];
    assert!(buses.mmio.read(bar4 + 0x10, &mut data));
    assert_eq!(data, [0x10, 0x11, 0x12, 0x13].map(|o| pattern_byte(4, o)));
    assert!(buses.mmio.read(bar2 + 16 * MIB + 8, &mut data));
    assert_eq!(data, [8, 9, 10, 11].map(|o| pattern_byte(2, 16 * MIB + o)));
    // The MSI-X table is the interrupt model's: a write stays out of the
    // device and reads back; the rest of the page is the device's.
    assert!(buses.mmio.write(bar0 + 8, &0x4041u32.to_le_bytes()));
    assert!(buses.mmio.read(bar0 + 8, &mut data));
    assert_eq!(u32::from_le_bytes(data), 0x4041);
    assert!(buses.mmio.write(bar0 + 0x900, &[1, 2, 3, 4]));
    let bar_writes: Vec<_> = fake
        .writes()
        .into_iter()
        .filter(|w| w.region == 0)
        .map(|w| (w.offset, w.data))
        .collect();
    assert_eq!(bar_writes, [(0x900, vec![1, 2, 3, 4])]);
    // mmap-able areas are not on the bus.
    assert!(!buses.mmio.read(bar2, &mut data));
    assert!(!buses.mmio.read(bar0 + 4096, &mut data));
}

#[test]
fn the_guest_sees_the_planned_bars_in_config_space() {
    if !guest_programs::testing::kvm_or_skip("the_guest_sees_the_planned_bars_in_config_space") {
        return;
    }
    let mut rig = Rig::with(small_device(b""));
    let (mut attached, plan) = rig.attach(rig.open(&format!("vfio={BDF}")));
    let mut value = [0u8; 4];
    attached.config.config_read(0x18, &mut value);
    assert_eq!(
        u32::from_le_bytes(value),
        placement(&plan, 2).gpa as u32 | 0xc
    );
}

#[test]
fn intx_is_wired_at_attach_and_msix_vectors_route_through_kvm() {
    if !guest_programs::testing::kvm_or_skip(
        "intx_is_wired_at_attach_and_msix_vectors_route_through_kvm",
    ) {
        return;
    }
    let mut rig = Rig::with(small_device(b""));
    let setup = rig.open(&format!("vfio={BDF}"));
    let fake = Arc::clone(setup.device());
    let (mut attached, plan) = rig.attach(setup);
    // INTA# of the device: a resampling irqfd on GSI 16, from the start.
    assert_eq!(rig.kvm.irqfd_gsis(), [(intx_gsi(1), true)]);
    assert!(fake.fire(INTX_IRQ_INDEX, 0));
    assert_eq!(rig.kvm.deliveries(), [16]);
    // The guest enables MSI-X and programs vector 0 through the trap.
    attached
        .config
        .config_write(MSIX_CONTROL, &0x8000u16.to_le_bytes());
    let bar0 = placement(&plan, 0).gpa;
    let buses = on_bus(&mut attached);
    assert!(buses.mmio.write(bar0, &0xfee0_0000u32.to_le_bytes()));
    assert!(buses.mmio.write(bar0 + 4, &0u32.to_le_bytes()));
    assert!(buses.mmio.write(bar0 + 8, &0x41u32.to_le_bytes()));
    assert!(buses.mmio.write(bar0 + 12, &0u32.to_le_bytes()));
    let msi: Vec<_> = rig
        .kvm
        .routes()
        .into_iter()
        .filter(|route| matches!(route.kind, RouteKind::Msi { .. }))
        .collect();
    assert_eq!(msi.len(), 1);
    assert_eq!(
        msi[0].kind,
        RouteKind::Msi {
            address: 0xfee0_0000,
            data: 0x41,
            // The requester ID of the device's guest slot, 00:01.0: the
            // route always carries it; only aarch64's ITS entry uses it.
            devid: Some(0x08),
        }
    );
    assert!(fake.fire(MSIX_IRQ_INDEX, 0));
    assert_eq!(rig.kvm.deliveries(), [msi[0].gsi]);
}

#[test]
fn without_a_router_the_device_gets_no_interrupts() {
    if !guest_programs::testing::kvm_or_skip("without_a_router_the_device_gets_no_interrupts") {
        return;
    }
    let host = FakeVfioHost::new().with_device(BDF, small_device(b""));
    let mut rig = Rig::with(small_device(b""));
    rig.host = SharedVfioHost::new(host, None);
    let (_attached, _plan) = rig.attach(rig.open(&format!("vfio={BDF}")));
    assert!(rig.kvm.irqfd_gsis().is_empty());
}

#[test]
fn guest_ram_is_mapped_once_at_its_gpa_and_goes_with_the_last_device() {
    if !guest_programs::testing::kvm_or_skip(
        "guest_ram_is_mapped_once_at_its_gpa_and_goes_with_the_last_device",
    ) {
        return;
    }
    let host = FakeVfioHost::new()
        .with_device(BDF, small_device(b""))
        .with_device(OTHER_BDF, small_device(b""));
    let mut rig = Rig::new(host);
    let first = rig.open(&format!("vfio={BDF},p2p=off"));
    let second = rig.open(&format!("vfio={OTHER_BDF},p2p=off"));
    let plans = plan_for(&[&first, &second]);
    let first = rig.attach_with(first, &plans[0]).unwrap();
    let second = rig.attach_with(second, &plans[1]).unwrap();
    assert_eq!(rig.dma_maps(), [rig.ram_region()], "IOVA = GPA, once");
    let report = first.dma.as_ref().unwrap();
    assert_eq!((report.regions, report.bytes), (1, RAM_SIZE));
    assert!(second.dma.is_none());
    rig.journal.clear();
    drop(first);
    assert_eq!(
        rig.journal.events(),
        [
            FakeEvent::IrqDisable {
                bdf: BDF.into(),
                index: INTX_IRQ_INDEX
            },
            FakeEvent::Closed { bdf: BDF.into() }
        ],
        "RAM stays mapped for the other device"
    );
    rig.journal.clear();
    drop(second);
    assert_eq!(
        rig.journal.events()[1..],
        [
            FakeEvent::DmaUnmap {
                iova: 0,
                size: RAM_SIZE,
                still_mapped: true
            },
            FakeEvent::Closed {
                bdf: OTHER_BDF.into()
            }
        ]
    );
    assert!(rig.host.domain().dma_mappings().is_empty());
}

#[test]
fn p2p_maps_every_bar_area_at_its_gpa_unless_off() {
    if !guest_programs::testing::kvm_or_skip("p2p_maps_every_bar_area_at_its_gpa_unless_off") {
        return;
    }
    for (p2p, bar_maps) in [("on", true), ("auto", true), ("off", false)] {
        let mut rig = Rig::with(small_device(b""));
        let (attached, _plan) = rig.attach(rig.open(&format!("vfio={BDF},p2p={p2p}")));
        let mut expected = vec![rig.ram_region()];
        if bar_maps {
            for bar in attached.resources.bars() {
                expected.extend(bar.areas.iter().map(|a| (a.gpa, a.size, a.hva)));
            }
        }
        assert_eq!(rig.dma_maps(), expected, "p2p={p2p}");
        assert_eq!(expected.len(), if bar_maps { 3 } else { 1 });
    }
}

#[test]
fn a_refused_p2p_mapping_is_a_warning_with_auto_and_an_error_with_on() {
    if !guest_programs::testing::kvm_or_skip(
        "a_refused_p2p_mapping_is_a_warning_with_auto_and_an_error_with_on",
    ) {
        return;
    }
    // The IOMMU maps RAM but refuses everything above it (the BARs).
    let refusing = || {
        FakeVfioHost::new()
            .with_device(BDF, small_device(b""))
            .refusing_dma_from(RAM_SIZE)
    };
    let mut rig = Rig::new(refusing());
    let (attached, _plan) = rig.attach(rig.open(&format!("vfio={BDF},p2p=auto")));
    assert_eq!(rig.dma_maps(), [rig.ram_region()]);
    drop(attached);

    let mut rig = Rig::new(refusing());
    let setup = rig.open(&format!("vfio={BDF},p2p=on"));
    let plan = plan_for(&[&setup]).remove(0);
    let error = rig.attach_with(setup, &plan).err().unwrap().to_string();
    assert!(error.contains("cannot map guest memory"), "{error}");
    // What the device had set up is torn down: RAM unmapped, device closed.
    let events = rig.journal.events();
    assert!(events.contains(&FakeEvent::DmaUnmap {
        iova: 0,
        size: RAM_SIZE,
        still_mapped: true
    }));
    assert_eq!(events.last(), Some(&FakeEvent::Closed { bdf: BDF.into() }));
    assert!(rig.kvm.irqfd_gsis().is_empty());
}

/// The `p2p=background` slots of the BARs of `attached`, by index.
fn p2p_slots(attached: &AttachedDevice) -> Vec<(u8, bar_mapping::P2pSlot)> {
    attached
        .resources
        .bars()
        .iter()
        .filter_map(|bar| Some((bar.placement.index, bar.p2p_pending.clone()?)))
        .collect()
}

/// Waits (up to 20 s) until every slot has an outcome.
fn wait_for(slots: &[(u8, bar_mapping::P2pSlot)]) {
    let deadline = Instant::now() + std::time::Duration::from_secs(20);
    while slots.iter().any(|(_, slot)| slot.get().is_none()) {
        assert!(Instant::now() < deadline, "the background maps did not end");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

/// A report of `bar` as the prover makes it, without KVM's counts.
fn bar_report(bar: &MappedBar) -> crate::report::BarReport {
    bar_mapping::bar_report(bar, 0, None, None)
}

#[test]
fn p2p_background_maps_the_bars_on_a_thread_and_the_report_says_when() {
    if !guest_programs::testing::kvm_or_skip(
        "p2p_background_maps_the_bars_on_a_thread_and_the_report_says_when",
    ) {
        return;
    }
    let mut rig = Rig::with(small_device(b""));
    let (attached, _plan) = rig.attach(rig.open(&format!("vfio={BDF},p2p=background")));
    let slots = p2p_slots(&attached);
    assert_eq!(
        slots.iter().map(|(index, _)| *index).collect::<Vec<_>>(),
        [0, 2],
        "a slot per mmap-able BAR, none for the trapped BAR 4"
    );
    wait_for(&slots);
    let mut expected = vec![rig.ram_region()];
    for bar in attached.resources.bars() {
        expected.extend(bar.areas.iter().map(|a| (a.gpa, a.size, a.hva)));
    }
    assert_eq!(rig.dma_maps(), expected);
    // The first KVM_RUN an hour from now: the maps were done before it.
    let first_run = Instant::now() + std::time::Duration::from_secs(3600);
    for (index, slot) in &slots {
        let mapped = bar(&attached, *index);
        let mut report = bar_report(mapped);
        assert!(report.p2p.is_none(), "not known before the run ends");
        background::report_outcome(&mut report, BDF, slot, Some(first_run));
        let p2p = report.p2p.expect("mapped in the background");
        assert_eq!(p2p.method, "type1-vaddr");
        assert_eq!(p2p.bytes, area_bytes(mapped));
        let ready = p2p.ready_after_first_run_ms.unwrap();
        assert!((-3_660_000.0..-3_599_000.0).contains(&ready), "{ready}");
        assert!(report.warning.is_none());
    }
    drop(attached);
    assert!(rig.host.domain().dma_mappings().is_empty());
}

#[test]
fn a_teardown_during_background_p2p_waits_for_the_map_under_way_and_skips_the_rest() {
    if !guest_programs::testing::kvm_or_skip(
        "a_teardown_during_background_p2p_waits_for_the_map_under_way_and_skips_the_rest",
    ) {
        return;
    }
    let host = FakeVfioHost::new()
        .with_device(BDF, small_device(b""))
        .with_bar_map_delay(std::time::Duration::from_millis(1000));
    let mut rig = Rig::new(host);
    let (attached, _plan) = rig.attach(rig.open(&format!("vfio={BDF},p2p=background")));
    // Attached while BAR 0's map is still under way: only RAM is mapped.
    assert_eq!(rig.dma_maps(), [rig.ram_region()]);
    let slots = p2p_slots(&attached);
    let reports: Vec<_> = slots
        .iter()
        .map(|(index, _)| bar_report(bar(&attached, *index)))
        .collect();
    // Well inside BAR 0's map (a second long) when the teardown starts.
    std::thread::sleep(std::time::Duration::from_millis(200));
    drop(attached);
    // BAR 0's map ended before its unmap; BAR 2 was never mapped.
    let bar0 = slots[0]
        .1
        .get()
        .expect("BAR 0's map ended before the teardown went on");
    assert!(matches!(bar0, bar_mapping::P2pOutcome::Mapped { .. }));
    assert!(
        slots[1].1.get().is_none(),
        "BAR 2 is not mapped after the stop"
    );
    assert!(
        rig.host.domain().dma_mappings().is_empty(),
        "nothing left mapped"
    );
    assert_eq!(rig.dma_maps().len(), 2, "RAM and BAR 0");
    let mut bar2 = reports[1].clone();
    background::report_outcome(&mut bar2, BDF, &slots[1].1, None);
    assert!(bar2.p2p.is_none());
    let warning = bar2.warning.unwrap();
    assert!(
        warning.contains(
            "was not yet mapped for peer-to-peer DMA (p2p=background) when the VM stopped"
        ),
        "{warning}"
    );
}

#[test]
fn a_refused_background_p2p_map_is_a_warning_in_the_report() {
    if !guest_programs::testing::kvm_or_skip(
        "a_refused_background_p2p_map_is_a_warning_in_the_report",
    ) {
        return;
    }
    let host = FakeVfioHost::new()
        .with_device(BDF, small_device(b""))
        .refusing_dma_from(RAM_SIZE);
    let mut rig = Rig::new(host);
    let (attached, _plan) = rig.attach(rig.open(&format!("vfio={BDF},p2p=background")));
    let slots = p2p_slots(&attached);
    wait_for(&slots);
    assert_eq!(rig.dma_maps(), [rig.ram_region()]);
    for (index, slot) in &slots {
        let mut report = bar_report(bar(&attached, *index));
        background::report_outcome(&mut report, BDF, slot, Some(Instant::now()));
        assert!(report.p2p.is_none());
        let warning = report.warning.unwrap();
        assert!(
            warning.contains(&format!(
                "BAR {index} of {BDF} is not mapped for peer-to-peer DMA"
            )),
            "{warning}"
        );
    }
}

/// Bytes of `bar`'s mmap-able areas.
fn area_bytes(bar: &MappedBar) -> u64 {
    bar.areas.iter().map(|area| area.size).sum()
}

#[test]
fn the_report_says_the_backend_and_how_ram_and_each_bar_are_mapped_for_dma() {
    if !guest_programs::testing::kvm_or_skip(
        "the_report_says_the_backend_and_how_ram_and_each_bar_are_mapped_for_dma",
    ) {
        return;
    }
    // (backend, old iommufd, shared RAM) -> (vfio_backend, RAM method, BAR method)
    let cases = [
        (
            OpenedBackend::Legacy,
            false,
            false,
            "legacy",
            "type1-vaddr",
            "type1-vaddr",
        ),
        (
            OpenedBackend::Legacy,
            false,
            true,
            "legacy",
            "type1-vaddr",
            "type1-vaddr",
        ),
        (
            OpenedBackend::Iommufd,
            false,
            false,
            "iommufd",
            "iommufd-vaddr",
            "iommufd-dmabuf",
        ),
        (
            OpenedBackend::Iommufd,
            false,
            true,
            "iommufd",
            "iommufd-memfd",
            "iommufd-dmabuf",
        ),
    ];
    for (backend, old, shared, name, ram_method, bar_method) in cases {
        let mut host = FakeVfioHost::new()
            .with_backend(backend)
            .with_device(BDF, small_device(b""));
        if old {
            host = host.with_old_iommufd();
        }
        let memory = MemoryConfig {
            shared,
            ..MemoryConfig::default()
        };
        let mut rig = Rig::with_ram(host, &memory);
        let (attached, _plan) = rig.attach(rig.open(&format!("vfio={BDF}")));
        let case = format!("{name}, shared RAM {shared}");
        assert_eq!(attached.vfio_backend, Some(name), "{case}");
        let dma = attached.dma.as_ref().expect("the first device maps RAM");
        assert_eq!(dma.method, ram_method, "{case}");
        assert_eq!(dma.bytes, RAM_SIZE, "{case}");
        for index in [0, 2] {
            let mapped = bar(&attached, index);
            let p2p = mapped.p2p.as_ref().expect("p2p=auto maps the BAR");
            assert_eq!(p2p.method, bar_method, "{case}: BAR {index}");
            assert_eq!(p2p.bytes, area_bytes(mapped), "{case}: BAR {index}");
            assert!(p2p.ms >= 0.0);
            assert!(mapped.p2p_warning.is_none(), "{case}");
            let report = bar_mapping::bar_report(mapped, 1, None, None);
            assert_eq!(report.p2p.as_ref(), Some(p2p), "{case}");
        }
        assert_eq!(area_bytes(bar(&attached, 2)), 64 * MIB);
        // BAR4 traps: nothing to map for peer to peer.
        assert!(bar(&attached, 4).p2p.is_none(), "{case}");
    }
}

#[test]
fn iommufd_before_6_19_maps_no_bar_for_p2p_auto_warns_and_on_fails_naming_the_kernel() {
    if !guest_programs::testing::kvm_or_skip(
        "iommufd_before_6_19_maps_no_bar_for_p2p_auto_warns_and_on_fails_naming_the_kernel",
    ) {
        return;
    }
    let old_host = || {
        FakeVfioHost::new()
            .with_backend(OpenedBackend::Iommufd)
            .with_old_iommufd()
            .with_device(BDF, small_device(b""))
    };
    let shared = MemoryConfig {
        shared: true,
        ..MemoryConfig::default()
    };
    let mut rig = Rig::with_ram(old_host(), &shared);
    let (attached, _plan) = rig.attach(rig.open(&format!("vfio={BDF},p2p=auto")));
    // No IOMMU_IOAS_MAP_FILE: RAM goes by address, and no BAR is mapped.
    assert_eq!(attached.dma.as_ref().unwrap().method, "iommufd-vaddr");
    assert_eq!(rig.dma_maps(), [rig.ram_region()]);
    for index in [0, 2] {
        let mapped = bar(&attached, index);
        assert!(mapped.p2p.is_none());
        let warning = mapped.p2p_warning.as_deref().unwrap_or_default();
        assert!(warning.contains("Linux 6.19 or newer"), "{warning}");
        assert!(warning.contains("6.12.0-fake"), "{warning}");
        assert!(warning.contains("p2p=off"), "{warning}");
        let report = bar_mapping::bar_report(mapped, 1, None, None);
        assert!(report.p2p.is_none());
        assert_eq!(report.warning.as_deref(), Some(warning));
    }
    drop(attached);

    let mut rig = Rig::with_ram(old_host(), &shared);
    let setup = rig.open(&format!("vfio={BDF},p2p=on"));
    let plan = plan_for(&[&setup]).remove(0);
    let error = rig.attach_with(setup, &plan).err().unwrap().to_string();
    assert!(
        error.contains("cannot map BAR 0 of 0000:41:00.0 for peer-to-peer DMA with iommufd"),
        "{error}"
    );
    assert!(error.contains("Linux 6.19 or newer"), "{error}");
    assert!(error.contains("--vfio-backend legacy"), "{error}");
    let events = rig.journal.events();
    assert_eq!(events.last(), Some(&FakeEvent::Closed { bdf: BDF.into() }));
    assert!(rig.host.domain().dma_mappings().is_empty());
}

/// A fake sysfs with BAR2 of [`BDF`] at `bar2_start` (64 MiB).
fn fake_sysfs(name: &str, bar2_start: u64) -> PathBuf {
    let root = std::env::temp_dir().join(format!("barge-vfio-{name}-{}", std::process::id()));
    let dir = root.join("bus/pci/devices").join(BDF);
    std::fs::create_dir_all(&dir).unwrap();
    let empty = "0x0000000000000000 0x0000000000000000 0x0000000000000000\n";
    let bar2 = format!(
        "{bar2_start:#018x} {:#018x} 0x000000000014220c\n",
        bar2_start + 64 * MIB - 1
    );
    std::fs::write(dir.join("resource"), format!("{empty}{empty}{bar2}")).unwrap();
    root
}

#[test]
fn shortfall_causes_say_what_vfio_and_the_host_limit() {
    if !guest_programs::testing::kvm_or_skip("shortfall_causes_say_what_vfio_and_the_host_limit") {
        return;
    }
    // BAR2 cannot be mmap'ed: it traps whole, and says so.
    let mut rig = Rig::with(small_device(b"").with_region(2, FakeRegion::trapped(64 * MIB)));
    let (attached, _plan) = rig.attach(rig.open(&format!("vfio={BDF}")));
    let bar2 = bar(&attached, 2);
    assert!(bar2.areas.is_empty());
    assert_eq!(bar2.causes.len(), 1, "{:?}", bar2.causes);
    assert!(bar2.causes[0].contains("mmap"), "{:?}", bar2.causes);

    // A host resource aligned to 4 KiB only, and a kernel before huge pfnmap.
    let sysfs = fake_sysfs("causes", 0x3800_0000_1000);
    let mut rig = Rig::with(small_device(b""));
    let setup = rig
        .open_with_sysfs(&format!("vfio={BDF}"), &sysfs)
        .with_kernel_release("6.1.0-28-amd64\n");
    let (attached, _plan) = rig.attach(setup);
    let causes = &bar(&attached, 2).causes;
    assert_eq!(causes.len(), 2, "{causes:?}");
    assert!(causes[0].contains("0x380000001000"), "{causes:?}");
    assert!(causes[1].contains("6.1.0-28-amd64"), "{causes:?}");
    // BAR0 has no host resource in the fake tree: only the kernel.
    assert_eq!(bar(&attached, 0).causes.len(), 1);
    std::fs::remove_dir_all(&sysfs).unwrap();

    // An aligned resource on a new kernel: nothing to say.
    let sysfs = fake_sysfs("no-causes", 0x3800_0000_0000);
    let mut rig = Rig::with(small_device(b""));
    let (attached, _plan) = rig.attach(rig.open_with_sysfs(&format!("vfio={BDF}"), &sysfs));
    assert!(bar(&attached, 2).causes.is_empty());
    std::fs::remove_dir_all(&sysfs).unwrap();
}

#[test]
fn teardown_stops_dma_unmaps_frees_the_bars_then_closes_and_releases() {
    if !guest_programs::testing::kvm_or_skip(
        "teardown_stops_dma_unmaps_frees_the_bars_then_closes_and_releases",
    ) {
        return;
    }
    let mut rig = Rig::with(small_device(b""));
    let setup = rig.open(&format!("vfio={BDF},p2p=on"));
    let fake = Arc::clone(setup.device());
    let (mut attached, plan) = rig.attach(setup);
    // The guest turns on memory decode and bus mastering.
    attached.config.config_write(0x04, &0x0006u16.to_le_bytes());
    let command = u16::from_le_bytes(fake.config_bytes()[4..6].try_into().unwrap());
    assert_ne!(command & 0x4, 0);
    let bar_areas: Vec<_> = attached
        .resources
        .bars()
        .iter()
        .flat_map(|bar| bar.areas.iter().map(|a| (a.gpa, a.size, a.hva)))
        .collect();
    assert_eq!(bar_areas.len(), 2);
    let mappings: Vec<_> = attached
        .resources
        .bars()
        .iter()
        .filter_map(|bar| bar.mapping.as_ref().map(Arc::downgrade))
        .collect();
    assert_eq!(mappings.len(), 2);
    // As `BuiltVm` drops things: the models (buses) first, the host's
    // other holders (the setups) are gone, then the resources.
    let AttachedDevice {
        config,
        traps,
        resources,
        ..
    } = attached;
    drop((config, traps, fake));
    let rig_host = std::mem::replace(
        &mut rig.host,
        SharedVfioHost::new(FakeVfioHost::new(), None),
    );
    drop(rig_host);
    rig.journal.clear();
    drop(resources);
    let mut expected = vec![
        FakeEvent::ConfigWrite {
            bdf: BDF.into(),
            offset: 4,
            data: (command & !0x4).to_le_bytes().to_vec(),
        },
        FakeEvent::IrqDisable {
            bdf: BDF.into(),
            index: INTX_IRQ_INDEX,
        },
    ];
    expected.extend(bar_areas.iter().map(|&(gpa, size, _)| FakeEvent::DmaUnmap {
        iova: gpa,
        size,
        still_mapped: true,
    }));
    expected.extend([
        FakeEvent::DmaUnmap {
            iova: 0,
            size: RAM_SIZE,
            still_mapped: true,
        },
        FakeEvent::Closed { bdf: BDF.into() },
        FakeEvent::Released,
    ]);
    assert_eq!(rig.journal.events(), expected);
    // Interrupts are off in KVM too.
    assert!(rig.kvm.irqfd_gsis().is_empty());
    // The BARs are unmapped from barge (their mappings are gone) and their
    // memslots too: KVM takes new ones over the same guest addresses.
    assert!(mappings.iter().all(|mapping| mapping.strong_count() == 0));
    let bar2 = placement(&plan, 2);
    let memfd = memory::create_memfd(None, bar2.size).unwrap();
    let again = map_bar_areas(
        &rig.vm,
        &rig.memslots,
        memfd.as_fd(),
        0,
        "check",
        bar2,
        &mut rig.slots,
    );
    assert!(again.is_ok(), "{:?}", again.err());
}

#[test]
fn the_hosts_device_request_stops_the_loop_and_teardown_disables_and_closes_it() {
    if !guest_programs::testing::kvm_or_skip(
        "the_hosts_device_request_stops_the_loop_and_teardown_disables_and_closes_it",
    ) {
        return;
    }
    use std::time::{Duration, Instant};

    use crate::buses::power::PowerSignal;
    use crate::event_loop::EventLoop;
    use crate::machine::vcpu::{StopCause, VmControl};

    let mut rig = Rig::with(small_device(b"").with_irqs(REQ_IRQ_INDEX, 1));
    let setup = rig.open(&format!("vfio={BDF}"));
    let fake = Arc::clone(setup.device());
    let (attached, _plan) = rig.attach(setup);
    // One eventfd at VFIO's request index, enabled at attach.
    assert!(fake.irq_calls().contains(&FakeIrqCall::Enable {
        index: REQ_IRQ_INDEX,
        count: 1
    }));
    let (bdf, request) = attached.resources.release_request().unwrap();
    assert_eq!(bdf, BDF);
    let control = Arc::new(VmControl::new().unwrap());
    let mut event_loop = EventLoop::new(control.clone(), PowerSignal::new().unwrap()).unwrap();
    event_loop.watch_release_request(bdf, request).unwrap();
    // vfio-pci signals it on unbind, and again until the device is closed.
    for _ in 0..3 {
        assert!(fake.request_release());
    }
    let cause = event_loop.run_until_stopped(Some(Instant::now() + Duration::from_secs(5)));
    assert_eq!(cause, StopCause::DeviceReleaseRequest { bdf: BDF.into() });
    assert_eq!(crate::exit_report(&cause).reason, "device_release_request");
    assert_eq!(
        crate::exit_report(&cause).status,
        crate::status::DEVICE_RELEASE_REQUEST
    );
    drop(event_loop);

    // Teardown: the request IRQ is disabled after the device's interrupts,
    // before the device is closed, and VFIO holds no eventfd for it.
    let AttachedDevice {
        config,
        traps,
        resources,
        ..
    } = attached;
    drop((config, traps));
    let rig_host = std::mem::replace(
        &mut rig.host,
        SharedVfioHost::new(FakeVfioHost::new(), None),
    );
    drop(rig_host);
    rig.journal.clear();
    drop(resources);
    assert!(!fake.request_release(), "VFIO still signals an eventfd");
    drop(fake);
    let events = rig.journal.events();
    let at = |wanted: &FakeEvent| events.iter().position(|event| event == wanted);
    let intx_off = at(&FakeEvent::IrqDisable {
        bdf: BDF.into(),
        index: INTX_IRQ_INDEX,
    });
    let request_off = at(&FakeEvent::IrqDisable {
        bdf: BDF.into(),
        index: REQ_IRQ_INDEX,
    });
    let closed = at(&FakeEvent::Closed { bdf: BDF.into() });
    assert!(
        intx_off.is_some() && request_off > intx_off && closed > request_off,
        "{events:?}"
    );
}

#[test]
fn a_device_without_a_request_irq_runs_without_one() {
    if !guest_programs::testing::kvm_or_skip("a_device_without_a_request_irq_runs_without_one") {
        return;
    }
    let mut rig = Rig::with(small_device(b""));
    let setup = rig.open(&format!("vfio={BDF}"));
    let fake = Arc::clone(setup.device());
    let (attached, _plan) = rig.attach(setup);
    assert!(attached.resources.release_request().is_none());
    assert!(!fake
        .irq_calls()
        .iter()
        .any(|call| matches!(call, FakeIrqCall::Enable { index, .. } if *index == REQ_IRQ_INDEX)));
    drop(attached);
    assert!(!rig.journal.events().contains(&FakeEvent::IrqDisable {
        bdf: BDF.into(),
        index: REQ_IRQ_INDEX
    }));
}

#[test]
fn a_plan_for_another_device_is_refused_and_the_device_closed() {
    if !guest_programs::testing::kvm_or_skip(
        "a_plan_for_another_device_is_refused_and_the_device_closed",
    ) {
        return;
    }
    let mut rig = Rig::with(small_device(b""));
    let setup = rig.open(&format!("vfio={BDF}"));
    let mut plan = plan_for(&[&setup]).remove(0);
    plan.bars[0].size *= 2;
    let error = rig.attach_with(setup, &plan).err().unwrap().to_string();
    assert!(error.starts_with("PCI device 0000:41:00.0:"), "{error}");
    assert_eq!(
        rig.journal.events(),
        [FakeEvent::Closed { bdf: BDF.into() }]
    );
}

#[test]
fn open_errors_name_the_device() {
    if !guest_programs::testing::kvm_or_skip("open_errors_name_the_device") {
        return;
    }
    let rig = Rig::with(FakeVfioDevice::new(&[0xff; 64]));
    let config = format!("vfio={BDF}").parse().unwrap();
    let error = VfioSetup::open(&config, &rig.host, Path::new("/nonexistent"))
        .err()
        .unwrap()
        .to_string();
    assert!(error.starts_with("PCI device 0000:41:00.0:"), "{error}");
    let config = format!("vfio={OTHER_BDF}").parse().unwrap();
    let error = VfioSetup::open(&config, &rig.host, Path::new("/nonexistent"))
        .err()
        .unwrap()
        .to_string();
    assert!(error.contains("no PCI device 0000:42:00.0"), "{error}");
}

#[test]
fn intx_pins_map_to_gsis_16_to_19() {
    assert_eq!([1, 2, 3, 4].map(intx_gsi), [16, 17, 18, 19]);
    assert_eq!(intx_gsi(0), 16);
    assert_eq!(intx_gsi(200), 16 + 199 % 4);
}

#[test]
fn kernels_before_6_12_lack_huge_pfnmap() {
    assert_eq!(kernel_causes("6.12.0-1-amd64\n"), Vec::<String>::new());
    assert_eq!(kernel_causes("7.0.1"), Vec::<String>::new());
    assert!(kernel_causes("6.1.0-28-amd64")[0].contains("6.1.0-28-amd64"));
    assert!(kernel_causes("5.15.0")[0].contains("huge pfnmap"));
    assert_eq!(kernel_causes(""), Vec::<String>::new());
}

#[test]
fn a_misaligned_host_resource_is_a_cause() {
    if !guest_programs::testing::kvm_or_skip("a_misaligned_host_resource_is_a_cause") {
        return;
    }
    // BAR2 at 0x3800_0020_0000: 2 MiB aligned only.
    let root = fake_sysfs("glue", 0x3800_0020_0000);
    let rig = Rig::with(small_device(b""));
    let setup = rig.open(&format!("vfio={BDF}"));
    let mut placement = placement(&plan_for(&[&setup])[0], 2).clone();
    placement.areas[0].page_size = PageSize::Size1G;
    let causes = host_bar_causes(BDF, &placement, &root);
    assert_eq!(causes.len(), 1);
    assert!(causes[0].contains("0x380000200000"), "{causes:?}");
    placement.areas[0].page_size = PageSize::Size2M;
    assert!(host_bar_causes(BDF, &placement, &root).is_empty());
    assert!(host_bar_causes(OTHER_BDF, &placement, &root).is_empty());
    std::fs::remove_dir_all(&root).unwrap();
}
