//! The REST API over loopback sockets against a real control plane, supervisor
//! and in-process agents on the memory backends: every endpoint's success
//! path, and the error paths (auth, rate limit, bad input, unknown things,
//! readiness when the store or the bus fails).

mod api;

use std::collections::BTreeSet;
use std::sync::{Arc, OnceLock};

use api::http::{Client, send};
use api::{Fleet, OPERATOR, READER, WAIT, api_config, did, hello};
use hyper::{Method, StatusCode};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use opamp_bus::memory::MemoryBus;
use opamp_core::testkit::eventually;
use opamp_core::testkit::failing::{FailingBus, FailingStore};
use opamp_store::memory::MemoryStore;
use opamp_transport::http_api::RateLimit;
use serde_json::{Value, json};

/// The recorder of this test binary, installed once (a process has one global recorder).
fn recorder() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| PrometheusBuilder::new().install_recorder().expect("the only recorder"))
        .clone()
}

/// Four devices: two canaries, two main; agent type fluentbit.
async fn fleet() -> Fleet {
    Fleet::start(vec![
        hello("dev-1", &[("ring", "canary")]),
        hello("dev-2", &[("ring", "canary")]),
        hello("dev-3", &[("ring", "main")]),
        hello("dev-4", &[("ring", "main")]),
    ])
    .await
}

