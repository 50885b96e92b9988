//! Updates of shared sets: a whole new content (`shared_set`) or a change against the copy
//! this host holds (`shared_set_delta`), each applied like a desired state once its version is
//! newer than the one held.

use super::*;
use dog_protocol::messages::SetChange;

impl Agent {
    /// The revision and firewall an update of shared set `name` to `version` goes into; or why
    /// it is ignored (not newer than the version held, no firewall yet, a set this host does
    /// not use).
    pub(super) fn shared_set_target(
        &self,
        name: &str,
        version: u64,
    ) -> Result<(u64, Firewall), String> {
        if let Some(held) = self.replay.set_versions.get(name) {
            if version <= *held {
                return Err(format!(
                    "version {version} of {name} is not newer than {held}"
                ));
            }
        }
        let Some((revision, base)) = self.current() else {
            return Err("no firewall yet".into());
        };
        if !base.sets.contains_key(name) {
            return Err(format!("set {name} is not used by this host"));
        }
        Ok((revision, base.clone()))
    }

    /// A change of a shared set: applied to this host's copy when that copy is the one the
    /// operator computed it against (by hash), and only if the result is what the operator
    /// has (by hash); otherwise `base_mismatch`, and the operator sends the full state.
    pub(super) async fn shared_set_delta(&mut self, id: Uuid, change: SetChange) -> Response {
        let SetChange {
            name,
            version,
            base_hash,
            hash,
            add,
            remove,
        } = change;
        let (revision, base) = match self.shared_set_target(&name, version) {
            Ok(target) => target,
            Err(why) => return ignored_update(id, &name, version, why),
        };
        let Some(copy) = base.sets.get(&name) else {
            return Response::error(id, ErrorKind::Internal, format!("set {name} vanished"));
        };
        if copy.hash() != base_hash {
            return Response::error(
                id,
                ErrorKind::BaseMismatch,
                format!(
                    "set {name} here has hash {}, the change is against {}",
                    copy.hash(),
                    base_hash
                ),
            );
        }
        let (added, removed) = (add.len(), remove.len());
        let delta = dog_protocol::messages::SetDelta {
            name: name.clone(),
            add,
            remove,
        };
        let changed = crate::core::sets::apply_delta(copy, &delta);
        if changed.hash() != hash {
            return Response::error(
                id,
                ErrorKind::BaseMismatch,
                format!(
                    "set {name} after the change has hash {}, the operator's has {}",
                    changed.hash(),
                    hash
                ),
            );
        }
        let mut next = base;
        self.replay.set_versions.insert(name.clone(), version);
        info!(set = %name, version, added, removed, "shared set change");
        next.sets.insert(name, Arc::new(changed));
        self.pending = None;
        self.apply_desired(id, revision, next).await
    }

    pub(super) async fn shared_set(
        &mut self,
        id: Uuid,
        set: dog_protocol::ruleset::IpSet,
        version: u64,
    ) -> Response {
        let (revision, base) = match self.shared_set_target(&set.name, version) {
            Ok(target) => target,
            Err(why) => return ignored_update(id, &set.name, version, why),
        };
        let mut next = base;
        self.replay.set_versions.insert(set.name.clone(), version);
        info!(set = %set.name, version, members = set.members.len(), "shared set update");
        let name = set.name.clone();
        // Packed and hashed once; the other sets stay shared with the applied firewall.
        next.sets.insert(name, Arc::new(SetContent::from(set)));
        self.pending = None;
        self.apply_desired(id, revision, next).await
    }
}

/// The answer to a shared-set update that is ignored, and why.
fn ignored_update(id: Uuid, name: &str, version: u64, why: String) -> Response {
    debug!(set = %name, version, %why, "shared set update ignored");
    text_ok(id, None, None, format!("ignored: {why}"))
}
