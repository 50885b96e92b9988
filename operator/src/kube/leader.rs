//! Leader election with a `coordination.k8s.io/v1` Lease (`dog-operator-leader` in the
//! operator's namespace): one active replica at a time, a standby takes over within 15 s of the
//! leader's death.
//!
//! Pure core: [`decide`] looks at the Lease as read (or its absence) and says what to do —
//! create it, update it (renew our own, or take over a free/expired one), or wait. Expiry is
//! judged on the *local monotonic clock* the way client-go does: a Lease held by someone else
//! is expired when its record (holder, renewTime, duration) has not changed for longer than its
//! `leaseDurationSeconds` since we first saw that record, so clock skew between replicas cannot
//! cause a takeover. A Lease with an empty holder (released) is free at once.
//!
//! IO shell: [`LeaderElector`] runs one round every `renew_every` (2 s): GET, then
//! create (POST) or replace (PUT, optimistic concurrency on `resourceVersion`; a 409 means
//! another replica won). A leader that cannot renew within `renew_deadline` (8 s, less than the
//! 10 s lease) steps down *before* a standby may take over. On shutdown it releases the Lease
//! (empty holder, 1 s duration) so a standby takes over on its next round. The outcome is
//! published on a `watch::Receiver<bool>` (`true` while leader).

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, PostParams};
use kube::Client;
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::Instant;

/// Default Lease name.
pub const LEASE_NAME: &str = "dog-operator-leader";

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaderConfig {
    pub lease_name: String,
    /// The operator's namespace (POD_NAMESPACE).
    pub namespace: String,
    /// Unique per replica, e.g. the pod name.
    pub identity: String,
    /// `leaseDurationSeconds` written on the Lease (10 s).
    pub lease_duration: Duration,
    /// Interval between rounds (2 s).
    pub renew_every: Duration,
    /// A leader that has not renewed for this long steps down (8 s; must be < lease_duration).
    pub renew_deadline: Duration,
}

impl LeaderConfig {
    pub fn new(namespace: impl Into<String>, identity: impl Into<String>) -> Self {
        Self {
            lease_name: LEASE_NAME.to_string(),
            namespace: namespace.into(),
            identity: identity.into(),
            lease_duration: Duration::from_secs(10),
            renew_every: Duration::from_secs(2),
            renew_deadline: Duration::from_secs(8),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LeaderError {
    #[error("lease {namespace}/{name}: {source}")]
    Kube {
        namespace: String,
        name: String,
        #[source]
        source: kube::Error,
    },
}

/// What one round should do.
#[derive(Clone, Debug, PartialEq)]
pub enum LeaseAction {
    /// No Lease exists: create this one (we become holder).
    Create(Lease),
    /// Replace the Lease with this one (renew ours, or take over); carries the
    /// `resourceVersion` we read, so a concurrent writer makes it fail with 409.
    Update(Lease),
    /// Someone else holds an unexpired Lease.
    Wait { holder: String },
}

/// Remembers when the Lease record last changed, on our monotonic clock.
#[derive(Clone, Debug, Default)]
pub struct LeaseObserver {
    record: Option<(Option<String>, Option<Timestamp>, Option<i32>)>,
    since: Option<Instant>,
}

impl LeaseObserver {
    /// Records the Lease as seen at `now`; returns how long its record has been unchanged.
    fn observe(&mut self, spec: &LeaseSpec, now: Instant) -> Duration {
        let record = (
            spec.holder_identity.clone(),
            spec.renew_time.as_ref().map(|t| t.0),
            spec.lease_duration_seconds,
        );
        if self.record.as_ref() != Some(&record) || self.since.is_none() {
            self.record = Some(record);
            self.since = Some(now);
        }
        self.since
            .map(|s| now.saturating_duration_since(s))
            .unwrap_or_default()
    }
}

fn duration_secs(d: Duration) -> i32 {
    i32::try_from(d.as_secs().max(1)).unwrap_or(i32::MAX)
}

/// The pure decision of one round.
pub fn decide(
    current: Option<&Lease>,
    cfg: &LeaderConfig,
    observer: &mut LeaseObserver,
    now: Instant,
    wall: Timestamp,
) -> LeaseAction {
    let Some(lease) = current else {
        return LeaseAction::Create(Lease {
            metadata: ObjectMeta {
                name: Some(cfg.lease_name.clone()),
                namespace: Some(cfg.namespace.clone()),
                ..Default::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(cfg.identity.clone()),
                lease_duration_seconds: Some(duration_secs(cfg.lease_duration)),
                acquire_time: Some(MicroTime(wall)),
                renew_time: Some(MicroTime(wall)),
                lease_transitions: Some(0),
                ..Default::default()
            }),
        });
    };
    let spec = lease.spec.clone().unwrap_or_default();
    let unchanged_for = observer.observe(&spec, now);
    let holder = spec.holder_identity.clone().unwrap_or_default();
    let mut next = lease.clone();
    let mut new_spec = spec.clone();
    new_spec.renew_time = Some(MicroTime(wall));
    new_spec.lease_duration_seconds = Some(duration_secs(cfg.lease_duration));
    if holder == cfg.identity {
        next.spec = Some(new_spec);
        return LeaseAction::Update(next);
    }
    let their_duration = spec
        .lease_duration_seconds
        .map(|s| Duration::from_secs(u64::try_from(s.max(0)).unwrap_or(0)))
        .unwrap_or(cfg.lease_duration);
    if holder.is_empty() || unchanged_for > their_duration {
        new_spec.holder_identity = Some(cfg.identity.clone());
        new_spec.acquire_time = Some(MicroTime(wall));
        new_spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0).saturating_add(1));
        next.spec = Some(new_spec);
        return LeaseAction::Update(next);
    }
    LeaseAction::Wait { holder }
}

