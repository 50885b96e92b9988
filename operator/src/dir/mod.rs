//! `--from-dir` mode: the same pipeline on a directory of YAML files, for VM fleets without
//! Kubernetes and for the demo. The directory is polled for changes; status goes to one YAML
//! file (a dot file inside the directory by default, which the loader never reads back).

pub mod load;

use crate::core::compile::Snapshot;
use crate::crd::{
    AgentPublicKeys, GroupStatus, HostStatus, InterfaceStatus, ProfileStatus, ZoneStatus,
};
use crate::runtime::sinks::{ObjectStatus, Registrar, Source, StatusError, StatusSink};
use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};
use tokio::sync::watch;
use tracing::{info, warn};

/// Default status file name inside the resource directory.
pub const STATUS_FILE: &str = ".dog-status.yaml";

/// Everything the operator reports in local mode.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct StatusFile {
    #[serde(default)]
    pub hosts: BTreeMap<String, HostStatus>,
    #[serde(default)]
    pub groups: BTreeMap<String, GroupStatus>,
    #[serde(default)]
    pub profiles: BTreeMap<String, ProfileStatus>,
    #[serde(default)]
    pub zones: BTreeMap<String, ZoneStatus>,
    /// Documents of the directory that could not be read (file, document, object, error).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub load_errors: Vec<String>,
}

impl StatusFile {
    pub fn read(path: &Path) -> Option<StatusFile> {
        let text = std::fs::read_to_string(path).ok()?;
        match serde_yaml::from_str(&text) {
            Ok(s) => Some(s),
            Err(e) => {
                warn!(file = %path.display(), error = %e, "ignoring unreadable status file");
                None
            }
        }
    }
}

/// Writes status into a [`StatusFile`], flushed to disk (atomically) by [`FileStatusSink::flusher`].
pub struct FileStatusSink {
    path: PathBuf,
    state: Mutex<(StatusFile, bool)>,
}

impl FileStatusSink {
    pub fn new(path: PathBuf, initial: StatusFile) -> Arc<Self> {
        Arc::new(FileStatusSink {
            path,
            state: Mutex::new((initial, true)),
        })
    }

    fn update(&self, f: impl FnOnce(&mut StatusFile) -> bool) {
        if let Ok(mut st) = self.state.lock() {
            let changed = f(&mut st.0);
            st.1 |= changed;
        }
    }

    pub fn set_load_errors(&self, errors: Vec<String>) {
        self.update(|s| {
            let changed = s.load_errors != errors;
            s.load_errors = errors;
            changed
        });
    }

    /// Writes the file now if anything changed since the last write.
    pub fn flush(&self) -> std::io::Result<()> {
        let text = {
            let Ok(mut st) = self.state.lock() else {
                return Ok(());
            };
            if !st.1 {
                return Ok(());
            }
            st.1 = false;
            serde_yaml::to_string(&st.0).map_err(std::io::Error::other)?
        };
        let tmp = self.path.with_extension("tmp");
        std::fs::write(&tmp, text)?;
        std::fs::rename(&tmp, &self.path)
    }

    /// Flushes every `every` until the process ends, but never spends more than a tenth of
    /// the time writing: a large fleet's file (thousands of hosts) is written less often.
    pub async fn flusher(self: Arc<Self>, every: Duration) {
        loop {
            let started = std::time::Instant::now();
            if let Err(e) = self.flush() {
                warn!(file = %self.path.display(), error = %e, "could not write the status file");
            }
            tokio::time::sleep(every.max(started.elapsed() * 10)).await;
        }
    }
}

fn put<T: PartialEq>(map: &mut BTreeMap<String, T>, name: &str, value: T) -> bool {
    if map.get(name) == Some(&value) {
        return false;
    }
    map.insert(name.to_string(), value);
    true
}

