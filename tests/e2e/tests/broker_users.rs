//! Per-node broker users, against the real broker, operator and agents (`--from-dir` mode):
//! agents start with the shared bootstrap user, the operator gives each admitted host its own
//! user through the management API, and a compromised node's credentials — its own user or
//! the bootstrap user — reach nothing of another node's. A VM whose administrator created its
//! user is admitted by it.

use dog_e2e::attacker::{allowed_against, Attacker};
use dog_e2e::fixtures::{WEB_DB_GROUPS, WEB_DB_PROFILES};
use dog_e2e::{require_root, sh, Fleet};
use dog_protocol::broker::Topology;

const MANAGEMENT: &str = "http://guest:guest@127.0.0.1:15672";

/// Hosts web and db, not pinned.
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
"#;

/// A fleet of web and db with the shared groups and profiles; nothing started yet.
fn web_and_db() -> (Fleet, Topology) {
    let f = Fleet::new(&["web", "db"]);
    f.write("hosts.yaml", HOSTS);
    f.write("groups.yaml", WEB_DB_GROUPS);
    f.write("profiles.yaml", WEB_DB_PROFILES);
    let topology = Topology::new(f.prefix.clone());
    (f, topology)
}

fn provisioned(f: &Fleet) -> f64 {
    f.operator_metric("dog_operator_broker_users_provisioned_total{result=\"ok\"}")
        .unwrap_or(0.0)
}

fn saved_user_path(f: &Fleet, node: &str) -> std::path::PathBuf {
    f.dir
        .path()
        .join("state")
        .join(node)
        .join("broker-user.json")
}

/// The node's saved broker user (what root on a compromised node can read).
fn saved_user(f: &Fleet, node: &str) -> Option<(String, String)> {
    let path = saved_user_path(f, node);
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(path).ok()?).ok()?;
    Some((
        v["username"].as_str()?.to_string(),
        v["password"].as_str()?.to_string(),
    ))
}

/// The fleet's bootstrap user (the chart's `agent-url`); its AMQP URL.
fn bootstrap_user(f: &Fleet, topology: &Topology) -> String {
    f.add_broker_user(
        &format!("{}-bootstrap", f.prefix),
        "bootstrap-pw",
        &topology.bootstrap_permissions(),
    )
}

fn logged_in_as_own_user(f: &Fleet, topology: &Topology, node: &str) -> bool {
    let host = f.host(node);
    f.connection_users(&format!("dog-agent/{host}")) == vec![topology.node_user(&host)]
}

#[test]
fn each_node_logs_in_as_its_own_broker_user_and_reaches_no_other_nodes_queue() {
    if !require_root() {
        return;
    }
    let (mut f, topology) = web_and_db();
    let bootstrap = bootstrap_user(&f, &topology);
    f.start_operator_with(&["--broker-management-url", MANAGEMENT]);
    let agent_flags = ["--broker-url", bootstrap.as_str(), "--broker-bootstrap"];
    f.start_agent_with("web", &agent_flags);
    f.start_agent_with("db", &agent_flags);
    let (web, db) = (f.host("web"), f.host("db"));

    // each agent moves to its own user, and runs its rules
    for node in ["web", "db"] {
        f.wait(
            &format!("{node} logged in as its own broker user"),
            60,
            || logged_in_as_own_user(&f, &topology, node),
        );
    }
    f.wait_status("both hosts in sync", 60, |st| f.all_in_sync(st));
    for node in ["web", "db"] {
        let (user, _) = saved_user(&f, node).expect("a saved broker user");
        assert_eq!(user, topology.node_user(&f.host(node)));
        let path = saved_user_path(&f, node);
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(path).unwrap().permissions(),
        );
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(
            f.agent_metric(node, "dog_agent_broker_bootstrap"),
            Some(0.0)
        );
    }
    assert_eq!(provisioned(&f), 2.0);
    assert!(!f.log_of("operator").contains("bootstrap-pw"));

    // Attack: root on web holds web's own user and the bootstrap user. Neither reaches db's
    // queue in any way.
    let (user, password) = saved_user(&f, "web").expect("web's user");
    let stolen = format!("amqp://{user}:{password}@127.0.0.1:5672/%2f");
    assert_eq!(
        allowed_against(&stolen, &f.prefix, &web, &db),
        Vec::<&str>::new()
    );
    assert_eq!(
        allowed_against(&bootstrap, &f.prefix, &web, &db),
        Vec::<&str>::new()
    );
    // and web's user cannot speak for db, nor register a name of its choosing
    let attacker = Attacker::connect_as(&f.prefix, &web, &stolen);
    attacker.heartbeat_as(&db, None, &["198.51.100.7/32"]);
    attacker.heartbeat_as(&format!("{}-charlie", f.prefix), None, &[]);
    // (db's claim fails on its pinned key already; the invented name on the broker user)
    let refused = |reason: &str| {
        f.operator_metric(&format!(
            "dog_operator_rejected_messages_total{{reason=\"{reason}\"}}"
        ))
        .unwrap_or(0.0)
    };
    f.wait("both claims refused", 30, || {
        refused("key_changed") >= 1.0 && refused("wrong_broker_user") >= 1.0
    });
    drop(attacker);
    assert!(!f
        .status()
        .hosts
        .contains_key(&format!("{}-charlie", f.prefix)));

    // A restarted agent logs in as its saved user at once: nothing new is provisioned.
    f.kill_agent("db", "-TERM");
    f.start_agent_with("db", &agent_flags);
    f.wait("db back on its own user", 60, || {
        logged_in_as_own_user(&f, &topology, "db")
    });
    f.wait_status("db in sync after the restart", 60, |st| {
        Fleet::in_sync(st, &db)
    });
    assert_eq!(provisioned(&f), 2.0);

    // Revoked (deleted, its connection closed): the agent falls back to the bootstrap user,
    // asks again and gets a new one.
    let out = sh(&["rabbitmqctl", "delete_user", &topology.node_user(&db)]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    f.kill_broker_connections(&format!("dog-agent/{db}"));
    f.wait("db provisioned again", 60, || provisioned(&f) >= 3.0);
    f.wait("db on its new user", 60, || {
        logged_in_as_own_user(&f, &topology, "db")
    });
    f.wait_status("db in sync on its new user", 60, |st| {
        Fleet::in_sync(st, &db)
    });
    assert!(f
        .log_of("agent-db")
        .contains("the broker refuses this node's own user"));
}

