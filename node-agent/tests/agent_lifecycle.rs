//! The real `dog-agent` binary against the real broker and a throwaway netns, with the test
//! playing the operator: apply, rejections, unknown requests, drift repair, restart from the
//! saved state, graceful shutdown.

mod agent_support;

use agent_support::{test_firewall, Harness, HAND_EDIT};
use dog_protocol::envelope::Sealer;
use dog_protocol::keys::SigningKey;
use dog_protocol::messages::{AgentMessage, ErrorKind, Outcome, RequestKind};

fn ok_hashes(
    r: &dog_protocol::messages::Response,
) -> (Option<u64>, dog_protocol::ruleset::FirewallHashes) {
    match &r.result {
        Outcome::Ok {
            applied_revision,
            hashes,
            ..
        } => (
            *applied_revision,
            hashes.clone().expect("hashes in the response"),
        ),
        Outcome::Error { kind, message } => panic!("expected Ok, got {kind:?}: {message}"),
    }
}

/// One agent's life in order: an apply, then each forgery and replay against the state that
/// apply left; each step needs the one before it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_applies_rejects_forgeries_and_replays_and_answers_unknown_requests() {
    let Some(mut h) = Harness::new("agent_applies").await else {
        return;
    };
    h.spawn_agent();
    let hb = h.heartbeat(30).await;
    assert_eq!(hb.hostname, h.host);
    assert_eq!(hb.applied_revision, None);
    assert!(hb.live_hashes.is_some());
    assert!(hb.interfaces.iter().any(|i| i.name == "lo"));

    // (1) apply → Ok with the firewall's hashes, and the kernel holds exactly that
    let fw = test_firewall(&h.host);
    let r = h
        .request(RequestKind::Apply {
            revision: 10,
            firewall: fw.clone(),
            kept_sets: Default::default(),
        })
        .await;
    let (rev, hashes) = ok_hashes(&r);
    assert_eq!(rev, Some(10));
    assert_eq!(hashes, fw.hashes());
    let (v4, v6) = h.live_rules_hashes();
    assert_eq!((v4, v6), (fw.hashes().ipv4_rules, fw.hashes().ipv6_rules));
    assert!(h
        .ns
        .exec(&["ipset", "list", "-n"])
        .unwrap()
        .contains("dogz4-web"));
    if let Outcome::Ok { timings_ms, .. } = &r.result {
        assert!(timings_ms.contains_key("total"), "{timings_ms:?}");
    }
    assert_eq!(h.metric("dog_agent_last_applied_revision"), Some(10.0));
    assert_eq!(
        h.metric("dog_agent_applies_total{result=\"applied\"}"),
        Some(1.0)
    );
    assert_eq!(
        h.metric("dog_agent_rules_installed{family=\"ipv4\"}"),
        Some(fw.ipv4.rule_count() as f64)
    );
    assert!(std::fs::read_to_string(h.state_dir().join("applied.json"))
        .unwrap()
        .contains("\"revision\":10"));

    // (2) a request signed by a key the agent does not trust: no response, counted
    let (forged_key, _) = SigningKey::generate().unwrap();
    let forger = Sealer::new("dog-operator", forged_key);
    let forged = dog_protocol::messages::Request {
        id: uuid::Uuid::new_v4(),
        request: RequestKind::Status,
    };
    let bytes = forger
        .request(
            &h.host,
            &h.agent_key.unwrap(),
            h.encryption,
            &forged,
            agent_support::now(),
            300,
        )
        .unwrap();
    h.publish(forged.id, &bytes).await;

    // a replay: the same bytes of an answered request published again
    let (id, bytes) = h.seal(RequestKind::Status);
    h.publish(id, &bytes).await;
    let status = h.response(id, 20).await;
    assert_eq!(ok_hashes(&status), (Some(10), fw.hashes()));
    h.publish(id, &bytes).await;

    // a re-sealed request with an id already used
    let req = dog_protocol::messages::Request {
        id,
        request: RequestKind::Status,
    };
    let resealed = h
        .sealer
        .request(
            &h.host,
            &h.agent_key.unwrap(),
            h.encryption,
            &req,
            agent_support::now(),
            300,
        )
        .unwrap();
    h.publish(id, &resealed).await;

    // unknown kind → Error UnknownRequest; it also proves the ones before it were handled
    let unknown = h.request(RequestKind::Unknown).await;
    match &unknown.result {
        Outcome::Error { kind, .. } => assert_eq!(*kind, ErrorKind::UnknownRequest),
        o => panic!("expected UnknownRequest, got {o:?}"),
    }
    // nothing answered the forged message, and the status request was answered only once
    let forged_id = forged.id;
    assert!(
        !h.arrives(2, |m| matches!(m, AgentMessage::Response(r) if r.request_id == id || r.request_id == forged_id))
            .await,
        "a forged or replayed request got a response"
    );
    assert_eq!(
        h.metric("dog_agent_rejected_messages_total{reason=\"unknown_sender\"}"),
        Some(1.0)
    );
    assert_eq!(
        h.metric("dog_agent_rejected_messages_total{reason=\"replayed\"}"),
        Some(2.0)
    );
    let (code, _) = h.http("/readyz");
    assert_eq!(code, 200);
    assert_eq!(h.http("/healthz").0, 200);

    // DumpRules returns the live text
    let dump = h.request(RequestKind::DumpRules).await;
    match &dump.result {
        Outcome::Ok {
            detail:
                Some(dog_protocol::messages::Detail::Dump {
                    ipv4_save,
                    ipset_save,
                    ..
                }),
            ..
        } => {
            assert!(ipv4_save.contains("-A DOG-INPUT"), "{ipv4_save}");
            assert!(ipset_save.contains("create dogz4-web"), "{ipset_save}");
        }
        o => panic!("expected a dump, got {o:?}"),
    }
    h.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_repairs_a_hand_edit_and_reports_it_in_the_next_keepalive() {
    let Some(mut h) = Harness::new("agent_drift").await else {
        return;
    };
    h.spawn_agent();
    h.heartbeat(30).await;
    let fw = test_firewall(&h.host);
    let r = h
        .request(RequestKind::Apply {
            revision: 7,
            firewall: fw.clone(),
            kept_sets: Default::default(),
        })
        .await;
    ok_hashes(&r);

    h.ns.exec(HAND_EDIT).unwrap();
    assert_ne!(h.live_rules_hashes().0, fw.hashes().ipv4_rules);
    h.wait_rules(&fw, 10).await;

    let ka = h
        .next(
            10,
            |m| matches!(m, AgentMessage::Keepalive(k) if !k.drift.is_empty()),
        )
        .await;
    let AgentMessage::Keepalive(ka) = ka else {
        unreachable!()
    };
    let ev = ka
        .drift
        .iter()
        .find(|e| e.part == "ipv4_rules")
        .expect("ipv4 drift event");
    assert!(ev.repaired);
    assert_eq!(ev.expected_hash, fw.hashes().ipv4_rules);
    assert_ne!(ev.found_hash, ev.expected_hash);
    assert_eq!(ka.applied_revision, Some(7));
    assert!(h.metric("dog_agent_drift_repairs_total").unwrap() >= 1.0);
    h.cleanup().await;
}

