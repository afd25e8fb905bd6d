//! The bounded queue behind [`Outbound`]: a session's messages waiting for
//! the other end.
//!
//! A supervisor keeps one such queue per connected device in each direction,
//! and nearly all of them are empty nearly all the time. So an idle queue is
//! one small allocation (about 150 bytes): no slots are reserved up front,
//! the buffer is allocated when a message arrives and freed when the last
//! one is taken. (A tokio `mpsc` channel reserves a block of 32 slots and
//! pads its header to cache lines: about 1 KB per queue before a message.)
//!
//! Many senders, one receiver; [`Outbound::try_send`] and
//! [`Outbound::send`] on one side, [`Receiver::recv`] on the other.

use std::collections::VecDeque;
use std::fmt;
use std::future::poll_fn;
use std::pin::pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use tokio::sync::Notify;

use super::{Outbound, TrySendError};

/// What the two ends share.
pub(super) struct Shared<T> {
    state: Mutex<State<T>>,
    /// Wakes senders waiting for room or for the receiver to go.
    changed: Notify,
}

struct State<T> {
    items: VecDeque<T>,
    capacity: usize,
    senders: usize,
    /// The receiver takes no more: it was closed or dropped.
    closed: bool,
    /// A sender found the queue full and may be waiting for room.
    wanted_room: bool,
    receiver: Option<Waker>,
}

impl<T> Shared<T> {
    pub(super) fn new(capacity: usize) -> Arc<Self> {
        Arc::new(Shared {
            state: Mutex::new(State {
                items: VecDeque::new(),
                capacity: capacity.max(1),
                senders: 1,
                closed: false,
                wanted_room: false,
                receiver: None,
            }),
            changed: Notify::new(),
        })
    }

    fn state(&self) -> MutexGuard<'_, State<T>> {
        // Nothing here panics while holding the lock; a poisoned lock still holds a consistent queue.
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub(super) fn try_send(&self, message: T) -> Result<(), TrySendError<T>> {
        let mut state = self.state();
        if state.closed {
            return Err(TrySendError::Closed(message));
        }
        if state.items.len() >= state.capacity {
            state.wanted_room = true;
            return Err(TrySendError::Full(message));
        }
        state.items.push_back(message);
        let receiver = state.receiver.take();
        drop(state);
        if let Some(receiver) = receiver {
            receiver.wake();
        }
        Ok(())
    }

    pub(super) async fn send(&self, mut message: T) -> Result<(), T> {
        loop {
            // Registered before looking, so a change between the look and the wait is not missed.
            let mut changed = pin!(self.changed.notified());
            changed.as_mut().enable();
            match self.try_send(message) {
                Ok(()) => return Ok(()),
                Err(TrySendError::Closed(back)) => return Err(back),
                Err(TrySendError::Full(back)) => message = back,
            }
            changed.await;
        }
    }

    pub(super) fn is_closed(&self) -> bool {
        self.state().closed
    }

    pub(super) async fn closed(&self) {
        loop {
            let mut changed = pin!(self.changed.notified());
            changed.as_mut().enable();
            if self.is_closed() {
                return;
            }
            changed.await;
        }
    }

    pub(super) fn add_sender(&self) {
        self.state().senders += 1;
    }

    pub(super) fn drop_sender(&self) {
        let mut state = self.state();
        state.senders -= 1;
        let receiver = if state.senders == 0 {
            state.receiver.take()
        } else {
            None
        };
        drop(state);
        if let Some(receiver) = receiver {
            receiver.wake();
        }
    }
}

impl<T> Clone for Outbound<T> {
    fn clone(&self) -> Self {
        self.shared.add_sender();
        Outbound {
            shared: Arc::clone(&self.shared),
        }
    }
}

impl<T> Drop for Outbound<T> {
    fn drop(&mut self) {
        self.shared.drop_sender();
    }
}

/// The receiving end of an [`Outbound`] queue: what a transport drains onto its wire.
///
/// Dropping it ends the session for the senders: their sends fail with the
/// message handed back.
pub struct Receiver<T> {
    shared: Arc<Shared<T>>,
}

