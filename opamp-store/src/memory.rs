//! An in-memory store: one process, no persistence.
//!
//! [`MemoryStore`] implements every store trait with sharded maps behind
//! `std` read-write locks, so lookups from many tasks proceed in parallel and
//! a lookup costs one keyed hash, one shard read lock and one probe, without
//! allocating. It suits tests and a single control-plane process, and is the
//! reference the other backends are checked against.
//!
//! Leases are judged by the [`Clock`] the store was made with. A lapsed lease
//! is never returned; its memory is reclaimed when a write touches the device
//! or by [`MemoryStore::purge_expired`], which a host may call on a timer.

use std::collections::hash_map::{Entry, RandomState};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::hash::{BuildHasher, BuildHasherDefault, Hash, Hasher};
use std::ops::Bound;
use std::sync::{Arc, Mutex, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::Duration;

use async_trait::async_trait;
use opamp_core::store::validate_ttl;
use opamp_core::{
    AgentType, Claim, Clock, CommandRecord, CommandState, ConfigRef, ConfigStore, ConfigTemplate, ConfigVersion,
    CorrelationId, Cursor, DeviceId, DeviceStatus, Endings, EndingsSender, Error, Page, PageRequest, Result,
    Revocation, RevocationStore, Rollout, RolloutId, RoutingStore, StatusPatch, StatusStore, StoreGeneration,
    SupervisorId, SupervisorLoad, SystemClock, Timestamp, TrackingStore,
};

/// How many shards each per-device map is split into: enough that two cores
/// (or sixty-four) rarely meet on one lock, few enough to cost nothing empty.
const SHARDS: usize = 64;

/// A store held in this process's memory.
///
/// Cheap to share: wrap it in an [`Arc`] and hand it out as `Arc<dyn Store>`.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> opamp_core::Result<()> {
/// use std::sync::Arc;
/// use std::time::Duration;
/// use opamp_core::{Claim, DeviceId, ManualClock, RoutingStore, SupervisorId};
/// use opamp_store::memory::MemoryStore;
///
/// let clock = Arc::new(ManualClock::starting_now());
/// let store = MemoryStore::with_clock(clock.clone());
/// let (d1, s1) = (DeviceId::new("d1")?, SupervisorId::new("s1")?);
///
/// store.claim(&d1, &s1, Duration::from_secs(30)).await?;
/// clock.advance(Duration::from_secs(30));
/// assert_eq!(store.lookup(&d1).await?, None, "the lease lapsed");
/// assert_eq!(store.purge_expired(), 1);
/// # Ok(())
/// # }
/// ```
pub struct MemoryStore {
    clock: Arc<dyn Clock>,
    leases: LeaseTable,
    // Boxed: a map doubles as it grows, and its spare slots should be a
    // pointer each, not a whole status (hundreds of bytes) per slot.
    statuses: Sharded<DeviceId, Box<DeviceStatus>>,
    // Written only under the device's `statuses` shard lock, so the index
    // changes of one device are applied in the order its patches were.
    indexes: RwLock<Indexes>,
    configs: RwLock<Configs>,
    desired: Sharded<DeviceId, ConfigRef>,
    commands: Sharded<CorrelationId, CommandRecord>,
    // Written only under the command's `commands` shard lock, so the
    // pending set follows each command's updates in order.
    tracking: RwLock<Tracking>,
    /// The watches of `watch_endings`, each told of every command that ends.
    endings: Mutex<Vec<EndingsSender>>,
    /// By device, so that they page in the order of the other listings.
    revocations: RwLock<BTreeMap<DeviceId, Revocation>>,
}

impl MemoryStore {
    /// An empty store judging leases by the system clock.
    pub fn new() -> Self {
        Self::with_clock(Arc::new(SystemClock))
    }

    /// An empty store judging leases by `clock` (a
    /// [`ManualClock`](opamp_core::ManualClock) in tests).
    pub fn with_clock(clock: Arc<dyn Clock>) -> Self {
        MemoryStore {
            clock,
            leases: LeaseTable::new(),
            statuses: Sharded::new(),
            indexes: RwLock::new(Indexes::default()),
            configs: RwLock::new(Configs::default()),
            desired: Sharded::new(),
            commands: Sharded::new(),
            tracking: RwLock::new(Tracking::new(DEFAULT_COMMAND_RETENTION)),
            endings: Mutex::default(),
            revocations: RwLock::default(),
        }
    }

    /// Keeps command records for `retention` after they were issued (default
    /// [`DEFAULT_COMMAND_RETENTION`]), so a long-running store does not grow
    /// without bound; older ones are forgotten as new ones arrive.
    pub fn with_command_retention(self, retention: Duration) -> Self {
        write(&self.tracking).retention = retention;
        self
    }

    /// Forgets everything, as a store that restarted without its data does:
    /// leases, statuses and their indexes, templates, desired
    /// configurations, command records, rollouts and revocations. For recovery tests and
    /// demos; open watches of command endings stay open.
    pub fn clear(&self) {
        for shard in self.leases.shards.iter() {
            write(shard).leases.clear();
        }
        self.statuses.clear();
        *write(&self.indexes) = Indexes::default();
        *write(&self.configs) = Configs::default();
        self.desired.clear();
        self.commands.clear();
        write(&self.revocations).clear();
        let mut tracking = write(&self.tracking);
        *tracking = Tracking::new(tracking.retention);
    }

    /// Drops every lapsed lease; returns how many it dropped.
    ///
    /// Lapsed leases are already invisible; this only gives their memory back.
    /// Each shard is locked in turn, so lookups elsewhere carry on meanwhile.
    pub fn purge_expired(&self) -> usize {
        let now = self.clock.now();
        self.leases
            .shards
            .iter()
            .map(|shard| {
                let leases = &mut write(shard).leases;
                let before = leases.len();
                leases.retain(|_, lease| lease.is_live(now));
                before - leases.len()
            })
            .sum()
    }

    fn claim_now(&self, device: &DeviceId, supervisor: &SupervisorId, ttl: Duration) -> Claim {
        let now = self.clock.now();
        let key = self.leases.key(device);
        let previous = write(self.leases.shard(&key)).claim(key, supervisor, now.saturating_add(ttl), now);
        match previous {
            None => Claim::Acquired,
            Some(previous) if previous == *supervisor => Claim::Renewed,
            Some(previous) => Claim::TakenOver { previous },
        }
    }

    fn renew_now(&self, supervisor: &SupervisorId, devices: &[DeviceId], ttl: Duration) -> Vec<DeviceId> {
        let now = self.clock.now();
        let expires_at = now.saturating_add(ttl);
        // One lock per device rather than per shard: a supervisor renews tens
        // of thousands at once, and lookups must not wait behind all of them.
        devices
            .iter()
            .filter(|device| {
                let key = self.leases.key(device);
                !write(self.leases.shard(&key)).renew(&key, supervisor, expires_at, now)
            })
            .copied()
            .collect()
    }

    fn release_now(&self, device: &DeviceId, supervisor: &SupervisorId) -> bool {
        let now = self.clock.now();
        let key = self.leases.key(device);
        write(self.leases.shard(&key)).release(&key, supervisor, now)
    }

    fn lookup_at(&self, device: &DeviceId, now: Timestamp) -> Option<SupervisorId> {
        let key = self.leases.key(device);
        read(self.leases.shard(&key)).owner(&key, now)
    }

    /// Applies `patch`, unless its fence or lease condition does not hold:
    /// then it changes nothing and returns what refused it.
    fn update_status_now(&self, device: &DeviceId, patch: &StatusPatch) -> Option<FencedOff> {
        // Held until the status is written, so no claim lands in between.
        let leases = patch.lease.map(|holder| {
            let key = self.leases.key(device);
            (holder, key, read(self.leases.shard(&key)))
        });
        if let Some((holder, key, shard)) = &leases {
            let owner = shard.owner(key, self.clock.now());
            if owner != Some(*holder) {
                return Some(FencedOff::Named {
                    fence: *holder,
                    named: owner,
                });
            }
        }
        let mut shard = self.statuses.write(device);
        if let Some(fence) = patch.fence {
            let Some(status) = shard.get(device) else {
                return Some(FencedOff::Missing);
            };
            if status.supervisor != Some(fence) {
                return Some(FencedOff::Named {
                    fence,
                    named: status.supervisor,
                });
            }
        }
        let status = shard
            .entry(*device)
            .or_insert_with(|| Box::new(DeviceStatus::new(*device)));
        let before = online_under(status);
        status.apply(patch);
        let after = online_under(status);
        if before != after {
            write(&self.indexes).move_device(device, before, after);
        }
        drop(leases);
        None
    }
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for MemoryStore {
    // The maps may hold a million devices: show the shape, not the contents.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryStore")
            .field("clock", &self.clock)
            .field("shards", &SHARDS)
            .finish_non_exhaustive()
    }
}

#[async_trait]
impl RoutingStore for MemoryStore {
    async fn claim(&self, device: &DeviceId, supervisor: &SupervisorId, ttl: Duration) -> Result<Claim> {
        validate_ttl(ttl)?;
        Ok(self.claim_now(device, supervisor, ttl))
    }

    async fn renew(&self, supervisor: &SupervisorId, devices: &[DeviceId], ttl: Duration) -> Result<Vec<DeviceId>> {
        validate_ttl(ttl)?;
        Ok(self.renew_now(supervisor, devices, ttl))
    }

    async fn release(&self, device: &DeviceId, supervisor: &SupervisorId) -> Result<bool> {
        Ok(self.release_now(device, supervisor))
    }

    async fn lookup(&self, device: &DeviceId) -> Result<Option<SupervisorId>> {
        Ok(self.lookup_at(device, self.clock.now()))
    }

    async fn lookup_many(&self, devices: &[DeviceId]) -> Result<Vec<Option<SupervisorId>>> {
        let now = self.clock.now();
        Ok(devices.iter().map(|device| self.lookup_at(device, now)).collect())
    }
}

#[async_trait]
impl StatusStore for MemoryStore {
    async fn update_status(&self, device: &DeviceId, patch: &StatusPatch) -> Result<()> {
        patch.check_conditions(device)?;
        match self.update_status_now(device, patch) {
            None => Ok(()),
            Some(FencedOff::Named { fence, named }) => Err(Error::not_owner(*device, fence, named)),
            Some(FencedOff::Missing) => Err(Error::status_not_found(*device)),
        }
    }

    async fn status(&self, device: &DeviceId) -> Result<Option<DeviceStatus>> {
        Ok(self.statuses.read(device).get(device).map(|status| (**status).clone()))
    }

    async fn online_devices(&self, page: &PageRequest) -> Result<Page<DeviceId>> {
        page_of(&read(&self.indexes).online, page)
    }

    async fn devices(&self, page: &PageRequest) -> Result<Page<DeviceId>> {
        page_of(&read(&self.indexes).known, page)
    }

    async fn supervisor_devices(&self, supervisor: &SupervisorId, page: &PageRequest) -> Result<Page<DeviceId>> {
        let indexes = read(&self.indexes);
        match indexes.by_supervisor.get(supervisor) {
            Some(devices) => page_of(devices, page),
            None => Ok(Page {
                items: Vec::new(),
                next: None,
            }),
        }
    }

    async fn device_counts(&self) -> Result<Vec<SupervisorLoad>> {
        Ok(read(&self.indexes)
            .by_supervisor
            .iter()
            .map(|(supervisor, devices)| SupervisorLoad {
                supervisor: *supervisor,
                devices: devices.len() as u64,
            })
            .collect())
    }
}

#[async_trait]
impl ConfigStore for MemoryStore {
    async fn put_template(&self, template: &ConfigTemplate) -> Result<()> {
        if write(&self.configs).put(template) {
            Ok(())
        } else {
            Err(Error::already_exists(format!(
                "config template {} with other content",
                template.reference()
            )))
        }
    }

    async fn template(&self, config: &ConfigRef) -> Result<Option<ConfigTemplate>> {
        Ok(read(&self.configs).templates.get(config).cloned())
    }

    async fn template_versions(&self, agent_type: &AgentType) -> Result<Vec<ConfigVersion>> {
        Ok(read(&self.configs)
            .versions
            .get(agent_type)
            .cloned()
            .unwrap_or_default())
    }

    async fn set_latest(&self, config: &ConfigRef) -> Result<()> {
        let mut configs = write(&self.configs);
        if !configs.templates.contains_key(config) {
            return Err(Error::not_found(format!(
                "config template {config}, to be the latest of {}",
                config.agent_type
            )));
        }
        configs.latest.insert(config.agent_type, config.version);
        Ok(())
    }

    async fn latest(&self, agent_type: &AgentType) -> Result<Option<ConfigVersion>> {
        Ok(read(&self.configs).latest.get(agent_type).copied())
    }

    async fn set_desired(&self, device: &DeviceId, config: &ConfigRef) -> Result<()> {
        // Templates are never deleted, so one seen stored here stays stored.
        if !read(&self.configs).templates.contains_key(config) {
            return Err(Error::not_found(format!(
                "config template {config}, to be the desired config of device {device}"
            )));
        }
        self.desired.write(device).insert(*device, *config);
        Ok(())
    }

    async fn desired(&self, device: &DeviceId) -> Result<Option<ConfigRef>> {
        Ok(self.desired.read(device).get(device).copied())
    }

    async fn clear_desired(&self, device: &DeviceId) -> Result<bool> {
        Ok(self.desired.write(device).remove(device).is_some())
    }
}

/// The leases, sharded by a keyed hash of the device id computed once per
/// operation: it picks the shard and is the shard map's hash.
struct LeaseTable {
    hasher: RandomState,
    shards: Box<[RwLock<LeaseShard>]>,
}

impl LeaseTable {
    fn new() -> Self {
        LeaseTable {
            hasher: RandomState::new(),
            shards: (0..SHARDS).map(|_| RwLock::default()).collect(),
        }
    }

    fn key(&self, device: &DeviceId) -> Key {
        Key {
            hash: self.hasher.hash_one(device),
            device: *device,
        }
    }

    fn shard(&self, key: &Key) -> &RwLock<LeaseShard> {
        // Bits the shard maps leave alone: they take buckets from the low bits
        // and a tag from the top seven.
        &self.shards[(key.hash >> 40) as usize & (SHARDS - 1)]
    }
}

/// One shard of the leases.
#[derive(Default)]
struct LeaseShard {
    leases: HashMap<Key, Lease, BuildHasherDefault<KeyHasher>>,
    // Owners are indexes into this list, so a lease takes 16 bytes rather
    // than 80, and a lookup finds its owner without leaving the shard's lock.
    // It holds every supervisor that ever held a lease here: a fleet's worth.
    supervisors: Vec<SupervisorId>,
    supervisor_numbers: HashMap<SupervisorId, u32>,
}

impl LeaseShard {
    fn owner(&self, key: &Key, now: Timestamp) -> Option<SupervisorId> {
        self.leases
            .get(key)
            .filter(|lease| lease.is_live(now))
            .and_then(|lease| self.supervisor(lease.owner))
    }

    /// Gives the lease to `supervisor`; returns whom it had, if anyone.
    fn claim(
        &mut self,
        key: Key,
        supervisor: &SupervisorId,
        expires_at: Timestamp,
        now: Timestamp,
    ) -> Option<SupervisorId> {
        let owner = self.number(supervisor);
        self.leases
            .insert(key, Lease { owner, expires_at })
            .filter(|old| old.is_live(now))
            .and_then(|old| self.supervisor(old.owner))
    }

    /// Extends the lease if `supervisor` holds it; returns whether it does.
    fn renew(&mut self, key: &Key, supervisor: &SupervisorId, expires_at: Timestamp, now: Timestamp) -> bool {
        let owner = self.supervisor_numbers.get(supervisor).copied();
        match self.leases.get_mut(key) {
            Some(lease) if !lease.is_live(now) => {
                self.leases.remove(key);
                false
            }
            Some(lease) if Some(lease.owner) == owner => {
                lease.expires_at = expires_at;
                true
            }
            Some(_) | None => false,
        }
    }

    /// Drops the lease if `supervisor` holds it; returns whether it did.
    fn release(&mut self, key: &Key, supervisor: &SupervisorId, now: Timestamp) -> bool {
        let owner = self.supervisor_numbers.get(supervisor).copied();
        let Some(lease) = self.leases.get(key) else {
            return false;
        };
        let owned = lease.is_live(now) && Some(lease.owner) == owner;
        // A lapsed lease goes too: it is only taking up memory.
        if owned || !lease.is_live(now) {
            self.leases.remove(key);
        }
        owned
    }

    fn number(&mut self, supervisor: &SupervisorId) -> u32 {
        if let Some(number) = self.supervisor_numbers.get(supervisor) {
            return *number;
        }
        // Four billion supervisors would need 260 GB for their names alone.
        let number = self.supervisors.len() as u32;
        self.supervisors.push(*supervisor);
        self.supervisor_numbers.insert(*supervisor, number);
        number
    }

    fn supervisor(&self, number: u32) -> Option<SupervisorId> {
        self.supervisors.get(number as usize).copied()
    }
}

/// Who holds a device (a number in its shard's supervisor list), or drives
/// a rollout (its driver's name), and until when.
#[derive(Debug, Clone, Copy)]
struct Lease<O = u32> {
    owner: O,
    expires_at: Timestamp,
}

impl<O> Lease<O> {
    /// A lease lapses at its expiry time, not after it.
    fn is_live(&self, now: Timestamp) -> bool {
        now < self.expires_at
    }
}

/// A device id with its keyed hash, so the id is hashed once per operation.
#[derive(Clone, Copy)]
struct Key {
    hash: u64,
    device: DeviceId,
}

impl PartialEq for Key {
    fn eq(&self, other: &Self) -> bool {
        self.hash == other.hash && self.device == other.device
    }
}

impl Eq for Key {}

impl Hash for Key {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write_u64(self.hash);
    }
}

