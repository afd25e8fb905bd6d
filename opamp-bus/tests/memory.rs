//! The memory bus: the conformance suite, and what is particular to it.

use std::collections::BTreeSet;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use opamp_bus::memory::{MemoryBus, MemoryBusConfig};
use opamp_core::testkit::bus::BusFixture;
use opamp_core::{
    AgentType, Command, CommandBus, CommandKind, ConfigRef, ConfigUpdate, CorrelationId, Delivery, DeviceEvent,
    DeviceId, Error, EventBus, EventKind, GroupName, Labels, Subscription, SupervisorId, Timestamp,
};
use tokio::time::timeout;

async fn fixture() -> BusFixture {
    BusFixture::new(Arc::new(MemoryBus::new()))
}

opamp_core::bus_conformance!(fixture);

/// The suite again on small queues and few partitions, so that senders wait
/// for consumers throughout.
mod small {
    use super::*;

    async fn fixture() -> BusFixture {
        let config = MemoryBusConfig::default()
            .with_capacity(16)
            .with_event_partitions(3)
            .with_max_deliveries(3);
        BusFixture::new(Arc::new(MemoryBus::with_config(config).unwrap())).with_max_deliveries(3)
    }

    opamp_core::bus_conformance!(fixture);
}

/// How long to wait for what must happen.
const DEADLINE: Duration = Duration::from_secs(10);
/// How long a call that must stay blocked is watched.
const STAYS_BLOCKED: Duration = Duration::from_millis(100);

fn supervisor(name: &str) -> SupervisorId {
    SupervisorId::new(name).unwrap()
}

fn group(name: &str) -> GroupName {
    GroupName::new(name).unwrap()
}

fn device(name: &str) -> DeviceId {
    DeviceId::new(name).unwrap()
}

fn command(n: u32) -> Command {
    Command::new(
        device("device-5"),
        CommandKind::Custom {
            capability: "test".into(),
            message_type: "n".into(),
            data: n.to_be_bytes().to_vec(),
        },
        Timestamp::from_unix_millis(1_769_509_800_000).unwrap(),
        Duration::from_secs(30),
    )
}

fn number(command: &Command) -> u32 {
    match &command.kind {
        CommandKind::Custom { data, .. } => u32::from_be_bytes(data[..].try_into().unwrap()),
        other => panic!("not a numbered command: {other:?}"),
    }
}

fn event(device_name: &str) -> DeviceEvent {
    let kind = EventKind::CommandCompleted {
        correlation_id: CorrelationId::new(),
        outcome: opamp_core::CommandOutcome::Acked,
    };
    DeviceEvent::new(
        device(device_name),
        kind,
        Timestamp::from_unix_millis(1_769_509_800_000).unwrap(),
    )
}

fn completed(event: &DeviceEvent) -> CorrelationId {
    match &event.kind {
        EventKind::CommandCompleted { correlation_id, .. } => *correlation_id,
        other => panic!("not a completion: {other:?}"),
    }
}

fn update(version: &str) -> ConfigUpdate {
    let config = ConfigRef::new(AgentType::new("fluentbit").unwrap(), version.parse().unwrap());
    ConfigUpdate::new(
        config,
        Labels::new(),
        Timestamp::from_unix_millis(1_769_509_800_000).unwrap(),
    )
}

fn small_bus(capacity: usize, partitions: usize) -> MemoryBus {
    MemoryBus::with_config(
        MemoryBusConfig::default()
            .with_capacity(capacity)
            .with_event_partitions(partitions),
    )
    .unwrap()
}

async fn next<T: Send>(stream: &mut Subscription<T>) -> Delivery<T> {
    timeout(DEADLINE, stream.next())
        .await
        .expect("a delivery within the deadline")
        .unwrap()
        .expect("a delivery")
}

/// Asserts that `future` is still pending after a while, leaving it to be polled again.
async fn assert_blocked<F: Future + Unpin>(what: &str, future: &mut F) {
    assert!(
        timeout(STAYS_BLOCKED, future).await.is_err(),
        "{what} should wait, but finished"
    );
}

