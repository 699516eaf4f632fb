//! Interrupts of a passed-through device: INTx, MSI and MSI-X from VFIO
//! eventfds into KVM, with the guest's view (MSI/MSI-X capabilities, the
//! MSI-X table and PBA) emulated here.
//!
//! # Plumbing
//!
//! Every interrupt is an [`EventFd`] VFIO signals. For MSI and MSI-X each
//! vector's eventfd is a KVM irqfd on the vector's GSI, whose route
//! (`KVM_SET_GSI_ROUTING`) is the MSI message the guest programmed; the
//! routes of every device of the VM live in one [`InterruptRouter`] (a
//! [`RoutingTable`], so the legacy routes of GSIs 0..24 stay). INTx is an
//! irqfd with KVM's resample eventfd on the IOAPIC pin `intx_gsi`
//! (level-triggered): VFIO masks INTx when it fires, KVM de-asserts the
//! line at the guest's EOI and signals the resample eventfd, which VFIO
//! takes as "unmask" ([`VfioDeviceAccess::intx_unmask_on`]): re-armed at EOI
//! without a trip through barge.
//!
//! barge uses the best the guest enables: INTx from the start (when the
//! device has a pin and VFIO offers INTx), MSI or MSI-X when the guest sets
//! their enable bit (INTx is disabled in VFIO first, as vfio-pci requires),
//! INTx again when it clears it.
//!
//! # Masking and pending bits
//!
//! A masked vector (MSI-X entry or function mask, MSI per-vector mask)
//! keeps its eventfd and route but its irqfd is **deregistered**: what the
//! device sends meanwhile accumulates in the eventfd's counter. Unmasking
//! registers the irqfd again, and KVM delivers a non-zero counter at once
//! (KVM checks the eventfd when an irqfd is assigned): one interrupt for
//! what came in while masked, as the spec wants. A guest read of the PBA
//! (or of MSI's pending bits) first drains the eventfds of masked vectors
//! into the models' pending bits ([`MsixTable::trigger`]); a pending vector
//! that is unmasked later is delivered by signalling its eventfd once.
//!
//! # Guest-controlled values
//!
//! A message that fails [`MsiMessage::is_valid_x86`] is never routed: the
//! vector's irqfd and route go away and a warning is logged. KVM or VFIO
//! failures during guest accesses are logged, never fatal. Accesses of odd
//! widths or offsets are the models' business (ignored, read all-ones).

use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

use super::{VfioDeviceAccess, INTX_IRQ_INDEX, MSIX_IRQ_INDEX, MSI_IRQ_INDEX};
use crate::interrupts::{
    eventfd, signal, sync_vector, InterruptError, InterruptRouter, IrqfdVector,
};
use crate::pci::config::{INTERRUPT_LINE_OFFSET, INTERRUPT_PIN_OFFSET};
use crate::pci::msi::{MsiCapability, MsiEvent};
use crate::pci::msix::{
    MsixCapability, MsixEvent, MsixTable, MSIX_CAPABILITY_SIZE, MSIX_CONTROL_OFFSET,
};

/// Routing-table vector numbers of MSI vectors start here (MSI-X vectors
/// use their own number, below 2048).
pub const MSI_ROUTE_VECTOR_BASE: u16 = 0x4000;

/// Which interrupt kind VFIO delivers now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InterruptMode {
    /// None enabled.
    None,
    /// INTx.
    Intx,
    /// MSI.
    Msi,
    /// MSI-X.
    Msix,
}

#[derive(Debug)]
struct Intx {
    gsi: u32,
    trigger: EventFd,
    resample: EventFd,
    irqfd: bool,
}

/// The interrupts of one passed-through device (see module docs).
pub struct VfioInterrupts<B: VfioDeviceAccess> {
    backend: Arc<B>,
    router: Arc<InterruptRouter>,
    device: u32,
    msix: Option<(MsixCapability, MsixTable)>,
    msix_vectors: Vec<IrqfdVector>,
    msi: Option<MsiCapability>,
    msi_vectors: Vec<IrqfdVector>,
    intx: Option<Intx>,
    /// The interrupt line register as the guest sees it.
    line: u8,
    mode: InterruptMode,
}

