//! Cluster in a box: a real kube-apiserver, the chart's RBAC, the operator running as its
//! ServiceAccount, Node objects made by the test, one `dog-agent` per node in a network
//! namespace (enforce mode), and real TCP between them.
//!
//! Long: the scenarios share one API server and chart install (`with_cluster`); each split-off
//! file would be another test binary and another API server start.

use dog_e2e::Fleet;
use dog_kube_harness::{exclusive, shared, wait_until, ApiServer, CHART_NAMESPACE};
use serde_json::Value;

fn node_yaml(fleet: &Fleet, node: &str, role: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Node\nmetadata:\n  name: {name}\n  labels: {{role: {role}, dogtest: {p}}}\n",
        name = fleet.host(node),
        p = fleet.prefix,
    )
}

/// Creates the Node and gives it the addresses of its namespace (status is a subresource).
fn create_node(api: &ApiServer, fleet: &Fleet, node: &str, role: &str) {
    if let Err(e) = api.apply(&node_yaml(fleet, node, role), &[]) {
        panic!("creating Node {node}: {e}");
    }
    let status = format!(
        r#"{{"status":{{"addresses":[{{"type":"InternalIP","address":"{}"}},{{"type":"InternalIP","address":"{}"}},{{"type":"Hostname","address":"{}"}}]}}}}"#,
        fleet.v4(node),
        fleet.v6(node),
        fleet.host(node)
    );
    api.kubectl_ok(&[
        "patch",
        "node",
        &fleet.host(node),
        "--subresource=status",
        "--type=merge",
        "-p",
        &status,
    ]);
}

/// The audience the operator asks TokenReview for by default.
const AUDIENCE: &str = "dogfw.io";

/// Starts the agent of `node` as the DaemonSet pod there would run: with the token of a Pod
/// of the agents' ServiceAccount bound to that Node, in a file (`extra`: further flags).
fn start_cluster_agent(api: &ApiServer, fleet: &mut Fleet, node: &str, extra: &[&str]) {
    let token = api.agent_pod_token(&fleet.host(node), AUDIENCE);
    let file = fleet.dir.path().join(format!("token-{node}"));
    std::fs::write(&file, token).expect("token file");
    let mut flags = vec!["--identity-token-file", file.to_str().unwrap_or_default()];
    flags.extend_from_slice(extra);
    fleet.start_agent_with(node, &flags);
}

fn host(api: &ApiServer, name: &str) -> Option<Value> {
    api.get_json("hosts.dogfw.io", name, None)
}

fn state(h: &Value) -> &str {
    h["status"]["state"].as_str().unwrap_or("")
}

fn in_sync(h: &Value) -> bool {
    h["status"]["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|c| c["type"] == "InSync" && c["status"] == "True")
}

fn active_in_sync(api: &ApiServer, name: &str) -> bool {
    host(api, name).is_some_and(|h| state(&h) == "Active" && in_sync(&h))
}

/// Events whose `regarding` is the Host (by name), as `reason`s in order.
fn host_event_reasons(api: &ApiServer, name: &str) -> Vec<String> {
    let text = api.kubectl_ok(&[
        "get",
        "events.events.k8s.io",
        "-A",
        "-o",
        "json",
        "--field-selector",
        &format!("regarding.name={name}"),
    ]);
    let v: Value = serde_json::from_str(&text).expect("events json");
    let mut items: Vec<&Value> = v["items"].as_array().into_iter().flatten().collect();
    items.sort_by_key(|e| {
        e["metadata"]["creationTimestamp"]
            .as_str()
            .unwrap_or("")
            .to_string()
    });
    items
        .iter()
        .map(|e| e["reason"].as_str().unwrap_or("").to_string())
        .collect()
}

fn resources(p: &str) -> String {
    format!(
        r#"apiVersion: dogfw.io/v1alpha1
kind: Group
metadata: {{name: {p}-web}}
spec:
  profile: {p}-web
  selector: {{matchLabels: {{role: web, dogtest: {p}}}}}
---
apiVersion: dogfw.io/v1alpha1
kind: Group
metadata: {{name: {p}-db}}
spec:
  profile: {p}-db
  selector: {{matchLabels: {{role: db, dogtest: {p}}}}}
---
apiVersion: dogfw.io/v1alpha1
kind: Profile
metadata: {{name: {p}-web}}
spec:
  defaultInbound: ACCEPT
---
apiVersion: dogfw.io/v1alpha1
kind: Profile
metadata: {{name: {p}-db}}
spec:
  defaultInbound: DROP
  inbound:
    - {{name: pg, action: ACCEPT, protocol: tcp, ports: ["5432"], peer: {{kind: Group, name: {p}-web}}}}
"#
    )
}

/// Runs `body` on a new fleet against the shared server; on failure prints the logs of every
/// process and of the API server. Leaves no dog objects or Nodes behind either way.
fn with_cluster(nodes: &[&str], body: impl FnOnce(&ApiServer, &mut Fleet)) {
    if !dog_e2e::require_root() {
        return;
    }
    let _only = exclusive();
    let api = shared();
    api.reset();
    let mut fleet = Fleet::new(nodes);
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| body(api, &mut fleet)));
    if let Err(e) = result {
        fleet.dump_logs();
        eprintln!(
            "---- kube-apiserver ----\n{}",
            api.tail_log("kube-apiserver.log")
        );
        drop(fleet);
        api.reset();
        std::panic::resume_unwind(e);
    }
    drop(fleet);
    api.reset();
}

