//! The checks behind the fuzz targets, shared with the corpus replay test so
//! that every saved input is re-checked by the ordinary test command.
//!
//! Each check takes arbitrary bytes and panics only when an invariant breaks;
//! rejecting the input with a clear error is the expected outcome for garbage.

mod supervisor;

pub use supervisor::supervisor_session;

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

/// Replays every saved input of `targets` (`fuzz/corpus/<target>/*` in this
/// repository) through its check; panics naming the first input that breaks
/// an invariant, or a target with no inputs.
pub fn replay_corpus(targets: &[(&str, Check)]) {
    let corpus = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus");
    for (target, check) in targets {
        let dir = corpus.join(target);
        let entries = std::fs::read_dir(&dir).unwrap_or_else(|err| panic!("{}: {err}", dir.display()));
        let mut replayed = 0;
        for entry in entries {
            let path = entry.expect("a readable corpus folder").path();
            let data = std::fs::read(&path).unwrap_or_else(|err| panic!("{}: {err}", path.display()));
            if std::panic::catch_unwind(|| check(&data)).is_err() {
                panic!("fuzz target {target}: input {} breaks its invariant", path.display());
            }
            replayed += 1;
        }
        assert!(
            replayed > 0,
            "fuzz target {target} has no seed corpus in {}",
            dir.display()
        );
    }
}

/// A seed input: its target, its file name under `fuzz/corpus/<target>/`, and its bytes.
pub type Seed = (&'static str, &'static str, Vec<u8>);

/// Checks that every seed is committed as generated: each file under
/// `fuzz/corpus/<target>/<name>` holds exactly the seed's bytes. With
/// `OPAMP_WRITE_SEEDS=1` in the environment it writes them instead (after a
/// change to a message's encoding, say), so the seeds stay real messages.
pub fn seeds_are_committed(seeds: Vec<Seed>) {
    let corpus = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus");
    let write = std::env::var_os("OPAMP_WRITE_SEEDS").is_some_and(|v| v == "1");
    for (target, name, bytes) in seeds {
        let path = corpus.join(target).join(name);
        if write {
            std::fs::create_dir_all(path.parent().expect("a corpus folder"))
                .unwrap_or_else(|err| panic!("{}: {err}", path.display()));
            std::fs::write(&path, &bytes).unwrap_or_else(|err| panic!("{}: {err}", path.display()));
        } else {
            let committed = std::fs::read(&path)
                .unwrap_or_else(|err| panic!("seed {}: {err} (OPAMP_WRITE_SEEDS=1 writes the seeds)", path.display()));
            assert!(
                committed == bytes,
                "seed {} differs from the message it is generated from (OPAMP_WRITE_SEEDS=1 writes the seeds)",
                path.display()
            );
        }
    }
}
