//! The tap interface a virtio-net device moves frames through: a thin
//! module over `/dev/net/tun` and its ioctls (the only unsafe code of the
//! net device).
//!
//! [`Tap::open`] attaches to an interface that exists already (created by
//! `ip tuntap add dev NAME mode tap`): barge never creates one, so that a
//! typo in `--net tap=` is an error instead of a new interface nobody
//! routes. The file is opened non-blocking, with `IFF_TAP | IFF_NO_PI |
//! IFF_VNET_HDR`, a 12-byte virtio-net header (`TUNSETVNETHDRSZ`) and no
//! offloads (`TUNSETOFFLOAD` 0, clearing what an earlier user set on a
//! persistent tap), so that the host stack hands it only complete,
//! checksummed frames, the only kind a device without
//! `VIRTIO_NET_F_GUEST_CSUM`/`GUEST_TSO*` may give the guest.
//!
//! Frames cross the [`PacketBackend`] interface without the virtio-net
//! header: [`Tap`] adds an all-zero one on write and checks and strips the
//! kernel's on read. The header is little-endian, the tap's default on x86.

use std::fs::{File, OpenOptions};
use std::io::{self, IoSlice, IoSliceMut, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use virtio_bindings::virtio_net::{VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_NONE};

use super::handler::PacketBackend;
use super::VIRTIO_NET_HDR_LEN;

/// The clone device every tap is attached through.
pub const TUN_DEVICE: &str = "/dev/net/tun";
/// Where Linux lists network interfaces.
const SYS_CLASS_NET: &str = "/sys/class/net";
/// `IFNAMSIZ`: an interface name and its NUL.
const IFNAMSIZ: usize = libc::IFNAMSIZ;
/// The longest interface name Linux takes.
pub const MAX_INTERFACE_NAME_LEN: usize = IFNAMSIZ - 1;

/// Why a tap could not be opened. Every message names the interface and
/// says what to do.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    /// The name is not one Linux takes for an interface.
    #[error("tap name {name:?} {reason}")]
    InvalidName {
        /// The name as given.
        name: String,
        /// What is wrong with it ([`interface_name_problem`]).
        reason: &'static str,
    },
    /// No interface of that name.
    #[error("tap {name:?} does not exist ({path} is missing); barge does not create taps: create it with `ip tuntap add dev {name} mode tap` and `ip link set {name} up` (as root, or add `user $USER` to let barge run unprivileged)", path = .path.display())]
    Missing {
        /// The interface name.
        name: String,
        /// The sysfs directory that is missing.
        path: PathBuf,
    },
    /// The interface exists but is no tap (a NIC, a bridge, a tun).
    #[error("{name:?} is a network interface but not a tap device ({what}); give --net tap= the name of a tap created with `ip tuntap add dev NAME mode tap`")]
    NotTap {
        /// The interface name.
        name: String,
        /// What it is instead.
        what: &'static str,
    },
    /// `/dev/net/tun` is missing.
    #[error("{TUN_DEVICE} does not exist: the kernel has no tun/tap driver loaded; load it with `modprobe tun` (or create the node with `mknod /dev/net/tun c 10 200`)")]
    NoTunDevice,
    /// Opening `/dev/net/tun` or attaching to the tap was refused.
    #[error("permission denied attaching to tap {name:?} ({step}): barge needs CAP_NET_ADMIN, or a tap owned by its user (`ip tuntap add dev {name} mode tap user $USER`) and read-write access to {TUN_DEVICE}")]
    PermissionDenied {
        /// The interface name.
        name: String,
        /// What was refused.
        step: &'static str,
    },
    /// Another process has the tap open.
    #[error("tap {name:?} is busy: another process (another barge or VM?) has it attached; give each VM its own tap, or stop the other user")]
    Busy {
        /// The interface name.
        name: String,
    },
    /// Any other failure of a step.
    #[error("tap {name:?}: {step} failed: {source}")]
    Io {
        /// The interface name.
        name: String,
        /// What was done.
        step: &'static str,
        /// The error.
        #[source]
        source: io::Error,
    },
}

