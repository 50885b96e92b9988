//! The sending side: what a restart or takeover already delivered, which hosts can be sent to,
//! and publishing the plan of `crate::core::publish` sealed to each host (confirmed by the broker).

use super::*;
use crate::core::compile::CompiledFirewall;
use dog_protocol::envelope::Encryption;
use dog_protocol::messages::{EncodeError, EncodedFirewall};
use std::collections::HashMap;

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

    /// Plans what the compiles since the last pass changed and starts sending it in a task of
    /// its own ([`InFlight`]); the loop records the results when it ends
    /// ([`Runtime::finish_publishing`]). One pass at a time: while one is under way, the
    /// next waits for it (`needs_publish` stays set).
    pub(super) fn start_publishing(&mut self) {
        if self.pass.is_some() {
            self.needs_publish = true;
            return;
        }
        let now_ms = unix_ms();
        let changed = std::mem::take(&mut self.unpublished);
        let actions = {
            let compiled = self.compiler.compiled();
            let fleet = &self.fleet;
            let reachable = |h: &str| fleet.get(h).is_some_and(HostRt::reachable);
            publish::plan(&mut self.publish, compiled, &changed, &reachable, now_ms)
        };
        if actions.is_empty() {
            return;
        }
        let jobs: Vec<Job> = actions
            .into_iter()
            .map(|action| {
                let keys = self.keys_for(&action);
                (action, Uuid::new_v4(), keys)
            })
            .collect();
        for (action, id, _) in &jobs {
            // outstanding from before it leaves: its answer may come before the pass ends
            if let Publish::Apply { host, revision, .. } = action {
                self.pending.insert(*id, host, Some(*revision));
            }
        }
        let applies = jobs
            .iter()
            .filter(|(a, ..)| matches!(a, Publish::Apply { .. }))
            .count();
        info!(
            applies,
            shared_sets = jobs.len() - applies,
            "sending a pass of publishes"
        );
        let listed = jobs.iter().map(|(a, id, _)| (a.clone(), *id)).collect();
        let (link, metrics, sealer) = (
            self.link.clone(),
            self.metrics.clone(),
            Arc::clone(&self.sealer),
        );
        let task =
            tokio::spawn(async move { send_all(&link, &metrics, &sealer, jobs, unix_now()).await });
        self.pass = Some(InFlight {
            task,
            listed,
            started: Instant::now(),
        });
    }

    /// Records what an ended pass sent; what failed is sent again on the next pass.
    pub(super) fn finish_publishing(&mut self, (sent, elapsed): (Sent, Duration)) {
        let (published, failed) = sent.iter().fold((0, 0), |(p, f), (.., res)| match res {
            Ok(_) => (p + 1, f),
            Err(_) => (p, f + 1),
        });
        let mut ok = true;
        for (action, id, res) in sent {
            ok &= self.record(action, id, res);
        }
        info!(
            published,
            failed,
            elapsed_ms = elapsed.as_millis() as u64,
            "pass of publishes ended"
        );
        if !ok {
            // retried on the next pass
            self.needs_publish = true;
        }
        self.metrics
            .reconciles
            .with_label_values(&[if ok { "ok" } else { "error" }])
            .inc();
    }

    /// The pinned encryption keys a publish is sealed to.
    fn keys_for(&self, action: &Publish) -> Keys {
        let key_of = |h: &str| self.fleet.get(h).and_then(|rt| rt.encryption_key);
        match action {
            Publish::Apply { host, .. } => Keys::One(self.fleet.get(host).and_then(|rt| {
                let encryption = if rt.session_envelopes {
                    Encryption::Session
                } else {
                    Encryption::PerMessage
                };
                Some((rt.encryption_key?, encryption))
            })),
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
                // a host collected while the pass was under way has no status to write
                if let Some(rt) = self.fleet.get_mut(&host) {
                    rt.view.desired_revision = Some(revision);
                    self.status_due(&host);
                }
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
                self.pending.remove(id);
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
    One(Option<(EncryptionPublicKey, Encryption)>),
    Many(Vec<(String, EncryptionPublicKey)>),
}

/// A publish, its request id and the keys it is sealed to.
type Job = (Publish, Uuid, Keys);

/// What a pass sent: each publish, its request id, and its sealed size once the broker
/// confirmed it.
pub(super) type Sent = Vec<(Publish, Uuid, Result<usize, SendError>)>;

/// A pass of publishes under way in a task of its own, so that the loop keeps taking in what
/// agents send while the broker confirms: a pass to 5,000 hosts takes seconds, and their
/// answers waiting behind it were half of a round's latency.
pub(super) struct InFlight {
    task: tokio::task::JoinHandle<Sent>,
    /// What it sends, so that a task that fails still has each publish reported as failed.
    listed: Vec<(Publish, Uuid)>,
    started: Instant,
}

impl InFlight {
    /// The results of the pass in `slot` once it ends, and how long it took, emptying the
    /// slot; never resolves when there is none. Cancel safe: dropped before the end, the pass
    /// goes on.
    pub(super) async fn ended(slot: &mut Option<InFlight>) -> (Sent, Duration) {
        let Some(pass) = slot.as_mut() else {
            return std::future::pending().await;
        };
        let sent = match (&mut pass.task).await {
            Ok(sent) => sent,
            Err(e) => std::mem::take(&mut pass.listed)
                .into_iter()
                .map(|(action, id)| (action, id, Err(SendError::Task(e.to_string()))))
                .collect(),
        };
        let elapsed = pass.started.elapsed();
        *slot = None;
        (sent, elapsed)
    }

    /// Stops the pass (the operator is stopping or no longer leads): what it had not sent,
    /// the next operator sends.
    pub(super) fn abort(self) {
        self.task.abort();
    }
}

/// Why a publish did not reach the broker.
#[derive(Debug, thiserror::Error)]
pub(super) enum SendError {
    #[error("no encryption key pinned for the host")]
    NoKey,
    #[error("sealing: {0}")]
    Seal(#[from] SealError),
    #[error("encoding: {0}")]
    Encode(#[from] EncodeError),
    #[error("sealing task failed: {0}")]
    Task(String),
    #[error(transparent)]
    Broker(#[from] BrokerError),
}

/// Jobs sealed by one blocking task: one hand-off to the blocking pool and back per batch
/// instead of per host (a thread wake-up each way was about 13 % of the operator's CPU when
/// 5,000 hosts were sent a change), while the first publishes still leave after a few
/// milliseconds.
const SEAL_BATCH: usize = 16;

/// Seals the jobs in batches on the blocking pool (both cores) and publishes each batch as
/// soon as it is sealed, at most PUBLISH_CONCURRENCY messages at a time: the first hosts hear
/// of a change while the last are still being sealed, and no more than that many sealed
/// messages are held at once.
async fn send_all(
    link: &OperatorLink,
    metrics: &OperatorMetrics,
    sealer: &Arc<Sealer>,
    jobs: Vec<Job>,
    now: u64,
) -> Sent {
    let encoded = encode_firewalls(&jobs).await;
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
        encoded,
    };
    let mut batches: Vec<Vec<Job>> = Vec::with_capacity(jobs.len().div_ceil(SEAL_BATCH));
    let mut jobs = jobs.into_iter().peekable();
    while jobs.peek().is_some() {
        batches.push(jobs.by_ref().take(SEAL_BATCH).collect());
    }
    let sent: Vec<Vec<_>> = futures::stream::iter(batches)
        .map(|batch| out.send_batch(batch))
        .buffer_unordered((PUBLISH_CONCURRENCY / SEAL_BATCH).max(1))
        .collect()
        .await;
    sent.into_iter().flatten().collect()
}

/// What one pass of sending shares.
struct Outbound<'a> {
    link: &'a OperatorLink,
    metrics: &'a OperatorMetrics,
    sealer: &'a Arc<Sealer>,
    sealing: tokio::sync::Semaphore,
    now: u64,
    /// The firewalls of this pass's Applies, each encoded once, by `Arc` address.
    encoded: HashMap<usize, Arc<EncodedFirewall>>,
}

/// The distinct firewalls the Applies of a pass send, each encoded once on the blocking pool:
/// the hosts of a group share one, so its documents are serialized once instead of once per
/// host, and each set once for every firewall that uses it (a zone in every profile is encoded
/// once, not once per group). A firewall that cannot be encoded is left out; its Applies take
/// the owned path, which reports the error per host.
async fn encode_firewalls(jobs: &[Job]) -> HashMap<usize, Arc<EncodedFirewall>> {
    let mut distinct: HashMap<usize, Arc<CompiledFirewall>> = HashMap::new();
    for (action, _, _) in jobs {
        if let Publish::Apply { firewall, .. } = action {
            distinct
                .entry(Arc::as_ptr(firewall) as usize)
                .or_insert_with(|| Arc::clone(firewall));
        }
    }
    if distinct.is_empty() {
        return HashMap::new();
    }
    tokio::task::spawn_blocking(move || {
        let mut sets = HashMap::new();
        distinct
            .into_iter()
            .filter_map(|(at, fw)| Some((at, Arc::new(fw.encode(&mut sets).ok()?))))
            .collect()
    })
    .await
    .unwrap_or_default()
}

impl Outbound<'_> {
    /// Seals a batch of jobs in one blocking task, then publishes them together; each job's
    /// sealed size once the broker confirmed it.
    async fn send_batch(&self, batch: Vec<Job>) -> Vec<(Publish, Uuid, Result<usize, SendError>)> {
        let inputs: Vec<(Publish, Uuid, Keys, Option<Arc<EncodedFirewall>>)> = batch
            .into_iter()
            .map(|(action, id, keys)| {
                let encoded = match &action {
                    Publish::Apply { firewall, .. } => {
                        self.encoded.get(&(Arc::as_ptr(firewall) as usize)).cloned()
                    }
                    Publish::SharedSet { .. } => None,
                };
                (action, id, keys, encoded)
            })
            .collect();
        // the sealing task gets its own copies, so a panic in it still leaves every job to
        // report
        let jobs: Vec<(Publish, Uuid)> =
            inputs.iter().map(|(a, id, ..)| (a.clone(), *id)).collect();
        let (sealer, now) = (Arc::clone(self.sealer), self.now);
        let sealed: Vec<Result<Vec<u8>, SendError>> = {
            let _turn = self.sealing.acquire().await;
            tokio::task::spawn_blocking(move || {
                inputs
                    .into_iter()
                    .map(|(action, id, keys, encoded)| {
                        seal(&sealer, &action, id, keys, encoded.as_deref(), now)
                    })
                    .collect()
            })
            .await
            .unwrap_or_else(|e| {
                (0..jobs.len())
                    .map(|_| Err(SendError::Task(e.to_string())))
                    .collect()
            })
        };
        let publishes = jobs
            .into_iter()
            .zip(sealed)
            .map(|((action, id), bytes)| async move {
                let res = match bytes {
                    Ok(bytes) => self.publish(&action, id, &bytes).await,
                    Err(e) => Err(e),
                };
                (action, id, res)
            });
        futures::future::join_all(publishes).await
    }

    /// Publishes one sealed job; its size once the broker confirmed it.
    async fn publish(&self, action: &Publish, id: Uuid, bytes: &[u8]) -> Result<usize, SendError> {
        let started = Instant::now();
        let meta = MessageMeta::new(id.to_string(), "request");
        let res = match action {
            Publish::Apply { host, .. } => self.link.publish_to_host(host, bytes, &meta).await,
            Publish::SharedSet { set, .. } => {
                self.link.publish_shared_set(&set.name, bytes, &meta).await
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

/// Seals `action` as request `id` (no IO: runs on the blocking pool); an Apply from its
/// firewall's shared encoding when the pass has one.
fn seal(
    sealer: &Sealer,
    action: &Publish,
    id: Uuid,
    keys: Keys,
    encoded: Option<&EncodedFirewall>,
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
            let (key, encryption) = key.ok_or(SendError::NoKey)?;
            if let Some(encoded) = encoded {
                let payload = encoded.apply_payload(id, host, *revision, kept)?;
                return Ok(sealer.encoded_request(
                    host,
                    &key,
                    encryption,
                    id,
                    Some(*revision),
                    &payload,
                    now,
                    REQUEST_TTL_SECS,
                )?);
            }
            let req = Request {
                id,
                request: RequestKind::Apply {
                    revision: *revision,
                    firewall: firewall.to_host_firewall_without(host, kept),
                    kept_sets: kept.clone(),
                },
            };
            Ok(sealer.request(host, &key, encryption, &req, now, REQUEST_TTL_SECS)?)
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

#[cfg(test)]
mod tests {
    use super::*;
    use dog_protocol::envelope::Opener;
    use dog_protocol::keys::{EncryptionKey, SigningKey, TrustedKeys};
    use dog_protocol::messages::OperatorMessage;
    use dog_protocol::ruleset::{
        parse_member, Failsafe, Family, HostFirewall, IpSet, RulesDocument,
    };

    fn firewall() -> Arc<CompiledFirewall> {
        let set = |name: &str, members: &[&str]| {
            IpSet::new(
                name,
                Family::V4,
                members.iter().map(|m| parse_member(m).unwrap()),
            )
        };
        let (a, b) = (
            set("dogg4-a", &["10.0.0.1", "10.0.0.2"]),
            set("dogz4-b", &["192.0.2.0/24"]),
        );
        let text =
            "*filter\n:DOG-INPUT - [0:0]\n-A DOG-INPUT -p tcp --dport 22 -j ACCEPT\nCOMMIT\n";
        let hf = HostFirewall {
            host: String::new(),
            ipv4: RulesDocument {
                family: Family::V4,
                text: text.into(),
            },
            ipv6: RulesDocument {
                family: Family::V6,
                text: "*filter\nCOMMIT\n".into(),
            },
            sets: [(a.name.clone(), a), (b.name.clone(), b)]
                .into_iter()
                .collect(),
            failsafe: Failsafe::default(),
        };
        Arc::new(CompiledFirewall::from_host_firewall(hf))
    }

    /// `action` sealed from `encoded` and from the owned request, each opened as its host.
    fn both_ways(
        sealer: &Sealer,
        action: &Publish,
        encoded: &EncodedFirewall,
    ) -> (Request, Request) {
        let Publish::Apply { host, .. } = action else {
            panic!("not an apply: {action:?}");
        };
        let key = EncryptionKey::generate();
        let id = Uuid::new_v4();
        let keys = || Keys::One(Some((key.public(), Encryption::Session)));
        let shared = seal(sealer, action, id, keys(), Some(encoded), 1_000).expect("seals");
        let owned = seal(sealer, action, id, keys(), None, 1_000).expect("seals");
        (
            open(&shared, host, &key, sealer),
            open(&owned, host, &key, sealer),
        )
    }

    /// Opens `bytes` as `host` and returns the request it carries.
    fn open(bytes: &[u8], host: &str, key: &EncryptionKey, sealer: &Sealer) -> Request {
        let trusted = TrustedKeys::new([sealer.public_key()]);
        let mut opener = Opener::for_agent(host, key.clone(), "dog-operator", trusted);
        let opened = opener.open(bytes, 1_000).expect("opens");
        match serde_json::from_slice(&opened.payload).expect("parses") {
            OperatorMessage::Request(r) => r,
        }
    }

    #[test]
    fn an_apply_from_the_shared_encoding_opens_to_the_same_request_as_the_owned_one() {
        let sealer = Sealer::new("dog-operator", SigningKey::generate().unwrap().0);
        let fw = firewall();
        let encoded = fw.encode(&mut HashMap::new()).expect("encodes");
        for (host, kept) in [
            ("node-1", BTreeMap::new()),
            (
                "node-2",
                [("dogz4-b".to_string(), fw.sets["dogz4-b"].hash())]
                    .into_iter()
                    .collect(),
            ),
        ] {
            let action = Publish::Apply {
                host: host.into(),
                revision: 7,
                firewall: Arc::clone(&fw),
                kept: kept.clone(),
            };
            let (a, b) = both_ways(&sealer, &action, &encoded);
            assert_eq!(a, b);
            let RequestKind::Apply {
                firewall,
                kept_sets,
                revision,
            } = a.request
            else {
                panic!("not an apply: {a:?}");
            };
            assert_eq!(
                (firewall.host.as_str(), revision, &kept_sets),
                (host, 7, &kept)
            );
            assert_eq!(
                firewall.sets.len(),
                2 - kept.len(),
                "kept sets are left out"
            );
        }
    }

    #[test]
    fn a_set_two_groups_share_is_encoded_once_and_both_apply_it() {
        let sealer = Sealer::new("dog-operator", SigningKey::generate().unwrap().0);
        let first = firewall();
        // another group's firewall: other rules, the same zone set (the same Arc, as the
        // compiler shares it)
        let mut second = (*first).clone();
        second.group = "g2".into();
        second.sets.remove("dogg4-a");
        let second = Arc::new(second);
        let mut cache = HashMap::new();
        let encoded = [
            first.encode(&mut cache).expect("encodes"),
            second.encode(&mut cache).expect("encodes"),
        ];
        assert_eq!(cache.len(), 2, "two distinct sets, each encoded once");
        // the zone set's one encoding is held by the cache and by both firewalls: encoding
        // it again for the second firewall would leave the first one's copy apart
        let zone = Arc::as_ptr(&first.sets["dogz4-b"]) as usize;
        assert_eq!(
            Arc::strong_count(&cache[&zone]),
            3,
            "the zone set is shared"
        );
        let group = Arc::as_ptr(&first.sets["dogg4-a"]) as usize;
        assert_eq!(
            Arc::strong_count(&cache[&group]),
            2,
            "the group set is the first's"
        );
        for (fw, encoded) in [&first, &second].into_iter().zip(&encoded) {
            let action = Publish::Apply {
                host: "node-1".into(),
                revision: 3,
                firewall: Arc::clone(fw),
                kept: BTreeMap::new(),
            };
            let (a, b) = both_ways(&sealer, &action, encoded);
            assert_eq!(a, b);
        }
    }
}
