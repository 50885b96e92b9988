//! RabbitMQ transport shared by `dog-operator` and `dog-agent` (docs/design.md, Transport).
//!
//! The transport moves opaque byte payloads (already sealed envelopes) plus two AMQP
//! properties (message id and type). It owns the connection, the declared topology,
//! publisher confirms, manual acknowledgements and reconnection:
//!
//! * [`OperatorLink`]: publishes to one host's queue ([`OperatorLink::publish_to_host`]) or,
//!   once, to every host using a shared set ([`OperatorLink::publish_shared_set`]); consumes
//!   the agents' messages from the `dog.operator` queue.
//! * [`AgentLink`]: consumes its own `dog.host.<hostname>` queue, binds it to the shared
//!   sets it uses, and publishes to the `dog.operator` exchange.
//!
//! Every publish waits for the broker's confirm; a nack, an unroutable return or a missing
//! confirm is retried, across reconnects, so a returned `Ok(())` means the broker has taken
//! responsibility for the message. Deliveries are handed to the application as
//! [`Delivery`] values that it acknowledges only after its work is done. Delivery is
//! at-least-once: after a reconnect the broker redelivers what was not acknowledged, so the
//! application deduplicates by message id. See `docs/broker.md` for topology, TLS and
//! per-agent permissions.

mod config;
mod delivery;
mod link;
mod repeats;
mod state;
mod topology;
mod users;

use std::path::PathBuf;

pub use config::{Backoff, BrokerArgs, BrokerConfig, Credentials, TlsFiles};
pub use delivery::{AckOutcome, Acker, Deliveries, Delivery};
pub use link::{AgentLink, LinkStatus, OperatorLink};
pub use topology::Topology;
pub use users::{is_server_named_queue, Permissions, SERVER_NAMED_QUEUE_PREFIX};

/// The AMQP properties the transport carries besides the payload.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MessageMeta {
    /// Unique id of the message (AMQP `message-id`); receivers deduplicate by it.
    pub message_id: String,
    /// Kind of message (AMQP `type`), e.g. `desired-state`, `heartbeat`.
    pub kind: String,
}

impl MessageMeta {
    pub fn new(message_id: impl Into<String>, kind: impl Into<String>) -> Self {
        Self {
            message_id: message_id.into(),
            kind: kind.into(),
        }
    }
}

/// Errors of the broker transport.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// The configuration is unusable; `field` names the setting.
    #[error("broker configuration: {field}: {reason}")]
    Config { field: &'static str, reason: String },
    /// A TLS file named in the configuration could not be read.
    #[error("broker configuration: {field}: cannot read {}: {source}", path.display())]
    TlsFile {
        field: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    /// A host or set name cannot be used in queue names / routing keys.
    #[error("{field} {name:?} is not usable as a routing key: {reason}")]
    InvalidName {
        field: &'static str,
        name: String,
        reason: &'static str,
    },
    /// The message was returned as unroutable on every retry (e.g. a shared set that no
    /// agent has bound).
    #[error("message {message_id:?} to exchange {exchange:?} with routing key {routing_key:?} was unroutable after {attempts} attempts")]
    Unroutable {
        exchange: String,
        routing_key: String,
        message_id: String,
        attempts: u32,
    },
    /// An AMQP operation failed.
    #[error("AMQP: {0}")]
    Amqp(#[from] lapin::Error),
    /// The link was closed by the application.
    #[error("broker link is closed")]
    Closed,
}

/// Install ring as the process-wide rustls crypto provider, so lapin (and kube) use it.
/// Idempotent: does nothing when a provider is already installed.
pub fn install_rustls_ring_provider() {
    if rustls::crypto::CryptoProvider::get_default().is_none() {
        // Losing the race against another thread installing a provider is fine.
        let _ = rustls::crypto::ring::default_provider().install_default();
    }
}