/// The released form of our Lease: empty holder, 1 s duration.
pub fn released(lease: &Lease, wall: Timestamp) -> Lease {
    let mut next = lease.clone();
    let mut spec = lease.spec.clone().unwrap_or_default();
    spec.holder_identity = None;
    spec.lease_duration_seconds = Some(1);
    spec.renew_time = Some(MicroTime(wall));
    next.spec = Some(spec);
    next
}

/// The IO shell around [`decide`].
pub struct LeaderElector {
    api: Api<Lease>,
    cfg: LeaderConfig,
    observer: LeaseObserver,
    /// Our Lease as last written successfully (for release without a GET).
    held: Option<Lease>,
    last_renew: Option<Instant>,
    tx: watch::Sender<bool>,
}

impl LeaderElector {
    pub fn new(client: Client, cfg: LeaderConfig) -> Self {
        let api = Api::namespaced(client, &cfg.namespace);
        let (tx, _) = watch::channel(false);
        Self {
            api,
            cfg,
            observer: LeaseObserver::default(),
            held: None,
            last_renew: None,
            tx,
        }
    }

    /// `true` while this replica is the leader. Subscribe before calling [`Self::run`].
    pub fn subscribe(&self) -> watch::Receiver<bool> {
        self.tx.subscribe()
    }

    pub fn is_leader(&self) -> bool {
        *self.tx.borrow()
    }

    fn set_leader(&self, leader: bool) {
        self.tx.send_if_modified(|v| {
            if *v != leader {
                if leader {
                    tracing::info!(identity = %self.cfg.identity, lease = %self.cfg.lease_name,
                        "became leader");
                } else {
                    tracing::warn!(identity = %self.cfg.identity, lease = %self.cfg.lease_name,
                        "no longer leader");
                }
                *v = leader;
                true
            } else {
                false
            }
        });
    }

    fn err(&self, source: kube::Error) -> LeaderError {
        LeaderError::Kube {
            namespace: self.cfg.namespace.clone(),
            name: self.cfg.lease_name.clone(),
            source,
        }
    }

    /// One election round; returns whether we lead afterwards. API errors are returned after
    /// stepping down if the renew deadline passed.
    pub async fn step(&mut self) -> Result<bool, LeaderError> {
        let now = Instant::now();
        let result = self.try_step(now).await;
        if let Err(e) = &result {
            tracing::warn!(error = %e, "leader election round failed");
        }
        if self.is_leader() {
            let stale = self
                .last_renew
                .is_none_or(|r| now.saturating_duration_since(r) > self.cfg.renew_deadline);
            if stale {
                self.held = None;
                self.set_leader(false);
            }
        }
        result.map(|()| self.is_leader())
    }

    async fn try_step(&mut self, now: Instant) -> Result<(), LeaderError> {
        let current = self
            .api
            .get_opt(&self.cfg.lease_name)
            .await
            .map_err(|e| self.err(e))?;
        let action = decide(
            current.as_ref(),
            &self.cfg,
            &mut self.observer,
            now,
            Timestamp::now(),
        );
        let written = match action {
            LeaseAction::Wait { holder } => {
                tracing::debug!(%holder, "lease held by another replica");
                self.held = None;
                self.set_leader(false);
                return Ok(());
            }
            LeaseAction::Create(lease) => self.api.create(&PostParams::default(), &lease).await,
            LeaseAction::Update(lease) => {
                self.api
                    .replace(&self.cfg.lease_name, &PostParams::default(), &lease)
                    .await
            }
        };
        match written {
            Ok(lease) => {
                self.held = Some(lease);
                self.last_renew = Some(now);
                self.set_leader(true);
                Ok(())
            }
            Err(kube::Error::Api(s)) if s.is_conflict() || s.is_already_exists() => {
                tracing::debug!("another replica wrote the lease first");
                self.held = None;
                self.set_leader(false);
                Ok(())
            }
            Err(e) => Err(self.err(e)),
        }
    }

    /// Gives the Lease up if we hold it (called on graceful shutdown). Steps down first.
    pub async fn release(&mut self) -> Result<(), LeaderError> {
        self.set_leader(false);
        let Some(lease) = self.held.take() else {
            return Ok(());
        };
        let next = released(&lease, Timestamp::now());
        match self
            .api
            .replace(&self.cfg.lease_name, &PostParams::default(), &next)
            .await
        {
            Ok(_) => {
                tracing::info!(lease = %self.cfg.lease_name, "lease released");
                Ok(())
            }
            // Someone else already took it over: nothing to release.
            Err(kube::Error::Api(s)) if s.is_conflict() => Ok(()),
            Err(e) => Err(self.err(e)),
        }
    }

