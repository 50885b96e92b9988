//! Session envelopes (mode 3): one HPKE setup per agent key and session, a nonce of its own per
//! envelope, limits that end a session, receivers that derive a session's key once and keep a
//! few, and refusals that leave the receiver as it was.

mod envelope_support;

use dog_protocol::envelope::*;
use dog_protocol::keys::TrustedKeys;
use dog_protocol::messages::*;
use envelope_support::*;
use uuid::Uuid;

/// The key section of a sealed envelope: (`enc`, nonce) in mode 3.
fn session_of(bytes: &[u8]) -> (Vec<u8>, Vec<u8>) {
    assert_eq!(bytes[5], 3, "not a session envelope");
    let section = |at: usize| {
        let len = u32::from_be_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
        (at + 4, len)
    };
    let (header, h) = section(38);
    let (keys, k) = section(header + h);
    assert_eq!(k, 44);
    (
        bytes[keys..keys + 32].to_vec(),
        bytes[keys + 32..keys + 44].to_vec(),
    )
}

/// `bytes` (built by [`raw`], signed as modes 0–2 are) signed again as mode 3 is: over the
/// context and the SHA-256 digest of the bytes.
fn signed_as_session(key: &dog_protocol::keys::SigningKey, bytes: &[u8]) -> Vec<u8> {
    let mut out = bytes[..bytes.len() - 64].to_vec();
    let digest = ring::digest::digest(&ring::digest::SHA256, &out);
    out.extend_from_slice(&key.sign(&[SESSION_SIGNATURE_CONTEXT, digest.as_ref()].concat()));
    out
}

/// An operator key and the opener of agent node-1 that trusts it (for envelopes built by hand).
fn operator_key_and_opener() -> (dog_protocol::keys::SigningKey, Opener) {
    let op = operator_key();
    let a = agent("node-1");
    let opener = Opener::for_agent(
        "node-1",
        a.encryption.clone(),
        OPERATOR,
        TrustedKeys::new([op.public()]),
    );
    (op, opener)
}

fn status() -> Request {
    Request {
        id: Uuid::new_v4(),
        request: RequestKind::Status,
    }
}

fn seal(sealer: &Sealer, a: &Agent, at: u64) -> Vec<u8> {
    sealer
        .request(
            &a.name,
            &a.encryption.public(),
            Encryption::Session,
            &status(),
            at,
            TTL,
        )
        .unwrap()
}

fn opener_of(a: &Agent, sealers: &[&Sealer]) -> Opener {
    Opener::for_agent(
        a.name.clone(),
        a.encryption.clone(),
        OPERATOR,
        TrustedKeys::new(sealers.iter().map(|s| s.public_key())),
    )
}

#[test]
fn a_session_is_set_up_once_and_each_envelope_has_a_nonce_of_its_own() {
    let (sealer, mut opener, a) = operator_and_agent("node-1");
    let sealed: Vec<Vec<u8>> = (0..5).map(|_| seal(&sealer, &a, NOW)).collect();
    let sessions: Vec<_> = sealed.iter().map(|b| session_of(b)).collect();
    assert!(sessions.iter().all(|(enc, _)| *enc == sessions[0].0));
    let nonces: std::collections::BTreeSet<_> = sessions.iter().map(|(_, n)| n.clone()).collect();
    assert_eq!(nonces.len(), sealed.len(), "a nonce was used twice");
    for bytes in &sealed {
        let opened = opener.open(bytes, NOW).unwrap();
        assert!(matches!(
            opened.operator_message().unwrap(),
            OperatorMessage::Request(Request {
                request: RequestKind::Status,
                ..
            })
        ));
    }
    assert_eq!(opener.session_keys_derived(), 1);
    // another agent has a session of its own
    let b = agent("node-2");
    let to_b = seal(&sealer, &b, NOW);
    assert_ne!(session_of(&to_b).0, sessions[0].0);
    assert!(opener_of(&b, &[&sealer]).open(&to_b, NOW).is_ok());
    // the payload is not readable on the wire
    let marker = br#""type":"status""#;
    assert!(!sealed[0].windows(marker.len()).any(|w| w == marker));
}

#[test]
fn a_receiver_that_never_saw_a_session_opens_any_of_its_envelopes() {
    let (sealer, _, a) = operator_and_agent("node-1");
    let first = seal(&sealer, &a, NOW);
    let third = {
        seal(&sealer, &a, NOW);
        seal(&sealer, &a, NOW)
    };
    // an agent that restarted between them
    let mut restarted = opener_of(&a, &[&sealer]);
    assert!(restarted.open(&third, NOW).is_ok());
    assert!(restarted.open(&first, NOW).is_ok());
    assert_eq!(restarted.session_keys_derived(), 1);
}

