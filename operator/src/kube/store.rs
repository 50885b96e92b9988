//! The in-memory [`Snapshot`] the compiler reads, kept current by watches on Group, Profile,
//! Zone, Host, Node and the ConfigMaps Zones reference, plus a coalesced "something changed"
//! signal.
//!
//! Pure core: [`SnapshotState::apply`] folds one [`Update`] (a watcher event) into the state
//! and says whether anything the compiler or the Node→Host sync cares about changed. Writes
//! by the operator itself (status timestamps, conditions, counts) update the stored objects
//! but do not count as changes, so status writes do not trigger recompiles.
//!
//! IO shell: [`SnapshotStore::run`] drives one kube-runtime `watcher` per kind, one
//! name-scoped `watch_object` per referenced ConfigMap (started and stopped as Zones change),
//! and a coalescer: after a change it waits `debounce`, then bumps the counter published on
//! [`SnapshotStore::changes`] once, however many changes arrived in that window. Nothing is
//! signalled until every kind has completed its initial list and every referenced ConfigMap
//! was read once (compiling from a half-loaded view could drop blocklist entries).
//!
//! ConfigMap lines are stored raw (every line of the key's value, comments included) under
//! `namespace/name/key`, so the compiler can report line numbers.

use crate::core::compile::Snapshot;
use crate::crd::{Group, Host, Profile, Zone};
use futures::{stream, Stream, StreamExt};
use k8s_openapi::api::core::v1::{ConfigMap, Node};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Api, Client, ResourceExt};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tokio::sync::{mpsc, watch};

/// The key used when a Zone's `configMapRefs[].key` is absent.
pub const DEFAULT_CONFIG_MAP_KEY: &str = "addresses";

/// One watcher event, for one kind. (Moved once from the watch into the state, so the size
/// difference between variants costs nothing worth a Box.)
#[derive(Debug)]
#[allow(clippy::large_enum_variant)]
pub enum Update {
    Zone(watcher::Event<Zone>),
    Host(watcher::Event<Host>),
    Group(watcher::Event<Group>),
    Profile(watcher::Event<Profile>),
    Node(watcher::Event<Node>),
    /// The current content of one referenced ConfigMap (`namespace/name`), `None` if absent.
    ConfigMap {
        namespace: String,
        name: String,
        object: Option<ConfigMap>,
    },
}

/// Objects of one kind, with the list-in-progress buffer of a (re)list.
#[derive(Debug)]
struct Reflected<K> {
    /// Shared: a snapshot copies pointers, not objects.
    items: BTreeMap<String, Arc<K>>,
    buffer: Option<BTreeMap<String, Arc<K>>>,
    synced: bool,
}

impl<K> Default for Reflected<K> {
    fn default() -> Self {
        Self {
            items: BTreeMap::new(),
            buffer: None,
            synced: false,
        }
    }
}

impl<K: ResourceExt + Clone> Reflected<K> {
    /// Applies an event; `relevant` projects what counts as a change.
    fn apply<P: PartialEq>(&mut self, ev: watcher::Event<K>, relevant: impl Fn(&K) -> P) -> bool {
        match ev {
            watcher::Event::Apply(obj) => {
                let name = obj.name_any();
                let changed = self.items.get(&name).map(|o| relevant(o)) != Some(relevant(&obj));
                self.items.insert(name, Arc::new(obj));
                changed
            }
            watcher::Event::Delete(obj) => self.items.remove(&obj.name_any()).is_some(),
            watcher::Event::Init => {
                self.buffer = Some(BTreeMap::new());
                false
            }
            watcher::Event::InitApply(obj) => {
                self.buffer
                    .get_or_insert_with(BTreeMap::new)
                    .insert(obj.name_any(), Arc::new(obj));
                false
            }
            watcher::Event::InitDone => {
                let fresh = self.buffer.take().unwrap_or_default();
                let changed = !self.synced
                    || fresh.len() != self.items.len()
                    || fresh
                        .iter()
                        .any(|(n, o)| self.items.get(n).map(|x| relevant(x)) != Some(relevant(o)));
                self.items = fresh;
                self.synced = true;
                changed
            }
        }
    }
}

