//! What control planes track, in PostgreSQL: a command's record is its row in
//! `command_audit` (the audit log and the tracking are one table), and
//! rollouts are JSON documents in `rollout`. Each command that ends is
//! announced with `NOTIFY` on the channel `opamp_commands_ended`, its payload
//! the store's schema and the correlation id (`opamp 5f0c…`). Who drives a
//! rollout is a lease in `rollout_driver`, as a device's is in `device_lease`.

use std::time::Duration;

use async_trait::async_trait;
use opamp_core::store::validate_ttl;
use opamp_core::tracking::CommandState;
use opamp_core::{
    Command, CommandRecord, CorrelationId, Cursor, Endings, EndingsSender, Error, Page, PageRequest, Result, Rollout,
    RolloutId, StoreGeneration, SupervisorId, Timestamp, TrackingStore,
};
use sqlx::postgres::PgListener;

use super::PostgresStore;
use super::error::PgError;
use super::rows::{RowReader, sql_time};

const INSERT: &str = "\
INSERT INTO command_audit (device_id, supervisor_id, command_type, payload, correlation_id, status,
    error_message, created_at, completed_at, attempts, initiated_by, deadline)
VALUES ($1, $2, $3, $4::jsonb, $5, $6, $7, $8, $9, $10, $11, $12)
ON CONFLICT (correlation_id) DO NOTHING";

/// The update, and the announcement (`$9` on the channel `$10`, [`ENDED`])
/// if it ends the command, in one statement: the filter keeps `pg_notify` from
/// running for a row that stays pending.
const UPDATE: &str = "\
WITH updated AS (
    UPDATE command_audit SET supervisor_id = $2, payload = $3::jsonb, status = $4, error_message = $5,
        completed_at = $6, attempts = $7, deadline = $8
    WHERE correlation_id = $1 AND status = 'pending'
    RETURNING status
)
SELECT count(*), count(pg_notify($10, $9)) FILTER (WHERE status <> 'pending')
FROM updated";

/// The channel on which ends are announced (for every schema; the payload
/// names it).
const ENDED: &str = "opamp_commands_ended";

const OVERDUE: &str = "\
SELECT correlation_id FROM command_audit WHERE status = 'pending' AND deadline <= $1
ORDER BY deadline, correlation_id LIMIT $2";

const RECORD: &str = "\
SELECT id, supervisor_id, payload::text AS payload, status, error_message, completed_at, attempts, initiated_by
FROM command_audit WHERE correlation_id = $1";

const PUT_ROLLOUT: &str = "\
INSERT INTO rollout AS r (id, revision, body, created_at) VALUES ($1::uuid, $2, $3::jsonb, $4)
ON CONFLICT (id) DO UPDATE SET revision = EXCLUDED.revision, body = EXCLUDED.body
WHERE r.revision = EXCLUDED.revision - 1";

const ROLLOUT: &str = "SELECT body::text FROM rollout WHERE id = $1::uuid";

const ROLLOUTS: &str = "\
SELECT id::text FROM rollout WHERE ($1::uuid IS NULL OR id < $1::uuid) ORDER BY id DESC LIMIT $2";

/// Takes or renews a rollout's driver lease (`$2` until `$3`) unless another
/// driver's is live at `$4`; a row comes back if `$2` holds it now.
const CLAIM_DRIVER: &str = "\
INSERT INTO rollout_driver AS d (rollout_id, driver, expires_at) VALUES ($1::uuid, $2, $3)
ON CONFLICT (rollout_id) DO UPDATE SET driver = EXCLUDED.driver, expires_at = EXCLUDED.expires_at
WHERE d.driver = EXCLUDED.driver OR d.expires_at <= $4
RETURNING 1";

const RELEASE_DRIVER: &str = "\
DELETE FROM rollout_driver WHERE rollout_id = $1::uuid AND driver = $2 AND expires_at > $3";

const GENERATION: &str = "SELECT body::text FROM store_generation";

const BEGIN_GENERATION: &str = "\
INSERT INTO store_generation (body) VALUES ($1::jsonb) ON CONFLICT (singleton) DO NOTHING";

