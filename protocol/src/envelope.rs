//! The signed (and, operator → agent, encrypted) envelope around every message (docs/design.md, Transport).
//! Pure functions and state machines; no IO. The wire format and the security model are
//! documented in `docs/protocol.md`; in short:
//!
//! ```text
//! "DOGE" | version u8 (=1) | mode u8 | sender Ed25519 public key (32)
//! | u32be H | header JSON (H bytes)            <- "header bytes" = everything up to here
//! | u32be K | key section (K bytes)
//! | u32be P | payload (P bytes)
//! | Ed25519 signature (64) over every preceding byte
//! ```
//!
//! * mode 0 [`Mode::Signed`]: agent → operator; payload is the JSON message; key section empty.
//! * mode 1 [`Mode::Hpke`]: operator → one agent; RFC 9180 HPKE base mode,
//!   DHKEM(X25519, HKDF-SHA256) / HKDF-SHA256 / AES-256-GCM, `info` = [`HPKE_INFO`],
//!   `aad` = the header bytes; key section = `enc` (32); payload = HPKE ciphertext.
//! * mode 2 [`Mode::MultiRecipient`]: operator → many agents (shared sets). Two-layer key
//!   wrapping as in JWE/COSE multi-recipient: the payload is encrypted once with AES-256-GCM
//!   under a random content key (`aad` = the header bytes), and the content key is HPKE-sealed
//!   (same suite, `info` = [`HPKE_INFO_KEY_WRAP`], `aad` = the header bytes) to each recipient.
//!   Key section = nonce (12) ‖ for each header recipient in order: `enc` (32) ‖ wrapped key (48).
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
pub enum Mode {
    Signed = 0,
    Hpke = 1,
    MultiRecipient = 2,
}

