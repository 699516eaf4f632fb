//! Global system interrupts (GSIs): an allocator for the GSIs of MSI and
//! MSI-X vectors, and the routing table the VMM hands to KVM.
//!
//! Pure data: no KVM. The VMM converts [`RoutingTable::routes`] into
//! `kvm_irq_routing` entries (`KVM_IRQ_ROUTING_MSI` / `KVM_IRQ_ROUTING_IRQCHIP`)
//! and calls `KVM_SET_GSI_ROUTING`, which replaces the whole table; that is
//! why the list always contains the legacy routes.
//!
//! # Numbering
//!
//! - GSIs 0..24 are the in-kernel IOAPIC's pins and stay reserved for
//!   legacy interrupts (serial, ACPI SCI, INTx). Their routes are KVM's
//!   defaults: GSIs 0..8 to the master PIC's pins and the IOAPIC pin of
//!   the same number, 8..16 to the slave PIC and the IOAPIC, 16..24 to the
//!   IOAPIC only. A device's INTx uses the GSI equal to its IOAPIC pin and
//!   allocates nothing; several devices may share a pin.
//! - MSI and MSI-X vectors get GSIs from 24 up to a limit (exclusive)
//!   given by the VMM: KVM accepts GSIs below `KVM_MAX_IRQ_ROUTES`, 4096
//!   on current kernels ([`KVM_MAX_IRQ_ROUTES`]), 1024 on old ones. The
//!   lowest free GSI is handed out first, so numbering is deterministic.

use std::collections::{BTreeMap, BTreeSet};

/// Pins of the in-kernel IOAPIC; GSIs below this are reserved for legacy routes.
pub const IOAPIC_PINS: u32 = 24;
/// First GSI handed out for MSI and MSI-X vectors.
pub const FIRST_MSI_GSI: u32 = IOAPIC_PINS;
/// KVM's routing table limit on current kernels (`KVM_MAX_IRQ_ROUTES`).
pub const KVM_MAX_IRQ_ROUTES: u32 = 4096;
/// KVM's routing table limit on old kernels.
pub const KVM_MAX_IRQ_ROUTES_OLD: u32 = 1024;
/// KVM irqchip number of the master PIC (`KVM_IRQCHIP_PIC_MASTER`).
pub const IRQCHIP_PIC_MASTER: u32 = 0;
/// KVM irqchip number of the slave PIC (`KVM_IRQCHIP_PIC_SLAVE`).
pub const IRQCHIP_PIC_SLAVE: u32 = 1;
/// KVM irqchip number of the IOAPIC (`KVM_IRQCHIP_IOAPIC`).
pub const IRQCHIP_IOAPIC: u32 = 2;
/// Pins per PIC.
const PIC_PINS: u32 = 8;

/// Errors of GSI allocation and routing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GsiError {
    /// The limit leaves no GSI for MSI.
    #[error("GSI limit {limit} leaves no GSI above the IOAPIC's 24 pins; use a limit above 24 (KVM: 1024 or 4096)")]
    LimitTooSmall { limit: u32 },
    /// Every GSI from 24 to the limit is in use.
    #[error("all GSIs from 24 to {limit} are in use; give the guest fewer MSI/MSI-X vectors or raise the limit")]
    Exhausted { limit: u32 },
    /// Freeing a GSI that is not allocated (or is a legacy one).
    #[error("GSI {gsi} is not allocated; free only GSIs the allocator handed out")]
    NotAllocated { gsi: u32 },
    /// An irqchip route to a pin the chip does not have.
    #[error("irqchip {chip} has no pin {pin}; the IOAPIC has pins 0..24")]
    PinOutOfRange { chip: u32, pin: u32 },
    /// An irqchip route for a device to a chip other than the IOAPIC.
    #[error("device interrupts route only to the IOAPIC (chip 2), not chip {chip}")]
    UnsupportedChip { chip: u32 },
}

/// Hands out GSIs from 24 up to a limit (exclusive), lowest free first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GsiAllocator {
    limit: u32,
    used: BTreeSet<u32>,
}

impl GsiAllocator {
    /// An allocator for GSIs `24..limit`.
    pub fn new(limit: u32) -> Result<Self, GsiError> {
        if limit <= FIRST_MSI_GSI {
            return Err(GsiError::LimitTooSmall { limit });
        }
        Ok(Self {
            limit,
            used: BTreeSet::new(),
        })
    }

    /// The limit (first GSI not handed out).
    pub fn limit(&self) -> u32 {
        self.limit
    }

