//! The agent process (docs/design.md, Agent): start-up, the main loop and the request handlers.
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
//! The impl of [`Agent`] is spread over child modules by concern: `link` (broker link,
//! heartbeat, keepalive, log-in), `requests` (deliveries and the request handlers), `sets`
//! (shared-set updates), `verify`
//! (drift checks and repair); `report` holds the pure helpers with their unit tests.
//!
//! The pure helpers (answer cache, drift events, rejection log pacing, key file parsing,
//! summaries) are in `report`, with their unit tests.

use crate::apply::Applier;
use crate::apply::{ApplyError, ApplyReport, Plan};
use crate::broker_user::{own_user_refused, Login};
use crate::config::Config;
use crate::core::drift::DriftReport;
use crate::core::firewall::Firewall;
use crate::core::live::LiveState;
use crate::core::members::SetContent;
use crate::kernel::KernelError;
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
use dog_protocol::ruleset::{sha256_hex, FirewallHashes};
use dog_protocol::telemetry::{self, Health};
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::signal::unix::{signal, SignalKind};
use tracing::{debug, error, info, warn};
use uuid::Uuid;

mod link;
mod report;
mod requests;
mod sets;
mod verify;

pub use report::{
    drift_events, drift_parts, load_operator_keys, parse_operator_keys, plan_summary,
    to_protocol_interfaces, AnswerCache, RejectionLog,
};
use report::{error_kind_name, request_kind_name};

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
/// How often an agent on the bootstrap user asks again for the node's own user.
const BOOTSTRAP_ASK_EVERY: Duration = Duration::from_secs(30);
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
    /// Failed attempts so far (the delay grows with them, see [`RETRY_BACKOFF`]).
    attempts: u32,
    next_try: tokio::time::Instant,
}

/// How a failed apply is retried: from about half a second to a minute, with full jitter (the
/// same backoff the broker link reconnects with).
const RETRY_BACKOFF: dog_protocol::broker::Backoff = dog_protocol::broker::Backoff {
    initial: std::time::Duration::from_millis(500),
    max: std::time::Duration::from_secs(60),
};

/// The running agent. Build it with [`Agent::start`], then [`Agent::run`] it.
pub struct Agent {
    cfg: Config,
    hostname: String,
    kernel: Arc<Applier>,
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
    /// When the last heartbeat was confirmed: on the bootstrap user it is sent again every
    /// [`BOOTSTRAP_ASK_EVERY`] until the node's own user arrives (a management API that
    /// failed once must not leave the agent waiting for its next reconnect).
    last_heartbeat: Option<Instant>,
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

/// The host name the agent speaks for, checked as the operator will check it.
fn checked_hostname(cfg: &Config) -> anyhow::Result<String> {
    let hostname = cfg
        .resolved_hostname()
        .context("cannot determine the host name (set --hostname / NODE_NAME)")?;
    if let Err(why) = dog_protocol::names::check_dns1123(&hostname) {
        anyhow::bail!("host name {hostname:?} (--hostname / NODE_NAME) is not a DNS-1123 subdomain: {why}; the operator admits no other");
    }
    Ok(hostname)
}

/// The agent's own keys (created on first start) and the operator keys it trusts.
fn load_keys(cfg: &Config) -> anyhow::Result<(AgentKeys, TrustedKeys)> {
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
    Ok((keys, operator_keys))
}

/// What the previous run accepted; when unreadable, everything issued before now is refused
/// rather than nothing.
fn saved_replay(store: &StateStore) -> ReplayState {
    match store.load_replay() {
        Ok(r) => r.unwrap_or_default(),
        Err(e) => {
            error!(error = %e, "the replay state is unreadable; refusing messages issued before this start");
            ReplayState {
                floor: dog_protocol::envelope::ReplayFloor {
                    issued_at: unix_now(),
                    ids: Default::default(),
                },
                set_versions: Default::default(),
            }
        }
    }
}

impl Agent {
    /// Everything up to a started broker link. Errors name the file or setting at fault.
    pub async fn start(cfg: Config) -> anyhow::Result<(Agent, Deliveries)> {
        let hostname = checked_hostname(&cfg)?;
        let (keys, operator_keys) = load_keys(&cfg)?;
        let kcfg = cfg.kernel_config();
        let kernel = blocking(move || Applier::new(kcfg))
            .await
            .context("cannot run the iptables tools")?;
        info!(
            backend = kernel.backend().word(),
            sets = kernel.set_backend().word(),
            netns = cfg.netns.as_deref(),
            mode = ?cfg.mode,
            "kernel ready"
        );

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
        let replay = saved_replay(&store);
        opener.set_replay_floor(Some(replay.floor.clone()));
        let sealer = Sealer::new(hostname.clone(), keys.signing);

        let metrics = AgentMetrics::new().context("metrics")?;
        metrics
            .set_backend
            .with_label_values(&[kernel.set_backend().word()])
            .set(1);
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
            .start(bcfg, &hostname)
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
            last_heartbeat: None,
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
        if self.cfg.mode == Mode::Observe {
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
                self.schedule_retry(saved.revision, saved.firewall, 0);
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
    let me = nix::unistd::geteuid().as_raw();
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
