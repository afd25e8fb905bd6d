//! The command audit log in `command_audit`: every command, who sent it, and
//! how it ended, queried by device or by time range a page at a time.

use opamp_core::{
    Command, CommandOutcome, CorrelationId, Cursor, DeviceId, Error, Page, PageRequest, Result, SupervisorId, Timestamp,
};
use sqlx::postgres::PgRow;
use time::OffsetDateTime;

use super::PostgresStore;
use super::error::PgError;
use super::rows::{RowReader, sql_time};

/// One command in the audit log, with its outcome once it has one.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct AuditEntry {
    /// The row's id (`command_audit.id`): rows are numbered in the order they were recorded.
    pub id: i64,
    /// The command, read back from its Appendix B JSON (`payload`).
    pub command: Command,
    /// The supervisor it was sent to, if known when it was recorded.
    pub supervisor: Option<SupervisorId>,
    /// Who sent it (a user or service name).
    pub initiated_by: String,
    /// How it ended; `None` while it is pending.
    pub outcome: Option<CommandOutcome>,
    /// When it was issued (`created_at`).
    pub created_at: Timestamp,
    /// When its outcome was recorded.
    pub completed_at: Option<Timestamp>,
}

/// The status column of a command without an outcome yet.
const PENDING: &str = "pending";

const RECORD: &str = "\
INSERT INTO command_audit (device_id, supervisor_id, command_type, payload, correlation_id, status,
    initiated_by, created_at)
VALUES ($1, $2, $3, $4::jsonb, $5, 'pending', $6, $7)
ON CONFLICT (correlation_id) DO NOTHING";

const RECORD_OUTCOME: &str = "\
UPDATE command_audit SET status = $2, error_message = $3, completed_at = $4
WHERE correlation_id = $1 AND status = 'pending'";

const EXISTS: &str = "SELECT EXISTS (SELECT 1 FROM command_audit WHERE correlation_id = $1)";

macro_rules! audit_columns {
    () => {
        "SELECT id, supervisor_id, payload::text AS payload, status, error_message, initiated_by, created_at,
    completed_at FROM command_audit "
    };
}

const BY_CORRELATION_ID: &str = concat!(audit_columns!(), "WHERE correlation_id = $1");

/// Keyset pages over (created_at, id), which the index `idx_device_id` holds per device.
const BY_DEVICE: &str = concat!(
    audit_columns!(),
    "WHERE device_id = $1 AND (created_at, id) > ($2, $3) ORDER BY created_at, id LIMIT $4"
);

/// Keyset pages over (created_at, id) within [$5, $1), on the index `idx_created_at`.
const BETWEEN: &str = concat!(
    audit_columns!(),
    "WHERE created_at >= $5 AND created_at < $1 AND (created_at, id) > ($2, $3) ORDER BY created_at, id LIMIT $4"
);

/// The status and error message recording `outcome`.
fn outcome_columns(outcome: &CommandOutcome) -> (&'static str, Option<&str>) {
    let reason = match outcome {
        CommandOutcome::Failed { reason } | CommandOutcome::Unsupported { reason } => Some(reason.as_str()),
        _ => None,
    };
    (outcome.name(), reason)
}

/// Reads the status column back (with the error message for the outcomes that carry one).
fn parse_outcome(status: &str, error: Option<String>) -> Result<Option<CommandOutcome>> {
    let reason = || error.clone().unwrap_or_default();
    Ok(Some(match status {
        // Deferred: recorded as the device's desired config, which its status follows.
        PENDING | "deferred" => return Ok(None),
        "acked" => CommandOutcome::Acked,
        "failed" => CommandOutcome::Failed { reason: reason() },
        "timed_out" => CommandOutcome::TimedOut,
        "device_offline" => CommandOutcome::DeviceOffline,
        "unsupported" => CommandOutcome::Unsupported { reason: reason() },
        other => {
            return Err(Error::invalid_input(format!(
                "status {other:?} is not pending, acked, failed, timed_out, device_offline or unsupported"
            )));
        }
    }))
}

/// Where the next page starts: (created_at in microseconds since the epoch, id).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct AuditCursor {
    micros: i64,
    id: i64,
}

impl AuditCursor {
    fn to_cursor(self) -> Cursor {
        Cursor::new(format!("{}:{}", self.micros, self.id))
    }

    fn parse(cursor: &Cursor) -> Result<Self> {
        let text = cursor.as_str();
        let parsed = text
            .split_once(':')
            .and_then(|(micros, id)| Some((micros.parse().ok()?, id.parse().ok()?)));
        match parsed {
            Some((micros, id)) => Ok(AuditCursor { micros, id }),
            None => Err(Error::invalid_input(format!(
                "page cursor {text:?} is not this audit log's"
            ))),
        }
    }

