//! The routing, status and configuration store.
//!
//! Five small traits, each object-safe and usable as `Arc<dyn …>`:
//!
//! - [`RoutingStore`]: which supervisor holds device X, as leases with a TTL;
//! - [`StatusStore`]: what is known about each device, with the online and
//!   per-supervisor indexes;
//! - [`ConfigStore`]: immutable configuration templates, the `latest` pointer
//!   per agent type and each device's desired configuration.
//!
//! - [`TrackingStore`]: what control planes track, command records and rollouts.
//! - [`RevocationStore`]: the devices refused service until reinstated.
//!
//! [`Store`] is all five at once; every backend implements it. Conveniences
//! built from the required methods live in [`RoutingStoreExt`],
//! [`StatusStoreExt`] and [`ConfigStoreExt`], implemented for every store.

use std::fmt::Debug;
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::command::CorrelationId;
use crate::config::{ConfigRef, ConfigTemplate};
use crate::error::{Error, Result};
use crate::id::{AgentType, ConfigVersion, DeviceId, SupervisorId};
use crate::revocation::Revocation;
use crate::status::{DeviceStatus, StatusPatch};
use crate::tracking::{CommandRecord, Endings, Rollout, RolloutId, StoreGeneration};

/// How long a lease lasts without renewal unless configured otherwise (the design's `EXPIRE … 300`).
pub const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(300);

/// The shortest lease a store accepts.
pub const MIN_LEASE_TTL: Duration = Duration::from_millis(1);

/// The longest lease a store accepts.
pub const MAX_LEASE_TTL: Duration = Duration::from_secs(365 * 24 * 3600);

/// Checks a lease TTL against [`MIN_LEASE_TTL`]..=[`MAX_LEASE_TTL`]; backends call this first.
pub fn validate_ttl(ttl: Duration) -> Result<()> {
    if (MIN_LEASE_TTL..=MAX_LEASE_TTL).contains(&ttl) {
        Ok(())
    } else {
        Err(Error::invalid_input(format!(
            "lease TTL {ttl:?} is outside {MIN_LEASE_TTL:?}..={MAX_LEASE_TTL:?}"
        )))
    }
}

/// What [`RoutingStore::claim`] found before it took the lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    /// Nobody held the device (or the previous lease had lapsed).
    Acquired,
    /// The claiming supervisor already held it; the lease was extended.
    Renewed,
    /// Another supervisor held it: a session takeover.
    TakenOver {
        /// The supervisor that held it, which must drop its stale session.
        previous: SupervisorId,
    },
}

impl Claim {
    /// The other supervisor that held the device, for a takeover.
    pub fn previous_owner(&self) -> Option<&SupervisorId> {
        match self {
            Claim::TakenOver { previous } => Some(previous),
            Claim::Acquired | Claim::Renewed => None,
        }
    }
}

