//! The typed VM configuration.
//!
//! One [`VmConfig`] describes a VM whether it comes from `barge run` flags,
//! from a JSON file (`--config vm.json`) or from an embedder building it in
//! code. A JSON file looks like this (only `kernel` is required):
//!
//! ```json
//! {
//!   "kernel": "/lab/guest/bzImage",
//!   "initramfs": "/lab/guest/initramfs.cpio.gz",
//!   "cmdline": "console=ttyS0 reboot=k panic=1",
//!   "cpus": 2,
//!   "memory": { "size": "512M", "hugepages": "2M", "shared": false },
//!   "serial": "stdio",
//!   "on_reboot": "stop",
//!   "report": "/tmp/report.json"
//! }
//! ```
//!
//! Sizes are a number of bytes or a string with a binary suffix (`K`, `M`,
//! `G`, `T`: powers of 1024). `serial` is `"stdio"`, `"none"` or
//! `"file=PATH"`, the same syntax as `--serial`. Unknown fields are errors.
//!
//! The `--memory` and `--serial` option syntaxes are parsed here too
//! ([`MemoryConfig`] and [`SerialConfig`] implement [`FromStr`]), so the CLI
//! and the JSON file cannot disagree.

use std::collections::BTreeSet;
use std::fmt;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Kernel command line used when none is given: the console on COM1 (where
/// barge's 8250 sits), reboot through the keyboard controller barge
/// emulates, and a reboot one second after a panic so that a crashing guest
/// ends the VM (with `on_reboot=stop`) instead of hanging.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=1";
/// Guest memory size used when none is given.
pub const DEFAULT_MEMORY_SIZE: u64 = 512 << 20;
/// Smallest guest memory barge accepts: room for the boot structures, a
/// kernel and its early allocations.
pub const MIN_MEMORY_SIZE: u64 = 32 << 20;
/// Page size every memory size must be a multiple of.
pub const BASE_PAGE_SIZE: u64 = 4096;

/// Errors in a configuration: parsing a file, an option, or validating.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The configuration file could not be read.
    #[error("cannot read the configuration file {path}: {source}")]
    ReadFile {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The configuration file is not valid JSON for a [`VmConfig`].
    #[error("invalid configuration file {path}: {source}")]
    ParseFile {
        /// The file.
        path: PathBuf,
        /// What serde said (it names the field and line).
        source: serde_json::Error,
    },
    /// A size string could not be parsed.
    #[error("invalid size {input:?}: {reason}; write a number of bytes or a number with K, M, G or T (powers of 1024), e.g. 512M")]
    InvalidSize {
        /// The text given.
        input: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A huge page size other than 2M or 1G.
    #[error("invalid huge page size {0:?}: use hugepages=2M or hugepages=1G")]
    InvalidHugePageSize(String),
    /// An item of a key=value list has no '='.
    #[error("{option}: expected key=value but found {item:?}; e.g. {example}")]
    MissingEquals {
        /// The option (e.g. "--memory").
        option: &'static str,
        /// The offending item.
        item: String,
        /// A correct example.
        example: &'static str,
    },
    /// A key=value list has a key the option does not know.
    #[error("{option}: unknown key {key:?}; valid keys: {valid}")]
    UnknownKey {
        /// The option.
        option: &'static str,
        /// The key given.
        key: String,
        /// The valid keys, comma-separated.
        valid: String,
    },
    /// A key=value list gives a key twice.
    #[error("{option}: key {key:?} is given twice; give each key once")]
    DuplicateKey {
        /// The option.
        option: &'static str,
        /// The repeated key.
        key: String,
    },
    /// A key=value list lacks a required key.
    #[error("{option}: missing {key}=...; e.g. {example}")]
    MissingKey {
        /// The option.
        option: &'static str,
        /// The missing key.
        key: &'static str,
        /// A correct example.
        example: &'static str,
    },
    /// An on/off value that is neither.
    #[error("{option}: {key}={value:?} is not on or off")]
    InvalidSwitch {
        /// The option.
        option: &'static str,
        /// The key.
        key: &'static str,
        /// The value given.
        value: String,
    },
    /// `--serial` with a value that is not stdio, none or file=PATH.
    #[error("invalid serial output {0:?}: use stdio, none or file=PATH")]
    InvalidSerial(String),
    /// `--on-reboot` with a value that is not stop or restart.
    #[error("invalid on-reboot action {0:?}: use stop or restart")]
    InvalidOnReboot(String),
    /// Zero vCPUs.
    #[error("cpus must be at least 1")]
    ZeroCpus,
    /// A vCPU count that does not fit.
    #[error("invalid cpus {0:?}: give a number from 1 to 255")]
    InvalidCpus(String),
    /// Memory below [`MIN_MEMORY_SIZE`].
    #[error("memory size {} is too small: barge needs at least {}", format_size(*size), format_size(MIN_MEMORY_SIZE))]
    MemoryTooSmall {
        /// The size asked for.
        size: u64,
    },
    /// Memory not a multiple of the page size in use.
    #[error("memory size {} is not a multiple of the {} page size; round it to a multiple of {}", format_size(*size), format_size(*page_size), format_size(*page_size))]
    MemoryNotPageMultiple {
        /// The size asked for.
        size: u64,
        /// The page size it must be a multiple of.
        page_size: u64,
    },
    /// A file the VM needs cannot be opened for reading.
    #[error("cannot read the {what} {path}: {source}")]
    UnreadableFile {
        /// "kernel" or "initramfs".
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A path that should be a regular file is something else.
    #[error("the {what} {path} is not a regular file")]
    NotAFile {
        /// "kernel" or "initramfs".
        what: &'static str,
        /// The path.
        path: PathBuf,
    },
    /// A `--device`, `--shmem` or `--vfio-backend` value (or its JSON form).
    #[error(transparent)]
    Device(#[from] DeviceConfigError),
    /// The directory of the serial output file does not exist.
    #[error("cannot write the serial output to {path}: its directory does not exist")]
    SerialDirMissing {
        /// The file.
        path: PathBuf,
    },
}

/// A complete VM configuration (see the module docs for the JSON form).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    /// Kernel image: a bzImage or an ELF vmlinux.
    pub kernel: PathBuf,
    /// Initial ramdisk loaded next to the kernel.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initramfs: Option<PathBuf>,
    /// Kernel command line.
    #[serde(default = "default_cmdline")]
    pub cmdline: String,
    /// Number of vCPUs, 1..=255.
    #[serde(default = "default_cpus")]
    pub cpus: u8,
    /// Guest RAM and its backing.
    #[serde(default)]
    pub memory: MemoryConfig,
    /// Where the guest's COM1 output goes.
    #[serde(default)]
    pub serial: SerialConfig,
    /// What a guest reboot does.
    #[serde(default)]
    pub on_reboot: OnReboot,
    /// Where to write the JSON report at exit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub report: Option<PathBuf>,
    /// Extra PCI devices: VFIO passthrough and shared memory, in the order
    /// they get guest device numbers (see `device_config`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub devices: Vec<DeviceConfig>,
    /// The VFIO interface for every VFIO device.
    #[serde(default, with = "crate::config::devices::vfio_backend_text")]
    pub vfio_backend: VfioBackendKind,
    /// Pre-fault every mapped BAR into KVM before the guest runs and count
    /// what KVM mapped (the default). `false` leaves BARs to fault in on
    /// the guest's first touch (what `barge bench` measures); the report's
    /// `mapped` and `prefault_ms` are then null.
    #[serde(default = "default_prefault_bars", skip_serializing_if = "is_true")]
    pub prefault_bars: bool,
    /// seccomp filters for barge's threads (on unless told otherwise).
    #[serde(default)]
    pub seccomp: SeccompMode,
}

fn default_prefault_bars() -> bool {
    true
}

fn is_true(value: &bool) -> bool {
    *value
}

fn default_cmdline() -> String {
    DEFAULT_CMDLINE.to_string()
}

fn default_cpus() -> u8 {
    1
}

pub mod devices;

pub use crate::config::devices::{
    BarAlign, DeviceConfig, DeviceConfigError, ShmemConfig, VfioBackendKind, VfioConfig,
};
pub use crate::seccomp::SeccompMode;

impl VmConfig {
    /// A configuration with the given kernel and every default.
    pub fn new(kernel: impl Into<PathBuf>) -> Self {
        VmConfig {
            kernel: kernel.into(),
            initramfs: None,
            cmdline: default_cmdline(),
            cpus: default_cpus(),
            memory: MemoryConfig::default(),
            serial: SerialConfig::default(),
            on_reboot: OnReboot::default(),
            report: None,
            devices: Vec::new(),
            vfio_backend: VfioBackendKind::default(),
            prefault_bars: default_prefault_bars(),
            seccomp: SeccompMode::default(),
        }
    }

    /// Parses a configuration from JSON text.
    pub fn from_json_str(json: &str) -> Result<Self, serde_json::Error> {
        serde_json::from_str(json)
    }

    /// Reads and parses a JSON configuration file.
    pub fn from_json_file(path: impl AsRef<Path>) -> Result<Self, ConfigError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::ReadFile {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_json_str(&text).map_err(|source| ConfigError::ParseFile {
            path: path.to_path_buf(),
            source,
        })
    }

    /// The configuration as pretty JSON (what [`Self::from_json_str`] reads).
    pub fn to_json_string(&self) -> String {
        // Serializing these plain types to a string cannot fail; fall back
        // to an empty object rather than panic if it ever did.
        serde_json::to_string_pretty(self).unwrap_or_else(|_| "{}".to_string())
    }

    /// Checks what can be checked without KVM: the vCPU count, the memory
    /// size against [`MIN_MEMORY_SIZE`] and the page size, that the kernel
    /// and initramfs are readable regular files and that the serial output
    /// file's directory exists. Limits that need KVM (the maximum vCPU count)
    /// and the report path (see `report::check_writable`) are checked by
    /// the caller.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.cpus == 0 {
            return Err(ConfigError::ZeroCpus);
        }
        self.memory.validate()?;
        crate::config::devices::validate_devices(&self.devices)?;
        check_readable_file("kernel", &self.kernel)?;
        if let Some(initramfs) = &self.initramfs {
            check_readable_file("initramfs", initramfs)?;
        }
        if let SerialConfig::File(path) = &self.serial {
            let dir = match path.parent() {
                Some(dir) if !dir.as_os_str().is_empty() => dir,
                _ => Path::new("."),
            };
            if !dir.is_dir() {
                return Err(ConfigError::SerialDirMissing { path: path.clone() });
            }
        }
        Ok(())
    }
}

fn check_readable_file(what: &'static str, path: &Path) -> Result<(), ConfigError> {
    let file = File::open(path).map_err(|source| ConfigError::UnreadableFile {
        what,
        path: path.to_path_buf(),
        source,
    })?;
    let metadata = file
        .metadata()
        .map_err(|source| ConfigError::UnreadableFile {
            what,
            path: path.to_path_buf(),
            source,
        })?;
    if !metadata.is_file() {
        return Err(ConfigError::NotAFile {
            what,
            path: path.to_path_buf(),
        });
    }
    Ok(())
}

/// Parses a vCPU count: 1..=255.
pub fn parse_cpus(text: &str) -> Result<u8, ConfigError> {
    match text.trim().parse::<u8>() {
        Ok(0) => Err(ConfigError::ZeroCpus),
        Ok(n) => Ok(n),
        Err(_) => Err(ConfigError::InvalidCpus(text.to_string())),
    }
}

/// Parses a size: decimal digits with an optional binary suffix `K`, `M`,
/// `G` or `T` (case-insensitive, powers of 1024), e.g. `"4096"`, `"512M"`,
/// `"1G"`. No fractions, signs or spaces inside.
pub fn parse_size(text: &str) -> Result<u64, ConfigError> {
    let invalid = |reason| ConfigError::InvalidSize {
        input: text.to_string(),
        reason,
    };
    let trimmed = text.trim();
    if trimmed.is_empty() {
        return Err(invalid("it is empty"));
    }
    let digits_end = trimmed
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(trimmed.len());
    let (digits, suffix) = trimmed.split_at(digits_end);
    if digits.is_empty() {
        return Err(invalid("it does not start with a number"));
    }
    let shift = match suffix {
        "" => 0,
        "k" | "K" => 10,
        "m" | "M" => 20,
        "g" | "G" => 30,
        "t" | "T" => 40,
        _ => return Err(invalid("unknown suffix")),
    };
    let number: u64 = digits
        .parse()
        .map_err(|_| invalid("the number is too large"))?;
    number
        .checked_mul(1u64 << shift)
        .ok_or_else(|| invalid("the size is too large"))
}

/// Formats a size the way [`parse_size`] reads it, with the largest exact
/// suffix: `format_size(512 << 20) == "512M"`.
pub fn format_size(size: u64) -> String {
    for (shift, suffix) in [(40, "T"), (30, "G"), (20, "M"), (10, "K")] {
        let unit = 1u64 << shift;
        if size != 0 && size % unit == 0 {
            return format!("{}{suffix}", size / unit);
        }
    }
    size.to_string()
}

pub(crate) fn deserialize_size<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<u64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum SizeRepr {
        Number(u64),
        Text(String),
    }
    match SizeRepr::deserialize(deserializer)? {
        SizeRepr::Number(n) => Ok(n),
        SizeRepr::Text(s) => parse_size(&s).map_err(serde::de::Error::custom),
    }
}

