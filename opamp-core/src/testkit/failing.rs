//! A store and a bus that can be told to fail, wrapped around any backend:
//! for tests of what a runtime or a server does while its store or bus is
//! unavailable. While failing, every call answers [`Error::Unavailable`]
//! naming the store or the bus, as a backend that lost its server does.
//!
//! These stand in for an outage in tests of the code above the traits; the
//! backends' own behaviour under real faults is tested against real servers.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::watch;

use crate::bus::{Bus, CommandBus, ConfigUpdate, Delivery, EventBus, MessageStream, Subscription};
use crate::command::{Command, CorrelationId};
use crate::config::{ConfigRef, ConfigTemplate};
use crate::error::{Error, Result};
use crate::event::DeviceEvent;
use crate::id::{AgentType, ConfigVersion, DeviceId, GroupName, SupervisorId};
use crate::revocation::Revocation;
use crate::status::{DeviceStatus, StatusPatch};
use crate::store::{
    Claim, ConfigStore, Page, PageRequest, RevocationStore, RoutingStore, StatusStore, Store, SupervisorLoad,
    TrackingStore,
};
use crate::time::Timestamp;
use crate::tracking::{CommandRecord, Endings, Rollout, RolloutId, StoreGeneration};

/// On or off, shared with the streams a failing bus hands out, which it
/// wakes; counts the calls it refused.
#[derive(Debug, Clone)]
struct Switch(Arc<watch::Sender<bool>>, Arc<AtomicU64>);

impl Default for Switch {
    fn default() -> Self {
        Switch(Arc::new(watch::channel(false).0), Arc::default())
    }
}

impl Switch {
    fn set(&self, off: bool) {
        self.0.send_replace(off);
    }

    fn check(&self, what: &str) -> Result<()> {
        if *self.0.borrow() {
            self.1.fetch_add(1, Ordering::Relaxed);
            Err(Error::unavailable(format!("the test {what} is switched off")))
        } else {
            Ok(())
        }
    }

    fn refused(&self) -> u64 {
        self.1.load(Ordering::Relaxed)
    }
}

/// A store that fails every call while switched off.
#[derive(Debug)]
pub struct FailingStore {
    inner: Arc<dyn Store>,
    off: Switch,
}

impl FailingStore {
    /// How many calls it refused so far.
    pub fn refused(&self) -> u64 {
        self.off.refused()
    }

    /// `inner`, answering until told to fail.
    pub fn new(inner: Arc<dyn Store>) -> Self {
        FailingStore {
            inner,
            off: Switch::default(),
        }
    }

    /// Fails every call from now on (`true`), or answers again (`false`).
    pub fn fail(&self, on: bool) {
        self.off.set(on);
    }
}

/// Checks the switch, then delegates to the memory backend.
macro_rules! guarded {
    ($self:ident, $what:literal, $call:ident($($arg:expr),*)) => {{
        $self.off.check($what)?;
        $self.inner.$call($($arg),*).await
    }};
}

#[async_trait]
impl RoutingStore for FailingStore {
    async fn claim(&self, device: &DeviceId, supervisor: &SupervisorId, ttl: Duration) -> Result<Claim> {
        guarded!(self, "store", claim(device, supervisor, ttl))
    }
    async fn renew(&self, supervisor: &SupervisorId, devices: &[DeviceId], ttl: Duration) -> Result<Vec<DeviceId>> {
        guarded!(self, "store", renew(supervisor, devices, ttl))
    }
    async fn release(&self, device: &DeviceId, supervisor: &SupervisorId) -> Result<bool> {
        guarded!(self, "store", release(device, supervisor))
    }
    async fn lookup(&self, device: &DeviceId) -> Result<Option<SupervisorId>> {
        guarded!(self, "store", lookup(device))
    }
    async fn lookup_many(&self, devices: &[DeviceId]) -> Result<Vec<Option<SupervisorId>>> {
        guarded!(self, "store", lookup_many(devices))
    }
}

#[async_trait]
impl StatusStore for FailingStore {
    async fn update_status(&self, device: &DeviceId, patch: &StatusPatch) -> Result<()> {
        guarded!(self, "store", update_status(device, patch))
    }
    async fn status(&self, device: &DeviceId) -> Result<Option<DeviceStatus>> {
        guarded!(self, "store", status(device))
    }
    async fn online_devices(&self, page: &PageRequest) -> Result<Page<DeviceId>> {
        guarded!(self, "store", online_devices(page))
    }
    async fn devices(&self, page: &PageRequest) -> Result<Page<DeviceId>> {
        guarded!(self, "store", devices(page))
    }
    async fn supervisor_devices(&self, supervisor: &SupervisorId, page: &PageRequest) -> Result<Page<DeviceId>> {
        guarded!(self, "store", supervisor_devices(supervisor, page))
    }
    async fn device_counts(&self) -> Result<Vec<SupervisorLoad>> {
        guarded!(self, "store", device_counts())
    }
}

#[async_trait]
impl ConfigStore for FailingStore {
    async fn put_template(&self, template: &ConfigTemplate) -> Result<()> {
        guarded!(self, "store", put_template(template))
    }
    async fn template(&self, config: &ConfigRef) -> Result<Option<ConfigTemplate>> {
        guarded!(self, "store", template(config))
    }
    async fn template_versions(&self, agent_type: &AgentType) -> Result<Vec<ConfigVersion>> {
        guarded!(self, "store", template_versions(agent_type))
    }
    async fn set_latest(&self, config: &ConfigRef) -> Result<()> {
        guarded!(self, "store", set_latest(config))
    }
    async fn latest(&self, agent_type: &AgentType) -> Result<Option<ConfigVersion>> {
        guarded!(self, "store", latest(agent_type))
    }
    async fn set_desired(&self, device: &DeviceId, config: &ConfigRef) -> Result<()> {
        guarded!(self, "store", set_desired(device, config))
    }
    async fn desired(&self, device: &DeviceId) -> Result<Option<ConfigRef>> {
        guarded!(self, "store", desired(device))
    }
    async fn clear_desired(&self, device: &DeviceId) -> Result<bool> {
        guarded!(self, "store", clear_desired(device))
    }
}