/// Which supervisor holds each device: leases with a time to live.
///
/// A lease names one supervisor and lapses `ttl` after it was last claimed or
/// renewed. A lapsed lease is never returned and owns nothing. Expiry is judged
/// by the store's [`Clock`](crate::Clock).
///
/// Fencing: only the supervisor that holds a lease can renew or release it, so
/// a supervisor that lost a device to another can never erase the new owner.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> opamp_core::Result<()> {
/// use opamp_core::{Claim, DeviceId, RoutingStore, SupervisorId, DEFAULT_LEASE_TTL};
/// use opamp_store::memory::MemoryStore;
///
/// let store = MemoryStore::new();
/// let (d5, s1, s2) = (DeviceId::new("device-5")?, SupervisorId::new("s1")?, SupervisorId::new("s2")?);
///
/// assert_eq!(store.claim(&d5, &s1, DEFAULT_LEASE_TTL).await?, Claim::Acquired);
/// assert_eq!(store.lookup(&d5).await?, Some(s1));
///
/// // The device reconnects to s2: a takeover, and s1's release is fenced off.
/// assert_eq!(store.claim(&d5, &s2, DEFAULT_LEASE_TTL).await?, Claim::TakenOver { previous: s1 });
/// assert!(!store.release(&d5, &s1).await?);
/// assert_eq!(store.lookup(&d5).await?, Some(s2));
/// # Ok(())
/// # }
/// ```
#[async_trait]
pub trait RoutingStore: Send + Sync + Debug + 'static {
    /// Takes or renews ownership of `device` for `supervisor` for `ttl`.
    ///
    /// Always succeeds for a valid TTL: the newest claim wins, and the result
    /// says whom it took the device from.
    async fn claim(&self, device: &DeviceId, supervisor: &SupervisorId, ttl: Duration) -> Result<Claim>;

    /// Extends the leases `supervisor` holds on `devices` to `ttl` from now, in one call.
    ///
    /// Returns the devices it no longer holds (lapsed, or held by another);
    /// their leases are left as they are.
    async fn renew(&self, supervisor: &SupervisorId, devices: &[DeviceId], ttl: Duration) -> Result<Vec<DeviceId>>;

    /// Releases `device` if `supervisor` holds it; returns whether it did.
    ///
    /// A lease held by another supervisor, or none, is left alone (`false`).
    async fn release(&self, device: &DeviceId, supervisor: &SupervisorId) -> Result<bool>;

    /// The supervisor holding `device`, if its lease has not lapsed.
    async fn lookup(&self, device: &DeviceId) -> Result<Option<SupervisorId>>;

    /// [`lookup`](RoutingStore::lookup) for many devices in one call; the
    /// answers are in the order of `devices`.
    async fn lookup_many(&self, devices: &[DeviceId]) -> Result<Vec<Option<SupervisorId>>>;
}

/// An opaque position in a paged listing, handed back to get the next page.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Cursor(String);

impl Cursor {
    /// Wraps a backend's cursor text.
    pub fn new(text: impl Into<String>) -> Self {
        Cursor(text.into())
    }

    /// The cursor text, for the backend that made it (or a URL).
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Which page of a listing to return.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct PageRequest {
    /// Where the previous page ended; `None` for the first page.
    pub after: Option<Cursor>,
    /// The most items to return, 1..=[`PageRequest::MAX_LIMIT`].
    pub limit: usize,
}

impl PageRequest {
    /// The largest page a store returns.
    pub const MAX_LIMIT: usize = 10_000;

    /// The first page, of at most `limit` items (clamped to 1..=[`MAX_LIMIT`](Self::MAX_LIMIT)).
    pub fn first(limit: usize) -> Self {
        PageRequest {
            after: None,
            limit: limit.clamp(1, Self::MAX_LIMIT),
        }
    }

    /// The page after `cursor`, of at most `limit` items (clamped).
    pub fn after(cursor: Cursor, limit: usize) -> Self {
        PageRequest {
            after: Some(cursor),
            ..Self::first(limit)
        }
    }
}

/// One page of a listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Page<T> {
    /// The items of this page.
    pub items: Vec<T>,
    /// Where to continue; `None` on the last page.
    pub next: Option<Cursor>,
}

impl<T> Page<T> {
    /// A page of at most `limit` items from a fetch of up to `limit + 1`: the
    /// extra item only tells that another page follows, which continues after
    /// the last item kept (`cursor` makes its cursor).
    pub fn from_one_more(mut items: Vec<T>, limit: usize, cursor: impl FnOnce(&T) -> Cursor) -> Self {
        let next = if items.len() > limit {
            items.truncate(limit);
            items.last().map(cursor)
        } else {
            None
        };
        Page { items, next }
    }
}

/// How many devices a supervisor holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SupervisorLoad {
    /// The supervisor.
    pub supervisor: SupervisorId,
    /// How many devices are online under it.
    pub devices: u64,
}

