//! A real fleet: operator (--from-dir) + one agent per namespace + the real broker, proven with
//! real TCP/UDP/ICMP traffic over IPv4 and IPv6.
//!
//! Long: each test is a short scenario over the same harness; a file per topic would be one more
//! test binary linking the operator, the agent and the harness (seconds each, every build).

use dog_e2e::{require_root, Fleet};
use dog_operator::crd::HostState;
use std::io::Write;
use std::process::{Command, Stdio};

const HOSTS: &str = r#"
apiVersion: dogfw.io/v1alpha1
kind: Host
metadata: {name: "{p}-web", labels: {role: web}}
spec: {}
---
apiVersion: dogfw.io/v1alpha1
kind: Host
metadata: {name: "{p}-db", labels: {role: db}}
spec: {}
---
apiVersion: dogfw.io/v1alpha1
kind: Host
metadata: {name: "{p}-bastion", labels: {role: bastion}}
spec: {}
"#;

const GROUPS: &str = r#"
apiVersion: dogfw.io/v1alpha1
kind: Group
metadata: {name: web}
spec: {profile: web, selector: {matchLabels: {role: web}}}
---
apiVersion: dogfw.io/v1alpha1
kind: Group
metadata: {name: db}
spec: {profile: db, selector: {matchLabels: {role: db}}}
---
apiVersion: dogfw.io/v1alpha1
kind: Group
metadata: {name: bastion}
spec: {profile: bastion, selector: {matchLabels: {role: bastion}}}
"#;

const PROFILES: &str = r#"
apiVersion: dogfw.io/v1alpha1
kind: Profile
metadata: {name: web}
spec:
  inbound:
    - {name: http, action: ACCEPT, protocol: tcp, ports: ["8080"]}
---
apiVersion: dogfw.io/v1alpha1
kind: Profile
metadata: {name: db}
spec:
  inbound:
    - {name: pg-web, action: ACCEPT, peer: {kind: Group, name: web}, protocol: tcp, ports: ["5432"]}
    - {name: metrics, action: ACCEPT, peer: {kind: Zone, name: office}, protocol: udp, ports: ["9125"]}
    - {name: refuse-6000, action: REJECT, protocol: tcp, ports: ["6000"]}
    - {name: ping, action: ACCEPT, peer: {kind: Group, name: web}, protocol: icmp, icmpType: 8}
    - {name: ping6, action: ACCEPT, peer: {kind: Group, name: web}, protocol: icmpv6, icmpType: 128}
---
apiVersion: dogfw.io/v1alpha1
kind: Profile
metadata: {name: bastion}
spec:
  inbound: []
"#;

fn zones(extra: &[String]) -> String {
    let mut addrs = vec![
        "\"203.0.113.0/26\"".to_string(),
        "\"2001:db8:10::/48\"".to_string(),
    ];
    addrs.extend(extra.iter().map(|a| format!("\"{a}\"")));
    format!(
        "apiVersion: dogfw.io/v1alpha1\nkind: Zone\nmetadata: {{name: office}}\nspec:\n  addresses: [{}]\n",
        addrs.join(", ")
    )
}

fn start(nodes: &[&str]) -> Fleet {
    start_with(nodes, &[], &[])
}

/// The fleet of [`start`], the operator and every agent with further flags.
fn start_with(nodes: &[&str], operator: &[&str], agents: &[&str]) -> Fleet {
    let mut f = Fleet::new(nodes);
    f.write("hosts.yaml", HOSTS);
    f.write("groups.yaml", GROUPS);
    f.write("profiles.yaml", PROFILES);
    f.write("zones.yaml", &zones(&[]));
    f.start_operator_with(operator);
    for n in nodes {
        f.start_agent_with(n, agents);
    }
    f.wait_status("every host in sync", 90, |st| f.all_in_sync(st));
    f
}