/// A referenced ConfigMap's state.
#[derive(Clone, Debug, PartialEq)]
enum CmSlot {
    /// Watch started, first answer not in yet.
    Pending,
    Absent,
    Present(BTreeMap<String, String>),
}

/// Everything the store knows. Pure: no IO.
#[derive(Debug, Default)]
pub struct SnapshotState {
    zones: Reflected<Zone>,
    hosts: Reflected<Host>,
    groups: Reflected<Group>,
    profiles: Reflected<Profile>,
    nodes: Reflected<Node>,
    /// `namespace/name` → content, for every ConfigMap referenced by a Zone.
    config_maps: BTreeMap<String, CmSlot>,
    /// `namespace/name/key` → lines, for every referenced key that exists.
    lines: BTreeMap<String, Arc<Vec<String>>>,
}

fn host_relevant(h: &Host) -> impl PartialEq {
    // A missing status is the same as an empty one.
    let st = h.status.clone().unwrap_or_default();
    (
        h.metadata.labels.clone(),
        h.spec.clone(),
        (st.state, st.interfaces, st.pinned_keys),
    )
}

fn node_relevant(n: &Node) -> impl PartialEq {
    (
        n.metadata.labels.clone(),
        n.status.as_ref().and_then(|s| s.addresses.clone()),
    )
}

/// `(namespace, name, key)` of every ConfigMap key referenced by a Zone.
pub fn referenced_keys(zones: &BTreeMap<String, Arc<Zone>>) -> BTreeSet<(String, String, String)> {
    zones
        .values()
        .flat_map(|z| z.spec.config_map_refs.iter())
        .map(|r| {
            (
                r.namespace.clone(),
                r.name.clone(),
                r.key
                    .clone()
                    .unwrap_or_else(|| DEFAULT_CONFIG_MAP_KEY.to_string()),
            )
        })
        .collect()
}

impl SnapshotState {
    /// Folds one update in; `true` when something relevant changed.
    pub fn apply(&mut self, update: Update) -> bool {
        match update {
            Update::Zone(ev) => {
                let changed = self
                    .zones
                    .apply(ev, |z| (z.metadata.labels.clone(), z.spec.clone()));
                if changed {
                    self.refresh_references();
                }
                changed
            }
            Update::Host(ev) => self.hosts.apply(ev, host_relevant),
            Update::Group(ev) => self
                .groups
                .apply(ev, |g| (g.metadata.labels.clone(), g.spec.clone())),
            Update::Profile(ev) => self
                .profiles
                .apply(ev, |p| (p.metadata.labels.clone(), p.spec.clone())),
            Update::Node(ev) => self.nodes.apply(ev, node_relevant),
            Update::ConfigMap {
                namespace,
                name,
                object,
            } => {
                let id = format!("{namespace}/{name}");
                if !self.config_maps.contains_key(&id) {
                    return false; // no longer referenced
                }
                let slot = match object {
                    Some(cm) => CmSlot::Present(cm.data.unwrap_or_default()),
                    None => CmSlot::Absent,
                };
                if self.config_maps.get(&id) == Some(&slot) {
                    return false;
                }
                self.config_maps.insert(id, slot);
                self.refresh_lines();
                true
            }
        }
    }

    /// `(namespace, name)` of every referenced ConfigMap.
    pub fn referenced_config_maps(&self) -> BTreeSet<(String, String)> {
        referenced_keys(&self.zones.items)
            .into_iter()
            .map(|(ns, n, _)| (ns, n))
            .collect()
    }

    fn refresh_references(&mut self) {
        let wanted: BTreeSet<String> = self
            .referenced_config_maps()
            .into_iter()
            .map(|(ns, n)| format!("{ns}/{n}"))
            .collect();
        self.config_maps.retain(|id, _| wanted.contains(id));
        for id in wanted {
            self.config_maps.entry(id).or_insert(CmSlot::Pending);
        }
        self.refresh_lines();
    }

