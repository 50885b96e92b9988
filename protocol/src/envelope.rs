//! The signed (and, operator → agent, encrypted) envelope around every message (docs/design.md, Transport).
//! Pure functions and state machines; no IO. The wire format and the security model are
//! documented in `docs/protocol.md`; in short:
//!
//! ```text
//! "DOGE" | version u8 (=1) | mode u8 | sender Ed25519 public key (32)
//! | u32be H | header JSON (H bytes)            <- "header bytes" = everything up to here
//! | u32be K | key section (K bytes)
//! | u32be P | payload (P bytes)
//! | Ed25519 signature (64) over every preceding byte (mode 3: over
//!   SESSION_SIGNATURE_CONTEXT ‖ SHA-256 of every preceding byte)
//! ```
//!
//! * mode 0 [`Protection::Signed`]: agent → operator; payload is the JSON message; key section empty.
//! * mode 1 [`Protection::Hpke`]: operator → one agent; RFC 9180 HPKE base mode,
//!   DHKEM(X25519, HKDF-SHA256) / HKDF-SHA256 / AES-256-GCM, `info` = [`HPKE_INFO`],
//!   `aad` = the header bytes; key section = `enc` (32); payload = HPKE ciphertext.
//! * mode 2 [`Protection::MultiRecipient`]: operator → many agents (shared sets). Two-layer key
//!   wrapping as in JWE/COSE multi-recipient: the payload is encrypted once with AES-256-GCM
//!   under a random content key (`aad` = the header bytes), and the content key is HPKE-sealed
//!   (same suite, `info` = [`HPKE_INFO_KEY_WRAP`], `aad` = the header bytes) to each recipient.
//!   Key section = nonce (12) ‖ for each header recipient in order: `enc` (32) ‖ wrapped key (48).
//! * mode 3 [`Protection::Session`]: operator → one agent that announced it opens sessions
//!   ([`crate::messages::Heartbeat::session_envelopes`]): the same HPKE setup as mode 1 with
//!   `info` = [`HPKE_INFO_SESSION`], done once per agent key and session, whose exported key
//!   (exporter context [`SESSION_KEY_CONTEXT`], 32 bytes) encrypts many payloads with
//!   AES-256-GCM (`aad` = the header bytes). Key section = the session's `enc` (32) ‖ this
//!   envelope's nonce (12); `envelope/session.rs` says why, and how long a session lasts.
//!   Its signature is over [`SESSION_SIGNATURE_CONTEXT`] ‖ SHA-256(every preceding byte), not
//!   the bytes themselves: Ed25519 hashes what it signs with SHA-512 twice (once to verify),
//!   which on machines without SHA-512 instructions runs at about a third of SHA-256's speed;
//!   the context's first byte can't begin an envelope, so no signature over one is valid as
//!   the other.
//!
//! A receiver ([`Opener`]) checks size caps, version, the sender's key, the signature, the
//! header (recipient, validity window, replay, revision) and only then decrypts and hands out
//! the payload; every refusal is a typed [`Rejection`] and leaves the opener's state unchanged.

use crate::keys::pinning::{PinError, PinOutcome, Pins};
use crate::keys::{
    fingerprint, AgentKem, EncryptionKey, EncryptionPublicKey, SigningKey, SigningPublicKey,
    TrustedKeys,
};
use crate::messages::{
    AgentMessage, Heartbeat, LimitError, OperatorMessage, Request, SCHEMA_VERSION,
};
use hpke::aead::AesGcm256;
use hpke::kdf::HkdfSha256;
use hpke::{Deserializable, OpModeR, OpModeS, Serializable};
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};
use ring::rand::{SecureRandom, SystemRandom};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeSet, HashMap};
use uuid::Uuid;

