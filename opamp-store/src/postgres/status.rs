//! Device status in `device_registry`; the online and per-supervisor indexes
//! are partial indexes of the same rows, so they never disagree with it.

use async_trait::async_trait;
use opamp_core::{
    AgentType, ConfigHash, ConfigVersion, Cursor, DeviceId, DeviceStatus, Error, Labels, Page, PageRequest, Presence,
    PresenceUpdate, Result, StatusPatch, StatusStore, SupervisorId, SupervisorLoad,
};
use sqlx::postgres::PgRow;
use time::OffsetDateTime;

use super::PostgresStore;
use super::error::PgError;
use super::rows::{RowReader, row_name, sql_time, stored};

/// The `SET` list applying a patch to the row `r`: `$2`…`$12` are the patch's
/// fields, NULL where the patch leaves a field alone (`$11` says whether to
/// write `last_error`, which may be cleared).
macro_rules! patch_set {
    () => {
        "status = COALESCE($2::varchar, r.status),
    supervisor_id = COALESCE($3::varchar, r.supervisor_id),
    connected_at = COALESCE($4::timestamptz, r.connected_at),
    emission_state = COALESCE($5::boolean, r.emission_state),
    config_version = COALESCE($6::varchar, r.config_version),
    config_hash = COALESCE($7::varchar, r.config_hash),
    agent_type = COALESCE($8::varchar, r.agent_type),
    last_seen = COALESCE($9::timestamptz, r.last_seen),
    labels = COALESCE($10::jsonb, r.labels),
    last_error = CASE WHEN $11::boolean THEN $12::text ELSE r.last_error END"
    };
}

/// The columns of a new row and their values: the patch applied to a new status.
macro_rules! new_row {
    () => {
        "INSERT INTO device_registry AS r (device_id, status, supervisor_id, connected_at, emission_state,
    config_version, config_hash, agent_type, last_seen, labels, last_error)
SELECT $1, COALESCE($2::varchar, 'offline'), $3::varchar, $4::timestamptz, COALESCE($5::boolean, false),
    $6::varchar, $7::varchar, $8::varchar, $9::timestamptz, COALESCE($10::jsonb, '{}'),
    CASE WHEN $11::boolean THEN $12::text END"
    };
}

/// An unfenced patch: creates the row (the patch applied to a new status) or updates it.
const UPSERT: &str = concat!(new_row!(), "\nON CONFLICT (device_id) DO UPDATE SET ", patch_set!());

/// A patch conditional on the lease of `$13`: locks the device's lease row
/// (so a claim waits for this statement, and this one for a claim under
/// way), and creates or updates the row only if `$13` holds the lease at
/// `$14`. Returns the holder and whether it applied.
const LEASED: &str = concat!(
    "WITH lease AS (
    SELECT supervisor_id FROM device_lease WHERE device_id = $1 AND expires_at > $14 FOR SHARE
), applied AS (
",
    new_row!(),
    "
    FROM lease WHERE lease.supervisor_id = $13
    ON CONFLICT (device_id) DO UPDATE SET ",
    patch_set!(),
    "
    RETURNING 1
)
SELECT (SELECT supervisor_id FROM lease) AS owner, EXISTS (SELECT 1 FROM applied) AS applied"
);

/// A patch fenced by `$13`: locks the row, reads who it names (the newest
/// version), and applies the patch only if that is `$13`. Never creates a row;
/// `found` tells a missing row from one that names nobody.
const FENCED: &str = concat!(
    "WITH cur AS (
    SELECT device_id, supervisor_id FROM device_registry WHERE device_id = $1 FOR UPDATE
), applied AS (
    UPDATE device_registry AS r SET ",
    patch_set!(),
    "
    FROM cur WHERE r.device_id = cur.device_id AND cur.supervisor_id = $13
    RETURNING 1
)
SELECT EXISTS (SELECT 1 FROM cur) AS found, (SELECT supervisor_id FROM cur) AS owner,
    EXISTS (SELECT 1 FROM applied) AS applied"
);

const STATUS: &str = "\
SELECT device_id, supervisor_id, agent_type, connected_at, last_seen, config_version, emission_state,
    status, config_hash, labels::text AS labels, last_error
FROM device_registry WHERE device_id = $1";

/// Keyset pages: the cursor is the last device id of the previous page ('' before the first).
const ONLINE: &str = "\
SELECT device_id FROM device_registry
WHERE status = 'online' AND device_id > $1 ORDER BY device_id LIMIT $2";

const ALL: &str = "\
SELECT device_id FROM device_registry
WHERE connected_at IS NOT NULL AND device_id > $1 ORDER BY device_id LIMIT $2";

const UNDER_SUPERVISOR: &str = "\
SELECT device_id FROM device_registry
WHERE status = 'online' AND supervisor_id = $2 AND device_id > $1 ORDER BY device_id LIMIT $3";