/// Hands a [`Key`]'s hash, already keyed and mixed, straight to the map.
#[derive(Default)]
struct KeyHasher(u64);

impl Hasher for KeyHasher {
    fn write(&mut self, bytes: &[u8]) {
        // Only reached if something other than a `Key` is hashed: fold it in (FNV-1a).
        for byte in bytes {
            self.0 = (self.0 ^ u64::from(*byte)).wrapping_mul(0x0100_0000_01b3);
        }
    }

    fn write_u64(&mut self, hash: u64) {
        self.0 = hash;
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

/// A map split into [`SHARDS`] independently locked parts (per device, or
/// per command). Besides letting writers of different keys proceed at once,
/// it keeps each part small: a part that grows rehashes only its own
/// entries, under its own lock, so a growing map never stalls every caller
/// at once while it moves all of its entries.
struct Sharded<K, V> {
    // Picks the shard. Each shard's map has its own keys, so the keys of
    // one shard are not crowded into a few of its buckets.
    selector: RandomState,
    shards: Box<[RwLock<HashMap<K, V>>]>,
}

impl<K: Hash + Eq, V> Sharded<K, V> {
    fn new() -> Self {
        Sharded {
            selector: RandomState::new(),
            shards: (0..SHARDS).map(|_| RwLock::new(HashMap::new())).collect(),
        }
    }

    fn shard(&self, key: &K) -> &RwLock<HashMap<K, V>> {
        let hash = self.selector.hash_one(key);
        // The top bits are the best mixed; SHARDS is a power of two.
        &self.shards[(hash >> (u64::BITS - SHARDS.trailing_zeros())) as usize]
    }

    fn clear(&self) {
        for shard in self.shards.iter() {
            write(shard).clear();
        }
    }

    fn read(&self, key: &K) -> RwLockReadGuard<'_, HashMap<K, V>> {
        read(self.shard(key))
    }

    fn write(&self, key: &K) -> RwLockWriteGuard<'_, HashMap<K, V>> {
        write(self.shard(key))
    }
}