/// First bytes of every envelope.
pub const MAGIC: &[u8; 4] = b"DOGE";
/// Envelope format version (the byte after the magic).
pub const VERSION: u8 = 1;
/// HPKE `info` for single-recipient payloads.
pub const HPKE_INFO: &[u8] = b"dog-envelope v1 payload";
/// HPKE `info` for wrapping a multi-recipient content key.
pub const HPKE_INFO_KEY_WRAP: &[u8] = b"dog-envelope v1 content-key";

/// Largest header JSON.
pub const MAX_HEADER: usize = 1024 * 1024;
/// Largest recipient list of one envelope.
pub const MAX_RECIPIENTS: usize = 10_000;
/// Largest name in `sender` / `recipients`.
pub const MAX_NAME: usize = 253;
/// Largest plaintext payload.
pub const MAX_PAYLOAD: usize = crate::messages::limits::MESSAGE_BYTES;
const TAG: usize = 16;
const ENC: usize = 32;
const NONCE: usize = 12;
const SLOT: usize = ENC + 32 + TAG;
/// Largest key section (a nonce and one slot per recipient).
pub const MAX_KEYS: usize = NONCE + SLOT * MAX_RECIPIENTS;
const PREAMBLE: usize = 4 + 1 + 1 + 32;
const SIG: usize = 64;
/// Smallest possible envelope (all sections empty).
pub const MIN_ENVELOPE: usize = PREAMBLE + 4 + 4 + 4 + SIG;
/// Largest envelope accepted.
pub const MAX_ENVELOPE: usize = MIN_ENVELOPE + MAX_HEADER + MAX_KEYS + MAX_PAYLOAD + TAG;

/// How the payload is protected (the mode byte).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protection {
    Signed = 0,
    Hpke = 1,
    MultiRecipient = 2,
    Session = 3,
}

impl Protection {
    fn from_byte(b: u8) -> Option<Protection> {
        match b {
            0 => Some(Protection::Signed),
            1 => Some(Protection::Hpke),
            2 => Some(Protection::MultiRecipient),
            3 => Some(Protection::Session),
            _ => None,
        }
    }
}

/// What the payload is.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[serde(rename_all = "snake_case")]
pub enum MessageKind {
    Heartbeat,
    Keepalive,
    Response,
    Request,
}

/// The authenticated header (signed; also the AEAD associated data).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Header {
    /// Payload schema version ([`SCHEMA_VERSION`]).
    pub schema: u16,
    pub kind: MessageKind,
    /// `dog-operator` (or the configured operator identity) or the agent's host name.
    pub sender: String,
    /// Who may open it: one name, or every host of a shared set.
    pub recipients: Vec<String>,
    /// Unique message id (replay protection). For requests, the request id.
    pub id: Uuid,
    /// Desired-state revision (`Apply`, `ApplySetDeltas`).
    #[serde(default)]
    pub revision: Option<u64>,
    /// Unix seconds.
    pub issued_at: u64,
    /// Unix seconds; not accepted after this (plus the clock-skew allowance).
    pub expires_at: u64,
    /// Fingerprint of the signing key (equals the fingerprint of the key in the preamble).
    pub key_id: String,
}

/// The caller-chosen header fields (the sealer adds schema, sender and key id).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeaderFields {
    pub kind: MessageKind,
    pub recipients: Vec<String>,
    pub id: Uuid,
    pub revision: Option<u64>,
    pub issued_at: u64,
    pub expires_at: u64,
}

/// Why sealing failed (all are caller errors or RNG failure).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SealError {
    #[error("{what} is too large: {actual} > {limit}")]
    TooLarge {
        what: &'static str,
        limit: usize,
        actual: usize,
    },
    #[error("invalid header: {0}")]
    Header(String),
    #[error("message exceeds a limit: {0}")]
    Limit(#[from] LimitError),
    #[error("encryption failed: {0}")]
    Crypto(String),
}

