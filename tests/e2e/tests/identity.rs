//! Who may become a host, against the real operator and broker (`--from-dir` mode; the
//! Kubernetes identity is in cluster.rs): an agent with only a broker credential is believed
//! about nothing. Without trust on first use only an administrator's pin admits an agent; a
//! pinned host cannot be taken over; invented names never become Hosts; with trust on first
//! use the cap and the rate limit hold.

use dog_e2e::attacker::Attacker;
use dog_e2e::fixtures::{WEB_DB_GROUPS as GROUPS, WEB_DB_PROFILES as PROFILES};
use dog_e2e::{require_root, Fleet};

/// The Host documents of the fleet; `keys` holds `(node, spec.keys YAML)` pins.
fn hosts(nodes: &[(&str, &str)], keys: &[(&str, String)]) -> String {
    nodes
        .iter()
        .map(|(node, role)| {
            let spec = keys
                .iter()
                .find(|(n, _)| n == node)
                .map(|(_, k)| format!("spec:\n  {}", k.trim().replace('\n', "\n  ")))
                .unwrap_or_else(|| "spec: {}".into());
            format!(
                "apiVersion: dogfw.io/v1alpha1\nkind: Host\nmetadata: {{name: \"{{p}}-{node}\", labels: {{role: {role}}}}}\n{spec}\n"
            )
        })
        .collect::<Vec<_>>()
        .join("---\n")
}

