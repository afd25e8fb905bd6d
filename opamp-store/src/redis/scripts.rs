//! The Lua scripts: each touches the keys of one slot only (one device's,
//! one supervisor's or one agent type's), so each is atomic on Redis Cluster too.

use redis::{Cmd, Script, ToRedisArgs};

/// Whether the lease at `key` is held at `now`: the key exists and its
/// expiry time, less `margin`, is after `now` (a key without expiry is held).
/// `margin` is 0 unless the store judges leases by its own clock (see
/// `RedisStoreConfig::custom_clock_margin`).
const LEASE_HELD: &str = r"
local function held(key, now, margin)
  local expires = redis.call('PEXPIRETIME', key)
  return expires == -1 or (expires >= 0 and expires - margin > now)
end
";

/// Takes the lease. KEYS: lease. ARGV: supervisor, now, expire-at, margin.
/// Returns the previous holder if its lease was held, else nil.
const CLAIM: &str = r"
local previous = redis.call('GET', KEYS[1])
local was_held = previous and held(KEYS[1], tonumber(ARGV[2]), tonumber(ARGV[4]))
redis.call('SET', KEYS[1], ARGV[1], 'PXAT', ARGV[3])
if was_held then return previous end
return false
";

/// Extends the lease if the supervisor holds it. KEYS: lease. ARGV:
/// supervisor, now, expire-at, margin. Returns 1 if extended.
const RENEW: &str = r"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if not held(KEYS[1], tonumber(ARGV[2]), tonumber(ARGV[4])) then
  redis.call('DEL', KEYS[1])
  return 0
end
redis.call('PEXPIREAT', KEYS[1], ARGV[3])
return 1
";

/// Drops the lease if the supervisor (or a rollout's driver) holds it, and a
/// lapsed one whoever held it. KEYS: lease. ARGV: holder, now, margin.
/// Returns 1 if released.
const RELEASE: &str = r"
local owner = redis.call('GET', KEYS[1])
if not owner then return 0 end
local live = held(KEYS[1], tonumber(ARGV[2]), tonumber(ARGV[3]))
if live and owner ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
if live then return 1 end
return 0
";

/// Takes or renews a rollout's driver lease unless another driver's is held.
/// KEYS: lease. ARGV: driver, now, expire-at, margin. Returns 1 if the driver
/// holds it now, else 0.
const CLAIM_DRIVER: &str = r"
local holder = redis.call('GET', KEYS[1])
if holder and holder ~= ARGV[1] and held(KEYS[1], tonumber(ARGV[2]), tonumber(ARGV[4])) then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PXAT', ARGV[3])
return 1
";

/// The holder, judged by the store's clock. KEYS: lease. ARGV: now, margin.
const LOOKUP: &str = r"
local owner = redis.call('GET', KEYS[1])
if owner and held(KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2])) then return owner end
return false
";

/// The supervisor whose indexes should hold the device: its own while online, else none ('').
const INDEX_TARGET: &str = r"
local function index_target(key)
  if redis.call('HGET', key, 'status') == 'online' then
    return redis.call('HGET', key, 'supervisor') or ''
  end
  return ''
end
";

/// Applies a status patch. KEYS: status hash, index lock, lease. ARGV: fence
/// ('' for none), lease holder the patch is conditional on ('' for none),
/// now, margin, lock token, lock ms, n, then n field/value pairs to set, then
/// the fields to delete.
///
/// Returns `{'missing'}` (fenced, and there is no status: nothing changed),
/// `{'fenced', named}` (nothing changed), `{'unleased', holder}` (the lease
/// is not the patch's supervisor's: nothing changed), `{'ok'}` (the indexes need
/// nothing from this caller), or `{'sync', before, target}`: the device must
/// move from the indexes of `before` to those of `target`, and the caller now
/// holds the index lock to do it. While the lock is free the indexes agree
/// with the hash, so `before` is where they hold the device; while another
/// writer holds it, that writer's last step sees this change, so the caller
/// leaves it to that writer.
const UPDATE_STATUS: &str = r"
local key, lock = KEYS[1], KEYS[2]
local fence, holder = ARGV[1], ARGV[2]
if holder ~= '' then
  local owner = redis.call('GET', KEYS[3])
  if not (owner and held(KEYS[3], tonumber(ARGV[3]), tonumber(ARGV[4]))) then owner = '' end
  if owner ~= holder then return {'unleased', owner} end
