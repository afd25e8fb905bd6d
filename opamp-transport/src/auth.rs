//! Device credentials: fleet tokens that prove a device id without a lookup.
//!
//! A supervisor holds the fleet's secret, the [`FleetKey`]. A device's token
//! is an HMAC-SHA256 under that key of the device id (and, if it has one, of
//! its expiry), so any supervisor can check it on the spot, with no database
//! of credentials, and a token for one device is useless for any other.
//! Provision each device with [`FleetKey::token`] or
//! [`FleetKey::token_expiring`] (the load generator and tests compute them
//! the same way).
//!
//! **Format.** A `v2` token names all it needs, so that a server can check
//! it from the request headers, before it reads a byte of the body:
//!
//! ```text
//! v2.<key id>.<device id, base64url>.<expiry, unix seconds; 0 for none>.<MAC, base64url>
//! ```
//!
//! The MAC covers `opamp-device-token:v2:` and everything before its own
//! dot. The key id is a fingerprint of the key (8 hex digits of a SHA-256
//! of it, which says nothing of the key), so a server holding several keys
//! knows which one to check with. The older `v1.<MAC of the device id>`
//! tokens are still accepted; they name no device and carry no expiry.
//!
//! **Rotation.** A key can accept tokens of older keys
//! ([`FleetKey::accepting`]; `OPAMP_FLEET_KEY=new,old` in the binaries)
//! while issuing under the newest: roll the new key out to every
//! supervisor, re-provision the devices, then drop the old key.
//!
//! ```
//! use opamp_core::DeviceId;
//! use opamp_transport::auth::FleetKey;
//!
//! let key = FleetKey::new(b"a fleet secret of at least 16 bytes")?;
//! let device = DeviceId::new("device-5")?;
//! let token = key.token(&device);
//! assert!(key.verify(&device, token.as_str()).is_ok());
//! assert_eq!(key.device_of(token.as_str())?, device);
//! assert!(key.verify(&DeviceId::new("device-6")?, token.as_str()).is_err());
//! # Ok::<(), opamp_core::Error>(())
//! ```

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use opamp_core::{DeviceId, Error, Result};
use sha2::{Digest, Sha256};

const V1: &str = "v1.";
const V1_DOMAIN: &[u8] = b"opamp-device-token:v1:";
const V2: &str = "v2.";
const V2_DOMAIN: &[u8] = b"opamp-device-token:v2:";
const KEY_ID_DOMAIN: &[u8] = b"opamp-fleet-key-id:";
/// HMAC-SHA256's output.
const MAC_LEN: usize = 32;
/// The longest token looked at: a device id of 256 bytes in base64url and
/// the rest; anything longer is refused before it is decoded.
const MAX_TOKEN_LEN: usize = 512;

/// The fleet secret that device tokens are derived from and checked
/// against, with the older secrets it still accepts.
///
/// Its `Debug` shows only key ids and lengths.
#[derive(Clone)]
pub struct FleetKey {
    /// The key tokens are issued under, then the older ones accepted.
    keys: Vec<OneKey>,
}