/// Huge page size for hugetlbfs-backed memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum HugePageSize {
    /// 2 MiB pages.
    #[serde(rename = "2M")]
    Size2M,
    /// 1 GiB pages.
    #[serde(rename = "1G")]
    Size1G,
}

impl HugePageSize {
    /// The page size in bytes.
    pub fn bytes(self) -> u64 {
        match self {
            HugePageSize::Size2M => 2 << 20,
            HugePageSize::Size1G => 1 << 30,
        }
    }

    /// The page size in KiB, as in `/sys/kernel/mm/hugepages/hugepages-<N>kB`.
    pub fn kib(self) -> u64 {
        self.bytes() >> 10
    }
}

impl fmt::Display for HugePageSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            HugePageSize::Size2M => "2M",
            HugePageSize::Size1G => "1G",
        })
    }
}

impl FromStr for HugePageSize {
    type Err = ConfigError;

    fn from_str(text: &str) -> Result<Self, ConfigError> {
        match parse_size(text) {
            Ok(size) if size == 2 << 20 => Ok(HugePageSize::Size2M),
            Ok(size) if size == 1 << 30 => Ok(HugePageSize::Size1G),
            _ => Err(ConfigError::InvalidHugePageSize(text.to_string())),
        }
    }
}

/// Guest RAM: its size and how the host backs it.
///
/// On the command line: `size=512M[,hugepages=2M|1G][,shared=on|off]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemoryConfig {
    /// Total guest RAM in bytes (split around the 32-bit MMIO hole).
    #[serde(deserialize_with = "deserialize_size")]
    pub size: u64,
    /// Back RAM with hugetlbfs pages of this size; `None`: ordinary pages
    /// with transparent huge pages advised.
    #[serde(default)]
    pub hugepages: Option<HugePageSize>,
    /// Back RAM with a memfd mapped shared (so other processes can map it).
    #[serde(default)]
    pub shared: bool,
}

