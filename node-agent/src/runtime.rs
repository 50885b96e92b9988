//! The agent process (SPEC §6): start-up, the main loop and the request handlers.
//!
//! Start-up loads the agent's keys and the operator's public keys, detects the iptables
//! backend, loads the last applied firewall from the state directory and (enforce mode)
//! verifies and repairs the kernel against it before the operator says anything, serves
//! metrics/health and connects the broker.
//!
//! The main loop is one task that owns all state; kernel calls run on the blocking pool. It
//! sends a heartbeat on every (re)connect and when the interfaces change, a keepalive on an
//! interval, checks drift on an interval, retries a failed apply with backoff, and answers
//! every request exactly once, acknowledging the delivery only after the work and the
//! response are done. SIGTERM/SIGINT close the broker link and leave the rules in place.
//!
//! The pure helpers (answer cache, drift events, rejection log pacing, key file parsing,
//! summaries) are at the bottom with their unit tests.

use crate::apply::{ApplyError, ApplyReport, Plan};
use crate::backoff::Backoff;
use crate::broker_user::{own_user_refused, Login};
use crate::config::{Config, Mode as ConfigMode};
use crate::drift::DriftReport;
use crate::firewall::Firewall;
use crate::kernel::{Kernel, KernelError};
use crate::live::LiveState;
use crate::members::SetContent;
use crate::metrics::AgentMetrics;
use crate::state::{AppliedState, BrokerUser, ReplayState, StateStore};
use anyhow::Context;
use dog_protocol::broker::{AgentLink, Deliveries, Delivery, MessageMeta};
use dog_protocol::envelope::{Opener, Rejection, Sealer};
use dog_protocol::keys::{AgentKeys, EncryptionPublicKey, SigningPublicKey, TrustedKeys};
use dog_protocol::messages::{
    limits, AgentMessage, Detail, DriftEvent, DriftSummary, ErrorKind, Heartbeat, Interface,
    Keepalive, Mode, OperatorMessage, Outcome, Request, RequestKind, Response, SetDelta,
};
use dog_protocol::ruleset::{sha256_hex, FirewallHashes, SET_PREFIX};
use dog_protocol::telemetry::{self, Health};
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::signal::unix::{signal, SignalKind};
use tracing::{debug, error, info, warn};
use uuid::Uuid;

/// How long a publish to the operator may take before the loop gives up on it (the transport
/// itself retries across reconnects until confirmed).
const PUBLISH_TIMEOUT: Duration = Duration::from_secs(15);
/// How long a shared-set (un)binding may hold up the loop; the transport keeps the binding and
/// re-establishes it on every reconnect anyway.
const BIND_TIMEOUT: Duration = Duration::from_secs(5);
/// Validity of the agent's messages.
const MESSAGE_TTL_SECS: u64 = 300;
/// How often the loop looks at the link status (heartbeat on reconnect, readiness).
const LINK_POLL: Duration = Duration::from_millis(250);
/// `/healthz` fails when the loop has not turned for this long.
const STUCK_AFTER: Duration = Duration::from_secs(120);
/// Answered requests remembered for redeliveries.
const ANSWER_CACHE: usize = 1024;
/// A rejection reason is logged at most once per this interval.
const REJECTION_LOG_EVERY: Duration = Duration::from_secs(60);

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A desired state that failed to apply and is retried with backoff until it succeeds or a
/// newer one arrives.
struct Pending {
    revision: u64,
    firewall: Firewall,
    backoff: Backoff,
    next_try: tokio::time::Instant,
}

