//! The syntax every `barge run` option value shares, in one place.
//!
//! An option value like `--memory size=1G,hugepages=2M,shared=on` is a list
//! of `key=value` items (`parse_key_values`) whose values are sizes
//! ([`parse_size`], printed back by [`format_option_size`]), on/off switches
//! (`parse_switch`) or huge page sizes ([`HugePageSize`]). The JSON form of
//! a configuration reads sizes the same way (`deserialize_size`). This
//! module knows nothing about which options exist: the memory and device
//! modules say which keys they take and what the values mean.

use std::collections::BTreeSet;
use std::fmt;
use std::str::FromStr;

use resources::placement::PageSize;
use serde::{Deserialize, Deserializer, Serialize};

/// Errors in the shared option syntax: a size, a switch, a huge page size or
/// the `key=value` list itself.
#[derive(Debug, thiserror::Error)]
pub enum OptionError {
    /// A size string could not be parsed.
    #[error("invalid size {input:?}: {reason}; write a number of bytes or a number with K, M, G or T (powers of 1024), e.g. 512M")]
    InvalidSize {
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
        item: String,
        /// A correct example.
        example: &'static str,
    },
    /// A key=value list has a key the option does not know.
    #[error("{option}: unknown key {key:?}; valid keys: {valid}")]
    UnknownKey {
        option: &'static str,
        key: String,
        /// The valid keys, comma-separated.
        valid: String,
    },
    /// A key=value list gives a key twice.
    #[error("{option}: key {key:?} is given twice; give each key once")]
    DuplicateKey { option: &'static str, key: String },
    /// A key=value list lacks a required key.
    #[error("{option}: missing {key}=...; e.g. {example}")]
    MissingKey {
        option: &'static str,
        key: &'static str,
        /// A correct example.
        example: &'static str,
    },
    /// An on/off value that is neither.
    #[error("{option}: {key}={value:?} is not on or off")]
    InvalidSwitch {
        option: &'static str,
        key: &'static str,
        value: String,
    },
}

/// Parses a size: decimal digits with an optional binary suffix `K`, `M`,
/// `G` or `T` (case-insensitive, powers of 1024), e.g. `"4096"`, `"512M"`,
/// `"1G"`. No fractions, signs or spaces inside.
pub fn parse_size(text: &str) -> Result<u64, OptionError> {
    let invalid = |reason| OptionError::InvalidSize {
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

/// Formats a size as an option value, the way [`parse_size`] reads it back,
/// with the largest exact suffix: `format_option_size(512 << 20) == "512M"`,
/// `format_option_size(4097) == "4097"`.
///
/// This is for text that names or suggests an option value (`size=512M`,
/// `use 2G or 4G`). Sizes meant only for people to read, with units and
/// decimals (`512 MiB`, `1.50 KiB`), come from
/// [`resources::placement::format_size`] instead.
pub fn format_option_size(size: u64) -> String {
    for (shift, suffix) in [(40, "T"), (30, "G"), (20, "M"), (10, "K")] {
        let unit = 1u64 << shift;
        if size != 0 && size % unit == 0 {
            return format!("{}{suffix}", size / unit);
        }
    }
    size.to_string()
}

/// Reads a size field of the JSON configuration: a number of bytes or a
/// string in the [`parse_size`] syntax.
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

/// Splits `key=value,key=value` into pairs, rejecting empty items, items
/// without '=', keys outside `valid` and repeated keys. `option` (e.g.
/// `"--memory"`) and `example` (a correct value) go into the errors.
pub(crate) fn parse_key_values<'a>(
    option: &'static str,
    example: &'static str,
    valid: &'static [&'static str],
    text: &'a str,
) -> Result<Vec<(&'a str, &'a str)>, OptionError> {
    let mut seen = BTreeSet::new();
    let mut pairs = Vec::new();
    for item in text.split(',') {
        let Some((key, value)) = item.split_once('=') else {
            return Err(OptionError::MissingEquals {
                option,
                item: item.to_string(),
                example,
            });
        };
        if !valid.contains(&key) {
            return Err(OptionError::UnknownKey {
                option,
                key: key.to_string(),
                valid: valid.join(", "),
            });
        }
        if !seen.insert(key) {
            return Err(OptionError::DuplicateKey {
                option,
                key: key.to_string(),
            });
        }
        pairs.push((key, value));
    }
    Ok(pairs)
}

/// Parses the value of an on/off key: `on`, `true`, `yes` or `off`,
/// `false`, `no`. `option` and `key` go into the error.
pub(crate) fn parse_switch(
    option: &'static str,
    key: &'static str,
    value: &str,
) -> Result<bool, OptionError> {
    match value {
        "on" | "true" | "yes" => Ok(true),
        "off" | "false" | "no" => Ok(false),
        _ => Err(OptionError::InvalidSwitch {
            option,
            key,
            value: value.to_string(),
        }),
    }
}

/// The size of the hugetlbfs pages a memory backing (guest RAM, a shared
/// memory device) is allocated from: 2 MiB or 1 GiB, the pools under
/// `/sys/kernel/mm/hugepages` and the `MFD_HUGE_*` flags. Written `2M` or
/// `1G` (`hugepages=2M`).
///
/// It is not [`PageSize`]: that is the size of one x86-64 page-table entry
/// (4K PTE, 2M PMD, 1G PUD), what the BAR planner aligns an area for and
/// what `bar-align` caps. A huge page of either size is what one PMD or PUD
/// maps, so every `HugePageSize` converts into the `PageSize` of the same
/// bytes (`PageSize::from`); 4K pages are not huge pages, so there is no
/// conversion back.
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

/// The mapping size one huge page of this size fills: 2M is a PMD, 1G a PUD.
impl From<HugePageSize> for PageSize {
    fn from(size: HugePageSize) -> PageSize {
        match size {
            HugePageSize::Size2M => PageSize::Size2M,
            HugePageSize::Size1G => PageSize::Size1G,
        }
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
    type Err = OptionError;

    fn from_str(text: &str) -> Result<Self, OptionError> {
        match parse_size(text) {
            Ok(size) if size == 2 << 20 => Ok(HugePageSize::Size2M),
            Ok(size) if size == 1 << 30 => Ok(HugePageSize::Size1G),
            _ => Err(OptionError::InvalidHugePageSize(text.to_string())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn format_option_size_round_trips() {
        for size in [0, 1, 4096, 4097, 512 << 20, 1 << 30, 3 << 30, 2 << 40] {
            assert_eq!(parse_size(&format_option_size(size)).unwrap(), size);
        }
        assert_eq!(format_option_size(512 << 20), "512M");
        assert_eq!(format_option_size(1536 << 20), "1536M");
    }

    #[test]
    fn key_values_reject_what_the_option_does_not_take() {
        const VALID: &[&str] = &["size", "shared"];
        let pairs = parse_key_values("--x", "size=1G", VALID, "size=1G,shared=on").unwrap();
        assert_eq!(pairs, [("size", "1G"), ("shared", "on")]);
        for (input, expected) in [
            (
                "size",
                "--x: expected key=value but found \"size\"; e.g. size=1G",
            ),
            (
                "size=1G,,shared=on",
                "--x: expected key=value but found \"\"; e.g. size=1G",
            ),
            (
                "colour=red",
                "--x: unknown key \"colour\"; valid keys: size, shared",
            ),
            (
                "size=1G,size=2G",
                "--x: key \"size\" is given twice; give each key once",
            ),
        ] {
            let err = parse_key_values("--x", "size=1G", VALID, input)
                .unwrap_err()
                .to_string();
            assert_eq!(err, expected, "{input:?}");
        }
    }

    #[test]
    fn switches_take_on_and_off_words() {
        for on in ["on", "true", "yes"] {
            assert!(parse_switch("--x", "shared", on).unwrap());
        }
        for off in ["off", "false", "no"] {
            assert!(!parse_switch("--x", "shared", off).unwrap());
        }
        let err = parse_switch("--x", "shared", "On").unwrap_err().to_string();
        assert_eq!(err, "--x: shared=\"On\" is not on or off");
    }

    #[test]
    fn huge_page_sizes_parse_print_and_convert_to_mapping_sizes() {
        for (text, size) in [
            ("2M", HugePageSize::Size2M),
            ("2048k", HugePageSize::Size2M),
            ("1G", HugePageSize::Size1G),
            ("1024m", HugePageSize::Size1G),
        ] {
            assert_eq!(text.parse::<HugePageSize>().unwrap(), size, "{text}");
        }
        let err = "4K".parse::<HugePageSize>().unwrap_err().to_string();
        assert_eq!(
            err,
            "invalid huge page size \"4K\": use hugepages=2M or hugepages=1G"
        );
        for size in [HugePageSize::Size2M, HugePageSize::Size1G] {
            assert_eq!(size.to_string().parse::<HugePageSize>().unwrap(), size);
            assert_eq!(PageSize::from(size).bytes(), size.bytes());
            assert_eq!(PageSize::from(size).name(), size.to_string());
        }
        assert_eq!(HugePageSize::Size2M.kib(), 2048);
    }
}
