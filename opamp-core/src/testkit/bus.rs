//! The bus conformance suite: what every [`Bus`] must do.
//!
//! Each case is a plain async function taking a [`BusFixture`];
//! [`bus_conformance!`](crate::bus_conformance) expands into one test per case:
//!
//! ```
//! use std::sync::Arc;
//! use opamp_core::testkit::bus::BusFixture;
//!
//! async fn fixture() -> BusFixture {
//!     BusFixture::new(Arc::new(opamp_bus::memory::MemoryBus::new()))
//! }
//!
//! opamp_core::bus_conformance!(fixture);
//! # fn main() {}
//! ```
//!
//! Every case holds only for what a broker-backed bus (Kafka) can promise
//! too: nothing here depends on senders being held back, and where a backend
//! may deliver a message more than once (at-least-once) the case allows it.
//! Every wait has a deadline, so a failing backend fails the case instead of
//! hanging it.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Debug;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::timeout;

use crate::bus::{Bus, ConfigUpdate, DEFAULT_MAX_DELIVERIES, Delivery, Subscription};
use crate::command::{Command, CommandKind, CommandOutcome, CorrelationId};
use crate::config::{ConfigBundle, ConfigRef};
use crate::event::{ConfigApplyState, DeviceEvent, EventKind};
use crate::id::{AgentType, ConfigVersion, DeviceId, GroupName, SupervisorId};
use crate::status::Labels;
use crate::time::Timestamp;

/// How long a case waits for something that must happen. Generous, for
/// brokers that rebalance consumer groups in seconds.
const DEADLINE: Duration = Duration::from_secs(20);

/// A bus for one case.
///
/// Each fixture must be isolated from every other (a Kafka fixture uses its
/// own topic names), since the cases run in parallel and some count on seeing
/// only their own messages. Every queue of the bus must hold at least 16
/// messages, queued and unacknowledged together: no case has more
/// outstanding on one queue at once.
#[derive(Debug, Clone)]
pub struct BusFixture {
    /// The bus under test.
    pub bus: Arc<dyn Bus>,
    /// How many times the bus delivers a message handed back before it
    /// dead-letters it: [`DEFAULT_MAX_DELIVERIES`] unless set otherwise.
    pub max_deliveries: u32,
}

impl BusFixture {
    /// A fixture for `bus`, configured with the default bound on deliveries.
    pub fn new(bus: Arc<dyn Bus>) -> Self {
        BusFixture {
            bus,
            max_deliveries: DEFAULT_MAX_DELIVERIES,
        }
    }

    /// The same, for a bus that delivers a message handed back at most `deliveries` times.
    pub fn with_max_deliveries(mut self, deliveries: u32) -> Self {
        self.max_deliveries = deliveries;
        self
    }
}

/// How long a case lets a delivery handed back wait before it comes again.
const RETRY_IN: Duration = Duration::from_millis(20);

/// Commands sent before the supervisor subscribes wait for it, and arrive in
/// order with every field equal (each kind of command); acknowledged ones do
/// not come again to the next subscription.
pub async fn commands_round_trip(f: &BusFixture) {
    let supervisor = fresh_supervisor("round-trip");
    let device = DeviceId::new("device-5").unwrap();
    let commands = every_kind_of_command(device);
    for command in &commands {
        call("send", f.bus.send(&supervisor, command)).await;
    }

    let mut stream = call("subscribe", f.bus.subscribe(&supervisor)).await;
    for command in &commands {
        let delivery = next(&mut stream, "a command sent before subscribing").await;
        assert_eq!(
            delivery.message(),
            command,
            "commands arrive in order, every field equal"
        );
        ack(delivery).await;
    }
    drop(stream);

    let mut stream = call("subscribe again", f.bus.subscribe(&supervisor)).await;
    let marker = numbered_commands(device, 1).remove(0);
    call("send", f.bus.send(&supervisor, &marker)).await;
    let delivery = next(&mut stream, "the marker").await;
    assert_eq!(delivery.message(), &marker, "acknowledged commands came again");
    ack(delivery).await;
}

