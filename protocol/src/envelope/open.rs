//! Opening: the checks a received envelope passes before its payload is handed out (size,
//! version, sender key, signature, header, replay, revision), and the replay state they keep.

use super::session::ReceiverSessions;
use super::*;

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
    /// Agent side: the keys of the operator's last sessions (mode 3).
    sessions: ReceiverSessions,
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
            sessions: ReceiverSessions::default(),
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
            sessions: ReceiverSessions::default(),
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

    /// How many session keys this opener derived (one X25519 operation each; once per
    /// session, not per envelope).
    pub fn session_keys_derived(&self) -> u64 {
        self.sessions.derived()
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
        if !frame
            .sender_key
            .verify(&signature_input(frame.mode, frame.signed), frame.signature)
        {
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
            (MessageKind::Request, Protection::Signed) => return Err(Rejection::Unencrypted),
            (MessageKind::Request, _) | (_, Protection::Signed) => {}
            _ => return Err(Rejection::Malformed),
        }
        let expected_keys = match frame.mode {
            Protection::Signed => 0,
            Protection::Hpke => ENC,
            Protection::MultiRecipient => NONCE + SLOT * header.recipients.len(),
            Protection::Session => ENC + NONCE,
        };
        if frame.keys.len() != expected_keys
            || (frame.mode != Protection::MultiRecipient && header.recipients.len() != 1)
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
            Protection::Signed => {
                if frame.payload.len() > MAX_PAYLOAD {
                    return Err(Rejection::TooLarge);
                }
                frame.payload.to_vec()
            }
            Protection::Hpke => self.open_hpke(&frame)?,
            Protection::MultiRecipient => self.open_multi(&frame, slot)?,
            Protection::Session => self.open_session(&frame)?,
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

    fn open_session(&mut self, frame: &Frame<'_>) -> Result<Vec<u8>, Rejection> {
        let sk = self.decryption.as_ref().ok_or(Rejection::Undecryptable)?;
        let key = self.sessions.key(sk, &frame.keys[..ENC])?;
        let mut nonce = [0u8; NONCE];
        nonce.copy_from_slice(&frame.keys[ENC..]);
        open_aead(&key, nonce, frame)
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
        open_aead(&key, nonce, frame)
    }
}

/// The payload of `frame`, AES-256-GCM-decrypted under `key` and `nonce` (modes 2 and 3).
fn open_aead(
    key: &LessSafeKey,
    nonce: [u8; NONCE],
    frame: &Frame<'_>,
) -> Result<Vec<u8>, Rejection> {
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
