//! A session's events on their way to the consumer: a short queue in the
//! session's shared state, never waited on by the reader.
//!
//! A queue here rather than a tokio channel: a bounded tokio channel
//! allocates its slots in blocks of 32 whatever its capacity (32 ×
//! `QmpEvent` ≈ 1.8 KB) plus its own state (≈ 0.5 KB), for the whole life
//! of the session, and a followed guest sends an event once in a long
//! while. This queue holds no memory while it is empty.

use std::collections::VecDeque;

use super::types::QmpEvent;

/// What [`EventQueue::pop`] found.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Next {
    Event(QmpEvent),
    /// `Closed` has been taken: nothing follows.
    End,
    /// Nothing yet.
    Wait,
}

/// The queue itself, kept in the session's `State`.
#[derive(Debug)]
pub(super) struct EventQueue {
    queue: VecDeque<QmpEvent>,
    /// Events queued at most, bar the final `Lagged` and `Closed`.
    capacity: usize,
    /// Events dropped since the queue was last found full.
    lagged: u64,
    /// `Closed` has been queued: nothing more is.
    finished: bool,
    /// The consumer has gone: nothing is kept.
    unheard: bool,
}

impl EventQueue {
    pub(super) fn new(capacity: usize) -> EventQueue {
        EventQueue {
            queue: VecDeque::new(),
            capacity: capacity.max(1),
            lagged: 0,
            finished: false,
            unheard: false,
        }
    }

    /// Queues an event from the peer; when the queue is full, drops and
    /// counts it. Whether the consumer should be woken.
    pub(super) fn push(&mut self, event: QmpEvent, peer: &str) -> bool {
        if self.unheard || self.finished {
            return false;
        }
        if self.queue.len() >= self.capacity {
            if self.lagged == 0 {
                tracing::warn!("{peer}: events queue full, dropping {event:?} and any that follow until it drains");
            }
            self.lagged += 1;
            return false;
        }
        self.queue.push_back(event);
        true
    }

    /// Queues the end: the count of events still dropped, then `Closed`.
    /// These two go over the bound: the session is over, nothing follows.
    pub(super) fn finish(&mut self, error: Option<String>) {
        if self.unheard || self.finished {
            return;
        }
        if self.lagged > 0 {
            self.queue.push_back(QmpEvent::Lagged(self.lagged));
            self.lagged = 0;
        }
        self.queue.push_back(QmpEvent::Closed { error });
        self.finished = true;
    }

    /// Takes the next event. Taking one makes room, so the count of
    /// events dropped meanwhile, if any, is queued behind the rest as
    /// one [`QmpEvent::Lagged`].
    pub(super) fn pop(&mut self) -> Next {
        let Some(event) = self.queue.pop_front() else {
            return if self.finished { Next::End } else { Next::Wait };
        };
        if self.lagged > 0 {
            self.queue.push_back(QmpEvent::Lagged(self.lagged));
            self.lagged = 0;
        }
        if self.queue.is_empty() {
            // Give the slots back while idle.
            self.queue = VecDeque::new();
        }
        Next::Event(event)
    }

    /// The consumer has gone: drop what is queued and anything to come.
    pub(super) fn unheard(&mut self) {
        self.unheard = true;
        self.queue = VecDeque::new();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drain(q: &mut EventQueue) -> Vec<QmpEvent> {
        let mut out = Vec::new();
        while let Next::Event(e) = q.pop() {
            out.push(e);
        }
        out
    }

    #[test]
    fn events_come_in_order_then_closed_then_the_end() {
        let mut q = EventQueue::new(4);
        assert_eq!(q.pop(), Next::Wait);
        assert!(q.push(QmpEvent::Stop, "p"));
        assert!(q.push(QmpEvent::Resume, "p"));
        assert_eq!(q.pop(), Next::Event(QmpEvent::Stop));
        q.finish(None);
        assert!(!q.push(QmpEvent::Reset, "p"), "nothing after the end");
        assert_eq!(
            drain(&mut q),
            [QmpEvent::Resume, QmpEvent::Closed { error: None }]
        );
        assert_eq!(q.pop(), Next::End);
        assert_eq!(q.queue.capacity(), 0, "nothing held once drained");
    }

    #[test]
    fn a_full_queue_drops_and_counts_and_reports_once_there_is_room() {
        let mut q = EventQueue::new(2);
        for _ in 0..2 {
            assert!(q.push(QmpEvent::Stop, "p"));
        }
        for _ in 0..5 {
            assert!(!q.push(QmpEvent::Resume, "p"), "full");
        }
        assert_eq!(q.queue.len(), 2, "bounded");
        assert_eq!(q.pop(), Next::Event(QmpEvent::Stop));
        assert_eq!(q.pop(), Next::Event(QmpEvent::Stop));
        assert_eq!(q.pop(), Next::Event(QmpEvent::Lagged(5)));
        assert_eq!(q.pop(), Next::Wait);
    }

    #[test]
    fn the_end_carries_the_count_still_dropped_over_the_bound() {
        let mut q = EventQueue::new(1);
        assert!(q.push(QmpEvent::Stop, "p"));
        assert!(!q.push(QmpEvent::Stop, "p"));
        q.finish(Some("broken".into()));
        assert_eq!(
            drain(&mut q),
            [
                QmpEvent::Stop,
                QmpEvent::Lagged(1),
                QmpEvent::Closed {
                    error: Some("broken".into())
                }
            ]
        );
        assert_eq!(q.pop(), Next::End);
    }

    #[test]
    fn nothing_is_kept_for_a_consumer_that_has_gone() {
        let mut q = EventQueue::new(4);
        assert!(q.push(QmpEvent::Stop, "p"));
        q.unheard();
        assert!(!q.push(QmpEvent::Stop, "p"));
        q.finish(None);
        assert_eq!(q.queue.len(), 0);
    }
}
