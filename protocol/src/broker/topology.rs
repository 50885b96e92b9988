//! Names of the exchanges and queues, and their idempotent declaration.
//!
//! ```text
//! operator --publish(rk=<host>)--> [dog.hosts  direct] --rk=<host>--> (dog.host.<host>) --> agent
//! operator --publish(rk=<set>)---> [dog.sets   direct] --rk=<set>---> (dog.host.<h1>), (dog.host.<h2>), …
//! agent ----publish(rk=<host>)---> [dog.operator fanout] -----------> (dog.operator) --> operator
//! ```

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::protocol::{AMQPErrorKind, AMQPHardError, AMQPSoftError};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{Channel, ErrorKind, ExchangeKind};

/// Exchange and queue names under one prefix (`dog` by default).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Topology {
    prefix: String,
}

impl Topology {
    pub fn new(prefix: impl Into<String>) -> Self {
        Self {
            prefix: prefix.into(),
        }
    }

    /// The prefix of every name.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Direct exchange routing per-host messages by host name.
    pub fn hosts_exchange(&self) -> String {
        format!("{}.hosts", self.prefix)
    }

    /// Direct exchange routing shared-set messages by set name to every bound host queue.
    pub fn sets_exchange(&self) -> String {
        format!("{}.sets", self.prefix)
    }

    /// Fanout exchange agents publish to.
    pub fn operator_exchange(&self) -> String {
        format!("{}.operator", self.prefix)
    }

    /// Queue the operator consumes (named apart from the exchange, so that a permission
    /// pattern granting agents the exchange grants them nothing on the queue).
    pub fn operator_queue(&self) -> String {
        format!("{}.operator.inbox", self.prefix)
    }

    /// The operator's queue before it was named apart from the exchange; an operator deletes
    /// it on start (it would keep receiving every agent message, unread).
    pub fn legacy_operator_queue(&self) -> String {
        format!("{}.operator", self.prefix)
    }

    /// The queue of one host.
    pub fn host_queue(&self, host: &str) -> String {
        format!("{}.host.{}", self.prefix, host)
    }
}

/// Arguments of a durable queue.
#[derive(Clone, Copy, Debug)]
pub(crate) struct QueueShape {
    /// `x-max-length`.
    pub max_length: Option<u32>,
    /// What a full queue does: drop its oldest message (a host queue, where only the newest
    /// desired state matters), or refuse the new one (the operator's inbox: the publisher
    /// retries, and nobody's message is pushed out by someone else's).
    pub reject_publish: bool,
}

impl QueueShape {
    fn arguments(&self, quorum: bool) -> FieldTable {
        let mut args = FieldTable::default();
        if quorum {
            args.insert(
                "x-queue-type".into(),
                AMQPValue::LongString(LongString::from("quorum")),
            );
        }
        if let Some(max) = self.max_length {
            args.insert("x-max-length".into(), AMQPValue::LongLongInt(max.into()));
            let overflow = if self.reject_publish {
                "reject-publish"
            } else {
                "drop-head"
            };
            args.insert(
                "x-overflow".into(),
                AMQPValue::LongString(LongString::from(overflow)),
            );
        }
        args
    }
}

/// What happened to a quorum declaration the broker refused.
pub(crate) enum QuorumRefusal {
    /// PRECONDITION_FAILED (e.g. the queue exists as a classic queue): the channel is
    /// closed, retry classic on a fresh channel.
    ChannelClosed,
    /// NOT_IMPLEMENTED (no quorum support): the connection is closed.
    ConnectionClosed,
}

pub(crate) fn quorum_refusal(err: &lapin::Error) -> Option<QuorumRefusal> {
    match err.kind() {
        ErrorKind::ProtocolError(amqp) => match amqp.kind() {
            AMQPErrorKind::Soft(AMQPSoftError::PRECONDITIONFAILED) => {
                Some(QuorumRefusal::ChannelClosed)
            }
            AMQPErrorKind::Hard(AMQPHardError::NOTIMPLEMENTED) => {
                Some(QuorumRefusal::ConnectionClosed)
            }
            _ => None,
        },
        _ => None,
    }
}

/// Declare a durable queue of the given type (quorum or classic).
pub(crate) async fn declare_queue(
    channel: &Channel,
    name: &str,
    shape: QueueShape,
    quorum: bool,
) -> Result<(), lapin::Error> {
    channel
        .queue_declare(
            name.into(),
            QueueDeclareOptions::durable(),
            shape.arguments(quorum),
        )
        .await
        .map(|_| ())
}

pub(crate) async fn declare_exchange(
    channel: &Channel,
    name: &str,
    kind: ExchangeKind,
) -> Result<(), lapin::Error> {
    channel
        .exchange_declare(
            name.into(),
            kind,
            ExchangeDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
}

/// The three exchanges the operator owns: host queues, shared sets, and the agents' fanout to
/// the operator's inbox. Declared on connect and again with every inbox check.
pub(crate) async fn declare_operator_exchanges(
    channel: &Channel,
    t: &Topology,
) -> Result<(), lapin::Error> {
    declare_exchange(channel, &t.hosts_exchange(), ExchangeKind::Direct).await?;
    declare_exchange(channel, &t.sets_exchange(), ExchangeKind::Direct).await?;
    declare_exchange(channel, &t.operator_exchange(), ExchangeKind::Fanout).await
}

pub(crate) async fn bind(
    channel: &Channel,
    queue: &str,
    exchange: &str,
    routing_key: &str,
) -> Result<(), lapin::Error> {
    channel
        .queue_bind(
            queue.into(),
            exchange.into(),
            routing_key.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_use_prefix() {
        let t = Topology::new("dog");
        assert_eq!(t.hosts_exchange(), "dog.hosts");
        assert_eq!(t.sets_exchange(), "dog.sets");
        assert_eq!(t.operator_exchange(), "dog.operator");
        assert_eq!(t.operator_queue(), "dog.operator.inbox");
        assert_eq!(t.legacy_operator_queue(), "dog.operator");
        assert_eq!(t.host_queue("node-1.example"), "dog.host.node-1.example");
    }

    #[test]
    fn bounded_queue_drops_head() {
        let args = QueueShape {
            max_length: Some(8),
            reject_publish: false,
        }
        .arguments(true);
        let inner = args.inner();
        assert_eq!(
            inner.get("x-queue-type"),
            Some(&AMQPValue::LongString("quorum".into()))
        );
        assert_eq!(inner.get("x-max-length"), Some(&AMQPValue::LongLongInt(8)));
        assert_eq!(
            inner.get("x-overflow"),
            Some(&AMQPValue::LongString("drop-head".into()))
        );
        let classic = QueueShape {
            max_length: None,
            reject_publish: false,
        }
        .arguments(false);
        assert!(classic.inner().is_empty());
        let inbox = QueueShape {
            max_length: Some(5),
            reject_publish: true,
        }
        .arguments(true);
        assert_eq!(
            inbox.inner().get("x-overflow"),
            Some(&AMQPValue::LongString("reject-publish".into()))
        );
    }
}