/// The running agent. Build it with [`Agent::start`], then [`Agent::run`] it.
pub struct Agent {
    cfg: Config,
    hostname: String,
    kernel: Arc<Kernel>,
    store: StateStore,
    opener: Opener,
    sealer: Sealer,
    signing_key: SigningPublicKey,
    encryption_key: EncryptionPublicKey,
    metrics: AgentMetrics,
    health: Health,
    link: AgentLink,
    /// Enforce: the firewall in force (also on disk). Observe: the last desired state seen.
    applied: Option<AppliedState>,
    pending: Option<Pending>,
    /// Latest version of each shared set taken.
    /// Newest accepted issue time and shared-set versions, persisted (`replay.json`).
    replay: ReplayState,
    drift_events: VecDeque<DriftEvent>,
    /// Observe mode: changes the last plan would make (reported in keepalives).
    would_change: Option<u64>,
    drift: DriftSummary,
    interfaces: Vec<Interface>,
    answered: AnswerCache,
    rejections: RejectionLog,
    /// `LinkStatus::connects` value the last heartbeat was sent for.
    heartbeat_for: u64,
    /// The broker user the link logs in as.
    login: Login,
    /// A login the link moves to after the current delivery (the operator sent the node's
    /// own user, or the broker refused it).
    next_login: Option<Login>,
    /// `LinkStatus::failures` when the link was last seen connected.
    failures_at_connect: u64,
    /// The kernel's hashes as the last verification read them: an apply (which reads back
    /// what it wrote), a drift check or repair, an observe check. Keepalives and heartbeats
    /// report these and never read the kernel themselves. `None` before the first one and
    /// after an apply failed midway (then the next report reads the kernel once).
    verified: Option<FirewallHashes>,
    /// The saved state was verified (and repaired) at start, or there was none.
    startup_verified: bool,
    /// Unix ms of the loop's last turn, read by the liveness watchdog.
    last_turn: Arc<AtomicU64>,
    metrics_addr: std::net::SocketAddr,
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Agent {
    /// Everything up to a started broker link. Errors name the file or setting at fault.
    pub async fn start(cfg: Config) -> anyhow::Result<(Agent, Deliveries)> {
        let hostname = cfg
            .resolved_hostname()
            .context("cannot determine the host name (set --hostname / NODE_NAME)")?;
        if let Err(why) = dog_protocol::names::check_dns1123(&hostname) {
            anyhow::bail!("host name {hostname:?} (--hostname / NODE_NAME) is not a DNS-1123 subdomain: {why}; the operator admits no other");
        }
        let (keys, created) = AgentKeys::load_or_create(&cfg.state_dir)
            .with_context(|| format!("agent keys in {}", cfg.state_dir.display()))?;
        check_state_dir(&cfg.state_dir)?;
        if created.signing || created.encryption {
            info!(
                dir = %cfg.state_dir.display(),
                fingerprint = %keys.signing.public().fingerprint(),
                "created agent keys on first start"
            );
        } else {
            info!(fingerprint = %keys.signing.public().fingerprint(), "loaded agent keys");
        }
        let operator_keys = load_operator_keys(&cfg.operator_public_keys)?;
        info!(
            file = %cfg.operator_public_keys.display(),
            keys = %operator_keys.key_ids().collect::<Vec<_>>().join(","),
            "trusting operator keys"
        );

        let kcfg = cfg.kernel_config();
        let kernel = blocking(move || Kernel::new(kcfg))
            .await
            .context("cannot run the iptables tools")?;
        info!(backend = ?kernel.backend(), netns = cfg.netns.as_deref(), mode = ?cfg.mode, "kernel ready");

        let store = StateStore::new(&cfg.state_dir);
        let applied = match store.load() {
            Ok(s) => s,
            Err(e) => {
                error!(error = %e, "ignoring the saved state; waiting for the operator's");
                None
            }
        };
        let signing_key = keys.signing.public();
        let encryption_key = keys.encryption.public();
        let mut opener = Opener::for_agent(
            hostname.clone(),
            keys.encryption,
            cfg.operator_name.clone(),
            operator_keys,
        );
        opener.set_applied_revision(applied.as_ref().map(|a| a.revision));
        // what the previous run accepted is refused again (the replay cache starts empty)
        let replay = match store.load_replay() {
            Ok(r) => r.unwrap_or_default(),
            Err(e) => {
                // unreadable: refuse everything issued before now rather than nothing
                error!(error = %e, "the replay state is unreadable; refusing messages issued before this start");
                ReplayState {
                    floor: dog_protocol::envelope::ReplayFloor {
                        issued_at: unix_now(),
                        ids: Default::default(),
                    },
                    set_versions: Default::default(),
                }
            }
        };
        opener.set_replay_floor(Some(replay.floor.clone()));
        let sealer = Sealer::new(hostname.clone(), keys.signing);

        let metrics = AgentMetrics::new().context("metrics")?;
        let health = Health::default();
        health.set_not_ready("starting");
        let metrics_addr =
            telemetry::serve(cfg.metrics_addr, metrics.registry.clone(), health.clone())
                .await
                .with_context(|| format!("cannot serve metrics on {}", cfg.metrics_addr))?;
        info!(addr = %metrics_addr, "serving /metrics, /healthz, /readyz");

        let bcfg = cfg.broker.config(format!("dog-agent/{hostname}"));
        dog_protocol::broker::install_rustls_ring_provider();
        info!(broker = %bcfg.redacted_url(), prefix = %bcfg.topology_prefix, "connecting to the broker");

        // Connecting runs in the background; deliveries wait until `run`, after the saved
        // state has been verified and repaired below.
        let login = Login::at_start(cfg.broker_bootstrap, store.load_broker_user());
        let (link, deliveries) = login
            .start(&cfg.broker, &hostname)
            .context("broker configuration")?;
        metrics
            .broker_bootstrap
            .set(i64::from(login == Login::Bootstrap));
        let mut agent = Agent {
            hostname,
            kernel: Arc::new(kernel),
            store,
            opener,
            sealer,
            signing_key,
            encryption_key,
            metrics,
            health,
            link,
            applied,
            pending: None,
            replay,
            drift_events: VecDeque::new(),
            would_change: None,
            drift: DriftSummary::default(),
            interfaces: Vec::new(),
            answered: AnswerCache::new(ANSWER_CACHE),
            rejections: RejectionLog::default(),
            heartbeat_for: 0,
            login,
            next_login: None,
            failures_at_connect: 0,
            verified: None,
            startup_verified: false,
            last_turn: Arc::new(AtomicU64::new(unix_ms())),
            metrics_addr,
            cfg,
        };
        agent.restore_saved_state().await;
        agent.scan_addresses().await;
        if let Some(a) = &agent.applied {
            let names: Vec<String> = a.firewall.sets.keys().cloned().collect();
            agent.sync_bindings(&[], &names).await;
        }
        Ok((agent, deliveries))
    }

    /// The address the metrics endpoint is bound to.
    pub fn metrics_addr(&self) -> std::net::SocketAddr {
        self.metrics_addr
    }

    /// Enforce mode: make the kernel match the saved state before the operator speaks.
    async fn restore_saved_state(&mut self) {
        let Some(saved) = self.applied.clone() else {
            self.startup_verified = true;
            return;
        };
        self.metrics
            .last_applied_revision
            .set(saved.revision as i64);
        info!(
            revision = saved.revision,
            "loaded the last applied firewall"
        );
        if self.cfg.mode == ConfigMode::Observe {
            self.startup_verified = true;
            return;
        }
        match self.drift_check().await {
            Some(true) => self.startup_verified = true,
            Some(false) => {
                warn!(
                    revision = saved.revision,
                    "could not restore the saved firewall; retrying with backoff"
                );
                self.schedule_retry(saved.revision, saved.firewall, None);
            }
            None => {}
        }
    }

    /// Runs until SIGTERM/SIGINT or until the link closes. Leaves the rules in place.
    pub async fn run(mut self, mut deliveries: Deliveries) -> anyhow::Result<()> {
        {
            let mut sigterm = signal(SignalKind::terminate()).context("SIGTERM handler")?;
            let mut sigint = signal(SignalKind::interrupt()).context("SIGINT handler")?;
            let watchdog = spawn_watchdog(self.last_turn.clone(), self.health.clone());
            let start = tokio::time::Instant::now();
            let mut keepalive = tokio::time::interval_at(
                start + self.cfg.keepalive_interval,
                self.cfg.keepalive_interval,
            );
            let mut drift =
                tokio::time::interval_at(start + self.cfg.drift_interval, self.cfg.drift_interval);
            let mut addresses = tokio::time::interval_at(
                start + self.cfg.address_interval,
                self.cfg.address_interval,
            );
            let mut link_poll = tokio::time::interval(LINK_POLL);
            for t in [&mut keepalive, &mut drift, &mut addresses, &mut link_poll] {
                t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            }
            let why = loop {
                self.last_turn.store(unix_ms(), Ordering::Relaxed);
                let retry_at = self.pending.as_ref().map(|p| p.next_try);
                tokio::select! {
                    _ = sigterm.recv() => break "SIGTERM",
                    _ = sigint.recv() => break "SIGINT",
                    d = deliveries.recv() => match d {
                        Some(d) => self.on_delivery(d).await,
                        None => break "broker link closed",
                    },
                    _ = link_poll.tick() => self.watch_link().await,
                    _ = keepalive.tick() => self.send_keepalive().await,
                    _ = drift.tick() => { self.drift_check().await; }
                    _ = addresses.tick() => {
                        if self.scan_addresses().await {
                            info!("interfaces changed; sending a heartbeat");
                            self.send_heartbeat().await;
                        }
                    }
                    _ = sleep_until(retry_at) => self.retry_pending().await,
                }
                if let Some(login) = self.next_login.take() {
                    if let Some(fresh) = self.relogin(login).await {
                        deliveries = fresh;
                    }
                }
            };
            watchdog.abort();
            info!(
                reason = why,
                revision = self.applied.as_ref().map(|a| a.revision),
                "shutting down: closing the broker link; dog's rules stay in place"
            );
            self.link.close();
            Ok(())
        }
    }

    // --------------------------------------------------------------------------------------
    // link, heartbeat, keepalive
    // --------------------------------------------------------------------------------------

    async fn watch_link(&mut self) {
        let st = self.link.status();
        self.metrics.broker_connected.set(i64::from(st.connected));
        if st.connected {
            self.failures_at_connect = st.failures;
        } else if matches!(self.login, Login::Own(_))
            && self.next_login.is_none()
            && own_user_refused(&st, self.failures_at_connect)
        {
            warn!(error = st.last_error.as_deref().unwrap_or(""), "the broker refuses this node's own user; forgetting it and asking the operator for a new one");
            if let Err(e) = self.store.remove_broker_user() {
                warn!(error = %e, "cannot remove the saved broker user");
            }
            self.next_login = Some(Login::Bootstrap);
        }
        dog_protocol::telemetry::count_up_to(&self.metrics.broker_failures, st.failures);
        if st.connected && st.connects != self.heartbeat_for && self.send_heartbeat().await {
            self.heartbeat_for = st.connects;
        }
        if !st.connected {
            self.health.set_not_ready(format!(
                "not connected to the broker{}",
                st.last_error.map(|e| format!(": {e}")).unwrap_or_default()
            ));
        } else if !self.startup_verified {
            self.health
                .set_not_ready("the saved firewall is not verified yet");
        } else if self.login == Login::Bootstrap {
            self.health.set_not_ready(
                "logged in as the bootstrap broker user: waiting for this node's own user from the operator",
            );
        } else {
            self.health.set_ready();
        }
    }

    /// The revision in force in the kernel: none in observe mode, which applies nothing.
    fn applied_revision(&self) -> Option<u64> {
        if self.cfg.mode == ConfigMode::Observe {
            return None;
        }
        self.applied.as_ref().map(|a| a.revision)
    }

    fn protocol_mode(&self) -> Mode {
        match self.cfg.mode {
            ConfigMode::Enforce => Mode::Enforce,
            ConfigMode::Observe => Mode::Observe,
        }
    }

    /// Reads dog's live state (and updates the installed gauges). Sets equal to the applied
    /// ones share their content and hash instead of being held and hashed a second time.
    async fn live(&self) -> Result<LiveState, KernelError> {
        let k = self.kernel.clone();
        let known = self
            .applied
            .as_ref()
            .map(|a| a.firewall.sets.clone())
            .unwrap_or_default();
        let live = blocking(move || k.snapshot_against(&known)).await?;
        self.metrics.observe_live(&live);
        Ok(live)
    }

    /// What keepalives and heartbeats report: the last verification's hashes (see
    /// `verified`), reading the kernel only when there is none.
    async fn reported_hashes(&mut self) -> Option<FirewallHashes> {
        if self.verified.is_none() {
            self.verified = self.live_hashes().await;
        }
        self.verified.clone()
    }

    async fn live_hashes(&self) -> Option<FirewallHashes> {
        match self.live().await {
            Ok(l) => Some(l.hashes()),
            Err(e) => {
                warn!(error = %e, "cannot read the live firewall");
                None
            }
        }
    }

    /// Persists what was accepted once its work is done and before it is acknowledged: after
    /// a restart the same message is not accepted again. (A crash before this leaves the message
    /// unacknowledged; its redelivery is then handled as new, which is what its undone work
    /// needs.)
    fn save_replay(&self) {
        if let Err(e) = self.store.save_replay(&self.replay) {
            warn!(error = %e, "cannot save the replay state");
        }
    }

    /// The identity token as the kubelet last wrote it; a missing or unreadable file is
    /// logged and the heartbeat goes without (the operator then decides by its pins).
    fn identity_token(&self) -> Option<String> {
        let path = self.cfg.identity_token_file.as_ref()?;
        match std::fs::read_to_string(path) {
            Ok(t) if !t.trim().is_empty() => Some(t.trim().to_string()),
            Ok(_) => {
                warn!(file = %path.display(), "the identity token file is empty");
                None
            }
            Err(e) => {
                warn!(file = %path.display(), error = %e, "cannot read the identity token");
                None
            }
        }
    }

    async fn send_heartbeat(&mut self) -> bool {
        let hb = Heartbeat {
            agent_version: env!("CARGO_PKG_VERSION").to_string(),
            hostname: self.hostname.clone(),
            interfaces: self.interfaces.clone(),
            signing_key: self.signing_key,
            encryption_key: self.encryption_key,
            applied_revision: self.applied_revision(),
            live_hashes: self.reported_hashes().await,
            drift: self.drift.clone(),
            mode: self.protocol_mode(),
            identity_token: self.identity_token(),
            broker_reply_to: self.link.reply_queue(),
        };
        let ok = self
            .publish(&AgentMessage::Heartbeat(hb), "heartbeat")
            .await;
        if ok {
            info!(revision = self.applied_revision(), "sent heartbeat");
        }
        ok
    }

    async fn send_keepalive(&mut self) {
        if !self.link.status().connected {
            debug!("not connected; keepalive skipped (drift events kept for the next one)");
            return;
        }
        let drift: Vec<DriftEvent> = self.drift_events.iter().cloned().collect();
        let ka = Keepalive {
            interval_secs: self.cfg.keepalive_interval.as_secs_f64().ceil().max(1.0) as u64,
            applied_revision: self.applied_revision(),
            live_hashes: self.reported_hashes().await,
            drift,
            mode: self.protocol_mode(),
            would_change: self.would_change,
        };
        let n = ka.drift.len();
        if self
            .publish(&AgentMessage::Keepalive(ka), "keepalive")
            .await
        {
            self.drift_events.drain(..n.min(self.drift_events.len()));
        }
    }

    /// Seals and publishes to the operator; false when it could not be confirmed in time.
    async fn publish(&self, msg: &AgentMessage, kind: &'static str) -> bool {
        let bytes = match self.sealer.agent_message(
            &self.cfg.operator_name,
            msg,
            unix_now(),
            MESSAGE_TTL_SECS,
        ) {
            Ok(b) => b,
            Err(e) => {
                error!(kind, error = %e, "cannot seal a message to the operator");
                return false;
            }
        };
        let meta = MessageMeta::new(Uuid::new_v4().to_string(), kind);
        match tokio::time::timeout(
            PUBLISH_TIMEOUT,
            self.link.publish_to_operator(&bytes, &meta),
        )
        .await
        {
            Ok(Ok(())) => {
                self.metrics.sent.with_label_values(&[kind]).inc();
                true
            }
            Ok(Err(e)) => {
                warn!(kind, error = %e, "publish to the operator failed");
                false
            }
            Err(_) => {
                warn!(kind, "publish to the operator not confirmed in time");
                false
            }
        }
    }

    /// Scans interfaces; true when they changed since the last scan.
    async fn scan_addresses(&mut self) -> bool {
        let k = self.kernel.clone();
        match tokio::task::spawn_blocking(move || k.interfaces()).await {
            Ok(Ok(ifs)) => {
                let now = to_protocol_interfaces(&ifs);
                let changed = now != self.interfaces;
                self.interfaces = now;
                changed
            }
            Ok(Err(e)) => {
                warn!(error = %e, "cannot list interfaces");
                false
            }
            Err(e) => {
                error!(error = %e, "interface scan panicked");
                false
            }
        }
    }

    async fn sync_bindings(&self, old: &[String], new: &[String]) {
        let old: BTreeSet<&String> = old.iter().collect();
        let new: BTreeSet<&String> = new.iter().collect();
        for name in new.difference(&old) {
            match tokio::time::timeout(BIND_TIMEOUT, self.link.bind_shared_set(name)).await {
                Ok(Err(e)) => warn!(set = %name, error = %e, "cannot bind shared set"),
                Err(_) => debug!(set = %name, "binding shared set after reconnect"),
                Ok(Ok(())) => debug!(set = %name, "bound shared set"),
            }
        }
        for name in old.difference(&new) {
            match tokio::time::timeout(BIND_TIMEOUT, self.link.unbind_shared_set(name)).await {
                Ok(Err(e)) => warn!(set = %name, error = %e, "cannot unbind shared set"),
                Err(_) => debug!(set = %name, "unbinding shared set after reconnect"),
                Ok(Ok(())) => debug!(set = %name, "unbound shared set"),
            }
        }
    }

    // --------------------------------------------------------------------------------------
    // deliveries
    // --------------------------------------------------------------------------------------

    async fn on_delivery(&mut self, mut d: Delivery) {
        let digest = sha256_hex(&d.body);
        if let Some((response, published)) = self.answered.get(&digest) {
            if !d.redelivered {
                // The broker did not redeliver it: someone published the same bytes again.
                self.metrics.reject(Rejection::Replayed.reason());
                self.rejections.note(
                    Rejection::Replayed,
                    d.message_id.as_deref(),
                    d.body.len(),
                    Instant::now(),
                );
                d.acker.ack().await;
                return;
            }
            if published {
                debug!(request = %response.request_id, "redelivered request already answered; acknowledging");
                d.acker.ack().await;
                return;
            }
            let response = response.clone();
            self.respond_and_ack(&digest, response, d).await;
            return;
        }
        let opened = match self.opener.open(&d.body, unix_now()) {
            Ok(o) => {
                d.body = Vec::new();
                o
            }
            Err(rej @ (Rejection::StaleRevision | Rejection::Replayed)) if d.redelivered => {
                // Handled before a reconnect or restart whose ack did not reach the broker.
                info!(
                    reason = rej.reason(),
                    message_id = d.message_id.as_deref().unwrap_or("-"),
                    "redelivered request was already handled; acknowledging"
                );
                d.acker.ack().await;
                return;
            }
            Err(rej) => {
                self.metrics.reject(rej.reason());
                self.rejections
                    .note(rej, d.message_id.as_deref(), d.body.len(), Instant::now());
                d.acker.ack().await;
                return;
            }
        };
        self.replay
            .floor
            .note(opened.header.issued_at, opened.header.id);
        // The sealed body and the JSON payload can be megabytes (a large set): the body is freed
        // before the payload is parsed, the payload before the work starts.
        let id = opened.header.id;
        let parsed = opened.operator_message();
        let sender = opened.header.sender.clone();
        drop(opened);
        let response = match parsed {
            Err(e) => {
                self.metrics.reject("malformed");
                warn!(request = %id, sender = %sender, error = %e, "request payload refused");
                Response::error(id, ErrorKind::Malformed, e.to_string())
            }
            Ok(OperatorMessage::Request(req)) => self.handle(req).await,
        };
        // once per message, with a shared set's new version: done work is not done again
        self.save_replay();
        self.answered.insert(digest.clone(), response.clone());
        self.respond_and_ack(&digest, response, d).await;
    }

    async fn respond_and_ack(&mut self, digest: &str, response: Response, d: Delivery) {
        let id = response.request_id;
        if self
            .publish(&AgentMessage::Response(response), "response")
            .await
        {
            self.answered.mark_published(digest);
            d.acker.ack().await;
        } else {
            // Requeue: the redelivery finds the answer in the cache and sends it then.
            warn!(request = %id, "response not confirmed; requeueing the request to answer it later");
            d.acker.reject(true).await;
        }
    }

    async fn handle(&mut self, req: Request) -> Response {
        let id = req.id;
        let kind = request_kind_name(&req.request);
        let started = Instant::now();
        let response = match req.request {
            RequestKind::Apply { revision, firewall } => {
                self.pending = None;
                self.apply_desired(id, revision, Firewall::from(firewall))
                    .await
            }
            RequestKind::ApplySetDeltas {
                base_revision,
                revision,
                deltas,
            } => self.apply_deltas(id, base_revision, revision, deltas).await,
            RequestKind::SharedSet { set, version } => self.shared_set(id, set, version).await,
            RequestKind::Status => self.status(id).await,
            RequestKind::DumpRules => self.dump(id).await,
            RequestKind::Reapply => self.reapply(id).await,
            RequestKind::BrokerUser { username, password } => {
                self.take_broker_user(id, username, password.0)
            }
            RequestKind::Unknown => Response::error(
                id,
                ErrorKind::UnknownRequest,
                format!(
                    "this agent ({}) does not know the request kind",
                    env!("CARGO_PKG_VERSION")
                ),
            ),
        };
        let outcome = match &response.result {
            Outcome::Ok { .. } => "ok",
            Outcome::Error { kind, .. } => error_kind_name(*kind),
        };
        self.metrics
            .requests
            .with_label_values(&[kind, outcome])
            .inc();
        info!(
            request = %id,
            kind,
            outcome,
            ms = started.elapsed().as_millis() as u64,
            "answered request"
        );
        response
    }

    /// The operator sent this node's own broker user: kept, and logged in with once the
    /// request is answered (over the bootstrap link it came on).
    fn take_broker_user(&mut self, id: Uuid, username: String, password: String) -> Response {
        if !self.cfg.broker_bootstrap {
            return Response::error(
                id,
                ErrorKind::Refused,
                "this agent logs in as its configured broker user (no --broker-bootstrap)",
            );
        }
        let user = BrokerUser { username, password };
        if let Err(e) = self.store.save_broker_user(&user) {
            error!(error = %e, "cannot keep the node's broker user; staying on the bootstrap user");
            return Response::error(id, ErrorKind::Internal, e.to_string());
        }
        info!(user = %user.username, "received this node's own broker user");
        let detail = format!("broker user {} kept", user.username);
        self.next_login = Some(Login::Own(user));
        text_ok(id, self.applied_revision(), None, detail)
    }

    /// Closes the link and opens one logged in as `login`; the new link's deliveries, or
    /// `None` when it cannot start (the old link then stays).
    async fn relogin(&mut self, login: Login) -> Option<Deliveries> {
        let (link, deliveries) = match login.start(&self.cfg.broker, &self.hostname) {
            Ok(started) => started,
            Err(e) => {
                error!(error = %e, "cannot start a broker link as {}", login.label());
                return None;
            }
        };
        let sets = self.link.shared_sets();
        self.link.close();
        self.link = link;
        self.metrics
            .broker_bootstrap
            .set(i64::from(login == Login::Bootstrap));
        self.login = login;
        // the new link connects from zero: a heartbeat goes out once it is up
        self.heartbeat_for = 0;
        self.failures_at_connect = 0;
        self.sync_bindings(&[], &sets).await;
        Some(deliveries)
    }

    /// The firewall the agent is working towards: the pending retry, else the applied one.
    fn current(&self) -> Option<(u64, &Firewall)> {
        match (&self.pending, &self.applied) {
            (Some(p), _) => Some((p.revision, &p.firewall)),
            (None, Some(a)) => Some((a.revision, &a.firewall)),
            (None, None) => None,
        }
    }

    /// Applies (enforce) or plans (observe) `firewall` as `revision` and answers.
    async fn apply_desired(&mut self, id: Uuid, revision: u64, firewall: Firewall) -> Response {
        if firewall.host != self.hostname {
            return Response::error(
                id,
                ErrorKind::Refused,
                format!(
                    "firewall.host is {:?} but this agent is {:?}",
                    firewall.host, self.hostname
                ),
            );
        }
        if self.cfg.mode == ConfigMode::Observe {
            return self.observe(id, revision, firewall).await;
        }
        match self.kernel_apply(&firewall).await {
            Ok(report) => {
                self.commit(revision, firewall, &report).await;
                ok_applied(id, revision, &report)
            }
            Err(e) if e.is_refusal() => {
                warn!(revision, error = %e, "refused the firewall; the previous one stays in force");
                Response::error(id, ErrorKind::Refused, e.to_string())
            }
            Err(e) => {
                warn!(revision, error = %e, "apply failed; the previous firewall stays in force; retrying with backoff");
                let message = e.to_string();
                self.schedule_retry(revision, firewall, None);
                Response::error(id, ErrorKind::ApplyFailed, message)
            }
        }
    }

    async fn observe(&mut self, id: Uuid, revision: u64, firewall: Firewall) -> Response {
        let k = self.kernel.clone();
        let fw = firewall.clone();
        match blocking(move || k.plan_firewall(&fw)).await {
            Ok(plan) => {
                let text = plan_summary(&plan);
                self.would_change = Some(plan.change_count());
                self.verified = Some(plan.live.clone());
                info!(revision, summary = %text, "observe mode: not applying");
                let old: Vec<String> = self
                    .applied
                    .as_ref()
                    .map(|a| a.firewall.sets.keys().cloned().collect())
                    .unwrap_or_default();
                let new: Vec<String> = firewall.sets.keys().cloned().collect();
                self.applied = Some(AppliedState { revision, firewall });
                self.opener.set_applied_revision(Some(revision));
                self.sync_bindings(&old, &new).await;
                let mut answer = text_ok(id, None, Some(plan.live), text);
                if let Outcome::Ok { would_change, .. } = &mut answer.result {
                    *would_change = self.would_change;
                }
                answer
            }
            Err(e) if e.is_refusal() => Response::error(id, ErrorKind::Refused, e.to_string()),
            Err(e) => Response::error(id, ErrorKind::Internal, e.to_string()),
        }
    }

    async fn kernel_apply(&mut self, fw: &Firewall) -> Result<ApplyReport, ApplyError> {
        let k = self.kernel.clone();
        let fw = fw.clone();
        let started = Instant::now();
        let r = blocking(move || k.apply_firewall(&fw)).await;
        self.metrics
            .apply_duration
            .observe(started.elapsed().as_secs_f64());
        let label = if r.is_ok() { "applied" } else { "failed" };
        self.metrics.applies.with_label_values(&[label]).inc();
        if r.as_ref().is_err_and(|e| !e.is_refusal()) {
            // rolled back, or not: the next report reads what the kernel holds
            self.verified = None;
        }
        r
    }

    /// Records a successful apply: state file, opener revision, bindings, gauges.
    async fn commit(&mut self, revision: u64, firewall: Firewall, report: &ApplyReport) {
        let old: Vec<String> = self
            .applied
            .as_ref()
            .map(|a| a.firewall.sets.keys().cloned().collect())
            .unwrap_or_default();
        let new: Vec<String> = firewall.sets.keys().cloned().collect();
        let state = AppliedState { revision, firewall };
        let store = self.store.clone();
        let to_save = state.clone();
        if let Err(e) = blocking(move || store.save(&to_save)).await {
            error!(error = %e, "cannot save the applied state; a restart will wait for the operator");
        }
        self.metrics.last_applied_revision.set(revision as i64);
        self.metrics
            .rules_installed
            .with_label_values(&["ipv4"])
            .set(state.firewall.ipv4.rule_count() as i64);
        self.metrics
            .rules_installed
            .with_label_values(&["ipv6"])
            .set(state.firewall.ipv6.rule_count() as i64);
        self.metrics
            .set_entries_installed
            .set(state.firewall.set_entries() as i64);
        self.opener.set_applied_revision(Some(revision));
        self.applied = Some(state);
        self.pending = None;
        self.verified = Some(report.hashes.clone());
        self.startup_verified = true;
        self.drift.drifted.clear();
        self.drift.since = None;
        info!(
            revision,
            total_ms = report.total_ms,
            changed = report.changed(),
            "firewall in force"
        );
        self.sync_bindings(&old, &new).await;
        release_freed_memory();
    }

    fn schedule_retry(&mut self, revision: u64, firewall: Firewall, backoff: Option<Backoff>) {
        let mut backoff = backoff.unwrap_or_default();
        let delay = backoff.next_delay();
        self.pending = Some(Pending {
            revision,
            firewall,
            backoff,
            next_try: tokio::time::Instant::now() + delay,
        });
    }

    async fn retry_pending(&mut self) {
        let Some(p) = self.pending.take() else { return };
        info!(
            revision = p.revision,
            attempt = p.backoff.attempts(),
            "retrying apply"
        );
        match self.kernel_apply(&p.firewall).await {
            Ok(report) => {
                info!(
                    revision = p.revision,
                    "retried apply succeeded; reporting in the next keepalive"
                );
                self.commit(p.revision, p.firewall, &report).await;
            }
            Err(e) if e.is_refusal() => {
                error!(revision = p.revision, error = %e, "retry refused; giving up on this revision");
            }
            Err(e) => {
                warn!(revision = p.revision, error = %e, "retry failed");
                self.schedule_retry(p.revision, p.firewall, Some(p.backoff));
            }
        }
    }

    async fn apply_deltas(
        &mut self,
        id: Uuid,
        base_revision: u64,
        revision: u64,
        deltas: Vec<SetDelta>,
    ) -> Response {
        let base = match &self.applied {
            Some(a) if a.revision == base_revision => a.firewall.clone(),
            other => {
                return Response::error(
                    id,
                    ErrorKind::BaseMismatch,
                    format!(
                        "deltas are against revision {base_revision}; this agent holds {}",
                        other
                            .as_ref()
                            .map(|a| a.revision.to_string())
                            .unwrap_or_else(|| "none".into())
                    ),
                )
            }
        };
        let mut next = base;
        for d in &deltas {
            let Some(set) = next.sets.get(&d.name) else {
                return Response::error(
                    id,
                    ErrorKind::Refused,
                    format!(
                        "deltas name set {:?}, which revision {base_revision} does not have",
                        d.name
                    ),
                );
            };
            let changed = crate::ipset::apply_delta(
                set,
                &crate::ipset::SetDelta {
                    name: d.name.clone(),
                    add: d.add.clone(),
                    del: d.remove.clone(),
                },
            );
            next.sets.insert(d.name.clone(), Arc::new(changed));
        }
        self.pending = None;
        self.apply_desired(id, revision, next).await
    }

    async fn shared_set(
        &mut self,
        id: Uuid,
        set: dog_protocol::ruleset::IpSet,
        version: u64,
    ) -> Response {
        let ignored = |why: String| {
            debug!(set = %set.name, version, %why, "shared set ignored");
            text_ok(id, None, None, format!("ignored: {why}"))
        };
        if let Some(held) = self.replay.set_versions.get(&set.name) {
            if version <= *held {
                return ignored(format!(
                    "version {version} of {} is not newer than {held}",
                    set.name
                ));
            }
        }
        let Some((revision, base)) = self.current() else {
            return ignored("no firewall yet".into());
        };
        if !base.sets.contains_key(&set.name) {
            return ignored(format!("set {} is not used by this host", set.name));
        }
        let mut next = base.clone();
        self.replay.set_versions.insert(set.name.clone(), version);
        info!(set = %set.name, version, members = set.members.len(), "shared set update");
        let name = set.name.clone();
        // Packed and hashed once; the other sets stay shared with the applied firewall.
        next.sets.insert(name, Arc::new(SetContent::from(set)));
        self.pending = None;
        self.apply_desired(id, revision, next).await
    }

    async fn status(&mut self, id: Uuid) -> Response {
        let text = format!(
            "mode={:?} applied_revision={:?} pending_retry={:?} drifted={:?} repairs={} backend={:?}",
            self.cfg.mode,
            self.applied_revision(),
            self.pending.as_ref().map(|p| p.revision),
            self.drift.drifted,
            self.drift.repairs,
            self.kernel.backend(),
        );
        text_ok(id, self.applied_revision(), self.live_hashes().await, text)
    }

    async fn dump(&mut self, id: Uuid) -> Response {
        let k = self.kernel.clone();
        let r = blocking(move || -> Result<(LiveState, String), KernelError> {
            let live = k.snapshot()?;
            let names: Vec<String> = k
                .ipset_names()?
                .into_iter()
                .filter(|n| n.starts_with(SET_PREFIX))
                .collect();
            let sets = k.ipset_save(&names)?;
            Ok((live, sets))
        })
        .await;
        match r {
            Ok((live, ipset_save)) => {
                let mut d = Detail::Dump {
                    ipv4_save: live.rules_v4.clone(),
                    ipv6_save: live.rules_v6.clone(),
                    ipset_save,
                };
                if let Detail::Dump {
                    ipv4_save,
                    ipv6_save,
                    ipset_save,
                } = &mut d
                {
                    for t in [ipv4_save, ipv6_save, ipset_save] {
                        dog_protocol::messages::truncate_utf8(t, limits::DOCUMENT_TEXT);
                    }
                }
                Response {
                    request_id: id,
                    result: Outcome::Ok {
                        applied_revision: self.applied_revision(),
                        hashes: Some(live.hashes()),
                        timings_ms: BTreeMap::new(),
                        detail: Some(d),
                        would_change: None,
                    },
                }
            }
            Err(e) => Response::error(id, ErrorKind::Internal, e.to_string()),
        }
    }

    async fn reapply(&mut self, id: Uuid) -> Response {
        if self.applied.is_none() {
            return Response::error(id, ErrorKind::Refused, "no firewall has been applied yet");
        }
        let clean = self.drift_check().await;
        let text = match clean {
            Some(true) => "in sync".to_string(),
            Some(false) => format!("drift in {:?} could not be repaired", self.drift.drifted),
            None => "could not read the kernel".to_string(),
        };
        text_ok(id, self.applied_revision(), self.live_hashes().await, text)
    }

    // --------------------------------------------------------------------------------------
    // drift
    // --------------------------------------------------------------------------------------

    /// Verifies the kernel against the applied firewall and (enforce) repairs it. Returns
    /// whether the kernel now matches (`None`: it could not be read or nothing is applied).
    async fn drift_check(&mut self) -> Option<bool> {
        let applied = self.applied.clone()?;
        if self.cfg.mode == ConfigMode::Observe {
            return self.observe_check(&applied.firewall).await;
        }
        let k = self.kernel.clone();
        let fw = applied.firewall.clone();
        let report = match blocking(move || k.verify_firewall(&fw)).await {
            Ok(r) => r,
            Err(e) => {
                self.metrics
                    .drift_checks
                    .with_label_values(&["error"])
                    .inc();
                warn!(error = %e, "drift check cannot read the kernel");
                return None;
            }
        };
        self.verified = Some(report.live.clone());
        if report.is_clean() {
            self.metrics
                .drift_checks
                .with_label_values(&["clean"])
                .inc();
            self.drift.drifted.clear();
            self.drift.since = None;
            return Some(true);
        }
        self.metrics
            .drift_checks
            .with_label_values(&["drift"])
            .inc();
        let parts = drift_parts(&report);
        let now = unix_now();
        let observe = self.cfg.mode == ConfigMode::Observe;
        if observe && parts == self.drift.drifted {
            return Some(false);
        }
        warn!(
            revision = applied.revision,
            differences = %report.lines().join("; "),
            "drift: dog's chains or sets differ from the applied firewall"
        );
        let repaired = if observe {
            false
        } else {
            match self.kernel_apply_repair(&applied.firewall).await {
                Ok(r) => {
                    self.verified = Some(r.hashes);
                    self.metrics.drift_repairs.inc();
                    self.drift.repairs += 1;
                    info!(revision = applied.revision, parts = %parts.join(", "), "drift repaired");
                    true
                }
                Err(e) => {
                    error!(revision = applied.revision, error = %e, "drift repair failed");
                    self.verified = None;
                    false
                }
            }
        };
        for ev in drift_events(&report, &parts, repaired, now) {
            if self.drift_events.len() >= limits::DRIFT_ITEMS {
                self.drift_events.pop_front();
            }
            self.drift_events.push_back(ev);
        }
        if repaired {
            self.drift.drifted.clear();
            self.drift.since = None;
        } else {
            self.drift.since.get_or_insert(now);
            self.drift.drifted = parts;
        }
        Some(repaired)
    }

    /// Observe mode's drift check: nothing was applied, so nothing drifted; the kernel is
    /// planned against the desired firewall again and the count of changes is kept for the
    /// keepalives. Returns whether the kernel already matches.
    async fn observe_check(&mut self, firewall: &Firewall) -> Option<bool> {
        let k = self.kernel.clone();
        let fw = firewall.clone();
        match blocking(move || k.plan_firewall(&fw)).await {
            Ok(plan) => {
                let n = plan.change_count();
                self.verified = Some(plan.live.clone());
                if self.would_change != Some(n) {
                    info!(would_change = n, summary = %plan_summary(&plan), "observe mode: the kernel changed");
                }
                self.would_change = Some(n);
                Some(n == 0)
            }
            Err(e) => {
                warn!(error = %e, "observe mode: cannot read the kernel");
                None
            }
        }
    }

    async fn kernel_apply_repair(&self, fw: &Firewall) -> Result<ApplyReport, ApplyError> {
        let k = self.kernel.clone();
        let fw = fw.clone();
        blocking(move || k.repair_firewall(&fw)).await
    }
}

/// Runs a blocking kernel call on the blocking pool; a panic there is re-raised here.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    let span = tracing::Span::current();
    match tokio::task::spawn_blocking(move || span.in_scope(f)).await {
        Ok(v) => v,
        Err(e) => std::panic::resume_unwind(e.into_panic()),
    }
}