/// The online set and the per-supervisor sets, ordered so pages are stable.
#[derive(Default)]
struct Indexes {
    // Every device that has been online; statuses are never removed.
    known: BTreeSet<DeviceId>,
    online: BTreeSet<DeviceId>,
    // A supervisor is removed with its last device, so every set is non-empty.
    by_supervisor: HashMap<SupervisorId, BTreeSet<DeviceId>>,
}

impl Indexes {
    /// Moves `device` from the sets for `from` to those for `to` (`None`: offline).
    fn move_device(&mut self, device: &DeviceId, from: Option<SupervisorId>, to: Option<SupervisorId>) {
        if let Some(supervisor) = from {
            self.online.remove(device);
            if let Some(devices) = self.by_supervisor.get_mut(&supervisor) {
                devices.remove(device);
                if devices.is_empty() {
                    self.by_supervisor.remove(&supervisor);
                }
            }
        }
        if let Some(supervisor) = to {
            self.known.insert(*device);
            self.online.insert(*device);
            self.by_supervisor.entry(supervisor).or_default().insert(*device);
        }
    }
}

/// Why a patch's fence or lease condition did not hold.
enum FencedOff {
    /// The status (or the lease) named another supervisor, or none.
    Named {
        fence: SupervisorId,
        named: Option<SupervisorId>,
    },
    /// There is no status to fence by.
    Missing,
}

