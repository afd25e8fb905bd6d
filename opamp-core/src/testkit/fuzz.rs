//! The checks behind the fuzz targets, shared with the corpus replay test so
//! that every saved input is re-checked by the ordinary test command.
//!
//! Each check takes arbitrary bytes and panics only when an invariant breaks;
//! rejecting the input with a clear error is the expected outcome for garbage.

use crate::command::Command;
use crate::error::Error;

/// Appendix B command JSON: anything that decodes re-encodes to the same
/// command (`decode ∘ encode` is the identity), and anything that does not
/// decode is rejected as [`Error::InvalidInput`] with a message.
pub fn command_json(data: &[u8]) {
    match Command::from_json(data) {
        Ok(command) => {
            let again = Command::from_json(&command.to_json()).expect("an encoded command decodes");
            assert_eq!(again, command, "decoding the encoding gives the command back");
        }
        Err(Error::InvalidInput { message }) => assert!(!message.is_empty(), "an error names what was wrong"),
        Err(other) => panic!("bad input must be InvalidInput, got {other:?}"),
    }
}

/// A fuzz target's check: panics when an invariant breaks.
pub type Check = fn(&[u8]);

/// Every fuzz target's check, by target name (the folder name under `fuzz/corpus/`).
pub const TARGETS: &[(&str, Check)] = &[("command_json", command_json)];