impl<B: VfioDeviceAccess> std::fmt::Debug for VfioInterrupts<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VfioInterrupts")
            .field("device", &self.device)
            .field("mode", &self.mode)
            .field("msix", &self.msix.as_ref().map(|(cap, _)| cap))
            .field("msi", &self.msi.as_ref().map(|cap| cap.offset()))
            .finish_non_exhaustive()
    }
}

impl<B: VfioDeviceAccess> VfioInterrupts<B> {
    /// The interrupts of the device whose configuration space is `config`
    /// (as probed), known to the router as `device`. INTx goes to
    /// `intx_gsi` when the device has an interrupt pin and VFIO offers
    /// INTx. Nothing is enabled before [`Self::start`].
    pub fn new(
        backend: Arc<B>,
        router: Arc<InterruptRouter>,
        device: u32,
        config: &[u8],
        intx_gsi: u32,
    ) -> Result<Self, InterruptError> {
        let msix = match MsixCapability::find(config) {
            Ok(Some(cap)) if backend.irq_count(MSIX_IRQ_INDEX) > 0 => {
                MsixTable::new(cap.vectors).ok().map(|table| (cap, table))
            }
            Ok(_) => None,
            Err(error) => {
                log::warn!("interrupts: device {device:#x}: MSI-X capability unusable ({error}); MSI-X is not offered");
                None
            }
        };
        let msi = match MsiCapability::find(config) {
            Ok(cap) => cap.filter(|_| backend.irq_count(MSI_IRQ_INDEX) > 0),
            Err(error) => {
                log::warn!("interrupts: device {device:#x}: MSI capability unusable ({error}); MSI is not offered");
                None
            }
        };
        let pin = config
            .get(usize::from(INTERRUPT_PIN_OFFSET))
            .copied()
            .unwrap_or(0);
        let intx = if (1..=4).contains(&pin) && backend.irq_count(INTX_IRQ_INDEX) > 0 {
            Some(Intx {
                gsi: intx_gsi,
                trigger: eventfd()?,
                resample: eventfd()?,
                irqfd: false,
            })
        } else {
            None
        };
        let line = intx.as_ref().map_or(0xff, |intx| intx.gsi as u8);
        Ok(Self {
            backend,
            router,
            device,
            msix,
            msix_vectors: Vec::new(),
            msi,
            msi_vectors: Vec::new(),
            intx,
            line,
            mode: InterruptMode::None,
        })
    }

    /// What VFIO delivers now.
    pub fn mode(&self) -> InterruptMode {
        self.mode
    }

    /// The INTx GSI, when the device uses INTx.
    pub fn intx_gsi(&self) -> Option<u32> {
        self.intx.as_ref().map(|intx| intx.gsi)
    }

    /// The emulated MSI-X table, if the device has MSI-X.
    pub fn msix_table(&self) -> Option<&MsixTable> {
        self.msix.as_ref().map(|(_, table)| table)
    }

    /// The emulated MSI capability, if the device has MSI.
    pub fn msi(&self) -> Option<&MsiCapability> {
        self.msi.as_ref()
    }

    /// Enables INTx (the state before the guest enables MSI or MSI-X).
    pub fn start(&mut self) {
        self.enter_intx();
    }

    /// Disables every interrupt in VFIO, deregisters every irqfd and
    /// removes every route (exit, reset). The models keep their state.
    pub fn shutdown(&mut self) {
        self.leave_current();
        if let Some(intx) = &mut self.intx {
            if intx.irqfd {
                if let Err(error) = self.router.kvm().unregister_irqfd(&intx.trigger, intx.gsi) {
                    log::debug!("interrupts: INTx irqfd deassign: {error}");
                }
                intx.irqfd = false;
            }
        }
    }

    /// Back to the reset state (device reset, guest reboot): everything
    /// torn down, models reset, INTx enabled again.
    pub fn reset(&mut self) {
        self.shutdown();
        if let Some((_, table)) = &mut self.msix {
            table.reset();
        }
        if let Some(msi) = &mut self.msi {
            msi.reset();
        }
        self.line = self.intx.as_ref().map_or(0xff, |intx| intx.gsi as u8);
        self.start();
    }

    fn msix_span(&self) -> Option<(u16, u16)> {
        self.msix.as_ref().map(|(cap, _)| {
            (
                cap.offset + MSIX_CONTROL_OFFSET,
                cap.offset + MSIX_CAPABILITY_SIZE,
            )
        })
    }

