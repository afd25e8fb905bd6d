//! The Fluent Bit applier against a stand-in of Fluent Bit's reload endpoint.

use std::path::{Path, PathBuf};
use std::time::Duration;

use opamp_core::runtime::agent::ConfigApplier;
use opamp_core::runtime::fluent_bit::{FluentBitApplier, FluentBitConfig, STATE_FILE};
use opamp_core::testkit::fluent_bit::ReloadStandIn;
use opamp_core::transport::ConfigPush;
use opamp_core::{AgentType, ConfigBundle, ConfigFile, ConfigRef, ConfigVersion};

const CONF: &str = "fluent-bit.conf";

/// A fresh directory under the system's temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        let path = std::env::temp_dir().join(format!("opamp-fluent-bit-{name}-{}", uuid_like()));
        std::fs::create_dir_all(&path).unwrap();
        TempDir(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn uuid_like() -> String {
    opamp_core::CorrelationId::new().to_string()
}

fn push(version: &str, files: &[(&str, &str)]) -> ConfigPush {
    let mut bundle = ConfigBundle::new();
    for (name, body) in files {
        bundle.insert(*name, ConfigFile::new("text/plain", *body)).unwrap();
    }
    let config = ConfigRef::new(
        AgentType::new("fluentbit").unwrap(),
        ConfigVersion::new(version).unwrap(),
    );
    ConfigPush::new(None, config, bundle)
}

fn applier(dir: &Path, url: &str) -> FluentBitApplier {
    let config = FluentBitConfig::new(dir)
        .reload_url(url)
        .reload_timeout(Duration::from_millis(500));
    FluentBitApplier::new(config).unwrap()
}

fn read(dir: &Path, name: &str) -> Option<String> {
    std::fs::read_to_string(dir.join(name)).ok()
}

#[tokio::test]
async fn applies_reloads_and_remembers_across_restarts() {
    let dir = TempDir::new("applies");
    let fluent_bit = ReloadStandIn::start(dir.0.join(CONF)).await.unwrap();
    let applier = applier(&dir.0, fluent_bit.url());
    assert_eq!(applier.current(), None);

    let v1 = push(
        "v1",
        &[(CONF, "[SERVICE]\n    flush 1\n"), ("parsers.conf", "[PARSER]\n")],
    );
    applier.apply(&v1).await.unwrap();
    assert_eq!(
        fluent_bit.reloads(),
        vec!["[SERVICE]\n    flush 1\n".to_owned()],
        "the reload read the new file"
    );
    assert_eq!(read(&dir.0, "parsers.conf").as_deref(), Some("[PARSER]\n"));
    assert_eq!(
        applier.current().map(|a| (a.config, a.hash)),
        Some((v1.config, v1.hash))
    );

    // A restarted agent reports what it runs.
    let restarted = self::applier(&dir.0, fluent_bit.url());
    assert_eq!(restarted.current().map(|a| a.hash), Some(v1.hash));
    let leftovers: Vec<_> = std::fs::read_dir(&dir.0)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.ends_with(".opamp-tmp"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[tokio::test]
async fn a_refused_reload_restores_the_previous_files() {
    let dir = TempDir::new("refused");
    let fluent_bit = ReloadStandIn::start(dir.0.join(CONF)).await.unwrap();
    let applier = applier(&dir.0, fluent_bit.url());
    let v1 = push("v1", &[(CONF, "[SERVICE]\n    # v1\n")]);
    applier.apply(&v1).await.unwrap();

    let broken = push("v2", &[(CONF, "[INPUT]\n    this is not valid\n"), ("extra.conf", "x")]);
    let reason = applier.apply(&broken).await.unwrap_err();
    assert!(reason.contains("refused") && reason.contains("400"), "{reason}");
    assert_eq!(
        fluent_bit.reloads().len(),
        2,
        "the broken file was what the reload read"
    );
    assert_eq!(read(&dir.0, CONF).as_deref(), Some("[SERVICE]\n    # v1\n"), "restored");
    assert_eq!(
        read(&dir.0, "extra.conf"),
        None,
        "a file that did not exist is removed again"
    );
    assert_eq!(applier.current().map(|a| a.hash), Some(v1.hash));
    assert_eq!(
        self::applier(&dir.0, fluent_bit.url()).current().map(|a| a.hash),
        Some(v1.hash)
    );
}

#[tokio::test]
async fn a_reload_that_times_out_or_cannot_connect_fails_and_restores() {
    let dir = TempDir::new("timeout");
    let fluent_bit = ReloadStandIn::start(dir.0.join(CONF)).await.unwrap();
    let applier = applier(&dir.0, fluent_bit.url());
    fluent_bit.hang(true);
    let reason = applier.apply(&push("v1", &[(CONF, "[SERVICE]\n")])).await.unwrap_err();
    assert!(reason.contains("timed out after 500ms"), "{reason}");
    assert_eq!(read(&dir.0, CONF), None);
    assert_eq!(applier.current(), None);

    let url = fluent_bit.url().to_owned();
    drop(fluent_bit);
    tokio::time::sleep(Duration::from_millis(50)).await;
    let reason = applier.apply(&push("v1", &[(CONF, "[SERVICE]\n")])).await.unwrap_err();
    assert!(reason.contains(&url) && reason.contains("connecting"), "{reason}");
    assert_eq!(read(&dir.0, CONF), None);
}

#[tokio::test]
async fn bad_names_and_a_garbled_state_file_are_named() {
    let dir = TempDir::new("bad");
    let fluent_bit = ReloadStandIn::start(dir.0.join(CONF)).await.unwrap();
    let applier = applier(&dir.0, fluent_bit.url());
    let reason = applier
        .apply(&push("v1", &[("../escape.conf", "[SERVICE]\n")]))
        .await
        .unwrap_err();
    assert!(
        reason.contains("\"../escape.conf\" is not a plain file name"),
        "{reason}"
    );
    assert!(
        fluent_bit.reloads().is_empty(),
        "nothing was written, so nothing reloaded"
    );

    std::fs::write(dir.0.join(STATE_FILE), b"{not json").unwrap();
    let err = FluentBitApplier::new(FluentBitConfig::new(&dir.0))
        .unwrap_err()
        .to_string();
    assert!(err.contains(STATE_FILE), "{err}");
}
