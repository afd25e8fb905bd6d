//! Store URLs open the live backends they name, with the key prefix or schema
//! they give: a lease claimed through one URL is seen through the same URL
//! and not through one with another prefix or schema.
//!
//! Services: `scripts/services/redis` (standalone, cluster and Sentinel) and
//! `scripts/services/postgres`, or `OPAMP_TEST_REDIS_URL`,
//! `OPAMP_TEST_REDIS_CLUSTER_URLS`, `OPAMP_TEST_REDIS_SENTINEL_URLS` (with
//! `OPAMP_TEST_REDIS_SENTINEL_MASTER`) and `OPAMP_TEST_POSTGRES_URL`.

use std::time::Duration;

use opamp_core::{DeviceId, SupervisorId};
use opamp_examples::{StoreUrl, open_store};

mod common;
use common::{postgres_url, redis_cluster_urls, redis_sentinel, redis_url, services_present};

/// `base` with one more query parameter.
fn with_param(base: &str, param: &str) -> String {
    let separator = if base.contains('?') { '&' } else { '?' };
    format!("{base}{separator}{param}")
}

/// Claims a device through `url`, and checks that `url` sees the lease and `other` does not.
async fn claim_is_seen_only_through_the_same_url(url: &str, other: &str) {
    let parsed: StoreUrl = url.parse().unwrap_or_else(|err| panic!("{url}: {err}"));
    let store = open_store(&parsed)
        .await
        .unwrap_or_else(|err| panic!("opening {url}: {err}"));
    let separate = open_store(&other.parse::<StoreUrl>().unwrap()).await.unwrap();
    let run = uuid::Uuid::new_v4().simple().to_string();
    let (device, supervisor) = (
        DeviceId::new(format!("d-{run}")).unwrap(),
        SupervisorId::new("s1").unwrap(),
    );
    store
        .claim(&device, &supervisor, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(store.lookup(&device).await.unwrap(), Some(supervisor), "{url}");
    assert_eq!(
        separate.lookup(&device).await.unwrap(),
        None,
        "{other} sees what {url} wrote"
    );
    assert!(store.release(&device, &supervisor).await.unwrap());
}

#[tokio::test]
async fn redis_urls_open_a_server_and_a_cluster_with_their_prefix() {
    if !services_present(&[("Redis", redis_url()), ("Redis Cluster", redis_cluster_urls())]) {
        return;
    }
    let run = uuid::Uuid::new_v4().simple().to_string();
    let standalone = redis_url();
    claim_is_seen_only_through_the_same_url(
        &with_param(&standalone, &format!("prefix=a{run}:&response_timeout=3s")),
        &with_param(&standalone, &format!("prefix=b{run}:")),
    )
    .await;

    let nodes: Vec<String> = redis_cluster_urls().split(',').map(common::first_address).collect();
    let cluster = format!("redis+cluster://{}", nodes.join(","));
    claim_is_seen_only_through_the_same_url(
        &with_param(&cluster, &format!("prefix=a{run}:")),
        &with_param(&cluster, &format!("prefix=b{run}:")),
    )
    .await;
}

#[tokio::test]
async fn redis_sentinel_urls_open_the_primary_with_their_prefix() {
    let (sentinels, master) = redis_sentinel();
    if !services_present(&[("Redis Sentinel", sentinels.clone())]) {
        return;
    }
    let run = uuid::Uuid::new_v4().simple().to_string();
    let hosts: Vec<String> = sentinels.split(',').map(common::first_address).collect();
    let url = format!("redis+sentinel://{}/{master}", hosts.join(","));
    claim_is_seen_only_through_the_same_url(
        &with_param(&url, &format!("prefix=a{run}:&response_timeout=3s")),
        &with_param(&url, &format!("prefix=b{run}:")),
    )
    .await;
}

#[tokio::test]
async fn postgres_urls_open_the_server_in_their_schema() {
    if !services_present(&[("PostgreSQL", postgres_url())]) {
        return;
    }
    let run = uuid::Uuid::new_v4().simple().to_string();
    let base = postgres_url();
    claim_is_seen_only_through_the_same_url(
        &with_param(&base, &format!("schema=a{run}&max_connections=2&sslmode=disable")),
        &with_param(&base, &format!("schema=b{run}")),
    )
    .await;
}
