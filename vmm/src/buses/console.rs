//! The guest console's ends on the host: where serial output goes
//! ([`ConsoleOutput`]) and the terminal's raw mode for serial input
//! ([`RawModeGuard`]).

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::config::SerialConfig;

/// Errors setting up the console.
#[derive(Debug, thiserror::Error)]
pub enum ConsoleError {
    /// The serial output file cannot be opened.
    #[error("cannot open the serial output file {path}: {source}")]
    OpenFile { path: PathBuf, source: io::Error },
    /// Reading or setting the terminal's attributes failed.
    #[error("cannot put the terminal into raw mode: {0}")]
    Termios(io::Error),
}

/// A callback that receives every chunk of guest output.
pub type OutputCallback = Box<dyn FnMut(&[u8]) + Send>;

enum Sink {
    Stdout,
    File(File),
    Null,
    Buffer(Arc<Mutex<Vec<u8>>>),
    Callback(OutputCallback),
}

/// Where guest serial output goes: one `Write + Send` type for every sink,
/// so the serial device has a single concrete writer type.
pub struct ConsoleOutput {
    sink: Sink,
}

impl fmt::Debug for ConsoleOutput {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match &self.sink {
            Sink::Stdout => "stdout",
            Sink::File(_) => "file",
            Sink::Null => "null",
            Sink::Buffer(_) => "buffer",
            Sink::Callback(_) => "callback",
        };
        f.debug_struct("ConsoleOutput")
            .field("sink", &kind)
            .finish()
    }
}

impl ConsoleOutput {
    /// Output to the process's stdout, flushed after every write.
    pub fn stdout() -> Self {
        ConsoleOutput { sink: Sink::Stdout }
    }

    /// Output appended to `path`, created if missing.
    pub fn file(path: impl AsRef<Path>) -> Result<Self, ConsoleError> {
        let path = path.as_ref();
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|source| ConsoleError::OpenFile {
                path: path.to_path_buf(),
                source,
            })?;
        Ok(ConsoleOutput {
            sink: Sink::File(file),
        })
    }

    /// Output discarded.
    pub fn null() -> Self {
        ConsoleOutput { sink: Sink::Null }
    }

    /// Output appended to a buffer the embedder keeps a clone of.
    pub fn buffer(buffer: Arc<Mutex<Vec<u8>>>) -> Self {
        ConsoleOutput {
            sink: Sink::Buffer(buffer),
        }
    }

    /// Output handed to `callback`, chunk by chunk as the guest writes it.
    pub fn callback(callback: impl FnMut(&[u8]) + Send + 'static) -> Self {
        ConsoleOutput {
            sink: Sink::Callback(Box::new(callback)),
        }
    }

    /// The sink a `--serial` setting asks for.
    pub fn from_config(serial: &SerialConfig) -> Result<Self, ConsoleError> {
        match serial {
            SerialConfig::Stdio => Ok(Self::stdout()),
            SerialConfig::File(path) => Self::file(path),
            SerialConfig::Disabled => Ok(Self::null()),
        }
    }
}

impl Write for ConsoleOutput {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        match &mut self.sink {
            Sink::Stdout => {
                let mut stdout = io::stdout().lock();
                stdout.write_all(data)?;
                stdout.flush()?;
            }
            Sink::File(file) => file.write_all(data)?,
            Sink::Null => {}
            Sink::Buffer(buffer) => buffer
                .lock()
                // A panic elsewhere while holding the lock leaves the bytes
                // intact; keep appending rather than losing output.
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .extend_from_slice(data),
            Sink::Callback(callback) => callback(data),
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        match &mut self.sink {
            Sink::Stdout => io::stdout().flush(),
            Sink::File(file) => file.flush(),
            Sink::Null | Sink::Buffer(_) | Sink::Callback(_) => Ok(()),
        }
    }
}

/// A terminal in raw mode; its previous settings come back on drop (also
/// when a panic unwinds through the owner).
///
/// Raw here means: no line buffering, no echo, no signal keys (Ctrl-C goes
/// to the guest like any other byte), no CR/NL translation or flow control
/// on input. Output processing is left on so the host's own log lines stay
/// readable.
pub struct RawModeGuard {
    /// A duplicate of the terminal's fd, so the guard owns what it restores.
    fd: OwnedFd,
    original: libc::termios,
}

impl fmt::Debug for RawModeGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RawModeGuard")
            .field("fd", &self.fd)
            .finish_non_exhaustive()
    }
}

impl RawModeGuard {
    /// Puts stdin into raw mode when it is a terminal; `Ok(None)` when it
    /// is not (a pipe, a file, /dev/null).
    pub fn stdin_if_terminal() -> Result<Option<Self>, ConsoleError> {
        let stdin = io::stdin();
        let fd = stdin.as_fd();
        if !sys::is_terminal(fd) {
            return Ok(None);
        }
        Self::enable(fd).map(Some)
    }

