//! Persistence of the last applied firewall, so a restarted agent can re-verify and keep
//! enforcing before the operator speaks again.

use crate::core::firewall::Firewall;
use serde::{Deserialize, Serialize};
use std::fs;
use std::io::BufWriter;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// File name of the applied state inside the state directory.
pub const APPLIED_FILE: &str = "applied.json";
/// File name of the replay state (what was accepted, so a restart does not accept it again).
pub const REPLAY_FILE: &str = "replay.json";

/// File name of the node's own broker user, sent by the operator (see [`BrokerUser`]).
pub const BROKER_USER_FILE: &str = "broker-user.json";

/// The agent's own broker user, provisioned by the operator after it admitted the host. The
/// agent logs in with it instead of the bootstrap user, so its broker permissions cover its own
/// queue only. Kept 0600 beside the keys.
#[derive(Serialize, Deserialize, Clone, PartialEq, Eq)]
pub struct BrokerUser {
    pub username: String,
    pub password: String,
}

impl std::fmt::Debug for BrokerUser {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BrokerUser")
            .field("username", &self.username)
            .finish_non_exhaustive()
    }
}

/// What the agent accepted, kept across restarts: the newest issue time (and that second's
/// message ids), and the newest version of each shared set.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
pub struct ReplayState {
    pub floor: dog_protocol::envelope::ReplayFloor,
    #[serde(default)]
    pub set_versions: std::collections::BTreeMap<String, u64>,
}

/// The firewall the agent last applied successfully, with its revision. On disk the firewall
/// has the wire format of a `HostFirewall`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct AppliedState {
    pub revision: u64,
    pub firewall: Firewall,
}

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not a valid agent state file: {source}")]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

/// A state directory (created 0700 on first save).
#[derive(Clone, Debug)]
pub struct StateStore {
    dir: PathBuf,
}

impl StateStore {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        StateStore { dir: dir.into() }
    }

    pub fn path(&self) -> PathBuf {
        self.dir.join(APPLIED_FILE)
    }

    /// Writes atomically: a 0600 temporary file, fsync, rename over the old one.
    pub fn save(&self, state: &AppliedState) -> Result<(), StateError> {
        self.write_json(APPLIED_FILE, state)
    }

    /// Saves the replay state (same way as [`Self::save`]).
    pub fn save_replay(&self, state: &ReplayState) -> Result<(), StateError> {
        self.write_json(REPLAY_FILE, state)
    }

    /// The saved replay state, or `None` when nothing was saved yet.
    pub fn load_replay(&self) -> Result<Option<ReplayState>, StateError> {
        self.read_json(REPLAY_FILE)
    }

    /// Saves the node's broker user (same way as [`Self::save`]).
    pub fn save_broker_user(&self, user: &BrokerUser) -> Result<(), StateError> {
        self.write_json(BROKER_USER_FILE, user)
    }

    /// The saved broker user, or `None` when the operator has sent none yet.
    pub fn load_broker_user(&self) -> Result<Option<BrokerUser>, StateError> {
        self.read_json(BROKER_USER_FILE)
    }

    /// Forgets the broker user (the broker refused it: the agent asks for a new one).
    pub fn remove_broker_user(&self) -> Result<(), StateError> {
        let path = self.dir.join(BROKER_USER_FILE);
        match fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(StateError::Io { path, source }),
        }
    }

    fn write_json<T: Serialize>(&self, name: &str, state: &T) -> Result<(), StateError> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| StateError::Io { path, source }
        };
        fs::create_dir_all(&self.dir).map_err(io(&self.dir))?;
        let final_path = self.dir.join(name);
        let tmp = self.dir.join(format!(".{name}.tmp"));
        {
            let f = fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)
                .map_err(io(&tmp))?;
            // Written as it is serialised: a large set is never held as JSON text in memory.
            let mut w = BufWriter::with_capacity(1 << 16, f);
            serde_json::to_writer(&mut w, state).map_err(|source| {
                if source.is_io() {
                    StateError::Io {
                        path: tmp.clone(),
                        source: source.into(),
                    }
                } else {
                    StateError::Parse {
                        path: final_path.clone(),
                        source,
                    }
                }
            })?;
            let f = w.into_inner().map_err(|e| StateError::Io {
                path: tmp.clone(),
                source: e.into_error(),
            })?;
            f.sync_all().map_err(io(&tmp))?;
        }
        fs::rename(&tmp, &final_path).map_err(io(&final_path))?;
        if let Ok(d) = fs::File::open(&self.dir) {
            let _ = d.sync_all();
        }
        Ok(())
    }

    /// The saved state, or `None` when nothing was saved yet.
    pub fn load(&self) -> Result<Option<AppliedState>, StateError> {
        self.read_json(APPLIED_FILE)
    }

    fn read_json<T: for<'de> Deserialize<'de>>(&self, name: &str) -> Result<Option<T>, StateError> {
        let path = self.dir.join(name);
        let data = match fs::read(&path) {
            Ok(d) => d,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(StateError::Io { path, source }),
        };
        serde_json::from_slice(&data)
            .map(Some)
            .map_err(|source| StateError::Parse { path, source })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dog_protocol::ruleset::{Failsafe, Family, HostFirewall, IpSet, RulesDocument};
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn the_broker_user_is_kept_private_and_can_be_forgotten() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::new(dir.path().join("state"));
        assert_eq!(store.load_broker_user().unwrap(), None);
        let user = BrokerUser {
            username: "dog.node.n1".into(),
            password: "s3cret".into(),
        };
        store.save_broker_user(&user).unwrap();
        assert_eq!(store.load_broker_user().unwrap(), Some(user.clone()));
        let path = dir.path().join("state").join(BROKER_USER_FILE);
        let mode = fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(!format!("{user:?}").contains("s3cret"));
        store.remove_broker_user().unwrap();
        store.remove_broker_user().unwrap();
        assert_eq!(store.load_broker_user().unwrap(), None);
    }

    #[test]
    fn round_trips_with_private_mode() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::new(dir.path().join("state"));
        assert_eq!(store.load().unwrap(), None);
        let doc = |family| RulesDocument {
            family,
            text: "*filter\nCOMMIT\n".into(),
        };
        let st = AppliedState {
            revision: 7,
            firewall: Firewall::from(HostFirewall {
                host: "n1".into(),
                ipv4: doc(Family::V4),
                ipv6: doc(Family::V6),
                sets: [IpSet::new(
                    "dogz4-a",
                    Family::V4,
                    ["10.0.0.1/32".parse().unwrap()],
                )]
                .into_iter()
                .map(|s| (s.name.clone(), s))
                .collect(),
                failsafe: Failsafe::default(),
            }),
        };
        store.save(&st).unwrap();
        store.save(&st).unwrap();
        assert_eq!(store.load().unwrap(), Some(st.clone()));
        // the file holds a HostFirewall, as before
        #[derive(Deserialize)]
        struct OnDisk {
            revision: u64,
            firewall: HostFirewall,
        }
        let disk: OnDisk = serde_json::from_slice(&fs::read(store.path()).unwrap()).unwrap();
        assert_eq!(disk.revision, 7);
        assert_eq!(disk.firewall, st.firewall.to_host_firewall());
        let mode = fs::metadata(store.path()).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        fs::write(store.path(), b"{").unwrap();
        assert!(matches!(store.load(), Err(StateError::Parse { .. })));
    }
}
