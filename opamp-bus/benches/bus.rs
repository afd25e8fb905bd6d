//! Throughput of the memory bus beside a raw tokio channel.
//!
//! Both move the same `Command` values from a producer task to a consumer
//! task running concurrently on one multi-threaded runtime, through a queue
//! of the same capacity; the bus's consumer also acknowledges each one.
//!
//! ```text
//! cargo bench -p opamp-bus --bench bus
//! ```

#![allow(missing_docs, reason = "criterion_group! makes an undocumented pub fn")]

use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use opamp_bus::memory::{MemoryBus, MemoryBusConfig};
use opamp_core::{Command, CommandBus, CommandKind, DeviceId, SupervisorId, Timestamp};
use tokio::runtime::Runtime;
use tokio::sync::mpsc;

/// Commands per iteration.
const MESSAGES: usize = 20_000;
/// Queue capacity of both the bus and the channel.
const CAPACITY: usize = 1024;

fn command() -> Command {
    Command::new(
        DeviceId::new("device-000042").unwrap(),
        CommandKind::SetEmission { state: true },
        Timestamp::from_unix_millis(1_769_509_800_000).unwrap(),
        Duration::from_secs(30),
    )
}

fn runtime() -> Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// Sends, receives and acknowledges `MESSAGES` commands through a fresh bus.
async fn through_memory_bus(command: &Command) {
    let bus = MemoryBus::with_config(MemoryBusConfig::default().with_capacity(CAPACITY)).unwrap();
    let supervisor = SupervisorId::new("supervisor-pod-3").unwrap();
    let mut stream = bus.subscribe(&supervisor).await.unwrap();
    let producer = {
        let bus = bus.clone();
        let command = command.clone();
        tokio::spawn(async move {
            for _ in 0..MESSAGES {
                bus.send(&supervisor, &command).await.unwrap();
            }
        })
    };
    let consumer = tokio::spawn(async move {
        for _ in 0..MESSAGES {
            let delivery = stream.next().await.unwrap().unwrap();
            black_box(delivery.message());
            delivery.ack().await.unwrap();
        }
    });
    producer.await.unwrap();
    consumer.await.unwrap();
}

/// Sends and receives `MESSAGES` clones of `command` through a fresh channel.
async fn through_mpsc_channel(command: &Command) {
    let (sender, mut receiver) = mpsc::channel(CAPACITY);
    let producer = {
        let command = command.clone();
        tokio::spawn(async move {
            for _ in 0..MESSAGES {
                sender.send(command.clone()).await.unwrap();
            }
        })
    };
    let consumer = tokio::spawn(async move {
        for _ in 0..MESSAGES {
            black_box(receiver.recv().await.unwrap());
        }
    });
    producer.await.unwrap();
    consumer.await.unwrap();
}

fn send_receive_ack(c: &mut Criterion) {
    let runtime = runtime();
    let command = command();
    let mut group = c.benchmark_group("send_receive_ack");
    group.throughput(Throughput::Elements(MESSAGES as u64));
    group.bench_function("memory_bus", |b| {
        b.to_async(&runtime).iter(|| through_memory_bus(&command))
    });
    group.bench_function("tokio_mpsc", |b| {
        b.to_async(&runtime).iter(|| through_mpsc_channel(&command))
    });
    group.finish();
}

criterion_group!(benches, send_receive_ack);
criterion_main!(benches);
