//! Configuration bundles, their content hash, and versioned templates.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result, excerpt};
use crate::id::{AgentType, ConfigVersion};
use crate::time::Timestamp;

/// The longest accepted file name in a bundle, in bytes.
pub const MAX_FILE_NAME_LEN: usize = 255;

/// One file of a configuration: its body and its MIME type.
///
/// Maps onto OpAMP's `AgentConfigFile { body, content_type }`.
///
/// In JSON a body that is UTF-8 is written as `"text"`, any other as
/// `"base64"`: `{"content_type": "text/plain", "text": "[SERVICE]\n..."}`.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct ConfigFile {
    /// The MIME type of the body, e.g. `text/plain` or `text/yaml`; may be empty.
    pub content_type: String,
    /// The file's bytes.
    pub body: Vec<u8>,
}

impl ConfigFile {
    /// A file with the given type and body.
    pub fn new(content_type: impl Into<String>, body: impl Into<Vec<u8>>) -> Self {
        ConfigFile {
            content_type: content_type.into(),
            body: body.into(),
        }
    }
}

impl fmt::Debug for ConfigFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConfigFile")
            .field("content_type", &self.content_type)
            .field("body_len", &self.body.len())
            .finish()
    }
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigFileRepr {
    #[serde(default)]
    content_type: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    text: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    base64: Option<String>,
}

impl Serialize for ConfigFile {
    fn serialize<S: Serializer>(&self, serializer: S) -> std::result::Result<S::Ok, S::Error> {
        let (text, base64) = match std::str::from_utf8(&self.body) {
            Ok(text) => (Some(text.to_owned()), None),
            Err(_) => (None, Some(BASE64.encode(&self.body))),
        };
        ConfigFileRepr {
            content_type: self.content_type.clone(),
            text,
            base64,
        }
        .serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for ConfigFile {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> std::result::Result<Self, D::Error> {
        use serde::de::Error as _;
        let repr = ConfigFileRepr::deserialize(deserializer)?;
        let body = match (repr.text, repr.base64) {
            (Some(text), None) => text.into_bytes(),
            (None, Some(encoded)) => BASE64
                .decode(encoded.as_bytes())
                .map_err(|err| D::Error::custom(format!("config file body is not base64: {err}")))?,
            (None, None) => return Err(D::Error::custom("config file needs `text` or `base64`")),
            (Some(_), Some(_)) => {
                return Err(D::Error::custom("config file has both `text` and `base64`; give one"));
            }
        };
        Ok(ConfigFile {
            content_type: repr.content_type,
            body,
        })
    }
}

/// A named set of configuration files, delivered and applied as one.
///
/// Maps 1:1 onto OpAMP's `AgentConfigMap`: file name → [`ConfigFile`]. An
/// agent with a single configuration file may use the empty name.
///
/// ```
/// use opamp_core::{ConfigBundle, ConfigFile};
///
/// let bundle = ConfigBundle::new()
///     .with_file("fluent-bit.conf", ConfigFile::new("text/plain", "[SERVICE]\n    hot_reload On\n"))?;
/// assert_eq!(bundle.len(), 1);
/// assert_eq!(bundle.hash().to_string().len(), 64);
/// # Ok::<(), opamp_core::Error>(())
/// ```
#[derive(Clone, Default, PartialEq, Eq, Hash, Serialize)]
#[serde(transparent)]
pub struct ConfigBundle {
    files: BTreeMap<String, ConfigFile>,
}

impl ConfigBundle {
    /// An empty bundle.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds (or replaces) the file `name`; names longer than 255 bytes or with control characters are rejected.
    pub fn with_file(mut self, name: impl Into<String>, file: ConfigFile) -> Result<Self> {
        self.insert(name, file)?;
        Ok(self)
    }

    /// Adds (or replaces) the file `name`, returning the file it replaced.
    pub fn insert(&mut self, name: impl Into<String>, file: ConfigFile) -> Result<Option<ConfigFile>> {
        let name = name.into();
        validate_file_name(&name)?;
        Ok(self.files.insert(name, file))
    }

    /// The file called `name`.
    pub fn get(&self, name: &str) -> Option<&ConfigFile> {
        self.files.get(name)
    }

    /// The files in name order.
    pub fn files(&self) -> impl ExactSizeIterator<Item = (&str, &ConfigFile)> {
        self.files.iter().map(|(name, file)| (name.as_str(), file))
    }

    /// How many files the bundle holds.
    pub fn len(&self) -> usize {
        self.files.len()
    }

    /// Whether the bundle holds no file.
    pub fn is_empty(&self) -> bool {
        self.files.is_empty()
    }

    /// The total size of every body, in bytes.
    pub fn body_bytes(&self) -> usize {
        self.files.values().map(|f| f.body.len()).sum()
    }

    /// The SHA-256 content hash (see [`ConfigHash`] for what is hashed).
    pub fn hash(&self) -> ConfigHash {
        let mut hasher = Sha256::new();
        for (name, file) in &self.files {
            for part in [name.as_bytes(), file.content_type.as_bytes(), &file.body] {
                hasher.update((part.len() as u64).to_be_bytes());
                hasher.update(part);
            }
        }
        ConfigHash(hasher.finalize().into())
    }
}

impl fmt::Debug for ConfigBundle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.files.iter()).finish()
    }
}

