//! `barge plan --spec FILE.json`: devices and BARs described in JSON, turned into
//! [`DeviceInput`]s for the planner.
//!
//! ```json
//! {"devices": [
//!   {"name": "0000:41:00.0", "bar_align": "auto",
//!    "bars": [
//!      {"index": 0, "size": "16M",  "bits": 64},
//!      {"index": 1, "size": "128G", "bits": 64, "prefetchable": true,
//!       "msix_table": {"offset": 0, "size": 2048}},
//!      {"index": 3, "size": 33554432, "bits": 64, "prefetchable": true,
//!       "areas": [{"offset": "0", "size": "16M"}]}]}]}
//! ```
//!
//! Sizes and offsets are numbers of bytes or strings with an optional `K`, `M`, `G` or `T`
//! suffix (powers of 1024; `KiB`/`KB` spellings too, `0x` hex accepted). `bits` (32 or 64),
//! `index` and `size` are required; `prefetchable` defaults to false, `areas` to the whole
//! BAR, `bar_align` to `auto`. Unknown fields are errors.

use std::path::{Path, PathBuf};

use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;

use crate::placement::{BarInput, BarRange, BarWidth, DeviceInput, PageSize};

/// Why a spec cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    /// The spec file cannot be read.
    #[error("cannot read the plan spec {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// Not valid JSON, an unknown or missing field, or a bad value.
    #[error("invalid plan spec {origin}: {source}; expected {{\"devices\":[{{\"name\":..., \"bars\":[{{\"index\":1,\"size\":\"128G\",\"bits\":64,\"prefetchable\":true}}]}}]}}")]
    Parse {
        /// The file name, or `(text)`.
        origin: String,
        /// serde_json's error, with line and column.
        source: serde_json::Error,
    },
    /// `"devices": []`.
    #[error("the plan spec {origin} lists no devices: add at least one under \"devices\"")]
    NoDevices {
        /// The file name, or `(text)`.
        origin: String,
    },
}

/// A size string that cannot be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SizeError {
    /// Not a number with an optional unit.
    #[error("invalid size {0:?}: write a number of bytes, optionally with a K, M, G or T suffix (e.g. \"128G\")")]
    Invalid(String),
    /// Does not fit in 64 bits.
    #[error("size {0:?} is too large: it must fit in 64 bits")]
    Overflow(String),
}

/// Parses `4096`, `0x1000`, `16M`, `128G`, `2T`, `4KiB`, `1 GB` (units are powers of 1024).
pub fn parse_size(text: &str) -> Result<u64, SizeError> {
    let invalid = || SizeError::Invalid(text.to_string());
    let trimmed = text.trim();
    let (number, radix, unit) = match trimmed
        .strip_prefix("0x")
        .or_else(|| trimmed.strip_prefix("0X"))
    {
        Some(hex) => (hex, 16, ""),
        None => {
            let digits_end = trimmed
                .find(|c: char| !c.is_ascii_digit())
                .unwrap_or(trimmed.len());
            (
                &trimmed[..digits_end],
                10,
                trimmed[digits_end..].trim_start(),
            )
        }
    };
    if number.is_empty() || !number.chars().all(|c| c.is_digit(radix)) {
        return Err(invalid());
    }
    let value = u64::from_str_radix(number, radix).map_err(|e| match e.kind() {
        std::num::IntErrorKind::PosOverflow => SizeError::Overflow(text.to_string()),
        _ => invalid(),
    })?;
    let shift = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        _ => return Err(invalid()),
    };
    value
        .checked_mul(1u64 << shift)
        .ok_or_else(|| SizeError::Overflow(text.to_string()))
}

/// Parses a spec from JSON text.
pub fn parse_spec(json: &str) -> Result<Vec<DeviceInput>, SpecError> {
    parse_with_origin(json, "(text)")
}

/// Reads and parses a spec file.
pub fn read_spec(path: &Path) -> Result<Vec<DeviceInput>, SpecError> {
    let text = std::fs::read_to_string(path).map_err(|source| SpecError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    parse_with_origin(&text, &path.display().to_string())
}

fn parse_with_origin(json: &str, origin: &str) -> Result<Vec<DeviceInput>, SpecError> {
    let spec: SpecFile = serde_json::from_str(json).map_err(|source| SpecError::Parse {
        origin: origin.to_string(),
        source,
    })?;
    if spec.devices.is_empty() {
        return Err(SpecError::NoDevices {
            origin: origin.to_string(),
        });
    }
    Ok(spec
        .devices
        .into_iter()
        .map(SpecDevice::into_input)
        .collect())
}

/// A spec file as JSON: `{"devices": [...]}`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SpecFile {
    devices: Vec<SpecDevice>,
}

