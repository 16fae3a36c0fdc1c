//! State shared by a session's handles and its reader and writer tasks.

use std::borrow::Cow;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard};

use serde_json::value::RawValue;
use tokio::net::unix::OwnedWriteHalf;
use tokio::sync::Notify;

use super::queue::EventQueue;
use super::types::QmpEvent;

/// Signals here are a flag and a `Notify` each, not tokio channels: a
/// `watch` channel is an allocation of its own (~0.35 KB) that every
/// followed guest would hold for nothing.
pub(super) struct Shared {
    pub(super) peer: String,
    pub(super) state: Mutex<State>,
    /// Set to end the session: the reader and the writer stop.
    stopped: AtomicBool,
    /// Wakes the reader and the writer once `stopped` is set.
    stop: Notify,
    /// Tells the consumer that [`State::events`] has an event.
    pub(super) wake_events: Notify,
}

/// Close reason of a session ended by [`QmpSession::close`] or by dropping
/// its last handle.
pub(super) const CLOSED_BY_US: &str = "closed by us";
/// Close reason of a session the peer ended.
pub(super) const PEER_CLOSED: &str = "the peer closed the connection";

pub(super) struct State {
    /// Commands waiting for their reply, by id.
    pub(super) pending: HashMap<u64, Deliver>,
    /// Why the session ended, once it has.
    pub(super) closed: Option<String>,
    /// Complete command lines for the writer task. Writes happen there so
    /// that a caller that gives up on a command can never leave half of it
    /// in the stream. A queue here rather than a channel: a tokio channel
    /// holds a block of 32 slots (and its own allocation) for the whole
    /// session, and a followed guest sends a command once in a long while.
    /// The writer task takes [`State::writer`] and gives it back when
    /// this is empty.
    pub(super) outgoing: VecDeque<Vec<u8>>,
    /// The socket's write half while no writer task holds it (see
    /// `reader::write_queued`); `None` once the session has stopped.
    pub(super) writer: Option<OwnedWriteHalf>,
    /// Events for the consumer ([`super::QmpEvents`]).
    pub(super) events: EventQueue,
}

/// A reply's `"return"` as JSON text: borrowed from the reader's line
/// buffer when the line was a plain reply, owned when it was read through
/// a [`serde_json::Value`].
pub(super) type Reply<'a> = Result<Cow<'a, RawValue>, ReplyError>;

/// Hands a command's reply to the command waiting for it, decoded into
/// the type it wants. The reader calls it with the reply still in its
/// line buffer: the reply's text is never copied out. A waiting command
/// would otherwise hold a copy of its whole reply until it runs again,
/// and `query-rx-filter`'s is ~20 KB (QEMU's 4,096-entry `vlan-table`),
/// which a burst of a thousand connecting QEMUs held all at once.
/// Dropping it (the session closing) wakes the waiter with nothing.
pub(super) type Deliver = Box<dyn FnOnce(Result<&RawValue, ReplyError>) + Send>;

#[derive(Debug)]
pub(super) struct ReplyError {
    pub(super) class: String,
    pub(super) desc: String,
}

impl Shared {
    /// State of a session that writes to `writer` and whose consumer
    /// gets at most `events` events queued.
    pub(super) fn new(peer: String, writer: OwnedWriteHalf, events: usize) -> Shared {
        Shared {
            peer,
            state: Mutex::new(State {
                pending: HashMap::new(),
                closed: None,
                outgoing: VecDeque::new(),
                writer: Some(writer),
                events: EventQueue::new(events),
            }),
            stopped: AtomicBool::new(false),
            stop: Notify::new(),
            wake_events: Notify::new(),
        }
    }

    pub(super) fn state(&self) -> MutexGuard<'_, State> {
        // Nothing panics while holding the lock; recover regardless.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Marks the session closed (the first reason wins) and fails every
    /// waiting command. Returns the reason that stuck.
    pub(super) fn close(&self, reason: String) -> String {
        let mut state = self.state();
        let reason = state.closed.get_or_insert(reason).clone();
        // Dropping the deliveries (and with them their senders) wakes the
        // waiters, which read `closed`.
        state.pending.clear();
        state.outgoing = VecDeque::new();
        reason
    }

    pub(super) fn closed_reason(&self) -> Option<String> {
        self.state().closed.clone()
    }

    /// Ends the session from our side: the reader stops and reports why.
    pub(super) fn abort(&self, reason: String) {
        self.close(reason);
        self.stop();
    }

    /// Stops the reader and the writer.
    pub(super) fn stop(&self) {
        self.stopped.store(true, Ordering::Release);
        self.stop.notify_waiters();
        // Dropping an idle write half shuts the write direction down, as
        // a running writer does when it sees the flag: the peer sees EOF.
        let idle = self.state().writer.take();
        drop(idle);
    }

    pub(super) fn is_stopped(&self) -> bool {
        self.stopped.load(Ordering::Acquire)
    }

    /// Resolves once [`Shared::stop`] has been called.
    pub(super) async fn stopped(&self) {
        let notified = self.stop.notified();
        tokio::pin!(notified);
        // Registered before the check, so a stop after it wakes us.
        notified.as_mut().enable();
        if !self.is_stopped() {
            notified.await;
        }
    }

    /// Hands an event from the peer to the consumer, never waiting.
    pub(super) fn deliver(&self, event: QmpEvent) {
        if self.state().events.push(event, &self.peer) {
            self.wake_events.notify_one();
        }
    }

    /// Hands the consumer the session's end: always its last event.
    pub(super) fn finish_events(&self, error: Option<String>) {
        self.state().events.finish(error);
        self.wake_events.notify_one();
    }
}

/// Removes a command's pending entry when its caller stops waiting.
pub(super) struct PendingGuard<'a> {
    pub(super) shared: &'a Shared,
    pub(super) id: u64,
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        self.shared.state().pending.remove(&self.id);
    }
}
