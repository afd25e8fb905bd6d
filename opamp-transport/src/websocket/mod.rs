//! OpAMP (the Open Agent Management Protocol of open-telemetry/opamp-spec)
//! over WebSocket and plain HTTP.

/// The generated protocol types (`opamp.proto.v1`), from
/// `proto/opamp/v1/opamp.proto` and `anyvalue.proto` in this crate.
#[allow(missing_docs, unreachable_pub, clippy::all)]
pub mod proto {
    include!(concat!(env!("OUT_DIR"), "/opamp.proto.v1.rs"));
}
