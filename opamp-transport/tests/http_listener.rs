//! The API's listener (`http_api::serve`) against clients that stall, over
//! loopback sockets: connections that send nothing, half a header or half a
//! body are cut off at their deadlines, at most `max_connections` are served
//! at once, and a shutdown lets the requests under way finish.

mod api;

use std::time::{Duration, Instant};

use api::{Fleet, OPERATOR, api_config, hello};
use opamp_transport::http_api::{self, ServeConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Deadlines short enough for a test, long enough for a loaded machine.
const HEADER_TIMEOUT: Duration = Duration::from_millis(500);
const BODY_TIMEOUT: Duration = Duration::from_millis(700);

async fn fleet() -> Fleet {
    Fleet::start(vec![hello("dev-1", &[])]).await
}

fn short() -> ServeConfig {
    ServeConfig::default()
        .header_timeout(HEADER_TIMEOUT)
        .body_timeout(BODY_TIMEOUT)
}

/// Everything the server sends until it closes the connection, and when it closed it.
async fn read_until_closed(stream: &mut TcpStream, within: Duration) -> (String, Instant) {
    let mut answer = Vec::new();
    tokio::time::timeout(within, stream.read_to_end(&mut answer))
        .await
        .unwrap_or_else(|_| panic!("the server kept the connection open past {within:?}"))
        .expect("reading the connection");
    (String::from_utf8_lossy(&answer).into_owned(), Instant::now())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_sends_nothing_is_closed_at_the_header_deadline() {
    let fleet = fleet().await;
    let addr = fleet.serve_with(api_config(), short()).await;
    let opened = Instant::now();
    let mut silent = TcpStream::connect(addr).await.unwrap();
    let (answer, closed) = read_until_closed(&mut silent, HEADER_TIMEOUT * 10).await;
    assert!(closed - opened >= HEADER_TIMEOUT, "closed after {:?}", closed - opened);
    // hyper answers nothing to a connection that never began a request.
    assert!(answer.is_empty(), "{answer}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_a_header_is_cut_off_and_an_idle_keep_alive_too() {
    let fleet = fleet().await;
    let addr = fleet.serve_with(api_config(), short()).await;

    let mut slow = TcpStream::connect(addr).await.unwrap();
    slow.write_all(b"GET /health/live HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let (answer, _) = read_until_closed(&mut slow, HEADER_TIMEOUT * 10).await;
    assert!(!answer.contains("200 OK"), "{answer}");

    // A keep-alive connection is served, then closed once idle past the deadline.
    let mut idle = TcpStream::connect(addr).await.unwrap();
    idle.write_all(b"GET /health/live HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let (answer, _) = read_until_closed(&mut idle, HEADER_TIMEOUT * 10).await;
    assert!(answer.starts_with("HTTP/1.1 200 OK"), "{answer}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_that_stalls_is_answered_408_and_names_the_deadline() {
    let fleet = fleet().await;
    let addr = fleet.serve_with(api_config(), short()).await;
    let mut stalled = TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "POST /api/v1/devices/dev-1/emission HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {OPERATOR}\r\n\
         Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{{\"enabled\":"
    );
    stalled.write_all(head.as_bytes()).await.unwrap();
    let sent = Instant::now();
    let mut answer = vec![0; 4096];
    let read = tokio::time::timeout(BODY_TIMEOUT * 10, stalled.read(&mut answer))
        .await
        .expect("an answer before the test's own deadline")
        .unwrap();
    let answer = String::from_utf8_lossy(&answer[..read]);
    assert!(
        sent.elapsed() >= BODY_TIMEOUT,
        "answered after {:?}: {answer}",
        sent.elapsed()
    );
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("\"code\":\"request_timeout\""), "{answer}");
    assert!(answer.contains("did not arrive whole within 700ms"), "{answer}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_past_the_cap_wait_until_one_closes() {
    let fleet = fleet().await;
    let addr = fleet
        .serve_with(api_config(), ServeConfig::default().max_connections(2))
        .await;
    let first = TcpStream::connect(addr).await.unwrap();
    let _second = TcpStream::connect(addr).await.unwrap();
    // Let the server take both before the third knocks.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut third = TcpStream::connect(addr).await.unwrap();
    third
        .write_all(b"GET /health/live HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut byte = [0; 1];
    let early = tokio::time::timeout(Duration::from_millis(300), third.read(&mut byte)).await;
    assert!(early.is_err(), "the third connection was served while two were open");
    drop(first);
    let (answer, _) = read_until_closed(&mut third, Duration::from_secs(5)).await;
    assert!(answer.starts_with("HTTP/1.1 200 OK"), "{answer}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shutdown_finishes_the_request_under_way_and_returns_once_all_closed() {
    let fleet = fleet().await;
    let app = http_api::router(fleet.control.clone(), api_config()).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopping) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(http_api::serve(listener, app, short(), async {
        let _ = stopping.await;
    }));
    let mut idle = TcpStream::connect(addr).await.unwrap();
    idle.write_all(b"GET /health/live HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut answer = vec![0; 1024];
    let read = idle.read(&mut answer).await.unwrap();
    assert!(String::from_utf8_lossy(&answer[..read]).starts_with("HTTP/1.1 200 OK"));
    stop.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(5), server)
        .await
        .expect("serve returns once its connections closed")
        .unwrap();
    assert!(TcpStream::connect(addr).await.is_err(), "the listener is closed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_address_has_at_most_its_share_of_connections() {
    let fleet = fleet().await;
    let addr = fleet
        .serve_with(api_config(), ServeConfig::default().max_connections_per_address(2))
        .await;
    let first = TcpStream::connect(addr).await.unwrap();
    let _second = TcpStream::connect(addr).await.unwrap();
    // The third from the same address is closed before a byte is read…
    let mut third = TcpStream::connect(addr).await.unwrap();
    let (answer, _) = read_until_closed(&mut third, Duration::from_secs(5)).await;
    assert!(answer.is_empty(), "{answer}");
    // …and once one closes there is room again.
    drop(first);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut again = TcpStream::connect(addr).await.unwrap();
    again
        .write_all(b"GET /health/live HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let (answer, _) = read_until_closed(&mut again, Duration::from_secs(5)).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
}