/// Two supervisors get disjoint command streams: each exactly its own, in order.
pub async fn commands_are_isolated_per_supervisor(f: &BusFixture) {
    let supervisors = [fresh_supervisor("isolated-a"), fresh_supervisor("isolated-b")];
    let mut streams = Vec::new();
    for supervisor in &supervisors {
        streams.push(call("subscribe", f.bus.subscribe(supervisor)).await);
    }
    let device = DeviceId::new("device-5").unwrap();
    let sent = [numbered_commands(device, 10), numbered_commands(device, 10)];
    for i in 0..10 {
        for (supervisor, commands) in supervisors.iter().zip(&sent) {
            call("send", f.bus.send(supervisor, &commands[i])).await;
        }
    }
    for ((supervisor, stream), commands) in supervisors.iter().zip(&mut streams).zip(&sent) {
        for command in commands {
            let delivery = next(stream, "a command").await;
            assert_eq!(
                delivery.message(),
                command,
                "{supervisor} gets exactly its own commands, in order"
            );
            ack(delivery).await;
        }
        // Nothing of the other supervisor's comes after them either.
        let marker = numbered_commands(device, 1).remove(0);
        call("send", f.bus.send(supervisor, &marker)).await;
        let delivery = next(stream, "the marker").await;
        assert_eq!(
            delivery.message(),
            &marker,
            "{supervisor} got a command that was not its own"
        );
        ack(delivery).await;
    }
}

/// Commands for several devices, sent concurrently (each device's in
/// sequence), reach the supervisor once each and in order per device.
pub async fn commands_keep_order_per_device(f: &BusFixture) {
    const DEVICES: usize = 4;
    const PER_DEVICE: usize = 100;
    let supervisor = fresh_supervisor("order");
    let mut stream = call("subscribe", f.bus.subscribe(&supervisor)).await;

    let mut sent = BTreeMap::new();
    let mut senders = Vec::new();
    for d in 0..DEVICES {
        let device = DeviceId::new(format!("device-{d}")).unwrap();
        let commands = numbered_commands(device, PER_DEVICE);
        sent.insert(device, ids_of(&commands));
        let bus = Arc::clone(&f.bus);
        senders.push(tokio::spawn(async move {
            for command in &commands {
                call("send", bus.send(&supervisor, command)).await;
            }
        }));
    }

    let mut received: BTreeMap<DeviceId, Vec<CorrelationId>> = BTreeMap::new();
    for _ in 0..DEVICES * PER_DEVICE {
        let delivery = next(&mut stream, "a command").await;
        let command = delivery.message();
        received.entry(command.device).or_default().push(command.correlation_id);
        ack(delivery).await;
    }
    join_all(senders).await;
    assert_eq!(
        received, sent,
        "each device's commands arrive once each, in the order sent"
    );
}

/// Deliveries not acknowledged come again, in order and ahead of what was
/// not delivered yet, to the next subscription (a restart: the old one is
/// dropped); those acknowledged before them do not.
pub async fn unacked_commands_come_again_in_order(f: &BusFixture) {
    let supervisor = fresh_supervisor("redeliver");
    let device = DeviceId::new("device-5").unwrap();
    let commands = numbered_commands(device, 6);
    let stream = call("subscribe", f.bus.subscribe(&supervisor)).await;
    for command in &commands {
        call("send", f.bus.send(&supervisor, command)).await;
    }
    // Take four of the six, acknowledge the first two.
    take_then_die(stream, &commands[..4], 2, "a command").await;

    let mut stream = call("subscribe again", f.bus.subscribe(&supervisor)).await;
    let why = "unacknowledged commands come again, in order, and only they";
    expect_in_order(
        &mut stream,
        &commands[2..],
        "a command delivered again, or not yet delivered",
        why,
    )
    .await;
    let marker = numbered_commands(device, 1).remove(0);
    call("send", f.bus.send(&supervisor, &marker)).await;
    let why = "a command came a third time after being acknowledged";
    expect_in_order(&mut stream, &[marker], "the marker", why).await;
}

