//! Templates in `config_templates`, the `latest` pointers in `config_latest`,
//! desired configurations in `device_desired_config`. Foreign keys make
//! "only stored templates" hold inside the database too.

use async_trait::async_trait;
use opamp_core::{
    AgentType, ConfigBundle, ConfigHash, ConfigRef, ConfigStore, ConfigTemplate, ConfigVersion, DeviceId, Error, Result,
};

use sqlx::postgres::PgQueryResult;

use super::PostgresStore;
use super::error::{BACKEND, PgError, is_foreign_key_violation};
use super::rows::{RowReader, row_name, sql_time, stored};

const INSERT_TEMPLATE: &str = "\
INSERT INTO config_templates
    (template_id, agent_type, version, config_data, config_hash, created_by, created_at, updated_at)
VALUES ($1, $2, $3, $4, $5, $6, $7, $7)
ON CONFLICT DO NOTHING";

const STORED_HASH: &str = "SELECT config_hash FROM config_templates WHERE agent_type = $1 AND version = $2";

const TEMPLATE: &str = "\
SELECT template_id, config_data, config_hash, created_by, created_at
FROM config_templates WHERE agent_type = $1 AND version = $2";

const VERSIONS: &str = "SELECT version FROM config_templates WHERE agent_type = $1 ORDER BY stored_seq";

const SET_LATEST: &str = "\
INSERT INTO config_latest (agent_type, version, updated_at) VALUES ($1, $2, $3)
ON CONFLICT (agent_type) DO UPDATE SET version = EXCLUDED.version, updated_at = EXCLUDED.updated_at";

const LATEST: &str = "SELECT version FROM config_latest WHERE agent_type = $1";

const SET_DESIRED: &str = "\
INSERT INTO device_desired_config (device_id, agent_type, version, updated_at) VALUES ($1, $2, $3, $4)
ON CONFLICT (device_id) DO UPDATE SET
    agent_type = EXCLUDED.agent_type, version = EXCLUDED.version, updated_at = EXCLUDED.updated_at";

const DESIRED: &str = "SELECT agent_type, version FROM device_desired_config WHERE device_id = $1";

const CLEAR_DESIRED: &str = "DELETE FROM device_desired_config WHERE device_id = $1";

/// The `template_id` of a version: `{agent_type}/{version}`.
fn template_id(config: &ConfigRef) -> String {
    config.to_string()
}

fn parse_bundle(text: &str) -> Result<ConfigBundle> {
    serde_json::from_str(text).map_err(|err| Error::invalid_input(format!("not a config bundle's JSON: {err}")))
}

/// The result of a write whose row must name a stored template: a
/// foreign-key violation is [`Error::NotFound`] naming `missing`, any other
/// failure is the statement `doing` failing.
fn naming_a_stored_template(
    result: std::result::Result<PgQueryResult, sqlx::Error>,
    missing: String,
    doing: String,
) -> Result<()> {
    match result {
        Ok(_) => Ok(()),
        Err(err) if is_foreign_key_violation(&err) => Err(Error::not_found(missing)),
        Err(err) => Err(PgError::query(|| doing)(err)),
    }
}

#[async_trait]
impl ConfigStore for PostgresStore {
    async fn put_template(&self, template: &ConfigTemplate) -> Result<()> {
        let config = template.reference();
        let hash = template.hash().to_string();
        let data = serde_json::to_string(&template.bundle)
            .map_err(|err| Error::invalid_input(format!("config template {config} as JSON: {err}")))?;
        let inserted = sqlx::query(INSERT_TEMPLATE)
            .bind(template_id(&config))
            .bind(config.agent_type.as_str())
            .bind(config.version.as_str())
            .bind(&data)
            .bind(&hash)
            .bind(&template.created_by)
            .bind(sql_time(template.created_at)?)
            .execute(&self.db)
            .await
            .map_err(PgError::query(|| format!("storing config template {config}")))?
            .rows_affected();
        if inserted == 1 {
            return Ok(());
        }
        // Stored before (versions are never deleted): same content is accepted again.
        let stored_hash: Option<String> = sqlx::query_scalar(STORED_HASH)
            .bind(config.agent_type.as_str())
            .bind(config.version.as_str())
            .fetch_optional(&self.db)
            .await
            .map_err(PgError::query(|| {
                format!("reading the hash of config template {config}")
            }))?;
        match stored_hash {
            Some(stored) if stored == hash => Ok(()),
            Some(_) => Err(Error::already_exists(format!(
                "config template {config} with other content"
            ))),
            // The insert met a row with this template_id that names another version.
            None => Err(Error::Backend {
                backend: BACKEND,
                message: format!(
                    "config_templates row template_id={:?} does not hold agent_type {} and version {}",
                    template_id(&config),
                    config.agent_type,
                    config.version
                ),
                source: None,
            }),
        }
    }