/// Nodes `web` (role web) and `db` (role db), the test's Groups and Profiles, the operator
/// as its ServiceAccount (with `operator_flags`) and an agent on each node (with
/// `agent_flags`); waits until both Hosts are Active and in sync unless the agents only
/// observe.
fn start_web_db(api: &ApiServer, fleet: &mut Fleet, operator_flags: &[&str], agent_flags: &[&str]) {
    let kubeconfig = api.chart_operator_kubeconfig();
    create_node(api, fleet, "web", "web");
    create_node(api, fleet, "db", "db");
    if let Err(e) = api.apply(&resources(&fleet.prefix), &[]) {
        panic!("applying the resources: {e}");
    }
    fleet.start_cluster_operator(&kubeconfig, CHART_NAMESPACE, operator_flags);
    start_cluster_agent(api, fleet, "web", agent_flags);
    start_cluster_agent(api, fleet, "db", agent_flags);
    if agent_flags.contains(&"observe") {
        return;
    }
    for h in [fleet.host("web"), fleet.host("db")] {
        wait_until(&format!("Host {h} Active and InSync"), 90, || {
            active_in_sync(api, &h)
        });
    }
}

#[test]
fn cluster_in_a_box_enforces_and_survives_node_churn() {
    with_cluster(&["web", "db", "spare", "outsider"], node_churn);
}

