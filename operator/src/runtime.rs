//! The operator's reconcile loop: the thin shell that connects the pure pieces.
//!
//! ```text
//! snapshot changes ─▶ compile ─▶ publish::plan ─▶ seal ─▶ broker (confirmed)
//! agent messages   ─▶ open ─▶ fleet view (pins, hashes, lifecycle) ─▶ report ─▶ status sink
//! 1 s tick         ─▶ lifecycle::evaluate, resync of hosts whose hashes stay wrong
//! ```
//!
//! The same loop runs against the Kubernetes API (`cluster.rs`) and against a directory of
//! YAML files (`local.rs`); only the snapshot source, the status sink, the event sink and the
//! registrar of agent-only hosts differ.

use crate::admission::{Admission, Admitted, Evidence, Refusal};
use crate::broker_users::BrokerUsers;
use crate::compile::{Compiled, Compiler, HostOutcome, Snapshot};
use crate::config::RunArgs;
use crate::crd::{AgentKeys, Host, HostSpec, HostState, HostStatus, Interface};
use crate::events::{DogEvent, EventSink};
use crate::identity::IdentityVerifier;
use crate::intake::Intake;
use crate::lifecycle::{self, Evaluation, HostClock, LifecycleConfig, SafetyValve, ValveChange};
use crate::metrics::OperatorMetrics;
use crate::publish::{self, Publish, PublishState};
use crate::report::{self, HostView};
use crate::status::StatusSink;
use dog_protocol::broker::{Deliveries, Delivery, MessageMeta, OperatorLink};
use dog_protocol::envelope::{Opened, Opener, Sealer};
use dog_protocol::keys::pinning::{Pin, Pins};
use dog_protocol::keys::{EncryptionPublicKey, SigningPublicKey};
use dog_protocol::messages::{
    AgentMessage, Heartbeat, Keepalive, Outcome, Request, RequestKind, Response,
};
use dog_protocol::ruleset::FirewallHashes;
use dog_protocol::telemetry::Health;
use futures::future::BoxFuture;
use futures::StreamExt;
use k8s_openapi::jiff::Timestamp;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::watch;
use tracing::{debug, info, warn};
use uuid::Uuid;

/// How long a request stays valid on the broker (an agent that comes back later gets its full
/// state again after its heartbeat).
const REQUEST_TTL_SECS: u64 = 600;
/// Publishes in flight at once (confirms are awaited concurrently).
const PUBLISH_CONCURRENCY: usize = 64;
/// Longest wait for the API server's review of an identity token.
const VERIFY_TIMEOUT: Duration = Duration::from_secs(5);
/// How often the inbox depth is read.
const INBOX_EVERY: Duration = Duration::from_secs(5);
/// More agent messages than this waiting in the inbox make `/readyz` fail (the operator is
/// not keeping up; a tenth of the inbox bound).
const BACKLOG_NOT_READY: u32 = 10_000;
/// Refused heartbeats kept per declared host (distinct keys).
const REFUSED_KEPT: usize = 4;
/// A declared host whose agent's identity token was refused has it reviewed again after
/// 5 s, 10 s, … up to 5 min between reviews, at most this many times (about 25 minutes),
/// then only when the agent sends a new heartbeat: the refusal may have been the API
/// server's (unreachable, a permission not rolled out yet), not the token's.
const REVIEW_RETRIES: u32 = 10;
const REVIEW_BACKOFF: dog_protocol::broker::Backoff = dog_protocol::broker::Backoff {
    initial: Duration::from_secs(5),
    max: Duration::from_secs(300),
};
/// Statuses are written at most this often: a burst of agent responses must not turn into a
/// status pass (over every host) per response.
const STATUS_EVERY: Duration = Duration::from_millis(250);

/// Creates the Host object for an agent that registered itself (a VM, not a Kubernetes Node),
/// and deletes a Host retired for longer than the retention.
pub trait Registrar: Send + Sync {
    fn register<'a>(
        &'a self,
        name: &'a str,
        keys: &'a AgentKeys,
        interfaces: &'a [Interface],
    ) -> BoxFuture<'a, Result<(), String>>;
    /// Deletes the Host (gone already counts as done).
    fn collect<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<(), String>>;
    /// Whether this mode deletes Hosts at all (`--from-dir` mode does not: its Hosts are
    /// files an administrator owns).
    fn collects(&self) -> bool {
        true
    }
}

/// Where the loop reads the resources from.
pub struct Source {
    /// Bumped (coalesced) whenever the resources changed.
    pub changes: watch::Receiver<u64>,
    /// The current resources.
    pub snapshot: Box<dyn Fn() -> Snapshot + Send + Sync>,
}

/// What the operator knows of one host at run time.
#[derive(Clone, Debug, Default)]
struct HostRt {
    view: HostView,
    encryption_key: Option<EncryptionPublicKey>,
    last_seen: Option<Timestamp>,
    mismatch_since: Option<Instant>,
    /// The host mirrors a Kubernetes Node that no longer exists: it stays Retired, however
    /// lively its agent is, until the Node comes back.
    node_gone: bool,
    /// The last heartbeats refused for want of a pin (declared hosts only), one per key,
    /// newest last, at most [`REFUSED_KEPT`]: an impostor's must not push out the real one.
    refused_heartbeats: Vec<(Opened, Heartbeat)>,
    /// When the newest refused heartbeat's identity token is reviewed again, and how many
    /// reviews were refused so far (see [`REVIEW_RETRIES`]).
    review_retry: Option<(Instant, u32)>,
}

impl HostRt {
    /// Whether the operator can (and should) send to this host: its encryption key is
    /// known, it is not retired, and its keys are not in conflict.
    fn reachable(&self) -> bool {
        self.encryption_key.is_some()
            && self.view.state != HostState::Retired
            && self.view.key_conflict.is_none()
    }
}

