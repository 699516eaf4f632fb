//! A [`KvmIrqs`] for tests: [`FakeKvmIrqs`] records the GSI routes and irqfds
//! it is given, and "injects" by draining the registered eventfds on
//! [`FakeKvmIrqs::deliveries`]. It can also be told to refuse
//! `KVM_SET_GSI_ROUTING` ([`FakeKvmIrqs::fail_routing`]).
//!
//! Compiled for this crate's tests and, with the `fake` feature, for other
//! crates' tests (the fuzz targets). It never touches /dev/kvm.

#![cfg(any(test, feature = "fake"))]

use std::collections::BTreeMap;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::Mutex;

use resources::gsi::Route;
use vmm_sys_util::eventfd::EventFd;

use super::KvmIrqs;

/// One registered irqfd.
#[derive(Debug)]
struct Irqfd {
    fd: EventFd,
    resample: bool,
}

#[derive(Debug, Default)]
struct State {
    routes: Vec<Route>,
    routing_calls: usize,
    /// (gsi, raw fd) -> irqfd: GSI first, so listings come out in GSI
    /// order whatever fd numbers the tests running beside have taken.
    irqfds: BTreeMap<(u32, i32), Irqfd>,
    fail_routing: bool,
}

/// The fake (see module docs).
#[derive(Debug, Default)]
pub struct FakeKvmIrqs {
    state: Mutex<State>,
}

impl FakeKvmIrqs {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The last routes set.
    pub fn routes(&self) -> Vec<Route> {
        self.lock().routes.clone()
    }

    /// How many times routes were set.
    pub fn routing_calls(&self) -> usize {
        self.lock().routing_calls
    }

    /// GSIs with a registered irqfd, and whether it resamples, in GSI order.
    pub fn irqfd_gsis(&self) -> Vec<(u32, bool)> {
        self.lock()
            .irqfds
            .iter()
            .map(|((gsi, _), irqfd)| (*gsi, irqfd.resample))
            .collect()
    }

    /// What KVM would inject now: every registered irqfd's GSI whose
    /// eventfd has a count (drained), in GSI order.
    pub fn deliveries(&self) -> Vec<u32> {
        self.lock()
            .irqfds
            .iter()
            .filter(|(_, irqfd)| irqfd.fd.read().is_ok_and(|count| count > 0))
            .map(|((gsi, _), _)| *gsi)
            .collect()
    }

    /// Makes `KVM_SET_GSI_ROUTING` fail from now on.
    pub fn fail_routing(&self) {
        self.lock().fail_routing = true;
    }
}

impl KvmIrqs for FakeKvmIrqs {
    fn set_gsi_routing(&self, routes: &[Route]) -> io::Result<()> {
        let mut state = self.lock();
        if state.fail_routing {
            return Err(io::Error::from_raw_os_error(22));
        }
        state.routes = routes.to_vec();
        state.routing_calls += 1;
        Ok(())
    }

    fn register_irqfd(&self, fd: &EventFd, gsi: u32, resample: Option<&EventFd>) -> io::Result<()> {
        let mut state = self.lock();
        let key = (gsi, fd.as_raw_fd());
        if state.irqfds.contains_key(&key) {
            return Err(io::Error::from_raw_os_error(16));
        }
        state.irqfds.insert(
            key,
            Irqfd {
                fd: fd.try_clone()?,
                resample: resample.is_some(),
            },
        );
        Ok(())
    }

    fn unregister_irqfd(&self, fd: &EventFd, gsi: u32) -> io::Result<()> {
        self.lock()
            .irqfds
            .remove(&(gsi, fd.as_raw_fd()))
            .map(|_| ())
            .ok_or_else(|| io::Error::from_raw_os_error(2))
    }
}