/// One scenario on one cluster, step after step (a Node comes, goes, returns; its agent
/// follows): the steps depend on each other, so it is read top to bottom rather than split.
fn node_churn(api: &ApiServer, fleet: &mut Fleet) {
    let kubeconfig = api.chart_operator_kubeconfig();
    let p = fleet.prefix.clone();
    let (web, db, spare) = (fleet.host("web"), fleet.host("db"), fleet.host("spare"));
    create_node(api, fleet, "web", "web");
    create_node(api, fleet, "db", "db");
    create_node(api, fleet, "spare", "web");
    if let Err(e) = api.apply(&resources(&p), &[]) {
        panic!("applying the resources: {e}");
    }
    fleet.start_cluster_operator(&kubeconfig, CHART_NAMESPACE, &[]);
    for node in ["web", "db", "spare"] {
        start_cluster_agent(api, fleet, node, &[]);
    }
    for h in [&web, &db, &spare] {
        wait_until(&format!("Host {h} Active and InSync"), 90, || {
            active_in_sync(api, h)
        });
    }
    // the Host carries what the Node says
    let h = host(api, &db).expect("db host");
    assert_eq!(h["spec"]["nodeName"], Value::from(db.as_str()));
    assert_eq!(h["metadata"]["labels"]["role"], "db");

    fleet.serve_tcp("db", 5432);
    let db_v4 = fleet.v4("db");
    assert!(
        fleet.tcp("web", &db_v4, 5432),
        "web -> db:5432 must connect"
    );
    assert!(
        fleet.tcp("spare", &db_v4, 5432),
        "spare (group web) -> db:5432 must connect"
    );
    assert!(
        !fleet.tcp("outsider", &db_v4, 5432),
        "outsider -> db:5432 must be dropped"
    );
    // explain, read from the API server, says the same and that db runs exactly it
    for (from, verdict) in [("web", "Accept"), ("outsider", "Drop")] {
        let peer = fleet.v4(from);
        let out = std::process::Command::new(dog_e2e::bin("dog-operator"))
            .env("KUBECONFIG", &api.kubeconfig)
            .args([
                "explain",
                "--host",
                &db,
                "--peer",
                &peer,
                "--protocol",
                "tcp",
            ])
            .args(["--port", "5432", "--live", "--format", "json"])
            .args(["--trust-reported-addresses", &fleet.networks()])
            .output()
            .expect("explain");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: Value = serde_json::from_slice(&out.stdout).expect("explain json");
        assert_eq!(v["verdict"], verdict, "{from}: {v}");
        assert_eq!(v["live"]["matches"], true, "{from}: {v}");
        if from == "web" {
            assert!(
                v["via"][0]
                    .as_str()
                    .is_some_and(|s| s.contains(&format!("Group {p}-web"))),
                "{v}"
            );
        }
    }

    // Node churn: the Node goes, its agent stays alive.
    api.kubectl_ok(&["delete", "node", &spare]);
    wait_until("the Host of the deleted Node Retired", 30, || {
        host(api, &spare).is_some_and(|h| state(&h) == "Retired")
    });
    // the group no longer expects it, and spare's addresses leave the group's set
    wait_until("group web desires 1 host and has it", 30, || {
        api.get_json("groups.dogfw.io", &format!("{p}-web"), None)
            .is_some_and(|g| g["status"]["hostsDesired"] == 1 && g["status"]["hostsRealized"] == 1)
    });
    wait_until("spare -> db:5432 dropped once spare is retired", 30, || {
        !fleet.tcp("spare", &db_v4, 5432)
    });
    // A later full pass (a profile edit that every live host applies) leaves it Retired: the
    // transition happened once, and its live agent did not bring it back.
    let before = host(api, &db).and_then(|h| h["status"]["appliedRevision"].as_u64());
    api.kubectl_ok(&[
        "patch",
        "profile.dogfw.io",
        &format!("{p}-db"),
        "--type=json",
        "-p",
        r#"[{"op":"add","path":"/spec/inbound/-","value":{"name":"metrics","action":"ACCEPT","protocol":"tcp","ports":["9100"]}}]"#,
    ]);
    wait_until("db applied the edited profile", 30, || {
        host(api, &db)
            .is_some_and(|h| in_sync(&h) && h["status"]["appliedRevision"].as_u64() != before)
    });
    let h = host(api, &spare).expect("spare host");
    assert_eq!(state(&h), "Retired", "a retired host came back: {h}");
    let reasons = host_event_reasons(api, &spare);
    assert_eq!(
        reasons.iter().filter(|r| *r == "HostRetired").count(),
        1,
        "one retirement, no flapping: {reasons:?}"
    );
    let last = reasons.iter().rposition(|r| r == "HostRetired");
    assert!(
        !reasons[last.unwrap_or(0)..]
            .iter()
            .any(|r| r == "HostActive"),
        "{reasons:?}"
    );
    // and `kubectl describe` shows it (the Event names the Host's uid)
    let described = api.kubectl_ok(&["describe", "host.dogfw.io", &spare]);
    assert!(
        described.contains("HostRetired"),
        "kubectl describe host lacks the event:\n{described}"
    );

    // The Node comes back under the same name: the Host is Active again, with rules.
    create_node(api, fleet, "spare", "web");
    wait_until("the re-created Node's Host Active and InSync", 60, || {
        active_in_sync(api, &spare)
    });
    wait_until("spare -> db:5432 connects again", 30, || {
        fleet.tcp("spare", &db_v4, 5432)
    });
}

fn lease_holder(api: &ApiServer) -> Option<String> {
    api.get_json(
        "leases",
        dog_operator::kube::leader::LEASE_NAME,
        Some(CHART_NAMESPACE),
    )
    .and_then(|l| l["spec"]["holderIdentity"].as_str().map(str::to_string))
}

fn operator_log(fleet: &Fleet) -> String {
    std::fs::read_to_string(fleet.dir.path().join("operator.log")).unwrap_or_default()
}

#[test]
fn an_api_server_outage_makes_the_operator_stand_by_not_exit() {
    with_cluster(&["web", "db", "outsider"], api_outage);
}

