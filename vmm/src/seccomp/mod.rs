//! seccomp filters per thread kind, in the manner of Firecracker: each vCPU
//! thread installs the vCPU filter before its first `KVM_RUN`, and the
//! thread that runs the event loop (barge's main thread) installs the VMM
//! filter once the vCPUs are running. Both are allow-lists; a system call
//! outside them raises SIGSYS, whose handler ([`trap`]) prints which thread
//! made which call and ends barge with [`crate::status::SECCOMP`] (159,
//! 128 + SIGSYS, what a shell reports for a process SIGSYS killed).
//!
//! What the filters allow:
//! - **vCPU threads** (the code a guest drives: port/MMIO exits, config
//!   space, MSI-X tables): reads and writes on open fds, `ioctl` only with
//!   KVM (type 0xAE) and VFIO/iommufd (type `;`) request codes, futexes,
//!   memory management for the allocator, signal return and masks, thread
//!   exit. No `open`, no new threads or processes, no sockets.
//! - **the VMM thread**: all of the vCPU list plus what the event loop,
//!   teardown, the report and a rebuild (`--on-reboot restart`, `barge
//!   bench`'s several VMs) need: opening files, epoll, eventfds, new
//!   *threads* (`clone` with `CLONE_THREAD`; `clone3` gets ENOSYS so the C
//!   library falls back to `clone`, whose flags the filter can check) and
//!   terminal ioctls for the raw-mode console. No `execve`, no `fork`, no
//!   sockets, no `ptrace`, no module loading or mounting. It also opens
//!   the devices of a rebuilt VM: the disk image lock (`flock`) and the tap
//!   (`ioctl` TUNSETIFF, TUNSETVNETHDRSZ, TUNSETOFFLOAD, TUNGETIFF).
//! - **virtio worker threads** (block I/O and tap RX/TX, started with the
//!   device, before the guest runs): the vCPU list without ioctls, plus
//!   epoll on their kicks and tap, `preadv`/`pwritev` on the image,
//!   `fdatasync` for a flush request and `fallocate` for discard and
//!   write-zeroes. No `open`, no ioctl, no sockets, no threads.
//!
//! Filters cannot be removed from a thread. An embedder calling
//! [`crate::Vm::run`] gets the VMM filter on the calling thread for that
//! thread's life: run the VM on a thread of its own when that thread must
//! do other things later, or set [`SeccompMode::Off`].
//!
//! `BARGE_SECCOMP_PROBE=vcpu` (or `vmm`) makes that thread call `socket()`
//! right after installing its filter: a check, in a real run, that the
//! filter is in force (the lab's seccomp test uses it).

mod names;
pub mod trap;

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};
use serde::{Deserialize, Serialize};

pub use names::syscall_name;

/// Whether barge confines its threads with seccomp.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SeccompMode {
    /// Filters installed; a forbidden system call ends barge (the default).
    #[default]
    On,
    /// Filters installed, but a forbidden system call is only logged by the
    /// kernel (audit, `type=1326`) and allowed: for finding what a new code
    /// path needs.
    Log,
    /// No filters.
    Off,
}

impl fmt::Display for SeccompMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SeccompMode::On => "on",
            SeccompMode::Log => "log",
            SeccompMode::Off => "off",
        })
    }
}

impl FromStr for SeccompMode {
    type Err = SeccompError;

    fn from_str(text: &str) -> Result<Self, SeccompError> {
        match text {
            "on" | "true" => Ok(SeccompMode::On),
            "log" => Ok(SeccompMode::Log),
            "off" | "false" => Ok(SeccompMode::Off),
            _ => Err(SeccompError::InvalidMode(text.to_string())),
        }
    }
}

/// The kinds of thread that get their own filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThreadKind {
    /// The thread running the event loop, teardown and the report.
    Vmm,
    /// A vCPU thread.
    Vcpu,
    /// A virtio device's worker thread (block I/O, tap RX/TX).
    Virtio,
}

