//! KVM's own statistics through the binary stats fd (`KVM_GET_STATS_FD`,
//! Linux 5.14+).
//!
//! The fd's contents (Documentation/virt/kvm/api.rst, "KVM_GET_STATS_FD"):
//!
//! - at offset 0 a `kvm_stats_header`: `flags`, `name_size`, `num_desc`,
//!   `id_offset`, `desc_offset`, `data_offset` (six `u32`s);
//! - at `desc_offset`, `num_desc` descriptors, each a 16-byte
//!   `kvm_stats_desc` (`flags: u32`, `exponent: i16`, `size: u16`,
//!   `offset: u32`, `bucket_size: u32`) followed by a NUL-padded name of
//!   `name_size` bytes;
//! - at `data_offset`, the values: descriptor `d`'s `d.size` `u64`s start at
//!   `data_offset + d.offset`.
//!
//! [`parse_stats`] turns those bytes into name → value. A statistic with one
//! value maps to it; a statistic with several (histograms: one value per
//! bucket) maps to the sum of its buckets, i.e. the number of samples.
//! Values are raw (no unit or exponent applied). kvm-ioctls 0.25 has no
//! wrapper for the ioctl, so [`KvmStatsFd::open`] issues it directly.

use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;

/// Errors reading or parsing KVM statistics.
#[derive(Debug, thiserror::Error)]
pub enum KvmStatsError {
    /// The ioctl failed (kernels before 5.14 do not have it).
    #[error("cannot open KVM's statistics (KVM_GET_STATS_FD needs Linux 5.14 or later): {0}")]
    Open(io::Error),
    /// Reading the stats fd failed.
    #[error("cannot read KVM's statistics: {0}")]
    Read(io::Error),
    /// The buffer is shorter than a structure it should hold.
    #[error(
        "KVM statistics are truncated: {what} needs bytes {start}..{end} but there are only {len}"
    )]
    Truncated {
        /// What was being read.
        what: &'static str,
        /// Start offset.
        start: u64,
        /// End offset (exclusive).
        end: u64,
        /// Buffer length.
        len: usize,
    },
    /// The header's name size is smaller than a NUL byte.
    #[error("KVM statistics header has a name size of 0")]
    ZeroNameSize,
}

/// Size of `kvm_stats_header`.
pub const HEADER_SIZE: usize = 24;
/// Size of `kvm_stats_desc` without its name.
pub const DESC_FIXED_SIZE: usize = 16;

/// `kvm_stats_header`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StatsHeader {
    /// Always 0 for now.
    pub flags: u32,
    /// Bytes reserved for each descriptor's name, NUL included.
    pub name_size: u32,
    /// Number of descriptors.
    pub num_desc: u32,
    /// Offset of the id string.
    pub id_offset: u32,
    /// Offset of the first descriptor.
    pub desc_offset: u32,
    /// Offset of the data block.
    pub data_offset: u32,
}

/// One `kvm_stats_desc` with its name decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatsDescriptor {
    /// Type, unit and base (KVM_STATS_TYPE_*, KVM_STATS_UNIT_*, KVM_STATS_BASE_*).
    pub flags: u32,
    /// Unit exponent.
    pub exponent: i16,
    /// Number of u64 values.
    pub size: u16,
    /// Offset of the values from the data block, in bytes.
    pub offset: u32,
    /// Bucket size of linear histograms.
    pub bucket_size: u32,
    /// The statistic's name, e.g. "pages_4k".
    pub name: String,
}

fn slice<'a>(
    bytes: &'a [u8],
    what: &'static str,
    start: u64,
    len: u64,
) -> Result<&'a [u8], KvmStatsError> {
    let end = start.saturating_add(len);
    let truncated = KvmStatsError::Truncated {
        what,
        start,
        end,
        len: bytes.len(),
    };
    let (Ok(start_index), Ok(end_index)) = (usize::try_from(start), usize::try_from(end)) else {
        return Err(truncated);
    };
    bytes.get(start_index..end_index).ok_or(truncated)
}

fn u32_at(bytes: &[u8], at: usize) -> u32 {
    let mut word = [0u8; 4];
    word.copy_from_slice(&bytes[at..at + 4]);
    u32::from_ne_bytes(word)
}

/// Parses the header at the start of `bytes`.
pub fn parse_header(bytes: &[u8]) -> Result<StatsHeader, KvmStatsError> {
    let raw = slice(bytes, "the header", 0, HEADER_SIZE as u64)?;
    Ok(StatsHeader {
        flags: u32_at(raw, 0),
        name_size: u32_at(raw, 4),
        num_desc: u32_at(raw, 8),
        id_offset: u32_at(raw, 12),
        desc_offset: u32_at(raw, 16),
        data_offset: u32_at(raw, 20),
    })
}

