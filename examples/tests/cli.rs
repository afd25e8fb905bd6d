//! Bad flags, URLs and credentials stop opamp-supervisor and opamp-agent at
//! once with a message naming what was wrong (no service is reached).

use std::process::Command;

/// A fleet key of 32 bytes, base64.
const KEY: &str = "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=";

/// Runs `binary` with `args` (and the fleet key, when given); it must fail. Returns its stderr.
fn fails(binary: &str, args: &[&str], fleet_key: Option<&str>) -> String {
    let mut command = Command::new(binary);
    command.args(args).env_remove("OPAMP_FLEET_KEY").env_remove("RUST_LOG");
    for name in [
        "OPAMP_STORE",
        "OPAMP_BUS",
        "OPAMP_SERVERS",
        "OPAMP_DEVICE_ID",
        "OPAMP_DEVICE_TOKEN",
    ] {
        command.env_remove(name);
    }
    if let Some(key) = fleet_key {
        command.env("OPAMP_FLEET_KEY", key);
    }
    let output = command.output().expect("the binary runs");
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(!output.status.success(), "{binary} {args:?} succeeded:\n{stderr}");
    stderr
}

fn supervisor(args: &[&str], fleet_key: Option<&str>) -> String {
    fails(env!("CARGO_BIN_EXE_opamp-supervisor"), args, fleet_key)
}

fn agent(args: &[&str], fleet_key: Option<&str>) -> String {
    fails(env!("CARGO_BIN_EXE_opamp-agent"), args, fleet_key)
}

#[test]
fn supervisor_names_a_bad_store_or_bus_url() {
    let err = supervisor(&["--id", "s1", "--store", "mongodb://db:27017"], Some(KEY));
    assert!(
        err.contains("--store") && err.contains("unknown scheme `mongodb`"),
        "{err}"
    );
    let err = supervisor(&["--id", "s1", "--store", "redis://:hunter2@h:0/"], Some(KEY));
    assert!(err.contains("has port \"0\"") && !err.contains("hunter2"), "{err}");
    let err = supervisor(&["--id", "s1", "--bus", "kafka://k:9092?partitions=3"], Some(KEY));
    assert!(
        err.contains("--bus") && err.contains("unknown parameter `partitions`"),
        "{err}"
    );
    let err = supervisor(&["--id", "s1", "--bus", "127.0.0.1:9092"], Some(KEY));
    assert!(err.contains("has no scheme"), "{err}");
}

#[test]
fn supervisor_names_a_missing_or_bad_fleet_key_and_tls_files() {
    let err = supervisor(&["--id", "s1", "--listen", "127.0.0.1:0"], None);
    assert!(
        err.starts_with("opamp-supervisor: ") && err.contains("OPAMP_FLEET_KEY"),
        "{err}"
    );
    let err = supervisor(&["--id", "s1", "--listen", "127.0.0.1:0"], Some("c2hvcnQ="));
    assert!(
        err.contains("OPAMP_FLEET_KEY") && err.contains("at least 16 bytes"),
        "{err}"
    );
    let err = supervisor(&["--id", "s1", "--auth", "client-cert"], None);
    assert!(err.contains("--tls-client-ca"), "{err}");
    let err = supervisor(
        &[
            "--id",
            "s1",
            "--tls-cert",
            "/nonexistent/cert.pem",
            "--tls-key",
            "/nonexistent/key.pem",
        ],
        Some(KEY),
    );
    assert!(err.contains("--tls-cert /nonexistent/cert.pem"), "{err}");
    let err = supervisor(&["--id", "s 1"], Some(KEY));
    assert!(err.contains("--id"), "{err}");
    let err = supervisor(&["--id", "s1", "--lease-ttl", "soon"], Some(KEY));
    assert!(err.contains("--lease-ttl") && err.contains("30s"), "{err}");
    let err = supervisor(&["--id", "s1", "--log", "info,[", "--listen", "127.0.0.1:0"], Some(KEY));
    assert!(err.contains("log filter"), "{err}");
}

#[test]
fn agent_names_what_it_lacks() {
    let base = ["--server", "http://127.0.0.1:1", "--device", "d1"];
    let err = agent(&[&base[..], &["--applier", "memory"]].concat(), None);
    assert!(
        err.contains("no credential") && err.contains("OPAMP_FLEET_KEY"),
        "{err}"
    );
    let err = agent(&base, Some(KEY));
    assert!(err.contains("--fluent-bit-config-dir"), "{err}");
    let err = agent(
        &[&base[..], &["--fluent-bit-config-dir", "/nonexistent/fluent-bit"]].concat(),
        Some(KEY),
    );
    assert!(err.contains("/nonexistent/fluent-bit"), "{err}");
    let err = agent(
        &[&base[..], &["--applier", "memory", "--label", "ring"]].concat(),
        Some(KEY),
    );
    assert!(err.contains("key=value"), "{err}");
    let err = agent(
        &["--server", "not a url", "--device", "d1", "--applier", "memory"],
        Some(KEY),
    );
    assert!(err.contains("not a url"), "{err}");
    let err = agent(&["--device", "d1", "--applier", "memory"], Some(KEY));
    assert!(err.contains("--server"), "{err}");
}