/// Why [`Receiver::try_recv`] has nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TryRecvError {
    /// Nothing is queued now.
    #[error("nothing is queued")]
    Empty,
    /// Nothing is queued and nothing will be: every sender is gone, or the receiver was closed.
    #[error("the queue is empty and every sender is gone")]
    Disconnected,
}

impl<T> Receiver<T> {
    pub(super) fn new(shared: Arc<Shared<T>>) -> Self {
        Receiver { shared }
    }

    /// The next message; `None` once every sender is gone (or [`close`](Self::close)
    /// was called) and the queue is empty.
    pub async fn recv(&mut self) -> Option<T> {
        poll_fn(|cx| self.poll_recv(cx)).await
    }

    /// The next message if there is one; otherwise wakes `cx` when there is,
    /// or when the queue has ended (`Ready(None)`).
    pub fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Option<T>> {
        match self.take() {
            Ok(message) => Poll::Ready(Some(message)),
            Err(TryRecvError::Disconnected) => Poll::Ready(None),
            Err(TryRecvError::Empty) => {
                let mut state = self.shared.state();
                // Looked again under the lock: a send in between must not be missed.
                if !state.items.is_empty() || state.senders == 0 || state.closed {
                    drop(state);
                    cx.waker().wake_by_ref();
                } else if !state.receiver.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                    state.receiver = Some(cx.waker().clone());
                }
                Poll::Pending
            }
        }
    }

    /// The next message if one is queued, without waiting.
    pub fn try_recv(&mut self) -> Result<T, TryRecvError> {
        self.take()
    }

    fn take(&mut self) -> Result<T, TryRecvError> {
        let mut state = self.shared.state();
        let Some(message) = state.items.pop_front() else {
            return Err(if state.senders == 0 || state.closed {
                TryRecvError::Disconnected
            } else {
                TryRecvError::Empty
            });
        };
        if state.items.is_empty() {
            // An idle queue holds no buffer.
            state.items = VecDeque::new();
        }
        let wanted_room = std::mem::take(&mut state.wanted_room);
        drop(state);
        if wanted_room {
            self.shared.changed.notify_waiters();
        }
        Ok(message)
    }

    /// Refuses further messages; those already queued can still be received.
    pub fn close(&mut self) {
        let mut state = self.shared.state();
        state.closed = true;
        drop(state);
        self.shared.changed.notify_waiters();
    }

    /// Whether nothing more can be queued: every sender is gone, or
    /// [`close`](Self::close) was called. Messages already queued may remain.
    pub fn is_closed(&self) -> bool {
        let state = self.shared.state();
        state.senders == 0 || state.closed
    }

    /// How many messages are queued.
    pub fn len(&self) -> usize {
        self.shared.state().items.len()
    }

    /// Whether no message is queued.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl<T> Drop for Receiver<T> {
    fn drop(&mut self) {
        let mut state = self.shared.state();
        state.closed = true;
        let items = std::mem::take(&mut state.items);
        let waker = state.receiver.take();
        drop(state);
        // Dropped outside the lock: a message's own drop may touch other
        // queues, and a waker may own what it wakes (a supervisor's session).
        drop(items);
        drop(waker);
        self.shared.changed.notify_waiters();
    }
}

impl<T> fmt::Debug for Receiver<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = self.shared.state();
        f.debug_struct("Receiver")
            .field("queued", &state.items.len())
            .field("capacity", &state.capacity)
            .field("senders", &state.senders)
            .field("closed", &state.closed)
            .finish()
    }
}

