//! Envelope costs: seal+sign and verify+open (operator → agent) for 1 KB and 1 MB payloads, each
//! envelope with an HPKE encapsulation of its own (mode 1) and in a session (mode 3),
//! sign/verify only (agent → operator), a shared-set seal for 1000 recipients, and one entry
//! changed in a 1,000,000-entry shared set sent to 200 hosts as the whole set and as a change
//! (the sizes on the wire are printed once), and one host's Apply of a group whose set holds
//! 5,000 addresses, encoded per host from the owned request and from the group's shared
//! encoding.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use dog_protocol::envelope::{Encryption, HeaderFields, MessageKind, Opener, Sealer, TimePolicy};
use dog_protocol::keys::pinning::{Pin, Pins};
use dog_protocol::keys::{EncryptionKey, EncryptionPublicKey, SigningKey, TrustedKeys};
use std::hint::black_box;
use uuid::Uuid;

const NOW: u64 = 1_750_000_000;

fn fields(kind: MessageKind, recipients: Vec<String>) -> HeaderFields {
    HeaderFields {
        kind,
        recipients,
        id: Uuid::new_v4(),
        revision: None,
        issued_at: NOW,
        expires_at: NOW + 300,
    }
}

fn operator_to_agent(c: &mut Criterion) {
    let op = SigningKey::generate().unwrap().0;
    let trusted = TrustedKeys::new([op.public()]);
    let sealer = Sealer::new("dog-operator", op);
    let agent = EncryptionKey::generate();
    let mut g = c.benchmark_group("envelope/operator_to_agent");
    for size in [1024usize, 1024 * 1024] {
        let payload = vec![b'x'; size];
        g.throughput(Throughput::Bytes(size as u64));
        g.bench_with_input(BenchmarkId::new("seal_sign", size), &payload, |b, p| {
            let f = fields(MessageKind::Request, vec!["node-1".into()]);
            b.iter(|| {
                sealer
                    .seal_for_agent(&f, black_box(p), &agent.public())
                    .unwrap()
            })
        });
        g.bench_with_input(BenchmarkId::new("verify_open", size), &payload, |b, p| {
            b.iter_batched(
                || {
                    let f = fields(MessageKind::Request, vec!["node-1".into()]);
                    let env = sealer.seal_for_agent(&f, p, &agent.public()).unwrap();
                    let o =
                        Opener::for_agent("node-1", agent.clone(), "dog-operator", trusted.clone());
                    (env, o)
                },
                |(env, mut o)| o.open(black_box(&env), NOW).unwrap(),
                criterion::BatchSize::LargeInput,
            )
        });
        g.bench_with_input(
            BenchmarkId::new("session_seal_sign", size),
            &payload,
            |b, p| {
                let f = fields(MessageKind::Request, vec!["node-1".into()]);
                b.iter(|| {
                    sealer
                        .seal_in_session(&f, black_box(p), &agent.public())
                        .unwrap()
                })
            },
        );
        g.bench_with_input(
            BenchmarkId::new("session_verify_open", size),
            &payload,
            |b, p| {
                b.iter_batched(
                    || {
                        let mut o = Opener::for_agent(
                            "node-1",
                            agent.clone(),
                            "dog-operator",
                            trusted.clone(),
                        );
                        // the session's first envelope derives its key; the bench opens the next
                        let f = fields(MessageKind::Request, vec!["node-1".into()]);
                        o.open(
                            &sealer.seal_in_session(&f, p, &agent.public()).unwrap(),
                            NOW,
                        )
                        .unwrap();
                        let f = fields(MessageKind::Request, vec!["node-1".into()]);
                        (sealer.seal_in_session(&f, p, &agent.public()).unwrap(), o)
                    },
                    |(env, mut o)| o.open(black_box(&env), NOW).unwrap(),
                    criterion::BatchSize::LargeInput,
                )
            },
        );
    }
    g.finish();
}

