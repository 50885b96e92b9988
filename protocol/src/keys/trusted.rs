//! The operator keys an agent trusts (agent side).

use super::{KeyError, SigningPublicKey};
use std::collections::BTreeMap;

/// The operator keys an agent accepts, by key id. During a rotation the set holds the old and
/// the new key; once the old key is removed, messages signed with it are rejected as
/// `UnknownSender`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TrustedKeys {
    keys: BTreeMap<String, SigningPublicKey>,
}

impl TrustedKeys {
    pub fn new(keys: impl IntoIterator<Item = SigningPublicKey>) -> Self {
        let mut t = TrustedKeys::default();
        for k in keys {
            t.insert(k);
        }
        t
    }

    /// Parses one public key per line, either `base64` or `key-id base64` (what `dog-operator
    /// keygen` prints; the key id must then match the key). Blank lines and `#` comments are
    /// ignored. `what` names the source in errors (with the line number).
    pub fn parse(text: &str, what: &str) -> Result<Self, KeyError> {
        let mut t = TrustedKeys::default();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let at = format!("{what} line {}", i + 1);
            let bad = |reason: String| KeyError::BadPublicKey {
                what: at.clone(),
                kind: "Ed25519",
                reason,
            };
            let (id, key) = match line.split_whitespace().collect::<Vec<_>>().as_slice() {
                [key] => (None, *key),
                [id, key] => (Some(*id), *key),
                _ => return Err(bad("expected `base64` or `key-id base64`".into())),
            };
            let k = SigningPublicKey::from_base64(key, &at)?;
            if let Some(id) = id.filter(|id| *id != k.fingerprint()) {
                return Err(bad(format!(
                    "key id {id} does not match the key (its id is {})",
                    k.fingerprint()
                )));
            }
            t.insert(k);
        }
        Ok(t)
    }

    pub fn insert(&mut self, key: SigningPublicKey) {
        self.keys.insert(key.fingerprint(), key);
    }

    /// Removes a key by its key id (fingerprint); returns whether it was present.
    pub fn remove(&mut self, key_id: &str) -> bool {
        self.keys.remove(key_id).is_some()
    }

    pub fn get(&self, key_id: &str) -> Option<&SigningPublicKey> {
        self.keys.get(key_id)
    }

    pub fn contains(&self, key: &SigningPublicKey) -> bool {
        self.keys.get(&key.fingerprint()) == Some(key)
    }

    pub fn key_ids(&self) -> impl Iterator<Item = &str> {
        self.keys.keys().map(String::as_str)
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }
}