pub struct Runtime {
    args: RunArgs,
    compiler: Compiler,
    publish: PublishState,
    fleet: BTreeMap<String, HostRt>,
    /// Hosts that registered through a heartbeat and are not (yet) in the source.
    registered: BTreeMap<String, Host>,
    /// Outstanding requests: id → (host, revision).
    pending: HashMap<Uuid, (String, Option<u64>)>,
    sealer: Sealer,
    opener: Opener,
    link: OperatorLink,
    deliveries: Deliveries,
    source: Source,
    status: Arc<dyn StatusSink>,
    events: Arc<dyn EventSink>,
    registrar: Arc<dyn Registrar>,
    admission: Admission,
    intake: Intake,
    verifier: Option<Arc<dyn IdentityVerifier>>,
    /// The broker's management API, to give admitted hosts their own broker users.
    broker_users: Option<Arc<dyn BrokerUsers>>,
    /// Node users sent and not yet answered (request ids).
    broker_user_requests: HashSet<Uuid>,
    /// `spec.keys` of Hosts as last turned into pins.
    admin_pins: BTreeMap<String, AgentKeys>,
    /// Set when `admin_pins` changed: refused heartbeats may now be taken.
    admin_pins_changed: bool,
    /// Started with the runtime: the monotonic clock of the admission rate limit.
    started: Instant,
    /// Agent messages waiting in the inbox when last read, and when that was.
    inbox_backlog: u32,
    inbox_checked: Option<Instant>,
    metrics: OperatorMetrics,
    health: Health,
    lifecycle: LifecycleConfig,
    valve: SafetyValve,
    last_heard_any: Option<Timestamp>,
    /// Rejection reasons already logged in the current minute (logged once, counted always).
    logged_rejections: HashMap<&'static str, Instant>,
    /// Conditions last written per object (`Kind/name`), so transition times survive passes
    /// even where the source does not hand status back (local mode).
    last_conditions: HashMap<String, Vec<crate::crd::Condition>>,
    needs_compile: bool,
    needs_publish: bool,
    needs_status: bool,
    last_status: Option<Instant>,
}

pub struct Parts {
    pub args: RunArgs,
    /// The authority on agent identity tokens (Kubernetes mode), if any.
    pub verifier: Option<Arc<dyn IdentityVerifier>>,
    /// The broker's management API (`--broker-management-url`), if any.
    pub broker_users: Option<Arc<dyn BrokerUsers>>,
    pub sealer: Sealer,
    pub link: OperatorLink,
    pub deliveries: Deliveries,
    pub source: Source,
    pub status: Arc<dyn StatusSink>,
    pub events: Arc<dyn EventSink>,
    pub registrar: Arc<dyn Registrar>,
    pub metrics: OperatorMetrics,
    pub health: Health,
    /// Host statuses as last written (by this or a previous operator): pins, revisions and
    /// reported hashes, so a restart or a takeover sends nothing when nothing changed.
    pub seed: BTreeMap<String, HostStatus>,
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn to_crd_interfaces(ifs: &[dog_protocol::messages::Interface]) -> Vec<Interface> {
    ifs.iter()
        .map(|i| Interface {
            name: i.name.clone(),
            addresses: i.addresses.iter().map(|a| a.addr().to_string()).collect(),
        })
        .collect()
}

fn crd_hashes_to_wire(h: &crate::crd::FirewallHashes) -> FirewallHashes {
    FirewallHashes {
        ipv4_rules: h.ipv4_rules.clone(),
        ipv6_rules: h.ipv6_rules.clone(),
        sets: h.sets.clone(),
    }
}

impl Runtime {
    pub fn new(parts: Parts) -> Self {
        let Parts {
            args,
            verifier,
            broker_users,
            sealer,
            link,
            deliveries,
            source,
            status,
            events,
            registrar,
            metrics,
            health,
            seed,
        } = parts;
        let mut pins = Pins::new(true);
        let mut fleet = BTreeMap::new();
        for (name, st) in seed {
            let mut rt = HostRt::default();
            if let Some(keys) = &st.pinned_keys {
                match (
                    SigningPublicKey::from_base64(&keys.signing, "status.pinnedKeys.signing"),
                    EncryptionPublicKey::from_base64(
                        &keys.encryption,
                        "status.pinnedKeys.encryption",
                    ),
                ) {
                    (Ok(s), Ok(e)) => {
                        pins.set(
                            name.clone(),
                            Pin {
                                signing: s.fingerprint(),
                                encryption: Some(e.fingerprint()),
                            },
                        );
                        rt.encryption_key = Some(e);
                    }
                    _ => warn!(host = %name, "ignoring unreadable pinned keys in Host status"),
                }
            }
            rt.last_seen = lifecycle::latest_keepalive(
                lifecycle::parse_keepalive(st.last_keepalive.as_deref()),
                args.liveness_write_interval,
                Timestamp::now(),
            );
            rt.view = HostView {
                state: st.state,
                last_keepalive: st.last_keepalive.clone(),
                agent_version: st.agent_version.clone(),
                interfaces: st.interfaces.clone(),
                pinned_keys: st.pinned_keys.clone(),
                key_fingerprint: st.key_fingerprint.clone(),
                desired_revision: st.desired_revision,
                applied_revision: st.applied_revision,
                reported: st.reported_hashes.as_ref().map(crd_hashes_to_wire),
                ..Default::default()
            };
            fleet.insert(name, rt);
        }
        let lifecycle = LifecycleConfig {
            keepalive_interval: args.keepalive_interval,
            inactive_after: args.inactive_after(),
            retired_after: args.retire_after,
            freeze_after: args.keepalive_interval * args.safety_valve_intervals.max(1),
        };
        let compiler = Compiler::new(args.compile_options());
        let opener = Opener::for_operator(args.operator_name.clone(), pins);
        Runtime {
            compiler,
            publish: PublishState::default(),
            fleet,
            registered: BTreeMap::new(),
            pending: HashMap::new(),
            sealer,
            opener,
            link,
            deliveries,
            source,
            status,
            events,
            registrar,
            admission: Admission::new(args.admission.policy()),
            intake: Intake::new(args.admission.intake()),
            verifier,
            broker_users,
            broker_user_requests: HashSet::new(),
            admin_pins: BTreeMap::new(),
            admin_pins_changed: false,
            started: Instant::now(),
            inbox_backlog: 0,
            inbox_checked: None,
            metrics,
            health,
            lifecycle,
            valve: SafetyValve::default(),
            last_heard_any: None,
            logged_rejections: HashMap::new(),
            last_conditions: HashMap::new(),
            needs_compile: true,
            needs_publish: false,
            needs_status: true,
            last_status: None,
            args,
        }
    }

