//! The check behind the `redis_status` fuzz target (see [`crate::testkit::fuzz`]).

use opamp_core::{DeviceId, DeviceStatus, Error, Presence, PresenceUpdate, StatusPatch};

use super::codec::{self, HashChanges, field};
use super::error::RedisError;

const KEY: &str = "fuzz:device:{device-5}:status";

/// A status hash as `HGETALL` returns it, through the decoder the store
/// reads statuses with. The input is `name=value` pairs separated by NUL
/// bytes (a value may hold `=` and newlines; a name never holds `=`).
///
/// What is refused is an error naming the key; what decodes re-encodes,
/// with the encoder the store writes statuses with, to pairs that decode to
/// the same status and re-encode to the same pairs.
pub fn redis_status(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        // The client refuses a reply that is not UTF-8 before the decoder sees it.
        return;
    };
    let pairs: Vec<(String, String)> = text
        .split('\0')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            (name.to_owned(), value.to_owned())
        })
        .collect();
    let status = match codec::decode_status(KEY, device(), pairs) {
        Ok(status) => status,
        Err(error) => {
            assert!(
                matches!(error, RedisError::Garbled { .. }),
                "a bad hash is garbled: {error}"
            );
            let error = Error::from(error);
            assert!(error.to_string().contains(KEY), "a refusal names the key: {error}");
            return;
        }
    };
    let pairs = encode(&status);
    let again = codec::decode_status(KEY, device(), pairs.clone()).expect("an encoded status decodes");
    assert_eq!(again, status, "decoding the encoding gives the status back");
    assert_eq!(encode(&again), pairs, "and it encodes to the same pairs");
}

fn device() -> DeviceId {
    DeviceId::new("device-5").expect("a valid device id")
}

/// The hash of `status`, as writing the whole of it with [`HashChanges`] leaves it.
fn encode(status: &DeviceStatus) -> Vec<(String, String)> {
    let mut patch = StatusPatch::new();
    patch.presence = match (status.status, status.supervisor, status.connected_at) {
        (Presence::Online, Some(supervisor), Some(connected_at)) => Some(PresenceUpdate::Online {
            supervisor,
            connected_at,
        }),
        _ => None,
    };
    patch.emission = Some(status.emission);
    patch.config_version = status.config_version;
    patch.config_hash = status.config_hash;
    patch.agent_type = status.agent_type;
    patch.last_seen = status.last_seen;
    patch.labels = Some(status.labels.clone());
    patch.last_error = Some(status.last_error.clone());
    let mut pairs: Vec<(String, String)> = HashChanges::of(&patch)
        .set
        .into_iter()
        .map(|(name, value)| (name.to_owned(), value))
        .collect();
    // A status online without its supervisor and time (or offline with them)
    // is no patch's doing, but a hash can hold it: write those fields as they are.
    if patch.presence.is_none() {
        pairs.push((field::STATUS.to_owned(), status.status.as_str().to_owned()));
        if let Some(supervisor) = status.supervisor {
            pairs.push((field::SUPERVISOR.to_owned(), supervisor.to_string()));
        }
        if let Some(at) = status.connected_at {
            pairs.push((field::CONNECTED_AT.to_owned(), codec::format_time(at)));
        }
    }
    pairs
}

/// Status hashes as the store writes them (docs/data-model.md), and broken
/// ones, for the seed corpus.
pub(crate) fn seeds() -> Vec<crate::testkit::fuzz::Seed> {
    let hashes: [(&str, &str); 6] = [
        (
            "online",
            "status=online\0supervisor=supervisor-pod-3\0connected_at=1706356800\0emission=true\0config_version=v2\0\
             config_hash=9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08\0agent_type=fluentbit\0\
             last_seen=1706356800.123\0labels={\"site\":\"berlin\",\"hw\":\"ap-17\"}\0last_error=output http: connection refused",
        ),
        ("offline", "status=offline\0emission=false\0last_seen=1706356800"),
        ("operator-field", "status=offline\0emission=false\0note=kept by ops=yes"),
        ("no-emission", "status=online\0supervisor=s1"),
        ("bad-time", "status=offline\0emission=false\0last_seen=1706356800.1234"),
        ("bad-labels", "status=offline\0emission=true\0labels=[\"site\"]"),
    ];
    hashes
        .into_iter()
        .map(|(name, text)| ("redis_status", name, text.as_bytes().to_vec()))
        .collect()
}