/// Limits glibc to one malloc arena. By default every thread that allocates gets its own arena
/// (up to 8 per core), and memory freed in those arenas after a large apply (a parsed
/// 1,000,000-entry set, the read-back's sort buffer) stays resident even after `malloc_trim`
/// (measured: 36–43 MiB at rest after such an apply, 22 MiB with one arena). The agent does
/// one thing at a time, so the arenas bought no parallelism. Call before starting threads.
pub fn limit_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets an allocator parameter; called before other threads exist.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

/// Hands memory freed by a large apply (the parsed message, the read-back, the sort buffers)
/// back to the kernel: glibc keeps freed heap in its arenas otherwise, and the agent's
/// resident size would stay at its peak.
fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks glibc's own arenas; it has no preconditions.
    unsafe {
        libc::malloc_trim(0);
    }
}

async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

fn spawn_watchdog(last_turn: Arc<AtomicU64>, health: Health) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut t = tokio::time::interval(Duration::from_secs(5));
        loop {
            t.tick().await;
            let idle = unix_ms().saturating_sub(last_turn.load(Ordering::Relaxed));
            if idle > STUCK_AFTER.as_millis() as u64 {
                health.set_unhealthy(Some(format!(
                    "the main loop has not turned for {} s",
                    idle / 1000
                )));
            } else {
                health.set_unhealthy(None);
            }
        }
    })
}

