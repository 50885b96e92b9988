//! Keys an administrator pinned in a Host's `spec.keys`: they are the host's pin, whatever an
//! agent sent before.

use super::*;

impl Runtime {
    /// Keys an administrator pinned in `spec.keys` are the host's pin, whatever an agent
    /// sent before: a changed `spec.keys` re-pins (and clears a key conflict).
    pub(super) fn sync_admin_pins(&mut self, snap: &Snapshot) {
        for (name, host) in &snap.hosts {
            let Some(keys) = &host.spec.keys else {
                continue;
            };
            if self.admin_pins.get(name) == Some(keys) {
                continue;
            }
            let parsed = (
                SigningPublicKey::from_base64(&keys.signing, "spec.keys.signing"),
                EncryptionPublicKey::from_base64(&keys.encryption, "spec.keys.encryption"),
            );
            let (s, e) = match parsed {
                (Ok(s), Ok(e)) => (s, e),
                (Err(err), _) | (_, Err(err)) => {
                    warn!(host = %name, error = %err, "ignoring unreadable keys in Host spec");
                    continue;
                }
            };
            if let dog_protocol::envelope::Trust::Agents(pins) = self.opener.trust_mut() {
                pins.set(
                    name.clone(),
                    Pin {
                        signing: s.fingerprint(),
                        encryption: Some(e.fingerprint()),
                    },
                );
            }
            info!(host = %name, fingerprint = %s.fingerprint(), "pinned agent keys from the Host's spec.keys");
            let rt = self.fleet.entry(name.clone()).or_default();
            if rt.encryption_key.as_ref() != Some(&e) {
                rt.encryption_key = Some(e);
                // what the new key's agent opens is known from its first heartbeat
                rt.session_envelopes = false;
                self.publish.forget(name);
            }
            rt.view.key_conflict = None;
            rt.view.not_admitted = None;
            rt.view.pinned_keys = Some(keys.clone());
            rt.view.key_fingerprint = Some(s.fingerprint());
            self.admin_pins.insert(name.clone(), keys.clone());
            self.admin_pins_changed = true;
            self.status_due(name);
        }
    }
}