/// The columns that vary with a record: payload, status, error message, completion time.
struct Columns {
    payload: String,
    status: &'static str,
    completed_at: Option<time::OffsetDateTime>,
}

impl Columns {
    fn of(record: &CommandRecord) -> Result<Self> {
        let id = record.correlation_id();
        Ok(Columns {
            payload: String::from_utf8(record.command.to_json())
                .map_err(|err| Error::invalid_input(format!("command {id} as JSON: {err}")))?,
            status: record.state.as_str(),
            completed_at: record.completed_at.map(sql_time).transpose()?,
        })
    }
}

fn attempts(record: &CommandRecord) -> i16 {
    i16::try_from(record.attempts).unwrap_or(i16::MAX)
}

#[async_trait]
impl TrackingStore for PostgresStore {
    async fn insert_command(&self, record: &CommandRecord) -> Result<()> {
        let id = record.correlation_id();
        let columns = Columns::of(record)?;
        let done = sqlx::query(INSERT)
            .bind(record.device().as_str())
            .bind(record.supervisor.as_ref().map(SupervisorId::as_str))
            .bind(record.kind().wire_name())
            .bind(&columns.payload)
            .bind(id.to_string())
            .bind(columns.status)
            .bind(record.reason.as_deref())
            .bind(sql_time(record.command.issued_at)?)
            .bind(columns.completed_at)
            .bind(attempts(record))
            .bind(record.initiated_by.as_deref())
            .bind(sql_time(record.command.deadline)?)
            .execute(&self.db)
            .await
            .map_err(PgError::query(|| format!("recording command {id}")))?;
        if done.rows_affected() == 1 {
            Ok(())
        } else {
            record.inserted_again(self.command_record(&id).await?.as_ref())
        }
    }

    async fn update_command(&self, record: &CommandRecord) -> Result<bool> {
        let id = record.correlation_id();
        let columns = Columns::of(record)?;
        let doing = || format!("updating the record of command {id}");
        let (updated, _announced): (i64, i64) = sqlx::query_as(UPDATE)
            .bind(id.to_string())
            .bind(record.supervisor.as_ref().map(SupervisorId::as_str))
            .bind(&columns.payload)
            .bind(columns.status)
            .bind(record.reason.as_deref())
            .bind(columns.completed_at)
            .bind(attempts(record))
            .bind(sql_time(record.command.deadline)?)
            .bind(format!("{} {id}", self.schema))
            .bind(ENDED)
            .fetch_one(&self.db)
            .await
            .map_err(PgError::query(doing))?;
        self.changed_if_recorded(updated.unsigned_abs(), &id, doing).await
    }

    async fn watch_endings(&self) -> Result<Endings> {
        let listener = listen(self.db.pool()).await?;
        let (sender, endings) = Endings::channel();
        let relay = Relay {
            pool: self.db.pool().clone(),
            deadline: self.db.timeout(),
            prefix: format!("{} ", self.schema),
        };
        tokio::spawn(relay.run(listener, sender));
        Ok(endings)
    }

    async fn overdue_commands(&self, before: Timestamp, limit: usize) -> Result<Vec<CorrelationId>> {
        let rows = sqlx::query(OVERDUE)
            .bind(sql_time(before)?)
            .bind(i64::try_from(limit).unwrap_or(i64::MAX))
            .fetch_all(&self.db)
            .await
            .map_err(PgError::query(|| "listing overdue commands".to_owned()))?;
        rows.iter()
            .map(|row| {
                RowReader::new(row, &|| "command_audit row of an overdue command".to_owned())
                    .parsed("correlation_id", str::parse::<CorrelationId>)
            })
            .collect()
    }

    async fn command_record(&self, id: &CorrelationId) -> Result<Option<CommandRecord>> {
        let row = sqlx::query(RECORD)
            .bind(id.to_string())
            .fetch_optional(&self.db)
            .await
            .map_err(PgError::query(|| format!("reading the record of command {id}")))?;
        let Some(row) = row else { return Ok(None) };
        let name = || format!("command_audit row of command {id}");
        let r = RowReader::new(&row, &name);
        let command = r.parsed("payload", |json| Command::from_json(json.as_bytes()))?;
        let mut record = CommandRecord::new(
            command,
            r.parsed_opt("supervisor_id", str::parse::<SupervisorId>)?,
            r.parsed("status", CommandState::parse)?,
        );
        record.attempts = u32::try_from(r.get::<i16>("attempts")?).unwrap_or(0);
        record.completed_at = r.time_opt("completed_at")?;
        record.reason = r.get("error_message")?;
        record.initiated_by = r.get("initiated_by")?;
        Ok(Some(record))
    }

