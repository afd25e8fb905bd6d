//! opamp-server under attack, as a real process on loopback (issue #24): a
//! supervisor in the process serving gRPC and OpAMP, one legitimate agent,
//! and clients that spend the server's resources without credentials —
//! silent connections by the hundred on every port, messages of 60 MiB
//! begun with a bogus bearer token and stalled, slow headers, gzip bombs, a
//! device flooding reports, a revoked device, forged, expired and other
//! devices' tokens, garbage on every port.
//! Throughout, the server's memory stays within a stated bound, every
//! attacking connection is closed within its deadline, and the legitimate
//! agent stays connected and has a toggle acked.
//!
//! A small fleet of attackers here; `scripts/attack/each` runs each attack
//! at full size (a thousand connections a port) against a build of your
//! choice, for the figures in docs/performance.md.

use std::time::{Duration, Instant, SystemTime};

use base64::Engine as _;
use opamp_core::DeviceId;
use opamp_core::transport::{AgentConnector as _, DeviceHello, FromDevice, StatusReport};
use opamp_transport::auth::FleetKey;
use opamp_transport::websocket::{OpampConnector, OpampConnectorConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

mod common;
use common::Proc;

const TOKEN: &str = "ops:operator:an-operator-secret-for-tests";
const BEARER: &str = "an-operator-secret-for-tests";
/// What the server may grow to while attacked: its idle size is about 25 MB.
const RSS_BOUND_MB: u64 = 120;
/// Silent connections per port.
const SILENT: usize = 200;
/// How big a message each stalling client announces.
const STALLED: usize = 60 << 20;

/// The server's peak resident memory so far, in MB.
fn peak_rss_mb(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("the server runs");
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).expect("VmHWM");
    line.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() / 1024
}

/// Whether the server closed `stream` within `within` (anything it sends first is read and dropped).
async fn closed_within(stream: &mut TcpStream, within: Duration) -> bool {
    let mut scratch = vec![0; 64 * 1024];
    let end = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(end, stream.read(&mut scratch)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue,
            Err(_) => return false,
        }
    }
}

/// Writes what it can of `bytes` within `within`: a client sending as fast as it is read.
async fn push(stream: &mut TcpStream, bytes: usize, within: Duration) {
    let chunk = vec![b'x'; 1 << 20];
    let end = tokio::time::Instant::now() + within;
    let mut sent = 0;
    while sent < bytes {
        match tokio::time::timeout_at(end, stream.write(&chunk)).await {
            Ok(Ok(n)) if n > 0 => sent += n,
            _ => return,
        }
    }
}

/// An `opamp-agent` as device `legit` over OpAMP, its token derived from the
/// fleet key unless `token` is given.
fn legit_agent(opamp: &str, fleet_key: &str, token: Option<&str>) -> Proc {
    agent("legit", opamp, fleet_key, token)
}

/// An `opamp-agent` as `device` over OpAMP, its token derived from the
/// fleet key unless `token` is given.
fn agent(device: &str, opamp: &str, fleet_key: &str, token: Option<&str>) -> Proc {
    let mut args: Vec<String> = ["--device", device, "--applier", "memory", "--server"]
        .map(String::from)
        .into();
    args.push(format!("ws://{opamp}/v1/opamp"));
    if let Some(token) = token {
        args.extend(["--token".to_owned(), token.to_owned()]);
    }
    Proc::spawn("opamp-agent", env!("CARGO_BIN_EXE_opamp-agent"), &args, Some(fleet_key))
}

/// The server's answer to a WebSocket upgrade with `token`.
async fn upgrade(address: &str, token: &str) -> String {
    let mut stream = TcpStream::connect(address).await.unwrap();
    let request = format!(
        "GET /v1/opamp HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
         Authorization: Bearer {token}\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut answer = vec![0; 4096];
    let read = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut answer))
        .await
        .expect("answered in time")
        .unwrap();
    String::from_utf8_lossy(&answer[..read]).into_owned()
}

async fn rest(address: &str, method: &str, path: &str, body: &str) -> (u16, String) {
    let headers = format!("Authorization: Bearer {BEARER}\r\nContent-Type: application/json\r\n");
    common::http(address, method, path, &headers, body).await
}

