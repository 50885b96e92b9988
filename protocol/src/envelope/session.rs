//! Mode 3 sessions: one HPKE context per agent key, set up once and used for many envelopes.
//!
//! Mode 1 runs a whole HPKE encapsulation for every envelope: an ephemeral X25519 key pair and
//! a Diffie-Hellman on the operator, another Diffie-Hellman on the agent (about 70 µs and
//! 50 µs). For a change that reaches 5,000 hosts that was a third of the operator's CPU and a
//! fifth of an agent simulator's. A session sets up the same HPKE context (base mode, same
//! suite, `info` = [`HPKE_INFO_SESSION`]) once per agent key and exports an AES-256-GCM key
//! from it (RFC 9180 §5.3, exporter context [`SESSION_KEY_CONTEXT`]); each envelope carries the
//! session's `enc` and its own nonce, so a receiver that has not seen the session yet (it
//! restarted, or the operator did) derives the key from the envelope alone.
//!
//! * Nonces are a counter per session, kept under the session's lock: never repeated under one
//!   key. A session ends after [`SessionLimits::messages`] envelopes or
//!   [`SessionLimits::secs`] seconds (by the envelopes' issue time), and the next envelope
//!   starts a new one.
//! * A receiver derives a key only for an envelope whose signature and header it accepted, and
//!   keeps the keys of its last [`RECEIVER_SESSIONS`] sessions (a failover briefly has two
//!   operators).
//! * Nothing is weaker than mode 1: the key is as secret as the agent's private key and the
//!   operator's memory, which already hold every plaintext; the signature still covers the
//!   `enc`, the nonce and the ciphertext; replay protection is the message id's, as before.

use super::*;
use std::collections::hash_map::Entry;
use std::collections::VecDeque;
use std::sync::{Mutex, PoisonError};
use zeroize::Zeroizing;

/// HPKE `info` of a session's context.
pub const HPKE_INFO_SESSION: &[u8] = b"dog-envelope v1 session";
/// HPKE exporter context of a session's AES-256-GCM key.
pub const SESSION_KEY_CONTEXT: &[u8] = b"dog-envelope v1 session key";
/// How many sessions' keys a receiver keeps.
pub const RECEIVER_SESSIONS: usize = 4;
/// How many agents' sessions a sender keeps; past it, every session starts anew.
const SENDER_SESSIONS: usize = 262_144;

type Key = Zeroizing<[u8; 32]>;

/// When a sender's session ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SessionLimits {
    /// Envelopes per session (far below AES-GCM's limits for one key).
    pub messages: u64,
    /// Seconds between a session's first envelope and its last.
    pub secs: u64,
}

impl Default for SessionLimits {
    fn default() -> Self {
        SessionLimits {
            messages: 1 << 24,
            secs: 3600,
        }
    }
}

struct SenderSession {
    enc: [u8; ENC],
    key: Key,
    started: u64,
    sent: u64,
}

/// A sender's sessions, by agent encryption key (shared by the threads that seal).
pub(super) struct SenderSessions {
    limits: SessionLimits,
    by_agent: Mutex<HashMap<[u8; 32], SenderSession>>,
}

/// What one envelope of a session needs.
pub(super) struct SessionSeal {
    pub enc: [u8; ENC],
    pub key: Key,
    pub nonce: [u8; NONCE],
}

impl SenderSessions {
    pub(super) fn new(limits: SessionLimits) -> Self {
        SenderSessions {
            limits,
            by_agent: Mutex::new(HashMap::new()),
        }
    }

    /// The session to `agent` for an envelope issued at `now`, and that envelope's nonce; a
    /// new session when there is none or the last one is used up.
    pub(super) fn next(
        &self,
        agent: &EncryptionPublicKey,
        now: u64,
    ) -> Result<SessionSeal, SealError> {
        let limits = self.limits;
        let usable = move |s: &SenderSession| {
            now >= s.started && now - s.started < limits.secs && s.sent < limits.messages
        };
        if let Some(seal) = self.take_nonce(agent, &usable) {
            return Ok(seal);
        }
        // set up outside the lock: the other sealing threads go on meanwhile
        let fresh = start(agent, now)?;
        let mut by_agent = self.by_agent.lock().unwrap_or_else(PoisonError::into_inner);
        if by_agent.len() >= SENDER_SESSIONS && !by_agent.contains_key(&agent.0) {
            by_agent.clear();
        }
        // another thread may have set one up meanwhile: the first usable session is kept
        let session = match by_agent.entry(agent.0) {
            Entry::Occupied(mut kept) => {
                if !usable(kept.get()) {
                    kept.insert(fresh);
                }
                kept.into_mut()
            }
            Entry::Vacant(none) => none.insert(fresh),
        };
        Ok(nonce_of(session))
    }