    async fn put_rollout(&self, rollout: &Rollout) -> Result<bool> {
        let id = rollout.id;
        let body = String::from_utf8(rollout.to_json())
            .map_err(|err| Error::invalid_input(format!("rollout {id} as JSON: {err}")))?;
        let revision = i64::try_from(rollout.revision)
            .map_err(|_| Error::invalid_input(format!("rollout {id} revision {} is too large", rollout.revision)))?;
        if revision < 1 {
            return Ok(false);
        }
        // A first write (revision 1) inserts; a later one updates the row at the revision before.
        let done = sqlx::query(PUT_ROLLOUT)
            .bind(id.to_string())
            .bind(revision)
            .bind(body)
            .bind(sql_time(rollout.created_at)?)
            .execute(&self.db)
            .await
            .map_err(PgError::query(|| format!("writing rollout {id}")))?;
        Ok(done.rows_affected() == 1)
    }

    async fn rollout(&self, id: &RolloutId) -> Result<Option<Rollout>> {
        let body: Option<String> = sqlx::query_scalar(ROLLOUT)
            .bind(id.to_string())
            .fetch_optional(&self.db)
            .await
            .map_err(PgError::query(|| format!("reading rollout {id}")))?;
        body.map(|body| {
            Rollout::from_json(body.as_bytes()).map_err(|err| Error::invalid_input(format!("rollout row {id}: {err}")))
        })
        .transpose()
    }