/// Whether the legitimate agent is listed online.
async fn legit_online(api: &str) -> bool {
    let (status, body) = rest(api, "GET", "/api/v1/devices?online=true", "").await;
    status == 200 && body.contains("\"legit\"")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_keeps_serving_its_agents_while_attacked() {
    let key = base64::engine::general_purpose::STANDARD.encode(uuid::Uuid::new_v4().as_bytes().repeat(2));
    let common::OneProcess {
        proc: mut server,
        api,
        grpc,
        opamp,
    } = common::one_process(TOKEN, &key, &[]).await;
    let _agent = legit_agent(&opamp, &key, None);
    common::wait_until("the legitimate agent online", || legit_online(&api)).await;
    let pid = server.pid();
    let started = Instant::now();

    // Silent connections on every port: the REST API and OpAMP close them at
    // their header deadline (10 s); gRPC at its handshake deadline (10 s too).
    let mut silent = Vec::new();
    for address in [&api, &opamp, &grpc] {
        for _ in 0..SILENT {
            silent.push(TcpStream::connect(address.as_str()).await.unwrap());
        }
    }
    // Slow ones, half a header and then nothing: the same deadline.
    for address in [&api, &opamp] {
        for _ in 0..SILENT {
            let mut slow = TcpStream::connect(address.as_str()).await.unwrap();
            slow.write_all(b"GET /v1/opamp HTTP/1.1\r\nHost: x\r\nX-Slow: ")
                .await
                .unwrap();
            silent.push(slow);
        }
    }

    // 60 MiB messages begun with a bogus bearer token, then stalled: of the
    // v1 form, which names no device, so that only the first message can
    // prove it wrong (the costliest case).
    let mut stalled = Vec::new();
    for n in 0..4 {
        let mut stream = TcpStream::connect(opamp.as_str()).await.unwrap();
        if n % 2 == 0 {
            stream
                .write_all(
                    b"GET /v1/opamp HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                      Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
                      Authorization: Bearer v1.AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA\r\n\r\n",
                )
                .await
                .unwrap();
            let mut upgrade = [0; 1024];
            let read = stream.read(&mut upgrade).await.unwrap();
            assert!(
                upgrade[..read].starts_with(b"HTTP/1.1 101"),
                "{}",
                String::from_utf8_lossy(&upgrade[..read])
            );
            // A masked binary frame announcing 60 MiB (64-bit length), mask key 0.
            let mut frame = vec![0x82, 0xff];
            frame.extend_from_slice(&(STALLED as u64).to_be_bytes());
            frame.extend_from_slice(&[0; 4]);
            stream.write_all(&frame).await.unwrap();
        } else {
            let head = format!(
                "POST /v1/opamp HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-protobuf\r\n\
                 Authorization: Bearer v1.AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA\r\nContent-Length: {STALLED}\r\n\r\n"
            );
            stream.write_all(head.as_bytes()).await.unwrap();
        }
        push(&mut stream, STALLED / 2, Duration::from_secs(3)).await;
        stalled.push(stream);
    }

    // Forged, expired and other devices' tokens: refused 401 from the
    // headers, before the upgrade.
    let fleet = FleetKey::from_base64(&key).unwrap();
    let legit = DeviceId::new("legit").unwrap();
    let an_hour_ago = SystemTime::now() - Duration::from_secs(3600);
    let real = fleet.token(&legit);
    let forged = real.as_str().replacen(".", ".0", 2);
    let other_fleet = FleetKey::new([3u8; 32]).unwrap().token(&legit);
    let expired = fleet.token_expiring(&legit, an_hour_ago);
    for (what, token) in [
        ("forged", forged.as_str()),
        ("another fleet's", other_fleet.as_str()),
        ("expired", expired.as_str()),
    ] {
        let answer = upgrade(&opamp, token).await;
        assert!(answer.starts_with("HTTP/1.1 401"), "a {what} token: {answer}");
    }
    // An impersonator with a real token of its own, claiming the
    // legitimate device, is refused; the legitimate agent keeps its session.
    let intruder = fleet.token(&DeviceId::new("intruder").unwrap());
    let mut impersonator = legit_agent(&opamp, &key, Some(intruder.as_str()));
    impersonator
        .wait_for_log("token for device legit is for device intruder")
        .await;
    impersonator.terminate().await;

    // A device whose token was stolen is revoked: its session is closed, and
    // every registration after is refused, naming the revocation.
    let mut stolen = agent("stolen", &opamp, &key, None);
    common::wait_until("the stolen device online", || async {
        let (status, body) = rest(&api, "GET", "/api/v1/devices/stolen", "").await;
        status == 200 && body.contains("\"status\":\"online\"")
    })
    .await;
    let (status, body) = rest(
        &api,
        "PUT",
        "/api/v1/revocations/stolen",
        r#"{"reason": "token stolen"}"#,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    stolen.wait_for_log("device stolen was revoked at").await;
    stolen.wait_for_log("token stolen").await;
    common::wait_until("the revoked device offline", || async {
        let (_, detail) = rest(&api, "GET", "/api/v1/devices/stolen", "").await;
        detail.contains("\"status\":\"offline\"") && detail.contains("\"reason\":\"token stolen\"")
    })
    .await;
    stolen.terminate().await;

    // Gzip bombs (256 MiB of zeros, a quarter of a MiB on the wire) under an
    // unchecked token: refused 413 as soon as they inflate past the limit.
    let bomb = {
        use std::io::Write as _;
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        let zeros = vec![0u8; 1 << 20];
        for _ in 0..256 {
            encoder.write_all(&zeros).unwrap();
        }
        encoder.finish().unwrap()
    };
    for _ in 0..2 {
        let started = Instant::now();
        let mut stream = TcpStream::connect(opamp.as_str()).await.unwrap();
        let head = format!(
            "POST /v1/opamp HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-protobuf\r\nContent-Encoding: gzip\r\n\
             Authorization: Bearer v1.AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA\r\nContent-Length: {}\r\n\r\n",
            bomb.len()
        );
        stream.write_all(head.as_bytes()).await.unwrap();
        // The server may answer and close before it has all.
        let _ = stream.write_all(&bomb).await;
        let mut answer = vec![0; 1024];
        let read = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut answer))
            .await
            .expect("a gzip bomb answered in time")
            .unwrap_or(0);
        let answer = String::from_utf8_lossy(&answer[..read]);
        assert!(answer.starts_with("HTTP/1.1 413"), "a gzip bomb: {answer}");
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "a gzip bomb took {:?}",
            started.elapsed()
        );
    }

    // A device flooding reports: past its burst it is told to wait (and our
    // client ends its session, naming the rate); the others carry on.
    let flooder_id = DeviceId::new("flooder").unwrap();
    let connector = OpampConnector::new(
        OpampConnectorConfig::new(format!("ws://{opamp}/v1/opamp")).token(fleet.token(&flooder_id)),
    )
    .unwrap();
    let mut flooder = connector.connect(&DeviceHello::new(flooder_id)).await.unwrap();
    let ended = tokio::time::timeout(Duration::from_secs(20), async {
        for _ in 0..1_000 {
            let report = FromDevice::Status(StatusReport::default());
            if flooder.outbound.send(report).await.is_err() {
                break;
            }
        }
        loop {
            match flooder.inbound.recv().await {
                Ok(Some(_)) => continue,
                other => return other,
            }
        }
    })
    .await
    .expect("the flood answered in time");
    match ended {
        Err(err) => assert!(err.to_string().contains("reports a minute"), "{err}"),
        Ok(other) => panic!("a flooding device is told to wait, not {other:?}"),
    }

    // Garbage on every port: answered or closed, nothing else.
    for address in [&api, &opamp, &grpc] {
        let mut garbage = TcpStream::connect(address.as_str()).await.unwrap();
        garbage.write_all(&[0xff; 4096]).await.unwrap();
        assert!(
            closed_within(&mut garbage, Duration::from_secs(5)).await,
            "garbage to {address} left its connection open"
        );
    }

    // Meanwhile the legitimate agent is served.
    let (status, body) = rest(
        &api,
        "POST",
        "/api/v1/devices/legit/emission?wait=10s",
        r#"{"on": true}"#,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"state\":\"acked\""), "{body}");

    for (n, stream) in stalled.iter_mut().enumerate() {
        assert!(
            closed_within(stream, Duration::from_secs(15)).await,
            "stalled client {n} still open {:?} after the attack began",
            started.elapsed()
        );
    }
    let deadline = started + Duration::from_secs(25);
    let mut still_open = 0;
    for stream in &mut silent {
        let left = deadline.saturating_duration_since(Instant::now());
        if !closed_within(stream, left.max(Duration::from_millis(10))).await {
            still_open += 1;
        }
    }
    assert_eq!(still_open, 0, "silent connections still open 25 s after they connected");
    let peak = peak_rss_mb(pid);
    assert!(peak < RSS_BOUND_MB, "the server's peak RSS was {peak} MB");
    assert!(legit_online(&api).await, "the legitimate agent is still online");
    println!("attacked: peak RSS {peak} MB; every attacking connection closed, the agent served");
    server.terminate().await;
}