impl<T> fmt::Debug for Shared<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = self.state();
        f.debug_struct("Queue")
            .field("queued", &state.items.len())
            .field("capacity", &state.capacity)
            .field("closed", &state.closed)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn messages_arrive_in_order_and_the_end_is_seen_after_them() {
        let (tx, mut rx) = Outbound::channel(4);
        let other = tx.clone();
        tx.try_send(1).unwrap();
        other.try_send(2).unwrap();
        drop(tx);
        assert_eq!(rx.recv().await, Some(1));
        drop(other);
        assert_eq!(rx.recv().await, Some(2), "queued messages outlive their senders");
        assert_eq!(rx.recv().await, None);
        assert_eq!(rx.try_recv(), Err(TryRecvError::Disconnected));
    }

    #[tokio::test]
    async fn a_waiting_receiver_is_woken_by_a_send_and_by_the_last_sender_going() {
        let (tx, mut rx) = Outbound::channel(1);
        let waiting = tokio::spawn(async move {
            let first = rx.recv().await;
            let second = rx.recv().await;
            (first, second)
        });
        tokio::task::yield_now().await;
        tx.try_send("hello").unwrap();
        tokio::time::sleep(Duration::from_millis(10)).await;
        drop(tx);
        assert_eq!(waiting.await.unwrap(), (Some("hello"), None));
    }

    #[tokio::test]
    async fn a_full_queue_refuses_then_a_waiting_send_gets_the_room() {
        let (tx, mut rx) = Outbound::channel(1);
        tx.try_send(1).unwrap();
        assert_eq!(tx.try_send(2), Err(TrySendError::Full(2)));
        let sender = tx.clone();
        let waiting = tokio::spawn(async move { sender.send(3).await });
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert!(!waiting.is_finished(), "no room yet");
        assert_eq!(rx.recv().await, Some(1));
        waiting.await.unwrap().unwrap();
        assert_eq!(rx.recv().await, Some(3));
    }

    #[tokio::test]
    async fn dropping_the_receiver_ends_sends_and_wakes_waiters() {
        let (tx, rx) = Outbound::channel(1);
        tx.try_send(1).unwrap();
        let sender = tx.clone();
        let blocked = tokio::spawn(async move { sender.send(2).await });
        let watcher = tx.clone();
        let closed = tokio::spawn(async move { watcher.closed().await });
        tokio::time::sleep(Duration::from_millis(10)).await;
        drop(rx);
        assert_eq!(blocked.await.unwrap(), Err(2), "the message comes back");
        closed.await.unwrap();
        assert!(tx.is_closed());
        assert_eq!(tx.try_send(3), Err(TrySendError::Closed(3)));
    }

    #[tokio::test]
    async fn close_keeps_what_is_queued_and_refuses_more() {
        let (tx, mut rx) = Outbound::channel(4);
        tx.try_send(1).unwrap();
        rx.close();
        assert_eq!(tx.try_send(2), Err(TrySendError::Closed(2)));
        assert_eq!(rx.len(), 1);
        assert_eq!(rx.try_recv(), Ok(1));
        assert_eq!(rx.try_recv(), Err(TryRecvError::Disconnected));
        assert_eq!(rx.recv().await, None);
    }

    #[tokio::test]
    async fn many_senders_and_a_slow_receiver_lose_nothing() {
        let (tx, mut rx) = Outbound::channel(3);
        let mut senders = Vec::new();
        for sender in 0..8u32 {
            let tx = tx.clone();
            senders.push(tokio::spawn(async move {
                for n in 0..500u32 {
                    tx.send(sender * 1_000 + n).await.unwrap();
                }
            }));
        }
        drop(tx);
        let mut last = [None::<u32>; 8];
        let mut count = 0;
        while let Some(message) = rx.recv().await {
            let (sender, n) = ((message / 1_000) as usize, message % 1_000);
            assert!(
                last[sender].is_none_or(|before| before + 1 == n),
                "each sender's order is kept"
            );
            last[sender] = Some(n);
            count += 1;
            if count % 7 == 0 {
                tokio::task::yield_now().await;
            }
        }
        assert_eq!(count, 8 * 500);
        for sender in senders {
            sender.await.unwrap();
        }
    }

    #[test]
    fn an_idle_queue_holds_no_buffer() {
        let (tx, mut rx) = Outbound::channel(16);
        for n in 0..10 {
            tx.try_send(n).unwrap();
        }
        while rx.try_recv().is_ok() {}
        assert_eq!(rx.shared.state().items.capacity(), 0);
    }
}
