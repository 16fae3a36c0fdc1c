//! State shared by a session's handles and its reader and writer tasks.

use std::borrow::Cow;
use std::collections::{HashMap, VecDeque};
use std::sync::{Mutex, MutexGuard};

use serde_json::value::RawValue;
use tokio::sync::{watch, Notify};

pub(super) struct Shared {
    pub(super) peer: String,
    pub(super) state: Mutex<State>,
    /// Set to end the session: the reader and the writer stop.
    pub(super) stop: watch::Sender<bool>,
    /// Tells the writer task that [`State::outgoing`] has a line.
    pub(super) wake_writer: Notify,
}

/// Close reason of a session ended by [`QmpSession::close`] or by dropping
/// its last handle.
pub(super) const CLOSED_BY_US: &str = "closed by us";
/// Close reason of a session the peer ended.
pub(super) const PEER_CLOSED: &str = "the peer closed the connection";

#[derive(Default)]
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
    pub(super) outgoing: VecDeque<Vec<u8>>,
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
        self.stop.send_replace(true);
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
