//! Deliveries handed to the application, acknowledged only after its work is done.

use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};

use lapin::options::{BasicAckOptions, BasicRejectOptions};
use tokio::sync::mpsc;

use super::state::Shared;

/// One message taken from a queue. Acknowledge it with [`Acker::ack`] after the work it
/// asks for is done; until then the broker keeps it and redelivers it after a reconnect.
#[derive(Debug)]
pub struct Delivery {
    /// The opaque payload (a sealed envelope).
    pub body: Vec<u8>,
    /// AMQP `message-id`, if the sender set one.
    pub message_id: Option<String>,
    /// AMQP `type`, if the sender set one.
    pub kind: Option<String>,
    /// AMQP `user-id`: when present, the broker checked that it is the user the publisher
    /// logged in as (RabbitMQ refuses a publish whose `user-id` is another user's).
    pub user_id: Option<String>,
    /// The broker delivered this message before (to this or another consumer) without an
    /// acknowledgement; the application may already have processed it.
    pub redelivered: bool,
    /// Acknowledges this delivery.
    pub acker: Acker,
}

impl Delivery {
    pub(crate) fn from_lapin(
        d: lapin::message::Delivery,
        generation: u64,
        shared: Arc<Shared>,
    ) -> Self {
        let props = &d.properties;
        Self {
            message_id: props.message_id().as_ref().map(|s| s.as_str().to_string()),
            kind: props.kind().as_ref().map(|s| s.as_str().to_string()),
            user_id: props.user_id().as_ref().map(|s| s.as_str().to_string()),
            redelivered: d.redelivered,
            body: d.data,
            acker: Acker {
                inner: d.acker,
                generation,
                shared,
            },
        }
    }
}

/// What became of an acknowledgement.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AckOutcome {
    /// The acknowledgement was sent on the connection the message came from.
    Done,
    /// The connection the message came from is gone: the broker will redeliver the message
    /// (with `redelivered = true`) and the application must deduplicate by message id.
    Stale,
}

/// Acknowledges one delivery. Never fails: an acknowledgement that cannot reach the broker
/// is reported as [`AckOutcome::Stale`].
#[derive(Debug)]
pub struct Acker {
    inner: lapin::Acker,
    generation: u64,
    shared: Arc<Shared>,
}

impl Acker {
    fn is_current(&self) -> bool {
        self.shared.generation.load(Ordering::SeqCst) == self.generation
            && self.shared.connected.load(Ordering::SeqCst)
    }

    /// Positive acknowledgement: the broker forgets the message.
    pub async fn ack(&self) -> AckOutcome {
        self.ack_with(BasicAckOptions::default()).await
    }

    /// Positive acknowledgement of this delivery and of every earlier one of the same
    /// connection (AMQP `multiple`): one frame, and one round trip through the client, for a
    /// batch. Only for a consumer that handles its deliveries in order and has finished every
    /// earlier one; their own ackers are then dropped unused.
    pub async fn ack_through(&self) -> AckOutcome {
        self.ack_with(BasicAckOptions { multiple: true }).await
    }

    async fn ack_with(&self, options: BasicAckOptions) -> AckOutcome {
        if !self.is_current() {
            return AckOutcome::Stale;
        }
        match self.inner.ack(options).await {
            Ok(true) => AckOutcome::Done,
            Ok(false) => AckOutcome::Stale,
            Err(error) => {
                tracing::debug!(%error, "ack failed, the broker will redeliver");
                AckOutcome::Stale
            }
        }
    }

    /// Negative acknowledgement. `requeue = true` puts the message back for another try,
    /// `false` drops it (for messages that can never be processed, e.g. failed verification).
    pub async fn reject(&self, requeue: bool) -> AckOutcome {
        if !self.is_current() {
            return AckOutcome::Stale;
        }
        match self.inner.reject(BasicRejectOptions { requeue }).await {
            Ok(true) => AckOutcome::Done,
            Ok(false) => AckOutcome::Stale,
            Err(error) => {
                tracing::debug!(%error, "reject failed, the broker will redeliver");
                AckOutcome::Stale
            }
        }
    }
}

/// The stream of deliveries of a link, across reconnects. Ends when the link is closed.
#[derive(Debug)]
pub struct Deliveries {
    pub(crate) rx: mpsc::Receiver<Delivery>,
}

impl Deliveries {
    /// The next delivery, or `None` once the link is closed.
    pub async fn recv(&mut self) -> Option<Delivery> {
        self.rx.recv().await
    }
}

impl futures::Stream for Deliveries {
    type Item = Delivery;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Delivery>> {
        self.rx.poll_recv(cx)
    }
}