    fn refresh_lines(&mut self) {
        let mut lines = BTreeMap::new();
        for (ns, name, key) in referenced_keys(&self.zones.items) {
            let full = format!("{ns}/{name}/{key}");
            if let Some(CmSlot::Present(data)) = self.config_maps.get(&format!("{ns}/{name}")) {
                if let Some(text) = data.get(&key) {
                    // Reuse the parsed lines when the text did not change.
                    let reuse = self
                        .lines
                        .get(&full)
                        .filter(|l| {
                            l.len() == text.lines().count()
                                && l.iter().map(String::as_str).eq(text.lines())
                        })
                        .cloned();
                    let v = reuse
                        .unwrap_or_else(|| Arc::new(text.lines().map(str::to_string).collect()));
                    lines.insert(full, v);
                }
            }
        }
        self.lines = lines;
    }

    /// All kinds listed and every referenced ConfigMap read once.
    pub fn is_synced(&self) -> bool {
        self.zones.synced
            && self.hosts.synced
            && self.groups.synced
            && self.profiles.synced
            && self.nodes.synced
            && !self.config_maps.values().any(|s| *s == CmSlot::Pending)
    }

    /// The compiler's input.
    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            zones: self.zones.items.clone(),
            hosts: self.hosts.items.clone(),
            groups: self.groups.items.clone(),
            profiles: self.profiles.items.clone(),
            config_map_addresses: self.lines.clone(),
            facts: BTreeMap::new(),
            nodes: Some(self.nodes.items.keys().cloned().collect()),
            stale: BTreeMap::new(),
        }
    }

    pub fn nodes(&self) -> &BTreeMap<String, Arc<Node>> {
        &self.nodes.items
    }

    pub fn hosts(&self) -> &BTreeMap<String, Arc<Host>> {
        &self.hosts.items
    }
}

/// Shared, watched snapshot with a coalesced change signal.
pub struct SnapshotStore {
    state: RwLock<SnapshotState>,
    /// Bumped on every relevant change (uncoalesced).
    raw: watch::Sender<u64>,
    /// Bumped once per debounce window (what consumers wait on).
    out: watch::Sender<u64>,
    debounce: Duration,
}

impl SnapshotStore {
    pub fn new(debounce: Duration) -> Arc<Self> {
        Arc::new(Self {
            state: RwLock::new(SnapshotState::default()),
            raw: watch::channel(0).0,
            out: watch::channel(0).0,
            debounce,
        })
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, SnapshotState> {
        self.state.read().unwrap_or_else(|e| e.into_inner())
    }

    /// A receiver that changes once per coalesced burst (value: a counter).
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.out.subscribe()
    }

    /// A copy of the current snapshot (cheap for ConfigMap lines, which are shared).
    pub fn snapshot(&self) -> Snapshot {
        self.read().snapshot()
    }

    pub fn nodes(&self) -> BTreeMap<String, Arc<Node>> {
        self.read().nodes().clone()
    }

    pub fn hosts(&self) -> BTreeMap<String, Arc<Host>> {
        self.read().hosts().clone()
    }

    pub fn is_synced(&self) -> bool {
        self.read().is_synced()
    }

    /// Folds one update in and signals the coalescer if it mattered (also used by tests and
    /// by any non-watch feed).
    pub fn apply(&self, update: Update) {
        let (changed, synced) = {
            let mut st = self.state.write().unwrap_or_else(|e| e.into_inner());
            let was = st.is_synced();
            let changed = st.apply(update);
            let now = st.is_synced();
            (changed || (now && !was), now)
        };
        if changed && synced {
            self.raw.send_modify(|v| *v = v.wrapping_add(1));
        }
    }

    /// The coalescer: one output bump per `debounce` window that saw changes. Runs until the
    /// store is dropped.
    pub async fn coalesce(self: Arc<Self>) {
        let mut raw = self.raw.subscribe();
        loop {
            if raw.changed().await.is_err() {
                return;
            }
            tokio::time::sleep(self.debounce).await;
            raw.borrow_and_update();
            self.out.send_modify(|v| *v = v.wrapping_add(1));
        }
    }

