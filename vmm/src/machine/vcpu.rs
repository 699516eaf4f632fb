//! vCPU threads: the KVM_RUN loop, stop coordination and register dumps.
//!
//! Each vCPU runs on its own thread. Exits are translated into plain
//! [`VmExit`]s and handled by [`crate::machine::exit::handle_exit`]. The first vCPU to see a
//! power-off, reset or failure records it in the shared [`VmControl`] and
//! wakes the main thread's event loop; the main thread then stops the others
//! with [`stop_vcpus`]: it sends each vCPU thread a real-time signal whose
//! handler does nothing, which makes a blocked KVM_RUN return EINTR, and the
//! loop sees the stop flag. Kicks repeat until every thread is gone, which
//! covers a signal landing just before a thread enters KVM_RUN (the approach
//! Cloud Hypervisor and Firecracker use, minus `immediate_exit`).

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_ioctls::{VcpuExit, VcpuFd};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::signal::Killable;

use crate::buses::bus::Buses;
use crate::buses::power::PowerSignal;
use crate::machine::exit::{handle_exit, ExitAction, FailReason, VmExit};
use crate::machine::kvm;
use crate::seccomp::ThreadFilters;

/// Why the VM stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopCause {
    /// The guest powered off.
    PowerOff,
    /// The guest rebooted.
    Reset,
    /// A vCPU hit a fatal exit.
    Failed { vcpu: u8, reason: FailReason },
    /// The embedder's timeout expired.
    Timeout,
    /// `barge` received this stop signal (SIGTERM or SIGINT).
    Signal(i32),
    /// The host asked for passed-through device `bdf` back (VFIO's device
    /// request, as when it is unbound from vfio-pci): the guest is stopped
    /// so that barge closes the device and the host's unbind completes.
    DeviceReleaseRequest { bdf: String },
    /// barge itself failed while the VM ran (event loop, thread spawn).
    Error(String),
}

/// State shared by the vCPU threads and the main thread.
#[derive(Debug)]
pub struct VmControl {
    cause: Mutex<Option<StopCause>>,
    stopping: AtomicBool,
    exit_evt: EventFd,
    first_run: OnceLock<Instant>,
}

impl VmControl {
    /// A running VM's control block.
    pub fn new() -> io::Result<Self> {
        Ok(VmControl {
            cause: Mutex::new(None),
            stopping: AtomicBool::new(false),
            exit_evt: EventFd::new(EFD_NONBLOCK)?,
            first_run: OnceLock::new(),
        })
    }

    /// Records `cause` (the first one wins), sets the stop flag and wakes the
    /// event loop.
    pub fn request_stop(&self, cause: StopCause) {
        {
            let mut slot = self.cause.lock().unwrap_or_else(|p| p.into_inner());
            if slot.is_none() {
                *slot = Some(cause);
            }
        }
        self.stopping.store(true, Ordering::SeqCst);
        if let Err(e) = self.exit_evt.write(1) {
            log::warn!("cannot wake the event loop: {e}");
        }
    }

    /// Whether a stop was requested.
    pub fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }

    /// The recorded stop cause.
    pub fn cause(&self) -> Option<StopCause> {
        self.cause.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The EventFd written on every stop request.
    pub fn exit_evt(&self) -> &EventFd {
        &self.exit_evt
    }

    /// When the first KVM_RUN was issued, if any.
    pub fn first_run(&self) -> Option<Instant> {
        self.first_run.get().copied()
    }

    fn mark_first_run(&self) {
        self.first_run.get_or_init(Instant::now);
    }
}

/// Everything a vCPU thread needs besides its fd.
#[derive(Debug, Clone)]
pub struct VcpuContext {
    pub buses: Arc<Buses>,
    /// Power requests from devices.
    pub power: PowerSignal,
    /// Stop coordination.
    pub control: Arc<VmControl>,
    /// The filter each vCPU thread installs before its first KVM_RUN
    /// (none: no seccomp).
    pub seccomp: Option<ThreadFilters>,
}

/// A running vCPU thread.
#[derive(Debug)]
pub struct VcpuThread {
    /// vCPU index.
    pub id: u8,
    handle: JoinHandle<()>,
}

/// Starts vCPU `id` on its own thread.
pub fn spawn_vcpu(id: u8, vcpu: VcpuFd, ctx: VcpuContext) -> io::Result<VcpuThread> {
    kvm::install_kick_handler()?;
    let handle = std::thread::Builder::new()
        .name(format!("vcpu{id}"))
        .spawn(move || run_vcpu(id, vcpu, ctx))?;
    Ok(VcpuThread { id, handle })
}