/// Keepalives report the hashes the last verification read (the apply's read-back, a drift
/// check) and never read the kernel themselves: a hand edit made between two drift checks is
/// seen, and repaired, by the next check, not by keepalives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keepalives_report_the_last_verification_without_reading_the_kernel() {
    let Some(mut h) = Harness::new("agent_ka_verified").await else {
        return;
    };
    h.drift_interval = "3600";
    let fw = started_with_revision_42(&mut h).await;
    let applied = fw.hashes();

    h.ns.exec(HAND_EDIT).unwrap();
    let edited = h.live_rules_hashes().0;
    assert_ne!(edited, fw.hashes().ipv4_rules);
    // one keepalive a second: the later ones are sealed after the edit
    for _ in 0..3 {
        let AgentMessage::Keepalive(ka) = h
            .next(10, |m| matches!(m, AgentMessage::Keepalive(_)))
            .await
        else {
            unreachable!()
        };
        assert_eq!(ka.live_hashes.as_ref(), Some(&applied));
    }
    // a check on demand reads the kernel, repairs it, and the next keepalive says so
    let r = h.request(RequestKind::Reapply).await;
    let (_, after) = ok_hashes(&r);
    assert_eq!(after, fw.hashes());
    let AgentMessage::Keepalive(ka) = h
        .next(
            10,
            |m| matches!(m, AgentMessage::Keepalive(k) if !k.drift.is_empty()),
        )
        .await
    else {
        unreachable!()
    };
    let ev = ka
        .drift
        .iter()
        .find(|e| e.part == "ipv4_rules")
        .expect("ipv4 drift event");
    assert_eq!(ev.found_hash, edited);
    assert!(ev.repaired);
    h.cleanup().await;
}