/// A successful answer carrying a text detail (observe plans, status, ignored updates).
/// The state directory holds the agent's private keys, its applied state and its replay state:
/// whoever else can write it can swap any of them. Refused unless it is the agent's own and
/// writable by nobody else.
fn check_state_dir(dir: &std::path::Path) -> anyhow::Result<()> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let md =
        std::fs::metadata(dir).with_context(|| format!("state directory {}", dir.display()))?;
    let mode = md.permissions().mode() & 0o7777;
    if mode & 0o022 != 0 {
        anyhow::bail!(
            "state directory {} is writable by its group or others (mode {mode:o}); `chmod go-w` it: another user could replace the agent's keys or state",
            dir.display()
        );
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    if md.uid() != me {
        anyhow::bail!(
            "state directory {} is owned by uid {} but the agent runs as uid {me}",
            dir.display(),
            md.uid()
        );
    }
    Ok(())
}

fn text_ok(
    id: Uuid,
    applied_revision: Option<u64>,
    hashes: Option<FirewallHashes>,
    text: String,
) -> Response {
    Response {
        request_id: id,
        result: Outcome::Ok {
            applied_revision,
            hashes,
            timings_ms: BTreeMap::new(),
            detail: Some(Detail::Text { text }),
            would_change: None,
        },
    }
}

