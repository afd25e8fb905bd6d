//! Structured logs with `tracing`, to stderr, as text or JSON lines.

use std::io::IsTerminal;

use clap::{Args, ValueEnum};
use opamp_core::{Error, Result};
use tracing_subscriber::EnvFilter;

/// How logs are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// One human-readable line per event.
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

/// The logging flags every binary takes (`#[command(flatten)]`).
#[derive(Debug, Clone, Args)]
pub struct LogArgs {
    /// Log filter, e.g. `warn`, `info` or `info,opamp_core=debug` (logs go to stderr).
    #[arg(long = "log", value_name = "FILTER", env = "RUST_LOG", default_value = "info")]
    pub filter: String,
    /// `text`, or `json` for one JSON object per line.
    #[arg(long, value_enum, env = "OPAMP_LOG_FORMAT", default_value = "text")]
    pub log_format: LogFormat,
}

impl LogArgs {
    /// Installs the global subscriber; [`Error::InvalidInput`] names a filter that does not parse.
    pub fn init(&self) -> Result<()> {
        let filter = EnvFilter::try_new(&self.filter)
            .map_err(|err| Error::invalid_input(format!("log filter {:?} (--log / RUST_LOG): {err}", self.filter)))?;
        let builder = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .with_ansi(std::io::stderr().is_terminal());
        let installed = match self.log_format {
            LogFormat::Text => builder.try_init(),
            LogFormat::Json => builder.json().try_init(),
        };
        installed.map_err(|err| Error::invalid_input(format!("installing the log subscriber: {err}")))
    }
}