    /// Puts the terminal `fd` into raw mode (the guard keeps a duplicate
    /// of the fd to restore it).
    pub fn enable(fd: BorrowedFd<'_>) -> Result<Self, ConsoleError> {
        let original = sys::get_attributes(fd).map_err(ConsoleError::Termios)?;
        let owned = fd.try_clone_to_owned().map_err(ConsoleError::Termios)?;
        sys::set_attributes(fd, &make_raw(original)).map_err(ConsoleError::Termios)?;
        Ok(RawModeGuard {
            fd: owned,
            original,
        })
    }
}

impl Drop for RawModeGuard {
    fn drop(&mut self) {
        if let Err(e) = sys::set_attributes(self.fd.as_fd(), &self.original) {
            log::warn!("cannot restore the terminal's settings: {e}; run `reset` to fix it");
        }
    }
}

/// The raw-mode version of `original` (see [`RawModeGuard`]).
fn make_raw(original: libc::termios) -> libc::termios {
    let mut raw = original;
    raw.c_iflag &= !(libc::IGNBRK
        | libc::BRKINT
        | libc::PARMRK
        | libc::ISTRIP
        | libc::INLCR
        | libc::IGNCR
        | libc::ICRNL
        | libc::IXON);
    raw.c_lflag &= !(libc::ECHO | libc::ECHONL | libc::ICANON | libc::ISIG | libc::IEXTEN);
    raw.c_cflag &= !(libc::CSIZE | libc::PARENB);
    raw.c_cflag |= libc::CS8;
    raw.c_cc[libc::VMIN] = 1;
    raw.c_cc[libc::VTIME] = 0;
    raw
}

/// The width of the terminal `fd` is, in columns; `None` when it is not a
/// terminal or does not say (a width of 0).
pub fn terminal_columns(fd: BorrowedFd<'_>) -> Option<u16> {
    sys::window_size(fd)
        .ok()
        .map(|size| size.ws_col)
        .filter(|&columns| columns > 0)
}

/// The termios calls.
mod sys {
    use std::io;
    use std::mem::MaybeUninit;
    use std::os::fd::{AsRawFd, BorrowedFd};

    /// Whether `fd` is a terminal.
    pub fn is_terminal(fd: BorrowedFd<'_>) -> bool {
        // SAFETY: isatty only inspects the fd, which BorrowedFd keeps open.
        unsafe { libc::isatty(fd.as_raw_fd()) == 1 }
    }