/// Acknowledgements may come in any order. The next subscription gets every
/// delivery left unacknowledged, in order, and none of those acknowledged
/// before the first unacknowledged one. (One acknowledged after a gap may come
/// again: a log-based broker keeps one committed position per partition.)
pub async fn acks_in_any_order(f: &BusFixture) {
    let supervisor = fresh_supervisor("ack-order");
    let device = DeviceId::new("device-5").unwrap();
    let commands = numbered_commands(device, 6);
    let mut stream = call("subscribe", f.bus.subscribe(&supervisor)).await;
    for command in &commands {
        call("send", f.bus.send(&supervisor, command)).await;
    }
    let mut deliveries = Vec::new();
    for command in &commands {
        let delivery = next(&mut stream, "a command").await;
        assert_eq!(delivery.message(), command);
        deliveries.push(Some(delivery));
    }
    // Acknowledge 6, 4, 1 and 2, in that order; leave 3 and 5.
    for i in [5, 3, 0, 1] {
        ack(deliveries[i].take().unwrap()).await;
    }
    drop(deliveries);
    drop(stream);

    let mut stream = call("subscribe again", f.bus.subscribe(&supervisor)).await;
    let marker = numbered_commands(device, 1).remove(0);
    call("send", f.bus.send(&supervisor, &marker)).await;
    let mut again = Vec::new();
    loop {
        let delivery = next(&mut stream, "a command delivered again, or the marker").await;
        let id = delivery.message().correlation_id;
        ack(delivery).await;
        if id == marker.correlation_id {
            break;
        }
        let position = commands.iter().position(|c| c.correlation_id == id);
        again.push(
            position
                .map(|p| p + 1)
                .unwrap_or_else(|| panic!("an unknown command came: {id}")),
        );
    }
    assert_eq!(
        again.first(),
        Some(&3),
        "the first unacknowledged command comes first; came {again:?}"
    );
    assert!(
        again.contains(&5),
        "every unacknowledged command comes again; came {again:?}"
    );
    assert!(
        again.is_sorted_by(|a, b| a < b),
        "they come in their original order, once each; came {again:?}"
    );
    assert!(
        !again.contains(&1) && !again.contains(&2),
        "commands acknowledged before every gap came again: {again:?}"
    );
}

/// A newer subscription takes the stream over: it gets what the older one
/// had not acknowledged, and everything sent afterwards. The older one ends
/// (`next` returns `Ok(None)`, possibly after yielding what it had already
/// fetched); its acknowledgements made after the takeover have no effect,
/// and dropping it does not disturb the newer one.
pub async fn newer_subscription_takes_over(f: &BusFixture) {
    let supervisor = fresh_supervisor("takeover");
    let device = DeviceId::new("device-5").unwrap();
    let commands = numbered_commands(device, 3);
    let mut old = call("subscribe", f.bus.subscribe(&supervisor)).await;
    call("send", f.bus.send(&supervisor, &commands[0])).await;
    let stale = next(&mut old, "the first command").await;
    assert_eq!(stale.message(), &commands[0]);

    let mut new = call("subscribe again", f.bus.subscribe(&supervisor)).await;
    // A late acknowledgement is not an error, though it has no effect.
    call("acknowledging from the older subscription", stale.ack()).await;
    call("send", f.bus.send(&supervisor, &commands[1])).await;
    let first = next(&mut new, "the unacknowledged command, again").await;
    assert_eq!(
        first.message(),
        &commands[0],
        "the newer subscription gets what the older one left"
    );
    let second = next(&mut new, "the second command").await;
    assert_eq!(second.message(), &commands[1]);

    // The old subscription ends, possibly after what it had fetched already.
    let ends = async {
        loop {
            match old.next().await {
                Ok(None) => return,
                Ok(Some(delivery)) => assert!(
                    commands[..2].contains(delivery.message()),
                    "the old subscription got a command sent after it ended: {:?}",
                    delivery.message()
                ),
                Err(err) => panic!("the old subscription failed instead of ending: {err}"),
            }
        }
    };
    wait("the old subscription to end", ends).await;
    drop(old);

    call("send", f.bus.send(&supervisor, &commands[2])).await;
    let third = next(&mut new, "the third command").await;
    assert_eq!(
        third.message(),
        &commands[2],
        "dropping the old subscription disturbed the new one"
    );
    for delivery in [first, second, third] {
        ack(delivery).await;
    }
}

