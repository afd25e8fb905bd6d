//! How values are written into Redis and read back: as text, so `redis-cli`
//! shows what an operator expects, and checked on the way in, so bad data is
//! an error naming the key and the field.

use std::str::FromStr;

use opamp_core::{
    AgentType, ConfigHash, ConfigRef, ConfigTemplate, ConfigVersion, DeviceId, DeviceStatus, Labels, Presence,
    PresenceUpdate, StatusPatch, SupervisorId, Timestamp,
};

use super::error::RedisError;

/// The status hash's fields (the design's names; `supervisor`, `config_hash`,
/// `labels` and `last_error` are "the rest of the status").
pub(super) mod field {
    pub(in super::super) const STATUS: &str = "status";
    pub(in super::super) const SUPERVISOR: &str = "supervisor";
    pub(in super::super) const EMISSION: &str = "emission";
    pub(in super::super) const CONFIG_VERSION: &str = "config_version";
    pub(in super::super) const CONFIG_HASH: &str = "config_hash";
    pub(in super::super) const AGENT_TYPE: &str = "agent_type";
    pub(in super::super) const LAST_SEEN: &str = "last_seen";
    pub(in super::super) const CONNECTED_AT: &str = "connected_at";
    pub(in super::super) const LABELS: &str = "labels";
    pub(in super::super) const LAST_ERROR: &str = "last_error";
}

