//! The connection to a primary that Redis Sentinel watches: asked for when
//! first needed, and asked for again after it failed in a way a failover
//! explains (the primary gone, silent, or now a replica), or when the
//! Sentinels announce they switched to another primary.

use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;

use futures_util::StreamExt as _;
use redis::aio::{MultiplexedConnection, PubSub};
use redis::sentinel::{SentinelClient, SentinelNodeConnectionInfo, SentinelServerType};
use redis::{AsyncConnectionConfig, Cmd, Pipeline, RedisConnectionInfo, RedisError as ClientError, Script, Value};

use super::RedisSentinelConfig;
use super::node::NodeLink;

/// The Sentinels, and the connection to the primary they named last.
pub(super) struct SentinelLink {
    sentinels: tokio::sync::Mutex<SentinelClient>,
    /// The connection to the primary, let go when it fails, goes silent or
    /// answers as a replica.
    node: NodeLink,
    config: AsyncConnectionConfig,
    connect_timeout: Duration,
    master_name: String,
    /// The task listening for `+switch-master`, stopped with the link.
    watcher: Mutex<Option<tokio::task::AbortHandle>>,
}

impl Drop for SentinelLink {
    fn drop(&mut self) {
        if let Some(watcher) = self.watcher.get_mut().unwrap_or_else(PoisonError::into_inner).take() {
            watcher.abort();
        }
    }
}

impl SentinelLink {
    /// Reads the configuration; connects to nothing yet.
    pub(super) fn new(
        urls: &[String],
        sentinel: &RedisSentinelConfig,
        connect_timeout: Duration,
        response_timeout: Duration,
    ) -> Result<Self, ClientError> {
        let mut node = RedisConnectionInfo::default().set_db(sentinel.db);
        if let Some(username) = &sentinel.username {
            node = node.set_username(username);
        }
        if let Some(password) = &sentinel.password {
            node = node.set_password(password);
        }
        let client = SentinelClient::build(
            urls.iter().map(String::as_str).collect(),
            sentinel.master_name.clone(),
            Some(SentinelNodeConnectionInfo::default().set_redis_connection_info(node)),
            SentinelServerType::Master,
        )?;
        Ok(SentinelLink {
            sentinels: tokio::sync::Mutex::new(client),
            node: NodeLink::default(),
            config: AsyncConnectionConfig::new()
                .set_connection_timeout(Some(connect_timeout))
                .set_response_timeout(Some(response_timeout)),
            connect_timeout,
            master_name: sentinel.master_name.clone(),
            watcher: Mutex::new(None),
        })
    }

    /// Listens for the Sentinels announcing another primary (`+switch-master`)
    /// and lets the connection go when they do. A planned failover
    /// (`SENTINEL FAILOVER`), or a primary cut off and back, leaves the old
    /// primary up and taking writes until Sentinel gets round to demoting it,
    /// seconds later; what the store wrote there meanwhile would be lost
    /// when it resyncs as a replica.
    pub(super) fn watch_switches(self: &Arc<Self>) {
        let watcher = tokio::spawn(watch_switches(Arc::downgrade(self)));
        *self.watcher.lock().unwrap_or_else(PoisonError::into_inner) = Some(watcher.abort_handle());
    }

    /// A pub/sub connection to a Sentinel, subscribed to `+switch-master`.
    async fn subscribe_to_switches(&self) -> Result<PubSub, ClientError> {
        let sentinel = {
            let mut sentinels = self.sentinels.lock().await;
            within(self.connect_timeout, Box::pin(sentinels.async_get_sentinel_client())).await?
        };
        let subscribe = async move {
            let mut pubsub = sentinel.get_async_pubsub().await?;
            pubsub.subscribe("+switch-master").await?;
            Ok(pubsub)
        };
        within(self.connect_timeout, Box::pin(subscribe)).await
    }

    /// A client for the primary the Sentinels name now (for pub/sub, which
    /// needs a connection of its own).
    pub(super) async fn primary(&self) -> Result<redis::Client, ClientError> {
        let mut sentinels = self.sentinels.lock().await;
        within(self.connect_timeout, Box::pin(sentinels.async_get_client())).await
    }

    /// Sends one command to the primary.
    pub(super) async fn command(&self, cmd: &Cmd) -> Result<Value, ClientError> {
        self.node.command(|| self.connect(), cmd).await
    }

    /// Sends a pipeline to the primary.
    pub(super) async fn pipeline(&self, pipe: &Pipeline) -> Result<Vec<Value>, ClientError> {
        self.node.pipeline(|| self.connect(), pipe).await
    }

    /// Loads `script` into the primary's script cache; its SHA1.
    pub(super) async fn load(&self, script: &Script) -> Result<String, ClientError> {
        self.node.load(|| self.connect(), script).await
    }

    /// A new connection to the primary the Sentinels name now.
    async fn connect(&self) -> Result<MultiplexedConnection, ClientError> {
        let mut sentinels = self.sentinels.lock().await;
        // Boxed: the redis crate's Sentinel lookup nests deep enough that
        // every future awaiting it inline overflows rustc's query depth limit
        // in the host's `main`.
        within(
            self.connect_timeout,
            Box::pin(async {
                let client = sentinels.async_get_client().await?;
                client.get_multiplexed_async_connection_with_config(&self.config).await
            }),
        )
        .await
    }
}

/// Lets `link`'s connection go whenever a Sentinel announces its primary
/// switched, subscribing again (after 0.1 s, doubling up to 5 s) when the
/// subscription drops, until the link is gone. A switch announced while it
/// is down is not heard; the connection is then let go at its first error or
/// `READONLY`, once the old primary is demoted.
async fn watch_switches(link: Weak<SentinelLink>) {
    const FIRST_RETRY: Duration = Duration::from_millis(100);
    const LONGEST_RETRY: Duration = Duration::from_secs(5);
    let mut retry = FIRST_RETRY;
    loop {
        let Some(strong) = link.upgrade() else { return };
        let (subscribed, master) = (strong.subscribe_to_switches().await, strong.master_name.clone());
        drop(strong);
        match subscribed {
            Ok(mut pubsub) => {
                retry = FIRST_RETRY;
                let mut messages = pubsub.on_message();
                while let Some(message) = messages.next().await {
                    // "<master name> <old ip> <old port> <new ip> <new port>"
                    let text = message.get_payload::<String>().unwrap_or_default();
                    if text.split(' ').next() == Some(master.as_str()) {
                        let Some(link) = link.upgrade() else { return };
                        tracing::info!(switch = %text, "Sentinel switched the Redis primary; connecting to the new one");
                        link.node.forget_current();
                    }
                }
                tracing::warn!("the subscription to Sentinel's +switch-master dropped; subscribing again");
            }
            Err(err) => tracing::warn!(error = %err, "subscribing to Sentinel's +switch-master failed; trying again"),
        }
        tokio::time::sleep(retry).await;
        retry = (retry * 2).min(LONGEST_RETRY);
    }
}

/// `work`, or a timeout error after `timeout` (asking a silent Sentinel must not hang a call).
async fn within<T>(timeout: Duration, work: impl Future<Output = Result<T, ClientError>>) -> Result<T, ClientError> {
    tokio::time::timeout(timeout, work).await.unwrap_or_else(|_| {
        Err(ClientError::from(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("the Sentinels named no reachable primary within {timeout:?}"),
        )))
    })
}
