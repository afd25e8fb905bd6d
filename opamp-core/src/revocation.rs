//! Devices refused service: a revoked device may not register with any
//! supervisor, whatever credential it shows, until an operator reinstates it.
//!
//! Credentials (fleet tokens, client certificates) are checked by the
//! transports, which know nothing of the store; revocation is checked by the
//! supervisor when it registers a device, so it holds for every transport
//! and every credential. Revoking a device that is connected closes its
//! session too (the control plane's
//! [`revoke`](crate::runtime::control_plane::ControlPlane::revoke)).

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::id::DeviceId;
use crate::time::Timestamp;

/// Why and when a device was revoked, as the store keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Revocation {
    /// The device refused.
    #[serde(rename = "device_id")]
    pub device: DeviceId,
    /// What the operator gave as the reason; at most [`Revocation::MAX_REASON`] bytes.
    pub reason: String,
    /// When it was revoked (stores keep milliseconds).
    pub revoked_at: Timestamp,
    /// Who revoked it (an API token's name), when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_by: Option<String>,
}

impl Revocation {
    /// The longest reason kept, in bytes.
    pub const MAX_REASON: usize = 1024;

    /// A revocation of `device` at `revoked_at`, truncated to the millisecond
    /// as every store keeps it. A reason longer than
    /// [`MAX_REASON`](Self::MAX_REASON) bytes, or holding control
    /// characters, is [`Error::InvalidInput`].
    pub fn new(device: DeviceId, reason: impl Into<String>, revoked_at: Timestamp) -> Result<Self> {
        let reason = reason.into();
        if reason.len() > Self::MAX_REASON {
            return Err(Error::invalid_input(format!(
                "the reason for revoking device {device} is {} bytes long; the limit is {}",
                reason.len(),
                Self::MAX_REASON
            )));
        }
        if let Some(bad) = reason.chars().find(|c| c.is_control()) {
            return Err(Error::invalid_input(format!(
                "the reason for revoking device {device} contains the control character {bad:?}"
            )));
        }
        let revoked_at = Timestamp::from_unix_millis(revoked_at.unix_millis()).unwrap_or(revoked_at);
        Ok(Revocation {
            device,
            reason,
            revoked_at,
            revoked_by: None,
        })
    }

    /// The same revocation, naming who made it.
    pub fn by(mut self, who: impl Into<String>) -> Self {
        self.revoked_by = Some(who.into());
        self
    }

    /// The error a revoked device's registration ends with.
    pub fn refusal(&self) -> Error {
        Error::unauthenticated(format!(
            "device {} was revoked at {}: {}",
            self.device,
            self.revoked_at,
            if self.reason.is_empty() {
                "no reason given"
            } else {
                &self.reason
            }
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_are_bounded_and_printable() {
        let device = DeviceId::new("d1").unwrap();
        let at = Timestamp::from_unix_millis(1_000).unwrap();
        assert!(Revocation::new(device, "x".repeat(Revocation::MAX_REASON), at).is_ok());
        let long = Revocation::new(device, "x".repeat(Revocation::MAX_REASON + 1), at).unwrap_err();
        assert!(long.to_string().contains("1025 bytes"), "{long}");
        let control = Revocation::new(device, "a\nb", at).unwrap_err();
        assert!(control.to_string().contains("control character"), "{control}");
    }

    #[test]
    fn the_refusal_names_the_device_and_the_reason() {
        let device = DeviceId::new("d1").unwrap();
        let revoked = Revocation::new(device, "token leaked", Timestamp::from_unix_millis(0).unwrap()).unwrap();
        let refusal = revoked.refusal().to_string();
        assert!(refusal.contains("d1") && refusal.contains("token leaked"), "{refusal}");
        assert!(matches!(revoked.refusal(), Error::Unauthenticated { .. }));
    }

    #[test]
    fn it_serialises_with_the_api_names() {
        let device = DeviceId::new("d1").unwrap();
        let revoked = Revocation::new(device, "lost", Timestamp::from_unix_millis(0).unwrap())
            .unwrap()
            .by("ops");
        let json = serde_json::to_value(&revoked).unwrap();
        assert_eq!(json["device_id"], "d1");
        assert_eq!(json["revoked_by"], "ops");
        assert_eq!(serde_json::from_value::<Revocation>(json).unwrap(), revoked);
    }
}
