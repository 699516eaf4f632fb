//! The network devices of a VM: virtio-net over a tap interface, as the
//! `--net` option and the config file's network entries.
//!
//! ```text
//! --net tap=NAME[,mac=aa:bb:cc:dd:ee:ff]      (repeatable)
//! ```
//!
//! In JSON, one object per device:
//!
//! ```json
//! {"tap": "tap0", "mac": "02:00:00:00:00:01"}
//! ```
//!
//! The tap must exist (`ip tuntap add dev NAME mode tap`); barge attaches
//! to it and never creates one. Without `mac` the device gets a random
//! locally administered unicast MAC, new for every VM.

use std::fmt;
use std::str::FromStr;

use devices::virtio::net::tap::interface_name_problem;
use devices::virtio::net::NetOptions;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::config::options::{parse_key_values, OptionError};

const NET_OPTION: &str = "--net";
const NET_EXAMPLE: &str = "tap=tap0,mac=02:00:00:00:00:01";
/// A MAC to show in errors.
const MAC_EXAMPLE: &str = "mac=02:00:00:00:00:01";

/// Errors in a `--net` value (and its JSON form).
#[derive(Debug, thiserror::Error)]
pub enum NetConfigError {
    /// The value's syntax: an unknown, repeated or missing key.
    #[error(transparent)]
    Option(#[from] OptionError),
    /// A MAC address that does not parse.
    #[error("--net mac={0:?} is not a MAC address; write six two-digit hex bytes separated by colons, e.g. {MAC_EXAMPLE}")]
    InvalidMac(String),
    /// A multicast (or broadcast) MAC address.
    #[error("--net mac={0}: a multicast address (the lowest bit of the first byte is set) cannot be a network card's; use a unicast one such as {MAC_EXAMPLE} (02: is locally administered), or leave mac= out to have one generated")]
    MulticastMac(MacAddress),
    /// A tap name Linux does not take.
    #[error("--net tap={name:?}: the interface name {reason}")]
    InvalidTap {
        /// The name as given.
        name: String,
        /// What is wrong with it.
        reason: &'static str,
    },
}

/// A unicast MAC address, written `aa:bb:cc:dd:ee:ff`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MacAddress([u8; 6]);

impl MacAddress {
    /// The address `bytes`, refused when multicast.
    pub fn new(bytes: [u8; 6]) -> Result<MacAddress, NetConfigError> {
        let mac = MacAddress(bytes);
        if devices::virtio::net::is_multicast_mac(&bytes) {
            return Err(NetConfigError::MulticastMac(mac));
        }
        Ok(mac)
    }

    /// The six bytes.
    pub fn bytes(&self) -> [u8; 6] {
        self.0
    }
}

impl FromStr for MacAddress {
    type Err = NetConfigError;

    /// Parses six two-digit hex bytes separated by `:` (either case).
    fn from_str(text: &str) -> Result<Self, NetConfigError> {
        let invalid = || NetConfigError::InvalidMac(text.to_string());
        let mut bytes = [0u8; 6];
        let mut parts = text.split(':');
        for byte in &mut bytes {
            let part = parts.next().ok_or_else(invalid)?;
            if part.len() != 2 || !part.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(invalid());
            }
            *byte = u8::from_str_radix(part, 16).map_err(|_| invalid())?;
        }
        if parts.next().is_some() {
            return Err(invalid());
        }
        MacAddress::new(bytes)
    }
}

impl fmt::Display for MacAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&devices::virtio::net::format_mac(&self.0))
    }
}

impl Serialize for MacAddress {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for MacAddress {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// A virtio-net device over an existing tap interface.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetConfig {
    /// The tap interface's name (at most 15 bytes).
    pub tap: String,
    /// The guest's MAC; `None`: generated, random per VM.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<MacAddress>,
}

impl NetConfig {
    /// Checks the tap name (the rules of Linux interface names: not
    /// empty, at most 15 bytes, no `/`, `:` or whitespace). A JSON
    /// configuration is checked here; `--net` values when parsed.
    pub fn validate(&self) -> Result<(), NetConfigError> {
        if let Some(reason) = interface_name_problem(&self.tap) {
            return Err(NetConfigError::InvalidTap {
                name: self.tap.clone(),
                reason,
            });
        }
        Ok(())
    }

    /// The device options, for a device called `name` (e.g.
    /// `virtio-net0`).
    pub fn options(&self, name: &str) -> NetOptions {
        NetOptions {
            tap: self.tap.clone(),
            mac: self.mac.map(|mac| mac.bytes()),
            name: name.to_string(),
        }
    }
}

impl FromStr for NetConfig {
    type Err = NetConfigError;