#[test]
fn a_session_ends_at_its_message_and_time_limits() {
    let (sealer, _, a) = operator_and_agent("node-1");
    let sealer = sealer.with_session_limits(SessionLimits {
        messages: 2,
        secs: 60,
    });
    let mut opener = opener_of(&a, &[&sealer]);
    let encs: Vec<Vec<u8>> = [NOW, NOW + 1, NOW + 2, NOW + 62, NOW + 63, NOW + 30]
        .into_iter()
        .map(|at| {
            let bytes = seal(&sealer, &a, at);
            assert!(opener.open(&bytes, at).is_ok());
            session_of(&bytes).0
        })
        .collect();
    // two messages each; the fourth is 60 s after its session began; the last was issued
    // before the session it would join began
    assert_eq!(encs[0], encs[1]);
    assert_ne!(encs[1], encs[2]);
    assert_ne!(encs[2], encs[3]);
    assert_eq!(encs[3], encs[4]);
    assert_ne!(encs[4], encs[5]);
    assert_eq!(opener.session_keys_derived(), 4);
}

#[test]
fn a_receiver_keeps_the_keys_of_its_last_sessions() {
    let a = agent("node-1");
    let operators: Vec<Sealer> = (0..RECEIVER_SESSIONS + 1)
        .map(|_| Sealer::new(OPERATOR, operator_key()))
        .collect();
    let all: Vec<&Sealer> = operators.iter().collect();
    let mut opener = opener_of(&a, &all);
    // two operators in turn (a failover): each session's key is derived once
    for _ in 0..3 {
        for s in &operators[..2] {
            assert!(opener.open(&seal(s, &a, NOW), NOW).is_ok());
        }
    }
    assert_eq!(opener.session_keys_derived(), 2);
    // one more session than it keeps: the least recently used one is derived again
    for s in &operators {
        assert!(opener.open(&seal(s, &a, NOW), NOW).is_ok());
    }
    assert_eq!(opener.session_keys_derived(), RECEIVER_SESSIONS as u64 + 1);
    assert!(opener.open(&seal(&operators[0], &a, NOW), NOW).is_ok());
    assert_eq!(opener.session_keys_derived(), RECEIVER_SESSIONS as u64 + 2);
}

#[test]
fn an_envelope_in_another_keys_session_or_with_a_changed_nonce_is_refused() {
    let (sealer, mut opener, a) = operator_and_agent("node-1");
    // addressed to node-1, but in the session with another agent's key
    let stranger = agent("node-1");
    let wrong_key = seal(&sealer, &stranger, NOW);
    let before = state(&opener);
    assert_eq!(opener.open(&wrong_key, NOW), Err(Rejection::Undecryptable));
    assert_eq!(state(&opener), before);
    // the nonce and the enc are signed: any change fails the signature
    let good = seal(&sealer, &a, NOW);
    let (enc, nonce) = session_of(&good);
    let at = good
        .windows(44)
        .position(|w| w[..32] == enc[..] && w[32..] == nonce[..])
        .unwrap();
    for i in at..at + 44 {
        let mut bad = good.clone();
        bad[i] ^= 1;
        assert_eq!(opener.open(&bad, NOW), Err(Rejection::BadSignature));
    }
    assert_eq!(state(&opener), before);
    assert!(opener.open(&good, NOW).is_ok());
}

#[test]
fn a_session_with_a_bad_key_section_length_is_malformed() {
    let (op, mut opener) = operator_key_and_opener();
    for len in [0usize, 32, 43, 45, 92] {
        let bytes = raw(
            &op,
            3,
            &header_json(&op, "request", OPERATOR, "node-1"),
            &vec![7u8; len],
            &[0u8; 32],
        );
        let bytes = signed_as_session(&op, &bytes);
        assert_eq!(opener.open(&bytes, NOW), Err(Rejection::Malformed), "{len}");
    }
}

#[test]
fn a_session_envelope_is_signed_over_the_digest_of_its_bytes() {
    let (op, mut opener) = operator_key_and_opener();
    let header = header_json(&op, "request", OPERATOR, "node-1");
    // the bytes themselves signed, as in the other modes: refused
    let plain = raw(&op, 3, &header, &[9u8; 44], &[0u8; 32]);
    assert_eq!(opener.open(&plain, NOW), Err(Rejection::BadSignature));
    // the context and the digest signed: the signature holds (and the payload, no ciphertext
    // of the session, does not decrypt)
    let digest_signed = signed_as_session(&op, &plain);
    assert_eq!(
        opener.open(&digest_signed, NOW),
        Err(Rejection::Undecryptable)
    );
    // and a signature over the digest is worth nothing in another mode
    let mut as_mode_1 = digest_signed.clone();
    as_mode_1[5] = 1;
    assert_eq!(opener.open(&as_mode_1, NOW), Err(Rejection::BadSignature));
    assert_eq!(state(&opener), (0, None));
}