/// A broadcast reaches every supervisor subscribed to broadcasts, in order
/// and with every field equal; one that subscribes later gets the broadcasts
/// from then on.
pub async fn broadcasts_reach_every_subscriber(f: &BusFixture) {
    let early = [fresh_supervisor("broadcast-a"), fresh_supervisor("broadcast-b")];
    let mut streams = Vec::new();
    for supervisor in &early {
        streams.push(call("subscribe to broadcasts", f.bus.subscribe_broadcasts(supervisor)).await);
    }
    let updates = numbered_updates(2);
    for update in &updates {
        call("broadcast", f.bus.broadcast(update)).await;
    }
    for stream in &mut streams {
        for update in &updates {
            let delivery = next(stream, "a broadcast").await;
            assert_eq!(
                delivery.message(),
                update,
                "broadcasts arrive in order, every field equal"
            );
            ack(delivery).await;
        }
    }

    let late = fresh_supervisor("broadcast-late");
    streams.push(call("subscribe to broadcasts", f.bus.subscribe_broadcasts(&late)).await);
    let later = numbered_updates(1).remove(0);
    call("broadcast", f.bus.broadcast(&later)).await;
    for stream in &mut streams {
        let delivery = next(stream, "the later broadcast").await;
        assert_eq!(
            delivery.message(),
            &later,
            "a supervisor got a broadcast from before it first subscribed"
        );
        ack(delivery).await;
    }
}

/// Broadcasts not acknowledged come again, in order, to the supervisor's next
/// subscription, followed by those sent while it had none.
pub async fn unacked_broadcasts_come_again(f: &BusFixture) {
    let supervisor = fresh_supervisor("broadcast-again");
    let updates = numbered_updates(4);
    let stream = call("subscribe to broadcasts", f.bus.subscribe_broadcasts(&supervisor)).await;
    for update in &updates[..3] {
        call("broadcast", f.bus.broadcast(update)).await;
    }
    take_then_die(stream, &updates[..3], 1, "a broadcast").await;

    call("broadcast", f.bus.broadcast(&updates[3])).await;
    let mut stream = call("subscribe to broadcasts again", f.bus.subscribe_broadcasts(&supervisor)).await;
    let why = "unacknowledged broadcasts come again in order, then the new one";
    expect_in_order(
        &mut stream,
        &updates[1..],
        "a broadcast, again or sent during the restart",
        why,
    )
    .await;
}

/// Every group gets every event, in order and with every field equal (each
/// kind of event).
pub async fn events_reach_every_group(f: &BusFixture) {
    let groups = [fresh_group("every-a"), fresh_group("every-b")];
    let mut streams = Vec::new();
    for group in &groups {
        streams.push(call("subscribe to events", f.bus.subscribe_events(group)).await);
    }
    let events = every_kind_of_event(DeviceId::new("device-5").unwrap());
    for event in &events {
        call("publish", f.bus.publish_event(event)).await;
    }
    for (group, stream) in groups.iter().zip(&mut streams) {
        for event in &events {
            let delivery = next(stream, "an event").await;
            assert_eq!(
                delivery.message(),
                event,
                "group {group} gets every event in order, every field equal"
            );
            ack(delivery).await;
        }
    }
}