#[test]
fn a_vm_is_admitted_by_the_broker_user_its_administrator_created() {
    if !require_root() {
        return;
    }
    let (mut f, topology) = web_and_db();
    // no trust on first use, no pins, no tokens: only the broker vouches
    f.start_operator_exactly(&[]);
    let db = f.host("db");
    let url = f.add_broker_user(
        &topology.node_user(&db),
        "vm-pw",
        &topology.node_permissions(&db),
    );
    f.start_agent_with("db", &["--broker-url", &url]);
    f.wait_status("db admitted and in sync", 60, |st| Fleet::in_sync(st, &db));
    assert_eq!(
        f.operator_metric("dog_operator_hosts_registered_total{how=\"broker_user\"}"),
        Some(1.0)
    );
    // web, with a user of its own that is not a node user, is still refused
    f.start_agent("web");
    f.wait("web refused as not pinned", 30, || {
        f.operator_metric("dog_operator_rejected_messages_total{reason=\"not_pinned\"}")
            .is_some_and(|n| n >= 1.0)
    });
}

#[test]
fn an_agent_on_the_bootstrap_user_asks_again_until_it_gets_its_own() {
    if !require_root() {
        return;
    }
    let (mut f, topology) = web_and_db();
    let bootstrap = bootstrap_user(&f, &topology);
    // the management API is not reachable yet: the hand-out fails
    f.start_operator_with(&["--broker-management-url", "http://guest:guest@127.0.0.1:9"]);
    f.start_agent_with("db", &["--broker-url", &bootstrap, "--broker-bootstrap"]);
    f.wait("the first hand-out failed", 30, || {
        f.operator_metric("dog_operator_broker_users_provisioned_total{result=\"management_api\"}")
            .is_some_and(|n| n >= 1.0)
    });
    assert_eq!(
        f.agent_metric("db", "dog_agent_broker_bootstrap"),
        Some(1.0)
    );
    // the operator comes back with the API; the agent's connection never dropped, so only its
    // asking again gets it its user
    if let Some(mut op) = f.operator.take() {
        let _ = op.kill();
        let _ = op.wait();
    }
    f.start_operator_with(&["--broker-management-url", MANAGEMENT]);
    f.wait("db asked again and logged in as its own user", 90, || {
        logged_in_as_own_user(&f, &topology, "db")
    });
    let db = f.host("db");
    f.wait_status("db in sync", 60, |st| Fleet::in_sync(st, &db));
    assert!(f
        .log_of("agent-db")
        .contains("still on the bootstrap broker user; asking the operator again"));
}