impl StatusSink for FileStatusSink {
    fn write<'a>(
        &'a self,
        name: &'a str,
        status: ObjectStatus,
    ) -> BoxFuture<'a, Result<(), StatusError>> {
        self.update(|s| match status {
            ObjectStatus::Host(st) => put(&mut s.hosts, name, *st),
            ObjectStatus::Group(st) => put(&mut s.groups, name, st),
            ObjectStatus::Profile(st) => put(&mut s.profiles, name, st),
            ObjectStatus::Zone(st) => put(&mut s.zones, name, st),
        });
        Box::pin(async { Ok(()) })
    }
    fn forget(&self, kind: &'static str, name: &str) {
        self.update(|s| match kind {
            "Host" => s.hosts.remove(name).is_some(),
            "Group" => s.groups.remove(name).is_some(),
            "Profile" => s.profiles.remove(name).is_some(),
            "Zone" => s.zones.remove(name).is_some(),
            _ => false,
        });
    }
}

/// In local mode an agent-registered host exists in the operator's memory and in the status
/// file (with its pinned keys), so nothing needs creating.
pub struct LocalRegistrar;

impl Registrar for LocalRegistrar {
    fn register<'a>(
        &'a self,
        name: &'a str,
        _keys: &'a AgentPublicKeys,
        _interfaces: &'a [InterfaceStatus],
    ) -> BoxFuture<'a, Result<(), String>> {
        info!(
            host = name,
            "agent registered (local mode: kept in the status file)"
        );
        Box::pin(async { Ok(()) })
    }

    fn collect<'a>(&'a self, _name: &'a str) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async {
            Err("local mode deletes no Host: its resource files are the administrator's".into())
        })
    }

    fn collects(&self) -> bool {
        false
    }
}

/// A fingerprint of the directory's YAML files (names, sizes, modification times).
fn fingerprint(dir: &Path) -> Vec<(PathBuf, u64, Option<SystemTime>)> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            let name = e.file_name().to_string_lossy().to_string();
            let yaml = name.ends_with(".yaml") || name.ends_with(".yml");
            if !yaml || name.starts_with('.') {
                continue;
            }
            if let Ok(md) = e.metadata() {
                out.push((p, md.len(), md.modified().ok()));
            }
        }
    }
    out.sort();
    out
}

/// Polls `dir` every `every` and republishes the snapshot when a YAML file changed.
pub fn dir_source(
    dir: PathBuf,
    every: Duration,
    sink: Arc<FileStatusSink>,
) -> Result<Source, load::DirError> {
    let first = load::load_dir_traced(&dir)?;
    report_load_errors(&first.errors, &sink);
    let current = Arc::new(Mutex::new(first.snapshot.clone()));
    let (tx, rx) = watch::channel(0u64);
    let shared = current.clone();
    tokio::spawn(async move {
        let mut last = fingerprint(&dir);
        let mut previous = first;
        let mut version = 0u64;
        loop {
            tokio::time::sleep(every).await;
            let now = fingerprint(&dir);
            if now == last {
                continue;
            }
            last = now;
            match load::load_dir_traced(&dir) {
                Ok(mut next) => {
                    load::keep_last_good(&previous, &mut next);
                    report_load_errors(&next.errors, &sink);
                    let snap = &next.snapshot;
                    info!(dir = %dir.display(), zones = snap.zones.len(), hosts = snap.hosts.len(), groups = snap.groups.len(), profiles = snap.profiles.len(), stale = snap.stale.len(), "resources changed");
                    if let Ok(mut c) = shared.lock() {
                        *c = snap.clone();
                    }
                    previous = next;
                    version += 1;
                    if tx.send(version).is_err() {
                        return;
                    }
                }
                Err(e) => {
                    warn!(dir = %dir.display(), error = %e, "could not read the resource directory; keeping the last snapshot")
                }
            }
        }
    });
    Ok(Source {
        changes: rx,
        snapshot: Box::new(move || {
            current
                .lock()
                .map(|s| s.clone())
                .unwrap_or_else(|_| Snapshot::default())
        }),
    })
}

fn report_load_errors(errors: &[load::LoadError], sink: &FileStatusSink) {
    for e in errors {
        warn!(error = %e, "skipping a document that could not be read; everything else is used");
    }
    sink.set_load_errors(errors.iter().map(|e| e.to_string()).collect());
}