/// Parses every descriptor `header` announces.
pub fn parse_descriptors(
    bytes: &[u8],
    header: &StatsHeader,
) -> Result<Vec<StatsDescriptor>, KvmStatsError> {
    if header.name_size == 0 {
        return Err(KvmStatsError::ZeroNameSize);
    }
    let stride = DESC_FIXED_SIZE as u64 + u64::from(header.name_size);
    (0..u64::from(header.num_desc))
        .map(|index| {
            let start = u64::from(header.desc_offset) + index * stride;
            let raw = slice(bytes, "a descriptor", start, stride)?;
            let name_bytes = &raw[DESC_FIXED_SIZE..];
            let name_len = name_bytes
                .iter()
                .position(|b| *b == 0)
                .unwrap_or(name_bytes.len());
            Ok(StatsDescriptor {
                flags: u32_at(raw, 0),
                exponent: i16::from_ne_bytes([raw[4], raw[5]]),
                size: u16::from_ne_bytes([raw[6], raw[7]]),
                offset: u32_at(raw, 8),
                bucket_size: u32_at(raw, 12),
                name: String::from_utf8_lossy(&name_bytes[..name_len]).into_owned(),
            })
        })
        .collect()
}

/// Parses a whole stats fd image into name → value (one value as is,
/// several summed; see the module docs). Pure: no KVM involved.
pub fn parse_stats(bytes: &[u8]) -> Result<BTreeMap<String, u64>, KvmStatsError> {
    let header = parse_header(bytes)?;
    let descriptors = parse_descriptors(bytes, &header)?;
    let mut stats = BTreeMap::new();
    for desc in descriptors {
        let start = u64::from(header.data_offset) + u64::from(desc.offset);
        let raw = slice(bytes, "statistics data", start, u64::from(desc.size) * 8)?;
        let value = raw
            .chunks_exact(8)
            .map(|chunk| {
                let mut word = [0u8; 8];
                word.copy_from_slice(chunk);
                u64::from_ne_bytes(word)
            })
            .fold(0u64, u64::wrapping_add);
        stats.insert(desc.name, value);
    }
    Ok(stats)
}

/// The VM's statistics fd, opened once and readable any number of times.
#[derive(Debug)]
pub struct KvmStatsFd {
    file: File,
}

impl KvmStatsFd {
    /// Opens the statistics fd of a VM (pass the `kvm_ioctls::VmFd`) or a
    /// vCPU (its `VcpuFd`).
    pub fn open(vm: &impl AsRawFd) -> Result<Self, KvmStatsError> {
        sys::get_stats_fd(vm)
            .map(|file| KvmStatsFd { file })
            .map_err(KvmStatsError::Open)
    }

    /// Reads the whole fd from offset 0.
    pub fn read_bytes(&self) -> Result<Vec<u8>, KvmStatsError> {
        let mut bytes = Vec::new();
        let mut chunk = vec![0u8; 16 * 1024];
        loop {
            let read = self
                .file
                .read_at(&mut chunk, bytes.len() as u64)
                .map_err(KvmStatsError::Read)?;
            if read == 0 {
                return Ok(bytes);
            }
            bytes.extend_from_slice(&chunk[..read]);
        }
    }

    /// Reads and parses the current statistics.
    pub fn read(&self) -> Result<BTreeMap<String, u64>, KvmStatsError> {
        parse_stats(&self.read_bytes()?)
    }
}

/// Opens the stats fd of `vm` and reads it once.
pub fn read_vm_stats(vm: &impl AsRawFd) -> Result<BTreeMap<String, u64>, KvmStatsError> {
    KvmStatsFd::open(vm)?.read()
}

/// The ioctl.
mod sys {
    use std::fs::File;
    use std::io;
    use std::os::fd::{AsRawFd, FromRawFd};

    use vmm_sys_util::ioctl::ioctl;
    use vmm_sys_util::ioctl_io_nr;

    const KVMIO: u32 = 0xAE;
    ioctl_io_nr!(KVM_GET_STATS_FD, KVMIO, 0xce);