impl ThreadKind {
    /// The name used in messages and in `BARGE_SECCOMP_PROBE`.
    pub fn name(self) -> &'static str {
        match self {
            ThreadKind::Vmm => "vmm",
            ThreadKind::Vcpu => "vcpu",
            ThreadKind::Virtio => "virtio",
        }
    }
}

/// Errors building or installing a filter.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// `--seccomp` with an unknown value.
    #[error("invalid seccomp mode {0:?}: use on, off or log")]
    InvalidMode(String),
    /// seccompiler rejected the rules (a bug in barge's rule table).
    #[error(
        "cannot build the {kind} seccomp filter: {source}; run with --seccomp off and report this"
    )]
    Build {
        kind: &'static str,
        source: seccompiler::BackendError,
    },
    /// The kernel refused the filter (no seccomp support, or too many
    /// filters stacked).
    #[error("cannot install the {kind} seccomp filter: {source}; the kernel needs CONFIG_SECCOMP_FILTER, or run with --seccomp off")]
    Install {
        kind: &'static str,
        source: seccompiler::Error,
    },
    /// The SIGSYS handler could not be installed.
    #[error("cannot install the SIGSYS handler: {0}; run with --seccomp off")]
    Handler(std::io::Error),
}

/// The compiled filters for one thread kind: the allow-list, and for the
/// VMM thread a second filter turning `clone3` into ENOSYS.
#[derive(Debug, Clone)]
pub struct ThreadFilters {
    kind: ThreadKind,
    programs: Vec<BpfProgram>,
}

/// `_IOC_TYPE` of KVM's ioctls (`KVMIO`).
const KVM_IOCTL_TYPE: u64 = 0xAE;
/// `_IOC_TYPE` of VFIO's and iommufd's ioctls (`VFIO_TYPE`, `IOMMUFD_TYPE`).
const VFIO_IOCTL_TYPE: u64 = b';' as u64;

fn condition(arg: u8, op: SeccompCmpOp, value: u64) -> Result<SeccompCondition, SeccompError> {
    SeccompCondition::new(arg, SeccompCmpArgLen::Dword, op, value).map_err(|source| {
        SeccompError::Build {
            kind: "any",
            source,
        }
    })
}

fn rule(conditions: Vec<SeccompCondition>) -> Result<SeccompRule, SeccompError> {
    SeccompRule::new(conditions).map_err(|source| SeccompError::Build {
        kind: "any",
        source,
    })
}

/// The call allowed when argument `arg` equals one of `values`.
fn arg_in(arg: u8, values: &[u64]) -> Result<Vec<SeccompRule>, SeccompError> {
    values
        .iter()
        .map(|value| rule(vec![condition(arg, SeccompCmpOp::Eq, *value)?]))
        .collect()
}

/// ioctl allowed when its request's type byte is one of `types`, or it is
/// one of `requests`.
fn ioctl_rules(types: &[u64], requests: &[u64]) -> Result<Vec<SeccompRule>, SeccompError> {
    let mut rules = types
        .iter()
        .map(|t| rule(vec![condition(1, SeccompCmpOp::MaskedEq(0xff00), t << 8)?]))
        .collect::<Result<Vec<_>, _>>()?;
    rules.extend(arg_in(1, requests)?);
    Ok(rules)
}

/// System calls every barge thread may make (the vCPU list).
const VCPU_SYSCALLS: &[i64] = &[
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_readv,
    libc::SYS_writev,
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_close,
    libc::SYS_futex,
    libc::SYS_sched_yield,
    libc::SYS_nanosleep,
    libc::SYS_clock_nanosleep,
    libc::SYS_clock_gettime,
    libc::SYS_gettimeofday,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mprotect,
    libc::SYS_madvise,
    libc::SYS_mremap,
    libc::SYS_brk,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigreturn,
    libc::SYS_sigaltstack,
    libc::SYS_getpid,
    libc::SYS_gettid,
    libc::SYS_tgkill,
    libc::SYS_getrandom,
    libc::SYS_eventfd2,
    libc::SYS_exit,
    libc::SYS_exit_group,
];