#[async_trait]
impl RevocationStore for FailingStore {
    async fn revoke(&self, revocation: &Revocation) -> Result<bool> {
        guarded!(self, "store", revoke(revocation))
    }
    async fn reinstate(&self, device: &DeviceId) -> Result<bool> {
        guarded!(self, "store", reinstate(device))
    }
    async fn revocation(&self, device: &DeviceId) -> Result<Option<Revocation>> {
        guarded!(self, "store", revocation(device))
    }
    async fn revocations(&self, page: &PageRequest) -> Result<Page<Revocation>> {
        guarded!(self, "store", revocations(page))
    }
}

#[async_trait]
impl TrackingStore for FailingStore {
    async fn insert_command(&self, record: &CommandRecord) -> Result<()> {
        guarded!(self, "store", insert_command(record))
    }
    async fn update_command(&self, record: &CommandRecord) -> Result<bool> {
        guarded!(self, "store", update_command(record))
    }
    async fn command_record(&self, id: &CorrelationId) -> Result<Option<CommandRecord>> {
        guarded!(self, "store", command_record(id))
    }
    async fn overdue_commands(&self, before: Timestamp, limit: usize) -> Result<Vec<CorrelationId>> {
        guarded!(self, "store", overdue_commands(before, limit))
    }
    async fn watch_endings(&self) -> Result<Endings> {
        guarded!(self, "store", watch_endings())
    }
    async fn put_rollout(&self, rollout: &Rollout) -> Result<bool> {
        guarded!(self, "store", put_rollout(rollout))
    }
    async fn rollout(&self, id: &RolloutId) -> Result<Option<Rollout>> {
        guarded!(self, "store", rollout(id))
    }
    async fn rollouts(&self, page: &PageRequest) -> Result<Page<RolloutId>> {
        guarded!(self, "store", rollouts(page))
    }
    async fn claim_rollout_driver(&self, id: &RolloutId, driver: &str, ttl: Duration) -> Result<bool> {
        guarded!(self, "store", claim_rollout_driver(id, driver, ttl))
    }
    async fn release_rollout_driver(&self, id: &RolloutId, driver: &str) -> Result<bool> {
        guarded!(self, "store", release_rollout_driver(id, driver))
    }
    async fn generation(&self) -> Result<Option<StoreGeneration>> {
        guarded!(self, "store", generation())
    }
    async fn begin_generation(&self, generation: &StoreGeneration) -> Result<StoreGeneration> {
        guarded!(self, "store", begin_generation(generation))
    }
}

/// A bus that fails every call while switched off; its event
/// subscriptions fail too (commands and broadcasts keep flowing, as from a
/// consumer that fetched them before the outage).
#[derive(Debug)]
pub struct FailingBus {
    inner: Arc<dyn Bus>,
    off: Switch,
}

impl FailingBus {
    /// How many calls it refused so far.
    pub fn refused(&self) -> u64 {
        self.off.refused()
    }

    /// `inner`, answering until told to fail.
    pub fn new(inner: Arc<dyn Bus>) -> Self {
        FailingBus {
            inner,
            off: Switch::default(),
        }
    }

    /// Fails every call from now on (`true`), or answers again (`false`).
    pub fn fail(&self, on: bool) {
        self.off.set(on);
    }
}

#[async_trait]
impl CommandBus for FailingBus {
    async fn send(&self, supervisor: &SupervisorId, command: &Command) -> Result<()> {
        guarded!(self, "bus", send(supervisor, command))
    }
    async fn subscribe(&self, supervisor: &SupervisorId) -> Result<Subscription<Command>> {
        guarded!(self, "bus", subscribe(supervisor))
    }
    async fn broadcast(&self, update: &ConfigUpdate) -> Result<()> {
        guarded!(self, "bus", broadcast(update))
    }
    async fn subscribe_broadcasts(&self, supervisor: &SupervisorId) -> Result<Subscription<ConfigUpdate>> {
        guarded!(self, "bus", subscribe_broadcasts(supervisor))
    }
    async fn holds_history(&self) -> Result<bool> {
        guarded!(self, "bus", holds_history())
    }
}

#[async_trait]
impl EventBus for FailingBus {
    async fn publish_event(&self, event: &DeviceEvent) -> Result<()> {
        guarded!(self, "bus", publish_event(event))
    }
    async fn subscribe_events(&self, group: &GroupName) -> Result<Subscription<DeviceEvent>> {
        let inner = guarded!(self, "bus", subscribe_events(group))?;
        Ok(Box::new(FailingStream {
            inner,
            off: self.off.clone(),
        }))
    }
}

/// An event subscription whose `next` fails while the bus is switched off,
/// also when the switch flips while it waits.
#[derive(Debug)]
struct FailingStream<T> {
    inner: Subscription<T>,
    off: Switch,
}

#[async_trait]
impl<T: Send + std::fmt::Debug + 'static> MessageStream<T> for FailingStream<T> {
    async fn next(&mut self) -> Result<Option<Delivery<T>>> {
        self.off.check("bus")?;
        let mut switch = self.off.0.subscribe();
        tokio::select! {
            next = self.inner.next() => next,
            _ = switch.wait_for(|off| *off) => Err(Error::unavailable("the test bus is switched off")),
        }
    }
}
