//! What control planes track, in Redis: command records as JSON strings that
//! expire after the configured retention, the pending ones' ids in a sorted
//! set by deadline (an index, kept in step by each write and cleaned by
//! whoever lists it, since on a cluster it lives in another slot than the
//! records), and rollouts as JSON strings
//! indexed in a sorted set (one hash tag for all of them, so one script
//! writes a rollout and its index entry together). Each command that ends
//! is announced on the pub/sub channel `commands:ended`. Who drives a rollout
//! is a lease, a string naming the driver that expires as a routing lease
//! does. The store's generation is a JSON string under `store:generation`,
//! written once (`SET NX`) and never expiring.

use std::time::Duration;

use async_trait::async_trait;
use futures_util::StreamExt as _;
use opamp_core::store::validate_ttl;
use opamp_core::{
    CommandRecord, CommandState, CorrelationId, Cursor, Endings, EndingsSender, Error, Page, PageRequest, Result,
    Rollout, RolloutId, StoreGeneration, Timestamp, TrackingStore,
};
use redis::Value;
use redis::aio::PubSub;

use super::conn::{PubSubNode, Request};
use super::error::RedisError;
use super::keys::slot;
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
        // Indexed in the same round trip, which is right for a new record and
        // for this record sent again (the same member at the same deadline).
        let [stored, indexed] = self.with_index(&key, set, self.index_cmd(record)).await?;
        checked(&self.keys.pending_commands(), indexed)?;
        match checked(&key, stored)? {
            Value::Nil => {
                // Taken already: the index entry just written is this
                // record's, which may not be the stored one's (another
                // deadline, or a command that ended). Put the stored one's back.
                let stored = self.command_record(&id).await?;
                if let Some(stored) = &stored {
                    self.index_pending(stored).await?;
                }
                record.inserted_again(stored.as_ref())
            }
            _ => Ok(()),
        }
    }

    async fn update_command(&self, record: &CommandRecord) -> Result<bool> {
        let id = record.correlation_id();
        let key = self.keys.command(&id);
        let ends = record.state.is_final();
        // The script announces the end itself: no round trip more per outcome.
        let channel = if ends {
            self.keys.ended_commands()
        } else {
            String::new()
        };
        let script = eval(
            &self.conn_scripts().update_command,
            &[&key],
            (record.to_json(), channel, id.to_string()),
        );
        let updated = if ends {
            // Taking an ended command out of the pending index is right
            // whatever the script finds, so it goes in the same round trip.
            let [updated, unindexed] = self.with_index(&key, script, self.index_cmd(record)).await?;
            checked(&self.keys.pending_commands(), unindexed)?;
            updated
        } else {
            self.one(|| format!("updating {key}"), &script).await?
        };
        match as_int(&checked(&key, updated)?, &key)? {
            -1 => Err(Error::not_found(format!("command {id}"))),
            1 if !ends => self.index_pending(record).await.map(|()| true),
            1 => Ok(true),
            _ => Ok(false),
        }
    }

    async fn watch_endings(&self) -> Result<Endings> {
        let node = self.conn.pubsub_node();
        let channel = self.keys.ended_commands();
        // Subscribed before returning: every end announced from now on is heard.
        let subscribed = subscribe(&node, &channel, self.connect_timeout).await?;
        let (sender, endings) = Endings::channel();
        tokio::spawn(relay_endings(node, channel, subscribed, sender, self.connect_timeout));
        Ok(endings)
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

    async fn claim_rollout_driver(&self, id: &RolloutId, driver: &str, ttl: Duration) -> Result<bool> {
        validate_ttl(ttl)?;
        let now = self.clock.now();
        let key = self.keys.rollout_driver(id);
        let claim = eval(
            &self.conn_scripts().claim_driver,
            &[&key],
            (
                driver,
                now.unix_millis(),
                self.lease_expiry_ms(now, ttl),
                self.margin_ms,
            ),
        );
        let reply = checked(&key, self.one(|| format!("claiming {key}"), &claim).await?)?;
        Ok(as_int(&reply, &key)? == 1)
    }

    async fn release_rollout_driver(&self, id: &RolloutId, driver: &str) -> Result<bool> {
        let key = self.keys.rollout_driver(id);
        let release = eval(
            &self.conn_scripts().release,
            &[&key],
            (driver, self.now_ms(), self.margin_ms),
        );
        let reply = checked(&key, self.one(|| format!("releasing {key}"), &release).await?)?;
        Ok(as_int(&reply, &key)? == 1)
    }

    async fn generation(&self) -> Result<Option<StoreGeneration>> {
        self.get_json(&self.keys.generation(), StoreGeneration::from_json).await
    }

    async fn begin_generation(&self, generation: &StoreGeneration) -> Result<StoreGeneration> {
        let key = self.keys.generation();
        let set = redis::cmd("SET").arg(&key).arg(generation.to_json()).arg("NX").clone();
        checked(&key, self.one(|| format!("SET {key} NX"), &set).await?)?;
        // Written now or by another control plane first: either way, what is there.
        self.generation().await?.ok_or_else(|| {
            Error::unavailable(format!(
                "{key} was gone again right after it was written: is something deleting this store's keys?"
            ))
        })
    }
}