impl Default for MemoryConfig {
    fn default() -> Self {
        MemoryConfig {
            size: DEFAULT_MEMORY_SIZE,
            hugepages: None,
            shared: false,
        }
    }
}

impl MemoryConfig {
    /// The page size RAM is mapped with: the huge page size or 4 KiB.
    pub fn page_size(&self) -> u64 {
        self.hugepages.map_or(BASE_PAGE_SIZE, HugePageSize::bytes)
    }

    /// Checks the size against [`MIN_MEMORY_SIZE`] and the page size.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.size < MIN_MEMORY_SIZE {
            return Err(ConfigError::MemoryTooSmall { size: self.size });
        }
        let page_size = self.page_size();
        if self.size % page_size != 0 {
            return Err(ConfigError::MemoryNotPageMultiple {
                size: self.size,
                page_size,
            });
        }
        Ok(())
    }
}

/// Prints the `--memory` syntax, e.g. `size=1G,hugepages=2M,shared=on`.
impl fmt::Display for MemoryConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "size={}", format_size(self.size))?;
        if let Some(hugepages) = self.hugepages {
            write!(f, ",hugepages={hugepages}")?;
        }
        if self.shared {
            f.write_str(",shared=on")?;
        }
        Ok(())
    }
}

const MEMORY_OPTION: &str = "--memory";
const MEMORY_EXAMPLE: &str = "size=512M,hugepages=2M,shared=on";

