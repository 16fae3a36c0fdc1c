//! The consumer's end of a session's events ([`QmpEvents`]), which
//! takes them from the session's [`EventQueue`](super::queue::EventQueue).

use std::sync::Arc;

use super::queue::Next;
use super::shared::Shared;
use super::types::QmpEvent;

/// The events of one session, in order, and finally
/// [`QmpEvent::Closed`]; after that, [`QmpEvents::recv`] returns `None`.
///
/// Dropping it tells the session nobody listens: later events are
/// discarded. See the module docs of [`crate::qmp`] on delivery.
pub struct QmpEvents {
    shared: Arc<Shared>,
}

impl QmpEvents {
    pub(super) fn new(shared: Arc<Shared>) -> QmpEvents {
        QmpEvents { shared }
    }

    /// The next event, waiting for it; `None` once [`QmpEvent::Closed`]
    /// has been received. Cancel safe: an event is taken from the queue
    /// only when it is returned.
    pub async fn recv(&mut self) -> Option<QmpEvent> {
        loop {
            let next = self.shared.state().events.pop();
            match next {
                Next::Event(event) => return Some(event),
                Next::End => return None,
                // A push since the pop left a permit: never missed.
                Next::Wait => self.shared.wake_events.notified().await,
            }
        }
    }
}

impl Drop for QmpEvents {
    fn drop(&mut self) {
        self.shared.state().events.unheard();
    }
}

impl std::fmt::Debug for QmpEvents {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QmpEvents")
            .field("peer", &self.shared.peer)
            .finish_non_exhaustive()
    }
}
