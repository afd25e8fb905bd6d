//! Validated names: device and supervisor ids, agent types, config versions, consumer groups.
//!
//! Every name is checked once, when it is made, so the rest of the library can
//! put it into a Redis key, a Kafka key or a SQL column without escaping.
//! Names are short (at most 64 bytes, the width of the design's `VARCHAR(64)`
//! columns) and kept inline: cloning one never allocates.

use std::cmp::Ordering;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::error::{Error, Result, excerpt};

/// The longest name any of these types accepts.
const CAPACITY: usize = 64;

/// A short ASCII string stored inline.
#[derive(Clone, Copy)]
struct Inline {
    len: u8,
    bytes: [u8; CAPACITY],
}

impl Inline {
    fn new(
        kind: &'static str,
        text: &str,
        max: usize,
        allowed: fn(u8) -> bool,
        allowed_desc: &'static str,
    ) -> Result<Self> {
        if text.is_empty() {
            return Err(Error::invalid_input(format!("{kind} must not be empty")));
        }
        if text.len() > max {
            return Err(Error::invalid_input(format!(
                "{kind} {} is {} bytes long; the limit is {max}",
                excerpt(text),
                text.len()
            )));
        }
        if let Some(at) = text.bytes().position(|b| !allowed(b)) {
            // Every byte before `at` is ASCII, so `at` starts a character: name
            // it whole, not its first byte ('Ã' for 'é').
            let bad = text[at..].chars().next().unwrap_or_default();
            return Err(Error::invalid_input(format!(
                "{kind} {} contains {bad:?}; only {allowed_desc} are allowed",
                excerpt(text),
            )));
        }
        let mut bytes = [0; CAPACITY];
        bytes[..text.len()].copy_from_slice(text.as_bytes());
        Ok(Inline {
            len: text.len() as u8,
            bytes,
        })
    }

    #[inline]
    fn as_bytes(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len)]
    }

    #[inline]
    fn as_str(&self) -> &str {
        // Only ASCII bytes are ever stored, so this never takes the fallback.
        std::str::from_utf8(self.as_bytes()).unwrap_or_default()
    }
}

fn id_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-')
}

fn key_part_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-')
}

fn version_byte(b: u8) -> bool {
    id_byte(b) || b == b'+'
}