    fn msi_span(&self) -> Option<(u16, u16)> {
        self.msi
            .as_ref()
            .map(|cap| (cap.offset() + 2, cap.offset() + cap.size()))
    }

    /// Whether configuration byte `offset` is emulated here (the interrupt
    /// line, the MSI and MSI-X registers from Message Control on): writes to
    /// it must not reach the device.
    pub fn owns_config_byte(&self, offset: u16) -> bool {
        offset == INTERRUPT_LINE_OFFSET
            || [self.msix_span(), self.msi_span()]
                .into_iter()
                .flatten()
                .any(|(start, end)| (start..end).contains(&offset))
    }

    /// Lays the emulated registers over `data`, a guest configuration read
    /// at `offset` answered by the device.
    pub fn config_read(&mut self, offset: u16, data: &mut [u8]) {
        let start = usize::from(offset);
        let end = start + data.len();
        let line = usize::from(INTERRUPT_LINE_OFFSET);
        if (start..end).contains(&line) {
            data[line - start] = self.line;
        }
        let overlaps = |span: Option<(u16, u16)>| {
            span.is_some_and(|(s, e)| start < usize::from(e) && end > usize::from(s))
        };
        if overlaps(self.msix_span()) {
            if let Some((cap, table)) = &self.msix {
                cap.overlay(offset, data, table.message_control());
            }
        }
        if overlaps(self.msi_span()) {
            self.drain_masked_msi();
            if let Some(cap) = &self.msi {
                cap.read(offset, data);
            }
        }
    }

    /// A guest configuration write: the interrupt line and the MSI and
    /// MSI-X registers it touches (other bytes are the caller's).
    pub fn config_write(&mut self, offset: u16, data: &[u8]) {
        let start = usize::from(offset);
        let line = usize::from(INTERRUPT_LINE_OFFSET);
        if let Some(value) = line.checked_sub(start).and_then(|i| data.get(i)) {
            self.line = *value;
        }
        if let Some((cap, table)) = &mut self.msix {
            if let Some(control) = cap.message_control_write(offset, data, table.message_control())
            {
                if let Some(change) = table.control_write(control) {
                    match change.enabled {
                        Some(true) => self.enter_msix(),
                        Some(false) => self.leave_msix_for_intx(),
                        None => {}
                    }
                    self.sync_msix();
                    for (vector, _) in change.deliver {
                        self.signal_msix(vector);
                    }
                }
            }
        }
        if let Some(cap) = &mut self.msi {
            let events = cap.write(offset, data);
            let mut deliver = Vec::new();
            for event in events {
                match event {
                    MsiEvent::Enabled { vectors, .. } => self.enter_msi(vectors),
                    MsiEvent::Disabled if self.mode == InterruptMode::Msi => {
                        self.leave_current();
                        self.enter_intx();
                    }
                    MsiEvent::VectorsChanged { vectors } if self.mode == InterruptMode::Msi => {
                        self.leave_current();
                        self.enter_msi(vectors);
                    }
                    MsiEvent::MaskChanged { deliver: d, .. } => deliver.extend(d),
                    _ => {}
                }
            }
            self.sync_msi();
            for (vector, _) in deliver {
                if let Some(v) = self.msi_vectors.get(usize::from(vector)) {
                    signal(&v.fd);
                }
            }
        }
    }

    /// A guest read in BAR `bar` at `offset`: answered and `true` when it
    /// falls in the MSI-X table or PBA.
    pub fn bar_read(&mut self, bar: u8, offset: u64, data: &mut [u8]) -> bool {
        let Some((cap, _)) = &self.msix else {
            return false;
        };
        let (table_region, pba_region) = (cap.table, cap.pba);
        if table_region.bar == bar && in_region(offset, table_region.offset, table_region.size) {
            if let Some((_, table)) = &self.msix {
                table.table_read(offset - table_region.offset, data);
            }
            return true;
        }
        if pba_region.bar == bar && in_region(offset, pba_region.offset, pba_region.size) {
            self.drain_masked_msix();
            if let Some((_, table)) = &self.msix {
                table.pba_read(offset - pba_region.offset, data);
            }
            return true;
        }
        false
    }

