//! Round trips of every message kind through the envelope, and every rejection reason.
//!
//! Long: one test per rejection reason, side by side so that a missing one shows.

mod envelope_support;

use dog_protocol::envelope::*;
use dog_protocol::keys::pinning::{KeyRole, Pin, PinError, PinOutcome, Pins};
use dog_protocol::keys::{EncryptionPublicKey, TrustedKeys};
use dog_protocol::messages::*;
use dog_protocol::ruleset::{Family, IpSet};
use envelope_support::*;
use std::collections::BTreeMap;
use uuid::Uuid;

fn open_request(o: &mut Opener, bytes: &[u8]) -> Request {
    let opened = o.open(bytes, NOW).unwrap();
    let OperatorMessage::Request(r) = opened.operator_message().unwrap();
    r
}

/// Each request goes both ways an agent can be sent it.
const BOTH: [Encryption; 2] = [Encryption::PerMessage, Encryption::Session];

#[test]
fn every_request_kind_round_trips() {
    for encryption in BOTH {
        every_request_kind_round_trips_in(encryption);
    }
}

fn every_request_kind_round_trips_in(encryption: Encryption) {
    let (sealer, mut opener, a) = operator_and_agent("node-1");
    let kinds = vec![
        apply("node-1", 7).request,
        RequestKind::ApplySetDeltas {
            base_revision: 7,
            revision: 8,
            deltas: vec![SetDelta {
                name: "dogz4-web".into(),
                add: vec!["10.9.0.0/16".parse().unwrap()],
                remove: vec!["192.0.2.7/32".parse().unwrap()],
            }],
        },
        RequestKind::SharedSet {
            set: IpSet::new("dogs4-all", Family::V4, ["10.0.0.0/8".parse().unwrap()]),
            version: 3,
        },
        RequestKind::Status,
        RequestKind::DumpRules,
        RequestKind::Reapply,
    ];
    for kind in kinds {
        let req = Request {
            id: Uuid::new_v4(),
            request: kind,
        };
        let bytes = sealer
            .request("node-1", &a.encryption.public(), encryption, &req, NOW, TTL)
            .unwrap();
        // the payload is not readable on the wire
        let marker = serde_json::to_vec(&req.request).unwrap();
        assert!(!bytes.windows(marker.len()).any(|w| w == marker));
        let opened = opener.open(&bytes, NOW + 1).unwrap();
        assert_eq!(opened.header.id, req.id);
        assert_eq!(opened.header.revision, req.request.revision());
        assert_eq!(opened.header.sender, OPERATOR);
        assert_eq!(
            opened.operator_message().unwrap(),
            OperatorMessage::Request(req)
        );
    }
}

#[test]
fn an_unknown_request_kind_opens_and_can_be_answered() {
    let (sealer, mut opener, a) = operator_and_agent("node-1");
    let id = Uuid::new_v4();
    let payload = serde_json::json!({
        "type": "request", "id": id, "request": {"kind": "format_disk", "all": true}
    });
    let fields = HeaderFields {
        kind: MessageKind::Request,
        recipients: vec!["node-1".into()],
        id,
        revision: None,
        issued_at: NOW,
        expires_at: NOW + TTL,
    };
    let bytes = sealer
        .seal_for_agent(
            &fields,
            &serde_json::to_vec(&payload).unwrap(),
            &a.encryption.public(),
        )
        .unwrap();
    let r = open_request(&mut opener, &bytes);
    assert_eq!(r.request, RequestKind::Unknown);
    let answer = Response::error(r.id, ErrorKind::UnknownRequest, "unknown request kind");
    assert_eq!(answer.request_id, id);
}

