//! The connection supervisor shared by both link kinds: connect, declare, consume,
//! detect failures, reconnect with backoff; and the confirmed publish loop.

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

/// Outcome of one publish attempt; short-lived, so its size does not matter.
#[allow(clippy::large_enum_variant)]
enum Attempt {
    Confirmed(Confirmation),
    SessionFailed(lapin::Error),
    ConfirmTimeout,
}

impl Inner {
    fn start(
        config: BrokerConfig,
        role: Role,
    ) -> Result<(Arc<Inner>, Deliveries, CloseOnDrop), BrokerError> {
        install_rustls_ring_provider();
        let (uri, tls) = config.resolve()?;
        let prefetch = match role {
            Role::Operator => config.operator_prefetch,
            Role::Agent { .. } | Role::Bootstrap => config.agent_prefetch,
        };
        let user_id = match role {
            Role::Operator => None,
            _ => Some(uri.authority.userinfo.username.clone()).filter(|u| !u.is_empty()),
        };
        let (delivery_tx, delivery_rx) = mpsc::channel(usize::from(prefetch));
        let (failures_tx, failures_rx) = mpsc::unbounded_channel();
        let inner = Arc::new(Inner {
            topology: Topology::new(config.topology_prefix.clone()),
            config,
            uri,
            tls,
            role,
            shared: Arc::new(Shared::default()),
            session: watch::Sender::new(None),
            failures: failures_tx,
            shutdown: watch::Sender::new(false),
            declared_hosts: StdMutex::new(HashSet::new()),
            bound_sets: StdMutex::new(BTreeSet::new()),
            quorum_unsupported: AtomicBool::new(false),
            reply_queue: StdMutex::new(None),
            user_id,
        });
        let guard = CloseOnDrop(inner.shutdown.clone());
        tokio::spawn(supervise(inner.clone(), delivery_tx, failures_rx));
        Ok((inner, Deliveries { rx: delivery_rx }, guard))
    }

    fn status(&self) -> LinkStatus {
        LinkStatus {
            connected: self.shared.connected.load(Ordering::SeqCst),
            connects: self.shared.connects.load(Ordering::SeqCst),
            disconnects: self.shared.disconnects.load(Ordering::SeqCst),
            failures: self.shared.failures.load(Ordering::SeqCst),
            last_error: self.shared.last_error.lock().ok().and_then(|g| g.clone()),
        }
    }

    /// The queue this link consumes; `None` for a bootstrap link (the broker names it).
    fn consume_queue(&self) -> Option<String> {
        match &self.role {
            Role::Operator => Some(self.topology.operator_queue()),
            Role::Agent { host } => Some(self.topology.host_queue(host)),
            Role::Bootstrap => None,
        }
    }

    fn host_shape(&self) -> QueueShape {
        QueueShape {
            max_length: self.config.host_queue_max_length,
            reject_publish: false,
        }
    }

    /// Wait for an established session of at least generation `min_generation`.
    async fn wait_session(&self, min_generation: u64) -> Result<Arc<Session>, BrokerError> {
        let mut sessions = self.session.subscribe();
        let mut shutdown = self.shutdown.subscribe();
        if *shutdown.borrow() {
            return Err(BrokerError::Closed);
        }
        tokio::select! {
            found = sessions.wait_for(|s| s.as_ref().is_some_and(|s| s.generation >= min_generation)) => {
                match found {
                    Ok(guard) => guard.clone().ok_or(BrokerError::Closed),
                    Err(_) => Err(BrokerError::Closed),
                }
            }
            _ = shutdown.wait_for(|closed| *closed) => Err(BrokerError::Closed),
        }
    }

    /// Tell the supervisor the session is broken so it reconnects.
    fn report_failure(&self, generation: u64, reason: String) {
        let _ = self.failures.send((generation, reason));
    }