    /// A guest write in BAR `bar` at `offset`: applied and `true` when it
    /// falls in the MSI-X table or PBA.
    pub fn bar_write(&mut self, bar: u8, offset: u64, data: &[u8]) -> bool {
        let Some((cap, table)) = &mut self.msix else {
            return false;
        };
        if cap.table.bar == bar && in_region(offset, cap.table.offset, cap.table.size) {
            let event = table.table_write(offset - cap.table.offset, data);
            match event {
                Some(MsixEvent::VectorChanged { vector, .. })
                | Some(MsixEvent::VectorMasked { vector, .. }) => self.sync_msix_vector(vector),
                Some(MsixEvent::VectorUnmasked {
                    vector, deliver, ..
                }) => {
                    self.sync_msix_vector(vector);
                    if deliver.is_some() {
                        self.signal_msix(vector);
                    }
                }
                None => {}
            }
            return true;
        }
        if cap.pba.bar == bar && in_region(offset, cap.pba.offset, cap.pba.size) {
            table.pba_write(offset - cap.pba.offset, data);
            return true;
        }
        false
    }

    fn enter_intx(&mut self) {
        let Some(intx) = &mut self.intx else {
            self.mode = InterruptMode::None;
            return;
        };
        if !intx.irqfd {
            match self
                .router
                .kvm()
                .register_irqfd(&intx.trigger, intx.gsi, Some(&intx.resample))
            {
                Ok(()) => intx.irqfd = true,
                Err(error) => {
                    crate::guest_warn!("interrupts: device {:#x}: cannot register the INTx irqfd on GSI {}: {error}; INTx is not delivered", self.device, intx.gsi);
                    self.mode = InterruptMode::None;
                    return;
                }
            }
        }
        let enabled = self
            .backend
            .irq_enable(INTX_IRQ_INDEX, &[&intx.trigger])
            .and_then(|()| self.backend.intx_unmask_on(&intx.resample));
        match enabled {
            Ok(()) => self.mode = InterruptMode::Intx,
            Err(error) => {
                crate::guest_warn!(
                    "interrupts: device {:#x}: VFIO refused INTx: {error}",
                    self.device
                );
                self.mode = InterruptMode::None;
            }
        }
    }

    /// Disables what VFIO delivers now; MSI/MSI-X irqfds and routes go.
    fn leave_current(&mut self) {
        let index = match self.mode {
            InterruptMode::None => return,
            InterruptMode::Intx => INTX_IRQ_INDEX,
            InterruptMode::Msi => MSI_IRQ_INDEX,
            InterruptMode::Msix => MSIX_IRQ_INDEX,
        };
        if let Err(error) = self.backend.irq_disable(index) {
            log::debug!("interrupts: VFIO IRQ {index} disable: {error}");
        }
        let (vectors, base) = match self.mode {
            InterruptMode::Msi => (std::mem::take(&mut self.msi_vectors), MSI_ROUTE_VECTOR_BASE),
            InterruptMode::Msix => (std::mem::take(&mut self.msix_vectors), 0),
            _ => (Vec::new(), 0),
        };
        for (i, vector) in vectors.into_iter().enumerate() {
            if let Some(gsi) = vector.irqfd {
                if let Err(error) = self.router.kvm().unregister_irqfd(&vector.fd, gsi) {
                    log::debug!("interrupts: irqfd deassign on GSI {gsi}: {error}");
                }
            }
            if vector.routed.is_some() {
                self.router.remove(self.device, base + i as u16);
            }
        }
        self.mode = InterruptMode::None;
    }

    fn enter_vectors(&mut self, index: u32, wanted: usize) -> Option<Vec<IrqfdVector>> {
        let count = wanted.min(self.backend.irq_count(index) as usize);
        let mut vectors = Vec::with_capacity(count);
        for _ in 0..count {
            match eventfd() {
                Ok(fd) => vectors.push(IrqfdVector {
                    fd,
                    routed: None,
                    irqfd: None,
                }),
                Err(error) => {
                    crate::guest_warn!("interrupts: device {:#x}: {error}", self.device);
                    return None;
                }
            }
        }
        let fds: Vec<&EventFd> = vectors.iter().map(|v| &v.fd).collect();
        match self.backend.irq_enable(index, &fds) {
            Ok(()) => Some(vectors),
            Err(error) => {
                crate::guest_warn!(
                    "interrupts: device {:#x}: VFIO refused {count} vectors at IRQ {index}: {error}",
                    self.device
                );
                None
            }
        }
    }

