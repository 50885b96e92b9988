//! Sealing: a message signed by its sender and, operator to agents, encrypted to one host
//! (HPKE) or to many (one content key wrapped per recipient).

use super::session::{SenderSessions, SessionSeal};
use super::*;

/// How a request to one agent is encrypted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Encryption {
    /// Mode 1: an HPKE encapsulation of its own (an agent that did not announce sessions).
    PerMessage,
    /// Mode 3: in the sender's session with the agent's key.
    Session,
}

/// Signs (and encrypts) messages as one sender.
#[derive(Debug)]
pub struct Sealer {
    identity: String,
    key: SigningKey,
    sessions: SenderSessions,
}

impl Sealer {
    pub fn new(identity: impl Into<String>, key: SigningKey) -> Self {
        Sealer {
            identity: identity.into(),
            key,
            sessions: SenderSessions::new(SessionLimits::default()),
        }
    }

    /// The same sealer whose sessions end at `limits`.
    pub fn with_session_limits(mut self, limits: SessionLimits) -> Self {
        self.sessions = SenderSessions::new(limits);
        self
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
        let out = self.start(Protection::Signed, fields, 1)?;
        Ok(self.finish(Protection::Signed, out, &[], payload))
    }

    /// Mode 1: HPKE-encrypts `payload` to one agent's X25519 key, then signs.
    pub fn seal_for_agent(
        &self,
        fields: &HeaderFields,
        payload: &[u8],
        agent: &EncryptionPublicKey,
    ) -> Result<Vec<u8>, SealError> {
        check_payload(payload.len())?;
        let out = self.start(Protection::Hpke, fields, 1)?;
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
        Ok(self.finish(Protection::Hpke, out, &enc.to_bytes(), &ct))
    }

    /// Mode 3: encrypts `payload` in the session with one agent's X25519 key (set up when
    /// there is none or it is used up; `fields.issued_at` is its clock), then signs.
    pub fn seal_in_session(
        &self,
        fields: &HeaderFields,
        payload: &[u8],
        agent: &EncryptionPublicKey,
    ) -> Result<Vec<u8>, SealError> {
        check_payload(payload.len())?;
        let out = self.start(Protection::Session, fields, 1)?;
        let SessionSeal { enc, key, nonce } = self.sessions.next(agent, fields.issued_at)?;
        let ct = seal_aead(&key[..], nonce, &out, payload)?;
        let mut section = [0u8; ENC + NONCE];
        section[..ENC].copy_from_slice(&enc);
        section[ENC..].copy_from_slice(&nonce);
        Ok(self.finish(Protection::Session, out, &section, &ct))
    }

    /// Mode 1 or 3 by `encryption`.
    pub fn seal_to_agent(
        &self,
        fields: &HeaderFields,
        payload: &[u8],
        agent: &EncryptionPublicKey,
        encryption: Encryption,
    ) -> Result<Vec<u8>, SealError> {
        match encryption {
            Encryption::PerMessage => self.seal_for_agent(fields, payload, agent),
            Encryption::Session => self.seal_in_session(fields, payload, agent),
        }
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
        let out = self.start(Protection::MultiRecipient, fields, MAX_RECIPIENTS)?;
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
        let ct = seal_aead(&cek[..], nonce, &out, payload)?;
        Ok(self.finish(Protection::MultiRecipient, out, &section, &ct))
    }

    /// Seals a [`Request`] to one agent: message id = request id, revision from the request,
    /// valid `ttl_secs` from `now`.
    pub fn request(
        &self,
        agent: &str,
        agent_key: &EncryptionPublicKey,
        encryption: Encryption,
        request: &Request,
        now: u64,
        ttl_secs: u64,
    ) -> Result<Vec<u8>, SealError> {
        let payload = encode_operator(request)?;
        let revision = request.request.revision();
        self.encoded_request(
            agent, agent_key, encryption, request.id, revision, &payload, now, ttl_secs,
        )
    }

    /// Seals a request whose payload is already encoded (an `apply` from
    /// [`crate::messages::EncodedFirewall::apply_payload`]) to one agent, as
    /// [`Sealer::request`] does: message id `id`, the request's `revision`.
    #[allow(clippy::too_many_arguments)]
    pub fn encoded_request(
        &self,
        agent: &str,
        agent_key: &EncryptionPublicKey,
        encryption: Encryption,
        id: Uuid,
        revision: Option<u64>,
        payload: &[u8],
        now: u64,
        ttl_secs: u64,
    ) -> Result<Vec<u8>, SealError> {
        let fields = request_fields(vec![agent.to_string()], id, revision, now, ttl_secs);
        self.seal_to_agent(&fields, payload, agent_key, encryption)
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
        let fields = request_fields(names, request.id, request.request.revision(), now, ttl_secs);
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
        mode: Protection,
        f: &HeaderFields,
        max_recipients: usize,
    ) -> Result<Vec<u8>, SealError> {
        let expected_kind = if mode == Protection::Signed {
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

    /// Appends the key section and the payload to the header bytes `out`, then the signature.
    fn finish(&self, mode: Protection, mut out: Vec<u8>, keys: &[u8], payload: &[u8]) -> Vec<u8> {
        put_section(&mut out, keys);
        put_section(&mut out, payload);
        let sig = self.key.sign(&signature_input(mode, &out));
        out.extend_from_slice(&sig);
        out
    }
}

/// The header of request `id` (carrying `revision`, if any) to `recipients`.
fn request_fields(
    recipients: Vec<String>,
    id: Uuid,
    revision: Option<u64>,
    now: u64,
    ttl: u64,
) -> HeaderFields {
    HeaderFields {
        kind: MessageKind::Request,
        recipients,
        id,
        revision,
        issued_at: now,
        expires_at: now.saturating_add(ttl),
    }
}

fn encode_operator(r: &Request) -> Result<Vec<u8>, SealError> {
    /// `OperatorMessage::Request` by reference: the same JSON without copying the request.
    #[derive(Serialize)]
    #[serde(tag = "type", rename_all = "snake_case")]
    enum Borrowed<'a> {
        Request(&'a Request),
    }
    r.validate()?;
    serde_json::to_vec(&Borrowed::Request(r)).map_err(|e| SealError::Header(e.to_string()))
}

/// `payload` AES-256-GCM-encrypted under `key` and `nonce`, `aad` = the header bytes (modes 2
/// and 3).
fn seal_aead(
    key: &[u8],
    nonce: [u8; NONCE],
    header_bytes: &[u8],
    payload: &[u8],
) -> Result<Vec<u8>, SealError> {
    let key = LessSafeKey::new(
        UnboundKey::new(&AES_256_GCM, key).map_err(|_| SealError::Crypto("bad AES key".into()))?,
    );
    let mut ct = payload.to_vec();
    key.seal_in_place_append_tag(
        Nonce::assume_unique_for_key(nonce),
        Aad::from(header_bytes),
        &mut ct,
    )
    .map_err(|_| SealError::Crypto("AES-256-GCM seal failed".into()))?;
    Ok(ct)
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