    /// The lowest free GSI, now allocated.
    pub fn allocate(&mut self) -> Result<u32, GsiError> {
        // The used set is sorted: the first gap is the lowest free GSI.
        let mut candidate = FIRST_MSI_GSI;
        for gsi in &self.used {
            if *gsi != candidate {
                break;
            }
            candidate += 1;
        }
        if candidate >= self.limit {
            return Err(GsiError::Exhausted { limit: self.limit });
        }
        self.used.insert(candidate);
        Ok(candidate)
    }

    /// Frees `gsi` for reuse.
    pub fn free(&mut self, gsi: u32) -> Result<(), GsiError> {
        if self.used.remove(&gsi) {
            Ok(())
        } else {
            Err(GsiError::NotAllocated { gsi })
        }
    }

    /// Frees every GSI.
    pub fn clear(&mut self) {
        self.used.clear();
    }

    /// Whether `gsi` is allocated.
    pub fn is_allocated(&self, gsi: u32) -> bool {
        self.used.contains(&gsi)
    }

    /// Number of GSIs allocated.
    pub fn allocated(&self) -> usize {
        self.used.len()
    }

    /// Number of GSIs still free.
    pub fn available(&self) -> usize {
        (self.limit - FIRST_MSI_GSI) as usize - self.used.len()
    }
}

/// Where a GSI's interrupt goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RouteKind {
    /// An MSI message (KVM injects it as the device's memory write would).
    /// `devid`: the device's PCI requester ID, which an interrupt translation
    /// service needs (aarch64's GICv3 ITS: KVM_MSI_VALID_DEVID); filled in by
    /// [`RoutingTable::routes`] from [`RoutingTable::set_requester_id`].
    Msi {
        address: u64,
        data: u32,
        devid: Option<u32>,
    },
    /// A pin of an in-kernel interrupt controller.
    Irqchip {
        /// [`IRQCHIP_PIC_MASTER`], [`IRQCHIP_PIC_SLAVE`] or [`IRQCHIP_IOAPIC`].
        chip: u32,
        pin: u32,
    },
}

/// One route for `KVM_SET_GSI_ROUTING`. A GSI may have several (legacy
/// GSIs 0..16 go to a PIC and the IOAPIC).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Route {
    pub gsi: u32,
    pub kind: RouteKind,
}

/// An interrupt source: a VMM-chosen device id (for example the PCI
/// address) and a vector (MSI/MSI-X vector number; 0 for INTx).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct InterruptSource {
    pub device: u32,
    pub vector: u16,
}

/// One routing table entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RoutingEntry {
    /// Whose interrupt.
    pub source: InterruptSource,
    /// Its GSI (the one an irqfd for it is registered on).
    pub gsi: u32,
    /// Where the GSI goes.
    pub kind: RouteKind,
}

/// The GSI routes of every device interrupt, with the legacy routes. See
/// the module docs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoutingTable {
    allocator: GsiAllocator,
    entries: BTreeMap<InterruptSource, (u32, RouteKind)>,
    requester_ids: BTreeMap<u32, u32>,
}

impl RoutingTable {
    /// An empty table whose MSI GSIs are below `gsi_limit`.
    pub fn new(gsi_limit: u32) -> Result<Self, GsiError> {
        Ok(Self {
            allocator: GsiAllocator::new(gsi_limit)?,
            entries: BTreeMap::new(),
            requester_ids: BTreeMap::new(),
        })
    }

    /// `device`'s PCI requester ID (bus << 8 | device << 3 | function), which
    /// its MSI routes carry from then on (see [`RouteKind::Msi`]).
    pub fn set_requester_id(&mut self, device: u32, requester_id: u32) {
        self.requester_ids.insert(device, requester_id);
    }

    /// Routes `device`'s `vector` to an MSI message. An MSI entry keeps
    /// its GSI when only the message changes; a new entry (or one that was
    /// an IOAPIC pin) gets the lowest free GSI. Returns the GSI.
    pub fn set_msi(
        &mut self,
        device: u32,
        vector: u16,
        address: u64,
        data: u32,
    ) -> Result<u32, GsiError> {
        let source = InterruptSource { device, vector };
        let kind = RouteKind::Msi {
            address,
            data,
            devid: None,
        };
        if let Some((gsi, existing)) = self.entries.get_mut(&source) {
            if matches!(existing, RouteKind::Msi { .. }) {
                *existing = kind;
                return Ok(*gsi);
            }
        }
        let gsi = self.allocator.allocate()?;
        self.entries.insert(source, (gsi, kind));
        Ok(gsi)
    }