#[test]
fn agent_messages_round_trip_and_the_first_heartbeat_pins() {
    let a = agent("node-1");
    let sealer = a.sealer_as("node-1");
    let mut op = operator_opener(true);

    // keepalive before any heartbeat: unknown
    let ka = AgentMessage::Keepalive(Keepalive {
        interval_secs: 30,
        applied_revision: Some(3),
        live_hashes: None,
        drift: vec![DriftEvent {
            at: NOW - 5,
            part: "set:dogz4-web".into(),
            expected_hash: "a".into(),
            found_hash: "b".into(),
            repaired: true,
        }],
        mode: Default::default(),
        would_change: None,
    });
    let ka_bytes = sealer.agent_message(OPERATOR, &ka, NOW, TTL).unwrap();
    assert_eq!(op.open(&ka_bytes, NOW), Err(Rejection::UnknownSender));

    let hb = heartbeat(&a);
    let bytes = sealer.agent_message(OPERATOR, &hb, NOW, TTL).unwrap();
    let opened = op.open(&bytes, NOW).unwrap();
    assert!(opened.first_use);
    let AgentMessage::Heartbeat(h) = opened.agent_message().unwrap() else {
        panic!("not a heartbeat")
    };
    assert_eq!(AgentMessage::Heartbeat(h.clone()), hb);
    let outcome = op.pin_heartbeat(&opened, &h).unwrap();
    assert_eq!(
        outcome,
        PinOutcome::NewPin(Pin {
            signing: a.signing.public().fingerprint(),
            encryption: Some(a.encryption.public().fingerprint()),
        })
    );

    // now pinned: keepalive and response are accepted
    let opened = op.open(&ka_bytes, NOW).unwrap();
    assert!(!opened.first_use);
    assert_eq!(opened.agent_message().unwrap(), ka);
    let mut timings = BTreeMap::new();
    timings.insert("total".to_string(), 12);
    let resp = AgentMessage::Response(Response {
        request_id: Uuid::new_v4(),
        result: Outcome::Ok {
            applied_revision: Some(4),
            hashes: Some(firewall("node-1").hashes()),
            timings_ms: timings,
            detail: Some(Detail::Text { text: "ok".into() }),
            would_change: Some(3),
        },
    });
    let bytes = sealer.agent_message(OPERATOR, &resp, NOW, TTL).unwrap();
    assert_eq!(op.open(&bytes, NOW).unwrap().agent_message().unwrap(), resp);
    let err = Response::error(
        Uuid::new_v4(),
        ErrorKind::ApplyFailed,
        "iptables-restore: line 3",
    );
    let bytes = sealer
        .agent_message(OPERATOR, &AgentMessage::Response(err.clone()), NOW, TTL)
        .unwrap();
    assert_eq!(
        op.open(&bytes, NOW).unwrap().agent_message().unwrap(),
        AgentMessage::Response(err)
    );
}

#[test]
fn a_re_keyed_host_is_refused_until_unpinned() {
    let a = agent("node-1");
    let mut op = operator_opener(true);
    let s = a.sealer_as("node-1");
    let opened = op
        .open(
            &s.agent_message(OPERATOR, &heartbeat(&a), NOW, TTL).unwrap(),
            NOW,
        )
        .unwrap();
    let AgentMessage::Heartbeat(h) = opened.agent_message().unwrap() else {
        panic!()
    };
    op.pin_heartbeat(&opened, &h).unwrap();

    // same host name, new keys
    let imposter = agent("node-1");
    let s2 = imposter.sealer_as("node-1");
    let before = state(&op);
    let bytes = s2
        .agent_message(OPERATOR, &heartbeat(&imposter), NOW, TTL)
        .unwrap();
    assert_eq!(op.open(&bytes, NOW), Err(Rejection::KeyChanged));
    assert_eq!(state(&op), before);

    // the pinning helper names host and both fingerprints
    let mut pins = Pins::new(true);
    pins.set(
        "node-1",
        Pin {
            signing: a.signing.public().fingerprint(),
            encryption: Some(a.encryption.public().fingerprint()),
        },
    );
    let e = pins
        .check_and_pin(
            "node-1",
            &imposter.signing.public(),
            &imposter.encryption.public(),
        )
        .unwrap_err();
    assert_eq!(
        e,
        PinError::KeyChanged {
            host: "node-1".into(),
            role: KeyRole::Signing,
            pinned_fp: a.signing.public().fingerprint(),
            offered_fp: imposter.signing.public().fingerprint(),
        }
    );
    assert!(e.to_string().contains("node-1"));
    // same signing key, different encryption key
    let e = pins
        .check_and_pin("node-1", &a.signing.public(), &imposter.encryption.public())
        .unwrap_err();
    assert!(matches!(
        e,
        PinError::KeyChanged {
            role: KeyRole::Encryption,
            ..
        }
    ));
    // admin removes the pin: accepted again on first use
    if let Trust::Agents(p) = op.trust_mut() {
        p.remove("node-1");
    }
    assert!(op.open(&bytes, NOW).unwrap().first_use);
}