/// Why an envelope was refused. [`reason`](Rejection::reason) is the metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, thiserror::Error)]
pub enum Rejection {
    #[error("malformed envelope")]
    Malformed,
    #[error("envelope too large")]
    TooLarge,
    #[error("unsupported envelope or schema version")]
    UnsupportedVersion,
    #[error("unknown sender or signing key")]
    UnknownSender,
    #[error("the sender's key differs from the key pinned for it")]
    KeyChanged,
    #[error("bad signature")]
    BadSignature,
    #[error("not addressed to this receiver")]
    WrongRecipient,
    #[error("expired, not yet valid, or validity window too long")]
    Expired,
    #[error("message id seen before")]
    Replayed,
    #[error("revision not newer than the applied one")]
    StaleRevision,
    #[error("a request that is not encrypted")]
    Unencrypted,
    #[error("payload could not be decrypted")]
    Undecryptable,
}

impl Rejection {
    pub const ALL: [Rejection; 12] = [
        Rejection::Malformed,
        Rejection::TooLarge,
        Rejection::UnsupportedVersion,
        Rejection::UnknownSender,
        Rejection::KeyChanged,
        Rejection::BadSignature,
        Rejection::WrongRecipient,
        Rejection::Expired,
        Rejection::Replayed,
        Rejection::StaleRevision,
        Rejection::Unencrypted,
        Rejection::Undecryptable,
    ];

    /// Stable metric label (`dog_envelope_rejected_total{reason=…}`).
    pub fn reason(&self) -> &'static str {
        match self {
            Rejection::Malformed => "malformed",
            Rejection::TooLarge => "too_large",
            Rejection::UnsupportedVersion => "unsupported_version",
            Rejection::UnknownSender => "unknown_sender",
            Rejection::KeyChanged => "key_changed",
            Rejection::BadSignature => "bad_signature",
            Rejection::WrongRecipient => "wrong_recipient",
            Rejection::Expired => "expired",
            Rejection::Replayed => "replayed",
            Rejection::StaleRevision => "stale_revision",
            Rejection::Unencrypted => "unencrypted",
            Rejection::Undecryptable => "undecryptable",
        }
    }
}

mod open;
mod seal;
mod session;

pub use open::{
    Opened, Opener, PayloadError, ReplayCache, ReplayFloor, TimePolicy, Trust, MAX_FIRST_HEARTBEAT,
};
pub use seal::{Encryption, Sealer};
pub use session::{SessionLimits, HPKE_INFO_SESSION, RECEIVER_SESSIONS, SESSION_KEY_CONTEXT};

/// What a mode 3 envelope's signature covers before the digest of its bytes.
pub const SESSION_SIGNATURE_CONTEXT: &[u8] = b"dog-envelope v1 session signature\0";

/// What the signature of an envelope in `mode` whose signed bytes are `signed` covers.
fn signature_input(mode: Protection, signed: &[u8]) -> std::borrow::Cow<'_, [u8]> {
    match mode {
        Protection::Session => {
            let digest = ring::digest::digest(&ring::digest::SHA256, signed);
            let mut input = Vec::with_capacity(SESSION_SIGNATURE_CONTEXT.len() + 32);
            input.extend_from_slice(SESSION_SIGNATURE_CONTEXT);
            input.extend_from_slice(digest.as_ref());
            std::borrow::Cow::Owned(input)
        }
        _ => std::borrow::Cow::Borrowed(signed),
    }
}

// ------------------------------------------------------------------------------------------
// framing (parse)
// ------------------------------------------------------------------------------------------

fn check_names(h: &Header) -> Result<(), Rejection> {
    let ok = |n: &String| !n.is_empty() && n.len() <= MAX_NAME;
    if ok(&h.sender) && h.recipients.iter().all(ok) {
        Ok(())
    } else {
        Err(Rejection::Malformed)
    }
}

/// The sections of an envelope, located but not yet trusted.
struct Frame<'a> {
    mode: Protection,
    sender_key: SigningPublicKey,
    /// Preamble + header length + header JSON: the AEAD associated data.
    header_bytes: &'a [u8],
    header_json: &'a [u8],
    keys: &'a [u8],
    payload: &'a [u8],
    signed: &'a [u8],
    signature: &'a [u8],
}