/// What the VMM thread may do besides the vCPU list.
const VMM_EXTRA_SYSCALLS: &[i64] = &[
    libc::SYS_openat,
    libc::SYS_lseek,
    libc::SYS_fstat,
    libc::SYS_newfstatat,
    libc::SYS_statx,
    libc::SYS_fstatfs,
    libc::SYS_statfs,
    libc::SYS_fcntl,
    libc::SYS_dup,
    libc::SYS_dup3,
    libc::SYS_pipe2,
    libc::SYS_getdents64,
    #[cfg(target_arch = "x86_64")]
    libc::SYS_readlink,
    libc::SYS_readlinkat,
    #[cfg(target_arch = "x86_64")]
    libc::SYS_access,
    libc::SYS_faccessat2,
    libc::SYS_getcwd,
    #[cfg(target_arch = "x86_64")]
    libc::SYS_unlink,
    libc::SYS_unlinkat,
    #[cfg(target_arch = "x86_64")]
    libc::SYS_rename,
    libc::SYS_renameat2,
    #[cfg(target_arch = "x86_64")]
    libc::SYS_mkdir,
    libc::SYS_mkdirat,
    libc::SYS_fsync,
    libc::SYS_fdatasync,
    libc::SYS_ftruncate,
    libc::SYS_fallocate,
    libc::SYS_memfd_create,
    libc::SYS_epoll_create1,
    libc::SYS_epoll_ctl,
    #[cfg(target_arch = "x86_64")]
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    #[cfg(target_arch = "x86_64")]
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_timerfd_create,
    libc::SYS_timerfd_settime,
    libc::SYS_rt_sigaction,
    libc::SYS_set_robust_list,
    libc::SYS_rseq,
    libc::SYS_prctl,
    libc::SYS_sched_getaffinity,
    libc::SYS_prlimit64,
    libc::SYS_getrlimit,
    libc::SYS_getuid,
    libc::SYS_geteuid,
    libc::SYS_getgid,
    libc::SYS_getegid,
    libc::SYS_uname,
    libc::SYS_sysinfo,
    libc::SYS_mlock,
    libc::SYS_munlock,
    libc::SYS_mbind,
    libc::SYS_clone3,
    libc::SYS_flock,
    libc::SYS_preadv,
    libc::SYS_pwritev,
    libc::SYS_preadv2,
    libc::SYS_pwritev2,
];

/// The tap ioctls the VMM thread uses to open a rebuilt VM's `--net` tap
/// (`_IOW('T', 202, int)` and friends from linux/if_tun.h).
const TUN_IOCTLS: &[u64] = &[
    0x4004_54ca, // TUNSETIFF
    0x8004_54d2, // TUNGETIFF
    0x4004_54d8, // TUNSETVNETHDRSZ
    0x4004_54d0, // TUNSETOFFLOAD
];

/// What a virtio worker thread may do besides the vCPU list (which has
/// read, write, readv, writev, pread64, pwrite64, futex, memory management
/// and eventfds): wait in epoll on its kicks and tap, vectored positional
/// I/O on the image (preadv, pwritev), flush it (fdatasync, for
/// VIRTIO_BLK_T_FLUSH), punch holes or zero ranges (fallocate, for DISCARD
/// and WRITE_ZEROES). No ioctl at all: the tap is configured before the
/// thread's filter is in force.
const VIRTIO_EXTRA_SYSCALLS: &[i64] = &[
    #[cfg(target_arch = "x86_64")]
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_epoll_ctl,
    libc::SYS_preadv,
    libc::SYS_pwritev,
    libc::SYS_preadv2,
    libc::SYS_pwritev2,
    libc::SYS_fdatasync,
    libc::SYS_fsync,
    libc::SYS_fallocate,
];

/// Terminal ioctls the VMM thread uses for the raw-mode console.
const TERMINAL_IOCTLS: &[u64] = &[
    libc::TCGETS,
    libc::TCSETS,
    libc::TCSETSW,
    libc::TCSETSF,
    libc::TIOCGWINSZ,
    libc::FIONBIO,
    libc::FIOCLEX,
];