/// What is known about each device, and who is online where.
///
/// Listings are paged and never return the whole fleet at once. While the
/// listed set changes, a page may repeat a device another page had; a device
/// that stays in the set throughout is listed at least once.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> opamp_core::Result<()> {
/// use opamp_core::{DeviceId, PageRequest, StatusPatch, StatusStore, SupervisorId, Timestamp};
/// use opamp_store::memory::MemoryStore;
///
/// let store = MemoryStore::new();
/// let (d5, s1) = (DeviceId::new("device-5")?, SupervisorId::new("s1")?);
/// store.update_status(&d5, &StatusPatch::new().online(s1, Timestamp::now()).emission(true)).await?;
///
/// let page = store.online_devices(&PageRequest::first(100)).await?;
/// assert_eq!(page.items, vec![d5]);
/// assert!(store.status(&d5).await?.unwrap().emission);
/// assert_eq!(store.device_counts().await?[0].devices, 1);
/// # Ok(())
/// # }
/// ```
#[async_trait]
pub trait StatusStore: Send + Sync + Debug + 'static {
    /// Applies a partial update atomically (see [`StatusPatch`] for the rules,
    /// the fence and the indexes kept in step).
    ///
    /// A fenced patch is [`Error::NotOwner`] when the status names another
    /// supervisor (or none), and [`Error::NotFound`] (naming the device) when
    /// there is no status at all; either way nothing changes.
    async fn update_status(&self, device: &DeviceId, patch: &StatusPatch) -> Result<()>;

    /// The status of `device`, if anything was ever recorded.
    async fn status(&self, device: &DeviceId) -> Result<Option<DeviceStatus>>;

    /// The online devices, a page at a time.
    async fn online_devices(&self, page: &PageRequest) -> Result<Page<DeviceId>>;

    /// Every device that has been online at least once, online now or not, a
    /// page at a time: the fleet as far as it has shown itself.
    ///
    /// The order is the backend's own (by id where it can).
    async fn devices(&self, page: &PageRequest) -> Result<Page<DeviceId>>;

    /// The devices online under `supervisor`, a page at a time.
    async fn supervisor_devices(&self, supervisor: &SupervisorId, page: &PageRequest) -> Result<Page<DeviceId>>;

    /// How many devices each supervisor holds, for placing new connections.
    /// Supervisors holding none may be left out.
    async fn device_counts(&self) -> Result<Vec<SupervisorLoad>>;
}

/// Configuration templates and what each device should run.
///
/// Template versions are immutable. The `latest` pointer of an agent type and
/// the desired configuration of a device may only name stored templates.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> opamp_core::Result<()> {
/// use opamp_core::{AgentType, ConfigBundle, ConfigFile, ConfigRef, ConfigStore, ConfigTemplate, ConfigVersion, Timestamp};
/// use opamp_store::memory::MemoryStore;
///
/// let store = MemoryStore::new();
/// let v1 = ConfigRef::new(AgentType::new("fluentbit")?, ConfigVersion::new("v1.2.3")?);
/// let bundle = ConfigBundle::new().with_file("fluent-bit.conf", ConfigFile::new("text/plain", "[SERVICE]\n"))?;
/// store.put_template(&ConfigTemplate::new(v1, bundle, "alice", Timestamp::now())).await?;
/// store.set_latest(&v1).await?;
/// assert_eq!(store.latest(&v1.agent_type).await?, Some(v1.version));
/// # Ok(())
/// # }
/// ```
#[async_trait]
pub trait ConfigStore: Send + Sync + Debug + 'static {
    /// Stores a template version. The same version with the same content is
    /// accepted again; with other content it is [`Error::AlreadyExists`].
    async fn put_template(&self, template: &ConfigTemplate) -> Result<()>;

    /// The template `config`, if stored.
    async fn template(&self, config: &ConfigRef) -> Result<Option<ConfigTemplate>>;

    /// The stored versions of `agent_type`, oldest first.
    async fn template_versions(&self, agent_type: &AgentType) -> Result<Vec<ConfigVersion>>;

    /// Points `latest` of the agent type at `config`; [`Error::NotFound`] if it is not stored.
    async fn set_latest(&self, config: &ConfigRef) -> Result<()>;

    /// The version `latest` points at.
    async fn latest(&self, agent_type: &AgentType) -> Result<Option<ConfigVersion>>;

    /// Records that `device` should run `config`; [`Error::NotFound`] if it is not stored.
    async fn set_desired(&self, device: &DeviceId, config: &ConfigRef) -> Result<()>;

    /// The configuration `device` should run, if one was set.
    async fn desired(&self, device: &DeviceId) -> Result<Option<ConfigRef>>;

    /// Forgets what `device` should run; returns whether anything was set.
    async fn clear_desired(&self, device: &DeviceId) -> Result<bool>;
}