    /// The cursor as statement parameters; a cursor outside the representable times names itself.
    fn key(self) -> Result<(OffsetDateTime, i64)> {
        let at = OffsetDateTime::from_unix_timestamp_nanos(i128::from(self.micros) * 1_000)
            .map_err(|err| Error::invalid_input(format!("page cursor {:?}: {err}", self.to_cursor().as_str())))?;
        Ok((at, self.id))
    }
}

fn read_entry(row: &PgRow) -> Result<(AuditEntry, AuditCursor)> {
    // The id is read first, to name the row in every later error.
    let id: i64 = sqlx::Row::try_get(row, "id").map_err(PgError::query(|| "reading a command_audit row's id"))?;
    let name = || format!("command_audit row id={id}");
    let r = RowReader::new(row, &name);
    let command = r.parsed("payload", |json| Command::from_json(json.as_bytes()))?;
    let error: Option<String> = r.get("error_message")?;
    let outcome = r.parsed("status", |status| parse_outcome(status, error))?;
    let created_raw: OffsetDateTime = r.get("created_at")?;
    let micros = i64::try_from(created_raw.unix_timestamp_nanos().div_euclid(1_000)).unwrap_or(i64::MAX);
    let entry = AuditEntry {
        id,
        command,
        supervisor: r.parsed_opt("supervisor_id", str::parse::<SupervisorId>)?,
        initiated_by: r.get::<Option<String>>("initiated_by")?.unwrap_or_default(),
        outcome,
        created_at: r.time("created_at")?,
        completed_at: r.time_opt("completed_at")?,
    };
    Ok((entry, AuditCursor { micros, id }))
}

/// A page of entries from a keyset query that fetched up to `limit + 1` rows.
fn entry_page(rows: &[PgRow], limit: usize) -> Result<Page<AuditEntry>> {
    let mut items = Vec::with_capacity(rows.len().min(limit));
    let mut last = None;
    for row in rows.iter().take(limit) {
        let (entry, cursor) = read_entry(row)?;
        items.push(entry);
        last = Some(cursor);
    }
    let next = last.filter(|_| rows.len() > limit).map(AuditCursor::to_cursor);
    Ok(Page { items, next })
}

/// Where a page starts and how much of it to fetch.
struct PageStart {
    /// The key of the last entry of the previous page: (created_at, id).
    after: (OffsetDateTime, i64),
    limit: usize,
    /// One more than `limit`, to see whether another page follows.
    fetch: i64,
}

impl PageStart {
    /// After the cursor of `page`, or from `first` (with id 0, before every row) for the first page.
    fn of(page: &PageRequest, first: OffsetDateTime) -> Result<Self> {
        let after = match &page.after {
            Some(cursor) => AuditCursor::parse(cursor)?.key()?,
            None => (first, 0),
        };
        let limit = page.limit.clamp(1, PageRequest::MAX_LIMIT);
        Ok(PageStart {
            after,
            limit,
            fetch: limit as i64 + 1,
        })
    }
}

/// The earliest time a `Timestamp` can hold: the start of every first page.
fn beginning() -> Result<OffsetDateTime> {
    let earliest = Timestamp::from_unix_seconds(-62_167_219_200).unwrap_or(Timestamp::UNIX_EPOCH);
    sql_time(earliest)
}

/// The command audit log.
impl PostgresStore {
    /// Records `command` as pending: sent to `supervisor` (if known) on behalf of `initiated_by`.
    ///
    /// A command is recorded once: recording the same correlation id again
    /// (a redelivery) changes nothing and returns `false`. `initiated_by`
    /// longer than 64 characters is [`Error::InvalidInput`].
    ///
    /// ```no_run
    /// # async fn example(store: &opamp_store::postgres::PostgresStore) -> opamp_core::Result<()> {
    /// use std::time::Duration;
    /// use opamp_core::{Command, CommandKind, CommandOutcome, DeviceId, PageRequest, Timestamp};
    ///
    /// let d5 = DeviceId::new("device-5")?;
    /// let command = Command::new(d5, CommandKind::SetEmission { state: true }, Timestamp::now(), Duration::from_secs(30));
    /// store.record_command(&command, None, "alice").await?;
    /// store.record_outcome(&command.correlation_id, &CommandOutcome::Acked).await?;
    ///
    /// let page = store.audit_by_device(&d5, &PageRequest::first(50)).await?;
    /// assert_eq!(page.items[0].outcome, Some(CommandOutcome::Acked));
    /// # Ok(())
    /// # }
    /// ```
    pub async fn record_command(
        &self,
        command: &Command,
        supervisor: Option<&SupervisorId>,
        initiated_by: &str,
    ) -> Result<bool> {
        let id = command.correlation_id;
        let payload = String::from_utf8(command.to_json())
            .map_err(|err| Error::invalid_input(format!("command {id} as JSON: {err}")))?;
        let done = sqlx::query(RECORD)
            .bind(command.device.as_str())
            .bind(supervisor.map(SupervisorId::as_str))
            .bind(command.kind.wire_name())
            .bind(payload)
            .bind(id.to_string())
            .bind(initiated_by)
            .bind(sql_time(command.issued_at)?)
            .execute(&self.db)
            .await
            .map_err(PgError::query(|| {
                format!("recording command {id} for device {}", command.device)
            }))?;
        Ok(done.rows_affected() == 1)
    }

