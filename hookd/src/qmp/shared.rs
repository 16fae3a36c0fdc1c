//! State shared by a session's handles and its reader and writer tasks.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};

use serde_json::value::RawValue;
use tokio::sync::{oneshot, watch};

pub(super) struct Shared {
    pub(super) peer: String,
    pub(super) state: Mutex<State>,
    /// Set to end the session: the reader and the writer stop.
    pub(super) stop: watch::Sender<bool>,
}

/// Close reason of a session ended by [`QmpSession::close`] or by dropping
/// its last handle.
pub(super) const CLOSED_BY_US: &str = "closed by us";
/// Close reason of a session the peer ended.
pub(super) const PEER_CLOSED: &str = "the peer closed the connection";

#[derive(Default)]
pub(super) struct State {
    /// Commands waiting for their reply, by id.
    pub(super) pending: HashMap<u64, oneshot::Sender<Reply>>,
    /// Why the session ended, once it has.
    pub(super) closed: Option<String>,
}

/// A reply's `"return"` as JSON text, decoded by whoever waits for it
/// into the type it wants.
pub(super) type Reply = Result<Box<RawValue>, ReplyError>;

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
        // Dropping the senders wakes the waiters, which read `closed`.
        state.pending.clear();
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