    /// Declare a durable queue, quorum where the broker supports it.
    async fn declare_durable_queue(
        &self,
        conn: &Connection,
        topo: &mut Channel,
        name: &str,
        shape: QueueShape,
    ) -> Result<(), lapin::Error> {
        if self.config.quorum_queues && !self.quorum_unsupported.load(Ordering::SeqCst) {
            match topology::declare_queue(topo, name, shape, true).await {
                Ok(()) => return Ok(()),
                Err(error) => match quorum_refusal(&error) {
                    Some(QuorumRefusal::ChannelClosed) => {
                        warn!(queue = name, %error, "quorum queue refused, declaring a classic durable queue");
                        *topo = conn.create_channel().await?;
                    }
                    Some(QuorumRefusal::ConnectionClosed) => {
                        warn!(queue = name, %error, "broker has no quorum queues; classic durable queues from now on");
                        self.quorum_unsupported.store(true, Ordering::SeqCst);
                        return Err(error);
                    }
                    None => return Err(error),
                },
            }
        }
        topology::declare_queue(topo, name, shape, false).await
    }

    /// Declare and bind one host queue on the given session (operator side).
    async fn declare_host_on(&self, session: &Session, host: &str) -> Result<(), lapin::Error> {
        let queue = self.topology.host_queue(host);
        let mut topo = session.topo(host).lock().await;
        self.declare_durable_queue(&session.conn, &mut topo, &queue, self.host_shape())
            .await?;
        topology::bind(&topo, &queue, &self.topology.hosts_exchange(), host).await
    }

    async fn ensure_host_queue(&self, session: &Session, host: &str) -> Result<(), lapin::Error> {
        let known = self
            .declared_hosts
            .lock()
            .map(|set| set.contains(host))
            .unwrap_or(false);
        if known {
            return Ok(());
        }
        self.declare_host_on(session, host).await?;
        if let Ok(mut set) = self.declared_hosts.lock() {
            set.insert(host.to_string());
        }
        Ok(())
    }

    fn forget_host(&self, host: &str) {
        if let Ok(mut set) = self.declared_hosts.lock() {
            set.remove(host);
        }
    }