const COUNTS: &str = "\
SELECT supervisor_id, count(*) AS devices FROM device_registry
WHERE status = 'online' AND supervisor_id IS NOT NULL GROUP BY supervisor_id";

/// The patch's fields as statement parameters `$2`…`$12`.
struct PatchParams {
    presence: Option<&'static str>,
    supervisor: Option<SupervisorId>,
    connected_at: Option<OffsetDateTime>,
    emission: Option<bool>,
    config_version: Option<ConfigVersion>,
    config_hash: Option<String>,
    agent_type: Option<AgentType>,
    last_seen: Option<OffsetDateTime>,
    labels: Option<String>,
    set_last_error: bool,
    last_error: Option<String>,
}

impl PatchParams {
    fn new(patch: &StatusPatch) -> Result<Self> {
        let (presence, supervisor, connected_at) = match &patch.presence {
            Some(PresenceUpdate::Online {
                supervisor,
                connected_at,
            }) => (
                Some(Presence::Online.as_str()),
                Some(*supervisor),
                Some(sql_time(*connected_at)?),
            ),
            Some(PresenceUpdate::Offline) => (Some(Presence::Offline.as_str()), None, None),
            // A presence change this store does not know (the enum may grow).
            Some(other) => return Err(Error::unsupported(format!("postgres store: presence update {other:?}"))),
            None => (None, None, None),
        };
        let labels = patch
            .labels
            .as_ref()
            .map(|labels| {
                serde_json::to_string(labels).map_err(|err| Error::invalid_input(format!("labels as JSON: {err}")))
            })
            .transpose()?;
        Ok(PatchParams {
            presence,
            supervisor,
            connected_at,
            emission: patch.emission,
            config_version: patch.config_version,
            config_hash: patch.config_hash.map(|hash| hash.to_string()),
            agent_type: patch.agent_type,
            last_seen: patch.last_seen.map(sql_time).transpose()?,
            labels,
            set_last_error: patch.last_error.is_some(),
            last_error: patch.last_error.clone().flatten(),
        })
    }

    fn bind<'q>(
        &'q self,
        device: &'q DeviceId,
        query: sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>,
    ) -> sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments> {
        query
            .bind(device.as_str())
            .bind(self.presence)
            .bind(self.supervisor.as_ref().map(SupervisorId::as_str))
            .bind(self.connected_at)
            .bind(self.emission)
            .bind(self.config_version.as_ref().map(ConfigVersion::as_str))
            .bind(self.config_hash.as_deref())
            .bind(self.agent_type.as_ref().map(AgentType::as_str))
            .bind(self.last_seen)
            .bind(self.labels.as_deref())
            .bind(self.set_last_error)
            .bind(self.last_error.as_deref())
    }
}

fn parse_presence(text: &str) -> Result<Presence> {
    match text {
        "online" => Ok(Presence::Online),
        "offline" => Ok(Presence::Offline),
        other => Err(Error::invalid_input(format!(
            "presence {other:?} is neither \"online\" nor \"offline\""
        ))),
    }
}

fn parse_labels(text: &str) -> Result<Labels> {
    serde_json::from_str(text)
        .map_err(|err| Error::invalid_input(format!("labels are not a JSON object of strings: {err}")))
}

fn read_status(device: &DeviceId, row: &PgRow) -> Result<DeviceStatus> {
    let name = || row_name("device_registry", "device_id", device.as_str());
    let r = RowReader::new(row, &name);
    let mut status = DeviceStatus::new(*device);
    status.status = r.parsed("status", parse_presence)?;
    status.supervisor = r.parsed_opt("supervisor_id", str::parse::<SupervisorId>)?;
    status.emission = r.get("emission_state")?;
    status.config_version = r.parsed_opt("config_version", str::parse::<ConfigVersion>)?;
    status.config_hash = r.parsed_opt("config_hash", str::parse::<ConfigHash>)?;
    status.agent_type = r.parsed_opt("agent_type", str::parse::<AgentType>)?;
    status.last_seen = r.time_opt("last_seen")?;
    status.connected_at = r.time_opt("connected_at")?;
    status.labels = r.parsed("labels", parse_labels)?;
    status.last_error = r.get("last_error")?;
    Ok(status)
}

/// A page of device ids from a keyset query that fetched up to `limit + 1` rows.
fn device_page(rows: Vec<String>, limit: usize) -> Result<Page<DeviceId>> {
    let more = rows.len() > limit;
    let items = rows
        .iter()
        .take(limit)
        .map(|text| {
            stored(
                || row_name("device_registry", "device_id", text),
                "device_id",
                text,
                str::parse::<DeviceId>,
            )
        })
        .collect::<Result<Vec<_>>>()?;
    let next = match items.last() {
        Some(last) if more => Some(Cursor::new(last.as_str())),
        _ => None,
    };
    Ok(Page { items, next })
}

