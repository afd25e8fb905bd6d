//! The checks behind the fuzz targets, shared with the corpus replay test so
//! that every saved input is re-checked by the ordinary test command.
//!
//! Each check takes arbitrary bytes and panics only when an invariant breaks;
//! rejecting the input with a clear error is the expected outcome for garbage.

use crate::bus::ConfigUpdate;
use crate::command::Command;
use crate::config::ConfigBundle;
use crate::error::{Error, Result};
use crate::event::DeviceEvent;

/// The invariants every JSON decoder keeps: anything that decodes re-encodes
/// to the same value (`decode ∘ encode` is the identity), and anything that
/// does not decode is rejected as [`Error::InvalidInput`] with a message.
fn round_trips<T: PartialEq + std::fmt::Debug>(
    data: &[u8],
    decode: impl Fn(&[u8]) -> Result<T>,
    encode: impl Fn(&T) -> Vec<u8>,
) -> Option<T> {
    match decode(data) {
        Ok(value) => {
            let again = decode(&encode(&value)).expect("an encoded value decodes");
            assert_eq!(again, value, "decoding the encoding gives the value back");
            Some(value)
        }
        Err(Error::InvalidInput { message }) => {
            assert!(!message.is_empty(), "an error names what was wrong");
            None
        }
        Err(other) => panic!("bad input must be InvalidInput, got {other:?}"),
    }
}

/// Appendix B command JSON (`opamp.commands`).
pub fn command_json(data: &[u8]) {
    round_trips(data, Command::from_json, Command::to_json);
}

/// Device event JSON (`opamp.events`).
pub fn event_json(data: &[u8]) {
    round_trips(data, DeviceEvent::from_json, DeviceEvent::to_json);
}

/// Configuration broadcast JSON (`opamp.config-updates`).
pub fn config_update_json(data: &[u8]) {
    round_trips(data, ConfigUpdate::from_json, ConfigUpdate::to_json);
}

/// Configuration bundle JSON (templates in stores and the REST API): round-trips,
/// and the content hash survives the trip.
pub fn bundle_json(data: &[u8]) {
    let decode = |bytes: &[u8]| {
        serde_json::from_slice::<ConfigBundle>(bytes)
            .map_err(|err| Error::invalid_input(format!("config bundle JSON: {err}")))
    };
    let encode = |bundle: &ConfigBundle| serde_json::to_vec(bundle).expect("a bundle always encodes");
    if let Some(bundle) = round_trips(data, decode, encode) {
        let again = decode(&encode(&bundle)).expect("an encoded bundle decodes");
        assert_eq!(again.hash(), bundle.hash(), "the content hash survives a round trip");
    }
}

/// A fuzz target's check: panics when an invariant breaks.
pub type Check = fn(&[u8]);

/// Every fuzz target's check, by target name (the folder name under `fuzz/corpus/`).
pub const TARGETS: &[(&str, Check)] = &[
    ("command_json", command_json),
    ("event_json", event_json),
    ("config_update_json", config_update_json),
    ("bundle_json", bundle_json),
];