fn ok_applied(id: Uuid, revision: u64, report: &ApplyReport) -> Response {
    let mut timings_ms: BTreeMap<String, u64> = BTreeMap::new();
    for s in &report.steps {
        if timings_ms.len() + 1 >= limits::TIMINGS {
            break;
        }
        *timings_ms.entry(s.step.clone()).or_default() += s.ms.round() as u64;
    }
    timings_ms.insert("total".into(), report.total_ms.round() as u64);
    Response {
        request_id: id,
        result: Outcome::Ok {
            applied_revision: Some(revision),
            hashes: Some(report.hashes.clone()),
            timings_ms,
            detail: None,
            would_change: None,
        },
    }
}

// ------------------------------------------------------------------------------------------
// pure helpers
// ------------------------------------------------------------------------------------------

/// Reads the operator's public keys: one key per line, either `base64` or `key-id base64`
/// (what `dog-operator keygen` prints; the key id must then match). Blank lines and `#`
/// comments are ignored. Errors name the file and line.
pub fn load_operator_keys(path: &Path) -> anyhow::Result<TrustedKeys> {
    let text = std::fs::read_to_string(path).with_context(|| {
        format!(
            "cannot read the operator public keys file {} (--operator-public-keys)",
            path.display()
        )
    })?;
    parse_operator_keys(&text, &path.display().to_string())
}

