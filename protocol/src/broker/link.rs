//! The links both sides hold: the operator's and the agent's handles over one supervised
//! connection. The supervisor (connect, declare, consume, reconnect with backoff) is in
//! `supervisor`, the confirmed publish loop in `confirm`.

use std::collections::{BTreeSet, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex as StdMutex};

use futures::StreamExt;
use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions,
    ExchangeDeleteOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::tcp::OwnedTLSConfig;
use lapin::types::FieldTable;
use lapin::uri::AMQPUri;
use lapin::{
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, Consumer, Event,
};
use tokio::sync::{mpsc, watch, Mutex};
use tracing::{debug, info, warn};

use super::config::validate_name_part;
use super::delivery::{Deliveries, Delivery};
use super::repeats::{Repeats, STABLE_CONNECTION};
use super::state::Shared;
use super::topology::{self, quorum_refusal, QueueShape, QuorumRefusal, Topology};
use super::{install_rustls_ring_provider, BrokerConfig, BrokerError, MessageMeta};

mod confirm;
mod supervisor;

/// Connection state for metrics and readiness.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LinkStatus {
    /// A connection is up, the topology is declared and the consumer runs.
    pub connected: bool,
    /// Successful connections so far (the first one included).
    pub connects: u64,
    /// Connections lost so far.
    pub disconnects: u64,
    /// Connection attempts that failed plus connections lost: what
    /// `dog_*_broker_connection_failures_total` counts (one log line may stand for many).
    pub failures: u64,
    /// Why the last connection was lost or the last attempt failed.
    pub last_error: Option<String>,
}

#[derive(Debug)]
enum Role {
    Operator,
    Agent {
        host: String,
    },
    /// An agent logged in as the bootstrap user: it consumes a queue the broker names for its
    /// connection (exclusive), where the operator sends the agent its own user.
    Bootstrap,
}

struct Session {
    generation: u64,
    conn: Connection,
    publish: Channel,
    /// Declarations run on a small pool of channels (picked by name) so that declaring
    /// many host queues is not serialized on one channel; a refused declaration closes its
    /// channel, so it is replaced.
    topo: Vec<Mutex<Channel>>,
    _consume: Channel,
}

/// Size of the declaration channel pool.
const TOPOLOGY_CHANNELS: usize = 8;

impl Session {
    fn topo(&self, key: &str) -> &Mutex<Channel> {
        use std::hash::{Hash, Hasher};
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        key.hash(&mut hasher);
        &self.topo[(hasher.finish() as usize) % self.topo.len()]
    }
}

struct Inner {
    config: BrokerConfig,
    uri: AMQPUri,
    tls: OwnedTLSConfig,
    topology: Topology,
    role: Role,
    shared: Arc<Shared>,
    session: watch::Sender<Option<Arc<Session>>>,
    failures: mpsc::UnboundedSender<(u64, String)>,
    shutdown: watch::Sender<bool>,
    /// Host queues the operator declared; re-declared after every reconnect.
    declared_hosts: StdMutex<HashSet<String>>,
    /// Shared sets the agent's queue is bound to; re-bound after every reconnect.
    bound_sets: StdMutex<BTreeSet<String>>,
    quorum_unsupported: AtomicBool,
    /// Bootstrap: the name the broker gave this connection's queue.
    reply_queue: StdMutex<Option<String>>,
    /// Agents set AMQP `user-id` to their login, which the broker checks: the operator then
    /// knows which broker user published a message.
    user_id: Option<String>,
}

/// Closes the link when the last handle is dropped.
struct CloseOnDrop(watch::Sender<bool>);

impl Drop for CloseOnDrop {
    fn drop(&mut self) {
        self.0.send_replace(true);
    }
}

type EventStream = std::pin::Pin<Box<dyn futures::Stream<Item = Event> + Send + 'static>>;

