//! The operator's pins of agent keys (docs/design.md, Transport: identity): a host's keys are pinned by an admin
//! beforehand, or on a first heartbeat that the operator admitted (its ServiceAccount token
//! checked, or trust on first use where enabled); a different key for a pinned host is
//! refused with [`PinError::KeyChanged`] until an admin removes the pin.
//!
//! A pin holds key *fingerprints* (see [`super::fingerprint`]), so an admin can pre-pin a host
//! from the fingerprints the agent logs on first start. The full public keys come with each
//! heartbeat and are accepted only when their fingerprints match.
//!
//! Everything here is pure: the operator persists pins on its Host objects and loads them
//! into [`Pins`] at start.

use super::{EncryptionPublicKey, SigningPublicKey};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// The pinned keys of one host.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Pin {
    /// Fingerprint of the agent's Ed25519 signing key.
    pub signing: String,
    /// Fingerprint of the agent's X25519 encryption key; `None` when an admin pre-pinned only
    /// the signing key (it is then learned from the first heartbeat, which that key signs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encryption: Option<String>,
}

/// Which key of a host a [`PinError::KeyChanged`] is about.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum KeyRole {
    Signing,
    Encryption,
}

impl std::fmt::Display for KeyRole {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            KeyRole::Signing => "signing",
            KeyRole::Encryption => "encryption",
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PinError {
    #[error("host {host} offered {role} key {offered_fp} but {pinned_fp} is pinned; refusing it (remove the pin on the Host to accept a re-keyed agent)")]
    KeyChanged {
        host: String,
        role: KeyRole,
        pinned_fp: String,
        offered_fp: String,
    },
    #[error("host {host} has no pinned key")]
    NotPinned { host: String },
    #[error("heartbeat of {host} is inconsistent with its envelope: {detail}")]
    Inconsistent { host: String, detail: String },
}

/// What [`Pins::check`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PinOutcome {
    /// The offered keys equal the pin.
    Matched,
    /// The host had no pin: this pin is new (first use) and must be persisted.
    NewPin(Pin),
    /// The host was pre-pinned with its signing key only; the encryption key is now learned
    /// and the completed pin must be persisted.
    Completed(Pin),
}

/// Pins by host name, and whether the first heartbeat of an unpinned host is opened at all.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Pins {
    pins: BTreeMap<String, Pin>,
    /// How many hosts each signing fingerprint is pinned for: a message signed by a key in
    /// no pin can only be a first heartbeat, which is checked cheaply before its signature.
    signing: std::collections::HashMap<String, usize>,
    /// Open the first heartbeat of an unpinned host (as [`PinOutcome::NewPin`]) so that the
    /// caller can decide whether to admit it; otherwise it is refused (`NotPinned`).
    pub open_first_heartbeats: bool,
}

impl Pins {
    pub fn new(open_first_heartbeats: bool) -> Self {
        Pins {
            pins: BTreeMap::new(),
            signing: Default::default(),
            open_first_heartbeats,
        }
    }

    /// Sets (admin pre-pin, or a pin loaded from a Host) or replaces a host's pin.
    pub fn set(&mut self, host: impl Into<String>, pin: Pin) {
        *self.signing.entry(pin.signing.clone()).or_default() += 1;
        if let Some(old) = self.pins.insert(host.into(), pin) {
            self.forget_signing(&old.signing);
        }
    }

    /// Removes a host's pin (admin action to accept a re-keyed agent).
    pub fn remove(&mut self, host: &str) -> Option<Pin> {
        let old = self.pins.remove(host)?;
        self.forget_signing(&old.signing);
        Some(old)
    }

    fn forget_signing(&mut self, fp: &str) {
        if let Some(n) = self.signing.get_mut(fp) {
            *n -= 1;
            if *n == 0 {
                self.signing.remove(fp);
            }
        }
    }

    /// Whether a signing key (by fingerprint) is pinned for any host.
    pub fn knows_signing(&self, fingerprint: &str) -> bool {
        self.signing.contains_key(fingerprint)
    }

    pub fn get(&self, host: &str) -> Option<&Pin> {
        self.pins.get(host)
    }

    /// Checks offered keys against the pin without changing anything. `encryption` is `None`
    /// when only the signing key is known (while verifying an envelope, before its payload is
    /// parsed).
    pub fn check(
        &self,
        host: &str,
        signing: &SigningPublicKey,
        encryption: Option<&EncryptionPublicKey>,
    ) -> Result<PinOutcome, PinError> {
        let Some(pin) = self.pins.get(host) else {
            if !self.open_first_heartbeats {
                return Err(PinError::NotPinned {
                    host: host.to_string(),
                });
            }
            return Ok(PinOutcome::NewPin(Pin {
                signing: signing.fingerprint(),
                encryption: encryption.map(EncryptionPublicKey::fingerprint),
            }));
        };
        let offered = signing.fingerprint();
        if pin.signing != offered {
            return Err(PinError::KeyChanged {
                host: host.to_string(),
                role: KeyRole::Signing,
                pinned_fp: pin.signing.clone(),
                offered_fp: offered,
            });
        }
        match (encryption, &pin.encryption) {
            (None, _) => Ok(PinOutcome::Matched),
            (Some(e), Some(pinned)) => {
                let offered = e.fingerprint();
                if *pinned == offered {
                    Ok(PinOutcome::Matched)
                } else {
                    Err(PinError::KeyChanged {
                        host: host.to_string(),
                        role: KeyRole::Encryption,
                        pinned_fp: pinned.clone(),
                        offered_fp: offered,
                    })
                }
            }
            (Some(e), None) => Ok(PinOutcome::Completed(Pin {
                signing: pin.signing.clone(),
                encryption: Some(e.fingerprint()),
            })),
        }
    }

    /// [`check`](Self::check) with both keys of a heartbeat, recording a new or completed pin.
    pub fn check_and_pin(
        &mut self,
        host: &str,
        signing: &SigningPublicKey,
        encryption: &EncryptionPublicKey,
    ) -> Result<PinOutcome, PinError> {
        let outcome = self.check(host, signing, Some(encryption))?;
        if let PinOutcome::NewPin(pin) | PinOutcome::Completed(pin) = &outcome {
            self.set(host.to_string(), pin.clone());
        }
        Ok(outcome)
    }

    pub fn len(&self) -> usize {
        self.pins.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pins.is_empty()
    }
}