    async fn template(&self, config: &ConfigRef) -> Result<Option<ConfigTemplate>> {
        let Some(row) = sqlx::query(TEMPLATE)
            .bind(config.agent_type.as_str())
            .bind(config.version.as_str())
            .fetch_optional(&self.db)
            .await
            .map_err(PgError::query(|| format!("reading config template {config}")))?
        else {
            return Ok(None);
        };
        let name = || row_name("config_templates", "template_id", &template_id(config));
        let r = RowReader::new(&row, &name);
        let hash = r.parsed("config_hash", str::parse::<ConfigHash>)?;
        // A bundle edited by hand no longer matches the hash it was stored with.
        let bundle = r.parsed("config_data", |text| {
            let bundle = parse_bundle(text)?;
            if bundle.hash() == hash {
                Ok(bundle)
            } else {
                Err(Error::invalid_input(format!(
                    "the bundle hashes to {}, not to the stored config_hash {hash}",
                    bundle.hash()
                )))
            }
        })?;
        let created_by: Option<String> = r.get("created_by")?;
        let created_at = r.time("created_at")?;
        Ok(Some(ConfigTemplate::new(
            *config,
            bundle,
            created_by.unwrap_or_default(),
            created_at,
        )))
    }

    async fn template_versions(&self, agent_type: &AgentType) -> Result<Vec<ConfigVersion>> {
        let versions: Vec<String> = sqlx::query_scalar(VERSIONS)
            .bind(agent_type.as_str())
            .fetch_all(&self.db)
            .await
            .map_err(PgError::query(|| {
                format!("listing the template versions of {agent_type}")
            }))?;
        versions
            .iter()
            .map(|version| {
                let name = || format!("config_templates row agent_type={agent_type:?} version={version:?}");
                stored(name, "version", version, str::parse::<ConfigVersion>)
            })
            .collect()
    }

    async fn set_latest(&self, config: &ConfigRef) -> Result<()> {
        let result = sqlx::query(SET_LATEST)
            .bind(config.agent_type.as_str())
            .bind(config.version.as_str())
            .bind(sql_time(self.clock.now())?)
            .execute(&self.db)
            .await;
        naming_a_stored_template(
            result,
            format!("config template {config}, to be the latest of {}", config.agent_type),
            format!("pointing latest of {} at {config}", config.agent_type),
        )
    }

    async fn latest(&self, agent_type: &AgentType) -> Result<Option<ConfigVersion>> {
        let version: Option<String> = sqlx::query_scalar(LATEST)
            .bind(agent_type.as_str())
            .fetch_optional(&self.db)
            .await
            .map_err(PgError::query(|| format!("reading latest of {agent_type}")))?;
        version
            .map(|version| {
                let name = || row_name("config_latest", "agent_type", agent_type.as_str());
                stored(name, "version", &version, str::parse::<ConfigVersion>)
            })
            .transpose()
    }

    async fn set_desired(&self, device: &DeviceId, config: &ConfigRef) -> Result<()> {
        let result = sqlx::query(SET_DESIRED)
            .bind(device.as_str())
            .bind(config.agent_type.as_str())
            .bind(config.version.as_str())
            .bind(sql_time(self.clock.now())?)
            .execute(&self.db)
            .await;
        naming_a_stored_template(
            result,
            format!("config template {config}, to be the desired config of device {device}"),
            format!("setting the desired config of device {device}"),
        )
    }

    async fn desired(&self, device: &DeviceId) -> Result<Option<ConfigRef>> {
        let Some(row) = sqlx::query(DESIRED)
            .bind(device.as_str())
            .fetch_optional(&self.db)
            .await
            .map_err(PgError::query(|| {
                format!("reading the desired config of device {device}")
            }))?
        else {
            return Ok(None);
        };
        let name = || row_name("device_desired_config", "device_id", device.as_str());
        let r = RowReader::new(&row, &name);
        Ok(Some(ConfigRef::new(
            r.parsed("agent_type", str::parse::<AgentType>)?,
            r.parsed("version", str::parse::<ConfigVersion>)?,
        )))
    }

    async fn clear_desired(&self, device: &DeviceId) -> Result<bool> {
        let done = sqlx::query(CLEAR_DESIRED)
            .bind(device.as_str())
            .execute(&self.db)
            .await
            .map_err(PgError::query(|| {
                format!("clearing the desired config of device {device}")
            }))?;
        Ok(done.rows_affected() > 0)
    }
}