    /// Watches everything and keeps the state current. Runs forever (watch errors are logged
    /// and retried with [`watch_backoff`]).
    pub async fn run(self: Arc<Self>, client: Client) {
        tokio::spawn(self.clone().coalesce());
        let cfg = watcher::Config::default;
        fn strip<K: kube::Resource>(o: &mut K) {
            o.meta_mut().managed_fields = None;
        }
        let zones = watcher(Api::<Zone>::all(client.clone()), cfg())
            .backoff(watch_backoff())
            .map(|r| r.map(|e| Update::Zone(e.modify(strip))));
        let hosts = watcher(Api::<Host>::all(client.clone()), cfg())
            .backoff(watch_backoff())
            .map(|r| r.map(|e| Update::Host(e.modify(strip))));
        let groups = watcher(Api::<Group>::all(client.clone()), cfg())
            .backoff(watch_backoff())
            .map(|r| r.map(|e| Update::Group(e.modify(strip))));
        let profiles = watcher(Api::<Profile>::all(client.clone()), cfg())
            .backoff(watch_backoff())
            .map(|r| r.map(|e| Update::Profile(e.modify(strip))));
        let nodes = watcher(Api::<Node>::all(client.clone()), cfg())
            .backoff(watch_backoff())
            .map(|r| {
                r.map(|e| {
                    Update::Node(e.modify(|n| {
                        strip(n);
                        if let Some(s) = n.status.as_mut() {
                            s.images = None; // large and unused
                        }
                    }))
                })
            });
        let (cm_tx, cm_rx) = mpsc::channel::<Update>(64);
        let cm_updates = tokio_stream_from(cm_rx);
        let kinds: Vec<UpdateStream> = vec![
            Box::pin(zones),
            Box::pin(hosts),
            Box::pin(groups),
            Box::pin(profiles),
            Box::pin(nodes),
            Box::pin(cm_updates.map(Ok)),
        ];
        let mut all = stream::select_all(kinds);
        let mut cm_tasks: HashMap<(String, String), tokio::task::JoinHandle<()>> = HashMap::new();
        while let Some(item) = all.next().await {
            match item {
                Ok(update) => {
                    let is_zone = matches!(update, Update::Zone(_));
                    self.apply(update);
                    if is_zone {
                        let wanted = self.read().referenced_config_maps();
                        cm_tasks.retain(|k, task| {
                            let keep = wanted.contains(k);
                            if !keep {
                                task.abort();
                            }
                            keep
                        });
                        for (ns, name) in wanted {
                            if cm_tasks.contains_key(&(ns.clone(), name.clone())) {
                                continue;
                            }
                            let task = tokio::spawn(watch_config_map(
                                client.clone(),
                                ns.clone(),
                                name.clone(),
                                cm_tx.clone(),
                            ));
                            cm_tasks.insert((ns, name), task);
                        }
                    }
                }
                Err(e) => tracing::warn!(error = %e, "watch failed, retrying"),
            }
        }
    }
}

type UpdateStream = std::pin::Pin<Box<dyn Stream<Item = Result<Update, watcher::Error>> + Send>>;

fn tokio_stream_from<T: Send + 'static>(mut rx: mpsc::Receiver<T>) -> impl Stream<Item = T> + Send {
    stream::poll_fn(move |cx| rx.poll_recv(cx))
}

async fn watch_config_map(
    client: Client,
    namespace: String,
    name: String,
    tx: mpsc::Sender<Update>,
) {
    let api: Api<ConfigMap> = Api::namespaced(client, &namespace);
    let mut s = std::pin::pin!(watcher::watch_object(api, &name).backoff(watch_backoff()));
    while let Some(item) = s.next().await {
        match item {
            Ok(object) => {
                let update = Update::ConfigMap {
                    namespace: namespace.clone(),
                    name: name.clone(),
                    object,
                };
                if tx.send(update).await.is_err() {
                    return;
                }
            }
            Err(e) => {
                tracing::warn!(%namespace, %name, error = %e, "ConfigMap watch failed, retrying")
            }
        }
    }
}

/// How watches retry: exponential from 0.5 s with jitter, capped at 4 s (kube-runtime's default
/// caps at 30 s), so that the operator sees changes again within seconds of the end of an API
/// server outage, however long it lasted.
fn watch_backoff() -> kube::runtime::utils::ResetTimerBackoff<watcher::ExponentialBackoff> {
    let builder = backon::ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(500))
        .with_max_delay(Duration::from_secs(4))
        .with_factor(2.0)
        .with_jitter()
        .without_max_times();
    kube::runtime::utils::ResetTimerBackoff::new(builder.into(), Duration::from_secs(60))
}

#[cfg(test)]
mod tests;
