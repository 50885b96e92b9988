//! What dog's part of the kernel holds, as read back (pure data): both filter tables and dog's
//! sets, and the cache of the last state read or written that the next apply plans against.
//! Read by the applier (`apply`), compared by the drift check (`drift`), kept by the tool
//! runner (`kernel`); it depends on none of them.

use crate::core::rules::FilterState;
use crate::core::sets::LiveSet;
use dog_protocol::ruleset::{rules_hash, sets_hash, Family, FirewallHashes, PerFamily};
use std::collections::BTreeMap;
use std::sync::Mutex;

/// dog's part of the kernel: both filter tables and dog's sets.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LiveState {
    /// Each family's filter table as read (`iptables-save -t filter`), and parsed.
    pub rules: PerFamily<String>,
    pub filters: PerFamily<FilterState>,
    pub sets: BTreeMap<String, LiveSet>,
}

impl LiveState {
    pub fn filter(&self, family: Family) -> &FilterState {
        self.filters.get(family)
    }

    pub(crate) fn set_rules(&mut self, family: Family, text: String) {
        *self.filters.get_mut(family) = FilterState::parse(&text);
        *self.rules.get_mut(family) = text;
    }

    /// Hashes with the protocol's functions, comparable with [`HostFirewall::hashes`]. A set's
    /// hash was computed from the members read back, or is the desired set's when the members
    /// read back are identical to it (see [`SaveReader::finish`]).
    pub fn hashes(&self) -> FirewallHashes {
        FirewallHashes {
            ipv4_rules: rules_hash(&self.rules.v4),
            ipv6_rules: rules_hash(&self.rules.v6),
            sets: sets_hash(
                self.sets
                    .values()
                    .map(|s| (s.content.name.as_str(), s.content.hash())),
            ),
        }
    }
}

/// The last state dog read back or wrote; reused for planning so a small change needs no full
/// re-read. Dropped on any failure and before verify/repair.
#[derive(Debug, Default)]
pub struct StateCache(Mutex<Option<LiveState>>);

impl Clone for StateCache {
    /// A clone starts without a cache (it re-reads the kernel on first use).
    fn clone(&self) -> Self {
        StateCache::default()
    }
}

impl StateCache {
    pub(crate) fn take(&self) -> Option<LiveState> {
        self.0.lock().map(|mut g| g.take()).unwrap_or(None)
    }
    pub(crate) fn put(&self, s: Option<LiveState>) {
        if let Ok(mut g) = self.0.lock() {
            *g = s;
        }
    }
}
