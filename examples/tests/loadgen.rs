//! The load generator's idle-connection benchmark runs end to end (tiny, and
//! without judging its figures: benchmarks are measured, not asserted).

use std::process::Command;

/// Runs a tiny `benchmark` (`grpc-idle`, `opamp-idle`) with `extra` arguments; its table.
fn tiny_idle(benchmark: &str, extra: &[&str]) -> String {
    let output = Command::new(env!("CARGO_BIN_EXE_opamp-loadgen"))
        .args([
            benchmark,
            "--low",
            "20",
            "--high",
            "60",
            "--rounds",
            "1",
            "--per-process",
            "25",
        ])
        .args(extra)
        .output()
        .expect("the load generator runs");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "stdout:\n{stdout}\nstderr:\n{stderr}");
    stdout
}

#[test]
fn grpc_idle_runs_both_servers_and_prints_the_table() {
    let stdout = tiny_idle("grpc-idle", &[]);
    assert!(stdout.contains("| bare tonic |"), "{stdout}");
    assert!(stdout.contains("| supervisor (memory store + bus) |"), "{stdout}");
    assert!(
        stdout.contains("Supervisor / bare tonic: memory per device"),
        "{stdout}"
    );
}

#[test]
fn grpc_idle_measures_opamp_websocket_servers() {
    let stdout = tiny_idle("grpc-idle", &["--servers", "bare,opamp-transport,opamp-supervisor"]);
    assert!(stdout.contains("| OpAMP WebSocket transport alone |"), "{stdout}");
    assert!(
        stdout.contains("OpampSupervisor / bare tonic: memory per device"),
        "{stdout}"
    );
}

#[test]
fn devices_without_a_fleet_key_are_refused_with_a_clear_error() {
    let output = Command::new(env!("CARGO_BIN_EXE_opamp-loadgen"))
        .args(["devices", "--url", "http://127.0.0.1:1", "--count", "1"])
        .env_remove("OPAMP_FLEET_KEY")
        .output()
        .expect("the load generator runs");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("OPAMP_FLEET_KEY"), "{stderr}");
}

#[test]
fn opamp_idle_measures_opamp_agents_against_mosquitto() {
    let installed = ["/usr/sbin/mosquitto", "/usr/bin/mosquitto"]
        .iter()
        .any(|path| std::path::Path::new(path).exists());
    if !installed {
        let why = "mosquitto is not installed (scripts/services/mosquitto start /tmp/mosquitto installs it)";
        assert!(std::env::var_os("CI").is_none(), "{why}");
        eprintln!("\n!!! SKIPPED: {why}\n");
        return;
    }
    let stdout = tiny_idle(
        "opamp-idle",
        &[
            "--servers",
            "mosquitto,opamp-transport,opamp-supervisor",
            "--ws-read-chunk",
            "512",
        ],
    );
    assert!(stdout.contains("| Mosquitto, idle MQTT 3.1.1 clients |"), "{stdout}");
    assert!(stdout.contains("| OpAMP WebSocket transport alone |"), "{stdout}");
    assert!(
        stdout.contains("OpampSupervisor / Mosquitto: memory per device"),
        "{stdout}"
    );
}

#[test]
fn command_latency_runs_against_the_server_and_prints_the_table() {
    let output = Command::new(env!("CARGO_BIN_EXE_opamp-loadgen"))
        .args([
            "command-latency",
            "--devices",
            "60",
            "--rates",
            "50",
            "--seconds",
            "1",
            "--per-process",
            "30",
            "--server",
            env!("CARGO_BIN_EXE_opamp-server"),
        ])
        .output()
        .expect("the load generator runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "stdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(stdout.contains("60 devices connected over gRPC"), "{stdout}");
    // Every command was acknowledged: the last column counts those that were not.
    assert!(
        stdout.contains("| 50/s | 50 |") && stdout.trim_end().ends_with("| 0 |"),
        "{stdout}"
    );
}