fn agent_to_operator(c: &mut Criterion) {
    let (key, _) = SigningKey::generate().unwrap();
    let mut pins = Pins::new(false);
    pins.set(
        "node-1",
        Pin {
            signing: key.public().fingerprint(),
            encryption: None,
        },
    );
    let sealer = Sealer::new("node-1", key);
    let mut g = c.benchmark_group("envelope/agent_to_operator");
    let payload = vec![b'x'; 1024];
    g.throughput(Throughput::Bytes(1024));
    g.bench_function("sign_1024", |b| {
        let f = fields(MessageKind::Keepalive, vec!["dog-operator".into()]);
        b.iter(|| sealer.sign_only(&f, black_box(&payload)).unwrap())
    });
    g.bench_function("verify_1024", |b| {
        let mut o = Opener::for_operator("dog-operator", pins.clone())
            .with_time_policy(TimePolicy::default());
        b.iter_batched(
            || {
                sealer
                    .sign_only(
                        &fields(MessageKind::Keepalive, vec!["dog-operator".into()]),
                        &payload,
                    )
                    .unwrap()
            },
            |env| o.open(black_box(&env), NOW).unwrap(),
            criterion::BatchSize::SmallInput,
        )
    });
    // a forged keepalive under a key pinned for no host, on an operator open to first
    // heartbeats: refused before the signature check (compare with verify_1024)
    g.bench_function("refuse_forged_keepalive_1024", |b| {
        let (stranger, _) = SigningKey::generate().unwrap();
        let forger = Sealer::new("node-1", stranger);
        let env = forger
            .sign_only(
                &fields(MessageKind::Keepalive, vec!["dog-operator".into()]),
                &payload,
            )
            .unwrap();
        let mut open = pins.clone();
        open.open_first_heartbeats = true;
        let mut o = Opener::for_operator("dog-operator", open);
        b.iter(|| o.open(black_box(&env), NOW).unwrap_err())
    });
    g.finish();
}

fn shared_set(c: &mut Criterion) {
    let sealer = Sealer::new("dog-operator", SigningKey::generate().unwrap().0);
    let n = 1000;
    let names: Vec<String> = (0..n).map(|i| format!("node-{i}")).collect();
    let keys: Vec<EncryptionPublicKey> =
        (0..n).map(|_| EncryptionKey::generate().public()).collect();
    let payload = vec![b'x'; 64 * 1024];
    let mut g = c.benchmark_group("envelope/shared_set");
    g.sample_size(10);
    g.bench_function("seal_64KiB_for_1000", |b| {
        let f = fields(MessageKind::Request, names.clone());
        b.iter(|| {
            sealer
                .seal_for_many(&f, black_box(&payload), &keys)
                .unwrap()
        })
    });
    g.finish();
}

fn one_entry_change_of_a_large_set(c: &mut Criterion) {
    use dog_protocol::messages::{Request, RequestKind, SetChange};
    use dog_protocol::ruleset::{Family, IpSet};
    let sealer = Sealer::new("dog-operator", SigningKey::generate().unwrap().0);
    let agents: Vec<(String, EncryptionPublicKey)> = (0..200)
        .map(|i| (format!("node-{i}"), EncryptionKey::generate().public()))
        .collect();
    let member = |i: u32| {
        ipnet::IpNet::from(ipnet::Ipv4Net::from(std::net::Ipv4Addr::from(
            0x1000_0000 + i * 2,
        )))
    };
    let set = IpSet::new("dogz4-blocklist", Family::V4, (0..1_000_000).map(member));
    let full = Request {
        id: Uuid::new_v4(),
        request: RequestKind::SharedSet {
            set: set.clone(),
            version: 2,
        },
    };
    let change = Request {
        id: Uuid::new_v4(),
        request: RequestKind::SharedSetDelta(SetChange {
            name: set.name.clone(),
            version: 2,
            base_hash: set.hash(),
            hash: "0".repeat(64),
            add: vec![member(1_000_000)],
            remove: vec![member(7)],
        }),
    };
    let seal = |r: &Request| sealer.request_for_many(&agents, r, NOW, 600).unwrap();
    eprintln!(
        "one entry changed in a 1,000,000-entry set, sealed once for 200 hosts: whole set {} bytes, change {} bytes",
        seal(&full).len(),
        seal(&change).len()
    );
    let mut g = c.benchmark_group("envelope/one_entry_change_1M_for_200");
    g.sample_size(10);
    g.bench_function("whole_set", |b| b.iter(|| seal(black_box(&full))));
    g.bench_function("change", |b| b.iter(|| seal(black_box(&change))));
    g.finish();
}

