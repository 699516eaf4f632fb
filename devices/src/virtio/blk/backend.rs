//! Where a disk's bytes live: the [`BlockBackend`] trait the request path
//! is generic over, the raw image it serves in barge ([`FileBackend`]:
//! a regular file or a block device, locked with `flock`) and, for tests
//! and fuzzing, `MemoryBackend` (with the `fake` feature).

use std::fs::{self, File, FileType, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use vm_memory::VolatileSlice;
use vmm_sys_util::fallocate::{fallocate, FallocateMode};

use super::sys::{self, LockKind, MAX_IOVECS};
use super::BlockError;

/// The size of a sector, the unit of the disk's capacity and requests.
pub const SECTOR_SIZE: u64 = 512;

/// The bytes of a disk, as the request path uses them. Offsets and lengths
/// are checked against [`BlockBackend::size`] before any call; a backend
/// still returns an error (never panics) for a range past its end.
pub trait BlockBackend: Send + 'static {
    /// The disk's size in bytes (a multiple of [`SECTOR_SIZE`]).
    fn size(&self) -> u64;

    /// Fills `bufs`, in order, with the bytes at `offset`: all of them, or
    /// an error.
    fn read_at(&mut self, offset: u64, bufs: &[VolatileSlice<'_>]) -> io::Result<()>;

    /// Writes `bufs`, in order, at `offset`: all of them, or an error.
    fn write_at(&mut self, offset: u64, bufs: &[VolatileSlice<'_>]) -> io::Result<()>;

    /// Makes every completed write durable (`fdatasync`).
    fn flush(&mut self) -> io::Result<()>;

    /// The guest no longer needs `len` bytes at `offset`: they may be
    /// deallocated, and what they read afterwards is unspecified.
    fn discard(&mut self, offset: u64, len: u64) -> io::Result<()>;

    /// Makes `len` bytes at `offset` read as zeroes; with `unmap` they may
    /// be deallocated too.
    fn write_zeroes(&mut self, offset: u64, len: u64, unmap: bool) -> io::Result<()>;
}

/// What a disk image is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageKind {
    /// A regular file.
    File,
    /// A block device (e.g. `/dev/nvme0n1p3`, `/dev/loop0`).
    BlockDevice,
}

/// A raw disk image: a regular file or a block device, opened read-only or
/// read-write and locked with `flock` (shared when read-only, exclusive
/// when read-write) so that two barges cannot write one image. I/O goes
/// directly between guest memory and the image (`preadv`/`pwritev`,
/// through the page cache); flush is `fdatasync`.
#[derive(Debug)]
pub struct FileBackend {
    file: File,
    path: PathBuf,
    size: u64,
    kind: ImageKind,
    /// `st_dev` and `st_ino` (regular file) or `st_rdev` (block device).
    identity: (u64, u64),
}

fn describe(file_type: FileType) -> &'static str {
    if file_type.is_char_device() {
        "character device"
    } else if file_type.is_fifo() {
        "FIFO"
    } else if file_type.is_socket() {
        "socket"
    } else if file_type.is_symlink() {
        "symbolic link"
    } else {
        "special file"
    }
}

/// The image's kind, or why it is not an image.
fn image_kind(path: &Path, file_type: FileType) -> Result<ImageKind, BlockError> {
    if file_type.is_file() {
        Ok(ImageKind::File)
    } else if file_type.is_block_device() {
        Ok(ImageKind::BlockDevice)
    } else if file_type.is_dir() {
        Err(BlockError::Directory {
            path: path.to_path_buf(),
        })
    } else {
        Err(BlockError::NotAnImage {
            path: path.to_path_buf(),
            kind: describe(file_type),
        })
    }
}

/// What to suggest when opening the image failed.
fn open_hint(error: &io::Error, read_only: bool) -> &'static str {
    match (error.kind(), error.raw_os_error(), read_only) {
        (_, Some(libc::EROFS), false) => "it is on a read-only file system; give readonly=on",
        (io::ErrorKind::PermissionDenied, _, false) => {
            "barge needs to read and write it: fix its permissions, or give readonly=on"
        }
        (io::ErrorKind::PermissionDenied, _, true) => "barge needs to read it: fix its permissions",
        _ => "check the path",
    }
}

impl FileBackend {
    /// Opens the image at `path` (read-only, or read-write) and locks it.
    /// Refused, each with its own [`BlockError`]: a missing path, a
    /// directory, anything but a regular file or a block device, an image
    /// another process holds (any lock when read-write; an exclusive one
    /// when read-only), an empty image and one whose size is not a whole
    /// number of sectors (barge does not round it down).
    pub fn open(path: &Path, read_only: bool) -> Result<Self, BlockError> {
        let owned = || path.to_path_buf();
        // Look before opening: opening a FIFO would block.
        let metadata = fs::metadata(path).map_err(|source| match source.kind() {
            io::ErrorKind::NotFound => BlockError::NotFound { path: owned() },
            _ => BlockError::Open {
                path: owned(),
                hint: open_hint(&source, read_only),
                source,
            },
        })?;
        image_kind(path, metadata.file_type())?;
        let file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(|source| BlockError::Open {
                path: owned(),
                hint: open_hint(&source, read_only),
                source,
            })?;
        // What was opened, in case the path changed in between.
        let metadata = file.metadata().map_err(|source| BlockError::Open {
            path: owned(),
            hint: "check the path",
            source,
        })?;
        let kind = image_kind(path, metadata.file_type())?;
        let lock = if read_only {
            LockKind::Shared
        } else {
            LockKind::Exclusive
        };
        sys::try_lock(&file, lock).map_err(|source| match source.kind() {
            io::ErrorKind::WouldBlock => BlockError::Locked {
                path: owned(),
                read_only,
            },
            _ => BlockError::Lock {
                path: owned(),
                source,
            },
        })?;
        let size = match kind {
            ImageKind::File => metadata.len(),
            // A block device's inode has no size; its end has.
            ImageKind::BlockDevice => {
                (&file)
                    .seek(SeekFrom::End(0))
                    .map_err(|source| BlockError::Size {
                        path: owned(),
                        source,
                    })?
            }
        };
        if size == 0 {
            return Err(BlockError::Empty { path: owned() });
        }
        if size % SECTOR_SIZE != 0 {
            return Err(BlockError::UnalignedSize {
                path: owned(),
                size,
                rounded_up: size.div_ceil(SECTOR_SIZE) * SECTOR_SIZE,
            });
        }
        let identity = match kind {
            ImageKind::File => (metadata.dev(), metadata.ino()),
            ImageKind::BlockDevice => (0, metadata.rdev()),
        };
        Ok(FileBackend {
            file,
            path: owned(),
            size,
            kind,
            identity,
        })
    }

    /// The image's path, as given.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A regular file or a block device.
    pub fn kind(&self) -> ImageKind {
        self.kind
    }

    /// The serial number a disk gets when none is given: the image's
    /// device and inode numbers in hex, `<st_dev>-<st_ino>` (e.g.
    /// `fd01-4c3a2b`), or `dev-<st_rdev>` for a block device; stable while
    /// the file is, and different for two images on one host. Cut to its
    /// last 20 bytes (the virtio limit) if longer.
    pub fn default_serial(&self) -> String {
        let serial = match self.kind {
            ImageKind::File => format!("{:x}-{:x}", self.identity.0, self.identity.1),
            ImageKind::BlockDevice => format!("dev-{:x}", self.identity.1),
        };
        let id_bytes = virtio_bindings::virtio_blk::VIRTIO_BLK_ID_BYTES as usize;
        let skip = serial.len().saturating_sub(id_bytes);
        serial[skip..].to_string()
    }

    /// `fallocate` that reports whether the file system or device lacks
    /// the operation (then the caller falls back).
    fn try_fallocate(&self, mode: FallocateMode, offset: u64, len: u64) -> io::Result<bool> {
        match fallocate(&self.file, mode, true, offset, len) {
            Ok(()) => Ok(true),
            // EOPNOTSUPP: the file system has no such mode (tmpfs has no
            // ZERO_RANGE); EINVAL: a device whose logical block is larger
            // than a sector.
            Err(e) if e.errno() == libc::EOPNOTSUPP || e.errno() == libc::EINVAL => Ok(false),
            Err(e) => Err(e.into()),
        }
    }
}

/// Runs `io` (one `preadv` or `pwritev`) until every byte of `bufs` moved,
/// [`MAX_IOVECS`] slices at a time, resuming after short transfers.
fn transfer_all(
    bufs: &[VolatileSlice<'_>],
    mut offset: u64,
    mut io: impl FnMut(&[VolatileSlice<'_>], u64) -> io::Result<usize>,
) -> io::Result<()> {
    let mut pending: Vec<VolatileSlice<'_>> =
        bufs.iter().filter(|s| !s.is_empty()).copied().collect();
    let mut first = 0;
    while first < pending.len() {
        let end = pending.len().min(first + MAX_IOVECS);
        let mut moved = match io(&pending[first..end], offset) {
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the image ended before the request did (was it truncated while in use?)",
                ))
            }
            Ok(moved) => moved,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        offset += moved as u64;
        while moved > 0 && first < pending.len() {
            let len = pending[first].len();
            if moved >= len {
                moved -= len;
                first += 1;
            } else {
                pending[first] = pending[first]
                    .offset(moved)
                    .map_err(|e| io::Error::other(e.to_string()))?;
                moved = 0;
            }
        }
    }
    Ok(())
}

impl BlockBackend for FileBackend {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&mut self, offset: u64, bufs: &[VolatileSlice<'_>]) -> io::Result<()> {
        transfer_all(bufs, offset, |chunk, at| sys::preadv(&self.file, chunk, at))
    }

    fn write_at(&mut self, offset: u64, bufs: &[VolatileSlice<'_>]) -> io::Result<()> {
        transfer_all(bufs, offset, |chunk, at| {
            sys::pwritev(&self.file, chunk, at)
        })
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn discard(&mut self, offset: u64, len: u64) -> io::Result<()> {
        // Discarding is a hint: where holes cannot be punched, the data
        // simply stays.
        self.try_fallocate(FallocateMode::PunchHole, offset, len)
            .map(|_| ())
    }

    fn write_zeroes(&mut self, offset: u64, len: u64, unmap: bool) -> io::Result<()> {
        // A punched hole reads as zeroes too.
        if unmap && self.try_fallocate(FallocateMode::PunchHole, offset, len)? {
            return Ok(());
        }
        if self.try_fallocate(FallocateMode::ZeroRange, offset, len)? {
            return Ok(());
        }
        const CHUNK: u64 = 1 << 20;
        let zeroes = vec![0u8; CHUNK.min(len) as usize];
        let mut done = 0;
        while done < len {
            let now = CHUNK.min(len - done) as usize;
            self.file.write_all_at(&zeroes[..now], offset + done)?;
            done += now as u64;
        }
        Ok(())
    }
}

/// A disk in memory, for tests and fuzz targets: it counts the calls that
/// reach it and the flushes, and can be told to fail every operation (a
/// host I/O error).
#[cfg(any(test, feature = "fake"))]
#[derive(Debug, Clone)]
pub struct MemoryBackend {
    data: Vec<u8>,
    failing: bool,
    flushes: u64,
    calls: u64,
}

#[cfg(any(test, feature = "fake"))]
impl MemoryBackend {
    /// A zero-filled disk of `sectors` sectors.
    pub fn new(sectors: u64) -> Self {
        MemoryBackend {
            data: vec![0; (sectors * SECTOR_SIZE) as usize],
            failing: false,
            flushes: 0,
            calls: 0,
        }
    }

    /// The disk's bytes.
    pub fn data(&self) -> &[u8] {
        &self.data
    }

    /// The disk's bytes, to fill.
    pub fn data_mut(&mut self) -> &mut [u8] {
        &mut self.data
    }

    /// From now on every operation fails (`true`) or works again.
    pub fn set_failing(&mut self, failing: bool) {
        self.failing = failing;
    }

    /// How many flushes succeeded.
    pub fn flushes(&self) -> u64 {
        self.flushes
    }

    /// How many operations (reads, writes, flushes, discards, write
    /// zeroes) reached the backend, failed ones included.
    pub fn calls(&self) -> u64 {
        self.calls
    }

    fn range(&mut self, offset: u64, len: u64) -> io::Result<&mut [u8]> {
        self.calls += 1;
        if self.failing {
            return Err(io::Error::other("the memory backend was told to fail"));
        }
        let start = usize::try_from(offset).ok();
        let end = offset
            .checked_add(len)
            .and_then(|end| usize::try_from(end).ok());
        match (start, end) {
            (Some(start), Some(end)) if end <= self.data.len() => Ok(&mut self.data[start..end]),
            _ => Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("{len} bytes at {offset} are past the end of the memory disk"),
            )),
        }
    }
}

#[cfg(any(test, feature = "fake"))]
fn total_len(bufs: &[VolatileSlice<'_>]) -> u64 {
    bufs.iter().map(|s| s.len() as u64).sum()
}

#[cfg(any(test, feature = "fake"))]
impl BlockBackend for MemoryBackend {
    fn size(&self) -> u64 {
        self.data.len() as u64
    }

    fn read_at(&mut self, offset: u64, bufs: &[VolatileSlice<'_>]) -> io::Result<()> {
        let mut bytes: &[u8] = self.range(offset, total_len(bufs))?;
        for slice in bufs {
            let (now, rest) = bytes.split_at(slice.len());
            slice.copy_from(now);
            bytes = rest;
        }
        Ok(())
    }

    fn write_at(&mut self, offset: u64, bufs: &[VolatileSlice<'_>]) -> io::Result<()> {
        let mut bytes = self.range(offset, total_len(bufs))?;
        for slice in bufs {
            let (now, rest) = bytes.split_at_mut(slice.len());
            slice.copy_to(now);
            bytes = rest;
        }
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.range(0, 0)?;
        self.flushes += 1;
        Ok(())
    }

    fn discard(&mut self, offset: u64, len: u64) -> io::Result<()> {
        self.range(offset, len)?.fill(0);
        Ok(())
    }

    fn write_zeroes(&mut self, offset: u64, len: u64, _unmap: bool) -> io::Result<()> {
        self.range(offset, len)?.fill(0);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use vmm_sys_util::tempdir::TempDir;
    use vmm_sys_util::tempfile::TempFile;

    use super::*;

    fn image(size: u64) -> TempFile {
        let file = TempFile::new_with_prefix("/tmp/barge-blk-test").unwrap();
        file.as_file().set_len(size).unwrap();
        file
    }

    fn message(result: Result<FileBackend, BlockError>) -> String {
        result.unwrap_err().to_string()
    }

    #[test]
    fn a_missing_image_is_named_with_what_to_do() {
        let dir = TempDir::new_with_prefix("/tmp/barge-blk-test").unwrap();
        let path = dir.as_path().join("nothing.img");
        let err = FileBackend::open(&path, false).unwrap_err();
        assert!(matches!(err, BlockError::NotFound { .. }), "{err:?}");
        let text = err.to_string();
        assert!(text.contains(&path.display().to_string()), "{text}");
        assert!(text.contains("does not exist"), "{text}");
        assert!(text.contains("truncate -s"), "{text}");
    }

    #[test]
    fn a_directory_and_a_character_device_are_not_images() {
        let dir = TempDir::new_with_prefix("/tmp/barge-blk-test").unwrap();
        let err = FileBackend::open(dir.as_path(), true).unwrap_err();
        assert!(matches!(err, BlockError::Directory { .. }), "{err:?}");
        assert!(err.to_string().contains("is a directory"), "{err}");
        let text = message(FileBackend::open(Path::new("/dev/null"), true));
        assert_eq!(
            text,
            "disk image /dev/null is a character device, not a regular file or block \
             device; give a raw disk image file or a block device"
        );
    }

    #[test]
    fn sizes_must_be_whole_sectors_and_not_zero() {
        let odd = image(1000);
        let text = message(FileBackend::open(odd.as_path(), false));
        assert!(text.contains("1000 bytes"), "{text}");
        assert!(
            text.contains(&format!("truncate -s 1024 {}", odd.as_path().display())),
            "{text}"
        );
        let empty = image(0);
        let text = message(FileBackend::open(empty.as_path(), true));
        assert!(text.contains("is empty"), "{text}");
    }

    #[test]
    fn a_read_write_image_is_locked_against_a_second_open() {
        let file = image(4096);
        let first = FileBackend::open(file.as_path(), false).unwrap();
        for read_only in [false, true] {
            let err = FileBackend::open(file.as_path(), read_only).unwrap_err();
            assert!(matches!(err, BlockError::Locked { .. }), "{err:?}");
            let text = err.to_string();
            assert!(
                text.contains(&file.as_path().display().to_string()),
                "{text}"
            );
            assert!(text.contains("another process"), "{text}");
        }
        drop(first);
        // Read-only users share the image, but keep writers out.
        let reader = FileBackend::open(file.as_path(), true).unwrap();
        let _second_reader = FileBackend::open(file.as_path(), true).unwrap();
        let err = FileBackend::open(file.as_path(), false).unwrap_err();
        assert!(
            matches!(
                err,
                BlockError::Locked {
                    read_only: false,
                    ..
                }
            ),
            "{err:?}"
        );
        drop(reader);
    }

    #[test]
    fn open_failures_say_what_access_is_missing() {
        let denied = io::Error::from(io::ErrorKind::PermissionDenied);
        assert!(open_hint(&denied, false).contains("give readonly=on"));
        assert_eq!(
            open_hint(&denied, true),
            "barge needs to read it: fix its permissions"
        );
        let read_only_fs = io::Error::from_raw_os_error(libc::EROFS);
        assert_eq!(
            open_hint(&read_only_fs, false),
            "it is on a read-only file system; give readonly=on"
        );
        let text = BlockError::Open {
            path: "/x.img".into(),
            hint: open_hint(&denied, false),
            source: denied,
        }
        .to_string();
        assert!(
            text.starts_with("cannot open disk image /x.img: "),
            "{text}"
        );
    }

    #[test]
    fn file_io_crosses_many_slices_and_reaches_the_image() {
        let file = image(1 << 20);
        let mut backend = FileBackend::open(file.as_path(), false).unwrap();
        assert_eq!(backend.size(), 1 << 20);
        assert_eq!(backend.kind(), ImageKind::File);
        // More slices than one pwritev takes, of uneven sizes.
        let mut source: Vec<u8> = (0..(MAX_IOVECS * 3 / 2 * 7)).map(|i| i as u8).collect();
        let total = source.len();
        let slices: Vec<VolatileSlice<'_>> =
            source.chunks_mut(7).map(VolatileSlice::from).collect();
        backend.write_at(4096, &slices).unwrap();
        backend.flush().unwrap();
        let mut on_disk = vec![0u8; total];
        file.as_file().read_exact_at(&mut on_disk, 4096).unwrap();
        assert_eq!(on_disk, source);
        let mut back = vec![0u8; total];
        let slices: Vec<VolatileSlice<'_>> = back.chunks_mut(5).map(VolatileSlice::from).collect();
        backend.read_at(4096, &slices).unwrap();
        assert_eq!(back, source);
        // Past the end of the file: an error, not a short read.
        let mut tail = vec![0u8; 1024];
        let err = backend
            .read_at((1 << 20) - 512, &[VolatileSlice::from(&mut tail[..])])
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
    }

    #[test]
    fn discard_and_write_zeroes_leave_zeroes_in_the_file() {
        let file = image(64 << 10);
        let mut backend = FileBackend::open(file.as_path(), false).unwrap();
        for (offset, len, unmap) in [
            (4096, 8192, false),
            (20480, 4096, true),
            (30720, 1536, true),
        ] {
            file.as_file().write_all_at(&[0xaa; 16384], offset).unwrap();
            backend.write_zeroes(offset, len, unmap).unwrap();
            let mut back = vec![0u8; 16384];
            file.as_file().read_exact_at(&mut back, offset).unwrap();
            assert!(back[..len as usize].iter().all(|b| *b == 0));
            assert!(back[len as usize..].iter().all(|b| *b == 0xaa));
        }
        backend.discard(0, 4096).unwrap();
        assert_eq!(backend.size(), 64 << 10, "the size is kept");
        assert_eq!(file.as_file().metadata().unwrap().len(), 64 << 10);
    }

    #[test]
    fn the_default_serial_comes_from_device_and_inode() {
        let file = image(4096);
        let backend = FileBackend::open(file.as_path(), true).unwrap();
        let metadata = fs::metadata(file.as_path()).unwrap();
        let expected = format!("{:x}-{:x}", metadata.dev(), metadata.ino());
        let skip = expected.len().saturating_sub(20);
        assert_eq!(backend.default_serial(), expected[skip..]);
        assert!(backend.default_serial().len() <= 20);
    }

    #[test]
    fn the_memory_backend_refuses_ranges_past_its_end_and_fails_on_demand() {
        let mut backend = MemoryBackend::new(2);
        let mut buf = [0u8; 512];
        let slice = [VolatileSlice::from(&mut buf[..])];
        backend.read_at(512, &slice).unwrap();
        assert!(backend.read_at(1024, &slice).is_err());
        assert!(backend.write_at(u64::MAX, &slice).is_err());
        assert!(backend.write_zeroes(512, u64::MAX, false).is_err());
        backend.set_failing(true);
        assert!(backend.flush().is_err());
        assert_eq!(backend.flushes(), 0);
    }
}