impl Mode {
    fn from_byte(b: u8) -> Option<Mode> {
        match b {
            0 => Some(Mode::Signed),
            1 => Some(Mode::Hpke),
            2 => Some(Mode::MultiRecipient),
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

// ------------------------------------------------------------------------------------------
// sealing
// ------------------------------------------------------------------------------------------

/// Signs (and encrypts) messages as one sender.
#[derive(Debug)]
pub struct Sealer {
    identity: String,
    key: SigningKey,
}

impl Sealer {
    pub fn new(identity: impl Into<String>, key: SigningKey) -> Self {
        Sealer {
            identity: identity.into(),
            key,
        }
    }

    pub fn identity(&self) -> &str {
        &self.identity
    }

    pub fn public_key(&self) -> SigningPublicKey {
        self.key.public()
    }

    /// Mode 0: signs `payload` in the clear (agent → operator).
    pub fn sign_only(&self, fields: &HeaderFields, payload: &[u8]) -> Result<Vec<u8>, SealError> {
        check_payload(payload.len())?;
        let mut out = self.start(Mode::Signed, fields, 1)?;
        put_section(&mut out, &[]);
        put_section(&mut out, payload);
        Ok(self.finish(out))
    }

    /// Mode 1: HPKE-encrypts `payload` to one agent's X25519 key, then signs.
    pub fn seal_for_agent(
        &self,
        fields: &HeaderFields,
        payload: &[u8],
        agent: &EncryptionPublicKey,
    ) -> Result<Vec<u8>, SealError> {
        check_payload(payload.len())?;
        let mut out = self.start(Mode::Hpke, fields, 1)?;
        let pk = agent
            .to_hpke()
            .map_err(|e| SealError::Crypto(e.to_string()))?;
        let (enc, ct) = hpke::single_shot_seal::<AesGcm256, HkdfSha256, AgentKem>(
            &OpModeS::Base,
            &pk,
            HPKE_INFO,
            payload,
            &out,
        )
        .map_err(|e| SealError::Crypto(e.to_string()))?;
        put_section(&mut out, &enc.to_bytes());
        put_section(&mut out, &ct);
        Ok(self.finish(out))
    }

    /// Mode 2: encrypts `payload` once and wraps its content key to each recipient;
    /// `keys[i]` belongs to `fields.recipients[i]`.
    pub fn seal_for_many(
        &self,
        fields: &HeaderFields,
        payload: &[u8],
        keys: &[EncryptionPublicKey],
    ) -> Result<Vec<u8>, SealError> {
        check_payload(payload.len())?;
        if keys.len() != fields.recipients.len() {
            return Err(SealError::Header(format!(
                "{} recipients but {} keys",
                fields.recipients.len(),
                keys.len()
            )));
        }
        let mut out = self.start(Mode::MultiRecipient, fields, MAX_RECIPIENTS)?;
        let rng = SystemRandom::new();
        let mut cek = zeroize::Zeroizing::new([0u8; 32]);
        let mut nonce = [0u8; NONCE];
        rng.fill(&mut cek[..])
            .and_then(|_| rng.fill(&mut nonce))
            .map_err(|_| SealError::Crypto("system RNG failed".into()))?;
        let mut section = Vec::with_capacity(NONCE + SLOT * keys.len());
        section.extend_from_slice(&nonce);
        for k in keys {
            let pk = k.to_hpke().map_err(|e| SealError::Crypto(e.to_string()))?;
            let (enc, wrapped) = hpke::single_shot_seal::<AesGcm256, HkdfSha256, AgentKem>(
                &OpModeS::Base,
                &pk,
                HPKE_INFO_KEY_WRAP,
                &cek[..],
                &out,
            )
            .map_err(|e| SealError::Crypto(e.to_string()))?;
            section.extend_from_slice(&enc.to_bytes());
            section.extend_from_slice(&wrapped);
        }
        let key = LessSafeKey::new(
            UnboundKey::new(&AES_256_GCM, &cek[..])
                .map_err(|_| SealError::Crypto("bad content key".into()))?,
        );
        let mut ct = payload.to_vec();
        key.seal_in_place_append_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(&out[..]),
            &mut ct,
        )
        .map_err(|_| SealError::Crypto("AES-256-GCM seal failed".into()))?;
        put_section(&mut out, &section);
        put_section(&mut out, &ct);
        Ok(self.finish(out))
    }

    /// Seals a [`Request`] to one agent: message id = request id, revision from the request,
    /// valid `ttl_secs` from `now`.
    pub fn request(
        &self,
        agent: &str,
        agent_key: &EncryptionPublicKey,
        request: &Request,
        now: u64,
        ttl_secs: u64,
    ) -> Result<Vec<u8>, SealError> {
        let payload = encode_operator(request)?;
        let fields = request_fields(vec![agent.to_string()], request, now, ttl_secs);
        self.seal_for_agent(&fields, &payload, agent_key)
    }

    /// Seals one [`Request`] (normally a `SharedSet`) once for many agents.
    pub fn request_for_many(
        &self,
        agents: &[(String, EncryptionPublicKey)],
        request: &Request,
        now: u64,
        ttl_secs: u64,
    ) -> Result<Vec<u8>, SealError> {
        let payload = encode_operator(request)?;
        let names = agents.iter().map(|(n, _)| n.clone()).collect();
        let keys: Vec<EncryptionPublicKey> = agents.iter().map(|(_, k)| *k).collect();
        let fields = request_fields(names, request, now, ttl_secs);
        self.seal_for_many(&fields, &payload, &keys)
    }

    /// Signs an [`AgentMessage`] to the operator with a fresh message id.
    pub fn agent_message(
        &self,
        operator: &str,
        message: &AgentMessage,
        now: u64,
        ttl_secs: u64,
    ) -> Result<Vec<u8>, SealError> {
        message.validate()?;
        let payload = serde_json::to_vec(message).map_err(|e| SealError::Header(e.to_string()))?;
        let kind = match message {
            AgentMessage::Heartbeat(_) => MessageKind::Heartbeat,
            AgentMessage::Keepalive(_) => MessageKind::Keepalive,
            AgentMessage::Response(_) => MessageKind::Response,
        };
        let fields = HeaderFields {
            kind,
            recipients: vec![operator.to_string()],
            id: Uuid::new_v4(),
            revision: None,
            issued_at: now,
            expires_at: now.saturating_add(ttl_secs),
        };
        self.sign_only(&fields, &payload)
    }

    fn start(
        &self,
        mode: Mode,
        f: &HeaderFields,
        max_recipients: usize,
    ) -> Result<Vec<u8>, SealError> {
        let expected_kind = if mode == Mode::Signed {
            f.kind != MessageKind::Request
        } else {
            f.kind == MessageKind::Request
        };
        if !expected_kind {
            return Err(SealError::Header(format!(
                "{:?} messages are not sent in mode {mode:?}",
                f.kind
            )));
        }
        if f.recipients.is_empty() || f.recipients.len() > max_recipients {
            return Err(SealError::Header(format!(
                "{} recipients (1..={max_recipients} allowed)",
                f.recipients.len()
            )));
        }
        let unique: BTreeSet<&String> = f.recipients.iter().collect();
        if unique.len() != f.recipients.len() {
            return Err(SealError::Header("duplicate recipient".into()));
        }
        if f.expires_at < f.issued_at {
            return Err(SealError::Header("expires before it is issued".into()));
        }
        let header = Header {
            schema: SCHEMA_VERSION,
            kind: f.kind,
            sender: self.identity.clone(),
            recipients: f.recipients.clone(),
            id: f.id,
            revision: f.revision,
            issued_at: f.issued_at,
            expires_at: f.expires_at,
            key_id: self.key.key_id(),
        };
        check_names(&header).map_err(|_| {
            SealError::Header(format!("a name is empty or longer than {MAX_NAME} bytes"))
        })?;
        let json = serde_json::to_vec(&header).map_err(|e| SealError::Header(e.to_string()))?;
        if json.len() > MAX_HEADER {
            return Err(SealError::TooLarge {
                what: "header",
                limit: MAX_HEADER,
                actual: json.len(),
            });
        }
        let mut out = Vec::with_capacity(PREAMBLE + 4 + json.len());
        out.extend_from_slice(MAGIC);
        out.push(VERSION);
        out.push(mode as u8);
        out.extend_from_slice(&self.key.public().0);
        put_section(&mut out, &json);
        Ok(out)
    }

    fn finish(&self, mut out: Vec<u8>) -> Vec<u8> {
        let sig = self.key.sign(&out);
        out.extend_from_slice(&sig);
        out
    }
}

fn request_fields(recipients: Vec<String>, r: &Request, now: u64, ttl: u64) -> HeaderFields {
    HeaderFields {
        kind: MessageKind::Request,
        recipients,
        id: r.id,
        revision: r.request.revision(),
        issued_at: now,
        expires_at: now.saturating_add(ttl),
    }
}

fn encode_operator(r: &Request) -> Result<Vec<u8>, SealError> {
    r.validate()?;
    serde_json::to_vec(&OperatorMessage::Request(r.clone()))
        .map_err(|e| SealError::Header(e.to_string()))
}

fn check_payload(len: usize) -> Result<(), SealError> {
    if len > MAX_PAYLOAD {
        return Err(SealError::TooLarge {
            what: "payload",
            limit: MAX_PAYLOAD,
            actual: len,
        });
    }
    Ok(())
}

fn put_section(out: &mut Vec<u8>, data: &[u8]) {
    // Callers bound every section far below u32::MAX.
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
}

fn check_names(h: &Header) -> Result<(), Rejection> {
    let ok = |n: &String| !n.is_empty() && n.len() <= MAX_NAME;
    if ok(&h.sender) && h.recipients.iter().all(ok) {
        Ok(())
    } else {
        Err(Rejection::Malformed)
    }
}

// ------------------------------------------------------------------------------------------
// framing (parse)
// ------------------------------------------------------------------------------------------

/// The sections of an envelope, located but not yet trusted.
struct Frame<'a> {
    mode: Mode,
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
    let mode = Mode::from_byte(bytes[5]).ok_or(Rejection::Malformed)?;
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

// ------------------------------------------------------------------------------------------
// replay cache
// ------------------------------------------------------------------------------------------

/// Message ids seen within their validity window. Bounded: expired entries are dropped first;
/// when still full, the entry that expires soonest is evicted.
#[derive(Debug, Clone)]
pub struct ReplayCache {
    capacity: usize,
    by_id: HashMap<Uuid, u64>,
    by_expiry: BTreeSet<(u64, Uuid)>,
}

impl ReplayCache {
    pub fn new(capacity: usize) -> Self {
        ReplayCache {
            capacity: capacity.max(1),
            by_id: HashMap::new(),
            by_expiry: BTreeSet::new(),
        }
    }

    /// Whether `id` was seen and its entry is still live at `now`.
    pub fn contains(&self, id: &Uuid, now: u64) -> bool {
        self.by_id.get(id).is_some_and(|&until| until >= now)
    }

    /// Remembers `id` until `keep_until` (unix seconds).
    pub fn insert(&mut self, id: Uuid, keep_until: u64, now: u64) {
        while let Some(&(until, old)) = self.by_expiry.first() {
            if until >= now && self.by_id.len() < self.capacity {
                break;
            }
            self.by_expiry.pop_first();
            self.by_id.remove(&old);
        }
        if let Some(prev) = self.by_id.insert(id, keep_until) {
            self.by_expiry.remove(&(prev, id));
        }
        self.by_expiry.insert((keep_until, id));
    }

    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }
}

// ------------------------------------------------------------------------------------------
// opening
// ------------------------------------------------------------------------------------------

/// Whose signatures an [`Opener`] accepts.
#[derive(Debug, Clone)]
pub enum Trust {
    /// Agent side: messages from `operator` signed by any key of the set (rotation window).
    Operator { operator: String, keys: TrustedKeys },
    /// Operator side: messages from agents whose signing key matches the host's pin; with
    /// `pins.open_first_heartbeats`, a heartbeat from an unpinned host is opened for the
    /// caller's admission decision (see [`Opened::first_use`]).
    Agents(Pins),
}

/// Time policy of an [`Opener`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimePolicy {
    /// Clock skew tolerated in both directions, seconds.
    pub max_skew_secs: u64,
    /// Longest accepted `expires_at - issued_at`, seconds.
    pub max_validity_secs: u64,
}