    /// Runs until `shutdown` resolves. Rules stay in force on every host whatever happens here.
    /// Hands back the arguments and the signing key, for a next leadership term.
    pub async fn run(
        mut self,
        shutdown: impl std::future::Future<Output = ()>,
    ) -> (RunArgs, Sealer) {
        tokio::pin!(shutdown);
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut status_tick = tokio::time::interval(STATUS_EVERY);
        status_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Compile, then record the hosts that already run exactly that (from their last
        // reports), and only then publish: a restart or a takeover sends nothing to them.
        self.compile_if_needed();
        self.seed_publish_state();
        self.reconcile().await;
        self.report_broker();
        loop {
            tokio::select! {
                _ = &mut shutdown => break,
                changed = self.source.changes.changed() => {
                    if changed.is_err() {
                        warn!("resource source stopped; shutting down");
                        break;
                    }
                    self.needs_compile = true;
                }
                delivery = self.deliveries.recv() => {
                    match delivery {
                        Some(d) => self.on_delivery(d).await,
                        None => {
                            warn!("broker consumer ended; shutting down");
                            break;
                        }
                    }
                    // drain what is already waiting before reconciling once for all of it
                    while let Ok(Some(d)) = tokio::time::timeout(Duration::ZERO, self.deliveries.recv()).await {
                        self.on_delivery(d).await;
                    }
                }
                _ = tick.tick() => {
                    self.on_tick();
                    self.check_inbox().await;
                    self.retry_token_reviews().await;
                    self.collect_retired().await;
                }
                _ = status_tick.tick(), if self.needs_status => {}
            }
            self.reconcile().await;
        }
        info!("operator loop stopped; agents keep enforcing their last applied rules");
        (self.args, self.sealer)
    }

    // ----------------------------------------------------------------------------------
    // compile, publish, status
    // ----------------------------------------------------------------------------------

    /// Keys an administrator pinned in `spec.keys` are the host's pin, whatever an agent
    /// sent before: a changed `spec.keys` re-pins (and clears a key conflict).
    fn sync_admin_pins(&mut self, snap: &Snapshot) {
        for (name, host) in &snap.hosts {
            let Some(keys) = &host.spec.keys else {
                continue;
            };
            if self.admin_pins.get(name) == Some(keys) {
                continue;
            }
            let parsed = (
                SigningPublicKey::from_base64(&keys.signing, "spec.keys.signing"),
                EncryptionPublicKey::from_base64(&keys.encryption, "spec.keys.encryption"),
            );
            let (s, e) = match parsed {
                (Ok(s), Ok(e)) => (s, e),
                (Err(err), _) | (_, Err(err)) => {
                    warn!(host = %name, error = %err, "ignoring unreadable keys in Host spec");
                    continue;
                }
            };
            if let dog_protocol::envelope::Trust::Agents(pins) = self.opener.trust_mut() {
                pins.set(
                    name.clone(),
                    Pin {
                        signing: s.fingerprint(),
                        encryption: Some(e.fingerprint()),
                    },
                );
            }
            info!(host = %name, fingerprint = %s.fingerprint(), "pinned agent keys from the Host's spec.keys");
            let rt = self.fleet.entry(name.clone()).or_default();
            if rt.encryption_key.as_ref() != Some(&e) {
                rt.encryption_key = Some(e);
                self.publish.forget(name);
            }
            rt.view.key_conflict = None;
            rt.view.not_admitted = None;
            rt.view.pinned_keys = Some(keys.clone());
            rt.view.key_fingerprint = Some(s.fingerprint());
            self.admin_pins.insert(name.clone(), keys.clone());
            self.admin_pins_changed = true;
            self.needs_status = true;
        }
    }

    /// The snapshot as the compiler should see it: the source's objects, agent-registered
    /// hosts, and what the agents reported (interfaces, lifecycle state) overlaid on Hosts.
    fn effective_snapshot(&mut self) -> Snapshot {
        let mut snap = (self.source.snapshot)();
        // A Host whose Node was deleted is Retired (once: the Node sync records the Event) and
        // stays so while its agent keeps talking; when the Node is back, the agent's next
        // keepalive makes it Active again.
        for (name, host) in &snap.hosts {
            let gone = match (&snap.nodes, host.spec.node_name.as_deref()) {
                (Some(nodes), Some(node)) => !nodes.contains(node),
                _ => false,
            };
            if !gone && !self.fleet.contains_key(name) {
                continue;
            }
            let rt = self.fleet.entry(name.clone()).or_default();
            if gone && rt.view.state != HostState::Retired {
                info!(host = %name, "its Node is gone: retired");
                rt.view.state = HostState::Retired;
                self.needs_status = true;
                revoke_broker_user(&self.broker_users, &self.link, name);
            }
            if rt.node_gone && !gone {
                info!(host = %name, "its Node is back: active again on the next keepalive");
            }
            rt.node_gone = gone;
        }
        for (name, host) in &self.registered {
            snap.hosts
                .entry(name.clone())
                .or_insert_with(|| host.clone());
        }
        for (name, host) in snap.hosts.iter_mut() {
            if let Some(rt) = self.fleet.get(name) {
                let st = host.status.get_or_insert_with(HostStatus::default);
                st.state = rt.view.state;
                if !rt.view.interfaces.is_empty() {
                    st.interfaces = rt.view.interfaces.clone();
                }
            }
        }
        snap
    }

    /// Compiles the current snapshot when something changed (no I/O).
    fn compile_if_needed(&mut self) {
        if !self.needs_compile {
            return;
        }
        self.needs_compile = false;
        let started = Instant::now();
        let snap = self.effective_snapshot();
        self.sync_admin_pins(&snap);
        let changes = self.compiler.update(snap);
        self.metrics
            .compile_duration
            .observe(started.elapsed().as_secs_f64());
        debug!(
            ?changes,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "compiled"
        );
        for d in &self.compiler.compiled().diagnostics {
            debug!(kind = ?d.kind, name = %d.name, field = %d.field, reason = %d.reason, "{}", d.message);
        }
        self.needs_publish = true;
        self.needs_status = true;
    }

    async fn reconcile(&mut self) {
        self.compile_if_needed();
        if std::mem::take(&mut self.admin_pins_changed) {
            self.retry_refused_heartbeats().await;
            self.compile_if_needed();
        }
        let status_due =
            self.needs_status && self.last_status.is_none_or(|t| t.elapsed() >= STATUS_EVERY);
        if !self.needs_publish && !status_due {
            return;
        }
        let mut ok = true;
        if self.needs_publish {
            self.needs_publish = false;
            ok = self.publish_changes().await;
        }
        if status_due {
            self.needs_status = false;
            self.last_status = Some(Instant::now());
            ok &= self.write_statuses().await;
        }
        self.metrics
            .reconciles
            .with_label_values(&[if ok { "ok" } else { "error" }])
            .inc();
    }

    /// After the first compile: hosts whose reported hashes already equal the compiled ones
    /// are recorded as delivered, so a restart or a takeover publishes nothing for them.
    fn seed_publish_state(&mut self) {
        let compiled = self.compiler.compiled();
        for (name, rt) in &self.fleet {
            let (Some(HostOutcome::Firewall { firewall, .. }), Some(rev), Some(reported)) = (
                compiled.hosts.get(name),
                rt.view.applied_revision,
                rt.view.reported.as_ref(),
            ) else {
                continue;
            };
            if &firewall.hashes == reported {
                self.publish.seed(name, rev, firewall, compiled);
            }
        }
    }

    fn reachable(&self, host: &str) -> bool {
        self.fleet.get(host).is_some_and(HostRt::reachable)
    }

    async fn publish_changes(&mut self) -> bool {
        let now_ms = unix_ms();
        let actions = {
            let compiled = self.compiler.compiled();
            let fleet = &self.fleet;
            let reachable = |h: &str| fleet.get(h).is_some_and(HostRt::reachable);
            publish::plan(&mut self.publish, compiled, &reachable, now_ms)
        };
        if actions.is_empty() {
            return true;
        }
        let now = unix_now();
        let mut sealed: Vec<(Publish, Uuid, Result<Vec<u8>, String>)> = Vec::new();
        for action in actions {
            let id = Uuid::new_v4();
            let bytes = match &action {
                Publish::Apply {
                    host,
                    revision,
                    firewall,
                } => {
                    let key = self.fleet.get(host).and_then(|rt| rt.encryption_key);
                    let req = Request {
                        id,
                        request: RequestKind::Apply {
                            revision: *revision,
                            firewall: firewall.to_host_firewall(host),
                        },
                    };
                    match key {
                        Some(k) => self
                            .sealer
                            .request(host, &k, &req, now, REQUEST_TTL_SECS)
                            .map_err(|e| e.to_string()),
                        None => Err("no encryption key pinned".into()),
                    }
                }
                Publish::SharedSet {
                    set,
                    version,
                    recipients,
                } => {
                    let keys: Vec<(String, EncryptionPublicKey)> = recipients
                        .iter()
                        .filter_map(|h| {
                            self.fleet
                                .get(h)
                                .and_then(|rt| rt.encryption_key)
                                .map(|k| (h.clone(), k))
                        })
                        .collect();
                    let req = Request {
                        id,
                        request: RequestKind::SharedSet {
                            set: (**set).clone(),
                            version: *version,
                        },
                    };
                    self.sealer
                        .request_for_many(&keys, &req, now, REQUEST_TTL_SECS)
                        .map_err(|e| e.to_string())
                }
            };
            sealed.push((action, id, bytes));
        }
        let link = &self.link;
        let metrics = &self.metrics;
        let results: Vec<(Publish, Uuid, Result<(), String>)> = futures::stream::iter(sealed)
            .map(|(action, id, bytes)| async move {
                let bytes: Vec<u8> = match bytes {
                    Ok(b) => b,
                    Err(e) => return (action, id, Err(format!("sealing: {e}"))),
                };
                let started = Instant::now();
                let meta = MessageMeta::new(id.to_string(), "request");
                let res = match &action {
                    Publish::Apply { host, .. } => link.publish_to_host(host, &bytes, &meta).await,
                    Publish::SharedSet { set, .. } => {
                        link.publish_shared_set(&set.name, &bytes, &meta).await
                    }
                };
                metrics
                    .confirm_latency
                    .observe(started.elapsed().as_secs_f64());
                (action, id, res.map_err(|e| e.to_string()))
            })
            .buffer_unordered(PUBLISH_CONCURRENCY)
            .collect()
            .await;
        let mut ok = true;
        for (action, id, res) in results {
            match (action, res) {
                (Publish::Apply { host, revision, .. }, Ok(())) => {
                    self.metrics.publishes.inc();
                    info!(host = %host, revision, request = %id, "published desired state");
                    self.pending.insert(id, (host.clone(), Some(revision)));
                    if let Some(rt) = self.fleet.get_mut(&host) {
                        rt.view.desired_revision = Some(revision);
                    }
                    self.needs_status = true;
                }
                (
                    Publish::SharedSet {
                        set,
                        version,
                        recipients,
                    },
                    Ok(()),
                ) => {
                    self.metrics.publishes.inc();
                    info!(set = %set.name, version, hosts = recipients.len(), entries = set.members.len(), "published shared set");
                }
                (Publish::Apply { host, .. }, Err(e)) => {
                    ok = false;
                    self.metrics.publish_failures.inc();
                    warn!(host = %host, error = %e, "publish failed; will retry");
                    self.publish.forget(&host);
                }
                (
                    Publish::SharedSet {
                        set, recipients, ..
                    },
                    Err(e),
                ) => {
                    ok = false;
                    self.metrics.publish_failures.inc();
                    warn!(set = %set.name, error = %e, "shared set publish failed; sending full state to its hosts instead");
                    for h in recipients {
                        self.publish.forget(&h);
                    }
                }
            }
        }
        if !ok {
            // retried on the next tick
            self.needs_publish = true;
        }
        ok
    }

    async fn write_statuses(&mut self) -> bool {
        let compiled = self.compiler.compiled();
        let snap = self.compiler.snapshot();
        let views: BTreeMap<String, HostView> = self
            .fleet
            .iter()
            .map(|(n, rt)| (n.clone(), rt.view.clone()))
            .collect();
        let mut ok = true;
        let mut hosts: Vec<String> = snap.hosts.keys().cloned().collect();
        hosts.extend(
            self.fleet
                .keys()
                .filter(|h| !snap.hosts.contains_key(*h))
                .cloned(),
        );
        let default_view = HostView::default();
        let now = Timestamp::now().to_string();
        let mut by_state: BTreeMap<&'static str, i64> = BTreeMap::new();
        let mut drifted = 0;
        for h in &hosts {
            let view = views.get(h).unwrap_or(&default_view);
            let mut st = report::host_status(compiled, h, view);
            let generation = snap.hosts.get(h).and_then(|o| o.metadata.generation);
            stamp_cached(
                &mut self.last_conditions,
                format!("Host/{h}"),
                &mut st.conditions,
                snap.hosts
                    .get(h)
                    .and_then(|o| o.status.as_ref())
                    .map(|s| &s.conditions),
                &now,
                generation,
            );
            *by_state.entry(state_label(st.state)).or_default() += 1;
            // an observing host applies nothing: its difference is not drift
            if matches!(compiled.hosts.get(h), Some(HostOutcome::Firewall { .. }))
                && !view.observe
                && view.reported.is_some()
                && !report::realized(compiled, h, Some(view))
            {
                drifted += 1;
            }
            if let Err(e) = self.status.write_host(h, generation, st).await {
                ok = false;
                warn!(host = %h, error = %e, "status write failed");
            }
        }
        for state in ["New", "Active", "Inactive", "Retired"] {
            self.metrics
                .hosts
                .with_label_values(&[state])
                .set(by_state.get(state).copied().unwrap_or(0));
        }
        self.metrics.hosts_drifted.set(drifted);
        // Groups, Profiles and Zones: the same steps, each with its own status type and writer.
        macro_rules! write_objects {
            ($objects:expr, $kind:literal, $status:expr, $write:ident) => {
                for (name, obj) in $objects {
                    let mut st = $status(name);
                    stamp_cached(
                        &mut self.last_conditions,
                        format!("{}/{name}", $kind),
                        &mut st.conditions,
                        obj.status.as_ref().map(|s| &s.conditions),
                        &now,
                        obj.metadata.generation,
                    );
                    if let Err(e) = self.status.$write(name, obj.metadata.generation, st).await {
                        ok = false;
                        warn!(kind = $kind, name = %name, error = %e, "status write failed");
                    }
                }
            };
        }
        write_objects!(
            &snap.groups,
            "Group",
            |n| report::group_status(compiled, n, &views),
            write_group
        );
        write_objects!(
            &snap.profiles,
            "Profile",
            |n| report::profile_status(compiled, n, &views),
            write_profile
        );
        write_objects!(
            &snap.zones,
            "Zone",
            |n| report::zone_status(compiled, n),
            write_zone
        );
        if !ok {
            self.needs_status = true;
        }
        ok
    }

    /// Every [`INBOX_EVERY`]: how many agent messages wait in the inbox (a metric; above
    /// [`BACKLOG_NOT_READY`] `/readyz` says so).
    async fn check_inbox(&mut self) {
        if self
            .inbox_checked
            .is_some_and(|t| t.elapsed() < INBOX_EVERY)
            || !self.link.status().connected
        {
            return;
        }
        self.inbox_checked = Some(Instant::now());
        match tokio::time::timeout(Duration::from_secs(2), self.link.inbox_depth()).await {
            Ok(Ok(n)) => {
                self.metrics.inbox_messages.set(i64::from(n));
                self.inbox_backlog = n;
            }
            Ok(Err(e)) => debug!(error = %e, "cannot read the inbox depth"),
            Err(_) => debug!("reading the inbox depth timed out"),
        }
        self.report_broker();
    }

    /// `/readyz` and `dog_operator_broker_connected` follow the broker connection (an
    /// operator that cannot publish is not ready, whatever else works) and the inbox backlog.
    fn report_broker(&mut self) {
        let st = self.link.status();
        self.metrics.broker_connected.set(st.connected as i64);
        dog_protocol::telemetry::count_up_to(&self.metrics.broker_failures, st.failures);
        if st.connected && self.inbox_backlog > BACKLOG_NOT_READY {
            self.health.set_not_ready(format!(
                "intake backlog: {} agent messages waiting in the inbox",
                self.inbox_backlog
            ));
        } else if st.connected {
            self.health.set_ready();
        } else {
            self.health.set_not_ready(format!(
                "broker disconnected: {}",
                st.last_error.as_deref().unwrap_or("connecting")
            ));
        }
    }

    // ----------------------------------------------------------------------------------
    // agent messages
    // ----------------------------------------------------------------------------------

    /// Whether a line about `reason` is due: the first one in a minute.
    fn first_in_minute(&mut self, reason: &'static str) -> bool {
        let now = Instant::now();
        let due = match self.logged_rejections.get(reason) {
            Some(at) => now.duration_since(*at) > Duration::from_secs(60),
            None => true,
        };
        if due {
            self.logged_rejections.insert(reason, now);
        }
        due
    }

    fn reject(&mut self, reason: &'static str, detail: &str, sender: Option<&str>) {
        self.metrics.rejected.with_label_values(&[reason]).inc();
        if self.first_in_minute(reason) {
            warn!(reason, sender = sender.unwrap_or("unknown"), detail, "rejected agent message (further ones with this reason are counted, not logged, for a minute)");
        }
    }

    async fn on_delivery(&mut self, d: Delivery) {
        let now = unix_now();
        // each pinned key has its own budget, checked before anything is spent on the message
        if let Some(key) = dog_protocol::envelope::claimed_signing_key(&d.body) {
            let fp = key.fingerprint();
            let pinned = matches!(self.opener.trust(), dog_protocol::envelope::Trust::Agents(p) if p.knows_signing(&fp));
            let now_ms = self.started.elapsed().as_millis() as u64;
            if pinned && !self.intake.admit(&fp, now_ms) {
                self.reject(
                    "rate_limited",
                    &format!("more messages under key {fp} than --sender-burst/--sender-messages-per-minute allow; dropped"),
                    None,
                );
                d.acker.ack().await;
                return;
            }
        }
        match self.opener.open(&d.body, now) {
            Err(r) => {
                let id = d.message_id.clone().unwrap_or_default();
                // who it claims to be, when its signature (by the key it carries) verified
                let claimed = self.opener.last_sender().map(str::to_string);
                self.reject(
                    r.reason(),
                    &format!("{r} (message id {id})"),
                    claimed.as_deref(),
                );
            }
            Ok(opened) => match opened.agent_message() {
                Err(e) => {
                    let sender = opened.header.sender.clone();
                    self.reject("malformed", &e.to_string(), Some(&sender));
                }
                Ok(msg) => self.on_message(opened, msg, d.user_id.as_deref()).await,
            },
        }
        d.acker.ack().await;
    }

    /// `user_id`: the broker user that published the message, as the broker checked it.
    async fn on_message(&mut self, opened: Opened, msg: AgentMessage, user_id: Option<&str>) {
        let host = opened.header.sender.clone();
        let now = Timestamp::now();
        // a node's own broker user speaks for that node only, whatever key signed
        let user_host = user_id.and_then(|u| self.link.topology().host_of_node_user(u));
        if let Some(of) = user_host.filter(|of| *of != host) {
            let refusal = Refusal::WrongBrokerUser {
                host: host.clone(),
                user_host: of.to_string(),
            };
            self.reject(refusal.reason(), &refusal.to_string(), Some(&host));
            return;
        }
        self.last_heard_any = Some(now);
        match msg {
            AgentMessage::Heartbeat(hb) => {
                let by_own_user = user_host.is_some();
                self.on_heartbeat(&opened, hb, now, by_own_user).await
            }
            AgentMessage::Keepalive(ka) => self.on_keepalive(&host, ka, now),
            AgentMessage::Response(r) => self.on_response(&host, r, now),
        }
    }

    fn mark_seen(&mut self, host: &str, now: Timestamp) {
        let rt = self.fleet.entry(host.to_string()).or_default();
        rt.last_seen = Some(now);
        // the written stamp is refreshed only every liveness interval (or with a state change
        // below): a keepalive alone must not turn into a status write
        let stamp_due = lifecycle::parse_keepalive(rt.view.last_keepalive.as_deref())
            .is_none_or(|t| lifecycle::age(t, now) >= self.args.liveness_write_interval);
        if stamp_due {
            rt.view.last_keepalive = Some(now.to_string());
            self.needs_status = true;
        }
        if rt.view.state != HostState::Active && !rt.node_gone && !self.valve.is_frozen() {
            let from = rt.view.state;
            rt.view.state = HostState::Active;
            info!(host, from = ?from, "host is active");
            emit(
                &self.events,
                self.compiler.snapshot(),
                DogEvent::host_state_changed(host, from, HostState::Active),
            );
            // a host coming back (or leaving Retired) changes group address sets
            self.needs_compile = true;
            rt.view.last_keepalive = Some(now.to_string());
            self.needs_status = true;
        }
    }

    /// Whether the host of a first heartbeat (no pin) is admitted: the pure checks, then the
    /// authority on its identity token, then the decision (crate::admission).
    /// `by_own_user`: the broker says the host's own broker user published it.
    async fn admit(&mut self, hb: &Heartbeat, by_own_user: bool) -> Result<Admitted, Refusal> {
        let host = &hb.hostname;
        let now_ms = self.started.elapsed().as_millis() as u64;
        self.admission.precheck(host, now_ms)?;
        let evidence = match (&hb.identity_token, &self.verifier) {
            _ if by_own_user => Evidence::BrokerUser(host.clone()),
            // bounded: an API server that does not answer must not stall the loop
            (Some(token), Some(verifier)) => {
                match tokio::time::timeout(VERIFY_TIMEOUT, verifier.node_of(token)).await {
                    Ok(Ok(node)) => Evidence::Node(node),
                    Ok(Err(why)) => Evidence::Refused(why),
                    Err(_) => Evidence::Refused(format!(
                        "the API server did not review the token within {VERIFY_TIMEOUT:?}"
                    )),
                }
            }
            _ => Evidence::None,
        };
        let known =
            self.compiler.snapshot().hosts.contains_key(host) || self.registered.contains_key(host);
        let hosts = self.compiler.snapshot().hosts.len() + self.registered.len();
        self.admission.decide(host, &evidence, known, hosts)
    }

    async fn on_heartbeat(
        &mut self,
        opened: &Opened,
        hb: Heartbeat,
        now: Timestamp,
        by_own_user: bool,
    ) {
        let host = hb.hostname.clone();
        if opened.first_use {
            match self.admit(&hb, by_own_user).await {
                Ok(how) => {
                    self.metrics
                        .hosts_registered
                        .with_label_values(&[how.label()])
                        .inc();
                    info!(host = %host, fingerprint = %hb.signing_key.fingerprint(), admitted = how.label(), "pinned agent keys");
                }
                Err(refusal) => {
                    self.reject(refusal.reason(), &refusal.to_string(), Some(&host));
                    // a declared host says why its agent is not admitted, and its heartbeat
                    // is kept until an admin pins the keys (the agent sends no other); an
                    // invented name leaves no trace but the counter and the log line
                    if self.compiler.snapshot().hosts.contains_key(&host) {
                        let rt = self.fleet.entry(host.clone()).or_default();
                        rt.view.not_admitted = Some(refusal.to_string());
                        let kept = &mut rt.refused_heartbeats;
                        kept.retain(|(_, old)| old.signing_key != hb.signing_key);
                        if kept.len() >= REFUSED_KEPT {
                            kept.remove(0);
                        }
                        let token = hb.identity_token.is_some();
                        kept.push((opened.clone(), hb));
                        rt.review_retry = match (&refusal, rt.review_retry) {
                            (Refusal::IdentityRefused { .. }, prev) if token => {
                                let refused = prev.map_or(1, |(_, n)| n + 1);
                                (refused <= REVIEW_RETRIES).then(|| {
                                    let wait = REVIEW_BACKOFF.ceiling(refused - 1);
                                    (Instant::now() + wait, refused)
                                })
                            }
                            // many hosts retrying at once (after an API server outage) may
                            // meet the registration rate limit: try again later, not never
                            (Refusal::RateLimited { .. }, Some((_, refused))) => {
                                let wait = REVIEW_BACKOFF.ceiling(refused);
                                Some((Instant::now() + wait, refused))
                            }
                            _ => None,
                        };
                        self.needs_status = true;
                    }
                    return;
                }
            }
        }
        self.accept_heartbeat(opened, hb, now).await;
    }

    /// Heartbeats of declared hosts that were refused for want of a pin, and whose keys an
    /// admin has pinned since: taken as if they arrived now.
    async fn retry_refused_heartbeats(&mut self) {
        let now = Timestamp::now();
        let mut ready = Vec::new();
        for (name, rt) in &mut self.fleet {
            let Some(pinned) = self.admin_pins.get(name) else {
                continue;
            };
            if let Some(i) = rt
                .refused_heartbeats
                .iter()
                .position(|(_, hb)| hb.signing_key.to_base64() == pinned.signing)
            {
                ready.push((name.clone(), rt.refused_heartbeats.swap_remove(i)));
                rt.refused_heartbeats.clear();
            }
        }
        for (name, (opened, hb)) in ready {
            info!(host = %name, "taking the heartbeat its agent sent before it was pinned");
            self.accept_heartbeat(&opened, hb, now).await;
        }
    }

    /// Declared hosts whose agent's token review was refused and is due again: the newest
    /// refused heartbeat that carries a token is taken as if it arrived now.
    async fn retry_token_reviews(&mut self) {
        let now = Instant::now();
        let mut due = Vec::new();
        for (name, rt) in &mut self.fleet {
            if rt.review_retry.is_none_or(|(at, _)| at > now) {
                continue;
            }
            match rt
                .refused_heartbeats
                .iter()
                .rposition(|(_, hb)| hb.identity_token.is_some())
            {
                Some(i) => due.push((name.clone(), rt.refused_heartbeats.remove(i))),
                None => rt.review_retry = None,
            }
        }
        for (name, (opened, hb)) in due {
            debug!(host = %name, "reviewing the identity token of a refused heartbeat again");
            self.on_heartbeat(&opened, hb, Timestamp::now(), false)
                .await;
        }
    }

    /// A heartbeat from an admitted or pinned sender.
    async fn accept_heartbeat(&mut self, opened: &Opened, hb: Heartbeat, now: Timestamp) {
        let host = hb.hostname.clone();
        match self.opener.pin_heartbeat(opened, &hb) {
            Ok(_) => {}
            Err(e) => {
                let rt = self.fleet.entry(host.clone()).or_default();
                if rt.view.key_conflict.is_none() {
                    warn!(host = %host, error = %e, "refusing heartbeat with changed keys");
                    emit(
                        &self.events,
                        self.compiler.snapshot(),
                        DogEvent::apply_failed(&host, 0, &e.to_string()),
                    );
                }
                rt.view.key_conflict = Some(e.to_string());
                self.metrics
                    .rejected
                    .with_label_values(&["key_changed"])
                    .inc();
                self.needs_status = true;
                return;
            }
        }
        let keys = AgentKeys {
            signing: hb.signing_key.to_base64(),
            encryption: hb.encryption_key.to_base64(),
        };
        let interfaces = to_crd_interfaces(&hb.interfaces);
        let known = self.compiler.snapshot().hosts.contains_key(&host)
            || self.registered.contains_key(&host);
        if !known {
            info!(host = %host, "registering a host for a new agent");
            if let Err(e) = self.registrar.register(&host, &keys, &interfaces).await {
                warn!(host = %host, error = %e, "could not create the Host; will retry on the next heartbeat");
            }
            let mut h = Host::new(&host, HostSpec::default());
            h.status = Some(HostStatus {
                interfaces: interfaces.clone(),
                pinned_keys: Some(keys.clone()),
                ..Default::default()
            });
            self.registered.insert(host.clone(), h);
            self.needs_compile = true;
        }
        let rt = self.fleet.entry(host.clone()).or_default();
        if rt.view.interfaces != interfaces {
            rt.view.interfaces = interfaces;
            self.needs_compile = true;
        }
        rt.encryption_key = Some(hb.encryption_key);
        rt.view.key_fingerprint = Some(hb.signing_key.fingerprint());
        rt.view.pinned_keys = Some(keys);
        rt.view.key_conflict = None;
        rt.view.not_admitted = None;
        rt.review_retry = None;
        rt.refused_heartbeats.clear();
        rt.view.agent_version = Some(hb.agent_version.clone());
        rt.view.observe = hb.mode == dog_protocol::messages::Mode::Observe;
        rt.view.applied_revision = hb.applied_revision;
        rt.view.reported = hb.live_hashes.clone();
        if !hb.drift.drifted.is_empty() {
            rt.view.drift = Some(format!(
                "drift in {} repaired ({} repairs)",
                hb.drift.drifted.join(", "),
                hb.drift.repairs
            ));
        }
        self.needs_status = true;
        self.mark_seen(&host, now);
        if let Some(reply_to) = &hb.broker_reply_to {
            self.hand_out_broker_user(&host, &hb.encryption_key, reply_to)
                .await;
        }
        // An agent that (re)connects gets its full desired state at once, unless it already
        // reported exactly that.
        let expected = report::expected_hashes(self.compiler.compiled(), &host);
        let matches = expected.is_some() && expected == hb.live_hashes;
        match (
            matches,
            hb.applied_revision,
            self.compiler.compiled().hosts.get(&host),
        ) {
            (true, Some(rev), Some(HostOutcome::Firewall { firewall, .. })) => {
                let compiled = self.compiler.compiled();
                self.publish.seed(&host, rev, firewall, compiled);
            }
            _ => self.publish.forget(&host),
        }
        self.needs_publish = true;
    }

    /// An admitted agent on the bootstrap user asks for its own broker user.
    async fn hand_out_broker_user(
        &mut self,
        host: &str,
        key: &EncryptionPublicKey,
        reply_to: &str,
    ) {
        let Some(users) = self.broker_users.clone() else {
            self.metrics
                .broker_users
                .with_label_values(&["not_configured"])
                .inc();
            if self.first_in_minute("broker_user_not_configured") {
                warn!(host, "an agent asks for its own broker user, but the operator has no --broker-management-url; it stays on the bootstrap user (further ones are counted, not logged, for a minute)");
            }
            return;
        };
        let sent = crate::broker_users::hand_out(
            users.as_ref(),
            &self.link,
            &self.sealer,
            host,
            key,
            reply_to,
            unix_now(),
        )
        .await;
        match sent {
            Ok(id) => {
                self.metrics.broker_users.with_label_values(&["ok"]).inc();
                info!(host, user = %self.link.topology().node_user(host), request = %id, "sent the host its own broker user");
                self.broker_user_requests.insert(id);
            }
            Err(e) => {
                self.metrics
                    .broker_users
                    .with_label_values(&[e.result])
                    .inc();
                warn!(host, error = %e.reason, "could not give the host its own broker user; it asks again when it reconnects");
            }
        }
    }

    fn on_keepalive(&mut self, host: &str, ka: Keepalive, now: Timestamp) {
        let expected = report::expected_hashes(self.compiler.compiled(), host);
        let resync_after = self.args.resync_after;
        let rt = self.fleet.entry(host.to_string()).or_default();
        let before = rt.view.clone();
        rt.view.observe = ka.mode == dog_protocol::messages::Mode::Observe;
        rt.view.would_change = ka.would_change;
        rt.view.applied_revision = ka.applied_revision;
        rt.view.reported = ka.live_hashes.clone();
        if ka.drift.is_empty() || rt.view.observe {
            rt.view.drift = None;
        } else {
            let parts: Vec<String> = ka
                .drift
                .iter()
                .map(|d| format!("{}{}", d.part, if d.repaired { " (repaired)" } else { "" }))
                .collect();
            let detail = format!("drift detected in {}", parts.join(", "));
            warn!(host, %detail, "agent reported drift");
            rt.view.drift = Some(detail.clone());
            emit(
                &self.events,
                self.compiler.snapshot(),
                DogEvent::drift_repaired(host, &detail),
            );
        }
        let mismatch = expected.is_some() && expected != ka.live_hashes && !rt.view.observe;
        if mismatch {
            let since = *rt.mismatch_since.get_or_insert_with(Instant::now);
            if since.elapsed() >= resync_after {
                info!(
                    host,
                    "reported hashes still differ from the expected ones; resending the full state"
                );
                rt.mismatch_since = Some(Instant::now());
                self.publish.forget(host);
                self.needs_publish = true;
            }
        } else {
            rt.mismatch_since = None;
        }
        // only what a user can see changing makes a status write
        if rt.view != before {
            self.needs_status = true;
        }
        self.mark_seen(host, now);
    }

    fn on_response(&mut self, host: &str, r: Response, now: Timestamp) {
        if self.broker_user_requests.remove(&r.request_id) {
            match &r.result {
                Outcome::Ok { .. } => {
                    info!(host, request = %r.request_id, "the agent took its broker user")
                }
                Outcome::Error { message, .. } => {
                    warn!(host, request = %r.request_id, %message, "the agent refused its broker user")
                }
            }
            self.mark_seen(host, now);
            return;
        }
        let pending = self.pending.remove(&r.request_id);
        let rt = self.fleet.entry(host.to_string()).or_default();
        match r.result {
            Outcome::Ok {
                applied_revision,
                hashes,
                timings_ms,
                would_change,
                ..
            } => {
                if would_change.is_some() {
                    rt.view.would_change = would_change;
                }
                if applied_revision.is_some() {
                    rt.view.applied_revision = applied_revision;
                }
                if hashes.is_some() {
                    rt.view.reported = hashes;
                }
                rt.view.apply_error = None;
                info!(host, request = %r.request_id, revision = applied_revision, total_ms = timings_ms.get("total").copied(), "agent applied");
            }
            Outcome::Error { kind, message } => {
                let revision = pending.and_then(|(_, rev)| rev).unwrap_or(0);
                warn!(host, request = %r.request_id, ?kind, %message, "agent could not apply; its previous rules stay in force");
                rt.view.apply_error = Some(format!("{kind:?}: {message}"));
                self.metrics.apply_failures.inc();
                emit(
                    &self.events,
                    self.compiler.snapshot(),
                    DogEvent::apply_failed(host, revision, &message),
                );
            }
        }
        self.needs_status = true;
        self.mark_seen(host, now);
    }

    // ----------------------------------------------------------------------------------
    // lifecycle
    // ----------------------------------------------------------------------------------

    fn on_tick(&mut self) {
        self.report_broker();
        let now = Timestamp::now();
        let clocks: Vec<HostClock> = self
            .fleet
            .iter()
            .filter(|(_, rt)| !rt.node_gone)
            .map(|(n, rt)| HostClock {
                name: n.clone(),
                state: rt.view.state,
                last_keepalive: rt.last_seen,
            })
            .collect();
        let evaluation = lifecycle::evaluate(&clocks, self.last_heard_any, now, &self.lifecycle);
        match self.valve.observe(&evaluation) {
            Some(ValveChange::Engaged) => {
                warn!("no agent at all was heard for {:?}: freezing lifecycle transitions (the operator's own connectivity is the likelier fault)", self.lifecycle.freeze_after);
                self.metrics.safety_valve_frozen.set(1);
            }
            Some(ValveChange::Released) => {
                info!("agents are heard again: lifecycle transitions resume");
                self.metrics.safety_valve_frozen.set(0);
            }
            None => {}
        }
        if let Evaluation::Transitions(ts) = evaluation {
            for t in ts {
                if let Some(rt) = self.fleet.get_mut(&t.name) {
                    info!(host = %t.name, from = ?t.from, to = ?t.to, "host lifecycle transition");
                    rt.view.state = t.to;
                    emit(
                        &self.events,
                        self.compiler.snapshot(),
                        DogEvent::host_state_changed(&t.name, t.from, t.to),
                    );
                    self.needs_status = true;
                    if t.to == HostState::Retired || t.from == HostState::Retired {
                        self.needs_compile = true;
                    }
                }
            }
        }
        // retries of failed publishes
        if self.publish_pending_retry() {
            self.needs_publish = true;
        }
    }

    /// Deletes the Hosts that stayed Retired and silent past the retention, and forgets them
    /// (pins, publish state, status cache), with an Event.
    async fn collect_retired(&mut self) {
        let retention = self.args.retired_retention;
        if retention.is_zero() || !self.registrar.collects() {
            return;
        }
        let now = Timestamp::now();
        let snap = self.compiler.snapshot();
        let due: Vec<String> = self
            .fleet
            .iter()
            .filter(|(name, rt)| {
                let created = snap
                    .hosts
                    .get(*name)
                    .and_then(|h| h.metadata.creation_timestamp.as_ref())
                    .map(|t| t.0);
                lifecycle::collectable(rt.view.state, rt.last_seen, created, now, retention)
            })
            .map(|(n, _)| n.clone())
            .collect();
        for name in due {
            if let Err(e) = self.registrar.collect(&name).await {
                warn!(host = %name, error = %e, "could not delete the retired Host; will retry");
                continue;
            }
            let event = DogEvent::host_collected(&name, retention);
            emit(&self.events, self.compiler.snapshot(), event);
            info!(host = %name, retention_secs = retention.as_secs(), "deleted a Host retired past the retention");
            revoke_broker_user(&self.broker_users, &self.link, &name);
            self.fleet.remove(&name);
            self.registered.remove(&name);
            self.publish.forget(&name);
            self.pending.retain(|_, (h, _)| h != &name);
            if let dog_protocol::envelope::Trust::Agents(pins) = self.opener.trust_mut() {
                pins.remove(&name);
            }
            self.status.forget("Host", &name);
            self.last_conditions.remove(&format!("Host/{name}"));
            self.needs_compile = true;
        }
    }

    fn publish_pending_retry(&self) -> bool {
        self.compiler.compiled().hosts.iter().any(|(h, o)| {
            matches!(o, HostOutcome::Firewall { .. })
                && self.reachable(h)
                && self.publish.revision(h).is_none()
        })
    }

    /// For tests: the current compile.
    pub fn compiled(&self) -> &Compiled {
        self.compiler.compiled()
    }
}

/// Records an Event without holding up the loop (sinks are best effort and log failures). The
/// object's uid comes from the snapshot, so that `kubectl describe` shows the Event.
/// Deletes a host's own broker user in the background (its Node is gone, or its Host was
/// collected): its agent can no longer log in and falls back to the bootstrap user.
fn revoke_broker_user(users: &Option<Arc<dyn BrokerUsers>>, link: &OperatorLink, host: &str) {
    let Some(users) = users.clone() else {
        return;
    };
    let user = link.topology().node_user(host);
    tokio::spawn(async move {
        match users.remove(&user).await {
            Ok(()) => info!(user = %user, "deleted the host's broker user"),
            Err(e) => warn!(user = %user, error = %e, "could not delete the host's broker user"),
        }
    });
}

fn emit(events: &Arc<dyn EventSink>, snap: &Snapshot, event: DogEvent) {
    fn uid_in<K: kube::ResourceExt>(objects: &BTreeMap<String, K>, name: &str) -> Option<String> {
        objects.get(name).and_then(|o| o.uid())
    }
    let uid = match event.kind {
        "Host" => uid_in(&snap.hosts, &event.name),
        "Group" => uid_in(&snap.groups, &event.name),
        "Profile" => uid_in(&snap.profiles, &event.name),
        "Zone" => uid_in(&snap.zones, &event.name),
        _ => None,
    };
    let event = if event.uid.is_none() {
        event.with_uid(uid)
    } else {
        event
    };
    let events = events.clone();
    tokio::spawn(async move { events.publish(event).await });
}

/// Stamps condition transition times against what was last written for `key` (or, before the
/// first write, what the object carries), and remembers the result.
fn stamp_cached(
    cache: &mut HashMap<String, Vec<crate::crd::Condition>>,
    key: String,
    conditions: &mut [crate::crd::Condition],
    from_object: Option<&Vec<crate::crd::Condition>>,
    now: &str,
    generation: Option<i64>,
) {
    let prev = cache.get(&key).or(from_object).cloned().unwrap_or_default();
    report::stamp(conditions, &prev, now, generation);
    cache.insert(key, conditions.to_vec());
}

fn state_label(s: HostState) -> &'static str {
    match s {
        HostState::New => "New",
        HostState::Active => "Active",
        HostState::Inactive => "Inactive",
        HostState::Retired => "Retired",
    }
}