    /// Connect and set everything up; the session is usable when this returns.
    async fn connect(
        &self,
        generation: u64,
    ) -> Result<(Arc<Session>, Consumer, EventStream), lapin::Error> {
        let properties = ConnectionProperties::default()
            .with_connection_name(self.config.connection_name.clone().into());
        let conn = Connection::connect_uri_with_config(
            self.uri.clone(),
            properties,
            self.tls.clone(),
            lapin::runtime::default_runtime()?,
        )
        .await?;
        let events: EventStream = Box::pin(conn.events_listener());
        let mut topo = conn.create_channel().await?;
        let t = &self.topology;
        let mut consume_queue = self.consume_queue().unwrap_or_default();
        match &self.role {
            Role::Operator => {
                topology::declare_operator_exchanges(&topo, t).await?;
                self.declare_durable_queue(
                    &conn,
                    &mut topo,
                    &consume_queue,
                    QueueShape {
                        max_length: Some(self.config.operator_queue_max_length),
                        reject_publish: true,
                    },
                )
                .await?;
                topology::bind(&topo, &consume_queue, &t.operator_exchange(), "").await?;
                // on its own channel: an error closes only that one
                let legacy = conn.create_channel().await?;
                if let Err(e) = legacy
                    .queue_delete(
                        t.legacy_operator_queue().as_str().into(),
                        QueueDeleteOptions::default(),
                    )
                    .await
                {
                    debug!(error = %e, "no legacy operator queue to delete");
                }
                let _ = legacy.close(200, "done".into()).await;
            }
            Role::Agent { .. } => {
                self.declare_durable_queue(&conn, &mut topo, &consume_queue, self.host_shape())
                    .await?;
            }
            Role::Bootstrap => {
                let queue = topo
                    .queue_declare(
                        "".into(),
                        QueueDeclareOptions {
                            exclusive: true,
                            auto_delete: true,
                            ..Default::default()
                        },
                        FieldTable::default(),
                    )
                    .await?;
                consume_queue = queue.name().as_str().to_string();
                if let Ok(mut slot) = self.reply_queue.lock() {
                    *slot = Some(consume_queue.clone());
                }
            }
        }
        let mut pool = vec![Mutex::new(topo)];
        for _ in 1..TOPOLOGY_CHANNELS {
            pool.push(Mutex::new(conn.create_channel().await?));
        }
        let publish = conn.create_channel().await?;
        publish
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        let consume = conn.create_channel().await?;
        let prefetch = match self.role {
            Role::Operator => self.config.operator_prefetch,
            Role::Agent { .. } | Role::Bootstrap => self.config.agent_prefetch,
        };
        consume
            .basic_qos(prefetch, BasicQosOptions::default())
            .await?;
        let session = Arc::new(Session {
            generation,
            conn,
            publish,
            topo: pool,
            _consume: consume.clone(),
        });
        // Re-declare what this link declared before (after a reconnect), in parallel.
        match &self.role {
            Role::Operator => {
                let hosts: Vec<String> = self
                    .declared_hosts
                    .lock()
                    .map(|set| set.iter().cloned().collect())
                    .unwrap_or_default();
                for chunk in hosts.chunks(TOPOLOGY_CHANNELS * 2) {
                    let mut batch = Vec::with_capacity(chunk.len());
                    for host in chunk {
                        batch.push(self.declare_host_on(&session, host));
                    }
                    for result in futures::future::join_all(batch).await {
                        result?;
                    }
                }
            }
            Role::Agent { .. } => {
                let sets: Vec<String> = self
                    .bound_sets
                    .lock()
                    .map(|set| set.iter().cloned().collect())
                    .unwrap_or_default();
                for set in sets {
                    let topo = session.topo(&set).lock().await;
                    topology::bind(&topo, &consume_queue, &t.sets_exchange(), &set).await?;
                }
            }
            // nothing is bound to a bootstrap queue: the operator routes by its name
            Role::Bootstrap => {}
        }
        let consumer = consume
            .basic_consume(
                consume_queue.into(),
                format!("{}#{generation}", self.config.connection_name).into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        Ok((session, consumer, events))
    }

    /// Publish with confirm; retries until confirmed (or unroutable too often, or closed).
    async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        meta: &MessageMeta,
        host: Option<&str>,
        unroutable_retries: u32,
    ) -> Result<(), BrokerError> {
        let mut properties = BasicProperties::default()
            .with_delivery_mode(2)
            .with_message_id(meta.message_id.clone().into())
            .with_type(meta.kind.clone().into());
        if let Some(user) = &self.user_id {
            properties = properties.with_user_id(user.as_str().into());
        }
        let mut min_generation = 0;
        let mut retries = 0u32;
        let mut unroutable = 0u32;
        loop {
            let session = self.wait_session(min_generation).await?;
            let attempt = async {
                if let Some(host) = host {
                    if let Err(e) = self.ensure_host_queue(&session, host).await {
                        return Attempt::SessionFailed(e);
                    }
                }
                let pending = match session
                    .publish
                    .basic_publish(
                        exchange.into(),
                        routing_key.into(),
                        BasicPublishOptions {
                            mandatory: true,
                            ..Default::default()
                        },
                        body,
                        properties.clone(),
                    )
                    .await
                {
                    Ok(pending) => pending,
                    Err(e) => return Attempt::SessionFailed(e),
                };
                match tokio::time::timeout(self.config.confirm_timeout, pending).await {
                    Ok(Ok(confirmation)) => Attempt::Confirmed(confirmation),
                    Ok(Err(e)) => Attempt::SessionFailed(e),
                    Err(_) => Attempt::ConfirmTimeout,
                }
            }
            .await;
            match attempt {
                Attempt::Confirmed(Confirmation::Ack(None)) => return Ok(()),
                Attempt::Confirmed(Confirmation::Ack(Some(returned))) => {
                    unroutable += 1;
                    warn!(
                        exchange,
                        routing_key,
                        message_id = %meta.message_id,
                        reply = %returned.reply_text,
                        attempt = unroutable,
                        "message returned as unroutable"
                    );
                    if let Some(host) = host {
                        self.forget_host(host);
                    }
                    if unroutable > unroutable_retries {
                        return Err(BrokerError::Unroutable {
                            exchange: exchange.to_string(),
                            routing_key: routing_key.to_string(),
                            message_id: meta.message_id.clone(),
                            attempts: unroutable,
                        });
                    }
                }
                Attempt::Confirmed(Confirmation::Nack(_)) => {
                    warn!(exchange, routing_key, message_id = %meta.message_id, "broker nacked the message; publishing again");
                }
                Attempt::Confirmed(Confirmation::NotRequested) => {
                    // Cannot happen on a confirm-mode channel; treat the session as broken.
                    self.report_failure(
                        session.generation,
                        "publish channel not in confirm mode".into(),
                    );
                    min_generation = session.generation + 1;
                    continue;
                }
                Attempt::ConfirmTimeout => {
                    warn!(exchange, routing_key, message_id = %meta.message_id, timeout_seconds = self.config.confirm_timeout.as_secs_f64(), "no publisher confirm in time; publishing again");
                }
                Attempt::SessionFailed(error) => {
                    debug!(exchange, routing_key, message_id = %meta.message_id, %error, "publish failed; waiting for a new connection");
                    self.report_failure(session.generation, format!("publish failed: {error}"));
                    min_generation = session.generation + 1;
                    // Back off here too: a publish that breaks every fresh connection (e.g.
                    // an exchange that does not exist yet) must not cause a reconnect storm.
                }
            }
            let delay = self.config.backoff.delay(retries);
            retries = retries.saturating_add(1);
            tokio::time::sleep(delay).await;
        }
    }