impl Default for TimePolicy {
    fn default() -> Self {
        TimePolicy {
            max_skew_secs: 120,
            max_validity_secs: 24 * 3600,
        }
    }
}

/// An accepted envelope.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Opened {
    pub header: Header,
    /// The key that signed it.
    pub sender_key: SigningPublicKey,
    /// The plaintext payload (JSON).
    pub payload: Vec<u8>,
    /// Operator side: the sender has no pin; this heartbeat is only signed by the key it
    /// carries. The caller decides whether to admit the host, and then pins it with
    /// [`Opener::pin_heartbeat`].
    pub first_use: bool,
}

/// Why an accepted envelope's payload is unusable (answer with `ErrorKind::Malformed`).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PayloadError {
    #[error("payload does not parse: {0}")]
    Json(String),
    #[error(transparent)]
    Limit(#[from] LimitError),
    #[error("payload disagrees with its header: {0}")]
    Inconsistent(&'static str),
}

impl Opened {
    /// Parses and validates an operator → agent payload, checking it agrees with the header.
    pub fn operator_message(&self) -> Result<OperatorMessage, PayloadError> {
        if self.header.kind != MessageKind::Request {
            return Err(PayloadError::Inconsistent("header kind is not request"));
        }
        let m: OperatorMessage =
            serde_json::from_slice(&self.payload).map_err(|e| PayloadError::Json(e.to_string()))?;
        m.validate()?;
        let OperatorMessage::Request(r) = &m;
        if r.request.revision() != self.header.revision {
            return Err(PayloadError::Inconsistent("revision"));
        }
        if r.id != self.header.id {
            return Err(PayloadError::Inconsistent("request id"));
        }
        Ok(m)
    }

    /// Parses and validates an agent → operator payload, checking it agrees with the header
    /// (kind; for heartbeats, host name and signing key).
    pub fn agent_message(&self) -> Result<AgentMessage, PayloadError> {
        let m: AgentMessage =
            serde_json::from_slice(&self.payload).map_err(|e| PayloadError::Json(e.to_string()))?;
        m.validate()?;
        let kind = match &m {
            AgentMessage::Heartbeat(h) => {
                if h.hostname != self.header.sender {
                    return Err(PayloadError::Inconsistent("heartbeat hostname"));
                }
                if h.signing_key != self.sender_key {
                    return Err(PayloadError::Inconsistent("heartbeat signing key"));
                }
                MessageKind::Heartbeat
            }
            AgentMessage::Keepalive(_) => MessageKind::Keepalive,
            AgentMessage::Response(_) => MessageKind::Response,
        };
        if kind != self.header.kind {
            return Err(PayloadError::Inconsistent("message kind"));
        }
        Ok(m)
    }
}

/// The largest envelope accepted from a key pinned for no host (a first heartbeat: at most
/// 256 interfaces of 64 addresses and an identity token fit well within it).
pub const MAX_FIRST_HEARTBEAT: usize = 1024 * 1024;

/// What a receiver accepted before it restarted, for refusing it again afterwards: the newest
/// issue time it accepted, and the ids accepted in that very second. Envelopes issued before it,
/// or in that second with one of those ids, are replays (the replay cache does not survive a
/// restart; this does, persisted next to the applied state).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
pub struct ReplayFloor {
    pub issued_at: u64,
    #[serde(default)]
    pub ids: BTreeSet<Uuid>,
}

impl ReplayFloor {
    /// At most this many ids of one second are kept (an operator sends far fewer per host).
    pub const IDS: usize = 4096;

    /// Records an accepted envelope; returns whether the floor moved.
    pub fn note(&mut self, issued_at: u64, id: Uuid) -> bool {
        if issued_at > self.issued_at {
            self.issued_at = issued_at;
            self.ids.clear();
        }
        if issued_at == self.issued_at && self.ids.len() < Self::IDS {
            return self.ids.insert(id);
        }
        false
    }

    /// Whether an envelope issued at `issued_at` with `id` is older than the floor.
    pub fn refuses(&self, issued_at: u64, id: &Uuid) -> bool {
        issued_at < self.issued_at || (issued_at == self.issued_at && self.ids.contains(id))
    }
}

/// The receiving side: trusted senders, own identity and decryption key, replay cache and the
/// last applied revision.
#[derive(Debug)]
pub struct Opener {
    identity: String,
    decryption: Option<EncryptionKey>,
    trust: Trust,
    replay: ReplayCache,
    /// What the previous run accepted (agent side, loaded at start).
    floor: Option<ReplayFloor>,
    /// The sender named by the last envelope whose signature verified, accepted or not.
    last_sender: Option<String>,
    applied_revision: Option<u64>,
    time: TimePolicy,
}

impl Opener {
    /// An agent's opener: accepts requests from `operator` signed by one of `keys`,
    /// encrypted to `decryption`.
    pub fn for_agent(
        identity: impl Into<String>,
        decryption: EncryptionKey,
        operator: impl Into<String>,
        keys: TrustedKeys,
    ) -> Self {
        Opener {
            identity: identity.into(),
            decryption: Some(decryption),
            trust: Trust::Operator {
                operator: operator.into(),
                keys,
            },
            replay: ReplayCache::new(65_536),
            floor: None,
            last_sender: None,
            applied_revision: None,
            time: TimePolicy::default(),
        }
    }

    /// The operator's opener: accepts signed agent messages per `pins`.
    pub fn for_operator(identity: impl Into<String>, pins: Pins) -> Self {
        Opener {
            identity: identity.into(),
            decryption: None,
            trust: Trust::Agents(pins),
            replay: ReplayCache::new(1_048_576),
            floor: None,
            last_sender: None,
            applied_revision: None,
            time: TimePolicy::default(),
        }
    }

    pub fn with_time_policy(mut self, time: TimePolicy) -> Self {
        self.time = time;
        self
    }

    pub fn with_replay_capacity(mut self, capacity: usize) -> Self {
        self.replay = ReplayCache::new(capacity);
        self
    }

    pub fn identity(&self) -> &str {
        &self.identity
    }

    pub fn applied_revision(&self) -> Option<u64> {
        self.applied_revision
    }

    /// Records the revision the agent applied (call after a successful apply, and at start
    /// with the persisted one). Requests must carry a newer revision.
    pub fn set_applied_revision(&mut self, revision: Option<u64>) {
        self.applied_revision = revision;
    }

    /// Refuses, as `replayed`, what a previous run accepted (see [`ReplayFloor`]).
    pub fn set_replay_floor(&mut self, floor: Option<ReplayFloor>) {
        self.floor = floor;
    }

    /// The sender the last opened envelope names, once its signature verified (a claim,
    /// signed by whatever key the envelope carries): for logging a rejection by whom it claims
    /// to come from.
    pub fn last_sender(&self) -> Option<&str> {
        self.last_sender.as_deref()
    }

    pub fn replay_cache(&self) -> &ReplayCache {
        &self.replay
    }

    pub fn trust(&self) -> &Trust {
        &self.trust
    }

    /// Mutable trust (operator key rotation on agents, admin pin changes on the operator).
    pub fn trust_mut(&mut self) -> &mut Trust {
        &mut self.trust
    }

    /// Operator side: pins (or completes the pin of) the host of an accepted heartbeat.
    /// The heartbeat must come from `opened` (same host and signing key).
    pub fn pin_heartbeat(
        &mut self,
        opened: &Opened,
        heartbeat: &Heartbeat,
    ) -> Result<PinOutcome, PinError> {
        let host = &opened.header.sender;
        if heartbeat.hostname != *host || heartbeat.signing_key != opened.sender_key {
            return Err(PinError::Inconsistent {
                host: host.clone(),
                detail: "hostname or signing key differs from the envelope".into(),
            });
        }
        match &mut self.trust {
            Trust::Agents(pins) => {
                pins.check_and_pin(host, &heartbeat.signing_key, &heartbeat.encryption_key)
            }
            Trust::Operator { .. } => Err(PinError::Inconsistent {
                host: host.clone(),
                detail: "this opener does not pin agents".into(),
            }),
        }
    }

    /// Verifies and opens an envelope received at `now` (unix seconds). Checks run in this
    /// order, before any payload byte is parsed: size caps and framing, version, known sender
    /// key, signature, header (schema, names, key id, sender, recipient, mode), validity
    /// window, replay, revision; then decryption. Only an accepted envelope changes state
    /// (its id enters the replay cache).
    pub fn open(&mut self, bytes: &[u8], now: u64) -> Result<Opened, Rejection> {
        self.last_sender = None;
        let frame = parse_frame(bytes)?;
        // Never spend a signature check or a parse on an unknown key. Agent side: only the
        // operator's keys. Operator side: a key pinned for no host can only send a first
        // heartbeat, which is small.
        match &self.trust {
            Trust::Operator { keys, .. } => {
                if !keys.contains(&frame.sender_key) {
                    return Err(Rejection::UnknownSender);
                }
            }
            Trust::Agents(pins) => {
                if !pins.knows_signing(&frame.sender_key.fingerprint()) {
                    if !pins.open_first_heartbeats {
                        return Err(Rejection::UnknownSender);
                    }
                    if bytes.len() > MAX_FIRST_HEARTBEAT {
                        return Err(Rejection::TooLarge);
                    }
                    // and nothing but a heartbeat: a flood of forged keepalives costs a
                    // small JSON parse each, not a signature check
                    let kind = serde_json::from_slice::<Header>(frame.header_json)
                        .map_err(|_| Rejection::Malformed)?
                        .kind;
                    if kind != MessageKind::Heartbeat {
                        return Err(Rejection::UnknownSender);
                    }
                }
            }
        }
        if !frame.sender_key.verify(frame.signed, frame.signature) {
            return Err(Rejection::BadSignature);
        }
        let header: Header =
            serde_json::from_slice(frame.header_json).map_err(|_| Rejection::Malformed)?;
        if header.schema > SCHEMA_VERSION || header.schema == 0 {
            return Err(Rejection::UnsupportedVersion);
        }
        check_names(&header)?;
        self.last_sender = Some(header.sender.clone());
        if header.recipients.len() > MAX_RECIPIENTS
            || header.key_id != fingerprint(&frame.sender_key.0)
        {
            return Err(Rejection::Malformed);
        }
        let first_use = self.check_sender(&header, &frame.sender_key)?;
        let slot = header
            .recipients
            .iter()
            .position(|r| *r == self.identity)
            .ok_or(Rejection::WrongRecipient)?;
        if header.recipients[slot + 1..].contains(&self.identity) {
            return Err(Rejection::Malformed);
        }
        match (header.kind, frame.mode) {
            (MessageKind::Request, Mode::Signed) => return Err(Rejection::Unencrypted),
            (MessageKind::Request, _) | (_, Mode::Signed) => {}
            _ => return Err(Rejection::Malformed),
        }
        let expected_keys = match frame.mode {
            Mode::Signed => 0,
            Mode::Hpke => ENC,
            Mode::MultiRecipient => NONCE + SLOT * header.recipients.len(),
        };
        if frame.keys.len() != expected_keys
            || (frame.mode != Mode::MultiRecipient && header.recipients.len() != 1)
        {
            return Err(Rejection::Malformed);
        }
        let skew = self.time.max_skew_secs;
        if header.expires_at < header.issued_at
            || header.expires_at - header.issued_at > self.time.max_validity_secs
            || header.issued_at > now.saturating_add(skew)
            || now > header.expires_at.saturating_add(skew)
        {
            return Err(Rejection::Expired);
        }
        if self.replay.contains(&header.id, now)
            || self
                .floor
                .as_ref()
                .is_some_and(|f| f.refuses(header.issued_at, &header.id))
        {
            return Err(Rejection::Replayed);
        }
        if header.kind == MessageKind::Request {
            if let (Some(rev), Some(applied)) = (header.revision, self.applied_revision) {
                if rev <= applied {
                    return Err(Rejection::StaleRevision);
                }
            }
        }
        let payload = match frame.mode {
            Mode::Signed => {
                if frame.payload.len() > MAX_PAYLOAD {
                    return Err(Rejection::TooLarge);
                }
                frame.payload.to_vec()
            }
            Mode::Hpke => self.open_hpke(&frame)?,
            Mode::MultiRecipient => self.open_multi(&frame, slot)?,
        };
        self.replay
            .insert(header.id, header.expires_at.saturating_add(skew), now);
        Ok(Opened {
            header,
            sender_key: frame.sender_key,
            payload,
            first_use,
        })
    }

    /// Returns whether the sender is accepted on first use.
    fn check_sender(&self, header: &Header, key: &SigningPublicKey) -> Result<bool, Rejection> {
        match &self.trust {
            Trust::Operator { operator, .. } => {
                if header.sender == *operator {
                    Ok(false)
                } else {
                    Err(Rejection::UnknownSender)
                }
            }
            Trust::Agents(pins) => match pins.check(&header.sender, key, None) {
                Ok(PinOutcome::Matched) | Ok(PinOutcome::Completed(_)) => Ok(false),
                Ok(PinOutcome::NewPin(_)) if header.kind == MessageKind::Heartbeat => Ok(true),
                Ok(PinOutcome::NewPin(_)) | Err(PinError::NotPinned { .. }) => {
                    Err(Rejection::UnknownSender)
                }
                Err(PinError::KeyChanged { .. }) => Err(Rejection::KeyChanged),
                Err(PinError::Inconsistent { .. }) => Err(Rejection::Malformed),
            },
        }
    }

    fn open_hpke(&self, frame: &Frame<'_>) -> Result<Vec<u8>, Rejection> {
        let sk = self.decryption.as_ref().ok_or(Rejection::Undecryptable)?;
        let enc = <AgentKem as hpke::Kem>::EncappedKey::from_bytes(frame.keys)
            .map_err(|_| Rejection::Undecryptable)?;
        let pt = hpke::single_shot_open::<AesGcm256, HkdfSha256, AgentKem>(
            &OpModeR::Base,
            sk.hpke_secret(),
            &enc,
            HPKE_INFO,
            frame.payload,
            frame.header_bytes,
        )
        .map_err(|_| Rejection::Undecryptable)?;
        if pt.len() > MAX_PAYLOAD {
            return Err(Rejection::TooLarge);
        }
        Ok(pt)
    }

    fn open_multi(&self, frame: &Frame<'_>, slot: usize) -> Result<Vec<u8>, Rejection> {
        let sk = self.decryption.as_ref().ok_or(Rejection::Undecryptable)?;
        let mut nonce = [0u8; NONCE];
        nonce.copy_from_slice(&frame.keys[..NONCE]);
        let at = NONCE + SLOT * slot;
        let entry = &frame.keys[at..at + SLOT];
        let enc = <AgentKem as hpke::Kem>::EncappedKey::from_bytes(&entry[..ENC])
            .map_err(|_| Rejection::Undecryptable)?;
        let cek = zeroize::Zeroizing::new(
            hpke::single_shot_open::<AesGcm256, HkdfSha256, AgentKem>(
                &OpModeR::Base,
                sk.hpke_secret(),
                &enc,
                HPKE_INFO_KEY_WRAP,
                &entry[ENC..],
                frame.header_bytes,
            )
            .map_err(|_| Rejection::Undecryptable)?,
        );
        let key = LessSafeKey::new(
            UnboundKey::new(&AES_256_GCM, &cek).map_err(|_| Rejection::Undecryptable)?,
        );
        let mut buf = frame.payload.to_vec();
        let pt = key
            .open_in_place(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(frame.header_bytes),
                &mut buf,
            )
            .map_err(|_| Rejection::Undecryptable)?;
        let len = pt.len();
        if len > MAX_PAYLOAD {
            return Err(Rejection::TooLarge);
        }
        buf.truncate(len);
        Ok(buf)
    }
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
