//! Disks (virtio-blk), as the `--disk` option and as entries of the config
//! file's disk list.
//!
//! ```text
//! --disk path=IMAGE[,readonly=on|off][,serial=ID]      (repeatable)
//! ```
//!
//! In JSON: `{"path": "/images/root.img", "readonly": false, "serial": "root"}`
//! (`readonly` and `serial` may be left out).
//!
//! `IMAGE` is a raw image (a regular file or a block device); the option
//! syntax cannot carry a comma in it. `readonly=on` gives the guest a
//! read-only disk and opens the image read-only. `serial` is what the
//! guest reads as the disk's serial number (`/sys/block/vda/serial`,
//! `/dev/disk/by-id/virtio-ID`): at most 20 bytes of printable ASCII, no
//! comma; without it the device derives one from the image's device and
//! inode numbers. Whether the image exists, is a whole number of sectors
//! and is not locked by another process is checked when the disk is opened
//! (`devices::virtio::blk::BlockDevice::open`), not here.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use devices::virtio::blk::ID_BYTES;
use serde::{Deserialize, Serialize};

use crate::config::options::{parse_key_values, parse_switch, OptionError};

const DISK_OPTION: &str = "--disk";
const DISK_EXAMPLE: &str = "path=/images/root.img,readonly=on,serial=root";

/// Errors in a `--disk` value or a disk of the config file.
#[derive(Debug, thiserror::Error)]
pub enum DiskConfigError {
    /// The value's syntax: a key or a switch.
    #[error(transparent)]
    Option(#[from] OptionError),
    /// `path=` with nothing after it.
    #[error("--disk path= is empty; give the disk image, e.g. {DISK_EXAMPLE}")]
    EmptyPath,
    /// `serial=` with nothing after it.
    #[error("--disk serial= is empty; leave serial out and barge derives one from the image")]
    EmptySerial,
    /// A serial longer than virtio-blk's ID.
    #[error("--disk serial={serial:?} is {} bytes; a virtio-blk serial is at most 20 bytes", serial.len())]
    SerialTooLong { serial: String },
    /// A serial with a byte outside printable ASCII, or a comma.
    #[error("--disk serial={serial:?}: use printable ASCII (letters, digits, punctuation, space) without commas")]
    SerialNotPrintable { serial: String },
    /// One image given twice, read-write at least once: the second open
    /// would fail on the first one's lock.
    #[error("disk image {} is given twice and is not read-only in both; a read-write image belongs to one disk (give readonly=on to both to share it, or give the second disk a copy)", path.display())]
    DuplicateImage { path: PathBuf },
}

/// One virtio-blk disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskConfig {
    /// The raw image: a regular file or a block device.
    pub path: PathBuf,
    /// The guest gets a read-only disk; the image is opened read-only.
    #[serde(default)]
    pub readonly: bool,
    /// The disk's serial number (GET_ID); `None`: derived from the image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial: Option<String>,
}

impl DiskConfig {
    /// A read-write disk of `path` with the derived serial.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        DiskConfig {
            path: path.into(),
            readonly: false,
            serial: None,
        }
    }

    /// Checks the path (not empty) and the serial (1 to 20 bytes of
    /// printable ASCII, no comma). Needs no host.
    pub fn validate(&self) -> Result<(), DiskConfigError> {
        if self.path.as_os_str().is_empty() {
            return Err(DiskConfigError::EmptyPath);
        }
        if let Some(serial) = &self.serial {
            if serial.is_empty() {
                return Err(DiskConfigError::EmptySerial);
            }
            if serial.len() > ID_BYTES {
                return Err(DiskConfigError::SerialTooLong {
                    serial: serial.clone(),
                });
            }
            if !serial
                .bytes()
                .all(|b| (b' '..=b'~').contains(&b) && b != b',')
            {
                return Err(DiskConfigError::SerialNotPrintable {
                    serial: serial.clone(),
                });
            }
        }
        Ok(())
    }
}

