//! A stand-in for Fluent Bit's reload endpoint, for testing the applier end to end.
//!
//! [`ReloadStandIn`] listens on loopback and answers `POST`s the way Fluent
//! Bit's `/api/v2/reload` does, after reading the configuration file as a
//! reload would: `{"reload":"done","status":0}` when the file starts with
//! `[SERVICE]`, and HTTP 400 with `{"reload":"failed","status":-1}` when it
//! does not (or is missing). It can also be told to hang, for timeouts.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// A fake Fluent Bit HTTP API with a reload endpoint. Stops when dropped.
#[derive(Debug)]
pub struct ReloadStandIn {
    url: String,
    state: Arc<Mutex<State>>,
    server: JoinHandle<()>,
}

#[derive(Debug, Default)]
struct State {
    reloads: Vec<String>,
    hanging: bool,
}

impl ReloadStandIn {
    /// Serves on a free loopback port; each reload reads `config_file`.
    pub async fn start(config_file: impl Into<PathBuf>) -> std::io::Result<Self> {
        let config_file = config_file.into();
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}/api/v2/reload", listener.local_addr()?);
        let state = Arc::new(Mutex::new(State::default()));
        let shared = Arc::clone(&state);
        let server = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (state, file) = (Arc::clone(&shared), config_file.clone());
                tokio::spawn(async move {
                    let _ = answer(stream, &state, &file).await;
                });
            }
        });
        Ok(ReloadStandIn { url, state, server })
    }

    /// The reload endpoint's URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The configuration each reload read, in order (empty for a missing file).
    pub fn reloads(&self) -> Vec<String> {
        self.lock().reloads.clone()
    }

    /// From now on, accepts reload requests and never answers them (`false` answers again).
    pub fn hang(&self, hanging: bool) {
        self.lock().hanging = hanging;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Drop for ReloadStandIn {
    fn drop(&mut self) {
        self.server.abort();
    }
}

async fn answer(mut stream: TcpStream, state: &Mutex<State>, file: &PathBuf) -> std::io::Result<()> {
    // Read the request head; the reload request has no body.
    let mut head = Vec::new();
    let mut buffer = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 16 * 1024 {
        let read = stream.read(&mut buffer).await?;
        if read == 0 {
            return Ok(());
        }
        head.extend_from_slice(&buffer[..read]);
    }
    let config = tokio::fs::read_to_string(file).await.unwrap_or_default();
    let hanging = {
        let mut state = state.lock().unwrap_or_else(|p| p.into_inner());
        state.reloads.push(config.clone());
        state.hanging
    };
    if hanging {
        std::future::pending::<()>().await;
    }
    let (status, body) = if head.starts_with(b"POST ") && config.starts_with("[SERVICE]") {
        ("200 OK", r#"{"reload":"done","status":0}"#)
    } else {
        ("400 Bad Request", r#"{"reload":"failed","status":-1}"#)
    };
    let response = format!(
        "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}