/// See [`load_operator_keys`].
pub fn parse_operator_keys(text: &str, what: &str) -> anyhow::Result<TrustedKeys> {
    let mut only_keys = String::new();
    for (i, line) in text.lines().enumerate() {
        let t = line.trim();
        if t.is_empty() || t.starts_with('#') {
            only_keys.push('\n');
            continue;
        }
        let words: Vec<&str> = t.split_whitespace().collect();
        let (id, key) = match words.as_slice() {
            [key] => (None, *key),
            [id, key] => (Some(*id), *key),
            _ => anyhow::bail!(
                "{what} line {}: expected `base64` or `key-id base64`",
                i + 1
            ),
        };
        let k = SigningPublicKey::from_base64(key, &format!("{what} line {}", i + 1))?;
        if let Some(id) = id {
            if id != k.fingerprint() {
                anyhow::bail!(
                    "{what} line {}: key id {id} does not match the key (its id is {})",
                    i + 1,
                    k.fingerprint()
                );
            }
        }
        only_keys.push_str(key);
        only_keys.push('\n');
    }
    let keys = TrustedKeys::parse(&only_keys, what)?;
    if keys.is_empty() {
        anyhow::bail!("{what}: no operator public key in the file");
    }
    Ok(keys)
}

/// The heartbeat's interfaces (within the message limits).
pub fn to_protocol_interfaces(ifs: &[crate::addresses::Interface]) -> Vec<Interface> {
    ifs.iter()
        .take(limits::INTERFACES)
        .map(|i| {
            let mut name = i.name.clone();
            dog_protocol::messages::truncate_utf8(&mut name, limits::INTERFACE_NAME);
            Interface {
                name,
                addresses: i
                    .addresses
                    .iter()
                    .take(limits::ADDRESSES_PER_INTERFACE)
                    .map(|a| a.net)
                    .collect(),
            }
        })
        .collect()
}