fn ids(page: &Value) -> Vec<String> {
    page["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|d| d["device_id"].as_str().unwrap().to_owned())
        .collect()
}

/// Waits until the command leaves `pending`, returning its record.
async fn settled(api: &Client, id: &str) -> Value {
    let mut last = Value::Null;
    let deadline = std::time::Instant::now() + WAIT;
    while std::time::Instant::now() < deadline {
        let answer = api.get(&format!("/api/v1/commands/{id}")).await;
        assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
        last = answer.json();
        if !matches!(last["state"].as_str(), Some("pending" | "deferred")) {
            return last;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    panic!("command {id} still pending after {WAIT:?}: {last}");
}

fn template_body(text: &str) -> Value {
    json!({ "bundle": { "fluent-bit.conf": { "content_type": "text/plain", "text": text } } })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_list_filter_page_and_detail() {
    let fleet = fleet().await;
    let addr = fleet.serve(api_config()).await;
    let api = Client::new(addr, Some(READER));

    let all = api.get("/api/v1/devices").await;
    assert_eq!(all.status, StatusCode::OK, "{}", all.text());
    let mut listed = ids(&all.json());
    listed.sort();
    assert_eq!(listed, ["dev-1", "dev-2", "dev-3", "dev-4"]);
    let first = &all.json()["items"][0];
    assert_eq!(first["status"], "online");
    assert_eq!(first["supervisor"], "s1");
    assert_eq!(first["agent_type"], "fluentbit");

    for (query, expected) in [
        ("online=true", vec!["dev-1", "dev-2", "dev-3", "dev-4"]),
        ("online=false", vec![]),
        ("online=true&supervisor=s1&label=ring=canary", vec!["dev-1", "dev-2"]),
        ("label=ring=main&agent_type=fluentbit", vec!["dev-3", "dev-4"]),
        ("agent_type=otel", vec![]),
        ("supervisor=s2", vec![]),
        ("q=v-3", vec!["dev-3"]),
    ] {
        let answer = api.get(&format!("/api/v1/devices?{query}")).await;
        assert_eq!(answer.status, StatusCode::OK, "{query}: {}", answer.text());
        let mut got = ids(&answer.json());
        got.sort();
        assert_eq!(got, expected, "{query}");
    }

    // Pages of two, following `next`, list every device once.
    let mut seen = BTreeSet::new();
    let mut path = "/api/v1/devices?limit=2".to_owned();
    for _ in 0..10 {
        let page = api.get(&path).await.json();
        assert!(page["items"].as_array().unwrap().len() <= 2);
        seen.extend(ids(&page));
        match page["next"].as_str() {
            Some(next) => path = format!("/api/v1/devices?limit=2&after={next}"),
            None => break,
        }
    }
    assert_eq!(seen.len(), 4, "{seen:?}");

    // A scan limit of one reads one device per request: a filtered page may come back short, with a cursor.
    let narrow = Client::new(fleet.serve(api_config().scan_limit(1)).await, Some(READER));
    let mut found = Vec::new();
    let mut path = "/api/v1/devices?label=ring=main".to_owned();
    let mut requests = 0;
    loop {
        requests += 1;
        let page = narrow.get(&path).await.json();
        assert!(page["items"].as_array().unwrap().len() <= 1, "{page}");
        found.extend(ids(&page));
        match page["next"].as_str() {
            Some(next) => path = format!("/api/v1/devices?label=ring=main&after={next}"),
            None => break,
        }
        assert!(requests < 10, "the cursor did not advance");
    }
    found.sort();
    assert_eq!(found, ["dev-3", "dev-4"]);
    assert!(requests >= 4, "one device read per request: {requests}");

    let detail = api.get("/api/v1/devices/dev-3").await;
    assert_eq!(detail.status, StatusCode::OK);
    let detail = detail.json();
    assert_eq!(detail["device_id"], "dev-3");
    assert_eq!(detail["owner"], "s1");
    assert_eq!(detail["labels"]["ring"], "main");
    assert_eq!(detail["desired"], Value::Null);

    let unknown = api.get("/api/v1/devices/dev-9").await;
    assert_eq!(
        (unknown.status, unknown.code().as_str()),
        (StatusCode::NOT_FOUND, "not_found")
    );
    assert_eq!(unknown.message(), "device dev-9 is not known");
    let invalid = api.get("/api/v1/devices/bad%20id").await;
    assert_eq!(
        (invalid.status, invalid.code().as_str()),
        (StatusCode::BAD_REQUEST, "invalid_input")
    );
    assert!(invalid.message().contains("device id"), "{}", invalid.message());

    let supervisors = api.get("/api/v1/supervisors").await.json();
    assert_eq!(supervisors["items"], json!([{ "supervisor": "s1", "devices": 4 }]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn emission_toggle_and_its_command_record() {
    let fleet = fleet().await;
    let addr = fleet.serve(api_config()).await;
    let ops = Client::new(addr, Some(OPERATOR));

    let answer = ops.post("/api/v1/devices/dev-2/emission", &json!({ "on": true })).await;
    assert_eq!(answer.status, StatusCode::ACCEPTED, "{}", answer.text());
    let issued = answer.json();
    assert_eq!(issued["device"], "dev-2");
    let id = issued["correlation_id"].as_str().unwrap().to_owned();

    let record = settled(&ops, &id).await;
    assert_eq!(record["state"], "acked", "{record}");
    assert_eq!(record["device"], "dev-2");
    assert_eq!(
        record["initiated_by"], "ops",
        "the token's name is the initiator: {record}"
    );
    assert!(fleet.store.status(&did("dev-2")).await.unwrap().unwrap().emission);
    let detail = ops.get("/api/v1/devices/dev-2").await.json();
    assert_eq!(detail["emission"], true);

    // `wait` answers once the command has ended.
    let answer = ops
        .post("/api/v1/devices/dev-2/emission", &json!({ "on": false }))
        .await;
    let id = answer.json()["correlation_id"].as_str().unwrap().to_owned();
    let waited = ops.get(&format!("/api/v1/commands/{id}?wait=5s")).await;
    assert_eq!(waited.status, StatusCode::OK, "{}", waited.text());
    assert_eq!(waited.json()["state"], "acked");
    for query in ["wait=forever", "wait=61s", "colour=red"] {
        let refused = ops.get(&format!("/api/v1/commands/{id}?{query}")).await;
        assert_eq!(
            (refused.status, refused.code().as_str()),
            (StatusCode::BAD_REQUEST, "invalid_query"),
            "{query}"
        );
    }
    let unknown = ops
        .get("/api/v1/commands/6f1c0b1e-8a57-4a8e-9d4e-3c1f7d2b9a10?wait=50ms")
        .await;
    assert_eq!(unknown.status, StatusCode::NOT_FOUND);

    // A toggle that waits for its own end answers 200 with the record.
    let synchronous = ops
        .post("/api/v1/devices/dev-2/emission?wait=5s", &json!({ "on": true }))
        .await;
    assert_eq!(synchronous.status, StatusCode::OK, "{}", synchronous.text());
    assert_eq!(synchronous.json()["state"], "acked");
    let refused = ops
        .post("/api/v1/devices/dev-2/emission?wait=2m", &json!({ "on": true }))
        .await;
    assert_eq!(
        (refused.status, refused.code().as_str()),
        (StatusCode::BAD_REQUEST, "invalid_query")
    );

    let unknown = ops.post("/api/v1/devices/dev-9/emission", &json!({ "on": true })).await;
    assert_eq!(
        (unknown.status, unknown.code().as_str()),
        (StatusCode::NOT_FOUND, "not_found")
    );
    assert_eq!(unknown.message(), "device dev-9 is not known");

    let bad = ops.get("/api/v1/commands/not-a-uuid").await;
    assert_eq!(
        (bad.status, bad.code().as_str()),
        (StatusCode::BAD_REQUEST, "invalid_input")
    );
    assert!(bad.message().contains("correlation id"), "{}", bad.message());
    let missing = ops.get("/api/v1/commands/6f1c0b1e-8a57-4a8e-9d4e-3c1f7d2b9a10").await;
    assert_eq!(
        (missing.status, missing.code().as_str()),
        (StatusCode::NOT_FOUND, "not_found")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn templates_and_config_pushes() {
    let fleet = fleet().await;
    let addr = fleet.serve(api_config()).await;
    let ops = Client::new(addr, Some(OPERATOR));

    let created = ops
        .put("/api/v1/templates/fluentbit/v1", &template_body("[SERVICE]\n"))
        .await;
    assert_eq!(created.status, StatusCode::CREATED, "{}", created.text());
    let created = created.json();
    assert_eq!(created["config_version"], "v1");
    assert_eq!(created["created_by"], "ops", "the token's name is the author");
    assert_eq!(created["hash"].as_str().unwrap().len(), 64);
    let again = ops
        .put("/api/v1/templates/fluentbit/v1", &template_body("[OTHER]\n"))
        .await;
    assert_eq!(
        (again.status, again.code().as_str()),
        (StatusCode::CONFLICT, "already_exists")
    );
    let reserved = ops.put("/api/v1/templates/fluentbit/latest", &template_body("x")).await;
    assert_eq!(reserved.status, StatusCode::BAD_REQUEST, "{}", reserved.text());
    let bad_bundle = ops
        .put(
            "/api/v1/templates/fluentbit/v9",
            &json!({ "bundle": { "a": { "text": "x", "base64": "eA==" } } }),
        )
        .await;
    assert_eq!(
        (bad_bundle.status, bad_bundle.code().as_str()),
        (StatusCode::BAD_REQUEST, "invalid_input")
    );
    assert!(bad_bundle.message().contains("both"), "{}", bad_bundle.message());
    assert_eq!(
        ops.put("/api/v1/templates/fluentbit/v2", &template_body("[V2]\n"))
            .await
            .status,
        StatusCode::CREATED
    );

    let no_latest = ops.get("/api/v1/templates/fluentbit/latest").await;
    assert_eq!(no_latest.status, StatusCode::NOT_FOUND);
    let set = ops
        .put("/api/v1/templates/fluentbit/latest", &json!({ "version": "v2" }))
        .await;
    assert_eq!(set.status, StatusCode::OK, "{}", set.text());
    assert_eq!(
        set.json(),
        json!({ "agent_type": "fluentbit", "versions": ["v1", "v2"], "latest": "v2" })
    );
    let unknown_latest = ops
        .put("/api/v1/templates/fluentbit/latest", &json!({ "version": "v7" }))
        .await;
    assert_eq!(
        unknown_latest.status,
        StatusCode::NOT_FOUND,
        "{}",
        unknown_latest.text()
    );
    let latest = ops.get("/api/v1/templates/fluentbit/latest").await.json();
    assert_eq!(latest["bundle"]["fluent-bit.conf"]["text"], "[V2]\n");
    let v1 = ops.get("/api/v1/templates/fluentbit/v1").await.json();
    assert_eq!(v1["bundle"]["fluent-bit.conf"]["text"], "[SERVICE]\n");
    let missing = ops.get("/api/v1/templates/fluentbit/v3").await;
    assert_eq!(
        (missing.status, missing.code().as_str()),
        (StatusCode::NOT_FOUND, "not_found")
    );
    let bad_type = ops.get("/api/v1/templates/fluent:bit").await;
    assert_eq!(
        (bad_type.status, bad_type.code().as_str()),
        (StatusCode::BAD_REQUEST, "invalid_input")
    );
    let versions = ops.get("/api/v1/templates/fluentbit").await.json();
    assert_eq!(versions["versions"], json!(["v1", "v2"]));

    // One device.
    let pushed = ops
        .post(
            "/api/v1/devices/dev-1/config",
            &json!({ "agent_type": "fluentbit", "version": "v1" }),
        )
        .await;
    assert_eq!(pushed.status, StatusCode::ACCEPTED, "{}", pushed.text());
    let issued = pushed.json()["issued"].clone();
    assert_eq!(issued.as_array().unwrap().len(), 1);
    let record = settled(&ops, issued[0]["correlation_id"].as_str().unwrap()).await;
    assert_eq!(record["state"], "acked", "{record}");
    let detail = ops.get("/api/v1/devices/dev-1").await.json();
    assert_eq!(detail["config_version"], "v1");
    assert_eq!(detail["desired"], json!({ "agent_type": "fluentbit", "version": "v1" }));

    // A selection: the main ring.
    let applied = ops
        .post(
            "/api/v1/configs/apply",
            &json!({ "target": { "agent_type": "fluentbit", "labels": { "ring": "main" } }, "config": { "agent_type": "fluentbit", "version": "v2" } }),
        )
        .await;
    assert_eq!(applied.status, StatusCode::ACCEPTED, "{}", applied.text());
    let mut devices: Vec<String> = applied.json()["issued"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["device"].as_str().unwrap().to_owned())
        .collect();
    devices.sort();
    assert_eq!(devices, ["dev-3", "dev-4"]);
    for device in ["dev-3", "dev-4"] {
        let store = fleet.store.clone();
        eventually(&format!("{device} runs v2"), WAIT, || {
            let store = store.clone();
            async move {
                let status = store.status(&did(device)).await.unwrap().unwrap();
                status.config_version.map(|v| v.to_string()).as_deref() == Some("v2")
            }
        })
        .await;
    }

    let unknown_config = ops
        .post(
            "/api/v1/configs/apply",
            &json!({ "target": { "device": "dev-1" }, "config": { "agent_type": "fluentbit", "version": "v404" } }),
        )
        .await;
    assert_eq!(
        unknown_config.status,
        StatusCode::NOT_FOUND,
        "{}",
        unknown_config.text()
    );
    let both = ops
        .post("/api/v1/configs/apply", &json!({ "target": { "device": "dev-1", "agent_type": "fluentbit" }, "config": { "agent_type": "fluentbit", "version": "v1" } }))
        .await;
    assert_eq!(
        (both.status, both.code().as_str()),
        (StatusCode::BAD_REQUEST, "invalid_input")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_roles_and_rate_limit() {
    let fleet = fleet().await;
    let addr = fleet.serve(api_config()).await;

    let anonymous = Client::new(addr, None).get("/api/v1/devices").await;
    assert_eq!(
        (anonymous.status, anonymous.code().as_str()),
        (StatusCode::UNAUTHORIZED, "unauthorized")
    );
    assert_eq!(anonymous.headers["www-authenticate"], "Bearer");
    let wrong = Client::new(addr, Some("not-a-configured-token"))
        .get("/api/v1/devices")
        .await;
    assert_eq!(
        (wrong.status, wrong.code().as_str()),
        (StatusCode::UNAUTHORIZED, "unauthorized")
    );
    let basic = send(
        addr,
        Method::GET,
        "/api/v1/devices",
        &[("authorization", "Basic b3BzOnB3")],
        None,
    )
    .await;
    assert_eq!(basic.status, StatusCode::UNAUTHORIZED);

    let reader = Client::new(addr, Some(READER));
    assert_eq!(reader.get("/api/v1/devices").await.status, StatusCode::OK);
    let write = reader
        .post("/api/v1/devices/dev-1/emission", &json!({ "on": true }))
        .await;
    assert_eq!(
        (write.status, write.code().as_str()),
        (StatusCode::FORBIDDEN, "forbidden")
    );
    assert!(write.message().contains("viewer"), "{}", write.message());
    assert!(
        !fleet.store.status(&did("dev-1")).await.unwrap().unwrap().emission,
        "nothing was sent"
    );

    // Probes, the document and the page need no token by default.
    let anonymous = Client::new(addr, None);
    for path in ["/health/live", "/health/ready", "/metrics", "/openapi.json", "/"] {
        assert_eq!(anonymous.get(path).await.status, StatusCode::OK, "{path}");
    }
    let page = anonymous.get("/").await;
    assert!(page.headers["content-type"].to_str().unwrap().starts_with("text/html"));
    let policy = page.headers["content-security-policy"].to_str().unwrap();
    assert!(
        policy.contains("script-src 'sha256-") && policy.contains("connect-src 'self'"),
        "{policy}"
    );

    // A bucket of two that refills once a minute: the third request waits.
    let limited = fleet
        .serve(
            api_config()
                .rate_limit(RateLimit::new(1.0 / 60.0, 2).unwrap())
                .probes_need_token(true),
        )
        .await;
    let ops = Client::new(limited, Some(OPERATOR));
    assert_eq!(ops.get("/api/v1/supervisors").await.status, StatusCode::OK);
    assert_eq!(ops.get("/api/v1/supervisors").await.status, StatusCode::OK);
    let third = ops.get("/api/v1/supervisors").await;
    assert_eq!(
        (third.status, third.code().as_str()),
        (StatusCode::TOO_MANY_REQUESTS, "rate_limited")
    );
    let retry: u64 = third.headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=60).contains(&retry), "Retry-After {retry}");
    // Each token has its own bucket.
    assert_eq!(
        Client::new(limited, Some(READER))
            .get("/api/v1/supervisors")
            .await
            .status,
        StatusCode::OK
    );
    // And probes asked a token here.
    let probe = Client::new(limited, None).get("/health/live").await;
    assert_eq!(probe.status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        Client::new(limited, Some(READER)).get("/health/live").await.status,
        StatusCode::OK
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_name_the_problem() {
    let fleet = fleet().await;
    let addr = fleet.serve(api_config().body_limit(1024)).await;
    let ops = Client::new(addr, Some(OPERATOR));

    let cases: Vec<(api::http::Answer, StatusCode, &str, &str)> = vec![
        (
            ops.raw(
                Method::POST,
                "/api/v1/devices/dev-1/emission",
                "application/json",
                b"{\"on\": tru".to_vec(),
            )
            .await,
            StatusCode::BAD_REQUEST,
            "malformed_json",
            "not valid JSON",
        ),
        (
            ops.raw(
                Method::POST,
                "/api/v1/devices/dev-1/emission",
                "text/plain",
                b"{\"on\": true}".to_vec(),
            )
            .await,
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "Content-Type: application/json",
        ),
        (
            ops.post("/api/v1/devices/dev-1/emission", &json!({ "state": true }))
                .await,
            StatusCode::BAD_REQUEST,
            "invalid_input",
            "state",
        ),
        (
            ops.post(
                "/api/v1/devices/dev-1/config",
                &json!({ "agent_type": "fluent bit", "version": "v1" }),
            )
            .await,
            StatusCode::BAD_REQUEST,
            "invalid_input",
            "agent type",
        ),
        (
            ops.raw(
                Method::PUT,
                "/api/v1/templates/fluentbit/v1",
                "application/json",
                template_body(&"x".repeat(2000)).to_string().into_bytes(),
            )
            .await,
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            "larger",
        ),
        (
            ops.get("/api/v1/nothing-here").await,
            StatusCode::NOT_FOUND,
            "route_not_found",
            "/api/v1/nothing-here",
        ),
        (
            ops.get("/api/v1/devices?limit=0").await,
            StatusCode::BAD_REQUEST,
            "invalid_query",
            "limit",
        ),
        (
            ops.get("/api/v1/devices?label=nolabel").await,
            StatusCode::BAD_REQUEST,
            "invalid_query",
            "label",
        ),
        (
            ops.put("/api/v1/devices/dev-1/emission", &json!({ "on": true })).await,
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "PUT",
        ),
    ];
    for (answer, status, code, needle) in cases {
        assert_eq!(
            (answer.status, answer.code().as_str()),
            (status, code),
            "{}",
            answer.text()
        );
        assert!(
            answer.message().contains(needle),
            "{code}: {:?} lacks {needle:?}",
            answer.message()
        );
    }
    // The devices carried on.
    assert_eq!(ops.get("/api/v1/devices").await.status, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_metrics() {
    let handle = recorder();
    let fleet = fleet().await;
    let addr = fleet.serve(api_config().metrics(handle)).await;
    let anonymous = Client::new(addr, None);

    let live = anonymous.get("/health/live").await;
    assert_eq!((live.status, live.json()), (StatusCode::OK, json!({ "status": "ok" })));
    let ready = anonymous.get("/health/ready").await;
    assert_eq!(
        (ready.status, ready.json()),
        (StatusCode::OK, json!({ "status": "ok" }))
    );

    // A command, so the control plane's counters and histogram have a sample.
    let ops = Client::new(addr, Some(OPERATOR));
    let id = ops
        .post("/api/v1/devices/dev-4/emission", &json!({ "on": true }))
        .await
        .json()["correlation_id"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(settled(&ops, &id).await["state"], "acked");

    let scrape = || async { anonymous.get("/metrics").await };
    eventually("the command shows in /metrics", WAIT, || async {
        scrape().await.text().contains("opamp_command_latency_seconds")
    })
    .await;
    let answer = scrape().await;
    assert_eq!(answer.status, StatusCode::OK);
    assert!(
        answer.headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain")
    );
    let text = answer.text();
    assert!(text.contains("# TYPE opamp_devices_online gauge"), "{text}");
    assert!(text.contains("opamp_devices_online{supervisor=\"s1\"} 4"), "{text}");
    assert!(text.contains("opamp_commands_total{"), "{text}");
    assert!(text.contains("outcome=\"acked\""), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openapi_describes_every_route_the_router_serves() {
    let fleet = fleet().await;
    let addr = fleet.serve(api_config()).await;
    let doc = Client::new(addr, None).get("/openapi.json").await;
    assert_eq!(doc.status, StatusCode::OK);
    let doc = doc.json();
    assert_eq!(doc["openapi"], "3.1.0");
    let ops = Client::new(addr, Some(OPERATOR));
    let mut operations = 0;
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, _) in item.as_object().unwrap() {
            operations += 1;
            let concrete = path
                .replace("{device}", "dev-1")
                .replace("{correlation_id}", "6f1c0b1e-8a57-4a8e-9d4e-3c1f7d2b9a10")
                .replace("{agent_type}", "fluentbit")
                .replace("{version}", "v1")
                .replace("{id}", "6f1c0b1e-8a57-4a8e-9d4e-3c1f7d2b9a10");
            let method = Method::from_bytes(method.to_uppercase().as_bytes()).unwrap();
            let answer = if method == Method::GET {
                ops.get(&concrete).await
            } else {
                ops.send_json(method.clone(), &concrete, &json!({})).await
            };
            // The route exists: whatever the handler says, the router did not refuse the path or method.
            let refused = answer.status == StatusCode::METHOD_NOT_ALLOWED
                || (answer.status == StatusCode::NOT_FOUND && answer.text().contains("route_not_found"));
            assert!(
                !refused,
                "{method} {path} is documented but not served: {}",
                answer.text()
            );
        }
    }
    assert!(operations >= 20, "{operations} operations documented");
}

/// The store and bus doubles are in `api::failing`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_fails_while_the_store_or_the_bus_fails() {
    let store = Arc::new(FailingStore::new(Arc::new(MemoryStore::new())));
    let bus = Arc::new(FailingBus::new(Arc::new(MemoryBus::new())));
    let fleet = Fleet::start_on(store.clone(), bus.clone(), vec![hello("dev-1", &[])]).await;
    let addr = fleet.serve(api_config()).await;
    let anonymous = Client::new(addr, None);
    assert_eq!(anonymous.get("/health/ready").await.status, StatusCode::OK);

    store.fail(true);
    let ready = anonymous.get("/health/ready").await;
    assert_eq!(ready.status, StatusCode::SERVICE_UNAVAILABLE, "{}", ready.text());
    assert_eq!(ready.json()["status"], "unavailable");
    assert!(
        ready.json()["reason"].as_str().unwrap().contains("store"),
        "{}",
        ready.text()
    );
    assert_eq!(
        anonymous.get("/health/live").await.status,
        StatusCode::OK,
        "liveness does not depend on the store"
    );
    let api = Client::new(addr, Some(READER)).get("/api/v1/devices").await;
    assert_eq!(
        (api.status, api.code().as_str()),
        (StatusCode::SERVICE_UNAVAILABLE, "unavailable")
    );
    store.fail(false);
    assert_eq!(anonymous.get("/health/ready").await.status, StatusCode::OK);

    bus.fail(true);
    let ready = anonymous.get("/health/ready").await;
    assert_eq!(ready.status, StatusCode::SERVICE_UNAVAILABLE, "{}", ready.text());
    assert!(
        ready.json()["reason"].as_str().unwrap().contains("bus"),
        "{}",
        ready.text()
    );
    bus.fail(false);
    // The event stream counts as healthy again once an event arrives: a toggle makes one.
    let ops = Client::new(addr, Some(OPERATOR));
    let toggled = ops.post("/api/v1/devices/dev-1/emission", &json!({ "on": true })).await;
    assert_eq!(toggled.status, StatusCode::ACCEPTED, "{}", toggled.text());
    eventually("ready again", WAIT, || async {
        anonymous.get("/health/ready").await.status == StatusCode::OK
    })
    .await;
}

/// Polls the rollout until `done` holds for it; returns it.
async fn rollout_until(api: &Client, id: &str, what: &str, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = std::time::Instant::now() + WAIT;
    let mut last = Value::Null;
    while std::time::Instant::now() < deadline {
        let answer = api.get(&format!("/api/v1/rollouts/{id}")).await;
        assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
        last = answer.json();
        if done(&last) {
            return last;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    panic!("rollout {id} not {what} within {WAIT:?}: {last}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollouts_start_pause_on_failures_resume_and_abort() {
    let fleet = fleet().await;
    let addr = fleet.serve(api_config()).await;
    let ops = Client::new(addr, Some(OPERATOR));
    for version in ["v1", "v2"] {
        let created = ops
            .put(
                &format!("/api/v1/templates/fluentbit/{version}"),
                &template_body(version),
            )
            .await;
        assert_eq!(created.status, StatusCode::CREATED, "{}", created.text());
    }

    // Every device refuses: the canary wave fails and the rollout pauses itself.
    for applier in &fleet.appliers {
        applier.reject_with(Some("disk full".into()));
    }
    let started = ops
        .post(
            "/api/v1/rollouts",
            &json!({ "config": { "agent_type": "fluentbit", "version": "v1" }, "canary": 1, "growth": 2 }),
        )
        .await;
    assert_eq!(started.status, StatusCode::CREATED, "{}", started.text());
    let id = started.json()["id"].as_str().unwrap().to_owned();
    let paused = rollout_until(&ops, &id, "paused", |r| r["state"] == "paused").await;
    assert!(paused["reason"].is_string(), "{paused}");
    assert_eq!(paused["totals"]["failed"], 1, "{paused}");

    // Accepting again, resumed, it runs to the end: 1 failed canary, then 3 acked.
    for applier in &fleet.appliers {
        applier.reject_with(None);
    }
    let resumed = ops.post(&format!("/api/v1/rollouts/{id}/resume"), &json!({})).await;
    assert_eq!(resumed.status, StatusCode::OK, "{}", resumed.text());
    let done = rollout_until(&ops, &id, "completed", |r| r["state"] == "completed").await;
    assert_eq!(done["totals"]["acked"], 3, "{done}");
    assert!(done["waves"].as_array().unwrap().len() >= 2, "{done}");
    let late = ops.post(&format!("/api/v1/rollouts/{id}/abort"), &json!({})).await;
    assert_eq!(
        (late.status, late.code().as_str()),
        (StatusCode::BAD_REQUEST, "invalid_input"),
        "{}",
        late.text()
    );
    assert!(late.message().contains("completed"), "{}", late.message());

    // Paused by an operator and aborted.
    for applier in &fleet.appliers {
        applier.reject_with(Some("read-only file system".into()));
    }
    let second = ops
        .post(
            "/api/v1/rollouts",
            &json!({ "config": { "agent_type": "fluentbit", "version": "v2" }, "labels": { "ring": "main" } }),
        )
        .await;
    assert_eq!(second.status, StatusCode::CREATED, "{}", second.text());
    let second = second.json()["id"].as_str().unwrap().to_owned();
    rollout_until(&ops, &second, "paused", |r| r["state"] == "paused").await;
    let paused = ops.post(&format!("/api/v1/rollouts/{second}/pause"), &json!({})).await;
    assert_eq!(
        (paused.status, paused.json()["state"].as_str()),
        (StatusCode::OK, Some("paused"))
    );
    let aborted = ops.post(&format!("/api/v1/rollouts/{second}/abort"), &json!({})).await;
    assert_eq!(
        (aborted.status, aborted.json()["state"].as_str()),
        (StatusCode::OK, Some("aborted"))
    );

    let list = ops.get("/api/v1/rollouts?limit=1").await;
    assert_eq!(list.status, StatusCode::OK, "{}", list.text());
    let list = list.json();
    assert_eq!(list["items"][0]["id"], second.as_str(), "newest first");
    let next = list["next"].as_str().expect("a second page");
    let rest = ops.get(&format!("/api/v1/rollouts?limit=1&after={next}")).await.json();
    assert_eq!(rest["items"][0]["id"], id.as_str());

    // Errors: unknown, invalid id, a template that is not stored, bad numbers, a reader.
    let unknown = ops.get("/api/v1/rollouts/6f1c0b1e-8a57-4a8e-9d4e-3c1f7d2b9a10").await;
    assert_eq!(
        (unknown.status, unknown.code().as_str()),
        (StatusCode::NOT_FOUND, "not_found")
    );
    let unknown = ops
        .post(
            "/api/v1/rollouts/6f1c0b1e-8a57-4a8e-9d4e-3c1f7d2b9a10/pause",
            &json!({}),
        )
        .await;
    assert_eq!(unknown.status, StatusCode::NOT_FOUND, "{}", unknown.text());
    let invalid = ops.get("/api/v1/rollouts/r-1").await;
    assert_eq!(
        (invalid.status, invalid.code().as_str()),
        (StatusCode::BAD_REQUEST, "invalid_input")
    );
    assert!(invalid.message().contains("rollout id"), "{}", invalid.message());
    let missing = ops
        .post(
            "/api/v1/rollouts",
            &json!({ "config": { "agent_type": "fluentbit", "version": "v404" } }),
        )
        .await;
    assert_eq!(missing.status, StatusCode::NOT_FOUND, "{}", missing.text());
    let zero = ops
        .post(
            "/api/v1/rollouts",
            &json!({ "config": { "agent_type": "fluentbit", "version": "v1" }, "canary": 0 }),
        )
        .await;
    assert_eq!(
        (zero.status, zero.code().as_str()),
        (StatusCode::BAD_REQUEST, "invalid_input")
    );
    assert!(zero.message().contains("canary"), "{}", zero.message());
    let reader = Client::new(addr, Some(READER));
    assert_eq!(
        reader.get(&format!("/api/v1/rollouts/{id}")).await.status,
        StatusCode::OK
    );
    assert_eq!(
        reader
            .post(&format!("/api/v1/rollouts/{id}/pause"), &json!({}))
            .await
            .status,
        StatusCode::FORBIDDEN
    );
}

/// A burst of connections the server has not accepted yet all open: the
/// listener queues up to its backlog, where `TcpListener::bind` queues 128
/// and leaves the rest waiting on SYN retries.
#[tokio::test]
async fn the_listener_queues_a_burst_of_connections() {
    use opamp_transport::http_api::{DEFAULT_BACKLOG, listen};
    use std::time::Duration;

    // As many as the kernel lets a listener queue, up to 1,000.
    let somaxconn = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
        .ok()
        .and_then(|text| text.trim().parse::<usize>().ok())
        .unwrap_or(4096);
    let burst = somaxconn.min(1000);
    let listener = listen("127.0.0.1:0".parse().unwrap(), DEFAULT_BACKLOG)
        .await
        .expect("a listener on loopback");
    let address = listener.local_addr().unwrap();
    let mut connects = tokio::task::JoinSet::new();
    for _ in 0..burst {
        connects.spawn(tokio::time::timeout(
            Duration::from_millis(900),
            tokio::net::TcpStream::connect(address),
        ));
    }
    let mut open = Vec::with_capacity(burst);
    while let Some(done) = connects.join_next().await {
        if let Ok(Ok(stream)) = done.expect("a connect task") {
            open.push(stream);
        }
    }
    assert_eq!(open.len(), burst, "connections opened within 0.9 s, none accepted yet");

    // The address is taken (SO_REUSEADDR does not let two listen on one port).
    let err = listen(address, DEFAULT_BACKLOG).await.unwrap_err();
    assert!(err.to_string().contains(&address.to_string()), "{err}");
    drop(listener);
}

/// Revoking a device closes its session and keeps it out (its agent comes
/// back and is refused), the device's detail and the listing show it, a
/// read-only token may look but not revoke, and reinstating lets it back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoking_disconnects_a_device_until_it_is_reinstated() {
    let fleet = fleet().await;
    let addr = fleet.serve(api_config()).await;
    let (ops, reader) = (Client::new(addr, Some(OPERATOR)), Client::new(addr, Some(READER)));

    let refused = reader.put("/api/v1/revocations/dev-3", &json!({ "reason": "x" })).await;
    assert_eq!(refused.status, StatusCode::FORBIDDEN, "{}", refused.text());
    let answer = ops
        .put("/api/v1/revocations/dev-3", &json!({ "reason": "token leaked" }))
        .await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    let revoked = answer.json();
    assert_eq!(revoked["created"], true, "{revoked}");
    assert_eq!(revoked["revocation"]["revoked_by"], "ops", "{revoked}");
    let disconnect = revoked["disconnect"].as_str().expect("a session to close").to_owned();
    let record = settled(&ops, &disconnect).await;
    assert_eq!(
        (record["state"].as_str(), record["command"]["command"].as_str()),
        (Some("acked"), Some("disconnect"))
    );
    let store = fleet.store.clone();
    eventually("the revoked device offline", WAIT, || {
        let store = store.clone();
        async move { !store.status(&did("dev-3")).await.unwrap().unwrap().is_online() }
    })
    .await;

    let detail = reader.get("/api/v1/devices/dev-3").await.json();
    assert_eq!(detail["revoked"]["reason"], "token leaked", "{detail}");
    assert_eq!(reader.get("/api/v1/devices/dev-2").await.json()["revoked"], Value::Null);
    let listed = reader.get("/api/v1/revocations").await.json();
    assert_eq!(ids(&listed), vec!["dev-3"]);
    assert_eq!(reader.get("/api/v1/revocations/dev-3").await.status, StatusCode::OK);
    let again = ops
        .put("/api/v1/revocations/dev-3", &json!({ "reason": "again" }))
        .await
        .json();
    assert_eq!(
        (again["created"].as_bool(), again["revocation"]["reason"].as_str()),
        (Some(false), Some("token leaked"))
    );
    let unseen = ops.put("/api/v1/revocations/dev-77", &json!({})).await.json();
    assert_eq!(
        (unseen["created"].as_bool(), &unseen["disconnect"]),
        (Some(true), &Value::Null),
        "{unseen}"
    );

    for (body, says) in [
        (json!({ "reason": "two\nlines" }), "control character"),
        (json!({ "reason": "x".repeat(1025) }), "1025 bytes"),
        (json!({ "why": "unknown field" }), "why"),
    ] {
        let bad = ops.put("/api/v1/revocations/dev-1", &body).await;
        assert_eq!(bad.status, StatusCode::BAD_REQUEST, "{}", bad.text());
        assert!(bad.message().contains(says), "{}", bad.message());
    }
    let bad_id = ops.put("/api/v1/revocations/d%C3%A9%7Bx", &json!({})).await;
    assert_eq!(bad_id.status, StatusCode::BAD_REQUEST, "{}", bad_id.text());
    assert_eq!(ops.get("/api/v1/revocations?limit=0").await.code(), "invalid_query");

    assert_eq!(
        reader.delete("/api/v1/revocations/dev-3").await.status,
        StatusCode::FORBIDDEN
    );
    let reinstated = ops.delete("/api/v1/revocations/dev-3").await;
    assert_eq!(reinstated.status, StatusCode::OK, "{}", reinstated.text());
    assert_eq!(reinstated.json()["reason"], "token leaked");
    let twice = ops.delete("/api/v1/revocations/dev-3").await;
    assert_eq!(
        (twice.status, twice.message()),
        (StatusCode::NOT_FOUND, "device dev-3 is not revoked".to_owned())
    );
    assert_eq!(ops.get("/api/v1/revocations/dev-3").await.status, StatusCode::NOT_FOUND);

    // Its agent, refused meanwhile, comes back by itself.
    eventually("the reinstated device online again", WAIT, || {
        let store = store.clone();
        async move { store.status(&did("dev-3")).await.unwrap().unwrap().is_online() }
    })
    .await;
    let toggled = ops
        .post("/api/v1/devices/dev-3/emission?wait=5s", &json!({ "on": true }))
        .await;
    assert_eq!(toggled.json()["state"], "acked", "{}", toggled.text());
}