fn allow_list(kind: ThreadKind) -> Result<BTreeMap<i64, Vec<SeccompRule>>, SeccompError> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    for &call in VCPU_SYSCALLS {
        rules.insert(call, Vec::new());
    }
    let device_types = [KVM_IOCTL_TYPE, VFIO_IOCTL_TYPE];
    match kind {
        ThreadKind::Vcpu => {
            rules.insert(libc::SYS_ioctl, ioctl_rules(&device_types, &[])?);
            // The standard library checks that an fd it wraps is open
            // (F_GETFD, in debug builds); reading flags changes nothing.
            rules.insert(
                libc::SYS_fcntl,
                arg_in(1, &[libc::F_GETFD as u64, libc::F_GETFL as u64])?,
            );
        }
        ThreadKind::Virtio => {
            for &call in VIRTIO_EXTRA_SYSCALLS {
                rules.insert(call, Vec::new());
            }
            rules.insert(
                libc::SYS_fcntl,
                arg_in(1, &[libc::F_GETFD as u64, libc::F_GETFL as u64])?,
            );
        }
        ThreadKind::Vmm => {
            for &call in VMM_EXTRA_SYSCALLS {
                rules.insert(call, Vec::new());
            }
            rules.insert(
                libc::SYS_ioctl,
                ioctl_rules(&device_types, &[TERMINAL_IOCTLS, TUN_IOCTLS].concat())?,
            );
            // A vCPU thread this thread spawns (a restart, `barge bench`'s
            // next VM) inherits this filter and must add its own on top:
            // seccomp(SECCOMP_SET_MODE_FILTER) only ever narrows.
            rules.insert(
                libc::SYS_seccomp,
                arg_in(0, &[u64::from(libc::SECCOMP_SET_MODE_FILTER)])?,
            );
            // Threads, never processes: fork() and vfork() are clone()
            // without CLONE_THREAD.
            let thread = libc::CLONE_THREAD as u64;
            rules.insert(
                libc::SYS_clone,
                vec![rule(vec![condition(
                    0,
                    SeccompCmpOp::MaskedEq(thread),
                    thread,
                )?])?],
            );
        }
    }
    Ok(rules)
}

impl ThreadFilters {
    /// Compiles `kind`'s filters. `mode` must not be [`SeccompMode::Off`]
    /// (nothing to compile); with [`SeccompMode::Log`] a forbidden call is
    /// logged and allowed instead of trapped.
    pub fn compile(kind: ThreadKind, mode: SeccompMode) -> Result<Self, SeccompError> {
        let mismatch = match mode {
            SeccompMode::Log => SeccompAction::Log,
            SeccompMode::On | SeccompMode::Off => SeccompAction::Trap,
        };
        Self::compile_with(kind, mismatch)
    }

    /// Compiles `kind`'s filters with `mismatch` as the action for a call
    /// outside the list.
    fn compile_with(kind: ThreadKind, mismatch: SeccompAction) -> Result<Self, SeccompError> {
        let build = |source| SeccompError::Build {
            kind: kind.name(),
            source,
        };
        #[cfg(target_arch = "x86_64")]
        let arch = TargetArch::x86_64;
        #[cfg(target_arch = "aarch64")]
        let arch = TargetArch::aarch64;
        let mut programs = Vec::new();
        if kind == ThreadKind::Vmm {
            // clone3 passes its flags in memory, out of a filter's reach:
            // ENOSYS makes the C library use clone, checked in the
            // allow-list. Installed first: the allow-list, once in force,
            // lets the thread add filters but this order needs no such
            // permission. The kernel runs every filter and takes the
            // strictest answer, so ENOSYS wins over the list's Allow.
            let clone3 = SeccompFilter::new(
                [(libc::SYS_clone3, Vec::new())].into_iter().collect(),
                SeccompAction::Allow,
                SeccompAction::Errno(libc::ENOSYS as u32),
                arch,
            )
            .map_err(build)?;
            programs.push(BpfProgram::try_from(clone3).map_err(build)?);
        }
        let allow = SeccompFilter::new(allow_list(kind)?, mismatch, SeccompAction::Allow, arch)
            .map_err(build)?;
        programs.push(BpfProgram::try_from(allow).map_err(build)?);
        Ok(ThreadFilters { kind, programs })
    }