/// What control planes track: command records, rollouts and who drives each rollout.
///
/// Control planes are stateless, so any instance can answer for a command or
/// a rollout another one started. Records are written whole; the two
/// conditional writes keep concurrent writers from undoing each other:
/// a command's record changes only while it is pending, and a rollout is
/// written only on top of the revision it was read at.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> opamp_core::Result<()> {
/// use std::time::Duration;
/// use opamp_core::tracking::{CommandRecord, CommandState};
/// use opamp_core::{Command, CommandKind, CommandOutcome, DeviceId, SupervisorId, Timestamp, TrackingStore};
/// use opamp_store::memory::MemoryStore;
///
/// let store = MemoryStore::new();
/// let command = Command::new(DeviceId::new("d1")?, CommandKind::Restart, Timestamp::now(), Duration::from_secs(30));
/// let mut record = CommandRecord::new(command, Some(SupervisorId::new("s1")?), CommandState::Pending);
/// store.insert_command(&record).await?;
///
/// record.complete(&CommandOutcome::Acked, Timestamp::now());
/// assert!(store.update_command(&record).await?);
/// assert!(!store.update_command(&record).await?, "an ended command stays as it ended");
/// assert_eq!(store.command_record(&record.correlation_id()).await?.unwrap().state, CommandState::Acked);
/// # Ok(())
/// # }
/// ```
#[async_trait]
pub trait TrackingStore: Send + Sync + Debug + 'static {
    /// Records a new command. The same record again is success and changes
    /// nothing (a write sent again after its reply was lost finds its own
    /// first attempt); another record under a correlation id already taken
    /// is [`Error::AlreadyExists`], naming what differs
    /// ([`CommandRecord::inserted_again`] decides).
    async fn insert_command(&self, record: &CommandRecord) -> Result<()>;

    /// Replaces the record with the same correlation id, if that one is still
    /// pending; returns whether it did. [`Error::NotFound`] if there is none.
    async fn update_command(&self, record: &CommandRecord) -> Result<bool>;

    /// The record of the command `id`, if there is one (stores may forget old
    /// records; see each backend's retention).
    async fn command_record(&self, id: &CorrelationId) -> Result<Option<CommandRecord>>;

    /// The commands still pending whose deadline is at or before `before`,
    /// earliest deadline first, at most `limit`: commands no outcome answered
    /// in time, for any control plane to sweep (the one that sent them may be
    /// gone). A command that ended while this ran may still be listed.
    async fn overdue_commands(&self, before: crate::Timestamp, limit: usize) -> Result<Vec<CorrelationId>>;

    /// Starts watching for commands ending: every `update_command` (by any
    /// writer, in any process) that makes a record final from now on sends
    /// its correlation id to the returned [`Endings`], best effort. A control
    /// plane waiting for an outcome another instance records learns of it
    /// this way instead of reading the record over and over.
    async fn watch_endings(&self) -> Result<Endings>;

    /// Writes `rollout` if the stored one is at `rollout.revision - 1` (or, for
    /// revision 1, if none is stored); returns whether it did.
    async fn put_rollout(&self, rollout: &Rollout) -> Result<bool>;

    /// The rollout `id`, if stored.
    async fn rollout(&self, id: &RolloutId) -> Result<Option<Rollout>>;

    /// The stored rollouts, newest first, a page at a time.
    async fn rollouts(&self, page: &PageRequest) -> Result<Page<RolloutId>>;

    /// Takes or renews the lease on driving rollout `id` for `driver` (any
    /// text naming one driver, unique to it), to last `ttl` from now; returns
    /// whether `driver` holds it now. A lease another driver holds is left
    /// alone (`false`) until it lapses. Expiry is judged by the store's
    /// [`Clock`](crate::Clock), at the same boundary as a routing lease.
    ///
    /// This keeps a rollout to one driver among all control planes, and
    /// lets any of them take over a rollout whose driver died once its
    /// lease lapsed.
    async fn claim_rollout_driver(&self, id: &RolloutId, driver: &str, ttl: Duration) -> Result<bool>;

    /// Drops the lease on driving rollout `id` if `driver` holds it (and it
    /// has not lapsed); returns whether it did.
    async fn release_rollout_driver(&self, id: &RolloutId, driver: &str) -> Result<bool>;

    /// The store's [`StoreGeneration`], if it has one. Kept for ever: it
    /// goes only with everything else the store held.
    async fn generation(&self) -> Result<Option<StoreGeneration>>;

    /// Marks the store with `generation` if it has none yet; returns the one
    /// it has afterwards (`generation`, or the one another writer put first).
    async fn begin_generation(&self, generation: &StoreGeneration) -> Result<StoreGeneration>;
}