    /// Records how the command `correlation_id` ended, at the store clock's now.
    ///
    /// The first outcome stands: a second one returns `false` and changes
    /// nothing. A command never recorded is [`Error::NotFound`].
    pub async fn record_outcome(&self, correlation_id: &CorrelationId, outcome: &CommandOutcome) -> Result<bool> {
        let (status, error) = outcome_columns(outcome);
        let doing = || format!("recording the outcome {status} of command {correlation_id}");
        let done = sqlx::query(RECORD_OUTCOME)
            .bind(correlation_id.to_string())
            .bind(status)
            .bind(error)
            .bind(sql_time(self.clock.now())?)
            .execute(&self.db)
            .await
            .map_err(PgError::query(doing))?;
        self.changed_if_recorded(done.rows_affected(), correlation_id, doing)
            .await
    }

    /// Whether a conditional update of a command's row changed it: `true` if
    /// it did, `false` if the row is there but the condition did not hold,
    /// [`Error::NotFound`] if the command was never recorded.
    pub(super) async fn changed_if_recorded(
        &self,
        rows_affected: u64,
        id: &CorrelationId,
        doing: impl Fn() -> String,
    ) -> Result<bool> {
        if rows_affected > 0 {
            return Ok(true);
        }
        let recorded: bool = sqlx::query_scalar(EXISTS)
            .bind(id.to_string())
            .fetch_one(&self.db)
            .await
            .map_err(PgError::query(doing))?;
        if recorded {
            Ok(false)
        } else {
            Err(Error::not_found(format!("command {id}")))
        }
    }

    /// The audit entry of the command `correlation_id`, if it was recorded.
    pub async fn audit_entry(&self, correlation_id: &CorrelationId) -> Result<Option<AuditEntry>> {
        let row = sqlx::query(BY_CORRELATION_ID)
            .bind(correlation_id.to_string())
            .fetch_optional(&self.db)
            .await
            .map_err(PgError::query(|| {
                format!("reading the audit entry of command {correlation_id}")
            }))?;
        row.map(|row| read_entry(&row).map(|(entry, _)| entry)).transpose()
    }

    /// The commands sent to `device`, oldest first, a page at a time.
    pub async fn audit_by_device(&self, device: &DeviceId, page: &PageRequest) -> Result<Page<AuditEntry>> {
        let start = PageStart::of(page, beginning()?)?;
        let rows = sqlx::query(BY_DEVICE)
            .bind(device.as_str())
            .bind(start.after.0)
            .bind(start.after.1)
            .bind(start.fetch)
            .fetch_all(&self.db)
            .await
            .map_err(PgError::query(|| format!("reading the audit log of device {device}")))?;
        entry_page(&rows, start.limit)
    }

    /// The commands issued in `from..to` (from inclusive, to exclusive), oldest first, a page at a time.
    pub async fn audit_between(&self, from: Timestamp, to: Timestamp, page: &PageRequest) -> Result<Page<AuditEntry>> {
        let from_sql = sql_time(from)?;
        let start = PageStart::of(page, from_sql)?;
        let rows = sqlx::query(BETWEEN)
            .bind(sql_time(to)?)
            .bind(start.after.0)
            .bind(start.after.1)
            .bind(start.fetch)
            .bind(from_sql)
            .fetch_all(&self.db)
            .await
            .map_err(PgError::query(|| format!("reading the audit log from {from} to {to}")))?;
        entry_page(&rows, start.limit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcomes_round_trip_through_their_columns() {
        for outcome in [
            CommandOutcome::Acked,
            CommandOutcome::Failed {
                reason: "reload returned 1".into(),
            },
            CommandOutcome::TimedOut,
            CommandOutcome::DeviceOffline,
            CommandOutcome::Unsupported { reason: "no".into() },
        ] {
            let (status, error) = outcome_columns(&outcome);
            assert_eq!(parse_outcome(status, error.map(str::to_owned)).unwrap(), Some(outcome));
        }
        assert_eq!(parse_outcome(PENDING, None).unwrap(), None);
        let err = parse_outcome("exploded", None).unwrap_err().to_string();
        assert!(err.contains("\"exploded\""), "{err}");
    }

    #[test]
    fn cursors_round_trip_and_foreign_ones_are_named() {
        let cursor = AuditCursor { micros: -5, id: 42 };
        assert_eq!(AuditCursor::parse(&cursor.to_cursor()).unwrap(), cursor);
        for bad in ["", "12", "a:b", "1:2:3"] {
            let err = AuditCursor::parse(&Cursor::new(bad)).unwrap_err().to_string();
            assert!(err.contains("page cursor"), "{bad}: {err}");
        }
        let far = AuditCursor {
            micros: i64::MAX,
            id: 1,
        };
        assert!(far.key().is_err());
    }
}
