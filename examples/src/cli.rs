//! Flag parsers and the little every binary does around its runtime:
//! durations, labels, PEM files, the fleet key and the shutdown signal.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::str::FromStr;
use std::time::Duration;

use opamp_core::time::duration_text;
use opamp_core::{Error, Result};
use opamp_transport::auth::FleetKey;

/// The environment variable holding the fleet key, base64.
pub const FLEET_KEY_ENV: &str = "OPAMP_FLEET_KEY";

/// A duration flag: `300s`, `250ms`, `2m`, `1h` (clap `value_parser`).
pub fn parse_duration(text: &str) -> std::result::Result<Duration, String> {
    duration_text::parse(text).map_err(|err| format!("{err} (write it like 30s, 250ms or 2m)"))
}

/// A `key=value` label flag (clap `value_parser`); the key must not be empty.
pub fn parse_label(text: &str) -> std::result::Result<(String, String), String> {
    match text.split_once('=') {
        Some((key, value)) if !key.trim().is_empty() => Ok((key.trim().to_owned(), value.to_owned())),
        _ => Err(format!("label {text:?} is not key=value")),
    }
}

/// Parses the value of `flag`; an [`Error::InvalidInput`] names the flag.
///
/// For values clap must not parse itself: its errors repeat the value, and
/// a URL's password with it.
pub fn parse_flag<T: FromStr<Err = Error>>(flag: &str, text: &str) -> Result<T> {
    text.parse().map_err(|err| naming(flag, err))
}

/// `err` with `what` (a flag, a variable) in front of its message, when the input was at fault.
fn naming(what: &str, err: Error) -> Error {
    match err {
        Error::InvalidInput { message } => Error::invalid_input(format!("{what}: {message}")),
        other => other,
    }
}

/// Reads the PEM file `path` given with `flag`; the error names both.
pub fn read_pem(path: &Path, flag: &str) -> Result<Vec<u8>> {
    let bytes = std::fs::read(path)
        .map_err(|err| Error::invalid_input(format!("{flag} {}: cannot read it: {err}", path.display())))?;
    if !bytes.windows(11).any(|window| window == b"-----BEGIN ") {
        return Err(Error::invalid_input(format!(
            "{flag} {}: not a PEM file (no -----BEGIN line)",
            path.display()
        )));
    }
    Ok(bytes)
}

/// The TLS flags of the binaries that listen for devices: every listener
/// of the process serves the same certificate.
#[derive(Debug, Clone, clap::Args)]
pub struct TlsArgs {
    /// The server certificate chain (PEM); serves TLS when given, with
    /// --tls-key. SIGHUP reads the files again.
    #[arg(long, env = "OPAMP_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The server's private key (PEM).
    #[arg(long, env = "OPAMP_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// The CA (PEM) client certificates must chain to: every client must present one (mTLS).
    #[arg(long, env = "OPAMP_TLS_CLIENT_CA", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,
}

impl TlsArgs {
    /// The TLS settings from the files, read now (at start, and again on
    /// SIGHUP); none without a certificate.
    pub fn server_tls(&self) -> Result<Option<opamp_transport::tls::ServerTls>> {
        let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) else {
            return Ok(None);
        };
        let mut tls = opamp_transport::tls::ServerTls::new(read_pem(cert, "--tls-cert")?, read_pem(key, "--tls-key")?);
        if let Some(ca) = &self.tls_client_ca {
            tls = tls.client_ca(read_pem(ca, "--tls-client-ca")?);
        }
        Ok(Some(tls))
    }
}

/// The fleet key from [`FLEET_KEY_ENV`], if it is set and not empty; an
/// error naming the variable if it is not a usable key.
pub fn fleet_key_from_env() -> Result<Option<FleetKey>> {
    match std::env::var(FLEET_KEY_ENV) {
        Ok(text) if !text.trim().is_empty() => FleetKey::from_base64(&text)
            .map(Some)
            .map_err(|err| naming(FLEET_KEY_ENV, err)),
        Ok(_) | Err(std::env::VarError::NotPresent) => Ok(None),
        Err(std::env::VarError::NotUnicode(_)) => {
            Err(Error::invalid_input(format!("{FLEET_KEY_ENV} is not UTF-8 text")))
        }
    }
}

/// Ends a binary: on error prints `{binary}: {error}` and each cause to
/// stderr and fails (exit code 1).
pub fn exit_code(binary: &str, result: Result<()>) -> ExitCode {
    let Err(err) = result else {
        return ExitCode::SUCCESS;
    };
    eprintln!("{binary}: {err}");
    let mut said = err.to_string();
    let mut source = std::error::Error::source(&err);
    while let Some(cause) = source {
        // Some causes wrap one that says the same; say it once.
        let text = cause.to_string();
        if text != said {
            eprintln!("  caused by: {text}");
            said = text;
        }
        source = cause.source();
    }
    ExitCode::FAILURE
}

/// Each SIGHUP the process receives (never, where there are no such
/// signals): operators send it to have renewed certificates read again.
pub fn reload_signals() -> tokio::sync::mpsc::Receiver<()> {
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::hangup()) {
            Ok(mut hangups) => {
                tokio::spawn(async move {
                    while hangups.recv().await.is_some() {
                        // One reload pending covers any number of signals.
                        let _ = tx.try_send(());
                    }
                });
            }
            Err(err) => tracing::warn!(error = %err, "cannot listen for SIGHUP"),
        }
    }
    #[cfg(not(unix))]
    drop(tx);
    rx
}

/// Waits for Ctrl-C (SIGINT) or, on Unix, SIGTERM; returns which came.
///
/// If a handler cannot be installed, only the other one is waited for (and
/// the failure logged), so a process is never left without a way to stop.
pub async fn shutdown_signal() -> &'static str {
    let interrupt = async {
        match tokio::signal::ctrl_c().await {
            Ok(()) => "SIGINT",
            Err(err) => {
                tracing::warn!(error = %err, "cannot listen for Ctrl-C");
                std::future::pending().await
            }
        }
    };
    #[cfg(unix)]
    let terminate = async {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut terminate) => {
                terminate.recv().await;
                "SIGTERM"
            }
            Err(err) => {
                tracing::warn!(error = %err, "cannot listen for SIGTERM");
                std::future::pending().await
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<&'static str>();
    tokio::select! {
        name = interrupt => name,
        name = terminate => name,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_and_labels() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert!(parse_duration("soon").unwrap_err().contains("30s"));
        assert_eq!(parse_label("ring=canary"), Ok(("ring".into(), "canary".into())));
        assert_eq!(parse_label("empty="), Ok(("empty".into(), String::new())));
        assert!(parse_label("=x").is_err());
        assert!(parse_label("ring").unwrap_err().contains("key=value"));
    }

    #[test]
    fn pem_files_are_checked() {
        let dir = std::env::temp_dir().join(format!("opamp-examples-pem-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let missing = read_pem(&dir.join("missing.pem"), "--tls-cert")
            .unwrap_err()
            .to_string();
        assert!(
            missing.contains("--tls-cert") && missing.contains("missing.pem"),
            "{missing}"
        );
        let not_pem = dir.join("not.pem");
        std::fs::write(&not_pem, "hello").unwrap();
        assert!(
            read_pem(&not_pem, "--tls-key")
                .unwrap_err()
                .to_string()
                .contains("not a PEM file")
        );
        let pem = dir.join("ok.pem");
        std::fs::write(&pem, "-----BEGIN CERTIFICATE-----\n-----END CERTIFICATE-----\n").unwrap();
        assert!(read_pem(&pem, "--tls-cert").is_ok());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