/// Splits `key=value,key=value` into pairs, rejecting empty items, items
/// without '=', keys outside `valid` and repeated keys.
pub(crate) fn parse_key_values<'a>(
    option: &'static str,
    example: &'static str,
    valid: &'static [&'static str],
    text: &'a str,
) -> Result<Vec<(&'a str, &'a str)>, ConfigError> {
    let mut seen = BTreeSet::new();
    let mut pairs = Vec::new();
    for item in text.split(',') {
        let Some((key, value)) = item.split_once('=') else {
            return Err(ConfigError::MissingEquals {
                option,
                item: item.to_string(),
                example,
            });
        };
        if !valid.contains(&key) {
            return Err(ConfigError::UnknownKey {
                option,
                key: key.to_string(),
                valid: valid.join(", "),
            });
        }
        if !seen.insert(key) {
            return Err(ConfigError::DuplicateKey {
                option,
                key: key.to_string(),
            });
        }
        pairs.push((key, value));
    }
    Ok(pairs)
}

fn parse_switch(option: &'static str, key: &'static str, value: &str) -> Result<bool, ConfigError> {
    match value {
        "on" | "true" | "yes" => Ok(true),
        "off" | "false" | "no" => Ok(false),
        _ => Err(ConfigError::InvalidSwitch {
            option,
            key,
            value: value.to_string(),
        }),
    }
}