/// The supervisor a status puts the device online under, if it is online.
fn online_under(status: &DeviceStatus) -> Option<SupervisorId> {
    status.supervisor.filter(|_| status.is_online())
}

/// One page of `set`, keyed on the device id: the cursor is the last id
/// returned, so inserts and removals elsewhere in the set never shift a page.
///
/// A cursor that is not a device id was not made here: an error naming it.
#[async_trait]
impl RevocationStore for MemoryStore {
    async fn revoke(&self, revocation: &Revocation) -> Result<bool> {
        match write(&self.revocations).entry(revocation.device) {
            std::collections::btree_map::Entry::Occupied(_) => Ok(false),
            std::collections::btree_map::Entry::Vacant(slot) => {
                slot.insert(revocation.clone());
                Ok(true)
            }
        }
    }

    async fn reinstate(&self, device: &DeviceId) -> Result<bool> {
        Ok(write(&self.revocations).remove(device).is_some())
    }

    async fn revocation(&self, device: &DeviceId) -> Result<Option<Revocation>> {
        Ok(read(&self.revocations).get(device).cloned())
    }

    async fn revocations(&self, page: &PageRequest) -> Result<Page<Revocation>> {
        let revocations = read(&self.revocations);
        page_from(
            page,
            |start| {
                revocations
                    .range((start, Bound::Unbounded))
                    .map(|(_, revoked)| revoked.clone())
            },
            |revoked| revoked.device,
        )
    }
}