/// Starts the agent, waits for its heartbeat and applies the test firewall as revision 42.
async fn started_with_revision_42(h: &mut Harness) -> dog_protocol::ruleset::HostFirewall {
    h.spawn_agent();
    h.heartbeat(30).await;
    let fw = test_firewall(&h.host);
    ok_hashes(
        &h.request(RequestKind::Apply {
            revision: 42,
            firewall: fw.clone(),
            kept_sets: Default::default(),
        })
        .await,
    );
    fw
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_restarted_after_kill9_reenforces_its_saved_state_and_sigterm_keeps_rules() {
    let Some(mut h) = Harness::new("agent_restart").await else {
        return;
    };
    let fw = started_with_revision_42(&mut h).await;

    // (4) kill -9, hand-edit while it is down, restart: restored without any request
    h.kill9();
    h.ns.exec(HAND_EDIT).unwrap();
    h.ns.exec(&["ipset", "del", "dogz4-web", "198.18.2.5"])
        .unwrap();
    assert_ne!(h.live_rules_hashes().0, fw.hashes().ipv4_rules);
    h.spawn_agent();
    h.wait_rules(&fw, 15).await;
    let hb = h.heartbeat(30).await;
    assert_eq!(hb.applied_revision, Some(42));
    assert_eq!(hb.live_hashes, Some(fw.hashes()));
    assert!(h
        .ns
        .exec(&["ipset", "list", "dogz4-web"])
        .unwrap()
        .contains("198.18.2.5"));
    // a stale revision is refused before parsing (counted), a newer one applies
    let (id, bytes) = h.seal(RequestKind::Apply {
        revision: 41,
        firewall: fw.clone(),
        kept_sets: Default::default(),
    });
    h.publish(id, &bytes).await;
    let r = h.request(RequestKind::Status).await;
    assert_eq!(ok_hashes(&r).0, Some(42));
    assert_eq!(
        h.metric("dog_agent_rejected_messages_total{reason=\"stale_revision\"}"),
        Some(1.0)
    );

    // (5) SIGTERM: clean exit, rules and sets stay
    assert!(
        h.sigterm(),
        "agent did not exit cleanly on SIGTERM:\n{}",
        h.log()
    );
    let (v4, v6) = h.live_rules_hashes();
    assert_eq!((v4, v6), (fw.hashes().ipv4_rules, fw.hashes().ipv6_rules));
    assert!(h
        .ns
        .exec(&["ipset", "list", "-n"])
        .unwrap()
        .contains("dogz4-web"));
    assert!(h.log().contains("dog's rules stay in place"));
    h.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_in_observe_mode_reports_what_would_change_and_never_touches_the_kernel() {
    let Some(mut h) = Harness::new("agent_observe").await else {
        return;
    };
    h.extra_args = vec!["--mode".into(), "observe".into()];
    h.spawn_agent();
    let hb = h.heartbeat(30).await;
    assert_eq!(hb.mode, dog_protocol::messages::Mode::Observe);
    let rules = |h: &Harness| -> String {
        let text = h.ns.exec(&["iptables-save", "-t", "filter"]).unwrap();
        text.lines()
            .filter(|l| !l.starts_with('#'))
            .collect::<Vec<_>>()
            .join("\n")
    };
    let before = rules(&h);
    let fw = test_firewall(&h.host);
    let r = h
        .request(RequestKind::Apply {
            revision: 5,
            firewall: fw.clone(),
            kept_sets: Default::default(),
        })
        .await;
    match &r.result {
        Outcome::Ok {
            applied_revision,
            detail: Some(dog_protocol::messages::Detail::Text { text }),
            ..
        } => {
            // observe mode applies nothing, so it never claims a revision
            assert_eq!(*applied_revision, None);
            assert!(
                text.contains("would change") && text.contains("create sets dogz4-web"),
                "{text}"
            );
        }
        o => panic!("expected Ok with a summary, got {o:?}"),
    }
    assert_eq!(rules(&h), before);
    assert!(!h.ns.exec(&["ipset", "list", "-n"]).unwrap().contains("dog"));
    assert!(!h.state_dir().join("applied.json").exists());
    assert_eq!(
        h.metric("dog_agent_applies_total{result=\"applied\"}"),
        Some(0.0)
    );
    h.cleanup().await;
}

/// Captured shared-set requests, replayed after the agent restarted, are refused: the newest
/// accepted issue time and the set versions survive the restart (replay.json); a newer
/// version still applies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replays_captured_before_a_restart_are_refused_after_it() {
    use dog_protocol::ruleset::{Family, IpSet};
    let Some(mut h) = Harness::new("agent_replay").await else {
        return;
    };
    started_with_revision_42(&mut h).await;
    let set = |members: &[&str], version| RequestKind::SharedSet {
        set: IpSet::new(
            "dogz4-web",
            Family::V4,
            members
                .iter()
                .map(|m| format!("{m}/32").parse().expect("net")),
        ),
        version,
    };
    let members = |h: &Harness| {
        h.ns.exec(&["ipset", "list", "dogz4-web"])
            .expect("ipset list")
    };
    // the attacker records both updates as they pass through the broker
    let (old_id, old) = h.seal(set(&["198.18.7.1"], 100));
    h.publish(old_id, &old).await;
    ok_hashes(&h.response(old_id, 20).await);
    let (new_id, new) = h.seal(set(&["198.18.7.2"], 200));
    h.publish(new_id, &new).await;
    ok_hashes(&h.response(new_id, 20).await);
    assert!(members(&h).contains("198.18.7.2"));

    h.kill9();
    h.spawn_agent();
    h.heartbeat(30).await;
    // the captured messages again, as fresh deliveries
    h.publish(old_id, &old).await;
    h.publish(new_id, &new).await;
    // an older version under a new id is ignored too
    let r = h.request(set(&["198.18.7.3"], 150)).await;
    assert!(
        format!("{r:?}").contains("not newer than 200"),
        "an older version was not ignored: {r:?}"
    );
    let listed = members(&h);
    assert!(
        listed.contains("198.18.7.2") && !listed.contains("198.18.7.1"),
        "the set was rolled back:\n{listed}"
    );
    assert_eq!(
        h.metric("dog_agent_rejected_messages_total{reason=\"replayed\"}"),
        Some(2.0)
    );
    // a newer version applies
    ok_hashes(&h.request(set(&["198.18.7.4"], 300)).await);
    assert!(members(&h).contains("198.18.7.4"));
    h.cleanup().await;
}

/// A shared-set change applies to the copy it was computed against (by hash) and must give the
/// operator's result (by hash); against any other copy it is refused as `base_mismatch`, and
/// the kernel keeps what it had.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_set_change_applies_only_to_its_base() {
    use dog_protocol::messages::SetChange;
    use dog_protocol::ruleset::{Family, IpSet};
    let Some(mut h) = Harness::new("agent_set_change").await else {
        return;
    };
    let fw = started_with_revision_42(&mut h).await;
    let net = |s: &str| dog_protocol::ruleset::parse_member(s).expect("net");
    let base = fw.sets["dogz4-web"].hash();
    let after = IpSet::new(
        "dogz4-web",
        Family::V4,
        [net("198.18.1.0/24"), net("198.18.9.9")],
    );
    let change = |base_hash: &str, version| {
        RequestKind::SharedSetDelta(SetChange {
            name: "dogz4-web".into(),
            version,
            base_hash: base_hash.into(),
            hash: after.hash(),
            add: vec![net("198.18.9.9")],
            remove: vec![net("198.18.2.5")],
        })
    };
    let members = |h: &Harness| {
        h.ns.exec(&["ipset", "list", "dogz4-web"])
            .expect("ipset list")
    };
    // against another copy: refused, nothing changes
    let r = h.request(change(&"0".repeat(64), 100)).await;
    assert!(
        matches!(
            &r.result,
            Outcome::Error {
                kind: ErrorKind::BaseMismatch,
                ..
            }
        ),
        "{r:?}"
    );
    assert!(members(&h).contains("198.18.2.5"));
    // against its own copy: applied, and the kernel holds the operator's result
    let (_, hashes) = ok_hashes(&h.request(change(&base, 101)).await);
    let listed = members(&h);
    assert!(
        listed.contains("198.18.9.9") && !listed.contains("198.18.2.5"),
        "{listed}"
    );
    let mut expected = fw.clone();
    expected.sets.insert("dogz4-web".into(), after.clone());
    assert_eq!(hashes, expected.hashes());
    h.cleanup().await;
}