fn run_vcpu(id: u8, mut vcpu: VcpuFd, ctx: VcpuContext) {
    if let Some(filters) = &ctx.seccomp {
        if let Err(e) = filters.install(&format!("vcpu{id}")) {
            ctx.control
                .request_stop(StopCause::Error(format!("vcpu{id}: {e}")));
            return;
        }
    }
    while !ctx.control.is_stopping() {
        ctx.control.mark_first_run();
        let action = match vcpu.run() {
            Ok(exit) => dispatch(exit, &ctx),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => continue,
            Err(e) => ExitAction::Fail(FailReason::Unexpected(format!("KVM_RUN failed: {e}"))),
        };
        match action {
            ExitAction::Continue => {}
            ExitAction::PowerOff => {
                log::info!("vcpu{id}: guest powered off");
                ctx.control.request_stop(StopCause::PowerOff);
            }
            ExitAction::Reset => {
                log::info!("vcpu{id}: guest reset");
                ctx.control.request_stop(StopCause::Reset);
            }
            ExitAction::Fail(reason) => {
                let details = match reason {
                    FailReason::InternalError => {
                        format!(" ({})", kvm::internal_error_details(&mut vcpu))
                    }
                    _ => String::new(),
                };
                log::error!("vcpu{id}: {reason}{details}");
                log::error!("vcpu{id} registers:\n{}", dump_registers(&vcpu));
                ctx.control
                    .request_stop(StopCause::Failed { vcpu: id, reason });
            }
        }
    }
    log::debug!("vcpu{id}: stopped");
}

/// Translates a KVM exit, handles it, and hands read data back to KVM.
fn dispatch(exit: VcpuExit<'_>, ctx: &VcpuContext) -> ExitAction {
    let handle = |exit: &VmExit<'_>| handle_exit(exit, &ctx.buses, &ctx.power);
    match exit {
        VcpuExit::IoIn(port, data) => {
            let out = handle(&VmExit::IoIn {
                port,
                len: data.len(),
            });
            copy_read_data(data, &out.read_data);
            out.action
        }
        VcpuExit::IoOut(port, data) => handle(&VmExit::IoOut { port, data }).action,
        VcpuExit::MmioRead(addr, data) => {
            let out = handle(&VmExit::MmioRead {
                addr,
                len: data.len(),
            });
            copy_read_data(data, &out.read_data);
            out.action
        }
        VcpuExit::MmioWrite(addr, data) => handle(&VmExit::MmioWrite { addr, data }).action,
        VcpuExit::Hlt => handle(&VmExit::Hlt).action,
        VcpuExit::Shutdown => handle(&VmExit::Shutdown).action,
        VcpuExit::InternalError => handle(&VmExit::InternalError).action,
        VcpuExit::FailEntry(hardware_reason, cpu) => {
            handle(&VmExit::FailEntry {
                hardware_reason,
                cpu,
            })
            .action
        }
        VcpuExit::SystemEvent(kind, _) => handle(&VmExit::SystemEvent { kind }).action,
        // Exits that only mean "come back to userspace for a moment".
        VcpuExit::Intr | VcpuExit::IrqWindowOpen | VcpuExit::IoapicEoi(_) => ExitAction::Continue,
        other => {
            handle(&VmExit::Unexpected {
                what: format!("{other:?}"),
            })
            .action
        }
    }
}

fn copy_read_data(dst: &mut [u8], src: &[u8]) {
    let n = dst.len().min(src.len());
    dst[..n].copy_from_slice(&src[..n]);
}

/// The vCPU's registers, formatted for the log.
#[cfg(target_arch = "aarch64")]
pub fn dump_registers(vcpu: &VcpuFd) -> String {
    use arch::aarch64::regs::{core_reg_id, PC_REG_ID, PSTATE_REG_ID, SP_REG_ID};
    let read = |id: u64| {
        let mut value = [0u8; 8];
        vcpu.get_one_reg(id, &mut value)
            .map(|_| format!("{:#018x}", u64::from_le_bytes(value)))
            .unwrap_or_else(|e| format!("({e})"))
    };
    let mut out = format!(
        "  pc={} sp={} pstate={}\n",
        read(PC_REG_ID),
        read(SP_REG_ID),
        read(PSTATE_REG_ID)
    );
    for row in 0..8u64 {
        let regs: Vec<String> = (row * 4..row * 4 + 4)
            .filter(|n| *n < 31)
            .map(|n| format!("x{n:<2}={}", read(core_reg_id(n * 8))))
            .collect();
        out += &format!("  {}\n", regs.join(" "));
    }
    out.truncate(out.trim_end().len());
    out
}

