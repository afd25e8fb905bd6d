//! The Fluent Bit applier: configuration files on disk, then a hot reload (design §5.3).
//!
//! For each push, [`FluentBitApplier`]
//!
//! 1. writes every file of the bundle into the configured directory, each
//!    atomically (a temporary file in the same directory, synced, then renamed
//!    over the old one), keeping the previous contents;
//! 2. asks Fluent Bit to reload: `POST` to its reload endpoint (by default
//!    `http://127.0.0.1:2020/api/v2/reload`), and counts it a success only
//!    when the answer is JSON with `"status": 0`;
//! 3. on any failure or timeout puts the previous files back (removing files
//!    that did not exist before) and reports why;
//! 4. on success records what it applied in a state file
//!    (`.opamp-applied.json` in the same directory), so that after a restart
//!    the agent reports the configuration it runs.
//!
//! Fluent Bit keeps running its old pipeline when a reload fails, so restoring
//! the files keeps the disk in step with what runs.
//!
//! File names must be plain names (no directories, not starting with a dot):
//! a bundle cannot write outside the directory, nor over the state file.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use http_body_util::{BodyExt, Empty, Limited};
use hyper::body::Bytes;
use hyper::{Request, Uri};
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use super::agent::{AppliedConfig, ConfigApplier};
use crate::config::{ConfigHash, ConfigRef};
use crate::error::{Error, Result};
use crate::time::duration_text;
use crate::transport::ConfigPush;

/// Fluent Bit's hot-reload endpoint on its default HTTP server port.
pub const DEFAULT_RELOAD_URL: &str = "http://127.0.0.1:2020/api/v2/reload";
/// The name of the state file in the configuration directory.
pub const STATE_FILE: &str = ".opamp-applied.json";
/// The most of a reload answer that is read.
const MAX_ANSWER: usize = 64 * 1024;

/// Where the applier writes and whom it asks to reload.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct FluentBitConfig {
    /// The directory Fluent Bit reads its configuration from.
    pub config_dir: PathBuf,
    /// The reload endpoint (plain HTTP: Fluent Bit's API listens on the device itself).
    #[serde(default = "default_reload_url")]
    pub reload_url: String,
    /// How long the reload may take before it counts as failed.
    #[serde(default = "default_reload_timeout", with = "duration_text")]
    pub reload_timeout: Duration,
}

fn default_reload_url() -> String {
    DEFAULT_RELOAD_URL.to_owned()
}

fn default_reload_timeout() -> Duration {
    Duration::from_secs(10)
}

impl FluentBitConfig {
    /// Writing into `config_dir`, with the default endpoint and timeout.
    pub fn new(config_dir: impl Into<PathBuf>) -> Self {
        FluentBitConfig {
            config_dir: config_dir.into(),
            reload_url: default_reload_url(),
            reload_timeout: default_reload_timeout(),
        }
    }

    /// With another reload endpoint.
    pub fn reload_url(mut self, url: impl Into<String>) -> Self {
        self.reload_url = url.into();
        self
    }

    /// With another reload timeout.
    pub fn reload_timeout(mut self, timeout: Duration) -> Self {
        self.reload_timeout = timeout;
        self
    }
}

/// What the state file records.
#[derive(Serialize, Deserialize)]
struct State {
    #[serde(flatten)]
    config: ConfigRef,
    hash: ConfigHash,
}

/// Applies configuration to a Fluent Bit next to the agent. See the [module docs](self).
pub struct FluentBitApplier {
    config: FluentBitConfig,
    reload: Uri,
    current: Mutex<Option<AppliedConfig>>,
    /// One apply at a time: each must see the files the previous one left.
    applying: tokio::sync::Mutex<()>,
}

impl fmt::Debug for FluentBitApplier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FluentBitApplier")
            .field("config_dir", &self.config.config_dir)
            .field("reload_url", &self.config.reload_url)
            .finish_non_exhaustive()
    }
}