macro_rules! name_type {
    (
        $(#[$meta:meta])*
        $name:ident, kind = $kind:literal, max = $max:expr, allowed = $allowed:path, allowed_desc = $desc:literal
    ) => {
        $(#[$meta])*
        #[derive(Clone, Copy)]
        pub struct $name(Inline);

        impl $name {
            /// The longest accepted value, in bytes.
            pub const MAX_LEN: usize = $max;

            /// Validates `text`; an invalid value is an [`Error::InvalidInput`] naming it.
            pub fn new(text: impl AsRef<str>) -> Result<Self> {
                Inline::new($kind, text.as_ref(), $max, $allowed, $desc).map(Self)
            }

            /// The value as a string slice.
            #[inline]
            pub fn as_str(&self) -> &str {
                self.0.as_str()
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({:?})", stringify!($name), self.as_str())
            }
        }

        // Equality, order and hash work on the raw bytes: they are on the hot
        // path of every lookup, and the bytes are ASCII, so byte order is text order.
        impl PartialEq for $name {
            #[inline]
            fn eq(&self, other: &Self) -> bool {
                self.0.as_bytes() == other.0.as_bytes()
            }
        }

        impl Eq for $name {}

        impl PartialOrd for $name {
            #[inline]
            fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
                Some(self.cmp(other))
            }
        }

        impl Ord for $name {
            #[inline]
            fn cmp(&self, other: &Self) -> Ordering {
                self.0.as_bytes().cmp(other.0.as_bytes())
            }
        }

        impl Hash for $name {
            #[inline]
            fn hash<H: Hasher>(&self, state: &mut H) {
                self.0.as_bytes().hash(state);
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                self.as_str()
            }
        }

        impl FromStr for $name {
            type Err = Error;
            fn from_str(text: &str) -> Result<Self> {
                Self::new(text)
            }
        }

        impl TryFrom<&str> for $name {
            type Error = Error;
            fn try_from(text: &str) -> Result<Self> {
                Self::new(text)
            }
        }

        impl TryFrom<String> for $name {
            type Error = Error;
            fn try_from(text: String) -> Result<Self> {
                Self::new(text)
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, serializer: S) -> std::result::Result<S::Ok, S::Error> {
                serializer.serialize_str(self.as_str())
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(deserializer: D) -> std::result::Result<Self, D::Error> {
                let text = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
                Self::new(text.as_ref()).map_err(serde::de::Error::custom)
            }
        }
    };
}

name_type! {
    /// Identifies one device (or agent): 1–64 bytes of `[A-Za-z0-9._:-]`.
    ///
    /// ```
    /// use opamp_core::DeviceId;
    /// let id = DeviceId::new("device-5")?;
    /// assert_eq!(id.as_str(), "device-5");
    /// assert!(DeviceId::new("no spaces").is_err());
    /// # Ok::<(), opamp_core::Error>(())
    /// ```
    DeviceId, kind = "device id", max = 64, allowed = id_byte, allowed_desc = "ASCII letters, digits and . _ : -"
}

name_type! {
    /// Identifies one supervisor: 1–64 bytes of `[A-Za-z0-9._:-]`.
    SupervisorId, kind = "supervisor id", max = 64, allowed = id_byte, allowed_desc = "ASCII letters, digits and . _ : -"
}

name_type! {
    /// The kind of agent a device runs, e.g. `fluentbit`: 1–32 bytes of `[A-Za-z0-9._-]`.
    ///
    /// No `:`, because an agent type is the middle part of the key `config:{type}:{version}`.
    AgentType, kind = "agent type", max = 32, allowed = key_part_byte, allowed_desc = "ASCII letters, digits and . _ -"
}

name_type! {
    /// A configuration version, e.g. `v1.2.3`: 1–64 bytes of `[A-Za-z0-9._:+-]`.
    ConfigVersion, kind = "config version", max = 64, allowed = version_byte, allowed_desc = "ASCII letters, digits and . _ : + -"
}

name_type! {
    /// A consumer group on the event bus: 1–64 bytes of `[A-Za-z0-9._-]`.
    GroupName, kind = "consumer group", max = 64, allowed = key_part_byte, allowed_desc = "ASCII letters, digits and . _ -"
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use proptest::prelude::*;

    use super::*;

    #[test]
    fn accepts_the_designs_examples() {
        for id in ["device-5", "supervisor-pod-3", "a", "x.y_z:1-2"] {
            assert_eq!(DeviceId::new(id).unwrap().as_str(), id);
            assert_eq!(SupervisorId::new(id).unwrap().to_string(), id);
        }
        assert!(AgentType::new("fluentbit").is_ok());
        assert!(ConfigVersion::new("v1.2.3+build.7").is_ok());
    }

    #[test]
    fn rejects_with_a_message_naming_the_problem() {
        let err = DeviceId::new("").unwrap_err().to_string();
        assert_eq!(err, "invalid input: device id must not be empty");
        let err = DeviceId::new("a b").unwrap_err().to_string();
        assert!(err.contains("device id \"a b\" contains ' '"), "{err}");
        let err = DeviceId::new("x".repeat(65)).unwrap_err().to_string();
        assert!(err.contains("65 bytes long; the limit is 64"), "{err}");
        let err = AgentType::new("fluent:bit").unwrap_err().to_string();
        assert!(err.contains("agent type"), "{err}");
        assert!(AgentType::new("x".repeat(33)).is_err());
        assert!(DeviceId::new("dévice").is_err());
    }

    #[test]
    fn a_character_beyond_ascii_is_named_whole() {
        let err = DeviceId::new("dévice").unwrap_err().to_string();
        assert!(err.contains("contains 'é'"), "{err}");
        let err = DeviceId::new("a\u{1F600}").unwrap_err().to_string();
        assert!(err.contains("contains '\u{1F600}'"), "{err}");
    }

    #[test]
    fn serde_validates() {
        let id: DeviceId = serde_json::from_str("\"device-5\"").unwrap();
        assert_eq!(serde_json::to_string(&id).unwrap(), "\"device-5\"");
        let err = serde_json::from_str::<DeviceId>("\"bad id\"").unwrap_err();
        assert!(err.to_string().contains("device id"), "{err}");
    }

    #[test]
    fn equal_ids_hash_alike_and_order_as_text() {
        let mut map = HashMap::new();
        map.insert(DeviceId::new("d1").unwrap(), 1);
        assert_eq!(map.get(&DeviceId::new("d1").unwrap()), Some(&1));
        assert_eq!(map.get(&DeviceId::new("d10").unwrap()), None);
        let mut ids: Vec<_> = ["b", "a1", "a", "B"].map(|s| DeviceId::new(s).unwrap()).to_vec();
        ids.sort();
        assert_eq!(
            ids.iter().map(DeviceId::as_str).collect::<Vec<_>>(),
            ["B", "a", "a1", "b"]
        );
    }

    proptest! {
        #[test]
        fn valid_ids_round_trip(text in "[A-Za-z0-9._:-]{1,64}") {
            let id = DeviceId::new(&text).unwrap();
            prop_assert_eq!(id.as_str(), text.as_str());
            let parsed: DeviceId = id.to_string().parse().unwrap();
            prop_assert_eq!(parsed, id);
        }

        #[test]
        fn arbitrary_text_never_panics(text in any::<String>()) {
            let valid = !text.is_empty() && text.len() <= 64 && text.bytes().all(id_byte);
            prop_assert_eq!(DeviceId::new(&text).is_ok(), valid);
        }
    }
}
