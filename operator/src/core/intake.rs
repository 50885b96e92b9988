//! Fair intake (pure core): each signing key gets its own token bucket, checked on the
//! envelope's claimed key before anything is spent on it, so one noisy or compromised agent
//! cannot crowd out the others. Keys pinned for no host are not tracked here (they are
//! refused cheaply by the opener, and would otherwise grow this map without bound); a key
//! that was re-pinned keeps a few bytes of bucket until the operator restarts.

use crate::core::admission::TokenBucket;
use std::collections::HashMap;

/// Messages per key: `burst` at once, then `per_minute`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IntakePolicy {
    pub burst: u32,
    pub per_minute: u32,
}

impl Default for IntakePolicy {
    fn default() -> Self {
        // an agent sends a keepalive every 30 s and one response per request; a full
        // re-publish of every host's rules is one request each
        IntakePolicy {
            burst: 600,
            per_minute: 1200,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Intake {
    policy: IntakePolicy,
    buckets: HashMap<String, TokenBucket>,
}

impl Intake {
    pub fn new(policy: IntakePolicy) -> Self {
        Intake {
            policy,
            buckets: HashMap::new(),
        }
    }

    /// Whether a message under the key with this fingerprint may be looked at, at `now_ms`.
    pub fn admit(&mut self, fingerprint: &str, now_ms: u64) -> bool {
        let policy = self.policy;
        self.buckets
            .entry(fingerprint.to_string())
            .or_insert_with(|| TokenBucket::new(policy.burst, policy.per_minute))
            .take(now_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_noisy_key_is_limited_and_the_others_are_not() {
        let mut i = Intake::new(IntakePolicy {
            burst: 10,
            per_minute: 60,
        });
        let noisy = (0..1000).filter(|_| i.admit("noisy", 0)).count();
        assert_eq!(noisy, 10);
        assert!(i.admit("quiet", 0), "another key has its own bucket");
        // one more a second
        assert!(i.admit("noisy", 1_000));
        assert!(!i.admit("noisy", 1_001));
    }
}