    fn enter_msix(&mut self) {
        self.leave_current();
        let wanted = self
            .msix
            .as_ref()
            .map_or(0, |(_, table)| usize::from(table.vector_count()));
        if let Some(vectors) = self.enter_vectors(MSIX_IRQ_INDEX, wanted) {
            self.msix_vectors = vectors;
            self.mode = InterruptMode::Msix;
        }
    }

    fn leave_msix_for_intx(&mut self) {
        if self.mode == InterruptMode::Msix {
            self.leave_current();
            self.enter_intx();
        }
    }

    fn enter_msi(&mut self, vectors: u8) {
        self.leave_current();
        if let Some(v) = self.enter_vectors(MSI_IRQ_INDEX, usize::from(vectors)) {
            self.msi_vectors = v;
            self.mode = InterruptMode::Msi;
        }
    }

    fn sync_msix(&mut self) {
        for vector in 0..self.msix_vectors.len() {
            self.sync_msix_vector(vector as u16);
        }
    }

    fn sync_msix_vector(&mut self, vector: u16) {
        let Some((_, table)) = &self.msix else {
            return;
        };
        let want = (self.mode == InterruptMode::Msix && !table.is_vector_masked(vector))
            .then(|| table.entry(vector).map(|entry| entry.message))
            .flatten();
        if let Some(v) = self.msix_vectors.get_mut(usize::from(vector)) {
            sync_vector(&self.router, self.device, vector, v, want);
        }
    }

    fn sync_msi(&mut self) {
        let Some(cap) = &self.msi else {
            return;
        };
        for (i, v) in self.msi_vectors.iter_mut().enumerate() {
            let vector = i as u8;
            let want = (self.mode == InterruptMode::Msi && !cap.is_vector_masked(vector))
                .then(|| cap.message(vector))
                .flatten();
            sync_vector(
                &self.router,
                self.device,
                MSI_ROUTE_VECTOR_BASE + u16::from(vector),
                v,
                want,
            );
        }
    }

    fn signal_msix(&self, vector: u16) {
        if let Some(v) = self.msix_vectors.get(usize::from(vector)) {
            signal(&v.fd);
        }
    }

    /// Moves what masked MSI-X vectors received into the PBA.
    fn drain_masked_msix(&mut self) {
        let Some((_, table)) = &mut self.msix else {
            return;
        };
        for (i, v) in self.msix_vectors.iter().enumerate() {
            if v.irqfd.is_none() && v.fd.read().is_ok_and(|count| count > 0) {
                table.trigger(i as u16);
            }
        }
    }

    /// Moves what masked MSI vectors received into the pending bits.
    fn drain_masked_msi(&mut self) {
        let Some(cap) = &mut self.msi else {
            return;
        };
        for (i, v) in self.msi_vectors.iter().enumerate() {
            if v.irqfd.is_none() && v.fd.read().is_ok_and(|count| count > 0) {
                cap.trigger(i as u8);
            }
        }
    }
}

impl<B: VfioDeviceAccess> Drop for VfioInterrupts<B> {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn in_region(offset: u64, start: u64, size: u64) -> bool {
    offset >= start && offset - start < size
}

#[cfg(test)]
mod tests {
    use resources::gsi::{legacy_routes, Route, RouteKind, KVM_MAX_IRQ_ROUTES};

    use super::*;
    use crate::interrupts::fake::FakeKvmIrqs;
    use crate::pci::msix::{MSIX_CONTROL_ENABLE, MSIX_CONTROL_FUNCTION_MASK};
    use crate::vfio::fake::{FakeIrqCall, FakeVfioDevice};

    /// gpu_like: MSI at 0x68, MSI-X at 0xb4 (32 vectors, table BAR0
    /// 0xb90000, PBA 0xba0000), INTA.
    const MSIX_CONTROL: u16 = 0xb4 + 2;
    const MSI_CONTROL: u16 = 0x68 + 2;
    const TABLE: u64 = 0xb9_0000;
    const PBA: u64 = 0xba_0000;
    const ADDRESS: u64 = 0xfee0_0000;

    struct Rig {
        fake: Arc<FakeVfioDevice>,
        kvm: Arc<FakeKvmIrqs>,
        irqs: VfioInterrupts<FakeVfioDevice>,
    }