#[test]
fn pre_pinned_hosts_and_disabled_tofu() {
    let a = agent("node-2");
    let s = a.sealer_as("node-2");
    let hb = s.agent_message(OPERATOR, &heartbeat(&a), NOW, TTL).unwrap();

    // no TOFU, no pin: unknown
    let mut strict = operator_opener(false);
    assert_eq!(strict.open(&hb, NOW), Err(Rejection::UnknownSender));

    // admin pre-pinned the signing fingerprint only: accepted, pin completed
    let mut pins = Pins::new(false);
    pins.set(
        "node-2",
        Pin {
            signing: a.signing.public().fingerprint(),
            encryption: None,
        },
    );
    let mut op = Opener::for_operator(OPERATOR, pins);
    let opened = op.open(&hb, NOW).unwrap();
    assert!(!opened.first_use);
    let AgentMessage::Heartbeat(h) = opened.agent_message().unwrap() else {
        panic!()
    };
    assert!(matches!(
        op.pin_heartbeat(&opened, &h).unwrap(),
        PinOutcome::Completed(Pin {
            encryption: Some(_),
            ..
        })
    ));
    // a heartbeat claiming another host's name with its own key is not accepted
    let other = agent("node-3");
    let mut forged = heartbeat(&other);
    if let AgentMessage::Heartbeat(h) = &mut forged {
        h.hostname = "node-2".into();
    }
    let s3 = other.sealer_as("node-2");
    let bytes = s3.agent_message(OPERATOR, &forged, NOW, TTL).unwrap();
    // closed to first heartbeats, a key pinned for no host is refused before its signature
    assert_eq!(op.open(&bytes, NOW), Err(Rejection::UnknownSender));
    // open to them (the operator), the pin of node-2 refuses it
    let mut pins = Pins::new(true);
    pins.set(
        "node-2",
        Pin {
            signing: a.signing.public().fingerprint(),
            encryption: None,
        },
    );
    let mut op = Opener::for_operator(OPERATOR, pins);
    assert_eq!(op.open(&bytes, NOW), Err(Rejection::KeyChanged));
}

#[test]
fn shared_set_is_sealed_once_and_each_recipient_opens_it() {
    let op = operator_key();
    let trusted = TrustedKeys::new([op.public()]);
    let sealer = Sealer::new(OPERATOR, op);
    let agents: Vec<_> = (0..5).map(|i| agent(&format!("node-{i}"))).collect();
    let recipients: Vec<(String, EncryptionPublicKey)> = agents
        .iter()
        .map(|a| (a.name.clone(), a.encryption.public()))
        .collect();
    let req = Request {
        id: Uuid::new_v4(),
        request: RequestKind::SharedSet {
            set: IpSet::new(
                "dogs4-monitoring",
                Family::V4,
                (0..1000u32).map(|i| format!("10.{}.{}.0/24", i / 256, i % 256).parse().unwrap()),
            ),
            version: 9,
        },
    };
    let bytes = sealer
        .request_for_many(&recipients, &req, NOW, TTL)
        .unwrap();
    for a in &agents {
        let mut o = Opener::for_agent(&a.name, a.encryption.clone(), OPERATOR, trusted.clone());
        let opened = o.open(&bytes, NOW).unwrap();
        assert_eq!(opened.header.recipients.len(), 5);
        assert_eq!(
            opened.operator_message().unwrap(),
            OperatorMessage::Request(req.clone())
        );
    }
    // not listed: wrong recipient
    let outsider = agent("node-x");
    let mut o = Opener::for_agent(
        "node-x",
        outsider.encryption.clone(),
        OPERATOR,
        trusted.clone(),
    );
    assert_eq!(o.open(&bytes, NOW), Err(Rejection::WrongRecipient));
    // listed name but a different key (e.g. re-keyed agent): undecryptable, state unchanged
    let mut o = Opener::for_agent("node-0", outsider.encryption, OPERATOR, trusted);
    assert_eq!(o.open(&bytes, NOW), Err(Rejection::Undecryptable));
    assert_eq!(state(&o), (0, None));
}