impl FromStr for DiskConfig {
    type Err = DiskConfigError;

    /// Parses `path=IMAGE[,readonly=on|off][,serial=ID]` and validates it
    /// ([`DiskConfig::validate`]).
    fn from_str(text: &str) -> Result<Self, DiskConfigError> {
        let pairs = parse_key_values(
            DISK_OPTION,
            DISK_EXAMPLE,
            &["path", "readonly", "serial"],
            text,
        )?;
        let mut path = None;
        let mut readonly = false;
        let mut serial = None;
        for (key, value) in pairs {
            match key {
                "path" => path = Some(PathBuf::from(value)),
                "readonly" => readonly = parse_switch(DISK_OPTION, "readonly", value)?,
                "serial" => serial = Some(value.to_string()),
                // parse_key_values only returns keys from the list above.
                _ => {}
            }
        }
        let path = path.ok_or(OptionError::MissingKey {
            option: DISK_OPTION,
            key: "path",
            example: DISK_EXAMPLE,
        })?;
        let config = DiskConfig {
            path,
            readonly,
            serial,
        };
        config.validate()?;
        Ok(config)
    }
}

/// Prints the `--disk` syntax, e.g. `path=/images/root.img,readonly=on`.
impl fmt::Display for DiskConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "path={}", self.path.display())?;
        if self.readonly {
            f.write_str(",readonly=on")?;
        }
        if let Some(serial) = &self.serial {
            write!(f, ",serial={serial}")?;
        }
        Ok(())
    }
}

