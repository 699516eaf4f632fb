//! MSI and MSI-X delivery into KVM, shared by every device that interrupts
//! (passed-through VFIO devices, emulated virtio devices): the VM's GSI
//! routes ([`InterruptRouter`], one per VM over a [`RoutingTable`], so the
//! legacy routes of GSIs 0..24 stay) and one [`IrqfdVector`] per vector,
//! an eventfd that is a KVM irqfd on the vector's GSI while the vector is
//! unmasked ([`sync_vector`]). A masked vector keeps its eventfd and route
//! but its irqfd is deregistered: what arrives meanwhile accumulates in the
//! eventfd's counter and is delivered when the irqfd is registered again.
//!
//! A message that fails [`MsiMessage::is_valid_x86`] is never routed: the
//! vector's irqfd and route go away and a (rate-limited) warning is logged.

pub mod fake;

use std::io;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use resources::gsi::{GsiError, Route, RoutingTable};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::pci::msix::MsiMessage;

/// The KVM operations interrupts need. The VMM implements it over its VM
/// fd; tests use a fake.
pub trait KvmIrqs: Send + Sync {
    /// `KVM_SET_GSI_ROUTING` with exactly `routes`.
    fn set_gsi_routing(&self, routes: &[Route]) -> io::Result<()>;
    /// `KVM_IRQFD`: `fd` raises `gsi`; with `resample`, level-triggered,
    /// de-asserted at EOI with `resample` signalled.
    fn register_irqfd(&self, fd: &EventFd, gsi: u32, resample: Option<&EventFd>) -> io::Result<()>;
    /// `KVM_IRQFD` with `KVM_IRQFD_FLAG_DEASSIGN`.
    fn unregister_irqfd(&self, fd: &EventFd, gsi: u32) -> io::Result<()>;
}

/// Why interrupts cannot be set up (host resources; guests cause none).
#[derive(Debug, thiserror::Error)]
pub enum InterruptError {
    /// An eventfd could not be created.
    #[error("cannot create an interrupt eventfd: {0}; raise the open file limit (ulimit -n)")]
    EventFd(io::Error),
    /// The GSI limit is unusable.
    #[error(transparent)]
    Gsi(#[from] GsiError),
}

/// The VM's GSI routes, shared by every device (see module docs).
pub struct InterruptRouter {
    kvm: Arc<dyn KvmIrqs>,
    table: Mutex<RoutingTable>,
    /// The last device id handed out.
    devices: AtomicU32,
}

impl std::fmt::Debug for InterruptRouter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InterruptRouter")
            .field("table", &self.table)
            .finish_non_exhaustive()
    }
}

impl InterruptRouter {
    /// A router with MSI GSIs below `gsi_limit` over `kvm`.
    pub fn new(kvm: Arc<dyn KvmIrqs>, gsi_limit: u32) -> Result<Self, InterruptError> {
        Ok(Self {
            kvm,
            table: Mutex::new(RoutingTable::new(gsi_limit)?),
            devices: AtomicU32::new(0),
        })
    }