/// One device entry of a spec file: its name, `bar_align` and BARs.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SpecDevice {
    name: String,
    #[serde(default, deserialize_with = "bar_align")]
    bar_align: Option<PageSize>,
    bars: Vec<SpecBar>,
}

impl SpecDevice {
    fn into_input(self) -> DeviceInput {
        DeviceInput {
            name: self.name,
            bars: self.bars.into_iter().map(SpecBar::into_input).collect(),
            align_cap: self.bar_align,
        }
    }
}

/// One BAR entry of a spec file, as the planner's [`BarInput`] will see it
/// (not to be confused with `devices::pci::bar`'s planned BAR).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SpecBar {
    index: u8,
    #[serde(deserialize_with = "bar_size")]
    size: u64,
    #[serde(deserialize_with = "bar_bits")]
    bits: BarWidth,
    #[serde(default)]
    prefetchable: bool,
    #[serde(default)]
    areas: Option<Vec<SpecRange>>,
    #[serde(default)]
    msix_table: Option<SpecRange>,
    #[serde(default)]
    msix_pba: Option<SpecRange>,
}

impl SpecBar {
    fn into_input(self) -> BarInput {
        BarInput {
            index: self.index,
            size: self.size,
            width: self.bits,
            prefetchable: self.prefetchable,
            areas: self
                .areas
                .map(|areas| areas.into_iter().map(SpecRange::into_range).collect()),
            msix_table: self.msix_table.map(SpecRange::into_range),
            msix_pba: self.msix_pba.map(SpecRange::into_range),
        }
    }
}

/// An `{offset, size}` range inside a BAR in a spec file.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SpecRange {
    #[serde(deserialize_with = "range_offset")]
    offset: u64,
    #[serde(deserialize_with = "range_size")]
    size: u64,
}

impl SpecRange {
    fn into_range(self) -> BarRange {
        BarRange::new(self.offset, self.size)
    }
}

/// A byte count as a number or a string with a unit; `field` names it in errors.
struct SizeVisitor(&'static str);

impl Visitor<'_> for SizeVisitor {
    type Value = u64;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "\"{}\" as a number of bytes or a string like \"128G\"",
            self.0
        )
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<u64, E> {
        Ok(v)
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<u64, E> {
        u64::try_from(v)
            .map_err(|_| E::custom(format!("\"{}\" must not be negative, got {v}", self.0)))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<u64, E> {
        parse_size(v).map_err(|e| E::custom(format!("\"{}\": {e}", self.0)))
    }
}

fn bar_size<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    d.deserialize_any(SizeVisitor("size"))
}

fn range_offset<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    d.deserialize_any(SizeVisitor("offset"))
}

fn range_size<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    d.deserialize_any(SizeVisitor("size"))
}

fn bar_bits<'de, D: Deserializer<'de>>(d: D) -> Result<BarWidth, D::Error> {
    match u64::deserialize(d)? {
        32 => Ok(BarWidth::Bits32),
        64 => Ok(BarWidth::Bits64),
        other => Err(de::Error::custom(format!(
            "\"bits\" must be 32 or 64, got {other}"
        ))),
    }
}

