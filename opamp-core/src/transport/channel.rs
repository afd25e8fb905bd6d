//! An in-process transport over bounded channels.
//!
//! For tests and demos: the runtimes run against it exactly as against gRPC
//! or OpAMP, without sockets. Identity is taken on trust, since both ends are
//! in one process.

use async_trait::async_trait;
use tokio::sync::{Mutex, mpsc};

use super::{AgentConnector, AgentSession, DeviceHello, DeviceSession, DeviceTransport, Outbound};
use crate::error::{Error, Result};

/// Sizes of the channel transport's queues.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct ChannelConfig {
    /// Messages queued per session and direction.
    pub queue_capacity: usize,
    /// Sessions waiting to be accepted.
    pub backlog: usize,
}

impl Default for ChannelConfig {
    fn default() -> Self {
        ChannelConfig {
            queue_capacity: 16,
            backlog: 1024,
        }
    }
}

impl ChannelConfig {
    /// The same, with `queue_capacity` messages per session and direction.
    pub fn queue_capacity(mut self, capacity: usize) -> Self {
        self.queue_capacity = capacity.max(1);
        self
    }
}

/// The supervisor side: accepts sessions opened by its [`ChannelConnector`]s.
#[derive(Debug)]
pub struct ChannelTransport {
    sessions: Mutex<mpsc::Receiver<DeviceSession>>,
}

/// The device side; clone it for every simulated device.
#[derive(Debug, Clone)]
pub struct ChannelConnector {
    sessions: mpsc::Sender<DeviceSession>,
    queue_capacity: usize,
}

/// A connected transport and connector.
pub fn pair(config: ChannelConfig) -> (ChannelTransport, ChannelConnector) {
    let (tx, rx) = mpsc::channel(config.backlog.max(1));
    (
        ChannelTransport {
            sessions: Mutex::new(rx),
        },
        ChannelConnector {
            sessions: tx,
            queue_capacity: config.queue_capacity.max(1),
        },
    )
}

#[async_trait]
impl DeviceTransport for ChannelTransport {
    fn name(&self) -> &'static str {
        "channel"
    }

    async fn accept(&self) -> Result<Option<DeviceSession>> {
        Ok(self.sessions.lock().await.recv().await)
    }
}

#[async_trait]
impl AgentConnector for ChannelConnector {
    async fn connect(&self, hello: &DeviceHello) -> Result<AgentSession> {
        let (to_device, to_device_rx) = Outbound::channel(self.queue_capacity);
        let (from_device, from_device_rx) = Outbound::channel(self.queue_capacity);
        let session = DeviceSession::new(hello.clone(), "channel", Box::new(from_device_rx), to_device);
        self.sessions
            .send(session)
            .await
            .map_err(|_| Error::unavailable("the channel transport's supervisor side is gone"))?;
        Ok(AgentSession::new(Box::new(to_device_rx), from_device))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::transport::{FromDevice, ToDevice};
    use crate::{Command, CommandKind, DeviceId, Timestamp};

    #[tokio::test]
    async fn messages_flow_both_ways_and_close() {
        let (transport, connector) = pair(ChannelConfig::default());
        let hello = DeviceHello::new(DeviceId::new("d1").unwrap());
        let mut agent = connector.connect(&hello).await.unwrap();
        let mut session = transport.accept().await.unwrap().unwrap();
        assert_eq!(session.hello, hello);

        let cmd = Command::new(
            hello.device,
            CommandKind::Restart,
            Timestamp::now(),
            Duration::from_secs(1),
        );
        session
            .outbound
            .try_send(ToDevice::Command(Box::new(cmd.clone())))
            .unwrap();
        assert_eq!(
            agent.inbound.recv().await.unwrap(),
            Some(ToDevice::Command(Box::new(cmd)))
        );

        agent.outbound.try_send(FromDevice::Heartbeat).unwrap();
        assert_eq!(session.inbound.recv().await.unwrap(), Some(FromDevice::Heartbeat));

        drop(agent);
        assert_eq!(session.inbound.recv().await.unwrap(), None);
        assert!(session.outbound.is_closed());
    }

    #[tokio::test]
    async fn connect_fails_when_the_supervisor_side_is_gone() {
        let (transport, connector) = pair(ChannelConfig::default());
        drop(transport);
        let err = connector
            .connect(&DeviceHello::new(DeviceId::new("d1").unwrap()))
            .await
            .unwrap_err();
        assert!(err.is_retryable(), "{err}");
    }

    #[tokio::test]
    async fn accept_ends_when_every_connector_is_gone() {
        let (transport, connector) = pair(ChannelConfig::default());
        drop(connector);
        assert!(transport.accept().await.unwrap().is_none());
    }
}
