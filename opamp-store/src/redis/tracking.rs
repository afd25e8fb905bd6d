//! What control planes track, in Redis: command records as JSON strings that
//! expire after the configured retention, the pending ones' ids in a sorted
//! set by deadline (an index, kept in step by each write and cleaned by
//! whoever lists it, since on a cluster it lives in another slot than the
//! records), and rollouts as JSON strings
//! indexed in a sorted set (one hash tag for all of them, so one script
//! writes a rollout and its index entry together).

use async_trait::async_trait;
use opamp_core::{
    CommandRecord, CommandState, CorrelationId, Cursor, Error, Page, PageRequest, Result, Rollout, RolloutId,
    Timestamp, TrackingStore,
};
use redis::Value;

use super::error::RedisError;
use super::scripts::eval;
use super::{RedisStore, as_int, checked, strings, text};

#[async_trait]
impl TrackingStore for RedisStore {
    async fn insert_command(&self, record: &CommandRecord) -> Result<()> {
        let id = record.correlation_id();
        let key = self.keys.command(&id);
        let set = redis::cmd("SET")
            .arg(&key)
            .arg(record.to_json())
            .arg("NX")
            .arg("PX")
            .arg(self.retention_ms)
            .to_owned();
        match checked(&key, self.one(|| format!("SET {key} NX"), &set).await?)? {
            Value::Nil => Err(Error::already_exists(format!("command {id}"))),
            _ => self.index_pending(record).await,
        }
    }

    async fn update_command(&self, record: &CommandRecord) -> Result<bool> {
        let id = record.correlation_id();
        let key = self.keys.command(&id);
        let script = eval(&self.conn_scripts().update_command, &[&key], record.to_json());
        match as_int(
            &checked(&key, self.one(|| format!("updating {key}"), &script).await?)?,
            &key,
        )? {
            -1 => Err(Error::not_found(format!("command {id}"))),
            1 => self.index_pending(record).await.map(|()| true),
            _ => Ok(false),
        }
    }

    async fn overdue_commands(&self, before: Timestamp, limit: usize) -> Result<Vec<CorrelationId>> {
        let index = self.keys.pending_commands();
        let mut overdue = Vec::new();
        // Members whose record ended or expired are dropped as they are met,
        // so they cannot fill the head of the index.
        loop {
            let range = redis::cmd("ZRANGEBYSCORE")
                .arg(&index)
                .arg("-inf")
                .arg(before.unix_millis())
                .arg("LIMIT")
                .arg(0)
                .arg(limit.max(1))
                .to_owned();
            let members = strings(self.one(|| format!("ZRANGEBYSCORE {index}"), &range).await?, &index)?;
            let full = members.len() >= limit.max(1);
            let mut stale = Vec::new();
            for member in members {
                let id: CorrelationId = member.parse().map_err(|_| {
                    Error::from(RedisError::garbled(
                        &index,
                        None,
                        format!("member {member:?} is not a correlation id"),
                    ))
                })?;
                match self.command_record(&id).await? {
                    Some(record) if record.state == CommandState::Pending => overdue.push(id),
                    _ => stale.push(member),
                }
            }
            if !stale.is_empty() {
                let remove = redis::cmd("ZREM").arg(&index).arg(&stale).to_owned();
                checked(&index, self.one(|| format!("ZREM {index}"), &remove).await?)?;
            }
            if stale.is_empty() || !full || overdue.len() >= limit {
                overdue.truncate(limit);
                return Ok(overdue);
            }
            overdue.clear();
        }
    }

    async fn command_record(&self, id: &CorrelationId) -> Result<Option<CommandRecord>> {
        let key = self.keys.command(id);
        self.get_json(&key, CommandRecord::from_json).await
    }

    async fn put_rollout(&self, rollout: &Rollout) -> Result<bool> {
        let (key, index) = (self.keys.rollout(&rollout.id), self.keys.rollouts());
        let script = eval(
            &self.conn_scripts().put_rollout,
            &[&key, &index],
            (rollout.to_json(), rollout.revision, rollout.id.to_string()),
        );
        let reply = checked(&key, self.one(|| format!("writing {key}"), &script).await?)?;
        Ok(as_int(&reply, &key)? == 1)
    }

    async fn rollout(&self, id: &RolloutId) -> Result<Option<Rollout>> {
        let key = self.keys.rollout(id);
        self.get_json(&key, Rollout::from_json).await
    }

    async fn rollouts(&self, page: &PageRequest) -> Result<Page<RolloutId>> {
        let limit = page.limit.clamp(1, PageRequest::MAX_LIMIT);
        let before = match &page.after {
            Some(cursor) => {
                let id: RolloutId = cursor.as_str().parse().map_err(|err| {
                    Error::invalid_input(format!("page cursor {:?} is not this store's: {err}", cursor.as_str()))
                })?;
                format!("({id}")
            }
            None => "+".to_owned(),
        };
        let index = self.keys.rollouts();
        // One more than asked tells whether another page follows.
        let range = redis::cmd("ZREVRANGEBYLEX")
            .arg(&index)
            .arg(&before)
            .arg("-")
            .arg("LIMIT")
            .arg(0)
            .arg(limit + 1)
            .to_owned();
        let members = strings(self.one(|| format!("ZREVRANGEBYLEX {index}"), &range).await?, &index)?;
        let items = members
            .iter()
            .map(|member| {
                member.parse::<RolloutId>().map_err(|_| {
                    Error::from(RedisError::garbled(
                        &index,
                        None,
                        format!("member {member:?} is not a rollout id"),
                    ))
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Page::from_one_more(items, limit, |last| Cursor::new(last.to_string())))
    }
}

impl RedisStore {
    /// Puts a pending command in the pending index at its deadline, or takes
    /// an ended one out.
    async fn index_pending(&self, record: &CommandRecord) -> Result<()> {
        let index = self.keys.pending_commands();
        let id = record.correlation_id().to_string();
        let write = if record.state == CommandState::Pending {
            redis::cmd("ZADD")
                .arg(&index)
                .arg(record.command.deadline.unix_millis())
                .arg(&id)
                .to_owned()
        } else {
            redis::cmd("ZREM").arg(&index).arg(&id).to_owned()
        };
        checked(&index, self.one(|| format!("indexing {id} in {index}"), &write).await?).map(drop)
    }

    /// `GET key`, read by `parse`; a value it refuses is an error naming the key.
    async fn get_json<T>(&self, key: &str, parse: impl Fn(&[u8]) -> Result<T>) -> Result<Option<T>> {
        match text(self.on_key("GET", key).await?, key)? {
            None => Ok(None),
            Some(json) => parse(json.as_bytes())
                .map(Some)
                .map_err(|err| RedisError::garbled(key, None, err.to_string()).into()),
        }
    }
}