/// The members of a group share its events: with membership settled (both
/// joined before anything is published) each event goes to exactly one of
/// them, all of one device's events to the same member, in the order
/// published, though devices are published concurrently.
pub async fn group_members_share_events(f: &BusFixture) {
    const DEVICES: usize = 16;
    const PER_DEVICE: usize = 25;
    let group = fresh_group("share");
    let (seen, mut deliveries) = mpsc::unbounded_channel();
    let mut members = Vec::new();
    for member in 0..2 {
        let mut stream = call("subscribe to events", f.bus.subscribe_events(&group)).await;
        let seen = seen.clone();
        members.push(tokio::spawn(async move {
            while let Some(delivery) = stream.next().await.expect("the member's stream failed") {
                let event = delivery.message().clone();
                ack(delivery).await;
                if seen.send((member, event)).is_err() {
                    return;
                }
            }
        }));
    }
    drop(seen);

    let mut published = BTreeMap::new();
    let mut publishers = Vec::new();
    for d in 0..DEVICES {
        let device = DeviceId::new(format!("device-{d}")).unwrap();
        let events = numbered_events(device, PER_DEVICE);
        published.insert(device, events.iter().map(completed_id).collect::<Vec<_>>());
        let bus = Arc::clone(&f.bus);
        publishers.push(tokio::spawn(async move {
            for event in &events {
                call("publish", bus.publish_event(event)).await;
            }
        }));
    }

    let mut received: BTreeMap<DeviceId, Vec<CorrelationId>> = BTreeMap::new();
    let mut member_of: HashMap<DeviceId, usize> = HashMap::new();
    for _ in 0..DEVICES * PER_DEVICE {
        let (member, event) = wait("an event", deliveries.recv()).await.expect("a member stopped");
        let first = *member_of.entry(event.device).or_insert(member);
        assert_eq!(first, member, "events of {} went to both members", event.device);
        received.entry(event.device).or_default().push(completed_id(&event));
    }
    join_all(publishers).await;
    for member in members {
        member.abort();
    }
    assert_eq!(
        received, published,
        "each event reaches the group once, each device's in order"
    );
}

/// Events not acknowledged come again, in order, when the group's only member
/// leaves and a new one joins; those acknowledged before them do not.
pub async fn unacked_events_come_again(f: &BusFixture) {
    let group = fresh_group("events-again");
    let device = DeviceId::new("device-5").unwrap();
    let events = numbered_events(device, 5);
    let stream = call("subscribe to events", f.bus.subscribe_events(&group)).await;
    for event in &events {
        call("publish", f.bus.publish_event(event)).await;
    }
    take_then_die(stream, &events, 2, "an event").await;

    let mut stream = call("subscribe to events again", f.bus.subscribe_events(&group)).await;
    let why = "unacknowledged events come again, in order, and only they";
    expect_in_order(&mut stream, &events[2..], "an event delivered again", why).await;
    let marker = numbered_events(device, 1).remove(0);
    call("publish", f.bus.publish_event(&marker)).await;
    let why = "an event came a third time after being acknowledged";
    expect_in_order(&mut stream, &[marker], "the marker", why).await;
}

/// A command handed back comes again to the same subscription, counted as
/// its second delivery, while the others are delivered meanwhile; once
/// acknowledged it does not come again, to that subscription or the next.
pub async fn handed_back_commands_come_again(f: &BusFixture) {
    let supervisor = fresh_supervisor("handed-back");
    let device = DeviceId::new("device-5").unwrap();
    let commands = numbered_commands(device, 3);
    let mut stream = call("subscribe", f.bus.subscribe(&supervisor)).await;
    for command in &commands {
        call("send", f.bus.send(&supervisor, command)).await;
    }
    let first = next(&mut stream, "the first command").await;
    assert_eq!(first.message(), &commands[0]);
    assert_eq!(first.attempt(), 1, "a first delivery is attempt 1");
    call("handing a delivery back", first.nack(RETRY_IN, "the store is down")).await;

    let mut seen = BTreeMap::new();
    for _ in 0..3 {
        let delivery = next(&mut stream, "a command, or the one handed back").await;
        let id = delivery.message().correlation_id;
        assert!(
            seen.insert(id, delivery.attempt()).is_none(),
            "{id} came twice before it was handed back again"
        );
        ack(delivery).await;
    }
    let expected: BTreeMap<_, _> = ids_of(&commands).into_iter().zip([2, 1, 1]).collect();
    assert_eq!(
        seen, expected,
        "the one handed back comes again as attempt 2, the others once each"
    );
    drop(stream);

    let mut stream = call("subscribe again", f.bus.subscribe(&supervisor)).await;
    let marker = numbered_commands(device, 1).remove(0);
    call("send", f.bus.send(&supervisor, &marker)).await;
    let why = "a command handed back and then acknowledged came again";
    expect_in_order(&mut stream, &[marker], "the marker", why).await;
}