/// Why `name` is not a valid Linux interface name (the kernel's
/// `dev_valid_name`), or `None` when it is: at most
/// [`MAX_INTERFACE_NAME_LEN`] bytes, not empty, `.` or `..`, and no `/`,
/// `:`, whitespace or NUL. The VMM's `--net` parsing uses the same rules.
pub fn interface_name_problem(name: &str) -> Option<&'static str> {
    if name.is_empty() {
        return Some("is empty; give the name of a tap interface, e.g. tap=tap0");
    }
    if name.len() > MAX_INTERFACE_NAME_LEN {
        return Some("is longer than 15 bytes, the longest interface name Linux takes");
    }
    if name == "." || name == ".." {
        return Some("is not an interface name");
    }
    if name
        .chars()
        .any(|c| c == '/' || c == ':' || c == '\0' || c.is_whitespace())
    {
        return Some("contains '/', ':', a NUL or whitespace, which interface names cannot");
    }
    None
}

/// An attached tap interface (see the module docs).
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
}

impl Tap {
    /// Attaches to the existing tap interface `name`.
    pub fn open(name: &str) -> Result<Tap, TapError> {
        Self::open_in(Path::new(SYS_CLASS_NET), name)
    }

    /// [`Tap::open`], with the interfaces listed under `sys_class_net`.
    fn open_in(sys_class_net: &Path, name: &str) -> Result<Tap, TapError> {
        if let Some(reason) = interface_name_problem(name) {
            return Err(TapError::InvalidName {
                name: name.to_string(),
                reason,
            });
        }
        check_is_tap(sys_class_net, name)?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(TUN_DEVICE)
            .map_err(|source| match source.kind() {
                io::ErrorKind::NotFound => TapError::NoTunDevice,
                io::ErrorKind::PermissionDenied => TapError::PermissionDenied {
                    name: name.to_string(),
                    step: "opening /dev/net/tun",
                },
                _ => TapError::Io {
                    name: name.to_string(),
                    step: "opening /dev/net/tun",
                    source,
                },
            })?;
        let io_error = |step: &'static str| {
            move |source: io::Error| TapError::Io {
                name: name.to_string(),
                step,
                source,
            }
        };
        sys::set_interface(&file, name).map_err(|source| match source.raw_os_error() {
            Some(libc::EBUSY) => TapError::Busy {
                name: name.to_string(),
            },
            Some(libc::EPERM) | Some(libc::EACCES) => TapError::PermissionDenied {
                name: name.to_string(),
                step: "TUNSETIFF",
            },
            // The interface is not a tap (checked above, unless it changed
            // since) or was made multi-queue.
            Some(libc::EINVAL) => TapError::NotTap {
                name: name.to_string(),
                what: "TUNSETIFF refused it: it is not a single-queue tap",
            },
            _ => io_error("attaching (TUNSETIFF)")(source),
        })?;
        sys::set_vnet_header_size(&file, VIRTIO_NET_HDR_LEN as libc::c_int).map_err(io_error(
            "setting the virtio-net header size (TUNSETVNETHDRSZ)",
        ))?;
        sys::set_offload(&file, 0).map_err(io_error("turning offloads off (TUNSETOFFLOAD)"))?;
        if !is_up(sys_class_net, name) {
            log::warn!(
                "tap {name:?} is down: the guest's frames go nowhere until `ip link set {name} up`"
            );
        }
        Ok(Tap {
            file,
            name: name.to_string(),
        })
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

/// Checks in sysfs that `name` exists and is a tap (tun devices have a
/// `tun_flags` attribute; `IFF_TAP` is set in it for a tap).
fn check_is_tap(sys_class_net: &Path, name: &str) -> Result<(), TapError> {
    let interface = sys_class_net.join(name);
    if !interface.exists() {
        return Err(TapError::Missing {
            name: name.to_string(),
            path: interface,
        });
    }
    let Ok(flags) = std::fs::read_to_string(interface.join("tun_flags")) else {
        return Err(TapError::NotTap {
            name: name.to_string(),
            what: "it is not a tun/tap interface",
        });
    };
    match parse_hex(&flags) {
        Some(flags) if flags & libc::IFF_TAP as u64 == 0 => Err(TapError::NotTap {
            name: name.to_string(),
            what: "it is a tun (layer 3) device; barge needs `mode tap`",
        }),
        _ => Ok(()),
    }
}

/// Whether the interface's `flags` have IFF_UP (true when unknown).
fn is_up(sys_class_net: &Path, name: &str) -> bool {
    std::fs::read_to_string(sys_class_net.join(name).join("flags"))
        .ok()
        .and_then(|flags| parse_hex(&flags))
        .is_none_or(|flags| flags & libc::IFF_UP as u64 != 0)
}

/// Parses a sysfs hex value such as `0x1002\n`.
fn parse_hex(text: &str) -> Option<u64> {
    let text = text.trim();
    u64::from_str_radix(text.strip_prefix("0x").unwrap_or(text), 16).ok()
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

impl PacketBackend for Tap {
    /// Reads one frame; a frame the kernel gave a checksum-offload or GSO
    /// header (which it does not with offloads off) is dropped with
    /// `InvalidData`.
    fn read_frame(&mut self, frame: &mut [u8]) -> io::Result<usize> {
        let mut header = [0u8; VIRTIO_NET_HDR_LEN];
        let read = self
            .file
            .read_vectored(&mut [IoSliceMut::new(&mut header), IoSliceMut::new(frame)])?;
        if read < VIRTIO_NET_HDR_LEN {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "tap {}: a read of {read} bytes is shorter than the virtio-net header",
                    self.name
                ),
            ));
        }
        if header[0] & VIRTIO_NET_HDR_F_NEEDS_CSUM as u8 != 0
            || header[1] != VIRTIO_NET_HDR_GSO_NONE as u8
        {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "tap {}: a frame needs checksum or segmentation offload (flags {:#x}, gso type {}), which is off; is another program changing the tap's offloads?",
                    self.name, header[0], header[1]
                ),
            ));
        }
        Ok(read - VIRTIO_NET_HDR_LEN)
    }

    /// Writes one frame behind an all-zero header (no offload asked).
    fn write_frame(&mut self, frame: &[u8]) -> io::Result<()> {
        let header = [0u8; VIRTIO_NET_HDR_LEN];
        let written = self
            .file
            .write_vectored(&[IoSlice::new(&header), IoSlice::new(frame)])?;
        if written != VIRTIO_NET_HDR_LEN + frame.len() {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                format!(
                    "tap {}: wrote {written} of {} bytes",
                    self.name,
                    VIRTIO_NET_HDR_LEN + frame.len()
                ),
            ));
        }
        Ok(())
    }
}