/// The operator's link: publishes to host queues and shared sets, consumes `dog.operator`.
/// Cheap to clone; the connection closes when the last clone is dropped or on [`close`].
///
/// [`close`]: OperatorLink::close
#[derive(Clone)]
pub struct OperatorLink {
    inner: Arc<Inner>,
    _guard: Arc<CloseOnDrop>,
}

impl OperatorLink {
    /// Validate the configuration and start connecting in the background (the operator
    /// starts even when the broker is down; see [`OperatorLink::status`]). Must be called
    /// inside a tokio runtime. Returns the link and the stream of agent messages.
    pub fn start(config: BrokerConfig) -> Result<(Self, Deliveries), BrokerError> {
        let (inner, deliveries, guard) = Inner::start(config, Role::Operator)?;
        Ok((
            Self {
                inner,
                _guard: Arc::new(guard),
            },
            deliveries,
        ))
    }

    /// The names of the declared exchanges and queues.
    pub fn topology(&self) -> &Topology {
        &self.inner.topology
    }

    pub fn status(&self) -> LinkStatus {
        self.inner.status()
    }

    /// Wait until connected (or the link is closed).
    pub async fn wait_connected(&self) -> Result<(), BrokerError> {
        self.inner.wait_session(0).await.map(|_| ())
    }