/// A command handed back at every delivery is delivered
/// [`BusFixture::max_deliveries`] times, then no more: it goes to the dead
/// letters and counts as done, so it holds nothing back, in this
/// subscription or the next.
pub async fn handed_back_too_often_is_dead_lettered(f: &BusFixture) {
    let supervisor = fresh_supervisor("dead-letter");
    let device = DeviceId::new("device-5").unwrap();
    let commands = numbered_commands(device, 2);
    let (doomed, other) = (&commands[0], &commands[1]);
    let mut stream = call("subscribe", f.bus.subscribe(&supervisor)).await;
    for command in &commands {
        call("send", f.bus.send(&supervisor, command)).await;
    }
    let mut attempts = Vec::new();
    let mut other_seen = false;
    while attempts.len() < f.max_deliveries as usize || !other_seen {
        let delivery = next(&mut stream, "the command handed back, or the other").await;
        if delivery.message() == other {
            assert!(!other_seen, "the acknowledged command came again");
            other_seen = true;
            ack(delivery).await;
            continue;
        }
        assert_eq!(delivery.message(), doomed);
        attempts.push(delivery.attempt());
        call("handing a delivery back", delivery.nack(RETRY_IN, "cannot be recorded")).await;
    }
    let expected: Vec<u32> = (1..=f.max_deliveries).collect();
    assert_eq!(attempts, expected, "each delivery counted, up to the bound");

    let marker = numbered_commands(device, 1).remove(0);
    call("send", f.bus.send(&supervisor, &marker)).await;
    let why = "a command handed back past the bound came again";
    expect_in_order(&mut stream, std::slice::from_ref(&marker), "the marker", why).await;
    drop(stream);

    let mut stream = call("subscribe again", f.bus.subscribe(&supervisor)).await;
    let second = numbered_commands(device, 1).remove(0);
    call("send", f.bus.send(&supervisor, &second)).await;
    let why = "a dead-lettered command came again to the next subscription";
    expect_in_order(&mut stream, &[second], "a second marker", why).await;
}

/// A new bus holds no history; once a command was sent it does, also after
/// the command was acknowledged (the records of those commands are in a
/// store, which must still have them).
pub async fn commands_sent_are_history(f: &BusFixture) {
    assert!(!call("asking a new bus for history", f.bus.holds_history()).await);
    let supervisor = fresh_supervisor("history");
    let mut stream = call("subscribe", f.bus.subscribe(&supervisor)).await;
    let command = numbered_commands(DeviceId::new("device-5").unwrap(), 1).remove(0);
    call("send", f.bus.send(&supervisor, &command)).await;
    ack(next(&mut stream, "the command").await).await;
    assert!(call("asking for history after a send", f.bus.holds_history()).await);
}

/// An event handed back comes again to the same member of its group.
pub async fn handed_back_events_come_again(f: &BusFixture) {
    let group = fresh_group("events-handed-back");
    let device = DeviceId::new("device-5").unwrap();
    let mut stream = call("subscribe to events", f.bus.subscribe_events(&group)).await;
    let event = numbered_events(device, 1).remove(0);
    call("publish", f.bus.publish_event(&event)).await;
    let delivery = next(&mut stream, "the event").await;
    assert_eq!((delivery.message(), delivery.attempt()), (&event, 1));
    call("handing a delivery back", delivery.nack(RETRY_IN, "busy")).await;
    let again = next(&mut stream, "the event handed back").await;
    assert_eq!((again.message(), again.attempt()), (&event, 2));
    ack(again).await;
}

