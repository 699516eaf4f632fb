//! Names of system calls (x86_64 and aarch64 numbers) for the SIGSYS message: the ones barge's
//! filters allow and the usual suspects they forbid. Others print as
//! "unknown".

/// `(number, "SYS_name")` for every call the table knows.
macro_rules! table {
    ($($(#[$attr:meta])* $sys:ident),* $(,)?) => {
        &[$($(#[$attr])* (libc::$sys, stringify!($sys))),*]
    };
}

const SYSCALLS: &[(i64, &str)] = table!(
    SYS_read,
    SYS_write,
    SYS_readv,
    SYS_writev,
    SYS_pread64,
    SYS_pwrite64,
    SYS_preadv,
    SYS_pwritev,
    SYS_preadv2,
    SYS_pwritev2,
    SYS_flock,
    #[cfg(target_arch = "x86_64")]
    SYS_open,
    SYS_openat,
    SYS_close,
    SYS_ioctl,
    SYS_futex,
    SYS_sched_yield,
    SYS_nanosleep,
    SYS_clock_nanosleep,
    SYS_clock_gettime,
    SYS_gettimeofday,
    SYS_mmap,
    SYS_munmap,
    SYS_mprotect,
    SYS_madvise,
    SYS_mremap,
    SYS_brk,
    SYS_rt_sigprocmask,
    SYS_rt_sigreturn,
    SYS_rt_sigaction,
    SYS_sigaltstack,
    SYS_getpid,
    SYS_gettid,
    SYS_tgkill,
    SYS_kill,
    SYS_getrandom,
    SYS_eventfd2,
    SYS_exit,
    SYS_exit_group,
    SYS_lseek,
    SYS_fstat,
    SYS_newfstatat,
    SYS_statx,
    SYS_fstatfs,
    SYS_statfs,
    SYS_fcntl,
    SYS_dup,
    SYS_dup3,
    SYS_pipe2,
    SYS_getdents64,
    #[cfg(target_arch = "x86_64")]
    SYS_readlink,
    SYS_readlinkat,
    #[cfg(target_arch = "x86_64")]
    SYS_access,
    SYS_faccessat2,
    SYS_getcwd,
    #[cfg(target_arch = "x86_64")]
    SYS_unlink,
    SYS_unlinkat,
    #[cfg(target_arch = "x86_64")]
    SYS_rename,
    SYS_renameat2,
    #[cfg(target_arch = "x86_64")]
    SYS_mkdir,
    SYS_mkdirat,
    SYS_fsync,
    SYS_fdatasync,
    SYS_ftruncate,
    SYS_fallocate,
    SYS_memfd_create,
    SYS_epoll_create1,
    SYS_epoll_ctl,
    #[cfg(target_arch = "x86_64")]
    SYS_epoll_wait,
    SYS_epoll_pwait,
    #[cfg(target_arch = "x86_64")]
    SYS_poll,
    SYS_ppoll,
    SYS_timerfd_create,
    SYS_timerfd_settime,
    SYS_set_robust_list,
    SYS_rseq,
    SYS_prctl,
    SYS_sched_getaffinity,
    SYS_prlimit64,
    SYS_getrlimit,
    SYS_getuid,
    SYS_geteuid,
    SYS_getgid,
    SYS_getegid,
    SYS_uname,
    SYS_sysinfo,
    SYS_mlock,
    SYS_munlock,
    SYS_mbind,
    SYS_clone,
    SYS_clone3,
    #[cfg(target_arch = "x86_64")]
    SYS_fork,
    #[cfg(target_arch = "x86_64")]
    SYS_vfork,
    SYS_execve,
    SYS_execveat,
    SYS_socket,
    SYS_connect,
    SYS_bind,
    SYS_listen,
    SYS_accept4,
    SYS_sendto,
    SYS_recvfrom,
    SYS_sendmsg,
    SYS_recvmsg,
    SYS_ptrace,
    SYS_process_vm_readv,
    SYS_process_vm_writev,
    SYS_mount,
    SYS_umount2,
    SYS_chroot,
    SYS_pivot_root,
    SYS_setuid,
    SYS_setgid,
    SYS_init_module,
    SYS_finit_module,
    SYS_kexec_load,
    SYS_bpf,
    SYS_perf_event_open,
    SYS_userfaultfd,
    SYS_io_uring_setup,
    #[cfg(target_arch = "x86_64")]
    SYS_chmod,
    SYS_fchmod,
    #[cfg(target_arch = "x86_64")]
    SYS_chown,
    #[cfg(target_arch = "x86_64")]
    SYS_link,
    #[cfg(target_arch = "x86_64")]
    SYS_symlink,
    #[cfg(target_arch = "x86_64")]
    SYS_mknod,
    SYS_seccomp,
    SYS_wait4,
    SYS_sched_setaffinity,
    SYS_msync,
    #[cfg(target_arch = "x86_64")]
    SYS_select,
    SYS_pselect6,
    SYS_signalfd4,
    SYS_getppid,
);

/// The name of system call `number` on this architecture, or "unknown".
pub fn syscall_name(number: i64) -> &'static str {
    SYSCALLS
        .iter()
        .find(|(n, _)| *n == number)
        .map_or("unknown", |(_, name)| name.trim_start_matches("SYS_"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_known_calls_and_admits_the_rest() {
        assert_eq!(syscall_name(libc::SYS_socket), "socket");
        assert_eq!(syscall_name(libc::SYS_execve), "execve");
        assert_eq!(syscall_name(libc::SYS_ioctl), "ioctl");
        assert_eq!(syscall_name(9999), "unknown");
    }

    #[test]
    fn every_allowed_call_has_a_name() {
        for kind in [
            super::super::ThreadKind::Vmm,
            super::super::ThreadKind::Vcpu,
            super::super::ThreadKind::Virtio,
        ] {
            for call in super::super::allow_list(kind).unwrap().keys() {
                assert_ne!(syscall_name(*call), "unknown", "syscall {call}");
            }
        }
    }
}