/// Drifted parts of a report: `ipv4_rules`, `ipv6_rules`, `set:<name>`.
pub fn drift_parts(r: &DriftReport) -> Vec<String> {
    let mut parts = Vec::new();
    if r.expected.ipv4_rules != r.live.ipv4_rules
        || !r.ipv4.chains.is_empty()
        || !r.ipv4.jumps.is_empty()
    {
        parts.push("ipv4_rules".to_string());
    }
    if r.expected.ipv6_rules != r.live.ipv6_rules
        || !r.ipv6.chains.is_empty()
        || !r.ipv6.jumps.is_empty()
    {
        parts.push("ipv6_rules".to_string());
    }
    for s in &r.sets {
        parts.push(format!("set:{}", s.name));
    }
    if parts.is_empty() && r.expected.sets != r.live.sets {
        parts.push("sets".into());
    }
    parts.truncate(limits::DRIFT_ITEMS);
    parts
}

/// One event per drifted part, with the expected and found hashes of that part's kind.
pub fn drift_events(r: &DriftReport, parts: &[String], repaired: bool, at: u64) -> Vec<DriftEvent> {
    parts
        .iter()
        .map(|p| {
            let (expected_hash, found_hash) = match p.as_str() {
                "ipv4_rules" => (r.expected.ipv4_rules.clone(), r.live.ipv4_rules.clone()),
                "ipv6_rules" => (r.expected.ipv6_rules.clone(), r.live.ipv6_rules.clone()),
                _ => (r.expected.sets.clone(), r.live.sets.clone()),
            };
            let mut part = p.clone();
            dog_protocol::messages::truncate_utf8(&mut part, limits::SHORT_TEXT);
            DriftEvent {
                at,
                part,
                expected_hash,
                found_hash,
                repaired,
            }
        })
        .collect()
}

/// Observe mode's answer: what an apply would change.
pub fn plan_summary(plan: &Plan) -> String {
    if !plan.changes_anything() {
        return "observe mode: nothing would change".into();
    }
    let mut out = vec!["observe mode: would change".to_string()];
    let s = &plan.sets;
    for (what, names) in [
        ("create sets", &s.create),
        ("replace sets", &s.swap),
        ("destroy sets", &s.destroy),
    ] {
        if !names.is_empty() {
            out.push(format!("{what} {}", names.join(", ")));
        }
    }
    if !s.delta.is_empty() {
        let d: Vec<String> = s
            .delta
            .iter()
            .map(|d| format!("{} (+{} -{})", d.name, d.add.len(), d.del.len()))
            .collect();
        out.push(format!("change sets {}", d.join(", ")));
    }
    for (fam, r) in [("IPv4", &plan.ipv4), ("IPv6", &plan.ipv6)] {
        if let Some(text) = &r.restore {
            let lines = text.lines().filter(|l| l.starts_with("-A ")).count();
            out.push(format!("restore {fam} rules ({lines} rule lines)"));
        }
    }
    let mut text = out.join("; ");
    dog_protocol::messages::truncate_utf8(&mut text, limits::MESSAGE_TEXT);
    text
}

fn request_kind_name(k: &RequestKind) -> &'static str {
    match k {
        RequestKind::Apply { .. } => "apply",
        RequestKind::ApplySetDeltas { .. } => "apply_set_deltas",
        RequestKind::SharedSet { .. } => "shared_set",
        RequestKind::Status => "status",
        RequestKind::DumpRules => "dump_rules",
        RequestKind::Reapply => "reapply",
        RequestKind::BrokerUser { .. } => "broker_user",
        RequestKind::Unknown => "unknown",
    }
}

