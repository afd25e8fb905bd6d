//! Where the live services of `scripts/services/` are, for the tests that use them.

use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

/// The standalone Redis (`OPAMP_TEST_REDIS_URL`).
pub(crate) fn redis_url() -> String {
    std::env::var("OPAMP_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6390/".to_owned())
}

/// Some Redis Cluster nodes, `redis://…` URLs separated by commas (`OPAMP_TEST_REDIS_CLUSTER_URLS`).
#[allow(dead_code)] // Not every test file uses every service.
pub(crate) fn redis_cluster_urls() -> String {
    std::env::var("OPAMP_TEST_REDIS_CLUSTER_URLS")
        .unwrap_or_else(|_| "redis://127.0.0.1:7301/,redis://127.0.0.1:7302/,redis://127.0.0.1:7303/".to_owned())
}

/// The PostgreSQL server (`OPAMP_TEST_POSTGRES_URL`).
#[allow(dead_code)]
pub(crate) fn postgres_url() -> String {
    std::env::var("OPAMP_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5440/postgres".to_owned())
}

/// The Kafka-protocol brokers, `host:port` separated by commas (`OPAMP_TEST_KAFKA_BROKERS`).
#[allow(dead_code)]
pub(crate) fn kafka_brokers() -> String {
    std::env::var("OPAMP_TEST_KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:9093".to_owned())
}

/// `host:port` of the first server a URL or a list names.
pub(crate) fn first_address(urls: &str) -> String {
    let first = urls.split(',').next().unwrap_or_default();
    let rest = first.split_once("://").map_or(first, |(_, rest)| rest);
    let authority = rest.split(['/', '?']).next().unwrap_or_default();
    authority
        .rsplit_once('@')
        .map_or(authority, |(_, host)| host)
        .to_owned()
}

fn reachable(address: &str) -> bool {
    address
        .to_socket_addrs()
        .ok()
        .and_then(|mut addresses| addresses.next())
        .is_some_and(|address| TcpStream::connect_timeout(&address, Duration::from_secs(2)).is_ok())
}

/// Whether every `(what, URL or list)` answers. Under CI a missing one fails
/// the test; locally the test is skipped, loudly.
pub(crate) fn services_present(services: &[(&str, String)]) -> bool {
    let missing: Vec<String> = services
        .iter()
        .map(|(what, urls)| (what, first_address(urls)))
        .filter(|(_, address)| !reachable(address))
        .map(|(what, address)| format!("{what} at {address}"))
        .collect();
    if missing.is_empty() {
        return true;
    }
    let message = format!(
        "no {}: start it with scripts/services/ (or run scripts/test), or point the OPAMP_TEST_* \
         variables at running servers",
        missing.join(", ")
    );
    assert!(std::env::var_os("CI").is_none(), "{message}");
    eprintln!("SKIPPED (not under CI): {message}");
    false
}