    fn rig_with(fake: FakeVfioDevice) -> Rig {
        let fake = Arc::new(fake);
        let kvm = Arc::new(FakeKvmIrqs::default());
        let router = Arc::new(InterruptRouter::new(kvm.clone(), KVM_MAX_IRQ_ROUTES).unwrap());
        let mut irqs =
            VfioInterrupts::new(fake.clone(), router, 0x0800, &fake.config_bytes(), 16).unwrap();
        irqs.start();
        Rig { fake, kvm, irqs }
    }

    fn rig() -> Rig {
        rig_with(FakeVfioDevice::gpu_like().with_irqs(MSIX_IRQ_INDEX, 32))
    }

    fn write_entry(
        irqs: &mut VfioInterrupts<FakeVfioDevice>,
        vector: u64,
        data: u32,
        masked: bool,
    ) {
        let at = TABLE + vector * 16;
        assert!(irqs.bar_write(0, at, &ADDRESS.to_le_bytes()));
        assert!(irqs.bar_write(0, at + 8, &data.to_le_bytes()));
        assert!(irqs.bar_write(0, at + 12, &u32::from(masked).to_le_bytes()));
    }

    fn msi_routes(kvm: &FakeKvmIrqs) -> Vec<Route> {
        kvm.routes()
            .into_iter()
            .filter(|r| matches!(r.kind, RouteKind::Msi { .. }))
            .collect()
    }

    #[test]
    fn intx_is_a_resampling_irqfd_from_the_start() {
        let Rig { fake, kvm, irqs } = rig();
        assert_eq!(irqs.mode(), InterruptMode::Intx);
        assert_eq!(kvm.irqfd_gsis(), [(16, true)]);
        assert_eq!(
            fake.irq_calls(),
            [
                FakeIrqCall::Enable {
                    index: INTX_IRQ_INDEX,
                    count: 1
                },
                FakeIrqCall::IntxUnmaskOn
            ]
        );
        assert!(fake.fire(INTX_IRQ_INDEX, 0));
        assert_eq!(kvm.deliveries(), [16]);
    }

    #[test]
    fn msix_enable_switches_from_intx_and_routes_unmasked_vectors() {
        let Rig {
            fake,
            kvm,
            mut irqs,
        } = rig();
        fake.clear_irq_calls();
        irqs.config_write(
            MSIX_CONTROL,
            &(MSIX_CONTROL_ENABLE | MSIX_CONTROL_FUNCTION_MASK).to_le_bytes(),
        );
        assert_eq!(irqs.mode(), InterruptMode::Msix);
        assert_eq!(
            fake.irq_calls(),
            [
                FakeIrqCall::Disable {
                    index: INTX_IRQ_INDEX
                },
                FakeIrqCall::Enable {
                    index: MSIX_IRQ_INDEX,
                    count: 32
                }
            ]
        );
        write_entry(&mut irqs, 0, 0x41, false);
        write_entry(&mut irqs, 3, 0x42, false);
        assert!(
            msi_routes(&kvm).is_empty(),
            "function masked: nothing routed"
        );
        irqs.config_write(MSIX_CONTROL, &MSIX_CONTROL_ENABLE.to_le_bytes());
        assert_eq!(
            msi_routes(&kvm),
            [
                Route {
                    gsi: 24,
                    kind: RouteKind::Msi {
                        address: ADDRESS,
                        data: 0x41,
                        devid: None,
                    }
                },
                Route {
                    gsi: 25,
                    kind: RouteKind::Msi {
                        address: ADDRESS,
                        data: 0x42,
                        devid: None,
                    }
                }
            ]
        );
        assert_eq!(kvm.routes()[..legacy_routes().len()], legacy_routes()[..]);
        assert!(fake.fire(MSIX_IRQ_INDEX, 3));
        assert_eq!(kvm.deliveries(), [25]);
        // The guest reads Message Control back through the model.
        let mut control = [0u8; 2];
        irqs.config_read(MSIX_CONTROL, &mut control);
        assert_eq!(u16::from_le_bytes(control), MSIX_CONTROL_ENABLE | 31);
        assert!(irqs.owns_config_byte(MSIX_CONTROL));
        assert!(!irqs.owns_config_byte(0xb4));
    }