    /// Parses `tap=NAME[,mac=MAC]` (the `--net` value) and validates it.
    fn from_str(text: &str) -> Result<Self, NetConfigError> {
        let pairs = parse_key_values(NET_OPTION, NET_EXAMPLE, &["tap", "mac"], text)?;
        let mut tap = None;
        let mut mac = None;
        for (key, value) in pairs {
            match key {
                "tap" => tap = Some(value.to_string()),
                "mac" => mac = Some(value.parse()?),
                _ => {}
            }
        }
        let config = NetConfig {
            tap: tap.ok_or(OptionError::MissingKey {
                option: NET_OPTION,
                key: "tap",
                example: NET_EXAMPLE,
            })?,
            mac,
        };
        config.validate()?;
        Ok(config)
    }
}

impl fmt::Display for NetConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "tap={}", self.tap)?;
        if let Some(mac) = &self.mac {
            write!(f, ",mac={mac}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn net_option_parses_tap_and_mac_and_prints_back() {
        let net: NetConfig = "tap=tap0".parse().unwrap();
        assert_eq!(
            net,
            NetConfig {
                tap: "tap0".into(),
                mac: None
            }
        );
        assert_eq!(net.to_string(), "tap=tap0");
        let net: NetConfig = "mac=02:AB:cd:00:11:FF,tap=barge-tap15byte".parse().unwrap();
        assert_eq!(net.tap, "barge-tap15byte");
        assert_eq!(
            net.mac.unwrap().bytes(),
            [0x02, 0xab, 0xcd, 0x00, 0x11, 0xff]
        );
        assert_eq!(net.to_string(), "tap=barge-tap15byte,mac=02:ab:cd:00:11:ff");
        assert_eq!(net.to_string().parse::<NetConfig>().unwrap(), net);
        let options = net.options("virtio-net1");
        assert_eq!(options.tap, "barge-tap15byte");
        assert_eq!(options.mac, Some([0x02, 0xab, 0xcd, 0x00, 0x11, 0xff]));
        assert_eq!(options.name, "virtio-net1");
    }

    #[test]
    fn a_mac_that_does_not_parse_is_named_with_an_example() {
        for bad in [
            "02:00:00:00:00",
            "02:00:00:00:00:01:02",
            "02-00-00-00-00-01",
            "2:0:0:0:0:1",
            "02:00:00:00:00:0g",
            "020000000001",
            "02:00:00:00:00:+1",
            "",
        ] {
            let err = format!("tap=tap0,mac={bad}")
                .parse::<NetConfig>()
                .unwrap_err();
            assert!(
                matches!(err, NetConfigError::InvalidMac(_)),
                "{bad:?}: {err:?}"
            );
            let message = err.to_string();
            assert!(
                message.starts_with(&format!("--net mac={bad:?} is not a MAC address")),
                "{message}"
            );
            assert!(message.contains("e.g. mac=02:00:00:00:00:01"), "{message}");
        }
    }

    #[test]
    fn multicast_macs_are_refused() {
        for multicast in [
            "01:00:5e:00:00:01",
            "ff:ff:ff:ff:ff:ff",
            "33:33:00:00:00:01",
        ] {
            let err = multicast.parse::<MacAddress>().unwrap_err();
            assert!(matches!(err, NetConfigError::MulticastMac(_)), "{err:?}");
            assert!(err.to_string().contains("multicast"), "{err}");
            assert!(err.to_string().contains(multicast), "{err}");
        }
        assert!(MacAddress::new([0x02, 0, 0, 0, 0, 1]).is_ok());
        assert!(MacAddress::new([0x03, 0, 0, 0, 0, 1]).is_err());
    }

    #[test]
    fn net_option_errors_name_the_problem() {
        for (input, expected) in [
            (
                "mac=02:00:00:00:00:01",
                "--net: missing tap=...; e.g. tap=tap0,mac=02:00:00:00:00:01",
            ),
            ("tap=", "--net tap=\"\": the interface name is empty"),
            ("tap=a-tap-name-too-long", "is longer than 15 bytes"),
            ("tap=../eth0", "contains '/'"),
            ("tap=tap 0", "contains '/', ':', a NUL or whitespace"),
            (
                "tap=tap0,colour=red",
                "unknown key \"colour\"; valid keys: tap, mac",
            ),
            ("tap=tap0,tap=tap1", "key \"tap\" is given twice"),
            ("tap0", "expected key=value but found \"tap0\""),
        ] {
            let err = input.parse::<NetConfig>().unwrap_err().to_string();
            assert!(err.contains(expected), "{input:?}: {err}");
        }
    }

    #[test]
    fn net_config_round_trips_through_json() {
        let net: NetConfig = "tap=tap0,mac=02:00:00:00:00:01".parse().unwrap();
        let json = serde_json::to_string(&net).unwrap();
        assert_eq!(json, r#"{"tap":"tap0","mac":"02:00:00:00:00:01"}"#);
        assert_eq!(serde_json::from_str::<NetConfig>(&json).unwrap(), net);
        let bare: NetConfig = serde_json::from_str(r#"{"tap": "tap1"}"#).unwrap();
        assert_eq!(serde_json::to_string(&bare).unwrap(), r#"{"tap":"tap1"}"#);
        let err = serde_json::from_str::<NetConfig>(r#"{"tap": "tap0", "model": "e1000"}"#)
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown field `model`"), "{err}");
        let err = serde_json::from_str::<NetConfig>(r#"{"tap": "tap0", "mac": "02:00"}"#)
            .unwrap_err()
            .to_string();
        assert!(err.contains("is not a MAC address"), "{err}");
        // The tap name is checked by validate (JSON is not parsed by
        // FromStr).
        let long: NetConfig = serde_json::from_str(r#"{"tap": "a-tap-name-too-long"}"#).unwrap();
        assert!(matches!(
            long.validate(),
            Err(NetConfigError::InvalidTap { .. })
        ));
    }
}