#[test]
fn traffic_follows_the_resources_for_both_families() {
    if !require_root() {
        return;
    }
    let mut f = start(&["web", "db", "bastion"]);
    f.serve_tcp("db", 5432);
    f.serve_tcp("db", 5433);
    f.serve_tcp("db", 6000);
    f.serve_udp("db", 9125);
    let (db4, db6) = (f.v4("db"), f.v6("db"));

    // allowed: group web -> 5432; denied: bastion (not in group web), and an unlisted port
    for addr in [&db4, &db6] {
        assert!(
            f.tcp("web", addr, 5432),
            "web -> {addr}:5432 should connect"
        );
        assert!(
            !f.tcp("bastion", addr, 5432),
            "bastion -> {addr}:5432 should be dropped"
        );
        assert!(
            !f.tcp("web", addr, 5433),
            "web -> {addr}:5433 should be dropped"
        );
        assert!(
            !f.udp("bastion", addr, 9125),
            "bastion -> {addr}:9125/udp should be dropped"
        );
        assert!(f.ping("web", addr), "web should ping {addr}");
        assert!(!f.ping("bastion", addr), "bastion should not ping {addr}");
    }
    // REJECT answers (connection refused) where DROP leaves the connection to time out
    assert!(
        f.tcp_refused("web", &db4, 6000),
        "REJECT should refuse the connection"
    );
    assert!(!f.tcp_refused("web", &db4, 5433), "DROP should not answer");

    // group realization counts
    let st = f.status();
    let g = &st.groups["db"];
    assert_eq!((g.hosts_desired, g.hosts_realized), (1, 1), "{g:?}");

    // a zone change: bastion's addresses join the office zone -> udp 9125 opens for it
    let rev_before = st.hosts[&f.host("db")].applied_revision;
    f.write("zones.yaml", &zones(&[f.v4("bastion"), f.v6("bastion")]));
    f.wait("bastion -> db:9125/udp to open", 30, || {
        f.udp("bastion", &db4, 9125) && f.udp("bastion", &db6, 9125)
    });
    let st = f.wait_status("db in sync after the zone change", 30, |st| {
        Fleet::in_sync(st, &f.host("db"))
    });
    assert_eq!(st.zones["office"].ipv4_count, 2);
    // a set-only change is a shared-set update, not a new revision of the rules
    assert_eq!(
        st.hosts[&f.host("db")].applied_revision,
        rev_before,
        "zone change should not re-render rules"
    );
    // ... and only the added member went out, checked against db's copy by hash
    assert!(
        f.log_of("operator").contains("published shared set change"),
        "the zone change went as whole sets"
    );

    // a group membership change: web's label changes -> web loses 5432, bastion gains it
    f.write(
        "hosts.yaml",
        &HOSTS
            .replace("labels: {role: web}", "labels: {role: old-web}")
            .replace("labels: {role: bastion}", "labels: {role: web}"),
    );
    f.wait("membership change to reach db", 30, || {
        !f.tcp("web", &db4, 5432) && f.tcp("bastion", &db4, 5432)
    });
    assert!(f.tcp("bastion", &db6, 5432));
    assert!(!f.tcp("web", &db6, 5432));
}