fn page_of(set: &BTreeSet<DeviceId>, page: &PageRequest) -> Result<Page<DeviceId>> {
    page_from(
        page,
        |start| set.range((start, Bound::Unbounded)).copied(),
        |device| *device,
    )
}

/// A page of what `range` yields from a start bound on, in device order; `device` names each item's device.
fn page_from<T, I: Iterator<Item = T>>(
    page: &PageRequest,
    range: impl FnOnce(Bound<DeviceId>) -> I,
    device: impl Fn(&T) -> DeviceId,
) -> Result<Page<T>> {
    let limit = page.limit.clamp(1, PageRequest::MAX_LIMIT);
    let start = match &page.after {
        Some(cursor) => Bound::Excluded(DeviceId::new(cursor.as_str()).map_err(|err| {
            Error::invalid_input(format!("page cursor {:?} is not this store's: {err}", cursor.as_str()))
        })?),
        None => Bound::Unbounded,
    };
    let mut rest = range(start);
    let items: Vec<T> = rest.by_ref().take(limit).collect();
    let next = match (rest.next(), items.last()) {
        (Some(_), Some(last)) => Some(Cursor::new(device(last).as_str())),
        _ => None,
    };
    Ok(Page { items, next })
}

/// How long the memory store keeps a command's record after it was issued.
pub const DEFAULT_COMMAND_RETENTION: Duration = Duration::from_secs(24 * 3600);