/// A rule change that keeps the host's sets names them instead of sending them: the agent
/// takes them from what it holds (the result is the full firewall, by hash); a kept set it does
/// not hold as named is answered `base_mismatch`, and nothing is applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_apply_that_keeps_sets_takes_them_from_what_the_agent_holds() {
    let Some(mut h) = Harness::new("agent_kept_sets").await else {
        return;
    };
    h.spawn_agent();
    h.heartbeat(30).await;
    let fw = test_firewall(&h.host);
    let r = h
        .request(RequestKind::Apply {
            revision: 10,
            firewall: fw.clone(),
            kept_sets: Default::default(),
        })
        .await;
    assert_eq!(ok_hashes(&r).0, Some(10));
    // new rules, the same sets: only their names and hashes travel
    let mut next = fw.clone();
    next.ipv4.text = next.ipv4.text.replace("--dport 80", "--dport 8080");
    let kept: std::collections::BTreeMap<String, String> = next
        .sets
        .iter()
        .map(|(n, s)| (n.clone(), s.hash()))
        .collect();
    let mut sent = next.clone();
    sent.sets.clear();
    let r = h
        .request(RequestKind::Apply {
            revision: 11,
            firewall: sent.clone(),
            kept_sets: kept.clone(),
        })
        .await;
    let (rev, hashes) = ok_hashes(&r);
    assert_eq!(rev, Some(11));
    assert_eq!(hashes, next.hashes(), "the kept sets are part of what runs");
    // a kept set named with another hash than the agent's copy: nothing is applied
    let mut wrong = kept.clone();
    wrong.insert("dogz4-web".into(), "0".repeat(64));
    let mut other = sent.clone();
    other.ipv4.text = other.ipv4.text.replace("--dport 8080", "--dport 9090");
    let r = h
        .request(RequestKind::Apply {
            revision: 12,
            firewall: other,
            kept_sets: wrong,
        })
        .await;
    assert!(
        matches!(&r.result, Outcome::Error { kind: ErrorKind::BaseMismatch, message } if message.contains("dogz4-web")),
        "{r:?}"
    );
    let r = h.request(RequestKind::Status).await;
    assert_eq!(
        ok_hashes(&r),
        (Some(11), next.hashes()),
        "still revision 11"
    );
    h.cleanup().await;
}