    /// Routes `device`'s `vector` (INTx: 0) to IOAPIC `pin`; the GSI is
    /// the pin number and the route is the legacy one. An MSI GSI the
    /// entry had is freed. Returns the GSI.
    pub fn set_irqchip(
        &mut self,
        device: u32,
        vector: u16,
        chip: u32,
        pin: u32,
    ) -> Result<u32, GsiError> {
        if chip != IRQCHIP_IOAPIC {
            return Err(GsiError::UnsupportedChip { chip });
        }
        if pin >= IOAPIC_PINS {
            return Err(GsiError::PinOutOfRange { chip, pin });
        }
        self.remove(device, vector);
        self.entries.insert(
            InterruptSource { device, vector },
            (pin, RouteKind::Irqchip { chip, pin }),
        );
        Ok(pin)
    }

    /// Removes the entry of `device`'s `vector`, freeing its MSI GSI.
    /// Returns the GSI it had.
    pub fn remove(&mut self, device: u32, vector: u16) -> Option<u32> {
        let (gsi, kind) = self.entries.remove(&InterruptSource { device, vector })?;
        self.release(gsi, kind);
        Some(gsi)
    }

    /// Removes every entry of `device` (teardown), freeing their MSI GSIs.
    /// Returns the GSIs they had, in vector order.
    pub fn remove_device(&mut self, device: u32) -> Vec<u32> {
        let sources: Vec<InterruptSource> = self
            .entries
            .range(
                InterruptSource { device, vector: 0 }..=InterruptSource {
                    device,
                    vector: u16::MAX,
                },
            )
            .map(|(source, _)| *source)
            .collect();
        sources
            .into_iter()
            .filter_map(|source| self.remove(source.device, source.vector))
            .collect()
    }

    /// Removes every entry (guest reboot, exit).
    pub fn clear(&mut self) {
        self.entries.clear();
        self.allocator.clear();
    }

    /// The GSI of `device`'s `vector`.
    pub fn gsi(&self, device: u32, vector: u16) -> Option<u32> {
        self.entries
            .get(&InterruptSource { device, vector })
            .map(|(gsi, _)| *gsi)
    }

    /// Every entry, by device then vector.
    pub fn entries(&self) -> Vec<RoutingEntry> {
        self.entries
            .iter()
            .map(|(source, (gsi, kind))| RoutingEntry {
                source: *source,
                gsi: *gsi,
                kind: *kind,
            })
            .collect()
    }

    /// The GSI allocator (for counts).
    pub fn allocator(&self) -> &GsiAllocator {
        &self.allocator
    }

    /// The complete routing table for `KVM_SET_GSI_ROUTING`: the legacy
    /// routes of GSIs 0..24 (KVM's defaults, which INTx entries use), then
    /// one route per MSI entry, sorted by GSI.
    pub fn routes(&self) -> Vec<Route> {
        let mut routes = legacy_routes();
        let mut msi: Vec<Route> = self
            .entries
            .iter()
            .filter_map(|(source, (gsi, kind))| match *kind {
                RouteKind::Msi { address, data, .. } => Some(Route {
                    gsi: *gsi,
                    kind: RouteKind::Msi {
                        address,
                        data,
                        devid: self.requester_ids.get(&source.device).copied(),
                    },
                }),
                RouteKind::Irqchip { .. } => None,
            })
            .collect();
        msi.sort_by_key(|route| route.gsi);
        routes.extend(msi);
        routes
    }

    fn release(&mut self, gsi: u32, kind: RouteKind) {
        if matches!(kind, RouteKind::Msi { .. }) {
            // Every MSI entry's GSI came from the allocator, so this cannot
            // fail; if it did, the GSI is simply no longer in use.
            let _ = self.allocator.free(gsi);
        }
    }
}

/// KVM's default routes for GSIs 0..24 on this architecture: x86_64's PIC
/// and IOAPIC pins ([`x86_64_legacy_routes`]), aarch64's GIC SPIs
/// ([`aarch64_legacy_routes`]).
pub fn legacy_routes() -> Vec<Route> {
    if cfg!(target_arch = "aarch64") {
        aarch64_legacy_routes()
    } else {
        x86_64_legacy_routes()
    }
}

/// KVM's default routes on aarch64 for GSIs 0..24: GSI n to pin n of the
/// GIC (irqchip 0), SPI n. The UART and INTx use them.
pub fn aarch64_legacy_routes() -> Vec<Route> {
    (0..IOAPIC_PINS)
        .map(|gsi| Route {
            gsi,
            kind: RouteKind::Irqchip { chip: 0, pin: gsi },
        })
        .collect()
}