/// A complete store: routing, status, configuration and tracking.
///
/// The devices refused service: a revoked device may not register anywhere
/// until it is reinstated (see [`crate::revocation`]). Supervisors read one
/// device's revocation each time it registers; operators list them.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> opamp_core::Result<()> {
/// use opamp_core::{DeviceId, PageRequest, Revocation, RevocationStore, Timestamp};
/// use opamp_store::memory::MemoryStore;
///
/// let store = MemoryStore::new();
/// let d5 = DeviceId::new("device-5")?;
/// assert!(store.revoke(&Revocation::new(d5, "token leaked", Timestamp::now())?).await?);
/// assert_eq!(store.revocation(&d5).await?.unwrap().reason, "token leaked");
/// assert_eq!(store.revocations(&PageRequest::first(10)).await?.items.len(), 1);
/// assert!(store.reinstate(&d5).await?);
/// assert!(store.revocation(&d5).await?.is_none());
/// # Ok(())
/// # }
/// ```
#[async_trait]
pub trait RevocationStore: Send + Sync + Debug + 'static {
    /// Revokes a device. Returns `false`, changing nothing, when it is
    /// revoked already: the first revocation, its reason and time, stays.
    async fn revoke(&self, revocation: &Revocation) -> Result<bool>;

    /// Lifts the revocation of `device`. Returns `false` if it was not revoked.
    async fn reinstate(&self, device: &DeviceId) -> Result<bool>;

    /// The revocation of `device`, if it is revoked.
    async fn revocation(&self, device: &DeviceId) -> Result<Option<Revocation>>;

    /// Every revocation, a page at a time (by device id where the backend can).
    /// While revocations change, a page may repeat one another page had.
    async fn revocations(&self, page: &PageRequest) -> Result<Page<Revocation>>;
}

/// Implemented for every type that implements the five parts; use it as
/// `Arc<dyn Store>` and hand out `Arc<dyn RoutingStore>` (etc.) by upcasting.
///
/// ```
/// use std::sync::Arc;
/// use opamp_core::{RoutingStore, Store};
/// use opamp_store::memory::MemoryStore;
///
/// let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
/// let routing: Arc<dyn RoutingStore> = store.clone();
/// # let _ = routing;
/// ```
pub trait Store: RoutingStore + StatusStore + ConfigStore + TrackingStore + RevocationStore {}

impl<T: RoutingStore + StatusStore + ConfigStore + TrackingStore + RevocationStore + ?Sized> Store for T {}

/// Conveniences over [`RoutingStore`], for every store.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> opamp_core::Result<()> {
/// use opamp_core::{DeviceId, Error, RoutingStoreExt};
/// use opamp_store::memory::MemoryStore;
///
/// let err = MemoryStore::new().owner(&DeviceId::new("device-5")?).await.unwrap_err();
/// assert!(matches!(err, Error::NotFound { .. }));
/// # Ok(())
/// # }
/// ```
#[async_trait]
pub trait RoutingStoreExt: RoutingStore {
    /// The supervisor holding `device`; [`Error::NotFound`] when none does.
    async fn owner(&self, device: &DeviceId) -> Result<SupervisorId> {
        self.lookup(device)
            .await?
            .ok_or_else(|| Error::not_found(format!("owner of device {device}")))
    }
}

impl<T: RoutingStore + ?Sized> RoutingStoreExt for T {}