fn api_outage(api: &ApiServer, fleet: &mut Fleet) {
    start_web_db(api, fleet, &[], &[]);
    let p = fleet.prefix.clone();
    let db = fleet.host("db");
    let me = format!("{p}-operator");
    assert_eq!(lease_holder(api).as_deref(), Some(me.as_str()));
    fleet.serve_tcp("db", 5432);
    let db_v4 = fleet.v4("db");

    // The control plane goes away for a minute (as in an upgrade).
    api.stop_apiserver();
    let outage = std::time::Instant::now();
    wait_until("the operator stepped down to standby", 30, || {
        operator_log(fleet).contains("lost leadership; standing by")
    });
    // the agents keep enforcing meanwhile
    assert!(
        fleet.tcp("web", &db_v4, 5432),
        "web -> db:5432 during the outage"
    );
    assert!(
        !fleet.tcp("outsider", &db_v4, 5432),
        "outsider -> db:5432 during the outage"
    );
    let rest = std::time::Duration::from_secs(60).saturating_sub(outage.elapsed());
    std::thread::sleep(rest); // the outage itself, not an assertion
    let operator = fleet.operator.as_mut().expect("operator");
    assert!(
        operator.try_wait().expect("operator status").is_none(),
        "the operator exited during the outage"
    );

    api.restart_apiserver();
    let back = std::time::Instant::now();
    // Leading and publishing again: a profile change made now reaches db within 15 s.
    let before = host(api, &db).and_then(|h| h["status"]["appliedRevision"].as_u64());
    api.kubectl_ok(&[
        "patch",
        "profile.dogfw.io",
        &format!("{p}-db"),
        "--type=json",
        "-p",
        r#"[{"op":"add","path":"/spec/inbound/-","value":{"name":"metrics","action":"ACCEPT","protocol":"tcp","ports":["9100"]}}]"#,
    ]);
    wait_until("the operator leads and db applied the change", 15, || {
        lease_holder(api).as_deref() == Some(me.as_str())
            && host(api, &db)
                .is_some_and(|h| in_sync(&h) && h["status"]["appliedRevision"].as_u64() != before)
    });
    eprintln!(
        "leading and published again {:.1} s after the API server was back",
        back.elapsed().as_secs_f64()
    );
    assert!(
        operator_log(fleet)
            .matches("leading; waiting for the watches")
            .count()
            >= 2
    );
}

fn resource_version(v: &Value) -> String {
    v["metadata"]["resourceVersion"]
        .as_str()
        .unwrap_or("")
        .to_string()
}

#[test]
fn keepalives_of_quiet_agents_write_no_status() {
    with_cluster(&["web", "db"], quiet_agents);
}

fn quiet_agents(api: &ApiServer, fleet: &mut Fleet) {
    start_web_db(api, fleet, &[], &[]);
    let hosts = [fleet.host("web"), fleet.host("db")];
    // settle: the first keepalive after the rules were applied may still change the status
    let series = r#"dog_agent_messages_sent_total{kind="keepalive"}"#;
    let sent = |node: &str| fleet.agent_metric(node, series).unwrap_or(0.0);
    let k0 = sent("db");
    wait_until("two more keepalives", 20, || sent("db") >= k0 + 2.0);
    let before: Vec<String> = hosts
        .iter()
        .map(|h| resource_version(&host(api, h).expect("host")))
        .collect();
    let (w0, d0) = (sent("web"), sent("db"));
    wait_until("ten more keepalives from each agent", 40, || {
        sent("web") >= w0 + 10.0 && sent("db") >= d0 + 10.0
    });
    let after: Vec<String> = hosts
        .iter()
        .map(|h| resource_version(&host(api, h).expect("host")))
        .collect();
    assert_eq!(
        before, after,
        "ten keepalives per host changed the Hosts (one status write per keepalive)"
    );
    // liveness is still judged: both stay Active and in sync
    for h in &hosts {
        assert!(active_in_sync(api, h), "{h}");
    }
}

fn condition<'a>(h: &'a Value, type_: &str) -> Option<&'a Value> {
    h["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == type_)
}

#[test]
fn observe_mode_reports_what_it_would_change_and_nothing_else() {
    with_cluster(&["web", "db"], observe_mode);
}

