//! Persistence of the last applied firewall, so a restarted agent can re-verify and keep
//! enforcing before the operator speaks again.

use dog_protocol::ruleset::HostFirewall;
use serde::{Deserialize, Serialize};
use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// File name of the applied state inside the state directory.
pub const APPLIED_FILE: &str = "applied.json";

/// The firewall the agent last applied successfully, with its revision.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct AppliedState {
    pub revision: u64,
    pub firewall: HostFirewall,
}

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not a valid applied-state file: {source}")]
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
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| StateError::Io { path, source }
        };
        fs::create_dir_all(&self.dir).map_err(io(&self.dir))?;
        let final_path = self.path();
        let tmp = self.dir.join(format!(".{APPLIED_FILE}.tmp"));
        let data = serde_json::to_vec(state).map_err(|source| StateError::Parse {
            path: final_path.clone(),
            source,
        })?;
        {
            let mut f = fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)
                .map_err(io(&tmp))?;
            f.write_all(&data).map_err(io(&tmp))?;
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
        let path = self.path();
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
    use dog_protocol::ruleset::{Failsafe, Family, RulesDocument};
    use std::os::unix::fs::PermissionsExt;

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
            firewall: HostFirewall {
                host: "n1".into(),
                ipv4: doc(Family::V4),
                ipv6: doc(Family::V6),
                sets: Default::default(),
                failsafe: Failsafe::default(),
            },
        };
        store.save(&st).unwrap();
        store.save(&st).unwrap();
        assert_eq!(store.load().unwrap(), Some(st));
        let mode = fs::metadata(store.path()).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        fs::write(store.path(), b"{").unwrap();
        assert!(matches!(store.load(), Err(StateError::Parse { .. })));
    }
}