/// The ioctls, each on the tun file it is given.
mod sys {
    use std::fs::File;
    use std::io;
    use std::os::fd::AsRawFd;

    use super::IFNAMSIZ;

    /// `struct ifreq` with the member TUNSETIFF reads (`ifr_flags`).
    #[repr(C)]
    struct InterfaceRequest {
        name: [u8; IFNAMSIZ],
        flags: libc::c_short,
        /// The rest of the `ifr_ifru` union.
        padding: [u8; 22],
    }

    const _: () =
        assert!(std::mem::size_of::<InterfaceRequest>() == std::mem::size_of::<libc::ifreq>());

    fn result(ret: libc::c_int) -> io::Result<()> {
        if ret < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    }

    /// TUNSETIFF: attaches `file` to tap `name` (at most 15 bytes, checked
    /// by the caller) as `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`.
    pub(super) fn set_interface(file: &File, name: &str) -> io::Result<()> {
        let mut request = InterfaceRequest {
            name: [0; IFNAMSIZ],
            flags: (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short,
            padding: [0; 22],
        };
        let bytes = name.as_bytes();
        if bytes.len() >= IFNAMSIZ {
            return Err(io::Error::from(io::ErrorKind::InvalidInput));
        }
        request.name[..bytes.len()].copy_from_slice(bytes);
        // SAFETY: TUNSETIFF reads and writes one `struct ifreq`, which
        // `request` is (same size, NUL-terminated name, flags at offset
        // 16), alive and exclusively borrowed for the call; the fd is
        // `file`'s, open.
        result(unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut request) })
    }

    /// TUNSETVNETHDRSZ: the virtio-net header length on reads and writes.
    pub(super) fn set_vnet_header_size(file: &File, size: libc::c_int) -> io::Result<()> {
        // SAFETY: TUNSETVNETHDRSZ reads one int from the pointer, which
        // points at `size`, alive for the call; the fd is `file`'s.
        result(unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETVNETHDRSZ, &size) })
    }

    /// TUNSETOFFLOAD: the `TUN_F_*` offloads the tap may hand over (its
    /// argument is the value, not a pointer).
    pub(super) fn set_offload(file: &File, offloads: libc::c_uint) -> io::Result<()> {
        // SAFETY: TUNSETOFFLOAD takes its argument by value and touches no
        // memory of ours; the fd is `file`'s.
        result(unsafe {
            libc::ioctl(
                file.as_raw_fd(),
                libc::TUNSETOFFLOAD,
                libc::c_ulong::from(offloads),
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake_sys(interfaces: &[(&str, Option<&str>)]) -> tempdir::Dir {
        let dir = tempdir::Dir::new();
        for (name, tun_flags) in interfaces {
            let path = dir.path().join(name);
            std::fs::create_dir(&path).unwrap();
            std::fs::write(path.join("flags"), "0x1003\n").unwrap();
            if let Some(flags) = tun_flags {
                std::fs::write(path.join("tun_flags"), flags).unwrap();
            }
        }
        dir
    }

    /// A temporary directory removed on drop (no tempfile crate here).
    mod tempdir {
        use std::path::{Path, PathBuf};
        use std::sync::atomic::{AtomicU32, Ordering};

        pub struct Dir(PathBuf);

        impl Dir {
            pub fn new() -> Dir {
                static NEXT: AtomicU32 = AtomicU32::new(0);
                let path = std::env::temp_dir().join(format!(
                    "barge-tap-test-{}-{}",
                    std::process::id(),
                    NEXT.fetch_add(1, Ordering::Relaxed)
                ));
                std::fs::create_dir_all(&path).unwrap();
                Dir(path)
            }
            pub fn path(&self) -> &Path {
                &self.0
            }
        }

        impl Drop for Dir {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
    }

    #[test]
    fn interface_names_follow_the_kernel_rules() {
        assert_eq!(interface_name_problem("tap0"), None);
        assert_eq!(interface_name_problem("a-15-byte-name0"), None);
        for bad in [
            "",
            ".",
            "..",
            "a/b",
            "a:b",
            "a b",
            "tab\there",
            "a-16-byte-name00",
        ] {
            assert!(interface_name_problem(bad).is_some(), "{bad:?}");
        }
    }

    #[test]
    fn a_tap_name_too_long_is_refused_before_anything_is_opened() {
        let err = Tap::open("barge-tap-name-too-long").unwrap_err();
        assert!(matches!(err, TapError::InvalidName { .. }), "{err:?}");
        assert!(err.to_string().contains("longer than 15 bytes"), "{err}");
    }

    #[test]
    fn a_missing_tap_says_how_to_create_it() {
        // '-' and digits only: a name that no test machine has.
        let name = "brg-nx-4f2a9c1";
        let err = Tap::open(name).unwrap_err();
        assert!(matches!(err, TapError::Missing { .. }), "{err:?}");
        let message = err.to_string();
        assert!(
            message.contains("\"brg-nx-4f2a9c1\" does not exist"),
            "{message}"
        );
        assert!(
            message.contains("ip tuntap add dev brg-nx-4f2a9c1 mode tap"),
            "{message}"
        );
        assert!(
            message.contains("ip link set brg-nx-4f2a9c1 up"),
            "{message}"
        );
    }

    #[test]
    fn an_interface_that_is_not_a_tap_is_named() {
        let sys = fake_sys(&[("eth9", None), ("tun9", Some("0x1001\n"))]);
        let err = Tap::open_in(sys.path(), "eth9").unwrap_err();
        assert!(matches!(err, TapError::NotTap { .. }), "{err:?}");
        assert!(err
            .to_string()
            .contains("\"eth9\" is a network interface but not a tap"));
        let err = Tap::open_in(sys.path(), "tun9").unwrap_err();
        assert!(err.to_string().contains("tun (layer 3)"), "{err}");
        // The real loopback interface is no tap either.
        let err = Tap::open("lo").unwrap_err();
        assert!(matches!(err, TapError::NotTap { .. }), "{err:?}");
    }

    #[test]
    fn sysfs_hex_values_parse() {
        assert_eq!(parse_hex("0x1002\n"), Some(0x1002));
        assert_eq!(parse_hex("1003"), Some(0x1003));
        assert_eq!(parse_hex("zz"), None);
        let sys = fake_sys(&[("tap9", Some("0x1002"))]);
        assert!(is_up(sys.path(), "tap9"));
        assert!(check_is_tap(sys.path(), "tap9").is_ok());
    }
}