impl FromStr for MemoryConfig {
    type Err = ConfigError;

    /// Parses `size=512M[,hugepages=2M|1G][,shared=on|off]`.
    fn from_str(text: &str) -> Result<Self, ConfigError> {
        let pairs = parse_key_values(
            MEMORY_OPTION,
            MEMORY_EXAMPLE,
            &["size", "hugepages", "shared"],
            text,
        )?;
        let mut size = None;
        let mut config = MemoryConfig::default();
        for (key, value) in pairs {
            match key {
                "size" => size = Some(parse_size(value)?),
                "hugepages" => {
                    config.hugepages = match value {
                        "none" | "off" => None,
                        _ => Some(value.parse()?),
                    }
                }
                "shared" => config.shared = parse_switch(MEMORY_OPTION, "shared", value)?,
                // parse_key_values only returns keys from the list above.
                _ => {}
            }
        }
        config.size = size.ok_or(ConfigError::MissingKey {
            option: MEMORY_OPTION,
            key: "size",
            example: MEMORY_EXAMPLE,
        })?;
        Ok(config)
    }
}

/// Where the guest's serial console (COM1) output goes.
///
/// On the command line and in JSON: `stdio`, `file=PATH` or `none`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum SerialConfig {
    /// Output to barge's stdout; input from its stdin (raw mode on a
    /// terminal).
    #[default]
    Stdio,
    /// Output appended to a file (created if missing); no input.
    File(PathBuf),
    /// Output discarded; no input.
    Disabled,
}

impl fmt::Display for SerialConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SerialConfig::Stdio => f.write_str("stdio"),
            SerialConfig::File(path) => write!(f, "file={}", path.display()),
            SerialConfig::Disabled => f.write_str("none"),
        }
    }
}

impl FromStr for SerialConfig {
    type Err = ConfigError;

    fn from_str(text: &str) -> Result<Self, ConfigError> {
        match text {
            "stdio" => Ok(SerialConfig::Stdio),
            "none" => Ok(SerialConfig::Disabled),
            _ => match text.split_once('=') {
                Some(("file", path)) if !path.is_empty() => {
                    Ok(SerialConfig::File(PathBuf::from(path)))
                }
                _ => Err(ConfigError::InvalidSerial(text.to_string())),
            },
        }
    }
}

impl Serialize for SerialConfig {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for SerialConfig {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// What barge does when the guest reboots.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnReboot {
    /// End the VM with the reboot's own exit status.
    #[default]
    Stop,
    /// Boot the VM again from the start.
    Restart,
}

impl fmt::Display for OnReboot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            OnReboot::Stop => "stop",
            OnReboot::Restart => "restart",
        })
    }
}

impl FromStr for OnReboot {
    type Err = ConfigError;