#[test]
fn forged_replayed_expired_future_misaddressed_and_stale_are_rejected() {
    for encryption in BOTH {
        forged_replayed_expired_future_misaddressed_and_stale_are_rejected_in(encryption);
    }
}

fn forged_replayed_expired_future_misaddressed_and_stale_are_rejected_in(encryption: Encryption) {
    let (sealer, mut opener, a) = operator_and_agent("node-1");
    let key = a.encryption.public();
    let seal = |r: &Request, at: u64| {
        sealer
            .request("node-1", &key, encryption, r, at, TTL)
            .unwrap()
    };

    // forged: a key the agent does not trust
    let forger = Sealer::new(OPERATOR, operator_key());
    let forged = forger
        .request("node-1", &key, encryption, &apply("node-1", 1), NOW, TTL)
        .unwrap();
    assert_eq!(opener.open(&forged, NOW), Err(Rejection::UnknownSender));

    let good = seal(&apply("node-1", 5), NOW);
    let before = state(&opener);
    // expired (beyond the skew allowance) and issued too far in the future
    let skew = TimePolicy::default().max_skew_secs;
    assert_eq!(
        opener.open(&good, NOW + TTL + skew + 1),
        Err(Rejection::Expired)
    );
    assert_eq!(opener.open(&good, NOW - skew - 1), Err(Rejection::Expired));
    // within skew both ways is fine, but test acceptance once below
    assert_eq!(state(&opener), before);

    // wrong recipient
    let other = sealer
        .request("node-2", &key, encryption, &apply("node-2", 6), NOW, TTL)
        .unwrap();
    assert_eq!(opener.open(&other, NOW), Err(Rejection::WrongRecipient));
    assert_eq!(state(&opener), before);

    // accepted once, then replayed
    assert!(opener.open(&good, NOW + TTL + skew).is_ok());
    assert_eq!(opener.replay_cache().len(), 1);
    assert_eq!(opener.open(&good, NOW + 10), Err(Rejection::Replayed));

    // stale revisions
    opener.set_applied_revision(Some(5));
    let before = state(&opener);
    for rev in [1, 5] {
        let r = seal(&apply("node-1", rev), NOW);
        assert_eq!(
            opener.open(&r, NOW),
            Err(Rejection::StaleRevision),
            "rev {rev}"
        );
    }
    let deltas = Request {
        id: Uuid::new_v4(),
        request: RequestKind::ApplySetDeltas {
            base_revision: 4,
            revision: 5,
            deltas: vec![],
        },
    };
    assert_eq!(
        opener.open(&seal(&deltas, NOW), NOW),
        Err(Rejection::StaleRevision)
    );
    assert_eq!(state(&opener), before);
    // requests without a revision are not subject to it; a newer revision passes
    let status = Request {
        id: Uuid::new_v4(),
        request: RequestKind::Status,
    };
    assert!(opener.open(&seal(&status, NOW), NOW).is_ok());
    assert!(opener.open(&seal(&apply("node-1", 6), NOW), NOW).is_ok());
}

