//! The state of a link's connection that the supervisor writes and ackers and status queries
//! read: which connection (generation) is current, whether it is up, and the counters.

use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::Mutex;

/// State read by ackers and status queries.
#[derive(Debug, Default)]
pub(crate) struct Shared {
    pub(crate) generation: AtomicU64,
    pub(crate) connected: AtomicBool,
    pub(crate) connects: AtomicU64,
    pub(crate) disconnects: AtomicU64,
    pub(crate) failures: AtomicU64,
    pub(crate) last_error: Mutex<Option<String>>,
}

impl Shared {
    pub(crate) fn set_last_error(&self, reason: String) {
        if let Ok(mut guard) = self.last_error.lock() {
            *guard = Some(reason);
        }
    }
}