    fn from_str(text: &str) -> Result<Self, ConfigError> {
        match text {
            "stop" => Ok(OnReboot::Stop),
            "restart" => Ok(OnReboot::Restart),
            _ => Err(ConfigError::InvalidOnReboot(text.to_string())),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    fn temp_dir(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("barge-config-test-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create temp dir");
        dir
    }

    fn write_file(dir: &Path, name: &str, contents: &[u8]) -> PathBuf {
        let path = dir.join(name);
        let mut file = File::create(&path).expect("create file");
        file.write_all(contents).expect("write file");
        path
    }

    #[test]
    fn parse_size_accepts_plain_and_suffixed_numbers() {
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("4K").unwrap(), 4096);
        assert_eq!(parse_size("4k").unwrap(), 4096);
        assert_eq!(parse_size("512M").unwrap(), 512 << 20);
        assert_eq!(parse_size("1G").unwrap(), 1 << 30);
        assert_eq!(parse_size("128g").unwrap(), 128 << 30);
        assert_eq!(parse_size("2T").unwrap(), 2 << 40);
        assert_eq!(parse_size(" 0 ").unwrap(), 0);
    }

    #[test]
    fn parse_size_rejects_garbage_with_a_reason() {
        for (input, reason) in [
            ("", "empty"),
            ("M", "does not start with a number"),
            ("-1G", "does not start with a number"),
            ("1.5G", "unknown suffix"),
            ("512MB", "unknown suffix"),
            ("512 M", "unknown suffix"),
            ("12X", "unknown suffix"),
            ("99999999999999999999", "too large"),
            ("17179869184G", "too large"),
        ] {
            let err = parse_size(input).unwrap_err().to_string();
            assert!(err.contains(reason), "{input:?}: {err}");
            assert!(err.contains("e.g. 512M"), "{input:?}: {err}");
        }
    }

    #[test]
    fn format_size_round_trips() {
        for size in [0, 1, 4096, 4097, 512 << 20, 1 << 30, 3 << 30, 2 << 40] {
            assert_eq!(parse_size(&format_size(size)).unwrap(), size);
        }
        assert_eq!(format_size(512 << 20), "512M");
        assert_eq!(format_size(1536 << 20), "1536M");
    }

    #[test]
    fn memory_option_parses_every_key() {
        let memory: MemoryConfig = "size=1G,hugepages=2M,shared=on".parse().unwrap();
        assert_eq!(
            memory,
            MemoryConfig {
                size: 1 << 30,
                hugepages: Some(HugePageSize::Size2M),
                shared: true
            }
        );
        let memory: MemoryConfig = "hugepages=1G,size=2G".parse().unwrap();
        assert_eq!(memory.hugepages, Some(HugePageSize::Size1G));
        assert!(!memory.shared);
        let memory: MemoryConfig = "size=512M,shared=off,hugepages=none".parse().unwrap();
        assert_eq!(memory, MemoryConfig::default());
        assert_eq!(memory.to_string(), "size=512M");
        assert_eq!(
            "size=1G,hugepages=2M,shared=on"
                .parse::<MemoryConfig>()
                .unwrap()
                .to_string(),
            "size=1G,hugepages=2M,shared=on"
        );
    }

    #[test]
    fn memory_option_errors_name_the_problem() {
        let cases = [
            ("size=512M,color=red", "unknown key \"color\""),
            ("512M", "expected key=value but found \"512M\""),
            ("size=512M,", "expected key=value but found \"\""),
            ("size=lots", "invalid size \"lots\""),
            ("size=512M,hugepages=4M", "invalid huge page size \"4M\""),
            ("size=512M,hugepages=huge", "invalid huge page size"),
            ("size=512M,size=1G", "key \"size\" is given twice"),
            ("hugepages=2M", "missing size="),
            (
                "size=512M,shared=maybe",
                "shared=\"maybe\" is not on or off",
            ),
        ];
        for (input, expected) in cases {
            let err = input.parse::<MemoryConfig>().unwrap_err().to_string();
            assert!(err.contains(expected), "{input:?}: {err}");
        }
    }

    #[test]
    fn serial_option_parses_and_prints() {
        assert_eq!(
            "stdio".parse::<SerialConfig>().unwrap(),
            SerialConfig::Stdio
        );
        assert_eq!(
            "none".parse::<SerialConfig>().unwrap(),
            SerialConfig::Disabled
        );
        assert_eq!(
            "file=/tmp/a=b".parse::<SerialConfig>().unwrap(),
            SerialConfig::File("/tmp/a=b".into())
        );
        for bad in ["", "file=", "file", "tty", "path=/tmp/x", "Stdio"] {
            let err = bad.parse::<SerialConfig>().unwrap_err().to_string();
            assert!(
                err.contains("use stdio, none or file=PATH"),
                "{bad:?}: {err}"
            );
        }
        assert_eq!(SerialConfig::File("/x".into()).to_string(), "file=/x");
    }

    #[test]
    fn on_reboot_parses() {
        assert_eq!("stop".parse::<OnReboot>().unwrap(), OnReboot::Stop);
        assert_eq!("restart".parse::<OnReboot>().unwrap(), OnReboot::Restart);
        assert!("reboot".parse::<OnReboot>().is_err());
    }

    #[test]
    fn cpus_parse_range() {
        assert_eq!(parse_cpus("1").unwrap(), 1);
        assert_eq!(parse_cpus("255").unwrap(), 255);
        assert!(matches!(parse_cpus("0"), Err(ConfigError::ZeroCpus)));
        for bad in ["256", "-1", "two", ""] {
            assert!(
                matches!(parse_cpus(bad), Err(ConfigError::InvalidCpus(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn json_minimal_config_gets_defaults() {
        let config = VmConfig::from_json_str(r#"{"kernel": "/k"}"#).unwrap();
        assert_eq!(config, VmConfig::new("/k"));
        assert_eq!(config.cmdline, DEFAULT_CMDLINE);
        assert_eq!(config.cpus, 1);
        assert_eq!(config.memory.size, DEFAULT_MEMORY_SIZE);
        assert_eq!(config.serial, SerialConfig::Stdio);
        assert_eq!(config.on_reboot, OnReboot::Stop);
    }

    #[test]
    fn json_full_config_parses() {
        let config = VmConfig::from_json_str(
            r#"{
                "kernel": "/k", "initramfs": "/i", "cmdline": "console=ttyS0 quiet",
                "cpus": 4,
                "memory": {"size": "2G", "hugepages": "1G", "shared": true},
                "serial": "file=/tmp/console.log", "on_reboot": "restart",
                "report": "/tmp/r.json",
                "devices": [{"shmem": {"size": "8G", "hugepages": "1G"}},
                            {"vfio": {"bdf": "0000:41:00.0", "bar_align": "2m"}}],
                "vfio_backend": "legacy"
            }"#,
        )
        .unwrap();
        assert_eq!(config.initramfs, Some("/i".into()));
        assert_eq!(config.cmdline, "console=ttyS0 quiet");
        assert_eq!(config.cpus, 4);
        assert_eq!(
            config.memory,
            MemoryConfig {
                size: 2 << 30,
                hugepages: Some(HugePageSize::Size1G),
                shared: true
            }
        );
        assert_eq!(config.serial, SerialConfig::File("/tmp/console.log".into()));
        assert_eq!(config.on_reboot, OnReboot::Restart);
        assert_eq!(config.report, Some("/tmp/r.json".into()));
        assert_eq!(config.devices.len(), 2);
        assert_eq!(config.vfio_backend, VfioBackendKind::Legacy);
        let DeviceConfig::Vfio(vfio) = &config.devices[1] else {
            panic!("second device is VFIO");
        };
        assert_eq!(vfio.bar_align, BarAlign::Size2M);
    }

    #[test]
    fn prefault_bars_defaults_on_and_can_be_switched_off() {
        assert!(VmConfig::new("/k").prefault_bars);
        assert!(!VmConfig::new("/k")
            .to_json_string()
            .contains("prefault_bars"));
        let config =
            VmConfig::from_json_str(r#"{"kernel": "/k", "prefault_bars": false}"#).unwrap();
        assert!(!config.prefault_bars);
        assert_eq!(
            VmConfig::from_json_str(&config.to_json_string()).unwrap(),
            config
        );
    }

    #[test]
    fn json_memory_size_as_number() {
        let config =
            VmConfig::from_json_str(r#"{"kernel": "/k", "memory": {"size": 268435456}}"#).unwrap();
        assert_eq!(config.memory.size, 256 << 20);
    }

    #[test]
    fn json_round_trips() {
        let mut config = VmConfig::new("/k");
        config.memory = "size=1G,hugepages=2M,shared=on".parse().unwrap();
        config.serial = SerialConfig::Disabled;
        config.report = Some("/r".into());
        let json = config.to_json_string();
        assert_eq!(VmConfig::from_json_str(&json).unwrap(), config);
    }

    #[test]
    fn json_errors_name_the_problem() {
        for (json, expected) in [
            (r#"{"kernel": "/k", "cpu": 2}"#, "unknown field `cpu`"),
            (
                r#"{"kernel": "/k", "memory": {"size": "1G", "huge": "2M"}}"#,
                "unknown field `huge`",
            ),
            (
                r#"{"kernel": "/k", "memory": {"size": "1Q"}}"#,
                "invalid size",
            ),
            (
                r#"{"kernel": "/k", "memory": {"size": "1G", "hugepages": "4M"}}"#,
                "unknown variant `4M`",
            ),
            (r#"{"kernel": "/k", "cpus": 256}"#, "invalid value"),
            (
                r#"{"kernel": "/k", "serial": "tty"}"#,
                "use stdio, none or file=PATH",
            ),
            (
                r#"{"kernel": "/k", "on_reboot": "halt"}"#,
                "unknown variant `halt`",
            ),
            (
                r#"{"kernel": "/k", "devices": [{"vfio": "0000:01:00.0"}]}"#,
                "expected struct VfioConfig",
            ),
            (
                r#"{"kernel": "/k", "devices": [{"virtio": {}}]}"#,
                "unknown variant `virtio`",
            ),
            (
                r#"{"kernel": "/k", "vfio_backend": "cdev"}"#,
                "use legacy, iommufd or auto",
            ),
            (r#"{"cpus": 1}"#, "missing field `kernel`"),
        ] {
            let err = VmConfig::from_json_str(json).unwrap_err().to_string();
            assert!(err.contains(expected), "{json}: {err}");
        }
    }

    #[test]
    fn from_json_file_names_the_file() {
        let dir = temp_dir("json-file");
        let missing = dir.join("missing.json");
        let err = VmConfig::from_json_file(&missing).unwrap_err().to_string();
        assert!(err.contains("cannot read the configuration file"), "{err}");
        assert!(err.contains("missing.json"), "{err}");
        let garbage = write_file(&dir, "garbage.json", b"{kernel");
        let err = VmConfig::from_json_file(&garbage).unwrap_err().to_string();
        assert!(err.contains("invalid configuration file"), "{err}");
        assert!(err.contains("garbage.json"), "{err}");
        let good = write_file(&dir, "good.json", br#"{"kernel": "/k", "cpus": 2}"#);
        assert_eq!(VmConfig::from_json_file(&good).unwrap().cpus, 2);
    }

    #[test]
    fn validate_accepts_a_good_config() {
        let dir = temp_dir("validate-good");
        let kernel = write_file(&dir, "bzImage", b"kernel");
        let initramfs = write_file(&dir, "initramfs", b"cpio");
        let mut config = VmConfig::new(&kernel);
        config.initramfs = Some(initramfs);
        config.serial = SerialConfig::File(dir.join("console.log"));
        config.validate().unwrap();
    }

    #[test]
    fn validate_rejects_bad_values() {
        let dir = temp_dir("validate-bad");
        let kernel = write_file(&dir, "bzImage", b"kernel");
        let good = VmConfig::new(&kernel);

        let mut config = good.clone();
        config.cpus = 0;
        assert!(matches!(config.validate(), Err(ConfigError::ZeroCpus)));

        let mut config = good.clone();
        config.memory.size = 16 << 20;
        let err = config.validate().unwrap_err().to_string();
        assert_eq!(
            err,
            "memory size 16M is too small: barge needs at least 32M"
        );

        let mut config = good.clone();
        config.memory.size = (64 << 20) + 4096;
        config.memory.hugepages = Some(HugePageSize::Size2M);
        let err = config.validate().unwrap_err().to_string();
        assert!(err.contains("not a multiple of the 2M page size"), "{err}");

        let mut config = good.clone();
        config.memory.size = (64 << 20) + 1;
        assert!(matches!(
            config.validate(),
            Err(ConfigError::MemoryNotPageMultiple {
                page_size: 4096,
                ..
            })
        ));

        let mut config = good.clone();
        config.kernel = dir.join("no-such-kernel");
        let err = config.validate().unwrap_err().to_string();
        assert!(err.starts_with("cannot read the kernel"), "{err}");
        assert!(err.contains("no-such-kernel"), "{err}");

        let mut config = good.clone();
        config.kernel = dir.clone();
        let err = config.validate().unwrap_err().to_string();
        assert!(err.contains("is not a regular file"), "{err}");

        let mut config = good.clone();
        config.initramfs = Some(dir.join("no-such-initramfs"));
        let err = config.validate().unwrap_err().to_string();
        assert!(err.starts_with("cannot read the initramfs"), "{err}");

        let mut config = good;
        config.serial = SerialConfig::File(dir.join("no-such-dir/console.log"));
        let err = config.validate().unwrap_err().to_string();
        assert!(err.contains("its directory does not exist"), "{err}");
    }
}