fn take_section<'a>(bytes: &'a [u8], pos: &mut usize, cap: usize) -> Result<&'a [u8], Rejection> {
    let len_bytes = bytes.get(*pos..*pos + 4).ok_or(Rejection::Malformed)?;
    let len = u32::from_be_bytes([len_bytes[0], len_bytes[1], len_bytes[2], len_bytes[3]]) as usize;
    if len > cap {
        return Err(Rejection::TooLarge);
    }
    let start = *pos + 4;
    let end = start.checked_add(len).ok_or(Rejection::Malformed)?;
    let data = bytes.get(start..end).ok_or(Rejection::Malformed)?;
    *pos = end;
    Ok(data)
}

/// The key an envelope says it is signed by, from its framing alone (nothing verified): what a
/// receiver may key a rate limit on before it spends anything on the envelope.
pub fn claimed_signing_key(bytes: &[u8]) -> Option<SigningPublicKey> {
    parse_frame(bytes).ok().map(|f| f.sender_key)
}

fn parse_frame(bytes: &[u8]) -> Result<Frame<'_>, Rejection> {
    if bytes.len() > MAX_ENVELOPE {
        return Err(Rejection::TooLarge);
    }
    if bytes.len() < PREAMBLE || &bytes[..4] != MAGIC {
        return Err(Rejection::Malformed);
    }
    if bytes[4] != VERSION {
        return Err(Rejection::UnsupportedVersion);
    }
    let mode = Protection::from_byte(bytes[5]).ok_or(Rejection::Malformed)?;
    let mut key = [0u8; 32];
    key.copy_from_slice(&bytes[6..PREAMBLE]);
    let mut pos = PREAMBLE;
    let header_json = take_section(bytes, &mut pos, MAX_HEADER)?;
    let header_end = pos;
    let keys = take_section(bytes, &mut pos, MAX_KEYS)?;
    let payload = take_section(bytes, &mut pos, MAX_PAYLOAD + TAG)?;
    if bytes.len() != pos + SIG {
        return Err(Rejection::Malformed);
    }
    Ok(Frame {
        mode,
        sender_key: SigningPublicKey(key),
        header_bytes: &bytes[..header_end],
        header_json,
        keys,
        payload,
        signed: &bytes[..pos],
        signature: &bytes[pos..],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replay_cache_evicts_expired_then_soonest() {
        let mut c = ReplayCache::new(2);
        let (a, b, d) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
        c.insert(a, 100, 10);
        c.insert(b, 50, 10);
        assert!(c.contains(&a, 20) && c.contains(&b, 20));
        // full: b expires soonest and goes
        c.insert(d, 200, 20);
        assert_eq!(c.len(), 2);
        assert!(!c.contains(&b, 20) && c.contains(&a, 20) && c.contains(&d, 20));
        // at 150, a is expired and purged on the next insert
        c.insert(b, 300, 150);
        assert!(!c.contains(&a, 150));
        assert!(c.contains(&b, 150) && c.contains(&d, 150));
    }

    #[test]
    fn reasons_are_distinct() {
        let set: BTreeSet<&str> = Rejection::ALL.iter().map(Rejection::reason).collect();
        assert_eq!(set.len(), Rejection::ALL.len());
    }

    #[test]
    fn short_and_garbage_inputs_are_malformed() {
        let (k, _) = SigningKey::generate().unwrap();
        let mut o = Opener::for_agent(
            "h1",
            EncryptionKey::generate(),
            "op",
            TrustedKeys::new([k.public()]),
        );
        assert_eq!(o.open(b"", 0), Err(Rejection::Malformed));
        assert_eq!(o.open(b"DOGE", 0), Err(Rejection::Malformed));
        assert_eq!(
            o.open(
                b"DOGE\x02\x00aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
                0
            ),
            Err(Rejection::UnsupportedVersion)
        );
    }
}