    /// How many messages wait in the operator's inbox (a passive declare on the current
    /// connection; waits for one). Not retried: the caller asks again on its next tick.
    ///
    /// It first re-declares the exchanges and the inbox binding (idempotent): the operator
    /// only consumes its inbox, so nothing else would notice that someone deleted
    /// `<prefix>.operator` and every agent's publishes now fail.
    pub async fn inbox_depth(&self) -> Result<u32, BrokerError> {
        let session = self.inner.wait_session(0).await?;
        let name = self.inner.topology.operator_queue();
        let topo = session.topo(&name).lock().await;
        let t = &self.inner.topology;
        topology::declare_operator_exchanges(&topo, t).await?;
        topology::bind(&topo, &name, &t.operator_exchange(), "").await?;
        let q = topo
            .queue_declare(
                name.as_str().into(),
                lapin::options::QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await?;
        Ok(q.message_count())
    }

    /// Declare `dog.host.<host>` and bind it to `dog.hosts`. Idempotent and cached: later
    /// calls for the same host cost nothing, and the queue is re-declared after reconnects.
    pub async fn declare_host_queue(&self, host: &str) -> Result<(), BrokerError> {
        validate_name_part("host", host)?;
        let host = host.to_string();
        self.inner
            .on_topology("declaring host queue", |inner, session| {
                let host = host.clone();
                Box::pin(async move { inner.ensure_host_queue(session, &host).await })
            })
            .await
    }

    /// Publish `body` to one host's queue; returns once the broker confirmed it.
    /// Retries (across reconnects) until then — wrap it in a timeout to bound the wait.
    pub async fn publish_to_host(
        &self,
        host: &str,
        body: &[u8],
        meta: &MessageMeta,
    ) -> Result<(), BrokerError> {
        validate_name_part("host", host)?;
        let exchange = self.inner.topology.hosts_exchange();
        let retries = self.inner.config.unroutable_retries;
        self.inner
            .publish(&exchange, host, body, meta, Some(host), retries)
            .await
    }

    /// Publish `body` once to every host queue bound to `set_name`
    /// (see [`AgentLink::bind_shared_set`]). Returns [`BrokerError::Unroutable`] when no
    /// queue is bound to the set after the configured retries.
    pub async fn publish_shared_set(
        &self,
        set_name: &str,
        body: &[u8],
        meta: &MessageMeta,
    ) -> Result<(), BrokerError> {
        validate_name_part("set_name", set_name)?;
        let exchange = self.inner.topology.sets_exchange();
        let retries = self.inner.config.unroutable_retries;
        self.inner
            .publish(&exchange, set_name, body, meta, None, retries)
            .await
    }

    /// Publish `body` straight to the queue `queue` (through the default exchange): a node
    /// user's credential to the bootstrap queue of the agent that asked for it. Only a
    /// broker-generated name is accepted, and an unroutable message (the agent's connection
    /// and with it its queue are gone) fails at once: the agent asks again when it reconnects.
    pub async fn publish_to_queue(
        &self,
        queue: &str,
        body: &[u8],
        meta: &MessageMeta,
    ) -> Result<(), BrokerError> {
        if !super::users::is_server_named_queue(queue) {
            return Err(BrokerError::InvalidName {
                field: "queue",
                name: queue.to_string(),
                reason: "must be a name the broker generated (amq.gen-…)",
            });
        }
        self.inner.publish("", queue, body, meta, None, 0).await
    }

    /// Delete a host's queue (a retired host) and forget it.
    pub async fn delete_host_queue(&self, host: &str) -> Result<(), BrokerError> {
        validate_name_part("host", host)?;
        self.inner.forget_host(host);
        let queue = self.inner.topology.host_queue(host);
        self.inner
            .on_topology("deleting host queue", |_, session| {
                let queue = queue.clone();
                Box::pin(async move {
                    let topo = session.topo(&queue).lock().await;
                    topo.queue_delete(queue.into(), QueueDeleteOptions::default())
                        .await
                        .map(|_| ())
                })
            })
            .await
    }

    /// Close this link, then delete the exchanges and the operator queue of this prefix
    /// over a short-lived connection of its own (tests, decommissioning). Host queues are
    /// deleted with [`OperatorLink::delete_host_queue`] before.
    pub async fn delete_topology(&self) -> Result<(), BrokerError> {
        self.close();
        let inner = &self.inner;
        let properties = ConnectionProperties::default().with_connection_name(
            format!("{}/delete-topology", inner.config.connection_name).into(),
        );
        let conn = Connection::connect_uri_with_config(
            inner.uri.clone(),
            properties,
            inner.tls.clone(),
            lapin::runtime::default_runtime()?,
        )
        .await?;
        let t = &inner.topology;
        let result = async {
            let ch = conn.create_channel().await?;
            for queue in [t.operator_queue(), t.legacy_operator_queue()] {
                ch.queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
                    .await?;
            }
            for exchange in [t.hosts_exchange(), t.sets_exchange(), t.operator_exchange()] {
                ch.exchange_delete(exchange.into(), ExchangeDeleteOptions::default())
                    .await?;
            }
            Ok::<(), lapin::Error>(())
        }
        .await;
        let _ = conn.close(200, "topology deleted".into()).await;
        Ok(result?)
    }

    /// Close the connection; pending publishes return [`BrokerError::Closed`] and the
    /// delivery stream ends.
    pub fn close(&self) {
        self.inner.shutdown.send_replace(true);
    }
}

/// An agent's link: consumes its own queue, publishes to `dog.operator`.
/// Cheap to clone; the connection closes when the last clone is dropped or on [`close`].
///
/// [`close`]: AgentLink::close
#[derive(Clone)]
pub struct AgentLink {
    inner: Arc<Inner>,
    host: String,
    _guard: Arc<CloseOnDrop>,
}

impl AgentLink {
    /// Validate the configuration and start connecting in the background. The agent
    /// declares only its own queue `dog.host.<hostname>` (and its shared-set bindings), so
    /// per-agent broker permissions can be narrow; the exchanges are declared by the
    /// operator. Must be called inside a tokio runtime.
    pub fn start(config: BrokerConfig, hostname: &str) -> Result<(Self, Deliveries), BrokerError> {
        validate_name_part("hostname", hostname)?;
        let (inner, deliveries, guard) = Inner::start(
            config,
            Role::Agent {
                host: hostname.to_string(),
            },
        )?;
        Ok((
            Self {
                inner,
                host: hostname.to_string(),
                _guard: Arc::new(guard),
            },
            deliveries,
        ))
    }