    /// TIOCGWINSZ: the terminal's size.
    pub fn window_size(fd: BorrowedFd<'_>) -> io::Result<libc::winsize> {
        let mut size = MaybeUninit::<libc::winsize>::uninit();
        // SAFETY: the fd is open (BorrowedFd) and `size` is a writable
        // winsize the ioctl fills completely on success.
        let ret = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCGWINSZ, size.as_mut_ptr()) };
        if ret != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: the ioctl succeeded, so it filled `size`.
        Ok(unsafe { size.assume_init() })
    }

    /// tcgetattr.
    pub fn get_attributes(fd: BorrowedFd<'_>) -> io::Result<libc::termios> {
        let mut termios = MaybeUninit::<libc::termios>::uninit();
        // SAFETY: the fd is open (BorrowedFd) and `termios` is a writable
        // termios-sized buffer tcgetattr fills completely on success.
        let ret = unsafe { libc::tcgetattr(fd.as_raw_fd(), termios.as_mut_ptr()) };
        if ret != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: tcgetattr returned 0, so it initialized `termios`.
        Ok(unsafe { termios.assume_init() })
    }

    /// tcsetattr(TCSANOW).
    pub fn set_attributes(fd: BorrowedFd<'_>, termios: &libc::termios) -> io::Result<()> {
        // SAFETY: the fd is open (BorrowedFd) and `termios` points to a
        // valid termios that tcsetattr only reads.
        let ret = unsafe { libc::tcsetattr(fd.as_raw_fd(), libc::TCSANOW, termios) };
        if ret != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::FromRawFd;

    use super::*;

    fn temp_path(name: &str) -> PathBuf {
        std::env::temp_dir().join(format!("barge-console-test-{}-{name}", std::process::id()))
    }

    #[test]
    fn buffer_sink_collects_output() {
        let buffer = Arc::new(Mutex::new(Vec::new()));
        let mut out = ConsoleOutput::buffer(buffer.clone());
        out.write_all(b"GUEST-UP ").unwrap();
        out.write_all(b"cpus=2\n").unwrap();
        out.flush().unwrap();
        assert_eq!(buffer.lock().unwrap().as_slice(), b"GUEST-UP cpus=2\n");
    }

    #[test]
    fn callback_sink_sees_every_chunk() {
        let seen = Arc::new(Mutex::new(Vec::<Vec<u8>>::new()));
        let seen_in_callback = seen.clone();
        let mut out = ConsoleOutput::callback(move |data| {
            seen_in_callback.lock().unwrap().push(data.to_vec())
        });
        out.write_all(b"a").unwrap();
        out.write_all(b"bc").unwrap();
        assert_eq!(*seen.lock().unwrap(), vec![b"a".to_vec(), b"bc".to_vec()]);
    }

    #[test]
    fn file_sink_appends() {
        let path = temp_path("file");
        std::fs::write(&path, "before\n").unwrap();
        let mut out = ConsoleOutput::from_config(&SerialConfig::File(path.clone())).unwrap();
        out.write_all(b"after\n").unwrap();
        drop(out);
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "before\nafter\n");
        let _ = std::fs::remove_file(path);
    }

    #[test]
    fn file_sink_in_a_missing_directory_names_the_file() {
        let path = temp_path("missing-dir").join("console.log");
        let err = ConsoleOutput::file(&path).unwrap_err().to_string();
        assert!(err.contains("cannot open the serial output file"), "{err}");
        assert!(err.contains("console.log"), "{err}");
    }

    #[test]
    fn null_and_stdout_sinks_accept_writes() {
        let mut null = ConsoleOutput::from_config(&SerialConfig::Disabled).unwrap();
        assert_eq!(null.write(b"dropped").unwrap(), 7);
        let mut stdout = ConsoleOutput::from_config(&SerialConfig::Stdio).unwrap();
        stdout.write_all(b"").unwrap();
        assert_eq!(format!("{stdout:?}"), "ConsoleOutput { sink: \"stdout\" }");
    }

    #[test]
    fn console_output_is_send() {
        fn assert_send<T: Send + Write>() {}
        assert_send::<ConsoleOutput>();
    }

    #[test]
    fn buffer_sink_survives_a_poisoned_lock() {
        let buffer = Arc::new(Mutex::new(Vec::new()));
        let poisoner = buffer.clone();
        let _ = std::thread::spawn(move || {
            let _guard = poisoner.lock().unwrap();
            panic!("poison the lock");
        })
        .join();
        let mut out = ConsoleOutput::buffer(buffer.clone());
        out.write_all(b"still here").unwrap();
        let bytes = buffer.lock().unwrap_or_else(|p| p.into_inner()).clone();
        assert_eq!(bytes, b"still here");
    }

    fn open_pty() -> (OwnedFd, OwnedFd) {
        let mut controller = -1;
        let mut terminal = -1;
        // SAFETY: openpty writes two fds into the provided ints; null name,
        // termios and winsize pointers are allowed.
        let ret = unsafe {
            libc::openpty(
                &mut controller,
                &mut terminal,
                std::ptr::null_mut(),
                std::ptr::null(),
                std::ptr::null(),
            )
        };
        assert_eq!(ret, 0, "openpty: {}", io::Error::last_os_error());
        // SAFETY: both fds were just created by openpty and are owned by
        // nothing else.
        unsafe {
            (
                OwnedFd::from_raw_fd(controller),
                OwnedFd::from_raw_fd(terminal),
            )
        }
    }

    #[test]
    fn raw_mode_on_a_pty_is_set_and_restored() {
        let (_controller, terminal) = open_pty();
        let fd = terminal.as_fd();
        assert!(sys::is_terminal(fd));
        let before = sys::get_attributes(fd).unwrap();
        assert_ne!(before.c_lflag & libc::ICANON, 0, "a new pty is canonical");
        {
            let _guard = RawModeGuard::enable(fd).unwrap();
            let raw = sys::get_attributes(fd).unwrap();
            assert_eq!(raw.c_lflag & (libc::ICANON | libc::ECHO | libc::ISIG), 0);
            assert_eq!(raw.c_iflag & libc::ICRNL, 0);
        }
        let after = sys::get_attributes(fd).unwrap();
        assert_eq!(after.c_lflag, before.c_lflag);
        assert_eq!(after.c_iflag, before.c_iflag);
    }

    #[test]
    fn raw_mode_is_restored_when_a_panic_unwinds() {
        let (_controller, terminal) = open_pty();
        let fd = terminal.as_fd();
        let before = sys::get_attributes(fd).unwrap();
        let result = std::panic::catch_unwind(|| {
            let _guard = RawModeGuard::enable(fd).unwrap();
            panic!("vCPU thread failed");
        });
        assert!(result.is_err());
        assert_eq!(sys::get_attributes(fd).unwrap().c_lflag, before.c_lflag);
    }

    #[test]
    fn raw_mode_on_a_non_terminal_fails_cleanly() {
        let file = File::open("/dev/null").unwrap();
        assert!(!sys::is_terminal(file.as_fd()));
        let err = RawModeGuard::enable(file.as_fd()).unwrap_err().to_string();
        assert!(
            err.contains("cannot put the terminal into raw mode"),
            "{err}"
        );
    }
}