/// The vCPU's registers, formatted for the log.
#[cfg(target_arch = "x86_64")]
pub fn dump_registers(vcpu: &VcpuFd) -> String {
    let mut out = String::new();
    match vcpu.get_regs() {
        Ok(r) => {
            out += &format!(
                "  rip={:#018x} rsp={:#018x} rbp={:#018x} rflags={:#010x}\n",
                r.rip, r.rsp, r.rbp, r.rflags
            );
            out += &format!(
                "  rax={:#018x} rbx={:#018x} rcx={:#018x} rdx={:#018x}\n",
                r.rax, r.rbx, r.rcx, r.rdx
            );
            out += &format!(
                "  rsi={:#018x} rdi={:#018x} r8 ={:#018x} r9 ={:#018x}\n",
                r.rsi, r.rdi, r.r8, r.r9
            );
            out += &format!(
                "  r10={:#018x} r11={:#018x} r12={:#018x} r13={:#018x}\n",
                r.r10, r.r11, r.r12, r.r13
            );
            out += &format!("  r14={:#018x} r15={:#018x}\n", r.r14, r.r15);
        }
        Err(e) => out += &format!("  (cannot read general registers: {e})\n"),
    }
    match vcpu.get_sregs() {
        Ok(s) => {
            out += &format!(
                "  cr0={:#018x} cr2={:#018x} cr3={:#018x} cr4={:#018x} efer={:#x}\n",
                s.cr0, s.cr2, s.cr3, s.cr4, s.efer
            );
            for (name, seg) in [
                ("cs", &s.cs),
                ("ds", &s.ds),
                ("ss", &s.ss),
                ("es", &s.es),
                ("fs", &s.fs),
                ("gs", &s.gs),
                ("tr", &s.tr),
            ] {
                out += &format!(
                    "  {name}: sel={:#06x} base={:#x} limit={:#x} type={} dpl={} l={} db={} present={}\n",
                    seg.selector, seg.base, seg.limit, seg.type_, seg.dpl, seg.l, seg.db, seg.present
                );
            }
            out += &format!(
                "  gdt: base={:#x} limit={:#x}  idt: base={:#x} limit={:#x}",
                s.gdt.base, s.gdt.limit, s.idt.base, s.idt.limit
            );
        }
        Err(e) => out += &format!("  (cannot read special registers: {e})"),
    }
    out
}

/// Stops every vCPU thread: sets the stop flag (if not set), kicks each
/// thread out of KVM_RUN until it ends, and joins it. Threads still running
/// after `timeout` are left behind (logged, each by its id); the process exit
/// ends them.
///
/// Returns whether every thread stopped. `false` means a vCPU may still be
/// inside KVM_RUN, touching the VM, guest RAM and the devices' BARs: the
/// caller must then keep all of them alive (see `BuiltVm::run`).
pub fn stop_vcpus(threads: Vec<VcpuThread>, control: &VmControl, timeout: Duration) -> bool {
    if !control.is_stopping() {
        control.request_stop(StopCause::Error("vCPUs stopped without a cause".into()));
    }
    let deadline = Instant::now() + timeout;
    let signal = kvm::kick_signal();
    let mut pending = threads;
    loop {
        let (finished, running): (Vec<_>, Vec<_>) =
            pending.into_iter().partition(|t| t.handle.is_finished());
        for thread in finished {
            if thread.handle.join().is_err() {
                log::error!("vcpu{} thread panicked", thread.id);
            }
        }
        if running.is_empty() {
            return true;
        }
        if Instant::now() >= deadline {
            for thread in &running {
                log::error!(
                    "vcpu{} did not stop within {timeout:?}; leaving it",
                    thread.id
                );
            }
            return false;
        }
        for thread in &running {
            // The thread has not been joined, so its pthread handle is valid.
            if let Err(e) = thread.handle.kill(signal) {
                log::debug!("kicking vcpu{}: {e}", thread.id);
            }
        }
        std::thread::sleep(Duration::from_millis(1));
        pending = running;
    }
}

