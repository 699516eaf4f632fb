//! A device's BARs mapped for peer-to-peer DMA on a thread of their own
//! (`p2p=background`), so that a slow map is not on the way to the first
//! KVM_RUN.
//!
//! Linux's type1 IOMMU driver before 6.15 resolves a BAR's PFNMAP memory
//! 4 KiB at a time when it maps it (about 3.5 s per 8 GiB in the lab), and
//! it holds the container's lock for the whole map, so maps of several
//! devices cannot run side by side: they can only run while the guest
//! boots. The guest RAM map is not deferred (a device may DMA into RAM as
//! soon as the guest enables it); the BAR maps are. Until a BAR's map is
//! done, a peer's DMA into it faults in the IOMMU (the device sees an
//! error, the host logs a DMAR or AMD-Vi fault); CPU access through the
//! BAR's memslots works from the start.
//!
//! The thread maps the BARs one after the other and stops between two
//! when the device is torn down; [`BackgroundP2p`]'s drop waits for it, and
//! the maps it made are undone after that, before the BAR mmaps go. Each
//! BAR's outcome is left in a [`P2pSlot`] that the report reads after the
//! run.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

use devices::vfio::host::VfioHostAccess;
use devices::virtio::worker::ThreadInit;

use super::dma::BarDma;
use super::{map_bar_for_p2p, p2p_refused_warning};
use crate::machine::mapping::AlignedMapping;
use crate::pci_devices::bar_mapping::{MappedArea, P2pOutcome, P2pSlot};
use crate::report::BarReport;

/// One BAR to map: its index, its host mapping and its mmap-able areas.
pub struct P2pJob {
    /// The BAR's index.
    pub bar: u8,
    /// The BAR's host mapping (kept mapped while the thread uses it).
    pub mapping: Arc<AlignedMapping>,
    /// Its areas, mapped at IOVA = GPA.
    pub areas: Vec<MappedArea>,
    /// Where its outcome goes.
    pub slot: P2pSlot,
}

/// The thread mapping a device's BARs, and the maps it made.
pub struct BackgroundP2p<H: VfioHostAccess> {
    bdf: String,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    /// Dropped (unmapped) after the thread has ended.
    mapped: Arc<Mutex<Vec<BarDma<H>>>>,
}

impl<H: VfioHostAccess + 'static> BackgroundP2p<H> {
    /// Starts a thread that maps each of `jobs` of device `bdf` into
    /// `domain`, first running `init` (the seccomp filter) when given.
    pub fn spawn(
        bdf: &str,
        domain: Arc<H>,
        device: Arc<H::Device>,
        jobs: Vec<P2pJob>,
        init: Option<ThreadInit>,
    ) -> std::io::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let mapped = Arc::new(Mutex::new(Vec::new()));
        let name = format!("p2p-{bdf}");
        let thread = {
            let (bdf, stop, mapped) = (bdf.to_string(), Arc::clone(&stop), Arc::clone(&mapped));
            std::thread::Builder::new()
                .name(name.clone())
                .spawn(move || {
                    if let Some(init) = init {
                        init(&name);
                    }
                    map_jobs(&bdf, &domain, &device, jobs, &stop, &mapped);
                })?
        };
        Ok(Self {
            bdf: bdf.to_string(),
            stop,
            thread: Some(thread),
            mapped,
        })
    }
}

/// Maps `jobs` one after the other until `stop` is set.
fn map_jobs<H: VfioHostAccess>(
    bdf: &str,
    domain: &Arc<H>,
    device: &Arc<H::Device>,
    jobs: Vec<P2pJob>,
    stop: &AtomicBool,
    mapped: &Mutex<Vec<BarDma<H>>>,
) {
    for job in jobs {
        if stop.load(Ordering::Acquire) {
            log::info!(
                "vfio: {bdf}: the VM stopped before BAR {} was mapped for peer-to-peer DMA",
                job.bar
            );
            continue;
        }
        let outcome = match map_bar_for_p2p(domain, device, job.bar, &job.mapping, &job.areas) {
            Ok((dmas, report)) => {
                log::info!(
                    "vfio: {bdf}: BAR {} mapped for peer-to-peer DMA in the background ({}): {} \
                     bytes in {:.3} ms",
                    job.bar,
                    report.method,
                    report.bytes,
                    report.ms
                );
                mapped
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .extend(dmas);
                P2pOutcome::Mapped {
                    report,
                    done: Instant::now(),
                }
            }
            Err(error) => {
                let warning = p2p_refused_warning(bdf, job.bar, &error);
                eprintln!("barge: warning: {warning}");
                P2pOutcome::Refused { warning }
            }
        };
        // Each slot is set once, by this thread only.
        let _ = job.slot.set(outcome);
    }
}

impl<H: VfioHostAccess> Drop for BackgroundP2p<H> {
    /// Stops the thread after the BAR it is mapping, waits for it, then
    /// undoes its maps.
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(thread) = self.thread.take() {
            if !thread.is_finished() {
                log::info!(
                    "vfio: {}: waiting for the peer-to-peer map of the BAR in progress",
                    self.bdf
                );
            }
            if thread.join().is_err() {
                log::error!("vfio: {}: the peer-to-peer map thread panicked", self.bdf);
            }
        }
        self.mapped
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    }
}

/// Puts what became of a BAR's background map (`slot`) into its `report`:
/// the mapping with `ready_after_first_run_ms` (from `first_run`, the
/// first KVM_RUN; negative when done before it), the refusal's warning, or
/// a warning that the VM stopped first.
pub fn report_outcome(
    report: &mut BarReport,
    bdf: &str,
    slot: &P2pSlot,
    first_run: Option<Instant>,
) {
    let warning = match slot.get() {
        Some(P2pOutcome::Mapped { report: p2p, done }) => {
            let mut p2p = p2p.clone();
            p2p.ready_after_first_run_ms = first_run.map(|first| signed_ms(*done, first));
            report.p2p = Some(p2p);
            return;
        }
        Some(P2pOutcome::Refused { warning }) => warning.clone(),
        None => format!(
            "BAR {} of {bdf} was not yet mapped for peer-to-peer DMA (p2p=background) when the \
             VM stopped",
            report.index
        ),
    };
    report.warning = Some(match report.warning.take() {
        Some(earlier) => format!("{earlier}; {warning}"),
        None => warning,
    });
}

/// `at - origin` in milliseconds, negative when `at` came first.
fn signed_ms(at: Instant, origin: Instant) -> f64 {
    match at.checked_duration_since(origin) {
        Some(after) => after.as_secs_f64() * 1000.0,
        None => -(origin.duration_since(at).as_secs_f64() * 1000.0),
    }
}