    /// A link logged in as the bootstrap user (see `Topology::bootstrap_permissions`): it
    /// consumes a queue the broker names for this connection only, whose name
    /// [`AgentLink::reply_queue`] gives for the heartbeat, and publishes to the operator. It
    /// declares and binds nothing else: shared sets are only remembered until the agent moves
    /// to its own user.
    pub fn start_bootstrap(
        config: BrokerConfig,
        hostname: &str,
    ) -> Result<(Self, Deliveries), BrokerError> {
        validate_name_part("hostname", hostname)?;
        let (inner, deliveries, guard) = Inner::start(config, Role::Bootstrap)?;
        Ok((
            Self {
                inner,
                host: hostname.to_string(),
                _guard: Arc::new(guard),
            },
            deliveries,
        ))
    }

    /// Bootstrap link, connected: the name of its queue (it changes with every connection).
    pub fn reply_queue(&self) -> Option<String> {
        if !matches!(self.inner.role, Role::Bootstrap) || !self.status().connected {
            return None;
        }
        self.inner.reply_queue.lock().ok().and_then(|q| q.clone())
    }

    /// Whether this link is logged in as the bootstrap user.
    pub fn is_bootstrap(&self) -> bool {
        matches!(self.inner.role, Role::Bootstrap)
    }

    pub fn topology(&self) -> &Topology {
        &self.inner.topology
    }

    pub fn status(&self) -> LinkStatus {
        self.inner.status()
    }

    /// Wait until connected (or the link is closed).
    pub async fn wait_connected(&self) -> Result<(), BrokerError> {
        self.inner.wait_session(0).await.map(|_| ())
    }

    fn host(&self) -> &str {
        &self.host
    }

    /// Publish to the operator (heartbeat, keepalive, response); returns once confirmed.
    /// Retries across reconnects until then.
    pub async fn publish_to_operator(
        &self,
        body: &[u8],
        meta: &MessageMeta,
    ) -> Result<(), BrokerError> {
        let exchange = self.inner.topology.operator_exchange();
        let host = self.host().to_string();
        let retries = self.inner.config.unroutable_retries;
        self.inner
            .publish(&exchange, &host, body, meta, None, retries)
            .await
    }

    /// Receive messages published to shared set `name` from now on (binding is kept and
    /// re-established after reconnects).
    pub async fn bind_shared_set(&self, name: &str) -> Result<(), BrokerError> {
        validate_name_part("set_name", name)?;
        if let Ok(mut sets) = self.inner.bound_sets.lock() {
            sets.insert(name.to_string());
        }
        if self.is_bootstrap() {
            return Ok(());
        }
        let queue = self.inner.topology.host_queue(self.host());
        let exchange = self.inner.topology.sets_exchange();
        self.inner
            .on_topology("binding shared set", |_, session| {
                let (queue, exchange, name) = (queue.clone(), exchange.clone(), name.to_string());
                Box::pin(async move {
                    let topo = session.topo(&name).lock().await;
                    topology::bind(&topo, &queue, &exchange, &name).await
                })
            })
            .await
    }

    /// Stop receiving messages for shared set `name`.
    pub async fn unbind_shared_set(&self, name: &str) -> Result<(), BrokerError> {
        validate_name_part("set_name", name)?;
        if let Ok(mut sets) = self.inner.bound_sets.lock() {
            sets.remove(name);
        }
        if self.is_bootstrap() {
            return Ok(());
        }
        let queue = self.inner.topology.host_queue(self.host());
        let exchange = self.inner.topology.sets_exchange();
        self.inner
            .on_topology("unbinding shared set", |_, session| {
                let (queue, exchange, name) = (queue.clone(), exchange.clone(), name.to_string());
                Box::pin(async move {
                    let topo = session.topo(&name).lock().await;
                    topo.queue_unbind(
                        queue.into(),
                        exchange.into(),
                        name.into(),
                        FieldTable::default(),
                    )
                    .await
                })
            })
            .await
    }

    /// The shared sets currently bound.
    pub fn shared_sets(&self) -> Vec<String> {
        self.inner
            .bound_sets
            .lock()
            .map(|s| s.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// Close the connection; the delivery stream ends.
    pub fn close(&self) {
        self.inner.shutdown.send_replace(true);
    }
}