/// A consumer that dies mid-batch: takes `expected` from `stream` in order,
/// acknowledges the first `acked` of them, then drops the rest and the stream.
async fn take_then_die<T: Send + Debug + PartialEq>(
    mut stream: Subscription<T>,
    expected: &[T],
    acked: usize,
    what: &str,
) {
    let mut deliveries = Vec::new();
    for message in expected {
        let delivery = next(&mut stream, what).await;
        assert_eq!(delivery.message(), message);
        deliveries.push(delivery);
    }
    let unacked = deliveries.split_off(acked);
    for delivery in deliveries {
        ack(delivery).await;
    }
    drop(unacked);
}

/// Takes `expected` from `stream` in order, acknowledging each; `why` says what a mismatch means.
async fn expect_in_order<T: Send + Debug + PartialEq>(
    stream: &mut Subscription<T>,
    expected: &[T],
    what: &str,
    why: &str,
) {
    for message in expected {
        let delivery = next(stream, what).await;
        assert_eq!(delivery.message(), message, "{why}");
        ack(delivery).await;
    }
}

/// Awaits `future`, which must finish within the deadline.
async fn wait<F: Future>(what: &str, future: F) -> F::Output {
    timeout(DEADLINE, future)
        .await
        .unwrap_or_else(|_| panic!("{what}: not done within {DEADLINE:?}"))
}

/// Awaits a bus call, which must succeed within the deadline.
async fn call<T>(what: &str, future: impl Future<Output = crate::Result<T>>) -> T {
    wait(what, future).await.unwrap_or_else(|err| panic!("{what}: {err}"))
}

/// The next delivery, which must come within the deadline.
async fn next<T: Send + Debug>(stream: &mut Subscription<T>, what: &str) -> Delivery<T> {
    match timeout(DEADLINE, stream.next()).await {
        Ok(Ok(Some(delivery))) => delivery,
        Ok(Ok(None)) => panic!("waiting for {what}: the subscription ended"),
        Ok(Err(err)) => panic!("waiting for {what}: {err}"),
        Err(_) => panic!("waiting for {what}: nothing came within {DEADLINE:?}"),
    }
}

async fn ack<T>(delivery: Delivery<T>) {
    call("acknowledging a delivery", delivery.ack()).await;
}

async fn join_all(tasks: Vec<tokio::task::JoinHandle<()>>) {
    for task in tasks {
        if let Err(err) = wait("a sending task", task).await {
            std::panic::resume_unwind(err.into_panic());
        }
    }
}

fn fresh_supervisor(role: &str) -> SupervisorId {
    SupervisorId::new(format!("{role}-{}", uuid::Uuid::new_v4().simple())).unwrap()
}

fn fresh_group(role: &str) -> GroupName {
    GroupName::new(format!("{role}-{}", uuid::Uuid::new_v4().simple())).unwrap()
}

/// A fixed time with milliseconds, which every wire format must keep.
fn at(offset_millis: i64) -> Timestamp {
    Timestamp::from_unix_millis(1_769_509_800_123 + offset_millis).unwrap()
}

fn ids_of(commands: &[Command]) -> Vec<CorrelationId> {
    commands.iter().map(|command| command.correlation_id).collect()
}

/// `count` distinct commands for `device`.
fn numbered_commands(device: DeviceId, count: usize) -> Vec<Command> {
    (0..count)
        .map(|i| {
            let kind = CommandKind::SetEmission { state: i % 2 == 0 };
            Command::new(device, kind, at(i as i64), Duration::from_secs(30))
        })
        .collect()
}