/// A patch as the hash fields to set and those to delete.
#[derive(Debug, Default)]
pub(super) struct HashChanges {
    pub(super) set: Vec<(&'static str, String)>,
    pub(super) delete: Vec<&'static str>,
}

impl HashChanges {
    pub(super) fn of(patch: &StatusPatch) -> Self {
        let mut changes = HashChanges::default();
        match &patch.presence {
            Some(PresenceUpdate::Online {
                supervisor,
                connected_at,
            }) => {
                changes.set.push((field::STATUS, Presence::Online.as_str().to_owned()));
                changes.set.push((field::SUPERVISOR, supervisor.to_string()));
                changes.set.push((field::CONNECTED_AT, format_time(*connected_at)));
            }
            Some(PresenceUpdate::Offline) => changes.set.push((field::STATUS, Presence::Offline.as_str().to_owned())),
            // `PresenceUpdate` may grow; a kind this backend does not know changes no presence.
            Some(_) | None => {}
        }
        if let Some(emission) = patch.emission {
            changes.set.push((field::EMISSION, emission.to_string()));
        }
        if let Some(version) = patch.config_version {
            changes.set.push((field::CONFIG_VERSION, version.to_string()));
        }
        if let Some(hash) = patch.config_hash {
            changes.set.push((field::CONFIG_HASH, hash.to_string()));
        }
        if let Some(agent_type) = patch.agent_type {
            changes.set.push((field::AGENT_TYPE, agent_type.to_string()));
        }
        if let Some(at) = patch.last_seen {
            changes.set.push((field::LAST_SEEN, format_time(at)));
        }
        match &patch.labels {
            Some(labels) if labels.is_empty() => changes.delete.push(field::LABELS),
            // A map of strings always serialises.
            Some(labels) => changes
                .set
                .push((field::LABELS, serde_json::to_string(labels).unwrap_or_default())),
            None => {}
        }
        match &patch.last_error {
            Some(Some(error)) => changes.set.push((field::LAST_ERROR, error.clone())),
            Some(None) => changes.delete.push(field::LAST_ERROR),
            None => {}
        }
        changes
    }
}

/// Reads a status hash (`HGETALL` as field/value pairs). Unknown fields are
/// left alone: operators may keep their own there.
pub(super) fn decode_status(
    key: &str,
    device: DeviceId,
    fields: Vec<(String, String)>,
) -> Result<DeviceStatus, RedisError> {
    let mut status = DeviceStatus::new(device);
    let (mut seen_status, mut seen_emission) = (false, false);
    for (name, value) in fields {
        let garbled = |what: &str| RedisError::garbled(key, Some(&name), format!("{} is not {what}", excerpt(&value)));
        match name.as_str() {
            field::STATUS => {
                status.status = match value.as_str() {
                    "online" => Presence::Online,
                    "offline" => Presence::Offline,
                    _ => return Err(garbled("`online` or `offline`")),
                };
                seen_status = true;
            }
            field::EMISSION => {
                status.emission = value.parse().map_err(|_| garbled("`true` or `false`"))?;
                seen_emission = true;
            }
            field::SUPERVISOR => {
                status.supervisor = Some(parse::<SupervisorId>(&value).map_err(|_| garbled("a supervisor id"))?)
            }
            field::CONFIG_VERSION => {
                status.config_version = Some(parse::<ConfigVersion>(&value).map_err(|_| garbled("a config version"))?)
            }
            field::CONFIG_HASH => {
                status.config_hash = Some(ConfigHash::from_str(&value).map_err(|_| garbled("64 hex digits"))?)
            }
            field::AGENT_TYPE => {
                status.agent_type = Some(parse::<AgentType>(&value).map_err(|_| garbled("an agent type"))?)
            }
            field::LAST_SEEN => status.last_seen = Some(parse_time(&value).ok_or_else(|| garbled("unix seconds"))?),
            field::CONNECTED_AT => {
                status.connected_at = Some(parse_time(&value).ok_or_else(|| garbled("unix seconds"))?)
            }
            field::LABELS => {
                status.labels =
                    serde_json::from_str::<Labels>(&value).map_err(|_| garbled("a JSON object of strings"))?
            }
            field::LAST_ERROR => status.last_error = Some(value),
            _ => {}
        }
    }
    if !seen_status {
        return Err(RedisError::garbled(
            key,
            Some(field::STATUS),
            "the field is missing".into(),
        ));
    }
    if !seen_emission {
        return Err(RedisError::garbled(
            key,
            Some(field::EMISSION),
            "the field is missing".into(),
        ));
    }
    Ok(status)
}

fn parse<T: FromStr>(text: &str) -> Result<T, T::Err> {
    text.parse()
}

/// Unix seconds, as in the design (`last_seen "1706356800"`), with a
/// three-digit fraction when there are milliseconds: `1706356800.123`.
pub(super) fn format_time(at: Timestamp) -> String {
    let millis = at.unix_millis();
    let (seconds, fraction) = (millis.div_euclid(1000), millis.rem_euclid(1000));
    if fraction == 0 {
        seconds.to_string()
    } else {
        format!("{seconds}.{fraction:03}")
    }
}

/// The inverse of [`format_time`]; a fraction of one to three digits.
pub(super) fn parse_time(text: &str) -> Option<Timestamp> {
    let (seconds, fraction) = match text.split_once('.') {
        Some((seconds, fraction)) => (seconds, Some(fraction)),
        None => (text, None),
    };
    let seconds: i64 = seconds.parse().ok()?;
    let millis = match fraction {
        None => 0,
        Some(digits) if (1..=3).contains(&digits.len()) && digits.bytes().all(|b| b.is_ascii_digit()) => {
            let value: i64 = digits.parse().ok()?;
            value * 10_i64.pow(3 - digits.len() as u32)
        }
        Some(_) => return None,
    };
    seconds
        .checked_mul(1000)?
        .checked_add(millis)
        .and_then(Timestamp::from_unix_millis)
}

/// A desired configuration as stored: `type/version` (the form `ConfigRef` prints).
pub(super) fn format_ref(config: &ConfigRef) -> String {
    config.to_string()
}

pub(super) fn parse_ref(key: &str, text: &str) -> Result<ConfigRef, RedisError> {
    let garbled = || RedisError::garbled(key, None, format!("{} is not `agent_type/version`", excerpt(text)));
    let (agent_type, version) = text.split_once('/').ok_or_else(garbled)?;
    Ok(ConfigRef::new(
        AgentType::new(agent_type).map_err(|_| garbled())?,
        ConfigVersion::new(version).map_err(|_| garbled())?,
    ))
}

/// A template as stored: its JSON (agent type, version, files, creator, time).
pub(super) fn encode_template(template: &ConfigTemplate) -> String {
    // Every part of a template serialises.
    serde_json::to_string(template).unwrap_or_default()
}

/// Reads a template, which must be the one its key names.
pub(super) fn decode_template(key: &str, expected: &ConfigRef, text: &str) -> Result<ConfigTemplate, RedisError> {
    let template: ConfigTemplate = serde_json::from_str(text)
        .map_err(|err| RedisError::garbled(key, None, format!("not a config template in JSON: {err}")))?;
    if template.reference() != *expected {
        return Err(RedisError::garbled(
            key,
            None,
            format!("holds the template {}, not {expected}", template.reference()),
        ));
    }
    Ok(template)
}

/// Shortens stored text before it is echoed in an error message: at most
/// 80 characters, quoted.
pub(super) fn excerpt(text: &str) -> String {
    match text.char_indices().nth(80) {
        None => format!("{text:?}"),
        Some((end, _)) => format!("{:?}… ({} bytes)", &text[..end], text.len()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_round_trip_as_unix_seconds() {
        for millis in [
            0,
            1_706_356_800_000,
            1_706_356_800_123,
            1_706_356_800_100,
            -1_500,
            253_402_300_799_999,
        ] {
            let at = Timestamp::from_unix_millis(millis).unwrap();
            assert_eq!(parse_time(&format_time(at)), Some(at), "{millis}");
        }
        assert_eq!(
            format_time(Timestamp::from_unix_seconds(1_706_356_800).unwrap()),
            "1706356800"
        );
        assert_eq!(parse_time("1706356800.5").unwrap().unix_millis(), 1_706_356_800_500);
        for bad in ["", "abc", "1.", "1.1234", "1.-5", "99999999999999999999", "1e3"] {
            assert_eq!(parse_time(bad), None, "{bad}");
        }
    }

    #[test]
    fn a_garbled_field_is_named_with_its_key() {
        let d = DeviceId::new("d1").unwrap();
        let fields = vec![
            ("status".to_owned(), "online".to_owned()),
            ("emission".to_owned(), "true".to_owned()),
            ("last_seen".to_owned(), "yesterday".to_owned()),
        ];
        let err = decode_status("device:{d1}", d, fields).unwrap_err().to_string();
        assert!(
            err.contains("device:{d1}") && err.contains("last_seen") && err.contains("yesterday"),
            "{err}"
        );

        let missing = vec![("status".to_owned(), "online".to_owned())];
        let err = decode_status("device:{d1}", d, missing).unwrap_err().to_string();
        assert!(err.contains("emission") && err.contains("missing"), "{err}");
    }

    #[test]
    fn desired_refs_round_trip_and_garbage_is_named() {
        let config = ConfigRef::new(
            AgentType::new("fluentbit").unwrap(),
            ConfigVersion::new("v1.2:3+b").unwrap(),
        );
        assert_eq!(parse_ref("k", &format_ref(&config)).unwrap(), config);
        let err = parse_ref("device:{d1}:desired", "fluentbit").unwrap_err().to_string();
        assert!(err.contains("device:{d1}:desired"), "{err}");
    }
}