impl FluentBitApplier {
    /// An applier for `config`, reading what was last applied from the state file.
    ///
    /// [`Error::InvalidInput`] if the endpoint is not an `http://` URL, the
    /// directory does not exist, or the state file cannot be read; each names
    /// the setting or the file.
    pub fn new(config: FluentBitConfig) -> Result<Self> {
        let reload: Uri = config
            .reload_url
            .parse()
            .map_err(|err| Error::invalid_input(format!("fluent bit reload_url {:?}: {err}", config.reload_url)))?;
        if reload.scheme_str() != Some("http") || reload.host().is_none() {
            return Err(Error::invalid_input(format!(
                "fluent bit reload_url {:?} must be an http:// URL with a host",
                config.reload_url
            )));
        }
        if config.reload_timeout.is_zero() {
            return Err(Error::invalid_input("fluent bit reload_timeout must be more than zero"));
        }
        if !config.config_dir.is_dir() {
            return Err(Error::invalid_input(format!(
                "fluent bit config_dir {} is not a directory",
                config.config_dir.display()
            )));
        }
        let current = read_state(&config.config_dir.join(STATE_FILE))?;
        Ok(FluentBitApplier {
            config,
            reload,
            current: Mutex::new(current),
            applying: tokio::sync::Mutex::new(()),
        })
    }

    fn path(&self, name: &str) -> PathBuf {
        self.config.config_dir.join(name)
    }

    /// Writes every file, returning what each held before; on an error puts back what was written.
    async fn write_all(&self, push: &ConfigPush) -> std::result::Result<Vec<(String, Option<Vec<u8>>)>, String> {
        let mut previous = Vec::with_capacity(push.bundle.len());
        for (name, file) in push.bundle.files() {
            let path = self.path(name);
            let written = async {
                let old = match tokio::fs::read(&path).await {
                    Ok(old) => Some(old),
                    Err(err) if err.kind() == std::io::ErrorKind::NotFound => None,
                    Err(err) => return Err(format!("reading {}: {err}", path.display())),
                };
                write_atomically(&path, &file.body).await?;
                Ok(old)
            }
            .await;
            match written {
                Ok(old) => previous.push((name.to_owned(), old)),
                Err(reason) => {
                    self.restore(previous).await;
                    return Err(reason);
                }
            }
        }
        Ok(previous)
    }

    /// Puts back the files `write_all` replaced.
    async fn restore(&self, previous: Vec<(String, Option<Vec<u8>>)>) {
        for (name, old) in previous {
            let path = self.path(&name);
            let restored = match old {
                Some(old) => write_atomically(&path, &old).await,
                None => tokio::fs::remove_file(&path)
                    .await
                    .map_err(|err| format!("removing {}: {err}", path.display())),
            };
            if let Err(reason) = restored {
                warn!(file = %path.display(), %reason, "restoring the previous config file failed");
            }
        }
    }

    /// Asks Fluent Bit to reload; `Err` says why it did not.
    async fn reload(&self) -> std::result::Result<(), String> {
        let url = &self.config.reload_url;
        let timeout = self.config.reload_timeout;
        let (status, answer) = tokio::time::timeout(timeout, post(&self.reload))
            .await
            .map_err(|_| format!("reload at {url} timed out after {}", duration_text::format(timeout)))?
            .map_err(|reason| format!("reload at {url} failed: {reason}"))?;
        let text = String::from_utf8_lossy(&answer);
        let code = serde_json::from_slice::<serde_json::Value>(&answer)
            .ok()
            .and_then(|json| json.get("status").and_then(serde_json::Value::as_i64));
        match code {
            Some(0) => Ok(()),
            _ => Err(format!(
                "reload at {url} was refused: HTTP {status}, answer {}",
                text.chars().take(200).collect::<String>()
            )),
        }
    }
}

#[async_trait]
impl ConfigApplier for FluentBitApplier {
    async fn apply(&self, push: &ConfigPush) -> std::result::Result<(), String> {
        for (name, _) in push.bundle.files() {
            check_file_name(name)?;
        }
        let _one_at_a_time = self.applying.lock().await;
        let previous = self.write_all(push).await?;
        if let Err(reason) = self.reload().await {
            self.restore(previous).await;
            return Err(reason);
        }
        let applied = AppliedConfig {
            config: push.config,
            hash: push.hash,
        };
        let state = State {
            config: push.config,
            hash: push.hash,
        };
        // Infallible: ids, versions and hashes serialise as strings.
        let state = serde_json::to_vec_pretty(&state).unwrap_or_default();
        if let Err(reason) = write_atomically(&self.path(STATE_FILE), &state).await {
            // The configuration is in effect; only the record of it failed.
            warn!(%reason, "recording the applied config failed; it is reported as unknown after a restart");
        }
        *self.current.lock().unwrap_or_else(|p| p.into_inner()) = Some(applied);
        info!(config = %push.config, hash = %push.hash, "fluent bit reloaded");
        Ok(())
    }

