//! The operator's reconcile loop: the thin shell that connects the pure pieces.
//!
//! ```text
//! snapshot changes ─▶ compile ─▶ publish::plan ─▶ seal ─▶ broker (confirmed)
//! agent messages   ─▶ open ─▶ fleet view (pins, hashes, lifecycle) ─▶ report ─▶ status sink
//! 1 s tick         ─▶ lifecycle::evaluate, resync of hosts whose hashes stay wrong
//! ```
//!
//! The same loop runs against the Kubernetes API (`crate::kube`) and against a directory of
//! YAML files (`crate::dir`); only the snapshot source, the status sink, the event sink and the
//! registrar of agent-only hosts differ.
//!
//! This file holds the state, start-up, the select loop and compiling; the impl of
//! [`Runtime`] goes on in `agents` (agent messages and admission), `outbox` (publishing),
//! `reports` (statuses, metrics, readiness) and `ticks` (lifecycle and collection).

use crate::config::RunArgs;
use crate::core::admission::{Admission, Admitted, Evidence, Refusal};
use crate::core::compile::{Compiled, Compiler, HostFacts, HostOutcome, Snapshot};
use crate::core::events::DogEvent;
use crate::core::intake::Intake;
use crate::core::lifecycle::{
    self, Evaluation, HostClock, LifecycleConfig, SafetyValve, ValveChange,
};
use crate::core::outstanding::Outstanding;
use crate::core::publish::{self, Publish, PublishState};
use crate::core::report::{self, HostView};
use crate::crd::{AgentPublicKeys, Host, HostSpec, HostState, HostStatus, InterfaceStatus};
use crate::metrics::OperatorMetrics;
use crate::runtime::broker_users::BrokerUsers;
use dog_protocol::broker::{BrokerError, Deliveries, Delivery, MessageMeta, OperatorLink};
use dog_protocol::envelope::{Opened, Opener, SealError, Sealer};
use dog_protocol::keys::pinning::{Pin, Pins};
use dog_protocol::keys::{EncryptionPublicKey, SigningPublicKey};
use dog_protocol::messages::{
    AgentMessage, Heartbeat, Keepalive, Outcome, Request, RequestKind, Response,
};
use dog_protocol::ruleset::FirewallHashes;
use dog_protocol::telemetry::Health;
use futures::StreamExt;
use k8s_openapi::jiff::Timestamp;
pub use sinks::{EventSink, IdentityVerifier, ObjectStatus, Registrar, Source, StatusSink};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tracing::{debug, info, warn};
use uuid::Uuid;

mod admin_pins;
mod agents;
pub mod broker_users;
mod outbox;
mod reports;
pub mod sinks;
mod ticks;

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
/// Agent messages acknowledged with one frame, at most: a quarter of the inbox prefetch (256
/// by default), so the broker never waits for an acknowledgement to deliver more.
const ACK_BATCH: usize = 64;

/// What the operator knows of one host at run time.
#[derive(Clone, Debug, Default)]
struct HostRt {
    view: HostView,
    encryption_key: Option<EncryptionPublicKey>,
    /// The host's last heartbeat said its agent opens session envelopes (protocol mode 3);
    /// until then, and after its keys are pinned anew, each request is encrypted on its own.
    session_envelopes: bool,
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
    /// Requests sent and not yet answered.
    pending: Outstanding,
    sealer: Arc<Sealer>,
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
    admin_pins: BTreeMap<String, AgentPublicKeys>,
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
    /// What the compiles since the last publish changed (the publish plan looks only there).
    unpublished: crate::core::compile::Changes,
    needs_publish: bool,
    /// The pass of publishes under way, if any.
    pass: Option<outbox::InFlight>,
    needs_status: bool,
    /// Hosts whose status the next pass writes (all of them when `status_all`); Groups,
    /// Profiles and Zones are written every pass.
    status_dirty: std::collections::BTreeSet<String>,
    status_all: bool,
    last_status: Option<Instant>,
}