#[test]
fn crafted_envelopes_the_sealer_never_makes_are_rejected() {
    let op = operator_key();
    let a = agent("node-1");
    let mut o = Opener::for_agent(
        "node-1",
        a.encryption.clone(),
        OPERATOR,
        TrustedKeys::new([op.public()]),
    );
    let payload = serde_json::to_vec(&OperatorMessage::Request(apply("node-1", 1))).unwrap();

    // an unencrypted request
    let h = header_json(&op, "request", OPERATOR, "node-1");
    assert_eq!(
        o.open(&raw(&op, 0, &h, &[], &payload), NOW),
        Err(Rejection::Unencrypted)
    );
    // a newer schema
    let mut h2 = h.clone();
    h2["schema"] = 2.into();
    assert_eq!(
        o.open(&raw(&op, 0, &h2, &[], &payload), NOW),
        Err(Rejection::UnsupportedVersion)
    );
    // key id not matching the signing key
    let mut h3 = h.clone();
    h3["key_id"] = "00".repeat(16).into();
    assert_eq!(
        o.open(&raw(&op, 0, &h3, &[], &payload), NOW),
        Err(Rejection::Malformed)
    );
    // a sender name other than the operator's, with a trusted key
    let h4 = header_json(&op, "request", "mallory", "node-1");
    assert_eq!(
        o.open(&raw(&op, 1, &h4, &[0; 32], &payload), NOW),
        Err(Rejection::UnknownSender)
    );
    // mode byte beyond the known ones, and key section of the wrong size
    assert_eq!(
        o.open(&raw(&op, 9, &h, &[], &payload), NOW),
        Err(Rejection::Malformed)
    );
    assert_eq!(
        o.open(&raw(&op, 1, &h, &[0; 31], &payload), NOW),
        Err(Rejection::Malformed)
    );
    // validity window longer than allowed
    let mut h5 = h.clone();
    h5["expires_at"] = (NOW + 10 * 24 * 3600).into();
    assert_eq!(
        o.open(&raw(&op, 1, &h5, &[0; 32], &payload), NOW),
        Err(Rejection::Expired)
    );
    // a well-formed HPKE envelope whose enc is garbage
    assert_eq!(
        o.open(&raw(&op, 1, &h, &[7; 32], &payload), NOW),
        Err(Rejection::Undecryptable)
    );
    // header that is not JSON
    let mut bytes = raw(&op, 1, &h, &[0; 32], &payload);
    let hpos = 38 + 4;
    bytes[hpos] = b'[';
    let end = bytes.len() - 64;
    let sig = op.sign(&bytes[..end]);
    bytes[end..].copy_from_slice(&sig);
    assert_eq!(o.open(&bytes, NOW), Err(Rejection::Malformed));
    assert_eq!(state(&o), (0, None));
}

#[test]
fn tampering_any_byte_or_truncating_anywhere_is_rejected_without_state_change() {
    for encryption in BOTH {
        tampering_any_byte_or_truncating_anywhere_is_rejected_without_state_change_in(encryption);
    }
}

fn tampering_any_byte_or_truncating_anywhere_is_rejected_without_state_change_in(
    encryption: Encryption,
) {
    let (sealer, mut opener, a) = operator_and_agent("node-1");
    opener.set_applied_revision(Some(1));
    let req = Request {
        id: Uuid::new_v4(),
        request: RequestKind::ApplySetDeltas {
            base_revision: 1,
            revision: 2,
            deltas: vec![SetDelta {
                name: "dogz4-web".into(),
                add: vec!["10.0.0.1/32".parse().unwrap()],
                remove: vec![],
            }],
        },
    };
    let good = sealer
        .request("node-1", &a.encryption.public(), encryption, &req, NOW, TTL)
        .unwrap();
    let before = state(&opener);
    let mut reasons = BTreeMap::new();
    for i in 0..good.len() {
        for bit in [0x01u8, 0x80] {
            let mut bad = good.clone();
            bad[i] ^= bit;
            let r = opener
                .open(&bad, NOW)
                .expect_err("tampered envelope accepted");
            *reasons.entry(r.reason()).or_insert(0) += 1;
        }
    }
    // flips in the signed region fail the signature; in the key, the key lookup; in the magic,
    // version or lengths, the framing.
    assert!(reasons["bad_signature"] > good.len());
    assert!(reasons.contains_key("unknown_sender"));
    assert!(reasons.contains_key("malformed"));
    for len in 0..good.len() {
        assert!(
            opener.open(&good[..len], NOW).is_err(),
            "truncated to {len}"
        );
    }
    let mut longer = good.clone();
    longer.push(0);
    assert_eq!(opener.open(&longer, NOW), Err(Rejection::Malformed));
    assert_eq!(state(&opener), before);
    // the original still opens
    assert!(opener.open(&good, NOW).is_ok());
}

