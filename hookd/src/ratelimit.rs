//! Rate-limited logging: a peer that fails the same way 3,000 times a
//! minute gets a few lines and a count, not 3,000 lines.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Lets through at most `burst` messages per `window`, then counts the
/// rest and reports the count with the first message of the next window.
#[derive(Debug)]
pub struct RateLimit {
    burst: u32,
    window: Duration,
    state: Mutex<Window>,
}

#[derive(Debug)]
struct Window {
    started: Option<Instant>,
    sent: u32,
    suppressed: u64,
}

/// Whether to log now, and how many messages were suppressed before.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Log { suppressed_before: u64 },
    Suppress,
}

impl RateLimit {
    pub const fn new(burst: u32, window: Duration) -> RateLimit {
        RateLimit {
            burst,
            window,
            state: Mutex::new(Window {
                started: None,
                sent: 0,
                suppressed: 0,
            }),
        }
    }

    pub fn check(&self) -> Verdict {
        self.check_at(Instant::now())
    }

    fn check_at(&self, now: Instant) -> Verdict {
        let mut w = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let expired = w
            .started
            .is_none_or(|start| now.duration_since(start) >= self.window);
        if expired {
            w.started = Some(now);
            w.sent = 0;
        }
        if w.sent < self.burst {
            w.sent += 1;
            Verdict::Log {
                suppressed_before: std::mem::take(&mut w.suppressed),
            }
        } else {
            w.suppressed += 1;
            Verdict::Suppress
        }
    }
}

/// Logs a warning through `$limit`, adding how many were suppressed.
#[macro_export]
macro_rules! warn_limited {
    ($limit:expr, $($arg:tt)+) => {
        if let $crate::ratelimit::Verdict::Log { suppressed_before } = $limit.check() {
            if suppressed_before > 0 {
                tracing::warn!(suppressed = suppressed_before, $($arg)+);
            } else {
                tracing::warn!($($arg)+);
            }
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_passes_then_the_rest_is_counted_and_reported() {
        let limit = RateLimit::new(2, Duration::from_secs(60));
        let t0 = Instant::now();
        assert_eq!(
            limit.check_at(t0),
            Verdict::Log {
                suppressed_before: 0
            }
        );
        assert_eq!(
            limit.check_at(t0),
            Verdict::Log {
                suppressed_before: 0
            }
        );
        for _ in 0..3000 {
            assert_eq!(limit.check_at(t0), Verdict::Suppress);
        }
        let later = t0 + Duration::from_secs(61);
        assert_eq!(
            limit.check_at(later),
            Verdict::Log {
                suppressed_before: 3000
            }
        );
        assert_eq!(
            limit.check_at(later),
            Verdict::Log {
                suppressed_before: 0
            }
        );
    }
}