pub struct Parts {
    pub args: RunArgs,
    /// The authority on agent identity tokens (Kubernetes mode), if any.
    pub verifier: Option<Arc<dyn IdentityVerifier>>,
    /// The broker's management API (`--broker-management-url`), if any.
    pub broker_users: Option<Arc<dyn BrokerUsers>>,
    pub sealer: Arc<Sealer>,
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

fn to_crd_interfaces(ifs: &[dog_protocol::messages::Interface]) -> Vec<InterfaceStatus> {
    ifs.iter()
        .map(|i| InterfaceStatus {
            name: i.name.clone(),
            addresses: i.addresses.iter().map(|a| a.addr().to_string()).collect(),
        })
        .collect()
}

fn crd_hashes_to_wire(h: &crate::crd::HashesStatus) -> FirewallHashes {
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
            pending: Outstanding::default(),
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
            unpublished: Default::default(),
            needs_publish: false,
            pass: None,
            needs_status: true,
            status_dirty: Default::default(),
            status_all: true,
            last_status: None,
            args,
        }
    }

    /// Runs until `shutdown` resolves. Rules stay in force on every host whatever happens here.
    /// Hands back the arguments and the signing key, for a next leadership term.
    pub async fn run(
        mut self,
        shutdown: impl std::future::Future<Output = ()>,
    ) -> (RunArgs, Arc<Sealer>) {
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
                    let Some(first) = delivery else {
                        warn!("broker consumer ended; shutting down");
                        break;
                    };
                    // drain what is already waiting before reconciling once for all of it
                    self.take_in(first).await;
                }
                _ = tick.tick() => {
                    self.on_tick();
                    self.check_inbox().await;
                    self.retry_token_reviews().await;
                    self.collect_retired().await;
                }
                sent = outbox::InFlight::ended(&mut self.pass) => self.finish_publishing(sent),
                _ = status_tick.tick(), if self.needs_status => {}
            }
            self.reconcile().await;
        }
        if let Some(pass) = self.pass.take() {
            pass.abort();
        }
        info!("operator loop stopped; agents keep enforcing their last applied rules");
        (self.args, self.sealer)
    }

    /// Handles `first` and every agent message already waiting behind it, in order, and
    /// acknowledges them with one frame per [`ACK_BATCH`]: the inbox has one consumer and this
    /// loop finishes each message before the next, so acknowledging the last one handled
    /// covers those before it (a separate acknowledgement per message was a round trip through
    /// the broker client's thread each, 5,000 of them when a pass's answers come in).
    async fn take_in(&mut self, first: Delivery) {
        let mut next = Some(first);
        let mut unacked = 0;
        while let Some(d) = next {
            self.on_delivery(&d).await;
            unacked += 1;
            next = match tokio::time::timeout(Duration::ZERO, self.deliveries.recv()).await {
                Ok(Some(d)) => Some(d),
                _ => None,
            };
            if next.is_none() || unacked == ACK_BATCH {
                d.acker.ack_through().await;
                unacked = 0;
            }
        }
    }

    /// The snapshot as the compiler should see it: the source's objects, agent-registered
    /// hosts, and what the operator knows of each host at run time (interfaces its agent
    /// reported, lifecycle state) as its facts.
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
                self.status_dirty.insert(name.clone());
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
                .or_insert_with(|| Arc::new(host.clone()));
        }
        for name in snap.hosts.keys() {
            if let Some(rt) = self.fleet.get(name) {
                snap.facts.insert(
                    name.clone(),
                    HostFacts {
                        state: rt.view.state,
                        interfaces: rt.view.interfaces.clone(),
                    },
                );
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
            hosts = changes.hosts.len(),
            sets = changes.sets.len(),
            full = changes.full,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "compiled"
        );
        self.unpublished.absorb(changes);
        for d in self.compiler.compiled().diagnostics.iter() {
            debug!(kind = ?d.kind, name = %d.name, field = %d.field, reason = %d.reason, "{}", d.message);
        }
        self.needs_publish = true;
        // outcomes and diagnostics may have changed for any host
        self.status_all = true;
        self.needs_status = true;
    }

    /// Host `host`'s status must be written again (what a user sees of it changed).
    pub(super) fn status_due(&mut self, host: &str) {
        self.status_dirty.insert(host.to_string());
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
        if self.needs_publish {
            self.needs_publish = false;
            // counted when it ends; set again while a pass is under way
            self.start_publishing();
        }
        if status_due {
            self.needs_status = false;
            self.last_status = Some(Instant::now());
            let ok = self.write_statuses().await;
            self.metrics
                .reconciles
                .with_label_values(&[if ok { "ok" } else { "error" }])
                .inc();
        }
    }

    /// For tests: the current compile.
    pub fn compiled(&self) -> &Compiled {
        self.compiler.compiled()
    }
}

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

/// Records an Event without holding up the loop (sinks are best effort and log failures). The
/// object's uid comes from the snapshot, so that `kubectl describe` shows the Event.
fn emit(events: &Arc<dyn EventSink>, snap: &Snapshot, event: DogEvent) {
    fn uid_in<K: kube::ResourceExt>(
        objects: &BTreeMap<String, Arc<K>>,
        name: &str,
    ) -> Option<String> {
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