    /// Run `op` on the topology channel of a session, retrying on the next session if the
    /// current one fails.
    async fn on_topology<F>(&self, what: &str, op: F) -> Result<(), BrokerError>
    where
        F: for<'a> Fn(
            &'a Inner,
            &'a Session,
        ) -> futures::future::BoxFuture<'a, Result<(), lapin::Error>>,
    {
        let mut min_generation = 0;
        loop {
            let session = self.wait_session(min_generation).await?;
            match op(self, &session).await {
                Ok(()) => return Ok(()),
                Err(error) => {
                    warn!(%error, "{what} failed; retrying after reconnect");
                    self.report_failure(session.generation, format!("{what} failed: {error}"));
                    min_generation = session.generation + 1;
                }
            }
        }
    }
}

async fn forward(
    mut consumer: Consumer,
    deliveries: &mpsc::Sender<Delivery>,
    generation: u64,
    shared: &Arc<Shared>,
) -> String {
    while let Some(item) = consumer.next().await {
        match item {
            Ok(delivery) => {
                let delivery = Delivery::from_lapin(delivery, generation, shared.clone());
                if deliveries.send(delivery).await.is_err() {
                    // The application dropped its receiver; keep the link for publishing.
                    std::future::pending::<()>().await;
                }
            }
            Err(error) => return format!("consumer failed: {error}"),
        }
    }
    "consumer cancelled by the broker".to_string()
}

async fn watch_events(mut events: impl futures::Stream<Item = Event> + Unpin) -> String {
    while let Some(event) = events.next().await {
        match event {
            Event::Error(error) => return format!("connection error: {error}"),
            Event::ConnectionBlocked(reason) => {
                warn!(%reason, "broker blocked the connection (resource alarm); publishes wait")
            }
            Event::ConnectionUnblocked => info!("broker unblocked the connection"),
            other => debug!(event = ?other, "connection event"),
        }
    }
    "connection event stream ended".to_string()
}

async fn next_failure(
    failures: &mut mpsc::UnboundedReceiver<(u64, String)>,
    generation: u64,
) -> String {
    while let Some((failed, reason)) = failures.recv().await {
        if failed == generation {
            return reason;
        }
    }
    std::future::pending().await
}