impl RedisStore {
    /// Puts a pending command in the pending index at its deadline, or takes
    /// an ended one out.
    async fn index_pending(&self, record: &CommandRecord) -> Result<()> {
        let index = self.keys.pending_commands();
        let what = || format!("indexing {} in {index}", record.correlation_id());
        checked(&index, self.one(what, &self.index_cmd(record)).await?).map(drop)
    }

    /// What [`index_pending`](Self::index_pending) sends.
    fn index_cmd(&self, record: &CommandRecord) -> redis::Cmd {
        let index = self.keys.pending_commands();
        let id = record.correlation_id().to_string();
        if record.state == CommandState::Pending {
            redis::cmd("ZADD")
                .arg(&index)
                .arg(record.command.deadline.unix_millis())
                .arg(&id)
                .to_owned()
        } else {
            redis::cmd("ZREM").arg(&index).arg(&id).to_owned()
        }
    }

    /// Sends `write` (on the command's `key`) and `index` (on the pending
    /// index) in one round trip, and returns their replies.
    async fn with_index(&self, key: &str, write: redis::Cmd, index: redis::Cmd) -> Result<[Value; 2]> {
        let requests = vec![
            Request {
                slot: slot(key),
                cmd: write,
            },
            Request {
                slot: slot(&self.keys.pending_commands()),
                cmd: index,
            },
        ];
        let replies = self.conn.batch(requests).await?;
        replies.try_into().map_err(|replies: Vec<Value>| {
            RedisError::garbled(key, None, format!("{} replies to 2 commands", replies.len())).into()
        })
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

/// A pub/sub connection subscribed to `channel`.
async fn subscribe(node: &PubSubNode, channel: &str, timeout: Duration) -> Result<PubSub> {
    let what = || format!("subscribing to {channel}");
    let connect = async {
        let mut pubsub = node.client().await?.get_async_pubsub().await?;
        pubsub.subscribe(channel).await?;
        Ok(pubsub)
    };
    match tokio::time::timeout(timeout, connect).await {
        Ok(Ok(pubsub)) => Ok(pubsub),
        Ok(Err(err)) => Err(RedisError::command(what(), err).into()),
        Err(_) => Err(Error::Unavailable {
            message: format!("{} timed out after {timeout:?}", what()),
            source: None,
        }),
    }
}

/// Passes each id announced on `channel` to the watch until it is dropped,
/// subscribing again (after 0.1 s, doubling up to 5 s) whenever the
/// connection drops (under Sentinel, to the primary it names then). Ends
/// announced while it is down are missed: the watch is best effort.
async fn relay_endings(node: PubSubNode, channel: String, mut pubsub: PubSub, watch: EndingsSender, timeout: Duration) {
    const FIRST_RETRY: Duration = Duration::from_millis(100);
    const LONGEST_RETRY: Duration = Duration::from_secs(5);
    loop {
        {
            let mut messages = pubsub.on_message();
            loop {
                let message = tokio::select! {
                    _ = watch.closed() => return,
                    message = messages.next() => message,
                };
                let Some(message) = message else { break };
                // Anything else on the channel is not ours to act on.
                let id = message.get_payload::<String>().ok().and_then(|text| text.parse().ok());
                if let Some(id) = id {
                    watch.tell(id);
                }
            }
        }
        tracing::warn!(%channel, "the Redis pub/sub connection for command endings dropped; subscribing again");
        let mut retry = FIRST_RETRY;
        pubsub = loop {
            tokio::select! {
                _ = watch.closed() => return,
                _ = tokio::time::sleep(retry) => {}
            }
            match subscribe(&node, &channel, timeout).await {
                Ok(pubsub) => break pubsub,
                Err(err) => {
                    tracing::warn!(%channel, error = %err, "subscribing to command endings failed; trying again");
                    retry = (retry * 2).min(LONGEST_RETRY);
                }
            }
        };
    }
}
