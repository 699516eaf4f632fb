//! The SIGSYS handler: a forbidden system call ends barge with one line
//! naming the thread and the call. The handler allocates nothing and makes
//! only `write` and `exit_group` (both in every filter): the trapped call
//! may have come from inside the allocator.

use std::cell::Cell;
use std::io;
use std::sync::OnceLock;

use super::{syscall_name, ThreadKind};

/// [`crate::status::SECCOMP`], repeated here so the handler needs nothing
/// else.
const EXIT_STATUS: i32 = crate::status::SECCOMP;

/// Longest thread label kept (the kernel's thread names are 15 bytes).
const LABEL_LEN: usize = 16;

thread_local! {
    /// This thread's label ("vcpu0", "vmm") and filter kind, set when its
    /// filter is installed; const-initialised, so reading it in the handler
    /// neither allocates nor runs a constructor.
    static THREAD: Cell<Option<([u8; LABEL_LEN], usize, ThreadKind)>> = const { Cell::new(None) };
}

/// Records the calling thread's label and kind. Returns `false` when the
/// thread already has `kind`'s filter (nothing more to install).
pub(super) fn mark_thread(kind: ThreadKind, label: &str) -> bool {
    THREAD.with(|thread| {
        if matches!(thread.get(), Some((_, _, k)) if k == kind) {
            return false;
        }
        let mut bytes = [0u8; LABEL_LEN];
        let len = label.len().min(LABEL_LEN);
        bytes[..len].copy_from_slice(&label.as_bytes()[..len]);
        thread.set(Some((bytes, len, kind)));
        true
    })
}

/// The part of `siginfo_t` the kernel fills for SIGSYS on x86_64
/// (`_sigsys` in the kernel's `union __sifields`, after three ints and
/// padding).
#[repr(C)]
struct SigsysInfo {
    signo: libc::c_int,
    errno: libc::c_int,
    code: libc::c_int,
    _pad: libc::c_int,
    call_addr: *mut libc::c_void,
    syscall: libc::c_int,
    arch: libc::c_uint,
}

/// A fixed buffer that `write!` formats into without allocating; output
/// past its end is dropped.
struct StackText {
    bytes: [u8; 512],
    len: usize,
}

impl std::fmt::Write for StackText {
    fn write_str(&mut self, text: &str) -> std::fmt::Result {
        let room = self.bytes.len() - self.len;
        let n = text.len().min(room);
        self.bytes[self.len..self.len + n].copy_from_slice(&text.as_bytes()[..n]);
        self.len += n;
        Ok(())
    }
}

/// The message for a forbidden call `number` made by `label` under the
/// `kind` filter.
fn describe(out: &mut impl std::fmt::Write, label: &str, kind: &str, number: i64) {
    let name = syscall_name(number);
    let _ = writeln!(
        out,
        "barge: error: seccomp: the {label} thread made the system call {name} ({number}), \
         which barge's {kind} filter forbids; barge stopped (status {EXIT_STATUS}). \
         This is a barge bug unless other code runs in barge's process: please report it; \
         --seccomp off runs without the filters"
    );
}

extern "C" fn on_sigsys(_signo: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo_t for SA_SIGINFO handlers;
    // for SIGSYS its union holds `_sigsys`, laid out as `SigsysInfo`.
    let number = unsafe { (*info.cast::<SigsysInfo>()).syscall };
    let (label_bytes, len, kind) =
        THREAD
            .with(Cell::get)
            .unwrap_or(([0; LABEL_LEN], 0, ThreadKind::Vmm));
    let label = std::str::from_utf8(&label_bytes[..len]).unwrap_or("?");
    let label = if label.is_empty() { "unnamed" } else { label };
    let mut text = StackText {
        bytes: [0; 512],
        len: 0,
    };
    describe(&mut text, label, kind.name(), i64::from(number));
    // SAFETY: write(2) and _exit(2) are async-signal-safe; the buffer is
    // valid for `text.len` bytes.
    unsafe {
        libc::write(libc::STDERR_FILENO, text.bytes.as_ptr().cast(), text.len);
        libc::_exit(EXIT_STATUS);
    }
}

/// Installs the SIGSYS handler once per process.
pub(super) fn install_handler() -> io::Result<()> {
    static INSTALLED: OnceLock<Result<(), i32>> = OnceLock::new();
    let result = *INSTALLED.get_or_init(|| {
        // SAFETY: `sigaction` is plain data; all-zero is a valid value
        // (empty mask, no flags) filled in below.
        let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
        action.sa_sigaction = on_sigsys
            as extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void)
            as usize;
        action.sa_flags = libc::SA_SIGINFO;
        // SAFETY: `action.sa_mask` is a valid sigset_t owned by this frame.
        unsafe { libc::sigemptyset(&mut action.sa_mask) };
        // SAFETY: `action` is initialised and outlives the call; the
        // handler only formats into a stack buffer, writes and exits.
        let rc = unsafe { libc::sigaction(libc::SIGSYS, &action, std::ptr::null_mut()) };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error()
                .raw_os_error()
                .unwrap_or(libc::EINVAL))
        }
    });
    result.map_err(io::Error::from_raw_os_error)
}

/// Makes a system call no filter allows (`socket`): with the filter on,
/// barge ends here with the SIGSYS message; with `--seccomp log` the call
/// goes through and this logs that it did.
pub(super) fn probe() {
    // SAFETY: socket(2) with constant arguments; a returned fd is closed.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0) };
    if fd >= 0 {
        log::warn!("seccomp probe: socket() was allowed (the filter only logs)");
        // SAFETY: `fd` was just returned by socket and is owned here.
        unsafe { libc::close(fd) };
    }
}

#[cfg(test)]
mod tests {
    use std::fmt::Write as _;

    use super::*;

    #[test]
    fn the_message_names_thread_call_filter_and_the_way_out() {
        let mut text = StackText {
            bytes: [0; 512],
            len: 0,
        };
        describe(&mut text, "vcpu0", "vcpu", libc::SYS_socket);
        let message = std::str::from_utf8(&text.bytes[..text.len]).unwrap();
        assert_eq!(
            message,
            "barge: error: seccomp: the vcpu0 thread made the system call socket (41), \
             which barge's vcpu filter forbids; barge stopped (status 159). \
             This is a barge bug unless other code runs in barge's process: please report it; \
             --seccomp off runs without the filters\n"
        );
    }

    #[test]
    fn stack_text_drops_what_does_not_fit() {
        let mut text = StackText {
            bytes: [0; 512],
            len: 0,
        };
        for _ in 0..100 {
            let _ = text.write_str("0123456789");
        }
        assert_eq!(text.len, 512);
    }

    #[test]
    fn a_thread_is_marked_once_per_kind() {
        std::thread::spawn(|| {
            assert!(mark_thread(ThreadKind::Vmm, "vmm"));
            assert!(!mark_thread(ThreadKind::Vmm, "vmm"));
            assert!(mark_thread(ThreadKind::Vcpu, "a-very-long-thread-label"));
            let (bytes, len, kind) = THREAD.with(Cell::get).unwrap();
            assert_eq!(&bytes[..len], b"a-very-long-thre");
            assert_eq!(kind, ThreadKind::Vcpu);
        })
        .join()
        .unwrap();
    }
}