/// Where a page starts: after the cursor's device, or at the beginning ('' sorts first).
pub(super) fn page_start(page: &PageRequest) -> Result<(String, i64)> {
    let after = match &page.after {
        Some(cursor) => DeviceId::new(cursor.as_str())
            .map_err(|err| {
                Error::invalid_input(format!("page cursor {:?} is not this store's: {err}", cursor.as_str()))
            })?
            .as_str()
            .to_owned(),
        None => String::new(),
    };
    let limit = page.limit.clamp(1, PageRequest::MAX_LIMIT);
    // One more than asked, to learn whether another page follows.
    Ok((after, limit as i64 + 1))
}

#[async_trait]
impl StatusStore for PostgresStore {
    async fn update_status(&self, device: &DeviceId, patch: &StatusPatch) -> Result<()> {
        patch.check_conditions(device)?;
        let params = PatchParams::new(patch)?;
        let doing = || format!("status update of device {device}");
        if let Some(holder) = patch.lease {
            let row = params
                .bind(device, sqlx::query(LEASED))
                .bind(holder.as_str())
                .bind(sql_time(self.clock.now())?)
                .fetch_one(&self.db)
                .await
                .map_err(PgError::query(|| {
                    format!("{} conditional on the lease of {holder}", doing())
                }))?;
            let name = || row_name("device_lease", "device_id", device.as_str());
            let r = RowReader::new(&row, &name);
            if r.get::<bool>("applied")? {
                return Ok(());
            }
            let owner = r.parsed_opt("owner", str::parse::<SupervisorId>)?;
            return Err(Error::not_owner(*device, holder, owner));
        }
        let Some(fence) = patch.fence else {
            params
                .bind(device, sqlx::query(UPSERT))
                .execute(&self.db)
                .await
                .map_err(PgError::query(doing))?;
            return Ok(());
        };
        let row = params
            .bind(device, sqlx::query(FENCED))
            .bind(fence.as_str())
            .fetch_one(&self.db)
            .await
            .map_err(PgError::query(|| format!("{} fenced by {fence}", doing())))?;
        let name = || row_name("device_registry", "device_id", device.as_str());
        let r = RowReader::new(&row, &name);
        if r.get::<bool>("applied")? {
            return Ok(());
        }
        if !r.get::<bool>("found")? {
            return Err(Error::status_not_found(*device));
        }
        let owner = r.parsed_opt("owner", str::parse::<SupervisorId>)?;
        Err(Error::not_owner(*device, fence, owner))
    }

    async fn status(&self, device: &DeviceId) -> Result<Option<DeviceStatus>> {
        let row = sqlx::query(STATUS)
            .bind(device.as_str())
            .fetch_optional(&self.db)
            .await
            .map_err(PgError::query(|| format!("status of device {device}")))?;
        row.map(|row| read_status(device, &row)).transpose()
    }

    async fn online_devices(&self, page: &PageRequest) -> Result<Page<DeviceId>> {
        let (after, fetch) = page_start(page)?;
        let rows: Vec<String> = sqlx::query_scalar(ONLINE)
            .bind(&after)
            .bind(fetch)
            .fetch_all(&self.db)
            .await
            .map_err(PgError::query(|| format!("listing online devices after {after:?}")))?;
        device_page(rows, page.limit.clamp(1, PageRequest::MAX_LIMIT))
    }

    async fn devices(&self, page: &PageRequest) -> Result<Page<DeviceId>> {
        let (after, fetch) = page_start(page)?;
        let rows: Vec<String> = sqlx::query_scalar(ALL)
            .bind(&after)
            .bind(fetch)
            .fetch_all(&self.db)
            .await
            .map_err(PgError::query(|| format!("listing devices after {after:?}")))?;
        device_page(rows, page.limit.clamp(1, PageRequest::MAX_LIMIT))
    }

    async fn supervisor_devices(&self, supervisor: &SupervisorId, page: &PageRequest) -> Result<Page<DeviceId>> {
        let (after, fetch) = page_start(page)?;
        let rows: Vec<String> = sqlx::query_scalar(UNDER_SUPERVISOR)
            .bind(&after)
            .bind(supervisor.as_str())
            .bind(fetch)
            .fetch_all(&self.db)
            .await
            .map_err(PgError::query(|| {
                format!("listing devices online under {supervisor} after {after:?}")
            }))?;
        device_page(rows, page.limit.clamp(1, PageRequest::MAX_LIMIT))
    }

    async fn device_counts(&self) -> Result<Vec<SupervisorLoad>> {
        let rows: Vec<(String, i64)> = sqlx::query_as(COUNTS)
            .fetch_all(&self.db)
            .await
            .map_err(PgError::query(|| "counting online devices per supervisor"))?;
        rows.into_iter()
            .map(|(supervisor, devices)| {
                let supervisor = stored(
                    || format!("device_registry rows with supervisor_id={supervisor:?}"),
                    "supervisor_id",
                    &supervisor,
                    str::parse::<SupervisorId>,
                )?;
                Ok(SupervisorLoad {
                    supervisor,
                    devices: devices.max(0) as u64,
                })
            })
            .collect()
    }
}