#[test]
fn oversized_lengths_are_too_large_before_anything_else() {
    let (_, mut opener, _) = operator_and_agent("node-1");
    let mut bytes = b"DOGE\x01\x01".to_vec();
    bytes.extend_from_slice(&[0u8; 32]);
    bytes.extend_from_slice(&u32::MAX.to_be_bytes());
    bytes.extend_from_slice(&[0u8; 100]);
    assert_eq!(opener.open(&bytes, NOW), Err(Rejection::TooLarge));
    let huge = vec![0u8; MAX_ENVELOPE + 1];
    assert_eq!(opener.open(&huge, NOW), Err(Rejection::TooLarge));
}

#[test]
fn key_rotation_window() {
    let old = operator_key();
    let new = operator_key();
    let a = agent("node-1");
    let mut trusted = TrustedKeys::new([old.public()]);
    let old_id = old.key_id();
    let old_sealer = Sealer::new(OPERATOR, old);
    let new_sealer = Sealer::new(OPERATOR, new);
    let key = a.encryption.public();
    let status = || Request {
        id: Uuid::new_v4(),
        request: RequestKind::Status,
    };

    let mut o = Opener::for_agent("node-1", a.encryption.clone(), OPERATOR, trusted.clone());
    let by_new = new_sealer
        .request("node-1", &key, Encryption::PerMessage, &status(), NOW, TTL)
        .unwrap();
    assert_eq!(o.open(&by_new, NOW), Err(Rejection::UnknownSender));

    // rotation: both keys trusted
    trusted.insert(new_sealer.public_key());
    let mut o = Opener::for_agent("node-1", a.encryption.clone(), OPERATOR, trusted.clone());
    let by_old = old_sealer
        .request("node-1", &key, Encryption::PerMessage, &status(), NOW, TTL)
        .unwrap();
    let opened = o.open(&by_old, NOW).unwrap();
    assert_eq!(opened.header.key_id, old_id);
    assert!(o.open(&by_new, NOW).is_ok());

    // old key removed
    if let Trust::Operator { keys, .. } = o.trust_mut() {
        assert!(keys.remove(&old_id));
    }
    let by_old2 = old_sealer
        .request("node-1", &key, Encryption::PerMessage, &status(), NOW, TTL)
        .unwrap();
    assert_eq!(o.open(&by_old2, NOW), Err(Rejection::UnknownSender));
    let by_new2 = new_sealer
        .request("node-1", &key, Encryption::PerMessage, &status(), NOW, TTL)
        .unwrap();
    assert!(o.open(&by_new2, NOW).is_ok());
}