/// The commands in order of issue (for retention) and the pending ones by
/// deadline, and rollouts by id. B-trees, not a hash map or a `VecDeque`: they
/// grow a node at a time, so a store taking thousands of commands a second
/// never stops to move all of them into a bigger table.
struct Tracking {
    retention: Duration,
    issued: BTreeSet<(Timestamp, CorrelationId)>,
    pending: BTreeSet<(Timestamp, CorrelationId)>,
    rollouts: BTreeMap<RolloutId, Rollout>,
    /// Who drives each rollout, and until when.
    drivers: HashMap<RolloutId, Lease<String>>,
    generation: Option<StoreGeneration>,
}

impl Tracking {
    fn new(retention: Duration) -> Self {
        Tracking {
            retention,
            issued: BTreeSet::new(),
            pending: BTreeSet::new(),
            rollouts: BTreeMap::new(),
            drivers: HashMap::new(),
            generation: None,
        }
    }

    /// Takes out of the issue order the commands issued more than
    /// `retention` before `now`, at most `limit` of them.
    fn take_old(&mut self, now: Timestamp, limit: usize) -> Vec<CorrelationId> {
        let mut old = Vec::new();
        while old.len() < limit {
            match self.issued.first() {
                Some(&(issued_at, id)) if now.duration_since(issued_at) > self.retention => {
                    self.issued.pop_first();
                    old.push(id);
                }
                _ => break,
            }
        }
        old
    }
}

impl MemoryStore {
    /// Tells every watch that `id` ended, forgetting the watches that are gone.
    fn tell_ended(&self, id: CorrelationId) {
        let mut endings = self.endings.lock().unwrap_or_else(PoisonError::into_inner);
        endings.retain(|watch| watch.tell(id));
    }

    /// Forgets a few of the records issued more than the retention before
    /// `now`: a few per new command, so forgetting keeps pace with issuing
    /// without a long pause when a backlog comes due at once.
    fn forget_old_commands(&self, now: Timestamp) {
        const AT_ONCE: usize = 4;
        let old = write(&self.tracking).take_old(now, AT_ONCE);
        for id in old {
            let mut shard = self.commands.write(&id);
            if let Some(record) = shard.remove(&id) {
                write(&self.tracking).pending.remove(&(record.command.deadline, id));
            }
        }
    }
}

#[async_trait]
impl TrackingStore for MemoryStore {
    async fn insert_command(&self, record: &CommandRecord) -> Result<()> {
        let now = self.clock.now();
        self.forget_old_commands(now);
        let id = record.correlation_id();
        let mut shard = self.commands.write(&id);
        match shard.entry(id) {
            Entry::Occupied(stored) => return record.inserted_again(Some(stored.get())),
            Entry::Vacant(slot) => {
                slot.insert(record.clone());
            }
        }
        let mut tracking = write(&self.tracking);
        if record.state == CommandState::Pending {
            tracking.pending.insert((record.command.deadline, id));
        }
        tracking.issued.insert((now, id));
        Ok(())
    }

    async fn update_command(&self, record: &CommandRecord) -> Result<bool> {
        let id = record.correlation_id();
        let mut shard = self.commands.write(&id);
        match shard.get_mut(&id) {
            None => Err(Error::not_found(format!("command {id}"))),
            Some(stored) if stored.state.is_final() => Ok(false),
            Some(stored) => {
                let mut tracking = write(&self.tracking);
                tracking.pending.remove(&(stored.command.deadline, id));
                if record.state == CommandState::Pending {
                    tracking.pending.insert((record.command.deadline, id));
                }
                *stored = record.clone();
                drop(tracking);
                drop(shard);
                if record.state.is_final() {
                    self.tell_ended(id);
                }
                Ok(true)
            }
        }
    }

