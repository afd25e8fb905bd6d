//! The checks behind this crate's fuzz targets, shared with the corpus
//! replay test (`tests/fuzz_corpus.rs`) so that every saved input is
//! re-checked by the ordinary test command.
//!
//! Each check takes arbitrary bytes and panics only when an invariant
//! breaks; refusing garbage with a message is the expected outcome. A check
//! exists when the feature of the code it drives is on.

/// A fuzz target's check: panics when an invariant breaks.
pub type Check = fn(&[u8]);

#[cfg(feature = "grpc")]
#[cfg_attr(docsrs, doc(cfg(feature = "grpc")))]
pub use crate::grpc::fuzz::grpc_envelope;
#[cfg(feature = "http-api")]
#[cfg_attr(docsrs, doc(cfg(feature = "http-api")))]
pub use crate::http_api::fuzz::rest_bodies;
#[cfg(feature = "websocket")]
#[cfg_attr(docsrs, doc(cfg(feature = "websocket")))]
pub use crate::websocket::fuzz::{opamp_http, opamp_session, opamp_ws, opamp_ws_frames};

/// Every fuzz target of this crate whose feature is on, by target name (the
/// folder name under `fuzz/corpus/`).
pub const TARGETS: &[(&str, Check)] = &[
    #[cfg(feature = "grpc")]
    ("grpc_envelope", grpc_envelope),
    #[cfg(feature = "websocket")]
    ("opamp_ws", opamp_ws),
    #[cfg(feature = "websocket")]
    ("opamp_ws_frames", opamp_ws_frames),
    #[cfg(feature = "websocket")]
    ("opamp_http", opamp_http),
    #[cfg(feature = "websocket")]
    ("opamp_session", opamp_session),
    #[cfg(feature = "http-api")]
    ("rest_bodies", rest_bodies),
];

/// A seed input: its target, its file name under `fuzz/corpus/<target>/`, and its bytes.
pub type Seed = (&'static str, &'static str, Vec<u8>);

/// The seed corpus of this crate's targets, generated from real messages
/// (the replay test checks the committed files are these).
pub fn seeds() -> Vec<Seed> {
    let mut seeds = Vec::new();
    #[cfg(feature = "grpc")]
    seeds.extend(crate::grpc::fuzz::seeds());
    #[cfg(feature = "websocket")]
    seeds.extend(crate::websocket::fuzz::seeds());
    #[cfg(feature = "http-api")]
    seeds.extend(crate::http_api::fuzz::seeds());
    seeds
}