#[test]
fn sealer_refuses_invalid_headers_and_oversized_messages() {
    let (sealer, _, a) = operator_and_agent("node-1");
    let f = HeaderFields {
        kind: MessageKind::Request,
        recipients: vec![],
        id: Uuid::new_v4(),
        revision: None,
        issued_at: NOW,
        expires_at: NOW + TTL,
    };
    assert!(sealer
        .seal_for_agent(&f, b"{}", &a.encryption.public())
        .is_err());
    let f2 = HeaderFields {
        recipients: vec!["a".into(), "a".into()],
        ..f.clone()
    };
    assert!(sealer
        .seal_for_many(&f2, b"{}", &[a.encryption.public(), a.encryption.public()])
        .is_err());
    let f3 = HeaderFields {
        recipients: vec!["node-1".into()],
        ..f.clone()
    };
    // a request may not be sent in the clear
    assert!(sealer.sign_only(&f3, b"{}").is_err());
    let big = vec![b' '; MAX_PAYLOAD + 1];
    assert!(matches!(
        sealer.seal_for_agent(&f3, &big, &a.encryption.public()),
        Err(SealError::TooLarge { .. })
    ));
    let mut hb = heartbeat(&a);
    if let AgentMessage::Heartbeat(h) = &mut hb {
        h.hostname = "x".repeat(300);
    }
    assert!(matches!(
        sealer.agent_message(OPERATOR, &hb, NOW, TTL),
        Err(SealError::Limit(LimitError { ref field, .. })) if field == "hostname"
    ));
}

#[test]
fn a_replay_floor_refuses_what_a_previous_run_accepted() {
    use dog_protocol::envelope::ReplayFloor;
    let (sealer, mut first_run, a) = operator_and_agent("node-1");
    let key = a.encryption.public();
    let seal = |r: &Request, at: u64| {
        sealer
            .request("node-1", &key, Encryption::PerMessage, r, at, TTL)
            .unwrap()
    };
    let status = || Request {
        id: Uuid::new_v4(),
        request: RequestKind::Status,
    };
    let earlier = seal(&status(), NOW - 5);
    let same_second = seal(&status(), NOW);
    let accepted = seal(&status(), NOW);
    let mut floor = ReplayFloor::default();
    for bytes in [&earlier, &accepted] {
        let o = first_run.open(bytes, NOW).expect("accepted");
        floor.note(o.header.issued_at, o.header.id);
    }
    assert_eq!(floor.issued_at, NOW);
    assert_eq!(floor.ids.len(), 1);
    // the next run starts with an empty replay cache and this floor
    let mut next_run = Opener::for_agent(
        "node-1",
        a.encryption.clone(),
        OPERATOR,
        TrustedKeys::new([sealer.public_key()]),
    );
    next_run.set_replay_floor(Some(floor));
    assert_eq!(next_run.open(&accepted, NOW + 1), Err(Rejection::Replayed));
    assert_eq!(next_run.open(&earlier, NOW + 1), Err(Rejection::Replayed));
    // issued in the floor's second but never accepted, or later: fine
    assert!(next_run.open(&same_second, NOW + 1).is_ok());
    assert!(next_run.open(&seal(&status(), NOW + 1), NOW + 1).is_ok());
}

#[test]
fn keys_pinned_for_no_host_are_refused_before_their_signature_is_checked() {
    let stranger = operator_key();
    let big = vec![b' '; 2 * 1024 * 1024];
    let mut forged = raw(
        &stranger,
        0,
        &header_json(&stranger, "keepalive", "node-9", OPERATOR),
        &[],
        &big,
    );
    let n = forged.len();
    forged[n - 1] ^= 1; // a signature check would say bad_signature
                        // open to first heartbeats: a big frame from a key nobody pinned is too large for one
    let mut opener = operator_opener(true);
    assert_eq!(opener.open(&forged, NOW), Err(Rejection::TooLarge));
    // closed to first heartbeats: unknown, whatever its size
    let mut closed = operator_opener(false);
    assert_eq!(closed.open(&forged, NOW), Err(Rejection::UnknownSender));
    // a pinned host's key gets its signature checked (and fails it)
    if let Trust::Agents(pins) = closed.trust_mut() {
        pins.set(
            "node-9",
            Pin {
                signing: stranger.public().fingerprint(),
                encryption: None,
            },
        );
    }
    assert_eq!(closed.open(&forged, NOW), Err(Rejection::BadSignature));
    if let Trust::Agents(pins) = closed.trust_mut() {
        pins.remove("node-9");
    }
    assert_eq!(closed.open(&forged, NOW), Err(Rejection::UnknownSender));
}
