//! The connection supervisor: connect, declare this link's queue and what it declared
//! before, consume, notice failures, and reconnect with backoff.

use super::*;

impl Inner {
    pub(super) fn start(
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

    pub(super) fn status(&self) -> LinkStatus {
        LinkStatus {
            connected: self.shared.connected.load(Ordering::SeqCst),
            connects: self.shared.connects.load(Ordering::SeqCst),
            disconnects: self.shared.disconnects.load(Ordering::SeqCst),
            failures: self.shared.failures.load(Ordering::SeqCst),
            last_error: self.shared.last_error.lock().ok().and_then(|g| g.clone()),
        }
    }

    /// The queue this link consumes; `None` for a bootstrap link (the broker names it).
    pub(super) fn consume_queue(&self) -> Option<String> {
        match &self.role {
            Role::Operator => Some(self.topology.operator_queue()),
            Role::Agent { host } => Some(self.topology.host_queue(host)),
            Role::Bootstrap => None,
        }
    }

    pub(super) fn host_shape(&self) -> QueueShape {
        QueueShape {
            max_length: self.config.host_queue_max_length,
            reject_publish: false,
        }
    }

    /// Declare a durable queue, quorum where the broker supports it.
    pub(super) async fn declare_durable_queue(
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
    pub(super) async fn declare_host_on(
        &self,
        session: &Session,
        host: &str,
    ) -> Result<(), lapin::Error> {
        let queue = self.topology.host_queue(host);
        let mut topo = session.topo(host).lock().await;
        self.declare_durable_queue(&session.conn, &mut topo, &queue, self.host_shape())
            .await?;
        topology::bind(&topo, &queue, &self.topology.hosts_exchange(), host).await
    }

    pub(super) async fn ensure_host_queue(
        &self,
        session: &Session,
        host: &str,
    ) -> Result<(), lapin::Error> {
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

    pub(super) fn forget_host(&self, host: &str) {
        if let Ok(mut set) = self.declared_hosts.lock() {
            set.remove(host);
        }
    }

    /// Connect and set everything up; the session is usable when this returns.
    pub(super) async fn connect(
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
        let consume_queue = self.declare_own_queue(&conn, &mut topo).await?;
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
        self.redeclare(&session, &consume_queue).await?;
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

    /// Declares the queue this link consumes (the operator's inbox, the host's queue, or a
    /// bootstrap link's exclusive queue) and returns its name.
    async fn declare_own_queue(
        &self,
        conn: &Connection,
        topo: &mut Channel,
    ) -> Result<String, lapin::Error> {
        let t = &self.topology;
        let mut consume_queue = self.consume_queue().unwrap_or_default();
        match &self.role {
            Role::Operator => {
                topology::declare_operator_exchanges(topo, t).await?;
                self.declare_durable_queue(
                    conn,
                    topo,
                    &consume_queue,
                    QueueShape {
                        max_length: Some(self.config.operator_queue_max_length),
                        reject_publish: true,
                    },
                )
                .await?;
                topology::bind(topo, &consume_queue, &t.operator_exchange(), "").await?;
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
                self.declare_durable_queue(conn, topo, &consume_queue, self.host_shape())
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
        Ok(consume_queue)
    }

    /// After a reconnect: declares again what this link declared before, in parallel.
    async fn redeclare(&self, session: &Session, consume_queue: &str) -> Result<(), lapin::Error> {
        let t = &self.topology;
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
                        batch.push(self.declare_host_on(session, host));
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
                    topology::bind(&topo, consume_queue, &t.sets_exchange(), &set).await?;
                }
            }
            // nothing is bound to a bootstrap queue: the operator routes by its name
            Role::Bootstrap => {}
        }
        Ok(())
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
            Ok(Err(error)) => note_failed_attempt(&inner, &mut repeats, attempt, Some(error)),
            Err(_) => note_failed_attempt(&inner, &mut repeats, attempt, None),
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

/// Counts and logs a connection attempt that failed (`error`) or timed out (`None`); a
/// repeated failure is logged at debug level until it has repeated for a while.
fn note_failed_attempt(
    inner: &Inner,
    repeats: &mut Repeats,
    attempt: u32,
    error: Option<lapin::Error>,
) {
    let url = inner.config.redacted_url();
    let name = &inner.config.connection_name;
    inner.shared.failures.fetch_add(1, Ordering::SeqCst);
    match error {
        Some(error) => {
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
        None => {
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
}