impl<'de> Deserialize<'de> for ConfigBundle {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> std::result::Result<Self, D::Error> {
        let files = BTreeMap::<String, ConfigFile>::deserialize(deserializer)?;
        for name in files.keys() {
            validate_file_name(name).map_err(serde::de::Error::custom)?;
        }
        Ok(ConfigBundle { files })
    }
}

fn validate_file_name(name: &str) -> Result<()> {
    if name.len() > MAX_FILE_NAME_LEN {
        return Err(Error::invalid_input(format!(
            "config file name {} is {} bytes long; the limit is {MAX_FILE_NAME_LEN}",
            excerpt(name),
            name.len()
        )));
    }
    if name.chars().any(char::is_control) {
        return Err(Error::invalid_input(format!(
            "config file name {} contains a control character",
            excerpt(name)
        )));
    }
    Ok(())
}

/// The SHA-256 hash of a [`ConfigBundle`]'s content.
///
/// What is hashed: for each file in byte-wise name order, the name, the
/// content type and the body, each preceded by its length as a big-endian
/// `u64`. The encoding is unambiguous, so two bundles hash alike exactly when
/// they hold the same files. Written as 64 lower-case hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConfigHash([u8; 32]);

impl ConfigHash {
    /// Wraps raw hash bytes.
    pub const fn from_bytes(bytes: [u8; 32]) -> Self {
        ConfigHash(bytes)
    }

    /// The raw hash bytes (as sent in OpAMP's `config_hash`).
    pub const fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Reads a hash from raw bytes, which must be exactly 32.
    pub fn from_slice(bytes: &[u8]) -> Result<Self> {
        <[u8; 32]>::try_from(bytes)
            .map(ConfigHash)
            .map_err(|_| Error::invalid_input(format!("config hash must be 32 bytes, got {}", bytes.len())))
    }
}

impl fmt::Display for ConfigHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for byte in self.0 {
            write!(f, "{byte:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for ConfigHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ConfigHash({self})")
    }
}

impl FromStr for ConfigHash {
    type Err = Error;

    fn from_str(text: &str) -> Result<Self> {
        let invalid = || Error::invalid_input(format!("config hash {} is not 64 hex digits", excerpt(text)));
        if text.len() != 64 {
            return Err(invalid());
        }
        let mut bytes = [0u8; 32];
        for (i, byte) in bytes.iter_mut().enumerate() {
            *byte = u8::from_str_radix(text.get(2 * i..2 * i + 2).ok_or_else(invalid)?, 16).map_err(|_| invalid())?;
        }
        Ok(ConfigHash(bytes))
    }
}

impl Serialize for ConfigHash {
    fn serialize<S: Serializer>(&self, serializer: S) -> std::result::Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ConfigHash {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> std::result::Result<Self, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// Names one template version: the agent type and the version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ConfigRef {
    /// The agent type the configuration is for.
    pub agent_type: AgentType,
    /// The template version.
    #[serde(rename = "config_version")]
    pub version: ConfigVersion,
}

impl ConfigRef {
    /// The reference to `agent_type` at `version`.
    pub fn new(agent_type: AgentType, version: ConfigVersion) -> Self {
        ConfigRef { agent_type, version }
    }
}

impl fmt::Display for ConfigRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.agent_type, self.version)
    }
}

/// One immutable version of an agent type's configuration.
///
/// Once stored, a version never changes: storing the same version with other
/// content is [`Error::AlreadyExists`]; storing identical content again is accepted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct ConfigTemplate {
    /// The agent type the configuration is for.
    pub agent_type: AgentType,
    /// The version.
    #[serde(rename = "config_version")]
    pub version: ConfigVersion,
    /// The files.
    pub bundle: ConfigBundle,
    /// Who created it (a user or service name; free text).
    #[serde(default)]
    pub created_by: String,
    /// When it was created.
    pub created_at: Timestamp,
}