    async fn rollouts(&self, page: &PageRequest) -> Result<Page<RolloutId>> {
        let limit = page.limit.clamp(1, PageRequest::MAX_LIMIT);
        let before = match &page.after {
            Some(cursor) => Some(cursor.as_str().parse::<RolloutId>().map_err(|err| {
                Error::invalid_input(format!("page cursor {:?} is not this store's: {err}", cursor.as_str()))
            })?),
            None => None,
        };
        let rows: Vec<String> = sqlx::query_scalar(ROLLOUTS)
            .bind(before.map(|id| id.to_string()))
            .bind(limit as i64 + 1)
            .fetch_all(&self.db)
            .await
            .map_err(PgError::query(|| "listing rollouts".to_owned()))?;
        let items = rows
            .iter()
            .map(|id| {
                id.parse::<RolloutId>()
                    .map_err(|err| Error::invalid_input(format!("rollout row id: {err}")))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Page::from_one_more(items, limit, |last| Cursor::new(last.to_string())))
    }

    async fn claim_rollout_driver(&self, id: &RolloutId, driver: &str, ttl: Duration) -> Result<bool> {
        validate_ttl(ttl)?;
        let now = self.clock.now();
        let held = sqlx::query(CLAIM_DRIVER)
            .bind(id.to_string())
            .bind(driver)
            .bind(sql_time(now.saturating_add(ttl))?)
            .bind(sql_time(now)?)
            .fetch_optional(&self.db)
            .await
            .map_err(PgError::query(|| format!("claiming the driver lease of rollout {id}")))?;
        Ok(held.is_some())
    }

    async fn release_rollout_driver(&self, id: &RolloutId, driver: &str) -> Result<bool> {
        let done = sqlx::query(RELEASE_DRIVER)
            .bind(id.to_string())
            .bind(driver)
            .bind(sql_time(self.clock.now())?)
            .execute(&self.db)
            .await
            .map_err(PgError::query(|| format!("releasing the driver lease of rollout {id}")))?;
        Ok(done.rows_affected() == 1)
    }

    async fn generation(&self) -> Result<Option<StoreGeneration>> {
        let body: Option<String> = sqlx::query_scalar(GENERATION)
            .fetch_optional(&self.db)
            .await
            .map_err(PgError::query(|| "reading the store's generation"))?;
        body.map(|body| {
            StoreGeneration::from_json(body.as_bytes())
                .map_err(|err| Error::invalid_input(format!("store_generation row: {err}")))
        })
        .transpose()
    }

    async fn begin_generation(&self, generation: &StoreGeneration) -> Result<StoreGeneration> {
        let body = String::from_utf8_lossy(&generation.to_json()).into_owned();
        sqlx::query(BEGIN_GENERATION)
            .bind(body)
            .execute(&self.db)
            .await
            .map_err(PgError::query(|| "marking the store's generation"))?;
        // Written now or by another control plane first: either way, what is there.
        self.generation()
            .await?
            .ok_or_else(|| Error::unavailable("the store_generation row was gone right after it was written"))
    }
}

/// A connection listening for command endings, in a pool of its own: a
/// listener dropped because its connection went silent unlistens on it
/// first, which never ends, and that must not hold one of the store's
/// connections for good.
async fn listen(pool: &sqlx::PgPool) -> Result<PgListener> {
    let own = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .max_lifetime(None)
        .idle_timeout(None)
        .connect_lazy_with((*pool.connect_options()).clone());
    let mut listener = PgListener::connect_with(&own)
        .await
        .map_err(PgError::query(|| "connecting to listen for command endings".to_owned()))?;
    listener
        .listen(ENDED)
        .await
        .map_err(PgError::query(|| format!("LISTEN {ENDED}")))?;
    Ok(listener)
}

/// Passes each end announced for this store's schema (payloads starting
/// with `prefix`) to a watch until it is dropped.
///
/// The listener reconnects by itself when its connection drops; ends
/// announced meanwhile are missed. A connection that goes silent instead
/// (a firewall forgot it, its host vanished) neither answers nor drops, so
/// after [`PROBE_AFTER`] deadlines without a notice the listener is asked a
/// `SELECT 1`: unanswered within the deadline, it is replaced by a fresh one.
struct Relay {
    pool: sqlx::PgPool,
    deadline: std::time::Duration,
    prefix: String,
}

/// How many statement deadlines a quiet listener waits before it is probed.
const PROBE_AFTER: u32 = 4;

impl Relay {
    async fn run(self, mut listener: PgListener, watch: EndingsSender) {
        let quiet = self.deadline.saturating_mul(PROBE_AFTER);
        loop {
            let notification = tokio::select! {
                _ = watch.closed() => return,
                notification = listener.recv() => notification,
                _ = tokio::time::sleep(quiet) => {
                    let probe = sqlx::query("SELECT 1").execute(&mut listener);
                    if !matches!(tokio::time::timeout(self.deadline, probe).await, Ok(Ok(_))) {
                        tracing::warn!("the connection listening for command endings went silent; listening on a fresh one");
                        match self.relisten(&watch).await {
                            Some(fresh) => listener = fresh,
                            None => return,
                        }
                    }
                    continue;
                }
            };
            match notification {
                Ok(notification) => {
                    let id = (notification.payload().strip_prefix(self.prefix.as_str())).and_then(|id| id.parse().ok());
                    if let Some(id) = id {
                        watch.tell(id);
                    }
                }
                Err(err) => {
                    tracing::warn!(error = %err, "listening for command endings failed; trying again in 1s");
                    tokio::select! {
                        _ = watch.closed() => return,
                        _ = tokio::time::sleep(std::time::Duration::from_secs(1)) => {}
                    }
                }
            }
        }
    }

    /// A fresh listener, tried every second until one answers; `None` once the watch is gone.
    async fn relisten(&self, watch: &EndingsSender) -> Option<PgListener> {
        loop {
            let opening = tokio::time::timeout(self.deadline.saturating_mul(2), listen(&self.pool));
            match opening.await {
                Ok(Ok(listener)) => return Some(listener),
                Ok(Err(err)) => {
                    tracing::warn!(error = %err, "listening for command endings again failed; trying again in 1s")
                }
                Err(_) => tracing::warn!("listening for command endings again timed out; trying again in 1s"),
            }
            tokio::select! {
                _ = watch.closed() => return None,
                _ = tokio::time::sleep(std::time::Duration::from_secs(1)) => {}
            }
        }
    }
}