/// Checks every disk, and that no image is given twice unless every disk
/// of it is read-only (the paths as given; two spellings of one file are
/// caught by the image lock when the disks are opened).
pub fn validate_disks(disks: &[DiskConfig]) -> Result<(), DiskConfigError> {
    let mut all_readonly: BTreeMap<&PathBuf, bool> = BTreeMap::new();
    for disk in disks {
        disk.validate()?;
        if let Some(readonly) = all_readonly.get_mut(&disk.path) {
            *readonly &= disk.readonly;
            if !*readonly {
                return Err(DiskConfigError::DuplicateImage {
                    path: disk.path.clone(),
                });
            }
        } else {
            all_readonly.insert(&disk.path, disk.readonly);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_option_parses_every_key() {
        let disk: DiskConfig = "path=/images/root.img,readonly=on,serial=root-1"
            .parse()
            .unwrap();
        assert_eq!(
            disk,
            DiskConfig {
                path: "/images/root.img".into(),
                readonly: true,
                serial: Some("root-1".into()),
            }
        );
        let disk: DiskConfig = "serial=x,path=rel/disk.raw".parse().unwrap();
        assert_eq!(disk.path, PathBuf::from("rel/disk.raw"));
        assert!(!disk.readonly);
        let disk: DiskConfig = "path=/dev/nvme0n1p3,readonly=off".parse().unwrap();
        assert_eq!(disk, DiskConfig::new("/dev/nvme0n1p3"));
        // A serial of exactly 20 bytes, with a space and an '='.
        let disk: DiskConfig = "path=/d,serial=a b=c 67890123456789".parse().unwrap();
        assert_eq!(disk.serial.as_deref(), Some("a b=c 67890123456789"));
    }

    #[test]
    fn disk_option_prints_back_what_it_parses() {
        for text in [
            "path=/images/root.img",
            "path=/images/root.img,readonly=on",
            "path=/images/data.img,serial=data",
            "path=/images/seed.iso,readonly=on,serial=SEED 01",
        ] {
            let disk: DiskConfig = text.parse().unwrap();
            assert_eq!(disk.to_string(), text);
            assert_eq!(disk.to_string().parse::<DiskConfig>().unwrap(), disk);
        }
        let disk: DiskConfig = "readonly=off,path=/x".parse().unwrap();
        assert_eq!(disk.to_string(), "path=/x");
    }

    #[test]
    fn disk_option_errors_name_the_problem() {
        for (input, expected) in [
            (
                "/images/root.img",
                "expected key=value but found \"/images/root.img\"",
            ),
            (
                "readonly=on",
                "--disk: missing path=...; e.g. path=/images/root.img",
            ),
            ("path=", "--disk path= is empty"),
            (
                "path=/x,readonly=yes please",
                "readonly=\"yes please\" is not on or off",
            ),
            (
                "path=/x,ro=on",
                "unknown key \"ro\"; valid keys: path, readonly, serial",
            ),
            ("path=/x,path=/y", "key \"path\" is given twice"),
            ("path=/x,serial=", "serial= is empty; leave serial out"),
            (
                "path=/x,serial=123456789012345678901",
                "is 21 bytes; a virtio-blk serial is at most 20 bytes",
            ),
            ("path=/x,serial=tab\there", "use printable ASCII"),
            ("path=/x,serial=disk-é", "use printable ASCII"),
            ("path=/x,serial=a,b", "expected key=value but found \"b\""),
        ] {
            let err = input.parse::<DiskConfig>().unwrap_err().to_string();
            assert!(err.contains(expected), "{input:?}: {err}");
        }
    }

    #[test]
    fn disks_round_trip_through_json_and_refuse_unknown_fields() {
        let disks: Vec<DiskConfig> = vec![
            "path=/images/root.img".parse().unwrap(),
            "path=/images/seed.iso,readonly=on,serial=seed"
                .parse()
                .unwrap(),
        ];
        let json = serde_json::to_string(&disks).unwrap();
        assert_eq!(
            json,
            r#"[{"path":"/images/root.img","readonly":false},{"path":"/images/seed.iso","readonly":true,"serial":"seed"}]"#
        );
        let back: Vec<DiskConfig> = serde_json::from_str(&json).unwrap();
        assert_eq!(back, disks);
        let short: DiskConfig = serde_json::from_str(r#"{"path": "/d.img"}"#).unwrap();
        assert_eq!(short, DiskConfig::new("/d.img"));
        let err = serde_json::from_str::<DiskConfig>(r#"{"path": "/d.img", "ro": true}"#)
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown field `ro`"), "{err}");
        let err = serde_json::from_str::<DiskConfig>(r#"{"readonly": true}"#)
            .unwrap_err()
            .to_string();
        assert!(err.contains("missing field `path`"), "{err}");
    }

    #[test]
    fn validation_catches_what_json_lets_through() {
        let bad: Vec<DiskConfig> = serde_json::from_str(
            r#"[{"path": ""}, {"path": "/x", "serial": "has,comma"}, {"path": "/x", "serial": "123456789012345678901"}]"#,
        )
        .unwrap();
        assert!(matches!(bad[0].validate(), Err(DiskConfigError::EmptyPath)));
        assert!(matches!(
            bad[1].validate(),
            Err(DiskConfigError::SerialNotPrintable { .. })
        ));
        assert!(matches!(
            bad[2].validate(),
            Err(DiskConfigError::SerialTooLong { .. })
        ));
        assert!(matches!(
            validate_disks(&bad[1..]),
            Err(DiskConfigError::SerialNotPrintable { .. })
        ));
    }

    #[test]
    fn an_image_may_be_shared_only_read_only() {
        let read_only = |path: &str| DiskConfig {
            readonly: true,
            ..DiskConfig::new(path)
        };
        validate_disks(&[
            DiskConfig::new("/a.img"),
            read_only("/b.img"),
            read_only("/b.img"),
        ])
        .unwrap();
        for disks in [
            [DiskConfig::new("/a.img"), DiskConfig::new("/a.img")],
            [DiskConfig::new("/a.img"), read_only("/a.img")],
            [read_only("/a.img"), DiskConfig::new("/a.img")],
        ] {
            let err = validate_disks(&disks).unwrap_err().to_string();
            assert!(err.starts_with("disk image /a.img is given twice"), "{err}");
        }
    }
}