impl ConfigTemplate {
    /// A template created now by `created_by`.
    pub fn new(config: ConfigRef, bundle: ConfigBundle, created_by: impl Into<String>, created_at: Timestamp) -> Self {
        ConfigTemplate {
            agent_type: config.agent_type,
            version: config.version,
            bundle,
            created_by: created_by.into(),
            created_at,
        }
    }

    /// Which version this is.
    pub fn reference(&self) -> ConfigRef {
        ConfigRef::new(self.agent_type, self.version)
    }

    /// The content hash of the bundle.
    pub fn hash(&self) -> ConfigHash {
        self.bundle.hash()
    }

    /// Whether `other` has the same version and content (creator and time aside).
    pub fn same_content(&self, other: &ConfigTemplate) -> bool {
        self.reference() == other.reference() && self.bundle == other.bundle
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn bundle(files: &[(&str, &str, &[u8])]) -> ConfigBundle {
        let mut b = ConfigBundle::new();
        for (name, ty, body) in files {
            b.insert(*name, ConfigFile::new(*ty, body.to_vec())).unwrap();
        }
        b
    }

    #[test]
    fn hash_is_content_addressed_and_unambiguous() {
        let a = bundle(&[("a", "text/plain", b"xy")]);
        let b = bundle(&[("a", "text/plain", b"xy")]);
        assert_eq!(a.hash(), b.hash());
        // Moving bytes between fields changes the hash.
        let c = bundle(&[("ax", "text/plain", b"y")]);
        assert_ne!(a.hash(), c.hash());
        let d = bundle(&[("a", "text/plai", b"nxy")]);
        assert_ne!(a.hash(), d.hash());
        // Known answer: the empty bundle is SHA-256 of nothing.
        assert_eq!(
            ConfigBundle::new().hash().to_string(),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }

    #[test]
    fn json_text_and_base64_bodies() {
        let b = bundle(&[
            ("fluent-bit.conf", "text/plain", b"[SERVICE]\n"),
            ("bin", "", &[0xff, 0]),
        ]);
        let json = serde_json::to_string(&b).unwrap();
        assert_eq!(
            json,
            r#"{"bin":{"content_type":"","base64":"/wA="},"fluent-bit.conf":{"content_type":"text/plain","text":"[SERVICE]\n"}}"#
        );
        let back: ConfigBundle = serde_json::from_str(&json).unwrap();
        assert_eq!(back, b);
    }

    #[test]
    fn json_errors_name_the_problem() {
        let err = serde_json::from_str::<ConfigBundle>(r#"{"a":{"content_type":"x"}}"#).unwrap_err();
        assert!(err.to_string().contains("needs `text` or `base64`"), "{err}");
        let err = serde_json::from_str::<ConfigBundle>(r#"{"a":{"text":"x","base64":"eA=="}}"#).unwrap_err();
        assert!(err.to_string().contains("both"), "{err}");
        let err = serde_json::from_str::<ConfigBundle>(r#"{"a":{"base64":"!!"}}"#).unwrap_err();
        assert!(err.to_string().contains("not base64"), "{err}");
        let err = serde_json::from_str::<ConfigBundle>(r#"{"a\u0000":{"text":""}}"#).unwrap_err();
        assert!(err.to_string().contains("control character"), "{err}");
    }

    #[test]
    fn hash_hex_round_trip_and_errors() {
        let h = bundle(&[("a", "", b"1")]).hash();
        assert_eq!(h.to_string().parse::<ConfigHash>().unwrap(), h);
        assert!("zz".parse::<ConfigHash>().is_err());
        assert!("é".repeat(32).parse::<ConfigHash>().is_err());
        assert!(ConfigHash::from_slice(&[0; 31]).is_err());
        assert_eq!(ConfigHash::from_slice(h.as_bytes()).unwrap(), h);
    }

    #[test]
    fn file_names_are_checked() {
        assert!(ConfigBundle::new().with_file("", ConfigFile::new("", "")).is_ok());
        assert!(
            ConfigBundle::new()
                .with_file("x".repeat(256), ConfigFile::new("", ""))
                .is_err()
        );
    }

    proptest! {
        #[test]
        fn bundles_round_trip_through_json(
            files in proptest::collection::btree_map("[a-z./-]{0,12}", (".{0,8}", proptest::collection::vec(any::<u8>(), 0..32)), 0..4)
        ) {
            let mut b = ConfigBundle::new();
            for (name, (ty, body)) in files {
                b.insert(name, ConfigFile::new(ty, body)).unwrap();
            }
            let back: ConfigBundle = serde_json::from_str(&serde_json::to_string(&b).unwrap()).unwrap();
            prop_assert_eq!(back.hash(), b.hash());
            prop_assert_eq!(back, b);
        }
    }
}