async fn supervise(
    inner: Arc<Inner>,
    deliveries: mpsc::Sender<Delivery>,
    mut failures: mpsc::UnboundedReceiver<(u64, String)>,
) {
    let mut shutdown = inner.shutdown.subscribe();
    let url = inner.config.redacted_url();
    let name = inner.config.connection_name.clone();
    let mut attempt = 0u32;
    let mut repeats = Repeats::default();
    loop {
        if *shutdown.borrow() {
            break;
        }
        let generation = inner.shared.generation.load(Ordering::SeqCst) + 1;
        let setup = tokio::select! {
            r = tokio::time::timeout(inner.config.connect_timeout, inner.connect(generation)) => r,
            _ = shutdown.wait_for(|closed| *closed) => break,
        };
        match setup {
            Ok(Ok((session, consumer, events))) => {
                let connected_at = tokio::time::Instant::now();
                inner.shared.generation.store(generation, Ordering::SeqCst);
                inner.shared.connected.store(true, Ordering::SeqCst);
                inner.shared.connects.fetch_add(1, Ordering::SeqCst);
                if repeats.quiet() {
                    debug!(%url, connection_name = %name, generation, "connected to broker, topology declared");
                } else {
                    info!(%url, connection_name = %name, generation, "connected to broker, topology declared");
                }
                inner.session.send_replace(Some(session.clone()));
                let ended = async {
                    tokio::select! {
                        r = forward(consumer, &deliveries, generation, &inner.shared) => Some(r),
                        r = watch_events(events) => Some(r),
                        r = next_failure(&mut failures, generation) => Some(r),
                        _ = shutdown.wait_for(|closed| *closed) => None,
                    }
                };
                tokio::pin!(ended);
                let reason = if repeats.quiet() {
                    tokio::select! {
                        r = &mut ended => r,
                        _ = tokio::time::sleep(STABLE_CONNECTION) => {
                            info!(%url, connection_name = %name, generation, "broker connection healthy again");
                            repeats = Repeats::default();
                            attempt = 0;
                            ended.await
                        }
                    }
                } else {
                    ended.await
                };
                inner.session.send_replace(None);
                inner.shared.connected.store(false, Ordering::SeqCst);
                let Some(reason) = reason else {
                    let _ = tokio::time::timeout(
                        inner.config.confirm_timeout,
                        session.conn.close(200, "link closed".into()),
                    )
                    .await;
                    info!(%url, connection_name = %name, "broker link closed");
                    break;
                };
                inner.shared.disconnects.fetch_add(1, Ordering::SeqCst);
                inner.shared.failures.fetch_add(1, Ordering::SeqCst);
                // A connection that fails soon after it came up (a publish to a deleted
                // exchange, a permission refused) keeps backing off instead of starting over.
                if connected_at.elapsed() >= STABLE_CONNECTION {
                    attempt = 0;
                    repeats = Repeats::default();
                }
                match repeats.note(&reason, tokio::time::Instant::now()) {
                    Some(repeated) => {
                        warn!(%url, connection_name = %name, generation, %reason, repeated, "disconnected from broker; reconnecting")
                    }
                    None => {
                        debug!(%url, connection_name = %name, generation, %reason, "disconnected from broker again; reconnecting")
                    }
                }
                inner.shared.set_last_error(reason);
                // The connection may still be open (e.g. only a channel failed): close it so
                // the broker requeues its unacknowledged deliveries.
                let _ = tokio::time::timeout(
                    inner.config.confirm_timeout,
                    session.conn.close(320, "dog link reconnecting".into()),
                )
                .await;
            }
            Ok(Err(error)) => {
                inner.shared.failures.fetch_add(1, Ordering::SeqCst);
                match repeats.note(&error.to_string(), tokio::time::Instant::now()) {
                    Some(repeated) => {
                        warn!(%url, connection_name = %name, attempt, %error, repeated, "broker connection attempt failed")
                    }
                    None => {
                        debug!(%url, connection_name = %name, attempt, %error, "broker connection attempt failed again")
                    }
                }
                inner
                    .shared
                    .set_last_error(format!("connect failed: {error}"));
            }
            Err(_) => {
                inner.shared.failures.fetch_add(1, Ordering::SeqCst);
                let timeout_seconds = inner.config.connect_timeout.as_secs_f64();
                match repeats.note("connect: timed out", tokio::time::Instant::now()) {
                    Some(repeated) => {
                        warn!(%url, connection_name = %name, attempt, timeout_seconds, repeated, "broker connection attempt timed out")
                    }
                    None => {
                        debug!(%url, connection_name = %name, attempt, timeout_seconds, "broker connection attempt timed out again")
                    }
                }
                inner.shared.set_last_error("connect timed out".into());
            }
        }
        let delay = inner.config.backoff.delay(attempt);
        attempt = attempt.saturating_add(1);
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = shutdown.wait_for(|closed| *closed) => break,
        }
    }
    inner.session.send_replace(None);
    inner.shared.connected.store(false, Ordering::SeqCst);
}

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
