//! opamp-server as a real process: the REST API over the control plane, with
//! a supervisor in the same process (`--grpc-listen`) on memory backends, and
//! an opamp-agent process connected to it over gRPC.

use base64::Engine as _;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

mod common;
use common::{Proc, wait_until};

const TOKEN: &str = "ops:operator:an-operator-secret-for-tests";
const BEARER: &str = "an-operator-secret-for-tests";

/// One HTTP/1.1 request with the operator's token; the status and the body.
async fn http(address: &str, method: &str, path: &str, body: Option<&Value>) -> (u16, String) {
    let body = body.map(Value::to_string).unwrap_or_default();
    let headers = format!("Authorization: Bearer {BEARER}\r\nContent-Type: application/json\r\n");
    common::http(address, method, path, &headers, &body).await
}

fn json(body: &str) -> Value {
    serde_json::from_str(body).unwrap_or_else(|err| panic!("{err}: {body}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_serves_the_api_and_a_supervisor_in_one_process() {
    let key = base64::engine::general_purpose::STANDARD.encode(uuid::Uuid::new_v4().as_bytes().repeat(2));
    let common::OneProcess {
        proc: mut server,
        api: http_address,
        grpc: grpc_address,
        opamp: opamp_address,
    } = common::one_process(TOKEN, &key, &["--command-timeout", "5s"]).await;
    // A client that connects and sends nothing, and one that stops halfway
    // through a header: the API closes both (ServeConfig's 10 s header deadline).
    let silent_since = std::time::Instant::now();
    let mut silent = TcpStream::connect(&http_address).await.unwrap();
    let mut half_header = TcpStream::connect(&http_address).await.unwrap();
    half_header
        .write_all(b"GET /api/v1/devices HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();

    let _agent = Proc::spawn(
        "opamp-agent",
        env!("CARGO_BIN_EXE_opamp-agent"),
        &[
            "--server".into(),
            format!("http://{grpc_address}"),
            "--device".into(),
            "edge-1".into(),
            "--agent-type".into(),
            "fluentbit".into(),
            "--applier".into(),
            "memory".into(),
        ],
        Some(&key),
    );
    // The same agent binary over OpAMP: WebSocket, and plain HTTP polling.
    let mut opamp_agents = Vec::new();
    for (device, url) in [
        ("edge-ws", format!("ws://{opamp_address}/v1/opamp")),
        ("edge-poll", format!("opamp+http://{opamp_address}/v1/opamp")),
    ] {
        let args = [
            "--server".into(),
            url,
            "--device".into(),
            device.into(),
            "--applier".into(),
            "memory".into(),
            "--poll-interval".into(),
            "200ms".into(),
        ];
        opamp_agents.push(Proc::spawn(
            "opamp-agent",
            env!("CARGO_BIN_EXE_opamp-agent"),
            &args,
            Some(&key),
        ));
    }
    for device in ["edge-1", "edge-ws", "edge-poll"] {
        wait_until(&format!("{device} is listed online"), || async {
            let (status, body) = http(&http_address, "GET", "/api/v1/devices?online=true", None).await;
            status == 200 && body.contains(&format!("\"{device}\""))
        })
        .await;
        let path = format!("/api/v1/devices/{device}/emission");
        let (status, body) = http(&http_address, "POST", &path, Some(&serde_json::json!({"on": true}))).await;
        assert_eq!(status, 202, "{body}");
        let id = json(&body)["correlation_id"].as_str().unwrap().to_owned();
        let (status, body) = http(&http_address, "GET", &format!("/api/v1/commands/{id}?wait=10s"), None).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(json(&body)["state"], "acked", "{device}: {body}");
        let (_, body) = http(&http_address, "GET", &format!("/api/v1/devices/{device}"), None).await;
        assert_eq!(json(&body)["emission"], true, "{body}");
    }

    let (status, body) = http(&http_address, "GET", "/health/ready", None).await;
    assert_eq!(status, 200, "{body}");
    let (status, metrics) = http(&http_address, "GET", "/metrics", None).await;
    assert_eq!(status, 200);
    assert!(metrics.contains("opamp_commands_total"), "{metrics}");
    assert!(
        metrics.contains("opamp_devices_online{supervisor=\"server-supervisor\"} 3"),
        "{metrics}"
    );

    // Without a valid token: 401.
    let mut stream = TcpStream::connect(&http_address).await.unwrap();
    stream
        .write_all(
            format!("GET /api/v1/devices HTTP/1.1\r\nHost: {http_address}\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    assert!(response.starts_with("HTTP/1.1 401"), "{response}");

    for (what, stream) in [("silent", &mut silent), ("half a header", &mut half_header)] {
        let left = std::time::Duration::from_secs(20).saturating_sub(silent_since.elapsed());
        let mut rest = Vec::new();
        tokio::time::timeout(left, stream.read_to_end(&mut rest))
            .await
            .unwrap_or_else(|_| panic!("a {what} connection still open 20 s after it connected"))
            .unwrap();
    }

    server.terminate().await;
}

#[tokio::test]
async fn bad_flags_name_what_is_wrong() {
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_opamp-server"))
        .args(["--listen", "127.0.0.1:0", "--tokens", "ops:admin:0123456789abcdef0123"])
        .output()
        .await
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("entry 1 (ops)") && !stderr.contains("0123456789abcdef0123"),
        "{stderr}"
    );

    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_opamp-server"))
        .args([
            "--listen",
            "127.0.0.1:0",
            "--grpc-listen",
            "127.0.0.1:0",
            "--tokens",
            TOKEN,
        ])
        .env_remove("OPAMP_FLEET_KEY")
        .output()
        .await
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("OPAMP_FLEET_KEY"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opamp_token_issues_tokens_that_name_their_device_and_expire() {
    let key = base64::engine::general_purpose::STANDARD.encode([5u8; 32]);
    let run = |args: &[&str], key: Option<&str>| {
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_opamp-token"));
        command.args(args).env_remove("OPAMP_FLEET_KEY");
        if let Some(key) = key {
            command.env("OPAMP_FLEET_KEY", key);
        }
        command.output().unwrap()
    };
    let fleet = opamp_transport::auth::FleetKey::from_base64(&key).unwrap();
    let output = run(&["--device", "d1", "--expires-in", "2h"], Some(&key));
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let token = String::from_utf8(output.stdout).unwrap();
    let now = std::time::SystemTime::now();
    assert_eq!(fleet.device_of_at(token.trim(), now).unwrap().as_str(), "d1");
    let later = now + std::time::Duration::from_secs(3 * 3600);
    assert!(fleet.device_of_at(token.trim(), later).is_err(), "expired by then");

    let output = run(&["--device", "d1"], None);
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("OPAMP_FLEET_KEY must hold the fleet key"));
}
