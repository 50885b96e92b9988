//! The sending side: what a restart or takeover already delivered, which hosts can be sent to,
//! and publishing the plan of `crate::core::publish` sealed to each host (confirmed by the broker).

use super::*;

impl Runtime {
    /// After the first compile: hosts whose reported hashes already equal the compiled ones
    /// are recorded as delivered, so a restart or a takeover publishes nothing for them.
    pub(super) fn seed_publish_state(&mut self) {
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

    pub(super) fn reachable(&self, host: &str) -> bool {
        self.fleet.get(host).is_some_and(HostRt::reachable)
    }

    pub(super) async fn publish_changes(&mut self) -> bool {
        let now_ms = unix_ms();
        let changed = std::mem::take(&mut self.unpublished);
        let actions = {
            let compiled = self.compiler.compiled();
            let fleet = &self.fleet;
            let reachable = |h: &str| fleet.get(h).is_some_and(HostRt::reachable);
            publish::plan(&mut self.publish, compiled, &changed, &reachable, now_ms)
        };
        if actions.is_empty() {
            return true;
        }
        let jobs: Vec<Job> = actions
            .into_iter()
            .map(|action| {
                let keys = self.keys_for(&action);
                (action, Uuid::new_v4(), keys)
            })
            .collect();
        let results = send_all(&self.link, &self.metrics, &self.sealer, jobs, unix_now()).await;
        let mut ok = true;
        for (action, id, res) in results {
            ok &= self.record(action, id, res);
        }
        if !ok {
            // retried on the next tick
            self.needs_publish = true;
        }
        ok
    }

    /// The pinned encryption keys a publish is sealed to.
    fn keys_for(&self, action: &Publish) -> Keys {
        let key_of = |h: &str| self.fleet.get(h).and_then(|rt| rt.encryption_key);
        match action {
            Publish::Apply { host, .. } => Keys::One(key_of(host)),
            Publish::SharedSet { recipients, .. } => Keys::Many(
                recipients
                    .iter()
                    .filter_map(|h| key_of(h).map(|k| (h.clone(), k)))
                    .collect(),
            ),
        }
    }

    /// Records one publish's result: what was sent, or, when it failed, that its hosts get
    /// their full state on the next pass. False when it failed.
    fn record(&mut self, action: Publish, id: Uuid, res: Result<usize, SendError>) -> bool {
        match (action, res) {
            (Publish::Apply { host, revision, .. }, Ok(bytes)) => {
                self.metrics.publishes.inc();
                info!(host = %host, revision, request = %id, bytes, "published desired state");
                self.pending.insert(id, (host.clone(), Some(revision)));
                if let Some(rt) = self.fleet.get_mut(&host) {
                    rt.view.desired_revision = Some(revision);
                }
                self.status_due(&host);
                true
            }
            (
                Publish::SharedSet {
                    set,
                    version,
                    recipients,
                    change,
                },
                Ok(bytes),
            ) => {
                self.metrics.publishes.inc();
                match change {
                    Some(c) => {
                        info!(set = %set.name, version, hosts = recipients.len(), added = c.add.len(), removed = c.remove.len(), bytes, "published shared set change")
                    }
                    None => {
                        info!(set = %set.name, version, hosts = recipients.len(), entries = set.members.len(), bytes, "published shared set")
                    }
                }
                true
            }
            (Publish::Apply { host, .. }, Err(e)) => {
                self.metrics.publish_failures.inc();
                warn!(host = %host, error = %e, "publish failed; will retry");
                self.publish.forget(&host);
                false
            }
            (
                Publish::SharedSet {
                    set, recipients, ..
                },
                Err(e),
            ) => {
                self.metrics.publish_failures.inc();
                warn!(set = %set.name, error = %e, "shared set publish failed; sending full state to its hosts instead");
                for h in recipients {
                    self.publish.forget(&h);
                }
                false
            }
        }
    }

    pub(super) fn publish_pending_retry(&self) -> bool {
        self.compiler.compiled().hosts.iter().any(|(h, o)| {
            matches!(o, HostOutcome::Firewall { .. })
                && self.reachable(h)
                && self.publish.revision(h).is_none()
        })
    }
}

/// The encryption keys a message is sealed to.
enum Keys {
    One(Option<EncryptionPublicKey>),
    Many(Vec<(String, EncryptionPublicKey)>),
}

/// A publish, its request id and the keys it is sealed to.
type Job = (Publish, Uuid, Keys);

/// Why a publish did not reach the broker.
#[derive(Debug, thiserror::Error)]
pub(super) enum SendError {
    #[error("no encryption key pinned for the host")]
    NoKey,
    #[error("sealing: {0}")]
    Seal(#[from] SealError),
    #[error("sealing task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
    #[error(transparent)]
    Broker(#[from] BrokerError),
}

/// Seals each job on the blocking pool (both cores) and publishes it as soon as it is sealed,
/// at most PUBLISH_CONCURRENCY at a time: the first hosts hear of a change while the last are
/// still being sealed, and no more than that many sealed messages are held at once.
async fn send_all(
    link: &OperatorLink,
    metrics: &OperatorMetrics,
    sealer: &Arc<Sealer>,
    jobs: Vec<Job>,
    now: u64,
) -> Vec<(Publish, Uuid, Result<usize, SendError>)> {
    let out = &Outbound {
        link,
        metrics,
        sealer,
        // as many sealing threads as cores: more would only add threads (and their allocator
        // arenas) without sealing any faster
        sealing: tokio::sync::Semaphore::new(
            std::thread::available_parallelism().map_or(2, usize::from),
        ),
        now,
    };
    futures::stream::iter(jobs)
        .map(|(action, id, keys)| async move {
            let res = out.send(&action, id, keys).await;
            (action, id, res)
        })
        .buffer_unordered(PUBLISH_CONCURRENCY)
        .collect()
        .await
}

/// What one pass of sending shares.
struct Outbound<'a> {
    link: &'a OperatorLink,
    metrics: &'a OperatorMetrics,
    sealer: &'a Arc<Sealer>,
    sealing: tokio::sync::Semaphore,
    now: u64,
}

impl Outbound<'_> {
    /// Seals and publishes one job; the sealed message's size once the broker confirmed it.
    async fn send(&self, action: &Publish, id: Uuid, keys: Keys) -> Result<usize, SendError> {
        let job = (Arc::clone(self.sealer), action.clone(), self.now);
        let bytes = {
            let _turn = self.sealing.acquire().await;
            tokio::task::spawn_blocking(move || {
                let (sealer, action, now) = job;
                seal(&sealer, &action, id, keys, now)
            })
            .await??
        };
        let started = Instant::now();
        let meta = MessageMeta::new(id.to_string(), "request");
        let res = match action {
            Publish::Apply { host, .. } => self.link.publish_to_host(host, &bytes, &meta).await,
            Publish::SharedSet { set, .. } => {
                self.link.publish_shared_set(&set.name, &bytes, &meta).await
            }
        };
        self.metrics
            .confirm_latency
            .observe(started.elapsed().as_secs_f64());
        res?;
        let kind = match action {
            Publish::Apply { .. } => "apply",
            Publish::SharedSet { .. } => "shared_set",
        };
        self.metrics
            .published_bytes
            .with_label_values(&[kind])
            .inc_by(bytes.len() as u64);
        Ok(bytes.len())
    }
}

/// Seals `action` as request `id` (no IO: runs on the blocking pool).
fn seal(
    sealer: &Sealer,
    action: &Publish,
    id: Uuid,
    keys: Keys,
    now: u64,
) -> Result<Vec<u8>, SendError> {
    match (action, keys) {
        (
            Publish::Apply {
                host,
                revision,
                firewall,
                kept,
            },
            Keys::One(key),
        ) => {
            let req = Request {
                id,
                request: RequestKind::Apply {
                    revision: *revision,
                    firewall: firewall.to_host_firewall_without(host, kept),
                    kept_sets: kept.clone(),
                },
            };
            let key = key.ok_or(SendError::NoKey)?;
            Ok(sealer.request(host, &key, &req, now, REQUEST_TTL_SECS)?)
        }
        (
            Publish::SharedSet {
                set,
                version,
                change,
                ..
            },
            Keys::Many(keys),
        ) => {
            let request = match change {
                Some(c) => RequestKind::SharedSetDelta(c.clone()),
                None => RequestKind::SharedSet {
                    set: (**set).clone(),
                    version: *version,
                },
            };
            let req = Request { id, request };
            Ok(sealer.request_for_many(&keys, &req, now, REQUEST_TTL_SECS)?)
        }
        // keys_for builds the keys from the publish itself
        (Publish::Apply { .. }, Keys::Many(_)) | (Publish::SharedSet { .. }, Keys::One(_)) => {
            Err(SendError::NoKey)
        }
    }
}