fn error_kind_name(k: ErrorKind) -> &'static str {
    match k {
        ErrorKind::ApplyFailed => "apply_failed",
        ErrorKind::Refused => "refused",
        ErrorKind::StaleRevision => "stale_revision",
        ErrorKind::BaseMismatch => "base_mismatch",
        ErrorKind::UnknownRequest => "unknown_request",
        ErrorKind::Malformed => "malformed",
        ErrorKind::Internal => "internal",
        ErrorKind::Other => "other",
    }
}

/// Answers by digest of the delivery body, bounded (oldest forgotten first). A redelivered
/// request finds its answer here: acknowledged without a second response when the first was
/// confirmed, otherwise the same response is sent again.
pub struct AnswerCache {
    cap: usize,
    order: VecDeque<String>,
    map: HashMap<String, (Response, bool)>,
}

impl AnswerCache {
    pub fn new(cap: usize) -> Self {
        AnswerCache {
            cap: cap.max(1),
            order: VecDeque::new(),
            map: HashMap::new(),
        }
    }
    /// The response and whether it was published.
    pub fn get(&self, digest: &str) -> Option<(&Response, bool)> {
        self.map.get(digest).map(|(r, p)| (r, *p))
    }
    pub fn insert(&mut self, digest: String, response: Response) {
        if self.map.contains_key(&digest) {
            return;
        }
        while self.order.len() >= self.cap {
            if let Some(old) = self.order.pop_front() {
                self.map.remove(&old);
            }
        }
        self.order.push_back(digest.clone());
        self.map.insert(digest, (response, false));
    }
    pub fn mark_published(&mut self, digest: &str) {
        if let Some(e) = self.map.get_mut(digest) {
            e.1 = true;
        }
    }
    pub fn len(&self) -> usize {
        self.map.len()
    }
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

/// Logs each rejection reason at most once per [`REJECTION_LOG_EVERY`], with how many were
/// suppressed since. Never logs message content.
#[derive(Default)]
pub struct RejectionLog {
    last: HashMap<&'static str, (Instant, u64)>,
}

impl RejectionLog {
    /// Returns whether this one was logged.
    pub fn note(
        &mut self,
        rej: Rejection,
        message_id: Option<&str>,
        bytes: usize,
        now: Instant,
    ) -> bool {
        let reason = rej.reason();
        if let Some((at, suppressed)) = self.last.get_mut(reason) {
            if now.duration_since(*at) < REJECTION_LOG_EVERY {
                *suppressed += 1;
                return false;
            }
        }
        let suppressed = self.last.get(reason).map_or(0, |e| e.1);
        warn!(
            reason,
            detail = %rej,
            message_id = message_id.unwrap_or("-"),
            bytes,
            suppressed_since_last_log = suppressed,
            "rejected a message before parsing it"
        );
        self.last.insert(reason, (now, 0));
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dog_protocol::keys::SigningKey;

    #[test]
    fn operator_keys_accept_both_line_forms_and_name_the_file() {
        let (k, _) = SigningKey::generate().unwrap();
        let p = k.public();
        let text = format!(
            "# operator\n{} {}\n\n{}\n",
            p.fingerprint(),
            p.to_base64(),
            p.to_base64()
        );
        let keys = parse_operator_keys(&text, "/etc/dog/operator.pub").unwrap();
        assert!(keys.contains(&p));
        let bad = format!("0000 {}\n", p.to_base64());
        let e = parse_operator_keys(&bad, "/x/op.pub")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("/x/op.pub line 1") && e.contains("does not match"),
            "{e}"
        );
        let e = parse_operator_keys("# nothing\n", "/x/op.pub")
            .unwrap_err()
            .to_string();
        assert!(e.contains("no operator public key"), "{e}");
        let e = parse_operator_keys("notbase64!!\n", "/x/op.pub")
            .unwrap_err()
            .to_string();
        assert!(e.contains("/x/op.pub line 1"), "{e}");
        let e = load_operator_keys(Path::new("/nonexistent/op.pub"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("/nonexistent/op.pub"), "{e}");
    }

    #[test]
    fn answer_cache_is_bounded_and_tracks_publication() {
        let mut c = AnswerCache::new(2);
        let r = |n: u128| Response::error(Uuid::from_u128(n), ErrorKind::Internal, "x");
        c.insert("a".into(), r(1));
        c.insert("b".into(), r(2));
        assert_eq!(c.get("a").map(|(_, p)| p), Some(false));
        c.mark_published("a");
        assert_eq!(c.get("a").map(|(_, p)| p), Some(true));
        c.insert("c".into(), r(3));
        assert!(c.get("a").is_none());
        assert_eq!(c.get("c").unwrap().0.request_id, Uuid::from_u128(3));
        assert_eq!(c.len(), 2);
    }

    #[test]
    fn rejections_are_logged_once_per_reason_per_minute() {
        let mut l = RejectionLog::default();
        let t0 = Instant::now();
        assert!(l.note(Rejection::Replayed, None, 10, t0));
        assert!(!l.note(Rejection::Replayed, None, 10, t0 + Duration::from_secs(1)));
        assert!(l.note(
            Rejection::BadSignature,
            None,
            10,
            t0 + Duration::from_secs(1)
        ));
        assert!(!l.note(Rejection::Replayed, None, 10, t0 + Duration::from_secs(59)));
        assert!(l.note(Rejection::Replayed, None, 10, t0 + Duration::from_secs(61)));
    }

    #[test]
    fn drift_parts_and_events_name_the_parts_with_hashes() {
        let h = |a: &str, b: &str, c: &str| FirewallHashes {
            ipv4_rules: a.into(),
            ipv6_rules: b.into(),
            sets: c.into(),
        };
        let r = DriftReport {
            expected: h("e4", "e6", "es"),
            live: h("l4", "e6", "ls"),
            ipv4: Default::default(),
            ipv6: Default::default(),
            sets: vec![crate::drift::SetDrift {
                name: "dogz4-web".into(),
                missing_set: false,
                extra_set: false,
                missing_members: vec!["10.0.0.1/32".parse().unwrap()],
                extra_members: vec![],
            }],
        };
        let parts = drift_parts(&r);
        assert_eq!(parts, vec!["ipv4_rules", "set:dogz4-web"]);
        let ev = drift_events(&r, &parts, true, 42);
        assert_eq!(ev[0].expected_hash, "e4");
        assert_eq!(ev[0].found_hash, "l4");
        assert_eq!(ev[1].part, "set:dogz4-web");
        assert_eq!(
            (ev[1].expected_hash.as_str(), ev[1].found_hash.as_str()),
            ("es", "ls")
        );
        assert!(ev.iter().all(|e| e.repaired && e.at == 42));
    }

    #[test]
    fn plan_summary_says_what_would_change() {
        assert_eq!(
            plan_summary(&Plan::default()),
            "observe mode: nothing would change"
        );
        let mut p = Plan::default();
        p.sets.create.push("dogz4-web".into());
        p.ipv4.restore = Some("*filter\n-A DOG-INPUT -j DROP\nCOMMIT\n".into());
        let s = plan_summary(&p);
        assert!(s.contains("create sets dogz4-web"), "{s}");
        assert!(s.contains("restore IPv4 rules (1 rule lines)"), "{s}");
    }
}