    #[test]
    fn masked_vector_goes_pending_and_is_delivered_at_unmask() {
        let Rig {
            fake,
            kvm,
            mut irqs,
        } = rig();
        irqs.config_write(MSIX_CONTROL, &MSIX_CONTROL_ENABLE.to_le_bytes());
        write_entry(&mut irqs, 2, 0x51, false);
        assert_eq!(kvm.irqfd_gsis(), [(16, true), (24, false)]);
        // Mask: the irqfd goes, the interrupt waits in the eventfd.
        assert!(irqs.bar_write(0, TABLE + 2 * 16 + 12, &1u32.to_le_bytes()));
        assert_eq!(kvm.irqfd_gsis(), [(16, true)]);
        assert!(fake.fire(MSIX_IRQ_INDEX, 2));
        assert!(kvm.deliveries().is_empty());
        let mut pba = [0u8; 8];
        assert!(irqs.bar_read(0, PBA, &mut pba));
        assert_eq!(
            u64::from_le_bytes(pba),
            1 << 2,
            "PBA shows the pending vector"
        );
        // Unmask: delivered once, pending bit cleared.
        assert!(irqs.bar_write(0, TABLE + 2 * 16 + 12, &0u32.to_le_bytes()));
        assert_eq!(kvm.deliveries(), [24]);
        assert!(irqs.bar_read(0, PBA, &mut pba));
        assert_eq!(u64::from_le_bytes(pba), 0);
        // Masked and unmasked again without a PBA read: KVM sees the count.
        assert!(irqs.bar_write(0, TABLE + 2 * 16 + 12, &1u32.to_le_bytes()));
        assert!(fake.fire(MSIX_IRQ_INDEX, 2));
        assert!(irqs.bar_write(0, TABLE + 2 * 16 + 12, &0u32.to_le_bytes()));
        assert_eq!(kvm.deliveries(), [24]);
    }

    #[test]
    fn table_accesses_of_every_width_and_offset_never_panic() {
        let Rig { kvm, mut irqs, .. } = rig();
        irqs.config_write(MSIX_CONTROL, &MSIX_CONTROL_ENABLE.to_le_bytes());
        let table_end = TABLE + 32 * 16;
        for offset in (TABLE - 8..TABLE + 40).chain(table_end - 8..table_end + 8) {
            for len in [1usize, 2, 3, 4, 8, 16] {
                let mut data = vec![0x5a; len];
                let handled = irqs.bar_read(0, offset, &mut data);
                let inside = offset >= TABLE && offset < table_end;
                assert_eq!(handled, inside, "{offset:#x}");
                let aligned = matches!(len, 4 | 8) && offset % len as u64 == 0;
                if inside && (!aligned || offset + len as u64 > table_end) {
                    assert!(data.iter().all(|b| *b == 0xff), "{offset:#x} {len}");
                }
                irqs.bar_write(0, offset, &vec![0xab; len]);
            }
        }
        // Odd-width writes changed nothing: the entries that got aligned
        // dword writes of 0xabababab are masked (bit 0 set) and their
        // addresses are outside the x86 window: nothing routed.
        assert!(msi_routes(&kvm).is_empty());
        assert_eq!(kvm.irqfd_gsis(), [(16, true)]);
        // A BAR access elsewhere is not the table's.
        assert!(!irqs.bar_read(0, 0x1000, &mut [0; 4]));
        assert!(!irqs.bar_read(1, TABLE, &mut [0; 4]));
    }

    #[test]
    fn absurd_messages_are_not_routed() {
        let Rig { kvm, mut irqs, .. } = rig();
        irqs.config_write(MSIX_CONTROL, &MSIX_CONTROL_ENABLE.to_le_bytes());
        write_entry(&mut irqs, 0, 0x41, false);
        assert_eq!(msi_routes(&kvm).len(), 1);
        // The guest moves the vector to an address no CPU decodes.
        for address in [0u64, 0xdead_beef_0000, !3, 0xfef0_0000] {
            let at = TABLE;
            irqs.bar_write(0, at, &address.to_le_bytes());
            assert!(msi_routes(&kvm).is_empty(), "{address:#x}");
            assert_eq!(kvm.irqfd_gsis(), [(16, true)]);
        }
        irqs.bar_write(0, TABLE, &ADDRESS.to_le_bytes());
        assert_eq!(msi_routes(&kvm).len(), 1);
    }

