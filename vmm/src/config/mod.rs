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
//! The option syntaxes are parsed in this module tree too (every option
//! type implements [`FromStr`]), so the CLI and the JSON file cannot
//! disagree. The files depend on each other in one direction only:
//! [`options`] holds the syntax every option shares (sizes, switches,
//! `key=value` lists, huge page sizes); [`memory`] (`--memory`) and
//! [`devices`] (`--device`, `--shmem`, `--vfio-backend`) build on it; this
//! file puts them together into a [`VmConfig`] with `--serial` and
//! `--on-reboot`, and re-exports their public types so that
//! `vmm::config::MemoryConfig` and the like name them.

use std::fmt;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

pub mod devices;
pub mod disk;
pub mod memory;
pub mod net;
pub mod options;

pub use crate::config::devices::{
    BarAlign, DeviceConfig, DeviceConfigError, ShmemConfig, VfioBackendKind, VfioConfig,
};
pub use crate::config::disk::{DiskConfig, DiskConfigError};
pub use crate::config::memory::{
    MemoryConfig, MemoryConfigError, BASE_PAGE_SIZE, DEFAULT_MEMORY_SIZE, MIN_MEMORY_SIZE,
};
pub use crate::config::net::{MacAddress, NetConfig, NetConfigError};
pub use crate::config::options::{format_option_size, parse_size, HugePageSize, OptionError};
pub use crate::seccomp::SeccompMode;

/// Kernel command line used when none is given: the console on COM1 (where
/// barge's 8250 sits), reboot through the keyboard controller barge
/// emulates, and a reboot one second after a panic so that a crashing guest
/// ends the VM (with `on_reboot=stop`) instead of hanging.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=1";

/// Errors in a configuration: parsing a file, an option, or validating.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The configuration file could not be read.
    #[error("cannot read the configuration file {path}: {source}")]
    ReadFile {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The configuration file is not valid JSON for a [`VmConfig`].
    #[error("invalid configuration file {path}: {source}")]
    ParseFile {
        path: PathBuf,
        /// What serde said (it names the field and line).
        source: serde_json::Error,
    },
    /// The syntax shared by every option: a key, a size, a switch or a huge
    /// page size.
    #[error(transparent)]
    Option(#[from] OptionError),
    /// A `--memory` value (or its JSON form) or a memory size below the
    /// minimum or off the page size.
    #[error(transparent)]
    Memory(#[from] MemoryConfigError),
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
    /// A file the VM needs cannot be opened for reading.
    #[error("cannot read the {what} {path}: {source}")]
    UnreadableFile {
        /// "kernel" or "initramfs".
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    /// A path that should be a regular file is something else.
    #[error("the {what} {path} is not a regular file")]
    NotAFile {
        /// "kernel" or "initramfs".
        what: &'static str,
        path: PathBuf,
    },
    /// A `--device`, `--shmem` or `--vfio-backend` value (or its JSON form).
    #[error(transparent)]
    Device(#[from] DeviceConfigError),
    /// The directory of the serial output file does not exist.
    #[error("cannot write the serial output to {path}: its directory does not exist")]
    SerialDirMissing { path: PathBuf },
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
    /// Show the progress of boot steps that run longer than 2 s (guest RAM
    /// mapped for device DMA, BARs pre-faulted at small pages) on stderr:
    /// one line rewritten in place on a terminal, a line per tenth of the
    /// work at most otherwise (the default). `false`: nothing.
    #[serde(default = "default_progress", skip_serializing_if = "is_true")]
    pub progress: bool,
}

fn default_progress() -> bool {
    true
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
            progress: default_progress(),
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
                shared: true,
                prefault: false,
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
            Err(ConfigError::Memory(MemoryConfigError::NotPageMultiple {
                page_size: 4096,
                ..
            }))
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