#[derive(Clone)]
struct OneKey {
    id: String,
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
        let fingerprint = Sha256::new()
            .chain_update(KEY_ID_DOMAIN)
            .chain_update(secret)
            .finalize();
        let id = fingerprint[..4].iter().map(|b| format!("{b:02x}")).collect();
        Ok(FleetKey {
            keys: vec![OneKey {
                id,
                mac,
                len: secret.len(),
            }],
        })
    }

    /// Keys from base64 text (standard or URL-safe alphabet, padded or not),
    /// as kept in configuration files and environment variables: one key,
    /// or several separated by commas, the first issuing and the others
    /// accepted (a rotation under way).
    pub fn from_base64(text: &str) -> Result<Self> {
        let mut keys = text
            .split(',')
            .map(str::trim)
            .filter(|key| !key.is_empty())
            .enumerate()
            .map(|(at, key)| {
                let key = key.trim_end_matches('=');
                let bytes = URL_SAFE_NO_PAD
                    .decode(key.replace('+', "-").replace('/', "_"))
                    .map_err(|err| Error::invalid_input(format!("fleet key {} is not base64: {err}", at + 1)))?;
                Self::new(bytes)
            });
        let first = keys
            .next()
            .ok_or_else(|| Error::invalid_input("no fleet key: the text is empty"))??;
        keys.try_fold(first, |ring, older| Ok(ring.accepting(older?)))
    }

    /// Also accepting the tokens of `older` (and of the keys it accepts).
    pub fn accepting(mut self, older: FleetKey) -> Self {
        for key in older.keys {
            if !self.keys.iter().any(|held| held.id == key.id) {
                self.keys.push(key);
            }
        }
        self
    }

    /// The id of the key tokens are issued under.
    pub fn id(&self) -> &str {
        &self.keys[0].id
    }

    /// A token that proves `device`, with no expiry (revoking the device is
    /// then the way to withdraw it).
    pub fn token(&self, device: &DeviceId) -> DeviceToken {
        self.issue(device, 0)
    }

    /// A token that proves `device` until `expires_at` (to the second).
    pub fn token_expiring(&self, device: &DeviceId, expires_at: SystemTime) -> DeviceToken {
        let seconds = expires_at.duration_since(UNIX_EPOCH).map_or(1, |d| d.as_secs().max(1));
        self.issue(device, seconds)
    }

    /// The older form of token: the MAC of the device id alone, with no key
    /// id and no expiry. Accepted still; for devices provisioned before `v2`.
    pub fn token_v1(&self, device: &DeviceId) -> DeviceToken {
        let mut mac = self.keys[0].mac.clone();
        mac.update(V1_DOMAIN);
        mac.update(device.as_str().as_bytes());
        DeviceToken(format!("{V1}{}", URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes())))
    }

    fn issue(&self, device: &DeviceId, expiry: u64) -> DeviceToken {
        let key = &self.keys[0];
        let signed = format!("{V2}{}.{}.{expiry}", key.id, URL_SAFE_NO_PAD.encode(device.as_str()));
        let mac = v2_mac(key, &signed).finalize().into_bytes();
        DeviceToken(format!("{signed}.{}", URL_SAFE_NO_PAD.encode(mac)))
    }

    /// Checks that `token` proves `device` now, in constant time.
    ///
    /// [`Error::Unauthenticated`] says what was wrong with it (malformed,
    /// expired, under an unknown key, or not this device's), never what the
    /// right one is.
    pub fn verify(&self, device: &DeviceId, token: &str) -> Result<()> {
        self.verify_at(device, token, SystemTime::now())
    }

    /// [`verify`](Self::verify) as of `now`.
    pub fn verify_at(&self, device: &DeviceId, token: &str, now: SystemTime) -> Result<()> {
        let refuse = |why: String| Err(Error::unauthenticated(format!("token for device {device} {why}")));
        if token.is_empty() {
            return refuse("is missing".into());
        }
        if let Some(encoded) = token.strip_prefix(V1) {
            return match self.verify_v1(device, encoded) {
                Ok(()) => Ok(()),
                Err(why) => refuse(why),
            };
        }
        match self.open_v2(token, now) {
            Ok(named) if named == *device => Ok(()),
            Ok(named) => refuse(format!("is for device {named}")),
            Err(why) => refuse(why),
        }
    }

    /// The device a `v2` token proves, checked (MAC, key, expiry) now:
    /// what a server can learn from a request's headers alone.
    /// [`Error::Unauthenticated`] for a `v1` token, which names no device.
    pub fn device_of(&self, token: &str) -> Result<DeviceId> {
        self.device_of_at(token, SystemTime::now())
    }

    /// [`device_of`](Self::device_of) as of `now`.
    pub fn device_of_at(&self, token: &str, now: SystemTime) -> Result<DeviceId> {
        self.open_v2(token, now)
            .map_err(|why| Error::unauthenticated(format!("the token {why}")))
    }

    fn verify_v1(&self, device: &DeviceId, encoded: &str) -> std::result::Result<(), String> {
        let mac = decode_mac(encoded)?;
        // No key id: each key held is tried (a handful at most).
        let matched = self.keys.iter().fold(false, |matched, key| {
            let mut check = key.mac.clone();
            check.update(V1_DOMAIN);
            check.update(device.as_str().as_bytes());
            matched | check.verify_slice(&mac).is_ok()
        });
        match matched {
            true => Ok(()),
            false => Err("does not match: it was not issued for this device under this fleet key".into()),
        }
    }

    /// The device a `v2` token names, once its MAC and expiry are checked.
    fn open_v2(&self, token: &str, now: SystemTime) -> std::result::Result<DeviceId, String> {
        if token.len() > MAX_TOKEN_LEN {
            return Err(format!("is {} bytes, longer than any token", token.len()));
        }
        let Some(rest) = token.strip_prefix(V2) else {
            return Err(match token.starts_with(V1) {
                true => "is a v1 token, which names no device".into(),
                false => "does not start with a scheme prefix (`v2.` or `v1.`)".into(),
            });
        };
        let (signed_len, mac) = match token.rfind('.') {
            Some(dot) if dot >= V2.len() => (dot, &token[dot + 1..]),
            _ => return Err("has no MAC".into()),
        };
        let mut fields = rest[..signed_len - V2.len()].split('.');
        let (Some(key_id), Some(device), Some(expiry), None) =
            (fields.next(), fields.next(), fields.next(), fields.next())
        else {
            return Err("is not v2.<key id>.<device>.<expiry>.<MAC>".into());
        };
        let mac = decode_mac(mac)?;
        let key = self
            .keys
            .iter()
            .find(|key| key.id == key_id)
            .ok_or_else(|| format!("was issued under key {key_id:?}, which this server does not hold"))?;
        if v2_mac(key, &token[..signed_len]).verify_slice(&mac).is_err() {
            return Err("does not match: it was not issued under this fleet key".into());
        }
        // Authentic from here on: its fields are the issuer's.
        let expiry: u64 = expiry
            .parse()
            .map_err(|_| format!("has an expiry that is not a number: {expiry:?}"))?;
        if expiry != 0 && UNIX_EPOCH + Duration::from_secs(expiry) <= now {
            let ago = now
                .duration_since(UNIX_EPOCH + Duration::from_secs(expiry))
                .unwrap_or_default()
                .as_secs();
            return Err(format!("expired {ago} s ago"));
        }
        let device = URL_SAFE_NO_PAD
            .decode(device)
            .ok()
            .and_then(|bytes| String::from_utf8(bytes).ok())
            .ok_or("names a device that is not base64url text")?;
        DeviceId::new(&device).map_err(|err| format!("names no valid device: {err}"))
    }
}