#[test]
fn agents_survive_crashes_drift_silence_and_broker_loss() {
    if !require_root() {
        return;
    }
    let mut f = start(&["web", "db"]);
    for port in [5432, 5433, 5434] {
        f.serve_tcp("db", port);
    }
    let db4 = f.v4("db");
    let db_host = f.host("db");
    assert!(f.tcp("web", &db4, 5432));

    // hand edit: someone deletes dog's rules; repaired within the drift interval
    let out = f.exec("db", &["iptables", "-F", "DOG-INPUT"]);
    assert!(out.status.success());
    f.wait("drift repaired", 15, || {
        f.save("db", false)
            .contains("-A DOG-INPUT -m comment --comment \"dog:db:default\" -j DROP")
    });
    assert!(f.tcp("web", &db4, 5432));
    assert!(!f.tcp("web", &db4, 5433));

    // kill -9 in the middle of an apply: the kernel holds the complete old or new rules
    let old = dog_protocol::ruleset::rules_hash(&f.save("db", false));
    f.write(
        "profiles.yaml",
        &PROFILES.replace("ports: [\"5432\"]", "ports: [\"5432\", \"5433\"]"),
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let mut seen_new = None;
    while std::time::Instant::now() < deadline {
        let h = dog_protocol::ruleset::rules_hash(&f.save("db", false));
        if h != old {
            seen_new = Some(h);
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    f.kill_agent("db", "-9");
    let live = dog_protocol::ruleset::rules_hash(&f.save("db", false));
    let expected_new = f
        .wait_status("operator to know the new hashes", 20, |st| {
            st.hosts
                .get(&db_host)
                .and_then(|h| h.expected_hashes.as_ref())
                .is_some_and(|e| e.ipv4_rules != old)
        })
        .hosts[&db_host]
        .expected_hashes
        .clone()
        .unwrap_or_default()
        .ipv4_rules;
    assert!(
        live == old || live == expected_new,
        "after kill -9 the kernel must hold the old or the new rules, not a mix"
    );
    if let Some(h) = seen_new {
        assert_eq!(h, expected_new);
    }

    // while the agent is down its rules stay in force; a hand edit waits for its restart
    assert!(f.tcp("web", &db4, 5432));
    assert!(!f.tcp("web", &db4, 5434));
    let _ = f.exec("db", &["iptables", "-D", "DOG-INPUT", "1"]);
    // silence: db goes Inactive (keepalive 1 s, inactive after 3 s)
    f.wait_status("db inactive", 20, |st| {
        st.hosts
            .get(&db_host)
            .is_some_and(|h| h.state == HostState::Inactive)
    });
    // restart: it re-verifies from its saved state, converges and becomes Active again
    f.start_agent("db");
    f.wait_status("db active and in sync again", 40, |st| {
        st.hosts
            .get(&db_host)
            .is_some_and(|h| h.state == HostState::Active)
            && Fleet::in_sync(st, &db_host)
    });
    assert!(
        f.tcp("web", &db4, 5433),
        "the new rule is in force after the restart"
    );

    // broker loss: close the agent's connection, change the rules meanwhile; rules stay
    // enforced, and the agent catches up after it reconnects
    let killed = f.kill_broker_connections(&db_host);
    assert!(killed >= 1, "no broker connection named after {db_host}");
    assert!(f.tcp("web", &db4, 5432));
    f.write("profiles.yaml", PROFILES);
    f.wait("db to catch up after reconnecting", 40, || {
        !f.tcp("web", &db4, 5433)
    });
    assert!(f.tcp("web", &db4, 5432));
}

/// With `--transient-host-messages` (classic host queues) a broker restart loses the Applies
/// still queued. Nothing is lost for good: the host comes back with hashes that are not the
/// expected ones, and the operator sends its state again. The loss here is a purge of the
/// host's queue while its agent is down; restarting the broker would take every other test's
/// connections with it.
#[test]
fn an_apply_the_broker_lost_is_sent_again_when_the_host_returns() {
    if !require_root() {
        return;
    }
    let mut f = start_with(
        &["web", "db"],
        &["--classic-queues", "--transient-host-messages"],
        &["--classic-queues"],
    );
    let log = f.log_of("operator");
    assert!(
        log.contains("\"host_queues\":\"classic\"")
            && log.contains("\"host_messages\":\"transient\""),
        "the operator did not log classic queues with transient host messages:\n{log}"
    );
    for port in [5432, 5433] {
        f.serve_tcp("db", port);
    }
    let db4 = f.v4("db");
    let db_host = f.host("db");
    assert!(f.tcp("web", &db4, 5432));
    assert!(!f.tcp("web", &db4, 5433));

    // db's agent is down when the rules change: its Apply waits in its queue, and is lost
    f.kill_agent("db", "-9");
    f.write(
        "profiles.yaml",
        &PROFILES.replace("ports: [\"5432\"]", "ports: [\"5432\", \"5433\"]"),
    );
    f.wait("db's new Apply waiting in its queue", 30, || {
        f.host_queue_ready("db").is_some_and(|n| n >= 1)
    });
    f.purge_host_queue("db");
    assert_eq!(f.host_queue_ready("db"), Some(0), "db's Apply is gone");

    // the agent returns with the old rules: the operator sees it behind and sends them again
    f.start_agent_with("db", &["--classic-queues"]);
    f.wait("db to run the rules changed while it was away", 40, || {
        f.tcp("web", &db4, 5433)
    });
    f.wait_status("db in sync", 40, |st| Fleet::in_sync(st, &db_host));
    assert!(f.tcp("web", &db4, 5432));
}

/// While a pass of publishes waits for the broker's confirms, the operator keeps hearing its
/// agents (on a large fleet a pass takes seconds, and answers, heartbeats and keepalives must
/// not wait behind it). Here everything the operator sends is held in a forwarder while the
/// rules change, so its Applies cannot be confirmed; the agents' keepalives, which the broker
/// still delivers, must be taken in meanwhile. Released, every host gets the change.
#[test]
fn the_operator_hears_its_agents_while_its_publishes_wait() {
    if !require_root() {
        return;
    }
    let forwarder = dog_e2e::forwarder::Forwarder::start("127.0.0.1:5672");
    let url = forwarder.url();
    // the operator reaches the broker through the forwarder's port, which it insists every
    // host's failsafe keeps open
    let outbound = format!(
        "udp:53,tcp:53,udp:67,tcp:6443,tcp:2379-2380,tcp:5671,tcp:5672,tcp:{}",
        forwarder.port()
    );
    let mut f = start_with(
        &["web", "db"],
        &["--broker-url", &url, "--failsafe-outbound", &outbound],
        &[],
    );
    f.serve_tcp("db", 5433);
    let db4 = f.v4("db");
    assert!(!f.tcp("web", &db4, 5433));
    let compiles = || f.operator_metric("dog_operator_compile_duration_seconds_count");
    let keepalives = || f.operator_metric("dog_operator_agent_messages_total{kind=\"keepalive\"}");
    let compiled = compiles().expect("the operator's compile count");

    forwarder.hold();
    f.write(
        "profiles.yaml",
        &PROFILES.replace("ports: [\"5432\"]", "ports: [\"5432\", \"5433\"]"),
    );
    // the pass to both hosts starts right after this compile, and cannot be confirmed
    f.wait("the operator to compile the change", 30, || {
        compiles().is_some_and(|c| c > compiled)
    });
    let heard = keepalives().expect("the operator's keepalive count");
    f.wait(
        "the agents' keepalives taken in while the Applies wait for confirms",
        20,
        || keepalives().is_some_and(|k| k >= heard + 3.0),
    );
    assert!(!f.tcp("web", &db4, 5433), "the held Apply reached db");

    forwarder.release();
    f.wait("db to run the changed rules", 40, || {
        f.tcp("web", &db4, 5433)
    });
    f.wait_status("every host in sync", 40, |st| f.all_in_sync(st));
    // everything taken in meanwhile, and since, is acknowledged (in batches: the last message
    // of each is what the acknowledgement names)
    let acknowledged = dog_test_support::poll_until(
        std::time::Duration::from_secs(20),
        std::time::Duration::from_millis(200),
        || f.inbox_unacked() == Some(0),
    );
    if !acknowledged {
        f.dump_logs();
        panic!(
            "timed out after 20s waiting for the operator's inbox to hold nothing \
             unacknowledged\n{}",
            f.inbox_report()
        );
    }
}

/// A fleet mid-upgrade: agents from before session envelopes beside an agent of today, on one
/// operator. The old ones are simulated on the protocol crate (dog-fleet-sim
/// `--without-sessions`): their heartbeats do not announce sessions, and they refuse an
/// envelope in mode 3 as such an agent does. Each host gets its state in a mode it opens.
#[test]
fn agents_from_before_sessions_get_their_state_beside_agents_of_today() {
    if !require_root() {
        return;
    }
    // the simulated hosts declare classic queues, so every queue here is one
    let classic = ["--classic-queues"];
    let mut f = start_with(&["web"], &classic, &classic);
    let old = format!("{}-old", f.prefix);
    // the simulated hosts are labelled role: app
    f.write(
        "old-groups.yaml",
        "apiVersion: dogfw.io/v1alpha1\nkind: Group\nmetadata: {name: app}\n\
         spec: {profile: web, selector: {matchLabels: {role: app}}}\n",
    );
    let log = std::fs::File::create(f.dir.path().join("sim.log")).expect("log");
    let sim = Command::new(dog_e2e::bin("dog-fleet-sim"))
        .args(["--hosts", "2", "--connections", "1", "--without-sessions"])
        .args(["--classic-queues", "--name-prefix", &old])
        .args(["--topology-prefix", &f.prefix])
        .arg("--hosts-file")
        .arg(f.resources().join("old-hosts.yaml"))
        .arg("--operator-public-keys")
        .arg(f.dir.path().join("operator.pub"))
        .stdout(Stdio::from(log.try_clone().expect("log")))
        .stderr(Stdio::from(log))
        .spawn()
        .expect("spawn dog-fleet-sim");
    f.extra.push(sim);
    let operator_log = f.dir.path().join("operator.log");
    for i in 0..2 {
        let host = format!("{old}-{i:05}");
        let line = format!("\"host\":\"{host}\"");
        f.wait(&format!("{host} to apply its desired state"), 60, || {
            std::fs::read_to_string(&operator_log)
                .unwrap_or_default()
                .lines()
                .any(|l| l.contains("\"agent applied\"") && l.contains(&line))
        });
    }
    let sim_log = std::fs::read_to_string(f.dir.path().join("sim.log")).unwrap_or_default();
    assert!(
        !sim_log.contains("request refused"),
        "an old agent was sent what it cannot open:\n{sim_log}"
    );
    // and the agent of today still opens what it gets (in sessions)
    f.write(
        "profiles.yaml",
        &PROFILES.replace("ports: [\"8080\"]", "ports: [\"8080\", \"8081\"]"),
    );
    let revision = |f: &Fleet| {
        f.status()
            .hosts
            .get(&f.host("web"))
            .and_then(|h| h.applied_revision)
    };
    let before = revision(&f);
    f.wait_status("web to apply the change", 40, |st| {
        Fleet::in_sync(st, &f.host("web"))
            && st
                .hosts
                .get(&f.host("web"))
                .and_then(|h| h.applied_revision)
                != before
    });
    assert_eq!(
        f.agent_metric(
            "web",
            "dog_agent_rejected_messages_total{reason=\"malformed\"}"
        )
        .unwrap_or(0.0),
        0.0
    );
}

/// kill -9 while a large set and the rules are being applied: every set holds its complete old
/// or complete new content and each family's rules are the old or the new ones; the restarted
/// agent converges and leaves no temporary set behind.
/// Long because it is one sequence: the old state, the kill during the new apply, the check
/// of every set and family, the restart.
#[test]
fn kill_during_a_large_apply_leaves_complete_old_or_new_state() {
    use dog_protocol::ruleset::{parse_ipset_save, rules_hash};
    if !require_root() {
        return;
    }
    let mut f = Fleet::new(&["web", "db"]);
    f.write("hosts.yaml", HOSTS);
    f.write("groups.yaml", GROUPS);
    f.write("zones.yaml", &zones(&[]));
    let blocklist = |n: usize| {
        let mut text = String::from(
            "apiVersion: dogfw.io/v1alpha1\nkind: Zone\nmetadata: {name: blocklist}\n\
             spec: {addresses: [], configMapRefs: [{name: blocklist, namespace: default}]}\n---\n\
             apiVersion: v1\nkind: ConfigMap\nmetadata: {name: blocklist, namespace: default}\ndata:\n  addresses: |\n",
        );
        for i in 0..n {
            text.push_str(&format!(
                "    {}.{}.{}.0/24\n",
                100 + i / 65536,
                i / 256 % 256,
                i % 256
            ));
            text.push_str(&format!(
                "    2001:db8:{:x}:{:x}::/64\n",
                i / 65536,
                i % 65536
            ));
        }
        text
    };
    let profiles = |port: u16| {
        PROFILES.replace(
            "    - {name: pg-web,",
            &format!("    - {{name: block, action: DROP, peer: {{kind: Zone, name: blocklist}}}}\n    - {{name: extra, action: ACCEPT, protocol: tcp, ports: [\"{port}\"]}}\n    - {{name: pg-web,"),
        )
    };
    f.write("blocklist.yaml", &blocklist(1));
    f.write("profiles.yaml", &profiles(7000));
    f.start_operator();
    f.start_agent("web");
    f.start_agent("db");
    f.wait_status("every host in sync", 90, |st| f.all_in_sync(st));
    let db_host = f.host("db");
    let live = |f: &Fleet| {
        let sets = parse_ipset_save(&String::from_utf8_lossy(
            &f.exec("db", &["ipset", "save"]).stdout,
        ));
        (
            rules_hash(&f.save("db", false)),
            rules_hash(&f.save("db", true)),
            sets,
        )
    };
    let (old4, old6, old_sets) = live(&f);

    // a big set change and a rule change at once; kill -9 as soon as the apply is under way
    f.write("blocklist.yaml", &blocklist(120_000));
    f.write("profiles.yaml", &profiles(7001));
    let pid = f.agent_pid("db").expect("agent runs");
    f.wait("the apply to start", 60, || {
        let names =
            String::from_utf8_lossy(&f.exec("db", &["ipset", "list", "-n"]).stdout).to_string();
        names.lines().any(|n| n.starts_with("dogtmp-")) || rules_hash(&f.save("db", false)) != old4
    });
    let _ = std::process::Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status();
    f.kill_agent("db", "-9");
    let (now4, now6, now_sets) = live(&f);
    let temp = now_sets.keys().filter(|n| n.starts_with("dogtmp-")).count();
    eprintln!(
        "killed with: IPv4 rules {}, {temp} temporary set(s), set sizes {:?}",
        if now4 == old4 { "old" } else { "new" },
        now_sets
            .iter()
            .map(|(n, s)| (n.as_str(), s.members.len()))
            .collect::<Vec<_>>()
    );

    let st = f.wait_status("expected hashes of the new state", 30, |st| {
        st.hosts
            .get(&db_host)
            .and_then(|h| h.expected_hashes.as_ref())
            .is_some_and(|e| e.ipv4_rules != old4)
    });
    let expected = st.hosts[&db_host]
        .expected_hashes
        .clone()
        .unwrap_or_default();
    assert!(
        now4 == old4 || now4 == expected.ipv4_rules,
        "IPv4 rules are neither the old nor the new ones"
    );
    assert!(
        now6 == old6 || now6 == expected.ipv6_rules,
        "IPv6 rules are neither the old nor the new ones"
    );
    for (name, set) in &now_sets {
        if name.starts_with("dogtmp-") {
            continue; // a temporary being filled is not referenced by any rule
        }
        let n = set.members.len();
        if name.contains("blocklist") {
            // old: one entry per family; new: 120,000 per family
            assert!(
                n == 1 || n == 120_000,
                "blocklist set {name} is partial: {n} members"
            );
        } else {
            assert_eq!(
                old_sets.get(name).map(|s| &s.members),
                Some(&set.members),
                "set {name} changed"
            );
        }
    }

    // restart: converges, and no temporary set is left
    f.start_agent("db");
    f.wait_status("db in sync after the restart", 90, |st| {
        Fleet::in_sync(st, &db_host)
    });
    let names = String::from_utf8_lossy(&f.exec("db", &["ipset", "list", "-n"]).stdout).to_string();
    assert!(
        !names.lines().any(|n| n.starts_with("dogtmp-")),
        "temporary sets left: {names}"
    );
}

/// A restarted (or newly elected) operator that finds every host running what it would send
/// publishes nothing: same input, same revisions and hashes on every host.
#[test]
fn an_operator_restart_changes_nothing_on_the_hosts() {
    if !require_root() {
        return;
    }
    let mut f = start(&["web", "db"]);
    let before = f.status();
    let hosts = [f.host("web"), f.host("db")];
    let revisions = |st: &dog_operator::dir::StatusFile| {
        hosts
            .iter()
            .map(|h| st.hosts.get(h).and_then(|h| h.applied_revision))
            .collect::<Vec<_>>()
    };
    let rev_before = revisions(&before);
    assert!(rev_before.iter().all(Option::is_some), "{rev_before:?}");
    let rules_before = dog_protocol::ruleset::rules_hash(&f.save("db", false));

    if let Some(mut op) = f.operator.take() {
        let _ = op.kill();
        let _ = op.wait();
    }
    f.start_operator();
    // keepalives (1 s) arrive and are compared; give it a few rounds
    f.wait_status("hosts seen by the new operator", 20, |st| f.all_in_sync(st));
    // a publish would follow a host's report in the same pass: let several more keepalives of
    // each host be compared, then nothing may have been published
    let keepalives = || f.operator_metric(r#"dog_operator_agent_messages_total{kind="keepalive"}"#);
    let seen = keepalives().unwrap_or(0.0);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while keepalives().unwrap_or(0.0) < seen + 6.0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the restarted operator received no further keepalives"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let after = f.status();
    assert_eq!(
        revisions(&after),
        rev_before,
        "revisions changed after the restart"
    );
    assert_eq!(
        dog_protocol::ruleset::rules_hash(&f.save("db", false)),
        rules_before
    );
    let log = std::fs::read_to_string(f.dir.path().join("operator.log")).unwrap_or_default();
    assert!(
        !log.contains("published desired state"),
        "the restarted operator re-published state:\n{log}"
    );
}

/// `/readyz` and the broker gauge tell the truth: an operator that cannot reach its broker
/// (here: a wrong password) is not ready and says why; the same operator with the right
/// credentials is. In `--from-dir` mode the operator is the active one.
#[test]
fn operator_readiness_follows_its_broker_connection() {
    if !require_root() {
        return;
    }
    let mut f = Fleet::new(&["a"]);
    let readyz = |f: &Fleet| -> (String, String) {
        let url = format!(
            "http://127.0.0.1:{}/readyz",
            f.operator_metrics_port.unwrap_or(0)
        );
        let out = dog_e2e::sh(&[
            "curl",
            "-s",
            "--max-time",
            "2",
            "-w",
            "\n%{http_code}",
            &url,
        ]);
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", ""));
        (code.to_string(), body.to_string())
    };
    f.start_operator_with(&["--broker-url", "amqp://guest:wrong@127.0.0.1:5672/%2f"]);
    f.wait("an operator without its broker to say so", 30, || {
        let (code, body) = readyz(&f);
        code == "503"
            && body.contains("broker disconnected")
            && f.operator_metric("dog_operator_broker_connected") == Some(0.0)
    });
    // the failure repeats on every reconnect; the log says so once (no third-party lines, no
    // "backoff attempts exhausted"), the counter counts every attempt
    f.wait("a few failed reconnects", 60, || {
        f.operator_metric("dog_operator_broker_connection_failures_total")
            .is_some_and(|n| n >= 4.0)
    });
    let lines = json_lines(&f.dir.path().join("operator.log"));
    let loud = warnings_and_errors(&lines);
    assert_eq!(loud.len(), 1, "{loud:?}");
    assert!(
        loud[0]
            .get("error")
            .and_then(|e| e.as_str())
            .is_some_and(|e| e.contains("ACCESS")),
        "{loud:?}"
    );
    assert_eq!(f.operator_metric("dog_operator_leader"), Some(1.0));
    assert_eq!(
        f.operator_metric("dog_operator_rejected_messages_total{reason=\"bad_signature\"}"),
        Some(0.0)
    );
    assert!(f
        .operator_metric("process_resident_memory_bytes")
        .is_some_and(|v| v > 0.0));

    if let Some(mut old) = f.operator.take() {
        let _ = old.kill();
        let _ = old.wait();
    }
    f.start_operator();
    f.wait("a connected operator to be ready", 30, || {
        readyz(&f).0 == "200" && f.operator_metric("dog_operator_broker_connected") == Some(1.0)
    });
}

/// Both scrapes are what Prometheus itself accepts: `promtool check metrics` (format and lint:
/// names, units, help text) reports nothing on the live output of an operator and an agent
/// that have applied a firewall.
#[test]
fn live_metrics_pass_promtool() {
    if !require_root() {
        return;
    }
    let f = start(&["web"]);
    f.wait("the agent to apply", 30, || {
        f.agent_metric("web", "dog_agent_applies_total{result=\"applied\"}")
            .is_some_and(|n| n >= 1.0)
    });
    let scrapes = [
        (
            "operator",
            f.operator_metrics_port.expect("operator metrics port"),
        ),
        ("agent", f.agent_metrics_port("web")),
    ];
    for (who, port) in scrapes {
        let url = format!("http://127.0.0.1:{port}/metrics");
        let scrape = dog_e2e::sh(&["curl", "-sf", "--max-time", "5", &url]);
        assert!(
            scrape.status.success() && !scrape.stdout.is_empty(),
            "{who}: no scrape"
        );
        let mut promtool = Command::new(dog_kube_harness::promtool())
            .args(["check", "metrics"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn promtool");
        promtool
            .stdin
            .take()
            .expect("stdin")
            .write_all(&scrape.stdout)
            .expect("feed promtool");
        let out = promtool.wait_with_output().expect("promtool");
        let said = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.status.success() && said.trim().is_empty(),
            "{who}: promtool check metrics: {said}"
        );
    }
}

/// The operator's exchange disappears under a running fleet (a broker operator deleted it, a
/// definitions import dropped it): the agent says so, in a few lines rather than one per
/// attempt, and its keepalives reach the operator again once the exchange is back.
#[test]
fn a_lost_exchange_is_logged_once_not_per_attempt() {
    if !require_root() {
        return;
    }
    let f = start(&["web"]);
    let keepalives = || {
        f.agent_metric("web", "dog_agent_messages_sent_total{kind=\"keepalive\"}")
            .unwrap_or(0.0)
    };
    f.wait("keepalives", 20, || keepalives() >= 2.0);
    let log = f.dir.path().join("agent-web.log");
    let before = json_lines(&log).len();
    let exchange = format!("{}.operator", f.prefix);
    let delete = dog_e2e::sh(&["rabbitmqctl", "eval", &format!(
        "rabbit_exchange:delete(rabbit_misc:r(<<\"/\">>, exchange, <<\"{exchange}\">>), false, <<\"dog-e2e\">>)."
    )]);
    assert!(delete.status.success());
    // the operator declares it again within its 5 s inbox check; keepalives flow again
    let sent = keepalives();
    f.wait("keepalives after the exchange came back", 60, || {
        keepalives() >= sent + 3.0
            && f.operator_metric("dog_operator_safety_valve_frozen") == Some(0.0)
    });
    let lines = json_lines(&log);
    let during = &lines[before.min(lines.len())..];
    let shown = || {
        during
            .iter()
            .map(|l| serde_json::to_string(l).unwrap_or_default())
            .collect::<Vec<_>>()
            .join("\n")
    };
    let loud = warnings_and_errors(during);
    // one line saying the link broke (and perhaps one per reconnect that met the same
    // failure before the operator healed it), never one per attempt
    assert!(
        !loud.is_empty() && loud.len() <= 3,
        "{} warnings/errors:\n{}",
        loud.len(),
        shown()
    );
    assert!(during.len() <= 8, "{} lines:\n{}", during.len(), shown());
    assert!(
        !during.iter().any(|l| {
            serde_json::to_string(l)
                .unwrap_or_default()
                .contains("backoff attempts exhausted")
        }),
        "{}",
        shown()
    );
}

type LogLine = serde_json::Map<String, serde_json::Value>;

/// The lines of level WARN or ERROR.
fn warnings_and_errors(lines: &[LogLine]) -> Vec<&LogLine> {
    lines
        .iter()
        .filter(|l| {
            matches!(
                l.get("level").and_then(|v| v.as_str()),
                Some("WARN" | "ERROR")
            )
        })
        .collect()
}

fn json_lines(path: &std::path::Path) -> Vec<serde_json::Map<String, serde_json::Value>> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| match serde_json::from_str::<serde_json::Value>(l) {
            Ok(serde_json::Value::Object(m)) => m,
            _ => panic!("{}: not a JSON object: {l}", path.display()),
        })
        .collect()
}

/// What a log pipeline reads: one flat JSON object per line, the agent's host on every line,
/// numbers as numbers, no Rust debug text; a fatal start-up error is such a line too.
#[test]
fn logs_are_flat_json_lines_a_pipeline_can_read() {
    if !require_root() {
        return;
    }
    let f = start(&["web"]);
    f.wait("a few keepalives", 20, || {
        f.agent_metric("web", "dog_agent_messages_sent_total{kind=\"keepalive\"}")
            .is_some_and(|n| n >= 3.0)
    });
    let host = f.host("web");
    let agent = json_lines(&f.dir.path().join("agent-web.log"));
    let operator = json_lines(&f.dir.path().join("operator.log"));
    assert!(agent.len() >= 3 && !operator.is_empty());
    for (who, lines) in [("agent", &agent), ("operator", &operator)] {
        for l in lines.iter() {
            for key in ["timestamp", "level", "message"] {
                assert!(l.contains_key(key), "{who}: no {key} in {l:?}");
            }
            assert!(
                !l.contains_key("span") && !l.contains_key("spans"),
                "{who}: nested: {l:?}"
            );
            for (k, v) in l {
                if let Some(s) = v.as_str() {
                    assert!(!s.starts_with("Some("), "{who}: {k} is debug text: {l:?}");
                }
            }
            if let Some(r) = l.get("revision") {
                assert!(r.is_u64(), "{who}: revision is not a number: {l:?}");
            }
        }
    }
    for l in &agent {
        assert_eq!(
            l.get("host").and_then(|h| h.as_str()),
            Some(host.as_str()),
            "every agent line names its host: {l:?}"
        );
    }
    assert!(
        agent
            .iter()
            .any(|l| l.get("revision").is_some_and(|r| r.is_u64())),
        "some agent line carries its revision"
    );

    // a fatal start-up error is a JSON line naming what failed
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = busy.local_addr().unwrap().to_string();
    // the operator's output when it cannot start, in `format`
    let fails_to_start = |format: &str| {
        let out = dog_e2e::sh(&[
            dog_e2e::bin("dog-operator").to_str().unwrap(),
            "run",
            "--from-dir",
            f.resources().to_str().unwrap(),
            "--metrics-addr",
            &addr,
            "--log-format",
            format,
        ]);
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr)
    };
    let text = fails_to_start("json");
    let fatal: serde_json::Value = serde_json::from_str(text.trim().lines().last().unwrap_or(""))
        .unwrap_or_else(|e| panic!("the fatal error is not a JSON line ({e}): {text}"));
    assert_eq!(fatal["level"], "ERROR", "{text}");
    assert!(
        fatal["error"]
            .as_str()
            .is_some_and(|e| e.contains(&format!("cannot listen on {addr}"))),
        "{text}"
    );

    // text for people, but no colour codes in a pipe or a file
    let text = fails_to_start("text");
    assert!(text.contains("cannot listen on"), "{text}");
    assert!(!text.contains('\u{1b}'), "ANSI escapes in a pipe: {text:?}");
}

/// `dog-operator explain` on `dir` (with the fleet's status file) for the db host.
fn explain_cmd(f: &Fleet, dir: &std::path::Path, args: &[&str]) -> std::process::Output {
    let mut v: Vec<String> = vec![
        "explain".into(),
        "--from-dir".into(),
        dir.display().to_string(),
        "--status-file".into(),
        f.status_path().display().to_string(),
        "--host".into(),
        f.host("db"),
        "--live".into(),
        "--trust-reported-addresses".into(),
        f.networks(),
    ];
    v.extend(args.iter().map(|a| a.to_string()));
    std::process::Command::new(dog_e2e::bin("dog-operator"))
        .args(&v)
        .output()
        .expect("running dog-operator explain")
}

/// `dog-operator explain` answers what real probes see: for a table of connections (IPv4 and
/// IPv6, group and zone sets, a port range, failsafe, REJECT vs DROP, ICMP) its verdict equals
/// the kernel's, on the same resources and the addresses the agents reported.
#[test]
fn explain_agrees_with_real_probes() {
    if !require_root() {
        return;
    }
    let mut f = start(&["web", "db", "bastion"]);
    for port in [22, 5432, 5433, 6000] {
        f.serve_tcp("db", port);
    }
    f.serve_udp("db", 9125);
    // bastion joins the office zone: udp 9125 opens for it
    f.write("zones.yaml", &zones(&[f.v4("bastion"), f.v6("bastion")]));
    f.wait_status("bastion in the office zone", 30, |st| {
        f.all_in_sync(st) && st.zones.get("office").is_some_and(|z| z.ipv4_count == 2)
    });
    let explain = |from: &str, peer: &str, proto: &str, port: u16| -> (String, String) {
        let port = port.to_string();
        let out = explain_cmd(
            &f,
            &f.resources(),
            &[
                "--peer",
                peer,
                "--protocol",
                proto,
                "--port",
                &port,
                "--format",
                "json",
            ],
        );
        assert!(
            out.status.success(),
            "explain from {from}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
        assert_eq!(v["live"]["matches"], true, "db runs what explain read: {v}");
        (
            v["verdict"].as_str().unwrap_or_default().to_string(),
            v["reason"].as_str().unwrap_or_default().to_string(),
        )
    };
    let mut checked = 0;
    for v6 in [false, true] {
        let db_addr = |n: &str| if v6 { f.v6(n) } else { f.v4(n) };
        let cases: [(&str, &str, u16, &str); 8] = [
            ("web", "tcp", 5432, "pg-web"),
            ("bastion", "tcp", 5432, "default"),
            ("web", "tcp", 5433, "default"),
            ("web", "tcp", 6000, "refuse-6000"),
            ("bastion", "tcp", 22, "failsafe"),
            ("bastion", "udp", 9125, "metrics"),
            ("web", "udp", 9125, "default"),
            (
                "web",
                if v6 { "icmpv6" } else { "icmp" },
                if v6 { 128 } else { 8 },
                "ping",
            ),
        ];
        let target = db_addr("db");
        for (from, proto, port, because) in cases {
            let (verdict, reason) = explain(from, &db_addr(from), proto, port);
            assert!(reason.contains(because), "{from} {proto}/{port}: {reason}");
            let probe = match proto {
                "tcp" => f.tcp_outcome(from, &target, port),
                "udp" if f.udp(from, &target, port) => "Accept",
                "udp" => "Drop", // a REJECT of udp is not in this table
                _ if f.ping(from, &target) => "Accept",
                _ => "Drop",
            };
            // an ICMPv6 port-unreachable does not fail a TCP connect at once (the client
            // times out as for a DROP), so over IPv6 a REJECT is only "not accepted"
            let probe = if v6 && verdict == "Reject" && probe == "Drop" {
                "Reject"
            } else {
                probe
            };
            assert_eq!(
                verdict, probe,
                "{from} -> {target} {proto}/{port}: explain says {verdict} ({reason}), the kernel {probe}"
            );
            checked += 1;
        }
    }
    assert_eq!(checked, 16);

    // --live says so when the resources are not what the host runs (an edit not yet applied)
    let edited = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(f.resources()).unwrap().flatten() {
        if entry.path().is_file() {
            std::fs::copy(entry.path(), edited.path().join(entry.file_name())).unwrap();
        }
    }
    let profiles = edited.path().join("profiles.yaml");
    let text = std::fs::read_to_string(&profiles).unwrap();
    std::fs::write(
        &profiles,
        text.replace("name: refuse-6000", "name: refuse-6001"),
    )
    .unwrap();
    let web = f.v4("web");
    let out = explain_cmd(
        &f,
        edited.path(),
        &["--peer", &web, "--protocol", "tcp", "--port", "6000"],
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("live:    NOT what the host runs now") && text.contains("ipv4_rules"),
        "{text}"
    );
}