/// A stand-in for a vCPU thread that never stops, for tests without KVM.
#[cfg(test)]
pub(crate) mod stuck {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    use super::VcpuThread;

    /// Lets the stuck thread end when dropped, so a test leaves no thread
    /// spinning behind it even when it fails.
    #[derive(Debug)]
    pub(crate) struct Release(Arc<AtomicBool>);

    impl Drop for Release {
        fn drop(&mut self) {
            self.0.store(true, Ordering::SeqCst);
        }
    }

    /// A [`VcpuThread`] whose thread ignores the stop flag and every kick
    /// (the kick interrupts its sleep, which it simply resumes) until the
    /// returned [`Release`] is dropped: what a vCPU stuck in the kernel
    /// looks like to [`super::stop_vcpus`].
    pub(crate) fn thread(id: u8) -> (VcpuThread, Release) {
        let released = Arc::new(AtomicBool::new(false));
        let flag = released.clone();
        let handle = std::thread::spawn(move || {
            while !flag.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(1));
            }
        });
        (VcpuThread { id, handle }, Release(released))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_stop_cause_wins_and_wakes_the_loop() {
        let control = VmControl::new().unwrap();
        assert!(!control.is_stopping());
        control.request_stop(StopCause::PowerOff);
        control.request_stop(StopCause::Reset);
        assert!(control.is_stopping());
        assert_eq!(control.cause(), Some(StopCause::PowerOff));
        assert_eq!(control.exit_evt().read().unwrap(), 2);
    }

    fn context() -> VcpuContext {
        VcpuContext {
            buses: Arc::new(Buses::default()),
            power: PowerSignal::new().unwrap(),
            control: Arc::new(VmControl::new().unwrap()),
            seccomp: None,
        }
    }

    #[test]
    fn dispatch_hands_read_data_back_to_kvm() {
        let ctx = context();
        let mut data = [0u8; 2];
        let action = dispatch(VcpuExit::IoIn(0x80, &mut data), &ctx);
        assert_eq!(action, ExitAction::Continue);
        assert_eq!(data, [0xff, 0xff]);
        let mut data = [0u8; 4];
        dispatch(VcpuExit::MmioRead(0xd000_0000, &mut data), &ctx);
        assert_eq!(data, [0xff; 4]);
    }

    #[test]
    fn dispatch_maps_fatal_and_benign_exits() {
        let ctx = context();
        assert_eq!(
            dispatch(VcpuExit::Shutdown, &ctx),
            ExitAction::Fail(FailReason::TripleFault)
        );
        assert_eq!(dispatch(VcpuExit::Intr, &ctx), ExitAction::Continue);
        assert!(matches!(
            dispatch(VcpuExit::Exception, &ctx),
            ExitAction::Fail(FailReason::Unexpected(_))
        ));
    }

    #[test]
    fn stop_vcpus_kicks_threads_blocked_in_a_syscall() {
        // A stand-in for a vCPU blocked in KVM_RUN: a thread sleeping until
        // the kick signal interrupts it and it sees the stop flag.
        kvm::install_kick_handler().unwrap();
        let control = Arc::new(VmControl::new().unwrap());
        let c = control.clone();
        let handle = std::thread::spawn(move || {
            while !c.is_stopping() {
                std::thread::sleep(Duration::from_millis(5));
            }
        });
        control.request_stop(StopCause::PowerOff);
        let start = Instant::now();
        let all_stopped = stop_vcpus(
            vec![VcpuThread { id: 0, handle }],
            &control,
            Duration::from_secs(5),
        );
        assert!(all_stopped, "the thread saw the stop flag and ended");
        assert!(start.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn stop_vcpus_reports_a_thread_still_running_at_the_deadline() {
        kvm::install_kick_handler().unwrap();
        let control = VmControl::new().unwrap();
        control.request_stop(StopCause::PowerOff);
        // vcpu0 is released at once and ends; vcpu1 never is.
        let (stopping, release_stopping) = stuck::thread(0);
        drop(release_stopping);
        let (stuck, _release) = stuck::thread(1);
        let timeout = Duration::from_millis(50);
        let start = Instant::now();
        let all_stopped = stop_vcpus(vec![stopping, stuck], &control, timeout);
        assert!(!all_stopped, "vcpu1 ignored every kick and still runs");
        assert!(start.elapsed() >= timeout);
    }
}