    /// Installs the filters on the calling thread, labelled `label` in the
    /// SIGSYS message (e.g. "vcpu0"). A thread that already has `kind`'s
    /// filters (a second VM run on it) keeps them and gets no second copy.
    pub fn install(&self, label: &str) -> Result<(), SeccompError> {
        trap::install_handler().map_err(SeccompError::Handler)?;
        if !trap::mark_thread(self.kind, label) {
            return Ok(());
        }
        for program in &self.programs {
            seccompiler::apply_filter(program).map_err(|source| SeccompError::Install {
                kind: self.kind.name(),
                source,
            })?;
        }
        log::debug!(
            "seccomp: {label} runs under the {} filter",
            self.kind.name()
        );
        if probe_requested(self.kind) {
            trap::probe();
        }
        Ok(())
    }
}

impl ThreadFilters {
    /// What a thread runs first to take these filters: installs them,
    /// labelled with the thread's name; a refusal is logged and the thread
    /// runs unconfined.
    fn thread_init(&self) -> devices::virtio::worker::ThreadInit {
        let filters = self.clone();
        std::sync::Arc::new(move |name: &str| {
            if let Err(error) = filters.install(name) {
                log::error!("{name}: {error}");
            }
        })
    }
}

/// Whether `BARGE_SECCOMP_PROBE` names `kind`.
fn probe_requested(kind: ThreadKind) -> bool {
    std::env::var("BARGE_SECCOMP_PROBE").is_ok_and(|value| value == kind.name())
}

/// The filters `mode` asks for, compiled for the VMM thread and the vCPU
/// threads; `None` with [`SeccompMode::Off`].
#[derive(Debug, Clone)]
pub struct VmFilters {
    /// For the thread running the event loop.
    pub vmm: ThreadFilters,
    /// For each vCPU thread.
    pub vcpu: ThreadFilters,
    /// For each virtio worker thread.
    pub virtio: ThreadFilters,
}

impl VmFilters {
    /// What a virtio worker thread runs first: installs the virtio filter,
    /// labelled with the thread's name. A filter the kernel refuses is
    /// logged; the thread then runs unconfined (the VMM and vCPU threads
    /// would have failed to install theirs too, and stopped the VM).
    pub fn virtio_worker_init(&self) -> devices::virtio::worker::ThreadInit {
        self.virtio.thread_init()
    }

    /// What a thread the VMM thread starts for the boot's own work (a
    /// device's background peer-to-peer map) runs first: installs the
    /// VMM filter, labelled with the thread's name; a refusal is logged as
    /// for [`VmFilters::virtio_worker_init`].
    pub fn vmm_thread_init(&self) -> devices::virtio::worker::ThreadInit {
        self.vmm.thread_init()
    }