/// What one more host of a group costs to encode and seal: the owned request (its firewall
/// copied and serialized for this host) against the group's encoding made once
/// ([`EncodedFirewall`], the operator's path).
fn apply_for_one_host_of_a_group(c: &mut Criterion) {
    use dog_protocol::messages::{EncodedFirewall, EncodedSet, Request, RequestKind};
    use dog_protocol::ruleset::{Failsafe, Family, HostFirewall, IpSet, RulesDocument};
    use std::collections::BTreeMap;
    let sealer = Sealer::new("dog-operator", SigningKey::generate().unwrap().0);
    let agent = EncryptionKey::generate().public();
    let peers = IpSet::new(
        "dogg4-web",
        Family::V4,
        (0..5_000u32).map(|i| {
            ipnet::IpNet::from(ipnet::Ipv4Net::from(std::net::Ipv4Addr::from(
                0x0a00_0000 + i,
            )))
        }),
    );
    let rules = (0..20)
        .map(|i| {
            format!(
                "-A DOG-INPUT -p tcp --dport {} -m set --match-set dogg4-web src -j ACCEPT\n",
                8000 + i
            )
        })
        .collect::<String>();
    let firewall = HostFirewall {
        host: "node-1".into(),
        ipv4: RulesDocument {
            family: Family::V4,
            text: format!("*filter\n:DOG-INPUT - [0:0]\n{rules}COMMIT\n"),
        },
        ipv6: RulesDocument {
            family: Family::V6,
            text: "*filter\nCOMMIT\n".into(),
        },
        sets: [(peers.name.clone(), peers)].into_iter().collect(),
        failsafe: Failsafe::default(),
    };
    let sets = firewall
        .sets
        .iter()
        .map(|(n, s)| {
            (
                n.clone(),
                std::sync::Arc::new(EncodedSet::new(n, s).unwrap()),
            )
        })
        .collect();
    let encoded =
        EncodedFirewall::new(&firewall.ipv4, &firewall.ipv6, sets, &firewall.failsafe).unwrap();
    let none = BTreeMap::new();
    let mut g = c.benchmark_group("envelope/apply_one_host_of_a_5000_address_group");
    g.sample_size(20);
    g.bench_function("owned_request", |b| {
        b.iter(|| {
            let request = Request {
                id: Uuid::new_v4(),
                request: RequestKind::Apply {
                    revision: 2,
                    firewall: black_box(&firewall).clone(),
                    kept_sets: BTreeMap::new(),
                },
            };
            sealer
                .request("node-1", &agent, Encryption::Session, &request, NOW, 600)
                .unwrap()
        })
    });
    g.bench_function("shared_encoding", |b| {
        b.iter(|| {
            let id = Uuid::new_v4();
            let payload = black_box(&encoded)
                .apply_payload(id, "node-1", 2, &none)
                .unwrap();
            sealer
                .encoded_request(
                    "node-1",
                    &agent,
                    Encryption::Session,
                    id,
                    Some(2),
                    &payload,
                    NOW,
                    600,
                )
                .unwrap()
        })
    });
    g.finish();
}

criterion_group!(
    benches,
    apply_for_one_host_of_a_group,
    operator_to_agent,
    agent_to_operator,
    shared_set,
    one_entry_change_of_a_large_set
);
criterion_main!(benches);