/// `dog-agent --print-keys` for the node's state directory (what an admin pastes).
fn print_keys(f: &Fleet, node: &str) -> String {
    let out = std::process::Command::new(dog_e2e::bin("dog-agent"))
        .arg("--state-dir")
        .arg(f.dir.path().join("state").join(node))
        .arg("--print-keys")
        .output()
        .expect("dog-agent --print-keys");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// Hosts web and db (declared, not pinned), the operator with exactly `flags`, both agents,
/// both in sync.
fn web_and_db(flags: &[&str]) -> Fleet {
    let mut f = Fleet::new(&["web", "db"]);
    f.write("hosts.yaml", &hosts(&[("web", "web"), ("db", "db")], &[]));
    f.write("groups.yaml", GROUPS);
    f.write("profiles.yaml", PROFILES);
    f.start_operator_exactly(flags);
    f.start_agent("web");
    f.start_agent("db");
    f.wait_status("both hosts in sync", 60, |st| f.all_in_sync(st));
    f
}

fn ready_reason(f: &Fleet, node: &str) -> Option<(String, String)> {
    let st = f.status();
    let h = st.hosts.get(&f.host(node))?;
    h.conditions
        .iter()
        .find(|c| c.type_ == "Ready")
        .map(|c| (c.reason.clone(), c.message.clone()))
}

fn rejected(f: &Fleet, reason: &str) -> f64 {
    f.operator_metric(&format!(
        "dog_operator_rejected_messages_total{{reason=\"{reason}\"}}"
    ))
    .unwrap_or(0.0)
}

#[test]
fn without_trust_on_first_use_only_pinned_agents_become_hosts() {
    if !require_root() {
        return;
    }
    let mut f = Fleet::new(&["web", "db", "bastion"]);
    let roles = [("web", "web"), ("db", "db"), ("bastion", "bastion")];
    let db_keys = print_keys(&f, "db");
    f.write("hosts.yaml", &hosts(&roles, &[("db", db_keys.clone())]));
    f.write("groups.yaml", GROUPS);
    f.write("profiles.yaml", PROFILES);
    f.start_operator_exactly(&[]);
    f.start_agent("web");
    f.start_agent("db");
    let (web, db) = (f.host("web"), f.host("db"));

    // db was pinned by the admin: it runs its rules. web was not: it is refused, and says why.
    f.wait_status("db in sync", 60, |st| Fleet::in_sync(st, &db));
    f.wait("web refused as not pinned", 30, || {
        ready_reason(&f, "web").is_some_and(|(r, m)| {
            r == "NotAdmitted" && m.contains("spec.keys") && m.contains("--trust-on-first-use")
        })
    });
    assert!(rejected(&f, "not_pinned") >= 1.0);
    assert!(!f.log_of("agent-web").contains("applied firewall"));

    // Attack: with a broker credential and keys of its own, someone on bastion claims the
    // pinned db and the declared, still unpinned web; and invents hosts.
    f.start_impostor("bastion", &db, "db", &[]);
    f.start_impostor("bastion", &web, "web", &[]);
    f.wait("the db impostor refused (key_changed)", 30, || {
        rejected(&f, "key_changed") >= 1.0
    });
    // the log names the host it claims to be
    let claimed = format!("\"reason\":\"key_changed\",\"sender\":\"{db}\"");
    f.wait(
        "the key_changed rejection logged with its claimed sender",
        10,
        || f.log_of("operator").contains(&claimed),
    );
    let attacker = Attacker::connect(&f.prefix, &format!("{}-attacker", f.prefix));
    let invented_invalid = [
        "../../etc/passwd".to_string(),
        "a\nnewline".into(),
        "with space".into(),
        "ünïcode".into(),
        "UPPER".into(),
        "x".repeat(253),
    ];
    for name in &invented_invalid {
        attacker.heartbeat_as(name, None, &["198.51.100.7/32"]);
    }
    for i in 0..20 {
        attacker.heartbeat_as(&format!("{}-invented-{i}", f.prefix), None, &["10.0.0.0/8"]);
    }
    f.wait("every invented name refused", 30, || {
        rejected(&f, "invalid_hostname") >= invented_invalid.len() as f64
            && rejected(&f, "not_pinned") >= 21.0
    });
    let st = f.status();
    let mut names: Vec<&String> = st.hosts.keys().collect();
    names.sort();
    let bastion = f.host("bastion");
    let mut want = vec![&bastion, &db, &web];
    want.sort();
    assert_eq!(names, want, "only the declared hosts have a status");
    assert_eq!(
        f.operator_metric("dog_operator_hosts_registered_total{how=\"first_use\"}"),
        Some(0.0)
    );
    for tag in ["db", "web"] {
        assert!(
            !f.log_of(&format!("impostor-{tag}"))
                .contains("applied firewall"),
            "the {tag} impostor got rules"
        );
    }
    // db is untouched: same pin, still in sync
    let st = f.wait_status("db still in sync", 30, |st| Fleet::in_sync(st, &db));
    let pinned = st.hosts[&db].pinned_keys.clone().expect("db pinned");
    assert!(
        db_keys.contains(&pinned.signing),
        "db's pin changed: {pinned:?}"
    );

    // The admin pins web: the real web agent gets its rules (no restart needed), and web's
    // group now opens db:5432 to it.
    let web_keys = print_keys(&f, "web");
    f.write(
        "hosts.yaml",
        &hosts(&roles, &[("db", db_keys), ("web", web_keys.clone())]),
    );
    f.wait_status("web in sync once pinned", 60, |st| Fleet::in_sync(st, &web));
    let pinned = f.status().hosts[&web]
        .pinned_keys
        .clone()
        .expect("web pinned");
    assert!(
        web_keys.contains(&pinned.signing),
        "web pinned to the impostor: {pinned:?}"
    );
    f.serve_tcp("db", 5432);
    let db4 = f.v4("db");
    f.wait("web -> db:5432 open", 30, || f.tcp("web", &db4, 5432));
    assert!(!f.tcp("bastion", &db4, 5432), "bastion must stay dropped");
}

#[test]
fn trust_on_first_use_is_capped_rate_limited_and_checks_names() {
    if !require_root() {
        return;
    }
    // 2 declared hosts, room for 1 more; 4 first heartbeats at once, then 1 a minute
    let f = web_and_db(&[
        "--trust-on-first-use",
        "--max-hosts",
        "3",
        "--registration-burst",
        "4",
        "--registrations-per-minute",
        "1",
    ]);
    let attacker = Attacker::connect(&f.prefix, &format!("{}-attacker", f.prefix));
    attacker.heartbeat_as("Not_A_Name", None, &[]);
    f.wait("an invalid name refused", 30, || {
        rejected(&f, "invalid_hostname") >= 1.0
    });
    let first = format!("{}-new-1", f.prefix);
    attacker.heartbeat_as(&first, None, &[]);
    f.wait_status("the first new host registered", 30, |st| {
        st.hosts.contains_key(&first)
    });
    attacker.heartbeat_as(&format!("{}-new-2", f.prefix), None, &[]);
    f.wait("the cap refuses a fourth host", 30, || {
        rejected(&f, "too_many_hosts") >= 1.0
    });
    for i in 3..10 {
        attacker.heartbeat_as(&format!("{}-new-{i}", f.prefix), None, &[]);
    }
    f.wait("the rate limit refuses the rest", 30, || {
        rejected(&f, "registration_rate") >= 6.0
    });
    assert_eq!(
        f.operator_metric("dog_operator_hosts_registered_total{how=\"first_use\"}"),
        Some(3.0),
        "web, db and the first new host"
    );
    assert_eq!(f.status().hosts.len(), 3);
    // the operator keeps up: its inbox is read and empty again
    f.wait("the inbox depth read back as 0", 15, || {
        f.operator_metric("dog_operator_inbox_messages") == Some(0.0)
    });
}

#[test]
fn addresses_an_agent_does_not_own_stay_out_of_other_hosts_sets() {
    if !require_root() {
        return;
    }
    let mut f = web_and_db(&["--trust-on-first-use"]);
    // a compromised web claims addresses outside the networks anyone trusts it with
    for a in ["198.51.100.7/32", "10.0.0.0/8"] {
        let out = f.exec("web", &["ip", "addr", "add", a, "dev", "eth0"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let web = f.host("web");
    f.wait("web's Host degraded by untrusted addresses", 30, || {
        let st = f.status();
        st.hosts.get(&web).is_some_and(|h| {
            h.conditions.iter().any(|c| {
                c.type_ == "Degraded"
                    && c.status == "True"
                    && c.reason == "UntrustedAddress"
                    && c.message.contains("198.51.100.7")
                    && c.message.contains("10.0.0.0")
            })
        })
    });
    let sets = String::from_utf8_lossy(&f.exec("db", &["ipset", "list"]).stdout).to_string();
    assert!(
        sets.contains(&f.v4("web")),
        "web's own address is in db's sets:\n{sets}"
    );
    assert!(
        !sets.contains("198.51.100.7") && !sets.contains("10.0.0.0"),
        "an address web does not own reached db's sets:\n{sets}"
    );
    f.serve_tcp("db", 5432);
    let db4 = f.v4("db");
    assert!(f.tcp("web", &db4, 5432), "web keeps its access");
}

#[test]
fn one_flooding_agent_is_rate_limited_and_the_others_keep_their_state() {
    if !require_root() {
        return;
    }
    let f = web_and_db(&[
        "--trust-on-first-use",
        "--sender-burst",
        "50",
        "--sender-messages-per-minute",
        "120",
    ]);
    // root on web steals web's key and floods the operator with validly signed keepalives
    let attacker = Attacker::connect(&f.prefix, &format!("{}-attacker", f.prefix));
    attacker.flood_keepalives_as(
        &f.host("web"),
        &f.dir.path().join("state").join("web"),
        2000,
    );
    f.wait("the flood is rate limited", 30, || {
        rejected(&f, "rate_limited") >= 1900.0
    });
    // db was never limited and still is Active and in sync; the edit of its profile reaches it
    let db = f.host("db");
    let st = f.status();
    assert_eq!(
        st.hosts[&db].state,
        dog_operator::crd::HostState::Active,
        "{:?}",
        st.hosts[&db]
    );
    let rev = st.hosts[&db].applied_revision;
    f.write(
        "profiles.yaml",
        &PROFILES.replace("ports: [\"5432\"]", "ports: [\"5432\", \"5433\"]"),
    );
    f.wait_status("db applied the edit", 30, |st| {
        Fleet::in_sync(st, &db) && st.hosts[&db].applied_revision != rev
    });
}