end
if fence ~= '' then
  if redis.call('EXISTS', key) == 0 then return {'missing'} end
  local named = redis.call('HGET', key, 'supervisor')
  if named ~= fence then return {'fenced', named or ''} end
end
local before = index_target(key)
if redis.call('EXISTS', key) == 0 then
  redis.call('HSET', key, 'status', 'offline', 'emission', 'false')
end
local n = tonumber(ARGV[7])
local at = 8
if n > 0 then
  redis.call('HSET', key, unpack(ARGV, at, at + 2 * n - 1))
  at = at + 2 * n
end
if at <= #ARGV then
  redis.call('HDEL', key, unpack(ARGV, at, #ARGV))
end
local target = index_target(key)
if target == before then return {'ok'} end
if redis.call('SET', lock, ARGV[5], 'NX', 'PX', ARGV[6]) then
  return {'sync', before, target}
end
return {'ok'}
";

/// Takes the index lock to bring a device's indexes in step (reconciliation).
/// KEYS: status hash, index lock. ARGV: token, lock ms. Returns `{'busy'}` or
/// `{'sync', target}`.
const INDEX_BEGIN: &str = r"
if not redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then return {'busy'} end
return {'sync', index_target(KEYS[1])}
";

/// Lets the index lock go once the indexes hold the device where the status
/// still says (`applied`). KEYS: status hash, index lock. ARGV: applied,
/// token, lock ms. Returns `{'done'}`, `{'lost'}` (the lock lapsed and
/// another writer has it) or `{'again', target}` (the status moved on
/// meanwhile; the lock is kept).
const INDEX_DONE: &str = r"
local key, lock = KEYS[1], KEYS[2]
if redis.call('GET', lock) ~= ARGV[2] then return {'lost'} end
local target = index_target(key)
if target == ARGV[1] then
  redis.call('DEL', lock)
  return {'done'}
end
redis.call('PEXPIRE', lock, ARGV[3])
return {'again', target}
";

/// Lets the index lock go if the token still holds it. KEYS: lock. ARGV: token.
const INDEX_ABANDON: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
return 1
";

/// Adds a device to a supervisor's set, counting it. KEYS: set, count. ARGV: device.
const SUPERVISOR_ADD: &str = r"
if redis.call('SADD', KEYS[1], ARGV[1]) == 1 then redis.call('INCR', KEYS[2]) end
return 1
";

/// Removes a device from a supervisor's set, counting it. KEYS: set, count. ARGV: device.
const SUPERVISOR_REMOVE: &str = r"
if redis.call('SREM', KEYS[1], ARGV[1]) == 1 then
  if redis.call('DECR', KEYS[2]) <= 0 then redis.call('DEL', KEYS[2]) end
end
return 1
";

/// Sets a supervisor's count to its set's size. KEYS: set, count. Returns the size.
const SUPERVISOR_RECOUNT: &str = r"
local size = redis.call('SCARD', KEYS[1])
if size == 0 then redis.call('DEL', KEYS[2]) else redis.call('SET', KEYS[2], size) end
return size
";

/// Stores a template version unless it exists. KEYS: template, version list.
/// ARGV: JSON, version. Returns nil if stored, else what is stored.
const PUT_TEMPLATE: &str = r"
if redis.call('SET', KEYS[1], ARGV[1], 'NX') then
  redis.call('RPUSH', KEYS[2], ARGV[2])
  return false
end
return redis.call('GET', KEYS[1])
";

/// Points `latest` at a stored version. KEYS: template, latest. ARGV:
/// version. Returns 0 if the template is not stored.
const SET_LATEST: &str = r"
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('SET', KEYS[2], ARGV[1])
return 1
";

/// Replaces a command's record while the stored one is pending, keeping its
/// expiry, and announces it on a channel if the new record ends it. KEYS:
/// record. ARGV: the new JSON, the channel (empty if the command goes on),
/// the message. Returns -1 if there is no record, 0 if it has ended, 1 if
/// replaced.
const UPDATE_COMMAND: &str = r"
local stored = redis.call('GET', KEYS[1])
if not stored then return -1 end
if cjson.decode(stored)['state'] ~= 'pending' then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'KEEPTTL')
if ARGV[2] ~= '' then redis.call('PUBLISH', ARGV[2], ARGV[3]) end
return 1
";

/// Writes a rollout on top of the revision before it and indexes it. KEYS:
/// rollout, index. ARGV: JSON, revision, id. Returns 1 if written, else 0.
const PUT_ROLLOUT: &str = r"
local stored = redis.call('GET', KEYS[1])
local revision = 0
if stored then revision = tonumber(cjson.decode(stored)['revision']) end
if tonumber(ARGV[2]) ~= revision + 1 then return 0 end
redis.call('SET', KEYS[1], ARGV[1])
redis.call('ZADD', KEYS[2], 0, ARGV[3])
return 1
";

/// Every script the store runs, loaded once per connection (and again when
/// Redis restarted and forgot them).
#[derive(Debug)]
pub(super) struct Scripts {
    pub(super) claim: Script,
    pub(super) renew: Script,
    pub(super) release: Script,
    pub(super) lookup: Script,
    pub(super) update_status: Script,
    pub(super) index_begin: Script,
    pub(super) index_done: Script,
    pub(super) index_abandon: Script,
    pub(super) supervisor_add: Script,
    pub(super) supervisor_remove: Script,
    pub(super) supervisor_recount: Script,
    pub(super) put_template: Script,
    pub(super) set_latest: Script,
    pub(super) update_command: Script,
    pub(super) put_rollout: Script,
    pub(super) claim_driver: Script,
}

impl Scripts {
    pub(super) fn new() -> Self {
        let lease = |body: &str| Script::new(&format!("{LEASE_HELD}{body}"));
        let indexing = |body: &str| Script::new(&format!("{INDEX_TARGET}{body}"));
        Scripts {
            claim: lease(CLAIM),
            renew: lease(RENEW),
            release: lease(RELEASE),
            lookup: lease(LOOKUP),
            update_status: Script::new(&format!("{LEASE_HELD}{INDEX_TARGET}{UPDATE_STATUS}")),
            index_begin: indexing(INDEX_BEGIN),
            index_done: indexing(INDEX_DONE),
            index_abandon: Script::new(INDEX_ABANDON),
            supervisor_add: Script::new(SUPERVISOR_ADD),
            supervisor_remove: Script::new(SUPERVISOR_REMOVE),
            supervisor_recount: Script::new(SUPERVISOR_RECOUNT),
            put_template: Script::new(PUT_TEMPLATE),
            set_latest: Script::new(SET_LATEST),
            update_command: Script::new(UPDATE_COMMAND),
            put_rollout: Script::new(PUT_ROLLOUT),
            claim_driver: lease(CLAIM_DRIVER),
        }
    }

    pub(super) fn all(&self) -> [&Script; 16] {
        [
            &self.claim,
            &self.renew,
            &self.release,
            &self.lookup,
            &self.update_status,
            &self.index_begin,
            &self.index_done,
            &self.index_abandon,
            &self.supervisor_add,
            &self.supervisor_remove,
            &self.supervisor_recount,
            &self.put_template,
            &self.set_latest,
            &self.update_command,
            &self.put_rollout,
            &self.claim_driver,
        ]
    }
}

/// `EVALSHA` of `script` over `keys` with `args`.
pub(super) fn eval(script: &Script, keys: &[&str], args: impl ToRedisArgs) -> Cmd {
    let mut cmd = redis::cmd("EVALSHA");
    cmd.arg(script.get_hash()).arg(keys.len()).arg(keys).arg(args);
    cmd
}
