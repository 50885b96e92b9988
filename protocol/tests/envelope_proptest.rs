//! Random inputs and random mutations of valid envelopes: always rejected, never a panic, and
//! the opener's state never changes.

mod envelope_support;

use dog_protocol::envelope::*;
use dog_protocol::messages::*;
use envelope_support::*;
use proptest::prelude::*;
use std::sync::OnceLock;
use uuid::Uuid;

struct Fixture {
    opener_parts: (
        String,
        dog_protocol::keys::EncryptionKey,
        dog_protocol::keys::TrustedKeys,
    ),
    request: Vec<u8>,
    shared: Vec<u8>,
    /// The same request in a session (mode 3).
    session: Vec<u8>,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let (sealer, _, a) = operator_and_agent("node-1");
        let b = agent("node-2");
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
        let seal = |encryption| {
            sealer
                .request("node-1", &a.encryption.public(), encryption, &req, NOW, TTL)
                .unwrap()
        };
        let (request, session) = (seal(Encryption::PerMessage), seal(Encryption::Session));
        let shared = sealer
            .request_for_many(
                &[
                    ("node-2".to_string(), b.encryption.public()),
                    ("node-1".to_string(), a.encryption.public()),
                ],
                &Request {
                    id: Uuid::new_v4(),
                    request: RequestKind::Status,
                },
                NOW,
                TTL,
            )
            .unwrap();
        Fixture {
            opener_parts: (
                "node-1".into(),
                a.encryption.clone(),
                dog_protocol::keys::TrustedKeys::new([sealer.public_key()]),
            ),
            request,
            shared,
            session,
        }
    })
}

fn opener() -> Opener {
    let (name, key, trusted) = fixture().opener_parts.clone();
    let mut o = Opener::for_agent(name, key, OPERATOR, trusted);
    o.set_applied_revision(Some(1));
    o
}

#[derive(Debug, Clone)]
enum Mutation {
    Flip { at: usize, mask: u8 },
    Set { at: usize, value: u8 },
    Truncate { len: usize },
    Insert { at: usize, bytes: Vec<u8> },
    Remove { at: usize, n: usize },
    Splice { from: usize, to: usize },
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), 1u8..=255).prop_map(|(at, mask)| Mutation::Flip { at, mask }),
        (any::<usize>(), any::<u8>()).prop_map(|(at, value)| Mutation::Set { at, value }),
        any::<usize>().prop_map(|len| Mutation::Truncate { len }),
        (any::<usize>(), prop::collection::vec(any::<u8>(), 1..16))
            .prop_map(|(at, bytes)| Mutation::Insert { at, bytes }),
        (any::<usize>(), 1usize..64).prop_map(|(at, n)| Mutation::Remove { at, n }),
        (any::<usize>(), any::<usize>()).prop_map(|(from, to)| Mutation::Splice { from, to }),
    ]
}

fn apply_mutations(mut b: Vec<u8>, ms: &[Mutation]) -> Vec<u8> {
    for m in ms {
        let n = b.len().max(1);
        match m {
            Mutation::Flip { at, mask } => {
                if !b.is_empty() {
                    b[at % n] ^= mask
                }
            }
            Mutation::Set { at, value } => {
                if !b.is_empty() {
                    b[at % n] = *value
                }
            }
            Mutation::Truncate { len } => b.truncate(len % n),
            Mutation::Insert { at, bytes } => {
                let at = at % (b.len() + 1);
                b.splice(at..at, bytes.iter().copied());
            }
            Mutation::Remove { at, n: k } => {
                if !b.is_empty() {
                    let at = at % n;
                    let end = (at + k).min(b.len());
                    b.drain(at..end);
                }
            }
            Mutation::Splice { from, to } => {
                // move a chunk of one envelope region over another (length-preserving)
                if b.len() > 8 {
                    let from = from % (b.len() - 8);
                    let to = to % (b.len() - 8);
                    let chunk: Vec<u8> = b[from..from + 8].to_vec();
                    b[to..to + 8].copy_from_slice(&chunk);
                }
            }
        }
    }
    b
}

#[test]
fn the_unmutated_envelopes_open() {
    let f = fixture();
    assert!(opener().open(&f.request, NOW).is_ok());
    assert!(opener().open(&f.shared, NOW).is_ok());
    assert!(opener().open(&f.session, NOW).is_ok());
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 3000, ..ProptestConfig::default() })]

    #[test]
    fn random_bytes_are_rejected(bytes in prop::collection::vec(any::<u8>(), 0..512), magic in any::<bool>()) {
        let mut o = opener();
        let mut input = bytes;
        if magic {
            // get past the magic/version check so the deeper parser is exercised
            let mut v = b"DOGE\x01".to_vec();
            v.extend_from_slice(&input);
            input = v;
        }
        prop_assert!(o.open(&input, NOW).is_err());
        prop_assert_eq!(state(&o), (0, Some(1)));
    }

    #[test]
    fn mutated_envelopes_are_rejected(ms in prop::collection::vec(mutation(), 1..4), which in 0..3usize) {
        let f = fixture();
        let good = [&f.request, &f.shared, &f.session][which];
        let bad = apply_mutations(good.clone(), &ms);
        prop_assume!(bad != *good);
        let mut o = opener();
        let r = o.open(&bad, NOW);
        prop_assert!(r.is_err(), "mutation accepted: {:?}", ms);
        prop_assert_eq!(state(&o), (0, Some(1)));
    }
}