    fn take_nonce(
        &self,
        agent: &EncryptionPublicKey,
        usable: &dyn Fn(&SenderSession) -> bool,
    ) -> Option<SessionSeal> {
        let mut by_agent = self.by_agent.lock().unwrap_or_else(PoisonError::into_inner);
        let session = by_agent.get_mut(&agent.0).filter(|s| usable(s))?;
        Some(nonce_of(session))
    }
}

/// The session's next nonce (its counter, big-endian, in the last 8 bytes).
fn nonce_of(session: &mut SenderSession) -> SessionSeal {
    let mut nonce = [0u8; NONCE];
    nonce[NONCE - 8..].copy_from_slice(&session.sent.to_be_bytes());
    session.sent += 1;
    SessionSeal {
        enc: session.enc,
        key: session.key.clone(),
        nonce,
    }
}

fn start(agent: &EncryptionPublicKey, now: u64) -> Result<SenderSession, SealError> {
    let pk = agent
        .to_hpke()
        .map_err(|e| SealError::Crypto(e.to_string()))?;
    let (enc, ctx) = hpke::setup_sender::<AesGcm256, HkdfSha256, AgentKem>(
        &OpModeS::Base,
        &pk,
        HPKE_INFO_SESSION,
    )
    .map_err(|e| SealError::Crypto(e.to_string()))?;
    let mut key = Zeroizing::new([0u8; 32]);
    ctx.export(SESSION_KEY_CONTEXT, &mut key[..])
        .map_err(|e| SealError::Crypto(e.to_string()))?;
    let mut enc_bytes = [0u8; ENC];
    enc_bytes.copy_from_slice(&enc.to_bytes());
    Ok(SenderSession {
        enc: enc_bytes,
        key,
        started: now,
        sent: 0,
    })
}

impl std::fmt::Debug for SenderSessions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let open = self
            .by_agent
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len();
        f.debug_struct("SenderSessions")
            .field("limits", &self.limits)
            .field("open", &open)
            .finish()
    }
}

/// A receiver's keys of its last sessions, newest first.
#[derive(Default)]
pub(super) struct ReceiverSessions {
    keys: VecDeque<([u8; ENC], Key)>,
    derived: u64,
}

impl ReceiverSessions {
    /// The key of session `enc`, derived with `secret` when it is not kept.
    pub(super) fn key(
        &mut self,
        secret: &EncryptionKey,
        enc: &[u8],
    ) -> Result<LessSafeKey, Rejection> {
        let at = self.keys.iter().position(|(e, _)| e[..] == *enc);
        let key = match at {
            Some(i) => {
                let kept = self.keys.remove(i).ok_or(Rejection::Undecryptable)?;
                self.keys.push_front(kept);
                &self.keys[0].1
            }
            None => {
                let encapped = <AgentKem as hpke::Kem>::EncappedKey::from_bytes(enc)
                    .map_err(|_| Rejection::Undecryptable)?;
                let ctx = hpke::setup_receiver::<AesGcm256, HkdfSha256, AgentKem>(
                    &OpModeR::Base,
                    secret.hpke_secret(),
                    &encapped,
                    HPKE_INFO_SESSION,
                )
                .map_err(|_| Rejection::Undecryptable)?;
                let mut key = Zeroizing::new([0u8; 32]);
                ctx.export(SESSION_KEY_CONTEXT, &mut key[..])
                    .map_err(|_| Rejection::Undecryptable)?;
                let mut enc_bytes = [0u8; ENC];
                enc_bytes.copy_from_slice(enc);
                self.keys.truncate(RECEIVER_SESSIONS - 1);
                self.keys.push_front((enc_bytes, key));
                self.derived += 1;
                &self.keys[0].1
            }
        };
        Ok(LessSafeKey::new(
            UnboundKey::new(&AES_256_GCM, &key[..]).map_err(|_| Rejection::Undecryptable)?,
        ))
    }

    /// How many session keys were derived (each costs an X25519 operation).
    pub(super) fn derived(&self) -> u64 {
        self.derived
    }
}

impl std::fmt::Debug for ReceiverSessions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReceiverSessions")
            .field("kept", &self.keys.len())
            .field("derived", &self.derived)
            .finish()
    }
}