fn every_kind_of_command(device: DeviceId) -> Vec<Command> {
    let kinds = [
        CommandKind::SetEmission { state: true },
        CommandKind::ApplyConfig {
            agent_type: AgentType::new("fluentbit").unwrap(),
            version: ConfigVersion::new("v1.2.3+build.7").unwrap(),
        },
        CommandKind::Restart,
        CommandKind::Custom {
            capability: "com.example.diagnostics".into(),
            message_type: "dump".into(),
            data: vec![0, 159, 146, 150, 255],
        },
    ];
    kinds
        .into_iter()
        .enumerate()
        .map(|(i, kind)| Command::new(device, kind, at(i as i64), Duration::from_millis(4_321)))
        .collect()
}

/// `count` distinct broadcasts, each selecting by labels.
fn numbered_updates(count: usize) -> Vec<ConfigUpdate> {
    (0..count)
        .map(|i| {
            let config = ConfigRef::new(
                AgentType::new("fluentbit").unwrap(),
                ConfigVersion::new(format!("v{i}")).unwrap(),
            );
            let selector = Labels::from([
                ("ring".to_owned(), "canary".to_owned()),
                ("region".to_owned(), "eu".to_owned()),
            ]);
            ConfigUpdate::new(config, selector, at(i as i64))
        })
        .collect()
}

/// `count` distinct events about `device`, told apart by correlation id.
fn numbered_events(device: DeviceId, count: usize) -> Vec<DeviceEvent> {
    (0..count)
        .map(|i| {
            let kind = EventKind::CommandCompleted {
                correlation_id: CorrelationId::new(),
                outcome: CommandOutcome::Acked,
            };
            DeviceEvent::new(device, kind, at(i as i64))
        })
        .collect()
}

fn completed_id(event: &DeviceEvent) -> CorrelationId {
    match &event.kind {
        EventKind::CommandCompleted { correlation_id, .. } => *correlation_id,
        other => panic!("the case published only completions, yet got {other:?}"),
    }
}

fn every_kind_of_event(device: DeviceId) -> Vec<DeviceEvent> {
    let s1 = SupervisorId::new("supervisor-1").unwrap();
    let s2 = SupervisorId::new("supervisor-2").unwrap();
    let kinds = [
        EventKind::Connected { supervisor: s1 },
        EventKind::Disconnected { supervisor: s1 },
        EventKind::TakenOver { from: s1, to: s2 },
        EventKind::ConfigAck {
            hash: ConfigBundle::new().hash(),
            state: ConfigApplyState::Failed,
            error: Some("reload returned 1".into()),
        },
        EventKind::StatusChanged {
            emission: Some(false),
            config_version: Some(ConfigVersion::new("v2").unwrap()),
        },
        EventKind::CommandCompleted {
            correlation_id: CorrelationId::new(),
            outcome: CommandOutcome::Failed {
                reason: "device said no".into(),
            },
        },
    ];
    kinds
        .into_iter()
        .enumerate()
        .map(|(i, kind)| DeviceEvent::new(device, kind, at(i as i64)))
        .collect()
}

/// Expands into one test per case of the [bus suite](crate::testkit::bus),
/// each making a fresh fixture with `$fixture().await`.
///
/// The calling crate needs `tokio` with the `macros` and `rt-multi-thread`
/// features. See the [suite's documentation](crate::testkit::bus) for an example.
#[macro_export]
macro_rules! bus_conformance {
    ($fixture:path) => {
        $crate::bus_conformance!(@cases $fixture;
            commands_round_trip,
            commands_are_isolated_per_supervisor,
            commands_keep_order_per_device,
            unacked_commands_come_again_in_order,
            acks_in_any_order,
            newer_subscription_takes_over,
            broadcasts_reach_every_subscriber,
            unacked_broadcasts_come_again,
            events_reach_every_group,
            group_members_share_events,
            unacked_events_come_again,
            handed_back_commands_come_again,
            handed_back_too_often_is_dead_lettered,
            handed_back_events_come_again,
            commands_sent_are_history,
        );
    };
    (@cases $fixture:path; $($case:ident),* $(,)?) => {
        $(
            #[::tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                let f = $fixture().await;
                $crate::testkit::bus::$case(&f).await;
            }
        )*
    };
}