    /// A device id no other device of this VM has (from 1), for
    /// [`Self::set_msi`] and [`Self::remove`].
    pub fn new_device_id(&self) -> u32 {
        self.devices.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Gives `device`'s MSI routes its PCI requester ID (see
    /// `resources::gsi::RouteKind::Msi`); set it before the guest runs.
    pub fn set_requester_id(&self, device: u32, requester_id: u32) {
        self.table().set_requester_id(device, requester_id);
    }

    /// The KVM operations.
    pub fn kvm(&self) -> &Arc<dyn KvmIrqs> {
        &self.kvm
    }

    fn table(&self) -> std::sync::MutexGuard<'_, RoutingTable> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Routes `device`'s `vector` to `message` and tells KVM. `None` (logged)
    /// when no GSI is left or KVM refuses.
    pub fn set_msi(&self, device: u32, vector: u16, message: MsiMessage) -> Option<u32> {
        let mut table = self.table();
        let gsi = match table.set_msi(device, vector, message.address, message.data) {
            Ok(gsi) => gsi,
            Err(error) => {
                crate::guest_warn!("interrupts: device {device:#x} vector {vector}: {error}");
                return None;
            }
        };
        match self.kvm.set_gsi_routing(&table.routes()) {
            Ok(()) => Some(gsi),
            Err(error) => {
                crate::guest_warn!("interrupts: KVM_SET_GSI_ROUTING failed: {error}; vector {vector} of device {device:#x} is not delivered");
                table.remove(device, vector);
                None
            }
        }
    }

    /// Removes `device`'s `vector` route (if any) and tells KVM.
    pub fn remove(&self, device: u32, vector: u16) {
        let mut table = self.table();
        if table.remove(device, vector).is_some() {
            if let Err(error) = self.kvm.set_gsi_routing(&table.routes()) {
                crate::guest_warn!("interrupts: KVM_SET_GSI_ROUTING failed: {error}");
            }
        }
    }

    /// The routes KVM has now (legacy plus every MSI route).
    pub fn routes(&self) -> Vec<Route> {
        self.table().routes()
    }
}

/// One MSI or MSI-X vector: its eventfd, route and irqfd. The device
/// (VFIO, or an emulated device's worker) signals `fd`; KVM injects the
/// routed message while the irqfd is registered.
#[derive(Debug)]
pub struct IrqfdVector {
    pub fd: EventFd,
    /// The message routed for it, with its GSI.
    pub routed: Option<(MsiMessage, u32)>,
    /// The GSI its irqfd is registered on.
    pub irqfd: Option<u32>,
}

/// A non-blocking eventfd for an interrupt.
pub fn eventfd() -> Result<EventFd, InterruptError> {
    EventFd::new(EFD_NONBLOCK).map_err(InterruptError::EventFd)
}

/// Signals `fd` once (a failure is logged: the counter is full).
pub fn signal(fd: &EventFd) {
    if let Err(error) = fd.write(1) {
        log::debug!("interrupts: eventfd write: {error}");
    }
}

/// Brings one vector's route and irqfd to `want`: `Some(message)` routed
/// and registered (when the message is valid), `None` deregistered (masked;
/// the route stays).
pub fn sync_vector(
    router: &InterruptRouter,
    device: u32,
    route_vector: u16,
    vector: &mut IrqfdVector,
    want: Option<MsiMessage>,
) {
    let kvm = router.kvm();
    let unregister = |vector: &mut IrqfdVector| {
        if let Some(gsi) = vector.irqfd.take() {
            if let Err(error) = kvm.unregister_irqfd(&vector.fd, gsi) {
                log::debug!("interrupts: irqfd deassign on GSI {gsi}: {error}");
            }
        }
    };
    let Some(message) = want else {
        unregister(vector);
        return;
    };
    if !message.is_deliverable() {
        crate::guest_warn!(
            "interrupts: device {device:#x} vector {route_vector:#x}: the guest programmed an \
             MSI message no interrupt controller receives ({message}: x86_64 takes \
             0xfee00000..0xfef00000, aarch64 the ITS's GITS_TRANSLATER); not delivered"
        );
        unregister(vector);
        if vector.routed.take().is_some() {
            router.remove(device, route_vector);
        }
        return;
    }
    let gsi = match vector.routed {
        Some((routed, gsi)) if routed == message => gsi,
        _ => match router.set_msi(device, route_vector, message) {
            Some(gsi) => {
                vector.routed = Some((message, gsi));
                gsi
            }
            None => {
                unregister(vector);
                vector.routed = None;
                return;
            }
        },
    };
    if vector.irqfd.is_some_and(|registered| registered != gsi) {
        unregister(vector);
    }
    if vector.irqfd.is_none() {
        match kvm.register_irqfd(&vector.fd, gsi, None) {
            Ok(()) => vector.irqfd = Some(gsi),
            Err(error) => crate::guest_warn!(
                "interrupts: device {device:#x}: cannot register the irqfd of vector \
                 {route_vector:#x} on GSI {gsi}: {error}"
            ),
        }
    }
}