    async fn overdue_commands(&self, before: Timestamp, limit: usize) -> Result<Vec<CorrelationId>> {
        let tracking = read(&self.tracking);
        Ok(tracking
            .pending
            .iter()
            .take_while(|(deadline, _)| *deadline <= before)
            .take(limit)
            .map(|&(_, id)| id)
            .collect())
    }

    async fn watch_endings(&self) -> Result<Endings> {
        let (sender, endings) = Endings::channel();
        self.endings.lock().unwrap_or_else(PoisonError::into_inner).push(sender);
        Ok(endings)
    }

    async fn command_record(&self, id: &CorrelationId) -> Result<Option<CommandRecord>> {
        Ok(self.commands.read(id).get(id).cloned())
    }

    async fn put_rollout(&self, rollout: &Rollout) -> Result<bool> {
        let mut tracking = write(&self.tracking);
        let stored = tracking
            .rollouts
            .get(&rollout.id)
            .map(|stored| stored.revision)
            .unwrap_or(0);
        if rollout.revision != stored + 1 {
            return Ok(false);
        }
        tracking.rollouts.insert(rollout.id, rollout.clone());
        Ok(true)
    }

    async fn rollout(&self, id: &RolloutId) -> Result<Option<Rollout>> {
        Ok(read(&self.tracking).rollouts.get(id).cloned())
    }

    async fn claim_rollout_driver(&self, id: &RolloutId, driver: &str, ttl: Duration) -> Result<bool> {
        validate_ttl(ttl)?;
        let now = self.clock.now();
        let mut tracking = write(&self.tracking);
        if let Some(held) = tracking.drivers.get(id)
            && held.is_live(now)
            && held.owner != driver
        {
            return Ok(false);
        }
        let lease = Lease {
            owner: driver.to_owned(),
            expires_at: now.saturating_add(ttl),
        };
        tracking.drivers.insert(*id, lease);
        Ok(true)
    }

    async fn release_rollout_driver(&self, id: &RolloutId, driver: &str) -> Result<bool> {
        let now = self.clock.now();
        let mut tracking = write(&self.tracking);
        let Some(held) = tracking.drivers.get(id) else {
            return Ok(false);
        };
        let live = held.is_live(now);
        if live && held.owner != driver {
            return Ok(false);
        }
        // A lapsed lease goes too, whoever held it: nobody holds it any more.
        tracking.drivers.remove(id);
        Ok(live)
    }

    async fn generation(&self) -> Result<Option<StoreGeneration>> {
        Ok(read(&self.tracking).generation.clone())
    }

    async fn begin_generation(&self, generation: &StoreGeneration) -> Result<StoreGeneration> {
        Ok(write(&self.tracking)
            .generation
            .get_or_insert_with(|| generation.clone())
            .clone())
    }

    async fn rollouts(&self, page: &PageRequest) -> Result<Page<RolloutId>> {
        let limit = page.limit.clamp(1, PageRequest::MAX_LIMIT);
        let end = match &page.after {
            Some(cursor) => Bound::Excluded(cursor.as_str().parse::<RolloutId>().map_err(|err| {
                Error::invalid_input(format!("page cursor {:?} is not this store's: {err}", cursor.as_str()))
            })?),
            None => Bound::Unbounded,
        };
        let tracking = read(&self.tracking);
        let mut rest = tracking
            .rollouts
            .range((Bound::Unbounded, end))
            .rev()
            .map(|(id, _)| *id);
        let items: Vec<RolloutId> = rest.by_ref().take(limit).collect();
        let next = match (rest.next(), items.last()) {
            (Some(_), Some(last)) => Some(Cursor::new(last.to_string())),
            _ => None,
        };
        Ok(Page { items, next })
    }
}

/// Templates, their versions in the order stored, and the `latest` pointers.
#[derive(Default)]
struct Configs {
    templates: HashMap<ConfigRef, ConfigTemplate>,
    versions: HashMap<AgentType, Vec<ConfigVersion>>,
    latest: HashMap<AgentType, ConfigVersion>,
}

impl Configs {
    /// Stores `template` unless its version is stored with other content;
    /// returns whether the version now holds this content.
    fn put(&mut self, template: &ConfigTemplate) -> bool {
        let reference = template.reference();
        match self.templates.entry(reference) {
            Entry::Occupied(stored) => stored.get().same_content(template),
            Entry::Vacant(slot) => {
                slot.insert(template.clone());
                self.versions
                    .entry(reference.agent_type)
                    .or_default()
                    .push(reference.version);
                true
            }
        }
    }
}

// Every write below leaves the maps consistent before anything that could
// panic, so a lock poisoned by a panicking thread still guards sound data.
fn read<T>(lock: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(PoisonError::into_inner)
}