    fn current(&self) -> Option<AppliedConfig> {
        *self.current.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn check_file_name(name: &str) -> std::result::Result<(), String> {
    let plain = !name.is_empty() && !name.starts_with('.') && !name.contains(['/', '\\', '\0']);
    if plain {
        Ok(())
    } else {
        Err(format!(
            "config file name {name:?} is not a plain file name (no directories, no leading dot)"
        ))
    }
}

fn read_state(path: &Path) -> Result<Option<AppliedConfig>> {
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(err) => return Err(Error::invalid_input(format!("reading {}: {err}", path.display()))),
    };
    let state: State = serde_json::from_slice(&bytes)
        .map_err(|err| Error::invalid_input(format!("state file {}: {err}", path.display())))?;
    Ok(Some(AppliedConfig {
        config: state.config,
        hash: state.hash,
    }))
}

/// Replaces `path` with `bytes` in one step: a synced temporary file renamed over it.
async fn write_atomically(path: &Path, bytes: &[u8]) -> std::result::Result<(), String> {
    use tokio::io::AsyncWriteExt;
    let name = path.file_name().map(|n| n.to_string_lossy()).unwrap_or_default();
    let temporary = path.with_file_name(format!(".{name}.opamp-tmp"));
    let write = async {
        let mut file = tokio::fs::File::create(&temporary).await?;
        file.write_all(bytes).await?;
        file.sync_all().await?;
        tokio::fs::rename(&temporary, path).await
    };
    if let Err(err) = write.await {
        let _ = tokio::fs::remove_file(&temporary).await;
        return Err(format!("writing {}: {err}", path.display()));
    }
    Ok(())
}

/// An empty `POST` to `uri` over plain HTTP/1.1; the status and (at most 64 KiB of) the answer.
async fn post(uri: &Uri) -> std::result::Result<(hyper::StatusCode, Bytes), String> {
    let host = uri.host().unwrap_or_default();
    let port = uri.port_u16().unwrap_or(80);
    let stream = tokio::net::TcpStream::connect((host, port))
        .await
        .map_err(|err| format!("connecting: {err}"))?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|err| format!("HTTP handshake: {err}"))?;
    let connection = tokio::spawn(connection);
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    let authority = uri.authority().map_or(host, |a| a.as_str());
    let request = Request::post(path)
        .header(hyper::header::HOST, authority)
        .body(Empty::<Bytes>::new())
        .map_err(|err| format!("building the request: {err}"))?;
    let answered = async {
        let response = sender
            .send_request(request)
            .await
            .map_err(|err| format!("sending: {err}"))?;
        let status = response.status();
        let body = Limited::new(response.into_body(), MAX_ANSWER)
            .collect()
            .await
            .map_err(|err| format!("reading the answer: {err}"))?
            .to_bytes();
        Ok((status, body))
    }
    .await;
    connection.abort();
    answered
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_names_stay_in_the_directory() {
        for good in ["fluent-bit.conf", "parsers.conf", "a..b"] {
            check_file_name(good).unwrap();
        }
        for bad in ["", "../etc/passwd", "sub/dir.conf", ".opamp-applied.json", "..", "a\\b"] {
            let reason = check_file_name(bad).unwrap_err();
            assert!(reason.contains("not a plain file name"), "{bad}: {reason}");
        }
    }

    #[test]
    fn settings_are_checked() {
        let dir = std::env::temp_dir();
        let err = FluentBitApplier::new(FluentBitConfig::new(&dir).reload_url("https://127.0.0.1:2020/x"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("must be an http:// URL"), "{err}");
        let err = FluentBitApplier::new(FluentBitConfig::new(dir.join("no-such-dir-opamp")))
            .unwrap_err()
            .to_string();
        assert!(err.contains("is not a directory"), "{err}");
    }
}