/// Conveniences over [`StatusStore`], for every store.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> opamp_core::Result<()> {
/// use opamp_core::{DeviceId, StatusPatch, StatusStore, StatusStoreExt, SupervisorId, Timestamp};
/// use opamp_store::memory::MemoryStore;
///
/// let store = MemoryStore::new();
/// let (d5, s1, s2) = (DeviceId::new("device-5")?, SupervisorId::new("s1")?, SupervisorId::new("s2")?);
/// store.update_status(&d5, &StatusPatch::new().online(s2, Timestamp::now())).await?;
/// assert!(!store.mark_offline(&d5, &s1).await?, "s1 cannot mark offline what s2 holds");
/// assert!(store.mark_offline(&d5, &s2).await?);
/// # Ok(())
/// # }
/// ```
#[async_trait]
pub trait StatusStoreExt: StatusStore {
    /// Marks `device` offline unless another supervisor has it now (fenced by `supervisor`).
    ///
    /// Returns whether it was marked; a fenced-off update, or a device
    /// without status (nothing to mark), is `Ok(false)`.
    async fn mark_offline(&self, device: &DeviceId, supervisor: &SupervisorId) -> Result<bool> {
        match self
            .update_status(device, &StatusPatch::new().offline().fenced_by(*supervisor))
            .await
        {
            Ok(()) => Ok(true),
            Err(Error::NotOwner(_) | Error::NotFound { .. }) => Ok(false),
            Err(other) => Err(other),
        }
    }
}

impl<T: StatusStore + ?Sized> StatusStoreExt for T {}

/// Conveniences over [`ConfigStore`], for every store.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> opamp_core::Result<()> {
/// use opamp_core::{AgentType, ConfigStoreExt, DeviceId};
/// use opamp_store::memory::MemoryStore;
///
/// let store = MemoryStore::new();
/// assert_eq!(store.latest_template(&AgentType::new("fluentbit")?).await?, None);
/// assert_eq!(store.desired_template(&DeviceId::new("device-5")?).await?, None);
/// # Ok(())
/// # }
/// ```
#[async_trait]
pub trait ConfigStoreExt: ConfigStore {
    /// The template `latest` points at for `agent_type`.
    async fn latest_template(&self, agent_type: &AgentType) -> Result<Option<ConfigTemplate>> {
        match self.latest(agent_type).await? {
            Some(version) => self.template(&ConfigRef::new(*agent_type, version)).await,
            None => Ok(None),
        }
    }

    /// The template `device` should run: its desired configuration, if set.
    ///
    /// A desired configuration whose template is gone is an error naming both.
    async fn desired_template(&self, device: &DeviceId) -> Result<Option<ConfigTemplate>> {
        let Some(config) = self.desired(device).await? else {
            return Ok(None);
        };
        match self.template(&config).await? {
            Some(template) => Ok(Some(template)),
            None => Err(Error::not_found(format!(
                "config template {config}, the desired config of device {device}"
            ))),
        }
    }
}

impl<T: ConfigStore + ?Sized> ConfigStoreExt for T {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttl_bounds() {
        assert!(validate_ttl(DEFAULT_LEASE_TTL).is_ok());
        assert!(validate_ttl(MIN_LEASE_TTL).is_ok());
        let err = validate_ttl(Duration::ZERO).unwrap_err();
        assert!(err.to_string().contains("lease TTL 0ns"), "{err}");
        assert!(validate_ttl(MAX_LEASE_TTL + Duration::from_millis(1)).is_err());
    }

    #[test]
    fn page_limits_are_clamped() {
        assert_eq!(PageRequest::first(0).limit, 1);
        assert_eq!(PageRequest::first(1_000_000).limit, PageRequest::MAX_LIMIT);
        let next = PageRequest::after(Cursor::new("d9"), 5);
        assert_eq!(next.after.as_ref().map(Cursor::as_str), Some("d9"));
    }

    #[test]
    fn traits_are_object_safe() {
        fn assert_dyn(_: Option<&dyn Store>, _: Option<&dyn RoutingStore>) {}
        assert_dyn(None, None);
    }
}
