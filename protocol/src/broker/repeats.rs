//! Folding a broker failure that repeats into one warning per interval: a deleted exchange
//! or a wrong password would otherwise log a line on every reconnect attempt. Pure: the
//! caller passes the time.

use std::time::{Duration, Instant};

/// A connection that lasted this long was healthy: the next failure starts the backoff over.
pub(super) const STABLE_CONNECTION: Duration = Duration::from_secs(30);
/// While the same failure repeats, it is logged (with a count) at most this often.
pub(super) const REPEAT_LOG_INTERVAL: Duration = Duration::from_secs(60);

/// The failure being repeated and when it was last logged.
#[derive(Default)]
pub(super) struct Repeats {
    reason: String,
    /// Occurrences since the last warning about this reason.
    count: u64,
    logged: Option<Instant>,
}

impl Repeats {
    /// Notes one failure at `now`; `Some(n)` when it is to be logged, `n` being how many
    /// times it happened since it was last logged (1 for a new reason).
    pub(super) fn note(&mut self, reason: &str, now: impl Into<Instant>) -> Option<u64> {
        let now = now.into();
        // "publish failed: X" and "connection error: X" are one failure X
        let reason = reason.split_once(": ").map_or(reason, |(_, cause)| cause);
        if reason != self.reason {
            *self = Repeats {
                reason: reason.to_string(),
                count: 0,
                logged: None,
            };
        }
        self.count += 1;
        match self.logged {
            Some(at) if now.duration_since(at) < REPEAT_LOG_INTERVAL => None,
            _ => {
                self.logged = Some(now);
                Some(std::mem::take(&mut self.count))
            }
        }
    }

    /// Inside a streak of one repeating failure (reconnect lines are then not worth a line).
    pub(super) fn quiet(&self) -> bool {
        self.logged.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_repeating_failure_is_logged_once_per_interval_with_its_count() {
        let t0 = Instant::now();
        let mut r = Repeats::default();
        assert!(!r.quiet());
        assert_eq!(
            r.note("publish failed: NOT_FOUND - no exchange", t0),
            Some(1)
        );
        assert!(r.quiet());
        // the same cause under another prefix, many times within the interval: silent
        for s in 1..30 {
            let at = t0 + Duration::from_secs(s);
            assert_eq!(
                r.note("connection error: NOT_FOUND - no exchange", at),
                None
            );
        }
        // after the interval: one line counting everything since the last one
        assert_eq!(
            r.note(
                "publish failed: NOT_FOUND - no exchange",
                t0 + REPEAT_LOG_INTERVAL
            ),
            Some(30)
        );
    }

    #[test]
    fn a_new_failure_is_logged_at_once() {
        let t0 = Instant::now();
        let mut r = Repeats::default();
        assert_eq!(r.note("connect failed: ACCESS_REFUSED", t0), Some(1));
        assert_eq!(r.note("connect failed: ACCESS_REFUSED", t0), None);
        assert_eq!(r.note("connect failed: connection refused", t0), Some(1));
        assert_eq!(r.note("connect failed: ACCESS_REFUSED", t0), Some(1));
    }
}