fn bar_align<'de, D: Deserializer<'de>>(d: D) -> Result<Option<PageSize>, D::Error> {
    let text = String::deserialize(d)?;
    if text.eq_ignore_ascii_case("auto") {
        return Ok(None);
    }
    text.parse::<PageSize>().map(Some).map_err(|_| {
        de::Error::custom(format!(
            "\"bar_align\" must be \"4k\", \"2m\", \"1g\" or \"auto\", got {text:?}"
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;

    pub(crate) const H100_SPEC: &str = r#"{"devices":[{"name":"0000:41:00.0","bars":[
        {"index":0,"size":"16M","bits":64},
        {"index":1,"size":"128G","bits":64,"prefetchable":true},
        {"index":3,"size":"32M","bits":64,"prefetchable":true}]}]}"#;

    #[test]
    fn sizes_parse_with_units_hex_and_spaces() {
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("0x1000").unwrap(), 4096);
        assert_eq!(parse_size("16M").unwrap(), 16 * MIB);
        assert_eq!(parse_size("128G").unwrap(), 128 * GIB);
        assert_eq!(parse_size("128g").unwrap(), 128 * GIB);
        assert_eq!(parse_size("2T").unwrap(), 2 << 40);
        assert_eq!(parse_size("4KiB").unwrap(), 4096);
        assert_eq!(parse_size("1 GB").unwrap(), GIB);
        assert_eq!(parse_size("256").unwrap(), 256);
        for bad in ["", "G", "12Q", "-1", "1.5G", "0x", "0xzz", "1G2"] {
            assert!(
                matches!(parse_size(bad), Err(SizeError::Invalid(_))),
                "{bad:?}"
            );
        }
        assert!(matches!(
            parse_size("99999999999T"),
            Err(SizeError::Overflow(_))
        ));
        assert!(matches!(
            parse_size("99999999999999999999999"),
            Err(SizeError::Overflow(_))
        ));
    }

    #[test]
    fn h100_spec_parses() {
        let devices = parse_spec(H100_SPEC).unwrap();
        assert_eq!(devices.len(), 1);
        let d = &devices[0];
        assert_eq!(d.name, "0000:41:00.0");
        assert_eq!(d.align_cap, None);
        assert_eq!(d.bars.len(), 3);
        assert_eq!(
            d.bars[1],
            BarInput::new(1, 128 * GIB, BarWidth::Bits64, true)
        );
        assert_eq!(d.bars[0].size, 16 * MIB);
        assert!(!d.bars[0].prefetchable);
    }

    #[test]
    fn optional_fields_parse() {
        let devices = parse_spec(
            r#"{"devices":[{"name":"shmem0","bar_align":"2M","bars":[
               {"index":0,"size":256,"bits":32},
               {"index":2,"size":"8G","bits":64,"prefetchable":true,
                "areas":[{"offset":0,"size":"4G"},{"offset":"4G","size":"4G"}],
                "msix_table":{"offset":"0x0","size":"2K"},
                "msix_pba":{"offset":2048,"size":8}}]}]}"#,
        )
        .unwrap();
        let d = &devices[0];
        assert_eq!(d.align_cap, Some(PageSize::Size2M));
        let bar = &d.bars[1];
        assert_eq!(
            bar.areas.as_deref(),
            Some(&[BarRange::new(0, 4 * GIB), BarRange::new(4 * GIB, 4 * GIB)][..])
        );
        assert_eq!(bar.msix_table, Some(BarRange::new(0, 2048)));
        assert_eq!(bar.msix_pba, Some(BarRange::new(2048, 8)));
        let auto = parse_spec(r#"{"devices":[{"name":"a","bar_align":"auto","bars":[]}]}"#);
        assert_eq!(auto.unwrap()[0].align_cap, None);
    }

    fn error_of(json: &str) -> String {
        parse_spec(json).unwrap_err().to_string()
    }

    #[test]
    fn errors_name_the_field() {
        let bar = |body: &str| format!(r#"{{"devices":[{{"name":"d","bars":[{body}]}}]}}"#);
        let cases = [
            (
                bar(r#"{"index":0,"size":"12Q","bits":64}"#),
                "\"size\": invalid size \"12Q\"",
            ),
            (
                bar(r#"{"index":0,"size":4096,"bits":48}"#),
                "\"bits\" must be 32 or 64, got 48",
            ),
            (bar(r#"{"index":0,"size":4096}"#), "missing field `bits`"),
            (
                bar(r#"{"index":0,"size":4096,"bits":64,"prefetch":true}"#),
                "unknown field `prefetch`",
            ),
            (
                bar(r#"{"index":0,"size":-5,"bits":64}"#),
                "\"size\" must not be negative",
            ),
            (
                bar(r#"{"index":0,"size":4096,"bits":64,"areas":[{"offset":"x","size":1}]}"#),
                "\"offset\": invalid size",
            ),
            (
                bar(r#"{"index":0,"size":true,"bits":64}"#),
                "\"size\" as a number of bytes",
            ),
            (
                r#"{"devices":[{"name":"d","bar_align":"3m","bars":[]}]}"#.to_string(),
                "\"bar_align\" must be",
            ),
            (r#"{"devices":[]}"#.to_string(), "lists no devices"),
            (r#"{"device":[]}"#.to_string(), "unknown field `device`"),
            ("not json".to_string(), "invalid plan spec (text)"),
        ];
        for (json, expected) in cases {
            let msg = error_of(&json);
            assert!(msg.contains(expected), "{msg:?} lacks {expected:?}");
        }
    }

    #[test]
    fn read_spec_names_the_file() {
        let dir = std::env::temp_dir().join(format!("barge-spec-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let missing = dir.join("missing.json");
        let msg = read_spec(&missing).unwrap_err().to_string();
        assert!(msg.contains("missing.json"), "{msg}");
        let bad = dir.join("bad.json");
        std::fs::write(&bad, "{").unwrap();
        let msg = read_spec(&bad).unwrap_err().to_string();
        assert!(msg.contains("bad.json"), "{msg}");
        let good = dir.join("h100.json");
        std::fs::write(&good, H100_SPEC).unwrap();
        assert_eq!(read_spec(&good).unwrap()[0].bars.len(), 3);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
