//! Guest RAM as configured: its size and backing, as the `--memory` option
//! (`size=512M[,hugepages=2M|1G][,shared=on|off]`) and as the config file's
//! `memory` object (`{"size": "512M", "hugepages": "2M", "shared": false}`).
//!
//! The checks here need no host: the size against [`MIN_MEMORY_SIZE`] and
//! the page size. Whether the host has the huge pages is checked when the
//! memory is created (`machine::memory`).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::config::options::{
    format_option_size, parse_key_values, parse_size, parse_switch, HugePageSize, OptionError,
};

/// Guest memory size used when none is given.
pub const DEFAULT_MEMORY_SIZE: u64 = 512 << 20;
/// Smallest guest memory barge accepts: room for the boot structures, a
/// kernel and its early allocations.
pub const MIN_MEMORY_SIZE: u64 = 32 << 20;
/// Page size every memory size must be a multiple of.
pub const BASE_PAGE_SIZE: u64 = 4096;

/// Errors in a `--memory` value or the config file's `memory`.
#[derive(Debug, thiserror::Error)]
pub enum MemoryConfigError {
    /// The value's syntax: a key, a size, a switch or a huge page size.
    #[error(transparent)]
    Option(#[from] OptionError),
    /// Memory below [`MIN_MEMORY_SIZE`].
    #[error("memory size {} is too small: barge needs at least {}", format_option_size(*size), format_option_size(MIN_MEMORY_SIZE))]
    TooSmall {
        /// The size asked for.
        size: u64,
    },
    /// Memory not a multiple of the page size in use.
    #[error("memory size {} is not a multiple of the {} page size; round it to a multiple of {}", format_option_size(*size), format_option_size(*page_size), format_option_size(*page_size))]
    NotPageMultiple {
        /// The size asked for.
        size: u64,
        /// The page size it must be a multiple of.
        page_size: u64,
    },
}

/// Guest RAM: its size and how the host backs it.
///
/// On the command line: `size=512M[,hugepages=2M|1G][,shared=on|off]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemoryConfig {
    /// Total guest RAM in bytes (split around the 32-bit MMIO hole).
    #[serde(deserialize_with = "crate::config::options::deserialize_size")]
    pub size: u64,
    /// Back RAM with hugetlbfs pages of this size; `None`: ordinary pages
    /// with transparent huge pages advised.
    #[serde(default)]
    pub hugepages: Option<HugePageSize>,
    /// Back RAM with a memfd mapped shared (so other processes can map it).
    #[serde(default)]
    pub shared: bool,
    /// Populate every page of RAM before the guest runs, on as many threads
    /// as barge may use (MADV_POPULATE_WRITE, Linux 5.14), rather than on
    /// first touch: a shortage of huge pages shows at start, not as the
    /// guest's SIGBUS, and a passed-through device's DMA map then only
    /// pins pages that exist.
    #[serde(default)]
    pub prefault: bool,
}

impl Default for MemoryConfig {
    fn default() -> Self {
        MemoryConfig {
            size: DEFAULT_MEMORY_SIZE,
            hugepages: None,
            shared: false,
            prefault: false,
        }
    }
}

impl MemoryConfig {
    /// The page size RAM is mapped with: the huge page size or 4 KiB.
    pub fn page_size(&self) -> u64 {
        self.hugepages.map_or(BASE_PAGE_SIZE, HugePageSize::bytes)
    }

    /// Checks the size against [`MIN_MEMORY_SIZE`] and the page size.
    pub fn validate(&self) -> Result<(), MemoryConfigError> {
        if self.size < MIN_MEMORY_SIZE {
            return Err(MemoryConfigError::TooSmall { size: self.size });
        }
        let page_size = self.page_size();
        if self.size % page_size != 0 {
            return Err(MemoryConfigError::NotPageMultiple {
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
        write!(f, "size={}", format_option_size(self.size))?;
        if let Some(hugepages) = self.hugepages {
            write!(f, ",hugepages={hugepages}")?;
        }
        if self.shared {
            f.write_str(",shared=on")?;
        }
        if self.prefault {
            f.write_str(",prefault=on")?;
        }
        Ok(())
    }
}

const MEMORY_OPTION: &str = "--memory";
const MEMORY_EXAMPLE: &str = "size=512M,hugepages=2M,shared=on,prefault=on";

impl FromStr for MemoryConfig {
    type Err = MemoryConfigError;

    /// Parses `size=512M[,hugepages=2M|1G][,shared=on|off][,prefault=on|off]`.
    fn from_str(text: &str) -> Result<Self, MemoryConfigError> {
        let pairs = parse_key_values(
            MEMORY_OPTION,
            MEMORY_EXAMPLE,
            &["size", "hugepages", "shared", "prefault"],
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
                "prefault" => config.prefault = parse_switch(MEMORY_OPTION, "prefault", value)?,
                // parse_key_values only returns keys from the list above.
                _ => {}
            }
        }
        config.size = size.ok_or(OptionError::MissingKey {
            option: MEMORY_OPTION,
            key: "size",
            example: MEMORY_EXAMPLE,
        })?;
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_option_parses_every_key() {
        let memory: MemoryConfig = "size=1G,hugepages=2M,shared=on,prefault=on"
            .parse()
            .unwrap();
        assert_eq!(
            memory,
            MemoryConfig {
                size: 1 << 30,
                hugepages: Some(HugePageSize::Size2M),
                shared: true,
                prefault: true,
            }
        );
        assert_eq!(
            memory.to_string(),
            "size=1G,hugepages=2M,shared=on,prefault=on"
        );
        let memory: MemoryConfig = "hugepages=1G,size=2G".parse().unwrap();
        assert_eq!(memory.hugepages, Some(HugePageSize::Size1G));
        assert!(!memory.shared);
        let memory: MemoryConfig = "size=512M,shared=off,hugepages=none,prefault=off"
            .parse()
            .unwrap();
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
            (
                "size=512M,prefault=maybe",
                "prefault=\"maybe\" is not on or off",
            ),
        ];
        for (input, expected) in cases {
            let err = input.parse::<MemoryConfig>().unwrap_err().to_string();
            assert!(err.contains(expected), "{input:?}: {err}");
        }
    }

    #[test]
    fn validate_checks_the_minimum_and_the_page_size() {
        let memory = |size, hugepages| MemoryConfig {
            size,
            hugepages,
            ..Default::default()
        };
        memory(MIN_MEMORY_SIZE, None).validate().unwrap();
        memory(64 << 20, Some(HugePageSize::Size2M))
            .validate()
            .unwrap();
        let err = memory(0, None).validate().unwrap_err().to_string();
        assert_eq!(err, "memory size 0 is too small: barge needs at least 32M");
        let err = memory((64 << 20) + 4096, Some(HugePageSize::Size2M))
            .validate()
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "memory size 65540K is not a multiple of the 2M page size; round it to a multiple of 2M"
        );
        assert!(matches!(
            memory((64 << 20) + 1, None).validate(),
            Err(MemoryConfigError::NotPageMultiple {
                page_size: BASE_PAGE_SIZE,
                ..
            })
        ));
    }
}