fn observe_mode(api: &ApiServer, fleet: &mut Fleet) {
    start_web_db(api, fleet, &[], &["--mode", "observe"]);
    let db = fleet.host("db");
    wait_until("db reports what it would change", 60, || {
        host(api, &db).is_some_and(|h| {
            state(&h) == "Active" && h["status"]["wouldChange"].as_u64().is_some_and(|n| n > 0)
        })
    });
    let series = r#"dog_agent_requests_total{kind="apply",outcome="ok"}"#;
    let applies = |node: &str| fleet.agent_metric(node, series).unwrap_or(0.0);
    let keepalives = |node: &str| {
        fleet
            .agent_metric(node, r#"dog_agent_messages_sent_total{kind="keepalive"}"#)
            .unwrap_or(0.0)
    };
    let (a0, k0) = (applies("db"), keepalives("db"));
    // the test operator resends after 3 s of mismatch: ten keepalives cover three such windows
    wait_until("ten keepalives from db", 40, || {
        keepalives("db") >= k0 + 10.0
    });
    assert_eq!(
        applies("db"),
        a0,
        "the operator kept resending to an observing host"
    );
    let h = host(api, &db).expect("db host");
    assert!(
        h["status"].get("appliedRevision").is_none(),
        "an observing host applied nothing: {}",
        h["status"]
    );
    let insync = condition(&h, "InSync").expect("InSync condition");
    assert_eq!(insync["status"], "False");
    assert_eq!(insync["reason"], "ObserveOnly", "{insync}");
    assert!(
        insync["message"].as_str().unwrap_or("").contains("would"),
        "{insync}"
    );
    let reasons = host_event_reasons(api, &db);
    assert!(
        !reasons.iter().any(|r| r.contains("Drift")),
        "drift events for an observing host: {reasons:?}"
    );
    assert_eq!(fleet.operator_metric("dog_hosts_drifted"), Some(0.0));
    // and nothing was written to the kernel: db still accepts what its profile would drop
    fleet.serve_tcp("db", 5433);
    assert!(fleet.tcp("web", &fleet.v4("db"), 5433));
}

#[test]
fn retired_hosts_are_deleted_after_the_retention_once_silent() {
    with_cluster(&["web", "db"], retired_retention);
}

fn retired_retention(api: &ApiServer, fleet: &mut Fleet) {
    start_web_db(api, fleet, &["--retired-retention", "3"], &[]);
    let (web, db) = (fleet.host("web"), fleet.host("db"));
    api.kubectl_ok(&["delete", "node", &db]);
    wait_until("db Retired", 30, || {
        host(api, &db).is_some_and(|h| state(&h) == "Retired")
    });
    // its agent still talks: kept past the retention (six keepalives = twice the retention)
    let series = r#"dog_agent_messages_sent_total{kind="keepalive"}"#;
    let k0 = fleet.agent_metric("db", series).unwrap_or(0.0);
    wait_until("six more keepalives from db", 30, || {
        fleet.agent_metric("db", series).unwrap_or(0.0) >= k0 + 6.0
    });
    assert!(
        host(api, &db).is_some(),
        "a Retired host with a live agent was deleted"
    );
    // once it is silent past the retention, the Host goes, with an Event
    fleet.kill_agent("db", "-KILL");
    wait_until("the silent Retired Host deleted", 30, || {
        host(api, &db).is_none()
    });
    let reasons = host_event_reasons(api, &db);
    assert!(reasons.iter().any(|r| r == "HostDeleted"), "{reasons:?}");
    // the rest of the fleet is untouched
    assert!(active_in_sync(api, &web));
}

#[test]
fn agents_prove_their_node_with_their_service_account_token() {
    with_cluster(&["web", "db", "spare"], service_account_identity);
}

/// No trust on first use: every agent is admitted by its Pod-bound ServiceAccount token, for
/// its own Node only. A stolen token, another account's token, a token for the API server and
/// no token at all admit nobody.
fn service_account_identity(api: &ApiServer, fleet: &mut Fleet) {
    start_web_db(api, fleet, &[], &[]);
    create_node(api, fleet, "spare", "web");
    let spare = fleet.host("spare");
    let rejected = |f: &Fleet, reason: &str| {
        f.operator_metric(&format!(
            "dog_operator_rejected_messages_total{{reason=\"{reason}\"}}"
        ))
        .unwrap_or(0.0)
    };
    let token_file = |f: &Fleet, name: &str, token: &str| {
        let p = f.dir.path().join(format!("token-{name}"));
        std::fs::write(&p, token).expect("token file");
        p.display().to_string()
    };
    // root on web holds web's token and claims spare, which has no agent yet
    let web_token = std::fs::read_to_string(fleet.dir.path().join("token-web")).expect("token");
    let stolen = token_file(fleet, "stolen", &web_token);
    fleet.start_impostor("web", &spare, "stolen", &["--identity-token-file", &stolen]);
    fleet.start_impostor("web", &spare, "none", &[]);
    let _ = api.kubectl(&[
        "-n",
        CHART_NAMESPACE,
        "create",
        "serviceaccount",
        "intruder",
    ]);
    let other = api.kubectl_ok(&[
        "-n",
        CHART_NAMESPACE,
        "create",
        "token",
        "intruder",
        "--audience",
        AUDIENCE,
    ]);
    let other = token_file(fleet, "other", other.trim());
    fleet.start_impostor("web", &spare, "other", &["--identity-token-file", &other]);
    let for_api = api.kubectl_ok(&["-n", CHART_NAMESPACE, "create", "token", "dog-agent"]);
    let for_api = token_file(fleet, "for-api", for_api.trim());
    fleet.start_impostor(
        "web",
        &spare,
        "for-api",
        &["--identity-token-file", &for_api],
    );
    wait_until("every impostor refused", 60, || {
        rejected(fleet, "wrong_node") >= 1.0
            && rejected(fleet, "not_pinned") >= 1.0
            && rejected(fleet, "identity_refused") >= 2.0
    });
    let log = operator_log(fleet);
    assert!(log.contains("its identity token belongs to node"), "{log}");
    for tag in ["stolen", "none", "other", "for-api"] {
        assert!(
            !fleet
                .log_of(&format!("impostor-{tag}"))
                .contains("applied firewall"),
            "impostor {tag} got rules"
        );
    }
    assert!(
        host(api, &spare).is_none_or(|h| h["status"]["pinnedKeys"].is_null()),
        "spare was pinned to an impostor"
    );

    // the real agent of spare, with its own Pod's token, is admitted
    start_cluster_agent(api, fleet, "spare", &[]);
    wait_until("spare Active and InSync", 60, || {
        active_in_sync(api, &spare)
    });
    assert_eq!(
        fleet.operator_metric("dog_operator_hosts_registered_total{how=\"service_account\"}"),
        Some(3.0)
    );
    assert_eq!(
        fleet.operator_metric("dog_operator_hosts_registered_total{how=\"first_use\"}"),
        Some(0.0)
    );
    let db_v4 = fleet.v4("db");
    fleet.serve_tcp("db", 5432);
    wait_until("spare (group web) -> db:5432", 30, || {
        fleet.tcp("spare", &db_v4, 5432)
    });
}

#[test]
fn a_token_review_refused_by_the_api_server_is_tried_again() {
    with_cluster(&["web", "db", "spare"], token_review_retried);
}

/// The agent's token is good but the API server refuses to review it for a while (here: the
/// operator's permission to create TokenReviews is not rolled out yet). The operator reviews
/// the heartbeat it kept again, with backoff, and admits the host once the permission is
/// there, without the agent having to send anything new.
fn token_review_retried(api: &ApiServer, fleet: &mut Fleet) {
    start_web_db(api, fleet, &[], &[]);
    create_node(api, fleet, "spare", "web");
    let spare = fleet.host("spare");
    let mut role = api
        .get_json("clusterrole", "dog-operator", None)
        .expect("the chart's ClusterRole");
    if let Some(rules) = role["rules"].as_array_mut() {
        rules.retain(|r| !r.to_string().contains("tokenreviews"));
    }
    if let Some(meta) = role["metadata"].as_object_mut() {
        meta.remove("resourceVersion");
    }
    if let Err(e) = api.apply(&role.to_string(), &[]) {
        panic!("narrowing the ClusterRole: {e}");
    }
    start_cluster_agent(api, fleet, "spare", &[]);
    wait_until("spare's token review refused", 30, || {
        fleet
            .operator_metric("dog_operator_rejected_messages_total{reason=\"identity_refused\"}")
            .is_some_and(|n| n >= 1.0)
    });
    assert!(!active_in_sync(api, &spare));

    api.chart_operator_kubeconfig(); // the chart's RBAC again
    wait_until("spare admitted on a later review", 90, || {
        active_in_sync(api, &spare)
    });
    let heartbeats = fleet
        .log_of("agent-spare")
        .matches("sent heartbeat")
        .count();
    assert_eq!(heartbeats, 1, "{}", fleet.log_of("agent-spare"));
}