/// KVM's default routes on x86_64 for GSIs 0..24 (see the module docs).
pub fn x86_64_legacy_routes() -> Vec<Route> {
    let mut routes = Vec::new();
    for gsi in 0..IOAPIC_PINS {
        if gsi < 2 * PIC_PINS {
            let chip = if gsi < PIC_PINS {
                IRQCHIP_PIC_MASTER
            } else {
                IRQCHIP_PIC_SLAVE
            };
            routes.push(Route {
                gsi,
                kind: RouteKind::Irqchip {
                    chip,
                    pin: gsi % PIC_PINS,
                },
            });
        }
        routes.push(Route {
            gsi,
            kind: RouteKind::Irqchip {
                chip: IRQCHIP_IOAPIC,
                pin: gsi,
            },
        });
    }
    routes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocation_starts_above_the_ioapic_pins_and_reuses_the_lowest_free() {
        let mut allocator = GsiAllocator::new(KVM_MAX_IRQ_ROUTES).unwrap();
        assert_eq!(allocator.allocate(), Ok(24));
        assert_eq!(allocator.allocate(), Ok(25));
        assert_eq!(allocator.allocate(), Ok(26));
        assert_eq!(allocator.free(25), Ok(()));
        assert!(!allocator.is_allocated(25));
        assert_eq!(allocator.allocate(), Ok(25));
        assert_eq!(allocator.allocate(), Ok(27));
        assert_eq!(allocator.allocated(), 4);
        assert_eq!(allocator.available(), 4096 - 24 - 4);
        assert_eq!(allocator.limit(), 4096);
    }

    #[test]
    fn freeing_what_was_not_allocated_is_an_error() {
        let mut allocator = GsiAllocator::new(100).unwrap();
        assert_eq!(allocator.free(24), Err(GsiError::NotAllocated { gsi: 24 }));
        assert_eq!(allocator.free(4), Err(GsiError::NotAllocated { gsi: 4 }));
        let gsi = allocator.allocate().unwrap();
        assert_eq!(allocator.free(gsi), Ok(()));
        assert_eq!(allocator.free(gsi), Err(GsiError::NotAllocated { gsi }));
    }

    #[test]
    fn exhaustion_is_an_error_until_something_is_freed() {
        assert_eq!(
            GsiAllocator::new(24),
            Err(GsiError::LimitTooSmall { limit: 24 })
        );
        assert_eq!(
            GsiAllocator::new(0),
            Err(GsiError::LimitTooSmall { limit: 0 })
        );
        let mut allocator = GsiAllocator::new(KVM_MAX_IRQ_ROUTES_OLD).unwrap();
        for expected in 24..1024 {
            assert_eq!(allocator.allocate(), Ok(expected));
        }
        assert_eq!(
            allocator.allocate(),
            Err(GsiError::Exhausted { limit: 1024 })
        );
        assert_eq!(allocator.available(), 0);
        allocator.free(500).unwrap();
        assert_eq!(allocator.allocate(), Ok(500));
        allocator.clear();
        assert_eq!(allocator.allocate(), Ok(24));
        assert!(GsiError::Exhausted { limit: 1024 }
            .to_string()
            .contains("fewer"));
    }

    #[test]
    fn legacy_routes_match_kvms_defaults() {
        let routes = legacy_routes();
        assert_eq!(routes.len(), 16 * 2 + 8);
        assert_eq!(
            routes[..2],
            [
                Route {
                    gsi: 0,
                    kind: RouteKind::Irqchip { chip: 0, pin: 0 }
                },
                Route {
                    gsi: 0,
                    kind: RouteKind::Irqchip { chip: 2, pin: 0 }
                }
            ]
        );
        assert!(routes.contains(&Route {
            gsi: 9,
            kind: RouteKind::Irqchip { chip: 1, pin: 1 }
        }));
        assert_eq!(
            routes.last(),
            Some(&Route {
                gsi: 23,
                kind: RouteKind::Irqchip { chip: 2, pin: 23 }
            })
        );
        assert!(routes
            .iter()
            .filter(|route| route.gsi >= 16)
            .all(|route| matches!(route.kind, RouteKind::Irqchip { chip: 2, .. })));
    }

    #[test]
    fn msi_entries_get_gsis_and_keep_them_when_the_message_changes() {
        let mut table = RoutingTable::new(KVM_MAX_IRQ_ROUTES).unwrap();
        assert_eq!(table.set_msi(1, 0, 0xfee0_0000, 0x41), Ok(24));
        assert_eq!(table.set_msi(1, 1, 0xfee0_0000, 0x42), Ok(25));
        assert_eq!(table.set_msi(2, 0, 0xfee0_1000, 0x51), Ok(26));
        assert_eq!(table.set_msi(1, 0, 0xfee0_2000, 0x43), Ok(24));
        assert_eq!(table.gsi(1, 1), Some(25));
        assert_eq!(table.gsi(3, 0), None);
        // Device 2 is 00:02.0: its MSI routes carry its requester ID.
        table.set_requester_id(2, 2 << 3);
        let routes = table.routes();
        assert_eq!(routes.len(), legacy_routes().len() + 3);
        assert_eq!(
            routes[routes.len() - 3..],
            [
                Route {
                    gsi: 24,
                    kind: RouteKind::Msi {
                        address: 0xfee0_2000,
                        data: 0x43,
                        devid: None,
                    }
                },
                Route {
                    gsi: 25,
                    kind: RouteKind::Msi {
                        address: 0xfee0_0000,
                        data: 0x42,
                        devid: None,
                    }
                },
                Route {
                    gsi: 26,
                    kind: RouteKind::Msi {
                        address: 0xfee0_1000,
                        data: 0x51,
                        devid: Some(0x10),
                    }
                },
            ]
        );
    }

    #[test]
    fn intx_entries_use_the_ioapic_pin_and_allocate_nothing() {
        let mut table = RoutingTable::new(64).unwrap();
        assert_eq!(table.set_irqchip(1, 0, IRQCHIP_IOAPIC, 10), Ok(10));
        assert_eq!(table.set_irqchip(2, 0, IRQCHIP_IOAPIC, 10), Ok(10));
        assert_eq!(table.allocator().allocated(), 0);
        assert_eq!(table.routes(), legacy_routes());
        assert_eq!(
            table.set_irqchip(1, 0, IRQCHIP_IOAPIC, 24),
            Err(GsiError::PinOutOfRange { chip: 2, pin: 24 })
        );
        assert_eq!(
            table.set_irqchip(1, 0, IRQCHIP_PIC_MASTER, 3),
            Err(GsiError::UnsupportedChip { chip: 0 })
        );
        // Switching a vector between MSI and INTx frees and reallocates.
        assert_eq!(table.set_msi(1, 0, 0xfee0_0000, 0), Ok(24));
        assert_eq!(table.allocator().allocated(), 1);
        assert_eq!(table.set_irqchip(1, 0, IRQCHIP_IOAPIC, 11), Ok(11));
        assert_eq!(table.allocator().allocated(), 0);
        assert_eq!(table.set_msi(1, 0, 0xfee0_0000, 0), Ok(24));
        assert_eq!(table.entries().len(), 2);
    }

    #[test]
    fn teardown_frees_a_devices_gsis_for_reuse() {
        let mut table = RoutingTable::new(KVM_MAX_IRQ_ROUTES).unwrap();
        for vector in 0..4 {
            table
                .set_msi(7, vector, 0xfee0_0000, u32::from(vector))
                .unwrap();
        }
        table.set_msi(8, 0, 0xfee0_0000, 0).unwrap();
        table.set_irqchip(7, 100, IRQCHIP_IOAPIC, 5).unwrap();
        assert_eq!(table.remove_device(7), vec![24, 25, 26, 27, 5]);
        assert_eq!(table.remove_device(7), Vec::<u32>::new());
        assert_eq!(table.entries().len(), 1);
        assert_eq!(table.allocator().allocated(), 1);
        assert_eq!(table.set_msi(9, 0, 0, 0), Ok(24));
        assert_eq!(table.remove(9, 0), Some(24));
        assert_eq!(table.remove(9, 0), None);
        table.clear();
        assert!(table.entries().is_empty());
        assert_eq!(table.routes(), legacy_routes());
        assert_eq!(table.allocator().allocated(), 0);
    }

    #[test]
    fn a_full_table_reports_exhaustion_and_keeps_existing_routes() {
        let mut table = RoutingTable::new(28).unwrap();
        for vector in 0..4 {
            assert_eq!(table.set_msi(1, vector, 0, 0), Ok(24 + u32::from(vector)));
        }
        assert_eq!(
            table.set_msi(1, 4, 0, 0),
            Err(GsiError::Exhausted { limit: 28 })
        );
        assert_eq!(table.gsi(1, 4), None);
        // Updating an existing entry still works when full.
        assert_eq!(table.set_msi(1, 3, 0xfee0_0000, 1), Ok(27));
        assert_eq!(table.routes().len(), legacy_routes().len() + 4);
        assert_eq!(
            RoutingTable::new(10),
            Err(GsiError::LimitTooSmall { limit: 10 })
        );
    }
}