    /// Compiles both kinds, or returns `None` when `mode` is off.
    pub fn compile(mode: SeccompMode) -> Result<Option<Self>, SeccompError> {
        if mode == SeccompMode::Off {
            return Ok(None);
        }
        Ok(Some(VmFilters {
            vmm: ThreadFilters::compile(ThreadKind::Vmm, mode)?,
            vcpu: ThreadFilters::compile(ThreadKind::Vcpu, mode)?,
            virtio: ThreadFilters::compile(ThreadKind::Virtio, mode)?,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_parse_and_print() {
        for (text, mode) in [
            ("on", SeccompMode::On),
            ("off", SeccompMode::Off),
            ("log", SeccompMode::Log),
        ] {
            assert_eq!(text.parse::<SeccompMode>().unwrap(), mode);
            assert_eq!(mode.to_string(), text);
        }
        let err = "strict".parse::<SeccompMode>().unwrap_err().to_string();
        assert_eq!(err, "invalid seccomp mode \"strict\": use on, off or log");
        assert_eq!(SeccompMode::default(), SeccompMode::On);
    }

    #[test]
    fn both_kinds_compile_and_off_compiles_nothing() {
        let filters = VmFilters::compile(SeccompMode::On).unwrap().unwrap();
        assert_eq!(filters.vmm.programs.len(), 2);
        assert_eq!(filters.vcpu.programs.len(), 1);
        assert!(VmFilters::compile(SeccompMode::Off).unwrap().is_none());
    }

    #[test]
    fn the_vcpu_list_is_inside_the_vmm_list() {
        // A vCPU thread spawned by a filtered VMM thread (a restart) runs
        // under both; its own list must not need anything the VMM's lacks.
        let vmm = allow_list(ThreadKind::Vmm).unwrap();
        for call in allow_list(ThreadKind::Vcpu).unwrap().keys() {
            assert!(vmm.contains_key(call), "{} missing", syscall_name(*call));
        }
        for forbidden in [
            libc::SYS_execve,
            libc::SYS_socket,
            libc::SYS_ptrace,
            libc::SYS_fork,
        ] {
            assert!(!vmm.contains_key(&forbidden));
        }
        assert!(!allow_list(ThreadKind::Vcpu)
            .unwrap()
            .contains_key(&libc::SYS_openat));
    }

    /// Runs `body` on a fresh thread with `kind`'s filters in `Errno` mode
    /// (forbidden calls fail with EPERM instead of trapping), so the test
    /// process survives, and returns what `body` returned.
    fn under_filter<T: Send + 'static>(
        kind: ThreadKind,
        body: impl FnOnce() -> T + Send + 'static,
    ) -> T {
        std::thread::spawn(move || {
            let filters =
                ThreadFilters::compile_with(kind, SeccompAction::Errno(libc::EPERM as u32))
                    .unwrap();
            for program in &filters.programs {
                seccompiler::apply_filter(program).unwrap();
            }
            body()
        })
        .join()
        .unwrap()
    }

    fn errno_of(ret: libc::c_long) -> i32 {
        if ret < 0 {
            std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
        } else {
            0
        }
    }

    #[test]
    fn vcpu_filter_refuses_open_socket_and_foreign_ioctls() {
        let (open, socket, tiocsti, getpid) = under_filter(ThreadKind::Vcpu, || {
            // SAFETY: raw syscalls with valid arguments; results only
            // checked for errors, fds closed below when created.
            unsafe {
                let open = libc::syscall(
                    libc::SYS_openat,
                    libc::AT_FDCWD,
                    c"/dev/null".as_ptr(),
                    libc::O_RDONLY,
                );
                let socket = libc::syscall(libc::SYS_socket, libc::AF_UNIX, libc::SOCK_STREAM, 0);
                let tiocsti = libc::syscall(libc::SYS_ioctl, -1, libc::TIOCSTI, c"x".as_ptr());
                let getpid = libc::syscall(libc::SYS_getpid);
                (
                    errno_of(open),
                    errno_of(socket),
                    errno_of(tiocsti),
                    getpid > 0,
                )
            }
        });
        assert_eq!(open, libc::EPERM);
        assert_eq!(socket, libc::EPERM);
        assert_eq!(tiocsti, libc::EPERM);
        assert!(getpid);
    }

    #[test]
    fn virtio_filter_waits_in_epoll_and_flushes_but_opens_nothing() {
        let (epoll, sync, open, ioctl) = under_filter(ThreadKind::Virtio, || {
            let file = std::fs::File::open("/proc/self/stat");
            // SAFETY: raw syscalls with valid arguments; fds closed below
            // when created.
            unsafe {
                let epoll = libc::syscall(libc::SYS_epoll_create1, 0);
                if epoll >= 0 {
                    libc::close(epoll as i32);
                }
                let sync = errno_of(libc::syscall(libc::SYS_fdatasync, -1));
                let ioctl = errno_of(libc::syscall(libc::SYS_ioctl, 0, 0x4004_54ca, 0));
                (epoll, sync, file.is_err(), ioctl)
            }
        });
        // epoll_create1 is not in the list (the worker's epoll is made
        // before the filter); epoll_wait is. fdatasync reaches the kernel
        // (EBADF for fd -1), open and ioctl do not.
        assert!(epoll < 0);
        assert_eq!(sync, libc::EBADF);
        assert!(open);
        assert_eq!(ioctl, libc::EPERM);
        let list = allow_list(ThreadKind::Virtio).unwrap();
        for call in [libc::SYS_epoll_wait, libc::SYS_preadv, libc::SYS_fallocate] {
            assert!(list.contains_key(&call), "{call}");
        }
    }

    #[test]
    fn vmm_filter_opens_files_and_spawns_threads_but_not_processes() {
        let (opened, thread_ran, fork, exec) = under_filter(ThreadKind::Vmm, || {
            let opened = std::fs::File::open("/dev/null").is_ok();
            let thread_ran = std::thread::spawn(|| 7).join().ok() == Some(7);
            // SAFETY: fork-flavoured clone refused by the filter (EPERM
            // here); if it were allowed the child would _exit at once.
            let fork = unsafe {
                let ret = libc::syscall(libc::SYS_clone, libc::SIGCHLD, 0, 0, 0, 0);
                if ret == 0 {
                    libc::_exit(0);
                }
                errno_of(ret)
            };
            // SAFETY: execve with a valid path and empty argv/envp; refused.
            let exec = unsafe {
                let argv: [*const libc::c_char; 1] = [std::ptr::null()];
                errno_of(libc::syscall(
                    libc::SYS_execve,
                    c"/bin/true".as_ptr(),
                    argv.as_ptr(),
                    argv.as_ptr(),
                ))
            };
            (opened, thread_ran, fork, exec)
        });
        assert!(opened);
        assert!(thread_ran, "clone3 -> ENOSYS must fall back to clone");
        assert_eq!(fork, libc::EPERM);
        assert_eq!(exec, libc::EPERM);
    }

    #[test]
    fn a_thread_spawned_under_the_vmm_filter_adds_the_vcpu_filter() {
        // What a restart does: the filtered VMM thread spawns vCPU threads,
        // which install their own filter on top of the inherited one.
        let (installed, open) = under_filter(ThreadKind::Vmm, || {
            std::thread::spawn(|| {
                let filters = ThreadFilters::compile_with(
                    ThreadKind::Vcpu,
                    SeccompAction::Errno(libc::EPERM as u32),
                )
                .unwrap();
                let installed = filters
                    .programs
                    .iter()
                    .all(|program| seccompiler::apply_filter(program).is_ok());
                let open = std::fs::File::open("/dev/null")
                    .err()
                    .and_then(|e| e.raw_os_error());
                (installed, open)
            })
            .join()
            .unwrap()
        });
        assert!(installed);
        assert_eq!(open, Some(libc::EPERM), "the vCPU filter is in force");
    }

    #[test]
    fn kvm_and_vfio_ioctl_types_pass_the_vcpu_filter() {
        // An ioctl of the KVM or VFIO type on a bad fd passes the filter
        // and fails in the kernel (EBADF), not with the filter's EPERM.
        let (kvm, vfio) = under_filter(ThreadKind::Vcpu, || {
            // SAFETY: an unknown ioctl on an invalid fd (-1) fails with
            // EBADF and touches no memory.
            unsafe {
                (
                    errno_of(libc::syscall(libc::SYS_ioctl, -1, 0xAE80u64, 0)),
                    errno_of(libc::syscall(libc::SYS_ioctl, -1, 0x3B6Au64, 0)),
                )
            }
        });
        assert_eq!(kvm, libc::EBADF);
        assert_eq!(vfio, libc::EBADF);
    }
}