async fn finishes<F: Future>(what: &str, future: F) -> F::Output {
    timeout(DEADLINE, future)
        .await
        .unwrap_or_else(|_| panic!("{what} did not finish"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_makes_the_sender_wait_until_an_ack() {
    let bus = small_bus(2, 1);
    let s1 = supervisor("s1");
    let mut stream = bus.subscribe(&s1).await.unwrap();
    bus.send(&s1, &command(1)).await.unwrap();
    bus.send(&s1, &command(2)).await.unwrap();

    let third_command = command(3);
    let mut third = bus.send(&s1, &third_command);
    assert_blocked("a send to a full queue", &mut third).await;
    // Delivered is not done: the message still counts until acknowledged.
    let first = next(&mut stream).await;
    assert_blocked("a send while the queue's messages are in flight", &mut third).await;
    first.ack().await.unwrap();
    finishes("the send after an ack", third).await.unwrap();

    for n in 2..=3 {
        let delivery = next(&mut stream).await;
        assert_eq!(number(delivery.message()), n);
        delivery.ack().await.unwrap();
    }
}

/// Room is given back in batches, but never kept from a sender that waits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_ack_is_enough_for_a_waiting_sender() {
    let bus = small_bus(64, 1);
    let s1 = supervisor("s1");
    let mut stream = bus.subscribe(&s1).await.unwrap();
    for n in 0..64 {
        bus.send(&s1, &command(n)).await.unwrap();
    }
    // The sender waits first, then one message is acknowledged.
    let blocked_command = command(64);
    let mut blocked = bus.send(&s1, &blocked_command);
    assert_blocked("a send to a full queue", &mut blocked).await;
    next(&mut stream).await.ack().await.unwrap();
    finishes("the send after one ack", blocked).await.unwrap();

    // One message is acknowledged first, then the sender comes.
    next(&mut stream).await.ack().await.unwrap();
    finishes("a send after one ack", bus.send(&s1, &command(65)))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gap_in_acks_holds_the_queue_like_a_committed_offset() {
    let bus = small_bus(3, 1);
    let s1 = supervisor("s1");
    let mut stream = bus.subscribe(&s1).await.unwrap();
    for n in 1..=3 {
        bus.send(&s1, &command(n)).await.unwrap();
    }
    let mut deliveries = Vec::new();
    for _ in 1..=3 {
        deliveries.push(next(&mut stream).await);
    }
    let oldest = deliveries.remove(0);
    for delivery in deliveries {
        delivery.ack().await.unwrap();
    }
    let fourth_command = command(4);
    let mut fourth = bus.send(&s1, &fourth_command);
    assert_blocked("a send behind an unacknowledged delivery", &mut fourth).await;
    oldest.ack().await.unwrap();
    finishes("the send once the oldest is acknowledged", fourth)
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_send_sends_nothing() {
    let bus = small_bus(1, 1);
    let s1 = supervisor("s1");
    let mut stream = bus.subscribe(&s1).await.unwrap();
    bus.send(&s1, &command(1)).await.unwrap();
    {
        let second = command(2);
        let mut blocked = bus.send(&s1, &second);
        assert_blocked("a send to a full queue", &mut blocked).await;
    }
    next(&mut stream).await.ack().await.unwrap();
    bus.send(&s1, &command(3)).await.unwrap();
    assert_eq!(
        number(next(&mut stream).await.message()),
        3,
        "the cancelled send was delivered"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_waits_for_room_in_every_group_and_goes_to_all_or_none() {
    let bus = small_bus(1, 1);
    let mut fast = bus.subscribe_events(&group("fast")).await.unwrap();
    let mut slow = bus.subscribe_events(&group("slow")).await.unwrap();
    let first = event("device-1");
    bus.publish_event(&first).await.unwrap();
    next(&mut fast).await.ack().await.unwrap();

    // "slow" has not acknowledged the first event, so the second cannot go to either group.
    {
        let second = event("device-1");
        let mut blocked = bus.publish_event(&second);
        assert_blocked("publishing while one group is full", &mut blocked).await;
    }
    let held = next(&mut slow).await;
    assert_eq!(held.message(), &first);
    let third = event("device-1");
    let mut publish = bus.publish_event(&third);
    assert_blocked("publishing while one group is full", &mut publish).await;
    held.ack().await.unwrap();
    finishes("publishing once the slow group acknowledged", publish)
        .await
        .unwrap();
    for stream in [&mut fast, &mut slow] {
        let delivery = next(stream).await;
        assert_eq!(delivery.message(), &third, "the cancelled publication was delivered");
        delivery.ack().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broadcast_waits_for_room_at_every_supervisor() {
    let bus = small_bus(1, 1);
    let mut a = bus.subscribe_broadcasts(&supervisor("a")).await.unwrap();
    let mut b = bus.subscribe_broadcasts(&supervisor("b")).await.unwrap();
    bus.broadcast(&update("v1")).await.unwrap();
    next(&mut a).await.ack().await.unwrap();
    let v2 = update("v2");
    let mut second = bus.broadcast(&v2);
    assert_blocked("broadcasting while one supervisor is full", &mut second).await;
    next(&mut b).await.ack().await.unwrap();
    finishes("broadcasting once every supervisor has room", second)
        .await
        .unwrap();
    for stream in [&mut a, &mut b] {
        assert_eq!(next(stream).await.message().config.version.as_str(), "v2");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_order_acks_are_never_delivered_again() {
    let bus = MemoryBus::new();
    let s1 = supervisor("s1");
    let mut stream = bus.subscribe(&s1).await.unwrap();
    for n in 1..=6 {
        bus.send(&s1, &command(n)).await.unwrap();
    }
    let mut deliveries: Vec<_> = Vec::new();
    for _ in 1..=6 {
        deliveries.push(Some(next(&mut stream).await));
    }
    for i in [5, 3, 0, 1] {
        deliveries[i].take().unwrap().ack().await.unwrap();
    }
    drop(deliveries);
    drop(stream);

    let mut stream = bus.subscribe(&s1).await.unwrap();
    bus.send(&s1, &command(7)).await.unwrap();
    let again: Vec<u32> = [
        next(&mut stream).await,
        next(&mut stream).await,
        next(&mut stream).await,
    ]
    .iter()
    .map(|d| number(d.message()))
    .collect();
    assert_eq!(again, [3, 5, 7]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_taken_over_subscription_ends_at_once() {
    let bus = MemoryBus::new();
    let s1 = supervisor("s1");
    let mut old = bus.subscribe(&s1).await.unwrap();
    bus.send(&s1, &command(1)).await.unwrap();
    let first = next(&mut old).await;
    let mut waiting = old.next();
    assert_blocked("a subscription with nothing queued", &mut waiting).await;
    let mut new = bus.subscribe(&s1).await.unwrap();
    assert!(
        finishes("the call waiting on the older subscription", waiting)
            .await
            .unwrap()
            .is_none()
    );
    assert!(finishes("the older subscription", old.next()).await.unwrap().is_none());
    first.ack().await.unwrap();
    assert_eq!(number(next(&mut new).await.message()), 1, "the late ack was ignored");

    let mut older = bus.subscribe_broadcasts(&s1).await.unwrap();
    let mut newer = bus.subscribe_broadcasts(&s1).await.unwrap();
    assert!(
        finishes("the older broadcast subscription", older.next())
            .await
            .unwrap()
            .is_none()
    );
    bus.broadcast(&update("v1")).await.unwrap();
    assert_eq!(next(&mut newer).await.message().config.version.as_str(), "v1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_published_while_no_group_exists_are_dropped() {
    let bus = MemoryBus::new();
    bus.publish_event(&event("device-1")).await.unwrap();
    let mut stream = bus.subscribe_events(&group("late")).await.unwrap();
    let second = event("device-1");
    bus.publish_event(&second).await.unwrap();
    assert_eq!(next(&mut stream).await.message(), &second);

    // A group without members keeps its events for the next one.
    drop(stream);
    let third = event("device-1");
    bus.publish_event(&third).await.unwrap();
    let mut stream = bus.subscribe_events(&group("late")).await.unwrap();
    assert_eq!(
        next(&mut stream).await.message(),
        &second,
        "unacknowledged, so delivered again"
    );
    assert_eq!(next(&mut stream).await.message(), &third);
}

/// Devices whose events go to `partition`, from `device-0` on.
fn devices_in(bus: &MemoryBus, partition: usize, count: usize) -> Vec<String> {
    (0..)
        .map(|i| format!("device-{i}"))
        .filter(|name| bus.event_partition(&device(name)) == partition)
        .take(count)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leaving_member_hands_its_partitions_and_unacked_events_over() {
    let bus = small_bus(64, 2);
    let mut a = bus.subscribe_events(&group("g")).await.unwrap();
    let mut b = bus.subscribe_events(&group("g")).await.unwrap();
    // Partition 0 goes to the older member, `a`.
    let on_a = devices_in(&bus, 0, 1).remove(0);
    let on_b = devices_in(&bus, 1, 1).remove(0);
    let a_events: Vec<_> = (0..4).map(|_| event(&on_a)).collect();
    let b_event = event(&on_b);
    for e in &a_events {
        bus.publish_event(e).await.unwrap();
    }
    bus.publish_event(&b_event).await.unwrap();

    let acked = next(&mut a).await;
    assert_eq!(acked.message(), &a_events[0]);
    acked.ack().await.unwrap();
    let unacked = next(&mut a).await;
    assert_eq!(unacked.message(), &a_events[1]);
    let own = next(&mut b).await;
    assert_eq!(own.message(), &b_event, "b has its own partition");

    drop(a);
    for e in &a_events[1..] {
        let delivery = next(&mut b).await;
        assert_eq!(
            delivery.message(),
            e,
            "b takes a's partition over, unacknowledged events first, in order"
        );
        delivery.ack().await.unwrap();
    }
    // b's own in-flight event stayed in flight: it does not come again.
    let marker = event(&on_b);
    bus.publish_event(&marker).await.unwrap();
    assert_eq!(next(&mut b).await.message(), &marker);
    drop(unacked);
    drop(own);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_joining_member_takes_a_share_and_the_moved_in_flight_events() {
    let bus = small_bus(64, 2);
    let mut a = bus.subscribe_events(&group("g")).await.unwrap();
    let stays = devices_in(&bus, 0, 1).remove(0);
    let moves = devices_in(&bus, 1, 1).remove(0);
    let staying = event(&stays);
    let moving: Vec<_> = (0..3).map(|_| event(&moves)).collect();
    bus.publish_event(&staying).await.unwrap();
    for e in &moving {
        bus.publish_event(e).await.unwrap();
    }
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(next(&mut a).await);
    }
    let got: BTreeSet<_> = held.iter().map(|d| completed(d.message())).collect();
    let sent: BTreeSet<_> = moving.iter().chain([&staying]).map(completed).collect();
    assert_eq!(got, sent, "a alone gets every event");

    let mut b = bus.subscribe_events(&group("g")).await.unwrap();
    for e in &moving {
        let delivery = next(&mut b).await;
        assert_eq!(
            delivery.message(),
            e,
            "partition 1 moved to b with what a had in flight, in order"
        );
        delivery.ack().await.unwrap();
    }
    // a keeps partition 0; its in-flight event there stays in flight, and a's
    // late acks for the moved partition are ignored.
    for delivery in held {
        delivery.ack().await.unwrap();
    }
    let marker = event(&stays);
    bus.publish_event(&marker).await.unwrap();
    assert_eq!(next(&mut a).await.message(), &marker);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_beyond_the_partition_count_wait_idle_until_one_leaves() {
    let bus = small_bus(64, 1);
    let a = bus.subscribe_events(&group("g")).await.unwrap();
    let mut b = bus.subscribe_events(&group("g")).await.unwrap();
    let e = event("device-1");
    bus.publish_event(&e).await.unwrap();
    let mut idle = b.next();
    assert_blocked("the member without a partition", &mut idle).await;
    drop(a);
    let delivery = finishes("the idle member, once the other left", idle)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(delivery.message(), &e);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriptions_drain_and_end_when_the_bus_is_dropped() {
    let bus = MemoryBus::new();
    let s1 = supervisor("s1");
    let mut commands = bus.subscribe(&s1).await.unwrap();
    let mut events = bus.subscribe_events(&group("g")).await.unwrap();
    bus.send(&s1, &command(1)).await.unwrap();
    let waiting = tokio::spawn(async move { events.next().await.unwrap().is_none() });
    drop(bus);
    let delivery = next(&mut commands).await;
    assert_eq!(number(delivery.message()), 1, "what was queued is still delivered");
    delivery.ack().await.unwrap();
    assert!(finishes("the command stream", commands.next()).await.unwrap().is_none());
    assert!(
        finishes("the waiting event stream", waiting).await.unwrap(),
        "a waiting stream ends"
    );
}

#[test]
fn config_is_validated_and_read_from_json() {
    let err = MemoryBus::with_config(MemoryBusConfig::default().with_capacity(0)).unwrap_err();
    assert!(matches!(err, Error::InvalidInput { .. }));
    assert!(err.to_string().contains("capacity"), "{err}");
    for partitions in [0, 65_537] {
        let err = MemoryBus::with_config(MemoryBusConfig::default().with_event_partitions(partitions)).unwrap_err();
        assert!(err.to_string().contains("event_partitions"), "{err}");
    }
    assert!(MemoryBus::with_config(MemoryBusConfig::default().with_event_partitions(65_536)).is_ok());

    let config: MemoryBusConfig = serde_json::from_str(r#"{"event_partitions": 2}"#).unwrap();
    assert_eq!(config, MemoryBusConfig::default().with_event_partitions(2));
    assert!(
        serde_json::from_str::<MemoryBusConfig>(r#"{"capacty": 2}"#).is_err(),
        "unknown fields are errors"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_handed_back_too_often_is_kept_with_its_reason() {
    let config = MemoryBusConfig::default().with_capacity(1).with_max_deliveries(2);
    let bus = MemoryBus::with_config(config).unwrap();
    let s1 = supervisor("s1");
    let mut stream = bus.subscribe(&s1).await.unwrap();
    let doomed = command(7);
    bus.send(&s1, &doomed).await.unwrap();
    for attempt in 1..=2 {
        let delivery = next(&mut stream).await;
        assert_eq!((number(delivery.message()), delivery.attempt()), (7, attempt));
        delivery
            .nack(Duration::from_millis(5), format!("refused {attempt}"))
            .await
            .unwrap();
    }
    let letters = bus.dead_letters();
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert_eq!(letters[0].stream, format!("commands for {s1}"));
    assert_eq!((letters[0].deliveries, letters[0].reason.as_str()), (2, "refused 2"));
    assert!(
        letters[0].message.contains(&doomed.correlation_id.to_string()),
        "{letters:?}"
    );
    // It is done: the queue of one has room again.
    finishes("a send to the queue it left", bus.send(&s1, &command(8)))
        .await
        .unwrap();
    assert_eq!(number(next(&mut stream).await.message()), 8);
}

#[test]
fn a_bound_of_no_deliveries_is_refused() {
    let err = MemoryBus::with_config(MemoryBusConfig::default().with_max_deliveries(0)).unwrap_err();
    assert!(err.to_string().contains("max_deliveries"), "{err}");
}