    /// KVM_GET_STATS_FD on a VM or vCPU fd.
    pub fn get_stats_fd(fd: &impl AsRawFd) -> io::Result<File> {
        // SAFETY: KVM_GET_STATS_FD takes no argument and only returns a new
        // fd (or -1); on a non-KVM fd the kernel rejects the request number.
        let ret = unsafe { ioctl(fd, KVM_GET_STATS_FD()) };
        if ret < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: ret is a new fd the kernel just gave us and nothing else
        // owns; the File takes sole ownership and closes it.
        Ok(unsafe { File::from_raw_fd(ret) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds a stats image the way KVM lays it out: header, id, descriptors,
    /// data.
    fn build_image(name_size: u32, stats: &[(&str, &[u64])]) -> Vec<u8> {
        let id = b"kvm-1234\0\0\0\0\0\0\0\0";
        let id_offset = HEADER_SIZE as u32;
        let desc_offset = id_offset + id.len() as u32;
        let stride = DESC_FIXED_SIZE as u32 + name_size;
        let data_offset = desc_offset + stride * stats.len() as u32;
        let mut out = Vec::new();
        for word in [
            0,
            name_size,
            stats.len() as u32,
            id_offset,
            desc_offset,
            data_offset,
        ] {
            out.extend_from_slice(&word.to_ne_bytes());
        }
        out.extend_from_slice(id);
        let mut data = Vec::new();
        for (name, values) in stats {
            out.extend_from_slice(&1u32.to_ne_bytes()); // flags: instant
            out.extend_from_slice(&0i16.to_ne_bytes());
            out.extend_from_slice(&(values.len() as u16).to_ne_bytes());
            out.extend_from_slice(&((data.len() * 8) as u32).to_ne_bytes());
            out.extend_from_slice(&0u32.to_ne_bytes());
            let mut name_field = name.as_bytes().to_vec();
            name_field.resize(name_size as usize, 0);
            out.extend_from_slice(&name_field);
            data.extend_from_slice(values);
        }
        for value in data {
            out.extend_from_slice(&value.to_ne_bytes());
        }
        out
    }

    #[test]
    fn parses_scalars_and_sums_histograms() {
        let image = build_image(
            48,
            &[
                ("pages_4k", &[1200]),
                ("pages_2m", &[250]),
                ("pages_1g", &[0]),
                ("halt_wait_hist", &[1, 2, 3, 4]),
                ("empty", &[]),
            ],
        );
        let stats = parse_stats(&image).unwrap();
        assert_eq!(stats["pages_4k"], 1200);
        assert_eq!(stats["pages_2m"], 250);
        assert_eq!(stats["pages_1g"], 0);
        assert_eq!(stats["halt_wait_hist"], 10);
        assert_eq!(stats["empty"], 0);
        assert_eq!(stats.len(), 5);
    }

    #[test]
    fn parses_header_and_descriptors() {
        let image = build_image(16, &[("a", &[7, 8])]);
        let header = parse_header(&image).unwrap();
        assert_eq!(header.name_size, 16);
        assert_eq!(header.num_desc, 1);
        assert_eq!(header.id_offset, 24);
        assert_eq!(header.desc_offset, 40);
        assert_eq!(header.data_offset, 72);
        let descriptors = parse_descriptors(&image, &header).unwrap();
        assert_eq!(
            descriptors,
            vec![StatsDescriptor {
                flags: 1,
                exponent: 0,
                size: 2,
                offset: 0,
                bucket_size: 0,
                name: "a".into()
            }]
        );
    }

    #[test]
    fn name_filling_the_whole_field_needs_no_nul() {
        let image = build_image(8, &[("abcdefgh", &[5])]);
        assert_eq!(parse_stats(&image).unwrap()["abcdefgh"], 5);
    }

    #[test]
    fn empty_stats_parse_to_an_empty_map() {
        assert!(parse_stats(&build_image(48, &[])).unwrap().is_empty());
    }

    #[test]
    fn every_truncation_is_an_error_not_a_panic() {
        let image = build_image(48, &[("pages_4k", &[1]), ("hist", &[1, 2, 3])]);
        for len in 0..image.len() {
            assert!(
                matches!(
                    parse_stats(&image[..len]),
                    Err(KvmStatsError::Truncated { .. })
                ),
                "length {len}"
            );
        }
    }

    #[test]
    fn absurd_offsets_and_counts_are_errors() {
        let mut image = build_image(48, &[("x", &[1])]);
        // num_desc = u32::MAX
        image[8..12].copy_from_slice(&u32::MAX.to_ne_bytes());
        assert!(parse_stats(&image).is_err());
        let mut image = build_image(48, &[("x", &[1])]);
        // data_offset = u32::MAX
        image[20..24].copy_from_slice(&u32::MAX.to_ne_bytes());
        assert!(parse_stats(&image).is_err());
        let mut image = build_image(48, &[("x", &[1])]);
        // name_size = 0
        image[4..8].copy_from_slice(&0u32.to_ne_bytes());
        assert!(matches!(
            parse_stats(&image),
            Err(KvmStatsError::ZeroNameSize)
        ));
    }

    #[test]
    fn random_bytes_never_panic() {
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        for len in [0usize, 7, 24, 64, 300] {
            for _ in 0..200 {
                let bytes: Vec<u8> = (0..len)
                    .map(|_| {
                        state ^= state << 13;
                        state ^= state >> 7;
                        state ^= state << 17;
                        state as u8
                    })
                    .collect();
                let _ = parse_stats(&bytes);
            }
        }
    }

    /// Needs /dev/kvm: reads the real VM statistics of an empty VM.
    #[test]
    fn real_kvm_vm_stats_have_page_counters() {
        if !guest_programs::testing::kvm_or_skip("real_kvm_vm_stats_have_page_counters") {
            return;
        }
        let kvm = kvm_ioctls::Kvm::new().expect("/dev/kvm (kvm_or_skip checked it)");
        let vm = kvm.create_vm().expect("create a VM");
        let stats_fd = match KvmStatsFd::open(&vm) {
            Ok(fd) => fd,
            Err(e) => {
                eprintln!("skipping: {e}");
                return;
            }
        };
        let stats = stats_fd.read().unwrap();
        for name in ["pages_4k", "pages_2m", "pages_1g"] {
            assert!(stats.contains_key(name), "{name} missing from {stats:?}");
        }
        assert_eq!(stats_fd.read().unwrap()["pages_4k"], stats["pages_4k"]);
    }
}