    /// Runs rounds every `renew_every` until `shutdown` completes, then releases the Lease.
    pub async fn run(mut self, shutdown: impl std::future::Future<Output = ()>) {
        tokio::pin!(shutdown);
        let mut tick = tokio::time::interval(self.cfg.renew_every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = &mut shutdown => break,
                _ = tick.tick() => {
                    // errors are logged inside step()
                    let _ = self.step().await;
                }
            }
        }
        if let Err(e) = self.release().await {
            tracing::warn!(error = %e, "could not release the lease");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(id: &str) -> LeaderConfig {
        LeaderConfig::new("dog-system", id)
    }
    fn wall() -> Timestamp {
        Timestamp::from_second(1_700_000_000).unwrap()
    }
    fn held_by(holder: Option<&str>, renew: i64) -> Lease {
        Lease {
            metadata: ObjectMeta {
                name: Some(LEASE_NAME.into()),
                namespace: Some("dog-system".into()),
                resource_version: Some("7".into()),
                ..Default::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: holder.map(String::from),
                lease_duration_seconds: Some(10),
                renew_time: Some(MicroTime(Timestamp::from_second(renew).unwrap())),
                lease_transitions: Some(3),
                ..Default::default()
            }),
        }
    }

    #[test]
    fn absent_lease_is_created_with_us_as_holder() {
        let mut o = LeaseObserver::default();
        let LeaseAction::Create(l) = decide(None, &cfg("a"), &mut o, Instant::now(), wall()) else {
            panic!()
        };
        let s = l.spec.unwrap();
        assert_eq!(s.holder_identity.as_deref(), Some("a"));
        assert_eq!(s.lease_duration_seconds, Some(10));
        assert_eq!(s.lease_transitions, Some(0));
    }

    #[test]
    fn own_lease_is_renewed_keeping_resource_version() {
        let mut o = LeaseObserver::default();
        let l = held_by(Some("a"), 1);
        let LeaseAction::Update(n) = decide(Some(&l), &cfg("a"), &mut o, Instant::now(), wall())
        else {
            panic!()
        };
        assert_eq!(n.metadata.resource_version.as_deref(), Some("7"));
        let s = n.spec.unwrap();
        assert_eq!(s.renew_time, Some(MicroTime(wall())));
        assert_eq!(s.lease_transitions, Some(3));
    }

    #[test]
    fn foreign_lease_is_taken_only_after_it_stays_unchanged_past_its_duration() {
        let mut o = LeaseObserver::default();
        let t0 = Instant::now();
        let l = held_by(Some("b"), 1);
        let c = cfg("a");
        assert!(matches!(
            decide(Some(&l), &c, &mut o, t0, wall()),
            LeaseAction::Wait { .. }
        ));
        let at10 = t0 + Duration::from_secs(10);
        assert!(matches!(
            decide(Some(&l), &c, &mut o, at10, wall()),
            LeaseAction::Wait { .. }
        ));
        let later = t0 + Duration::from_secs(11);
        let LeaseAction::Update(n) = decide(Some(&l), &c, &mut o, later, wall()) else {
            panic!("expected takeover")
        };
        let s = n.spec.unwrap();
        assert_eq!(s.holder_identity.as_deref(), Some("a"));
        assert_eq!(s.lease_transitions, Some(4));
        assert_eq!(s.acquire_time, Some(MicroTime(wall())));
    }

    #[test]
    fn renewals_by_the_holder_keep_the_standby_waiting() {
        let mut o = LeaseObserver::default();
        let t0 = Instant::now();
        let c = cfg("a");
        for i in 0..20 {
            let l = held_by(Some("b"), 100 + i * 2);
            let now = t0 + Duration::from_secs(2 * i as u64);
            assert!(matches!(
                decide(Some(&l), &c, &mut o, now, wall()),
                LeaseAction::Wait { .. }
            ));
        }
    }

    #[test]
    fn skewed_wall_clock_does_not_matter() {
        // renewTime decades in the past, but we just saw the record: not expired.
        let mut o = LeaseObserver::default();
        let l = held_by(Some("b"), 0);
        assert!(matches!(
            decide(Some(&l), &cfg("a"), &mut o, Instant::now(), wall()),
            LeaseAction::Wait { .. }
        ));
    }

    #[test]
    fn released_lease_is_free_at_once() {
        let mut o = LeaseObserver::default();
        let l = released(&held_by(Some("b"), 1), wall());
        assert_eq!(l.spec.as_ref().unwrap().holder_identity, None);
        assert_eq!(l.spec.as_ref().unwrap().lease_duration_seconds, Some(1));
        assert!(matches!(
            decide(Some(&l), &cfg("a"), &mut o, Instant::now(), wall()),
            LeaseAction::Update(_)
        ));
    }
}