    #[test]
    fn msix_disable_tears_down_and_returns_to_intx() {
        let Rig {
            fake,
            kvm,
            mut irqs,
        } = rig();
        irqs.config_write(MSIX_CONTROL, &MSIX_CONTROL_ENABLE.to_le_bytes());
        write_entry(&mut irqs, 0, 0x41, false);
        fake.clear_irq_calls();
        irqs.config_write(MSIX_CONTROL + 1, &[0]);
        assert_eq!(irqs.mode(), InterruptMode::Intx);
        assert!(msi_routes(&kvm).is_empty());
        assert_eq!(kvm.irqfd_gsis(), [(16, true)]);
        assert_eq!(
            fake.irq_calls()[..2],
            [
                FakeIrqCall::Disable {
                    index: MSIX_IRQ_INDEX
                },
                FakeIrqCall::Enable {
                    index: INTX_IRQ_INDEX,
                    count: 1
                }
            ]
        );
        irqs.shutdown();
        assert!(kvm.irqfd_gsis().is_empty());
        assert_eq!(irqs.mode(), InterruptMode::None);
    }

    #[test]
    fn msi_with_per_vector_masking_routes_and_masks() {
        let Rig {
            fake,
            kvm,
            mut irqs,
        } = rig_with(
            FakeVfioDevice::gpu_like()
                .with_irqs(MSI_IRQ_INDEX, 4)
                .with_irqs(MSIX_IRQ_INDEX, 32),
        );
        let msi = irqs.msi().unwrap().clone();
        let base = msi.offset();
        // Program address and data, 4 vectors (if capable), then enable.
        irqs.config_write(base + 4, &(ADDRESS as u32).to_le_bytes());
        let data_offset = if msi.is_64bit() { 0x0c } else { 0x08 };
        irqs.config_write(base + data_offset, &0x60u16.to_le_bytes());
        irqs.config_write(MSI_CONTROL, &[0x01 | (2 << 4)]);
        assert_eq!(irqs.mode(), InterruptMode::Msi);
        let vectors = irqs.msi().unwrap().vectors_enabled();
        assert_eq!(msi_routes(&kvm).len(), usize::from(vectors));
        assert!(fake.fire(MSI_IRQ_INDEX, 0));
        assert_eq!(kvm.deliveries(), [24]);
        if msi.has_per_vector_mask() {
            let mask = if msi.is_64bit() { 0x10 } else { 0x0c };
            irqs.config_write(base + mask, &1u32.to_le_bytes());
            assert!(fake.fire(MSI_IRQ_INDEX, 0));
            assert!(kvm.deliveries().is_empty());
            let mut pending = [0u8; 4];
            irqs.config_read(base + mask + 4, &mut pending);
            assert_eq!(u32::from_le_bytes(pending), 1);
            irqs.config_write(base + mask, &0u32.to_le_bytes());
            assert_eq!(kvm.deliveries(), [24]);
        }
        // Disable: back to INTx.
        irqs.config_write(MSI_CONTROL, &[0]);
        assert_eq!(irqs.mode(), InterruptMode::Intx);
        assert!(msi_routes(&kvm).is_empty());
    }

    #[test]
    fn interrupt_line_reads_the_intx_gsi_and_keeps_guest_writes() {
        let Rig { fake, mut irqs, .. } = rig();
        let mut data = [0u8; 4];
        irqs.config_read(INTERRUPT_LINE_OFFSET, &mut data);
        assert_eq!(data[0], 16);
        irqs.config_write(INTERRUPT_LINE_OFFSET, &[0x0b]);
        irqs.config_read(INTERRUPT_LINE_OFFSET, &mut data);
        assert_eq!(data[0], 0x0b);
        assert!(fake.writes().is_empty());
    }

    #[test]
    fn routing_failures_are_logged_not_fatal() {
        let Rig { kvm, mut irqs, .. } = rig();
        kvm.fail_routing();
        irqs.config_write(MSIX_CONTROL, &MSIX_CONTROL_ENABLE.to_le_bytes());
        write_entry(&mut irqs, 0, 0x41, false);
        assert_eq!(kvm.irqfd_gsis(), [(16, true)]);
    }

    #[test]
    fn device_without_vfio_msix_offers_no_table() {
        let Rig { mut irqs, .. } = rig_with(FakeVfioDevice::gpu_like());
        assert!(irqs.msix_table().is_none());
        assert!(!irqs.bar_read(0, TABLE, &mut [0; 4]));
    }
}