fn write<T>(lock: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;
    use opamp_core::{Command, CommandKind, ManualClock, TrackingStore};

    fn device(n: usize) -> DeviceId {
        DeviceId::new(format!("d{n:04}")).unwrap()
    }

    fn pending(clock: &ManualClock, n: usize) -> CommandRecord {
        let kind = CommandKind::SetEmission { state: true };
        let command = Command::new(device(n), kind, clock.now(), Duration::from_secs(1));
        CommandRecord::new(command, Some(SupervisorId::new("s1").unwrap()), CommandState::Pending)
    }

    /// Records past the retention are forgotten a few per new command, and
    /// with them their place among the pending; younger ones stay.
    #[tokio::test]
    async fn command_records_are_forgotten_after_the_retention() {
        let clock = Arc::new(ManualClock::new(Timestamp::UNIX_EPOCH));
        let store = MemoryStore::with_clock(clock.clone()).with_command_retention(Duration::from_secs(60));
        let old: Vec<CommandRecord> = (0..10).map(|n| pending(&clock, n)).collect();
        for record in &old {
            store.insert_command(record).await.unwrap();
        }
        clock.advance(Duration::from_secs(30));
        let young = pending(&clock, 10);
        store.insert_command(&young).await.unwrap();
        clock.advance(Duration::from_secs(31));

        let later: Vec<CommandRecord> = (11..14).map(|n| pending(&clock, n)).collect();
        for record in &later {
            store.insert_command(record).await.unwrap();
        }
        for record in &old {
            assert_eq!(store.command_record(&record.correlation_id()).await.unwrap(), None);
        }
        let overdue = store.overdue_commands(clock.now(), 100).await.unwrap();
        assert_eq!(
            overdue,
            vec![young.correlation_id()],
            "only the young one is still pending"
        );
        for record in later.iter().chain([&young]) {
            assert!(store.command_record(&record.correlation_id()).await.unwrap().is_some());
        }
    }

    #[test]
    fn pages_end_without_a_dangling_cursor() {
        let set: BTreeSet<DeviceId> = (0..4).map(device).collect();
        let first = page_of(&set, &PageRequest::first(2)).unwrap();
        assert_eq!(first.items, vec![device(0), device(1)]);
        let cursor = first.next.expect("two more devices follow");
        let second = page_of(&set, &PageRequest::after(cursor, 2)).unwrap();
        assert_eq!(second.items, vec![device(2), device(3)]);
        assert_eq!(second.next, None, "an exactly full last page has no cursor");
    }

    #[test]
    fn a_cursor_for_a_removed_device_still_resumes() {
        let mut set: BTreeSet<DeviceId> = (0..4).map(device).collect();
        set.remove(&device(1));
        let page = page_of(&set, &PageRequest::after(Cursor::new(device(1).as_str()), 10)).unwrap();
        assert_eq!(page.items, vec![device(2), device(3)]);
    }

    #[test]
    fn a_foreign_cursor_is_an_error_naming_it() {
        let set: BTreeSet<DeviceId> = (0..4).map(device).collect();
        let err = page_of(&set, &PageRequest::after(Cursor::new("not a device"), 10)).unwrap_err();
        assert!(err.to_string().contains("page cursor \"not a device\""), "{err}");
    }

    #[test]
    fn shards_are_all_used() {
        let (leases, sharded) = (LeaseTable::new(), Sharded::<DeviceId, ()>::new());
        let (s1, now) = (SupervisorId::new("s1").unwrap(), Timestamp::UNIX_EPOCH);
        for n in 0..10_000 {
            let key = leases.key(&device(n));
            write(leases.shard(&key)).claim(key, &s1, now.saturating_add(Duration::from_secs(1)), now);
            sharded.write(&device(n)).insert(device(n), ());
        }
        assert!(leases.shards.iter().all(|shard| !read(shard).leases.is_empty()));
        assert!(sharded.shards.iter().all(|shard| !read(shard).is_empty()));
    }

    #[test]
    fn a_lease_shard_names_each_supervisor_once() {
        let table = LeaseTable::new();
        let (s1, s2, now) = (
            SupervisorId::new("s1").unwrap(),
            SupervisorId::new("s2").unwrap(),
            Timestamp::UNIX_EPOCH,
        );
        let later = now.saturating_add(Duration::from_secs(1));
        let key = table.key(&device(1));
        let mut shard = write(table.shard(&key));
        for owner in [s1, s2, s1, s2] {
            shard.claim(key, &owner, later, now);
        }
        assert_eq!(shard.supervisors, vec![s1, s2]);
        assert_eq!(shard.owner(&key, now), Some(s2));
    }
}
