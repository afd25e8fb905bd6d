//! Device credentials: fleet tokens that prove a device id without a lookup.
//!
//! A supervisor holds one secret for the whole fleet, the [`FleetKey`]. A
//! device's token is an HMAC-SHA256 of its id under that key, so any
//! supervisor can check it on the spot, with no database of credentials, and
//! a token for one device is useless for any other. Provision each device
//! with [`FleetKey::token`] (the load generator and tests compute them the
//! same way).
//!
//! The token text is `v1.` followed by the unpadded base64url MAC of
//! `opamp-device-token:v1:` and the device id. The prefix names the scheme,
//! so a future one can be told apart; the domain string keeps these MACs from
//! being mistaken for any other use of the same key.
//!
//! ```
//! use opamp_core::DeviceId;
//! use opamp_transport::auth::FleetKey;
//!
//! let key = FleetKey::new(b"a fleet secret of at least 16 bytes")?;
//! let device = DeviceId::new("device-5")?;
//! let token = key.token(&device);
//! assert!(key.verify(&device, token.as_str()).is_ok());
//! assert!(key.verify(&DeviceId::new("device-6")?, token.as_str()).is_err());
//! # Ok::<(), opamp_core::Error>(())
//! ```

use std::fmt;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use opamp_core::{DeviceId, Error, Result};
use sha2::Sha256;

const SCHEME: &str = "v1.";
const DOMAIN: &[u8] = b"opamp-device-token:v1:";
/// HMAC-SHA256's output.
const MAC_LEN: usize = 32;

/// The fleet secret that device tokens are derived from and checked against.
///
/// Its `Debug` shows only its length.
#[derive(Clone)]
pub struct FleetKey {
    mac: Hmac<Sha256>,
    len: usize,
}

impl FleetKey {
    /// The shortest secret accepted. 32 random bytes are recommended.
    pub const MIN_LEN: usize = 16;

    /// A key from the raw secret; [`Error::InvalidInput`] if it is shorter than [`Self::MIN_LEN`].
    pub fn new(secret: impl AsRef<[u8]>) -> Result<Self> {
        let secret = secret.as_ref();
        if secret.len() < Self::MIN_LEN {
            return Err(Error::invalid_input(format!(
                "a fleet key needs at least {} bytes, got {}",
                Self::MIN_LEN,
                secret.len()
            )));
        }
        let mac =
            Hmac::<Sha256>::new_from_slice(secret).map_err(|err| Error::invalid_input(format!("fleet key: {err}")))?;
        Ok(FleetKey { mac, len: secret.len() })
    }

    /// A key from base64 text (standard or URL-safe alphabet, padded or not),
    /// as it is kept in configuration files and environment variables.
    pub fn from_base64(text: &str) -> Result<Self> {
        let text = text.trim().trim_end_matches('=');
        let bytes = URL_SAFE_NO_PAD
            .decode(text.replace('+', "-").replace('/', "_"))
            .map_err(|err| Error::invalid_input(format!("fleet key is not base64: {err}")))?;
        Self::new(bytes)
    }

    /// The token that proves `device`.
    pub fn token(&self, device: &DeviceId) -> DeviceToken {
        let mac = self.mac_of(device).finalize().into_bytes();
        DeviceToken(format!("{SCHEME}{}", URL_SAFE_NO_PAD.encode(mac)))
    }

    /// Checks that `token` proves `device`, in constant time.
    ///
    /// [`Error::Unauthenticated`] says what was wrong with it (malformed,
    /// another scheme, or not this device's), never what the right one is.
    pub fn verify(&self, device: &DeviceId, token: &str) -> Result<()> {
        let refuse = |why: &str| Err(Error::unauthenticated(format!("token for device {device} {why}")));
        if token.is_empty() {
            return refuse("is missing");
        }
        let Some(encoded) = token.strip_prefix(SCHEME) else {
            return refuse("does not start with the scheme prefix `v1.`");
        };
        let mut mac = [0u8; MAC_LEN];
        match URL_SAFE_NO_PAD.decode_slice(encoded, &mut mac) {
            Ok(MAC_LEN) => {}
            _ => return refuse("is not a 32-byte base64url MAC"),
        }
        match self.mac_of(device).verify_slice(&mac) {
            Ok(()) => Ok(()),
            Err(_) => refuse("does not match: it was not issued for this device under this fleet key"),
        }
    }

    fn mac_of(&self, device: &DeviceId) -> Hmac<Sha256> {
        let mut mac = self.mac.clone();
        mac.update(DOMAIN);
        mac.update(device.as_str().as_bytes());
        mac
    }
}

impl fmt::Debug for FleetKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "FleetKey({} bytes)", self.len)
    }
}

/// A device's token: the credential it presents when it registers.
///
/// Its `Debug` hides it.
#[derive(Clone, PartialEq, Eq)]
pub struct DeviceToken(String);

impl DeviceToken {
    /// A token as provisioned on the device (not checked here; the supervisor checks it).
    pub fn new(token: impl Into<String>) -> Self {
        DeviceToken(token.into())
    }

    /// The token text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for DeviceToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("DeviceToken(..)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> FleetKey {
        FleetKey::new([7u8; 32]).unwrap()
    }

    #[test]
    fn a_token_proves_only_its_own_device() {
        let (d1, d2) = (DeviceId::new("d1").unwrap(), DeviceId::new("d2").unwrap());
        let token = key().token(&d1);
        assert!(token.as_str().starts_with("v1."));
        key().verify(&d1, token.as_str()).unwrap();
        let err = key().verify(&d2, token.as_str()).unwrap_err().to_string();
        assert!(err.contains("device d2") && err.contains("does not match"), "{err}");
        let other_fleet = FleetKey::new([8u8; 32]).unwrap();
        assert!(other_fleet.verify(&d1, token.as_str()).is_err());
    }

    #[test]
    fn malformed_tokens_are_named() {
        let d1 = DeviceId::new("d1").unwrap();
        let cases = [
            ("", "missing"),
            ("abc", "scheme prefix"),
            ("v1.!!!", "base64url"),
            ("v1.AAAA", "32-byte"),
        ];
        for (token, expected) in cases {
            let err = key().verify(&d1, token).unwrap_err();
            assert!(matches!(err, Error::Unauthenticated { .. }), "{err:?}");
            assert!(err.to_string().contains(expected), "{token:?}: {err}");
        }
        let long = format!("v1.{}", "A".repeat(200));
        assert!(key().verify(&d1, &long).is_err());
    }

    #[test]
    fn keys_are_checked_and_hidden() {
        assert!(FleetKey::new(b"short").is_err());
        let from_text = FleetKey::from_base64("BwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwc=").unwrap();
        let d1 = DeviceId::new("d1").unwrap();
        assert_eq!(from_text.token(&d1), key().token(&d1));
        assert_eq!(format!("{:?}", key()), "FleetKey(32 bytes)");
        assert_eq!(format!("{:?}", key().token(&d1)), "DeviceToken(..)");
        assert!(FleetKey::from_base64("not base64 at all!").is_err());
    }
}