fn v2_mac(key: &OneKey, signed: &str) -> Hmac<Sha256> {
    let mut mac = key.mac.clone();
    mac.update(V2_DOMAIN);
    mac.update(signed.as_bytes());
    mac
}

fn decode_mac(encoded: &str) -> std::result::Result<[u8; MAC_LEN], String> {
    let mut mac = [0u8; MAC_LEN];
    match URL_SAFE_NO_PAD.decode_slice(encoded, &mut mac) {
        Ok(MAC_LEN) => Ok(mac),
        _ => Err("is not a 32-byte base64url MAC".into()),
    }
}

impl fmt::Debug for FleetKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut keys = self.keys.iter();
        if let Some(key) = keys.next() {
            write!(f, "FleetKey({} {} bytes", key.id, key.len)?;
        }
        for key in keys {
            write!(f, ", accepting {} {} bytes", key.id, key.len)?;
        }
        f.write_str(")")
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

    fn did(id: &str) -> DeviceId {
        DeviceId::new(id).unwrap()
    }

    #[test]
    fn a_token_proves_only_its_own_device() {
        let (d1, d2) = (did("d1"), did("d2"));
        for token in [key().token(&d1), key().token_v1(&d1)] {
            key().verify(&d1, token.as_str()).unwrap();
            let err = key().verify(&d2, token.as_str()).unwrap_err().to_string();
            assert!(err.contains("device d2"), "{err}");
            let other_fleet = FleetKey::new([8u8; 32]).unwrap();
            assert!(other_fleet.verify(&d1, token.as_str()).is_err());
        }
        let token = key().token(&d1);
        assert!(token.as_str().starts_with(&format!("v2.{}.", key().id())));
        assert_eq!(key().device_of(token.as_str()).unwrap(), d1);
        let err = key().verify(&d2, token.as_str()).unwrap_err().to_string();
        assert!(err.contains("is for device d1"), "{err}");
        let err = key().device_of(key().token_v1(&d1).as_str()).unwrap_err().to_string();
        assert!(err.contains("v1 token, which names no device"), "{err}");
    }

    #[test]
    fn a_token_expires() {
        let d1 = did("d1");
        let now = SystemTime::now();
        let token = key().token_expiring(&d1, now + Duration::from_secs(60));
        key().verify_at(&d1, token.as_str(), now).unwrap();
        let err = key()
            .verify_at(&d1, token.as_str(), now + Duration::from_secs(90))
            .unwrap_err()
            .to_string();
        assert!(err.contains("expired 30 s ago"), "{err}");
        assert!(
            key()
                .device_of_at(token.as_str(), now + Duration::from_secs(61))
                .is_err()
        );
    }

    #[test]
    fn a_forged_field_breaks_the_mac() {
        let d1 = did("d1");
        let token = key().token_expiring(&d1, SystemTime::now() + Duration::from_secs(60));
        let parts: Vec<&str> = token.as_str().split('.').collect();
        // Another device, or no expiry, under the same MAC.
        let other_device = URL_SAFE_NO_PAD.encode("d2");
        for forged in [
            [parts[0], parts[1], &other_device, parts[3], parts[4]].join("."),
            [parts[0], parts[1], parts[2], "0", parts[4]].join("."),
        ] {
            let err = key().device_of(&forged).unwrap_err().to_string();
            assert!(err.contains("does not match"), "{err}");
        }
        let unknown = [parts[0], "00000000", parts[2], parts[3], parts[4]].join(".");
        let err = key().device_of(&unknown).unwrap_err().to_string();
        assert!(
            err.contains("key \"00000000\", which this server does not hold"),
            "{err}"
        );
    }

    #[test]
    fn a_rotation_accepts_the_old_key_and_issues_under_the_new() {
        let (old, new) = (key(), FleetKey::new([9u8; 32]).unwrap());
        let d1 = did("d1");
        let rotating = new.clone().accepting(old.clone());
        assert_eq!(rotating.id(), new.id());
        rotating.verify(&d1, old.token(&d1).as_str()).unwrap();
        rotating.verify(&d1, old.token_v1(&d1).as_str()).unwrap();
        rotating.verify(&d1, rotating.token(&d1).as_str()).unwrap();
        assert!(old.verify(&d1, rotating.token(&d1).as_str()).is_err());
        let text = format!(
            "{},{}",
            base64::engine::general_purpose::STANDARD.encode([9u8; 32]),
            base64::engine::general_purpose::STANDARD.encode([7u8; 32])
        );
        let from_text = FleetKey::from_base64(&text).unwrap();
        assert_eq!(from_text.id(), new.id());
        from_text.verify(&d1, old.token(&d1).as_str()).unwrap();
        assert_eq!(
            format!("{from_text:?}"),
            format!("FleetKey({} 32 bytes, accepting {} 32 bytes)", new.id(), old.id())
        );
    }

    #[test]
    fn malformed_tokens_are_named() {
        let d1 = did("d1");
        let cases = [
            ("", "missing"),
            ("abc", "scheme prefix"),
            ("v1.!!!", "base64url"),
            ("v1.AAAA", "32-byte"),
            ("v2.", "no MAC"),
            ("v2.a.b.AAAA", "is not v2.<key id>"),
            ("v2.a.b.c.AAAA", "32-byte"),
        ];
        for (token, expected) in cases {
            let err = key().verify(&d1, token).unwrap_err();
            assert!(matches!(err, Error::Unauthenticated { .. }), "{err:?}");
            assert!(err.to_string().contains(expected), "{token:?}: {err}");
        }
        let long = format!("v2.{}", "A".repeat(2000));
        assert!(
            key()
                .verify(&d1, &long)
                .unwrap_err()
                .to_string()
                .contains("longer than any token")
        );
    }

    #[test]
    fn keys_are_checked_and_hidden() {
        assert!(FleetKey::new(b"short").is_err());
        let from_text = FleetKey::from_base64("BwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwc=").unwrap();
        let d1 = did("d1");
        assert_eq!(from_text.token(&d1), key().token(&d1));
        assert_eq!(format!("{:?}", key()), format!("FleetKey({} 32 bytes)", key().id()));
        assert_eq!(format!("{:?}", key().token(&d1)), "DeviceToken(..)");
        assert!(FleetKey::from_base64("not base64 at all!").is_err());
        assert!(FleetKey::from_base64(" , ").is_err());
    }
}
