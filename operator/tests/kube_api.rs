//! The Kubernetes layer against a mock API server (tower-test): every test lists the exact
//! requests it expects (method, path + query) with canned responses, then asserts the bodies.
//! A missing request fails on the verifier's timeout; an extra one fails the client call
//! (the mock service is closed once the scenario ends).
//!
//! Long: each exchange is spelled out request by request, which is the point of these tests.

use dog_operator::core::events::DogEvent;
use dog_operator::crd::{
    AgentPublicKeys, GroupStatus, Host, HostSpec, HostState, HostStatus, InterfaceStatus,
};
use dog_operator::kube::events::KubeEventSink;
use dog_operator::kube::leader::{LeaderConfig, LeaderElector};
use dog_operator::kube::nodes::NodeSync;
use dog_operator::kube::status::KubeStatusSink;
use dog_operator::runtime::sinks::{EventSink, LogEventSink, StatusSink};
use http::{Request, Response};
use k8s_openapi::api::core::v1::{Node, NodeAddress, NodeStatus};
use kube::client::Body;
use kube::Client;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::task::JoinHandle;

type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;

/// One expected request and the canned answer.
struct Expect {
    method: &'static str,
    uri: String,
    status: u16,
    reply: Value,
}

fn expect(method: &'static str, uri: impl Into<String>, status: u16, reply: Value) -> Expect {
    Expect {
        method,
        uri: uri.into(),
        status,
        reply,
    }
}

/// A recorded request: content type and JSON body.
#[derive(Debug)]
struct Seen {
    content_type: String,
    body: Value,
}

fn mock() -> (Client, Handle) {
    let (svc, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    (Client::new(svc, "default"), handle)
}

/// Serves `expects` in order, asserting method and URI, and returns what was sent.
fn serve(mut handle: Handle, expects: Vec<Expect>) -> JoinHandle<Vec<Seen>> {
    tokio::spawn(async move {
        let mut seen = Vec::new();
        for (i, e) in expects.into_iter().enumerate() {
            let (req, send) = handle
                .next_request()
                .await
                .unwrap_or_else(|| panic!("request #{i} ({} {}) never came", e.method, e.uri));
            assert_eq!(req.method().as_str(), e.method, "method of request #{i}");
            assert_eq!(req.uri().to_string(), e.uri, "uri of request #{i}");
            let content_type = req
                .headers()
                .get("content-type")
                .map(|v| v.to_str().unwrap().to_string())
                .unwrap_or_default();
            let bytes = req.into_body().collect_bytes().await.unwrap();
            let body = if bytes.is_empty() {
                Value::Null
            } else {
                serde_json::from_slice(&bytes).unwrap()
            };
            seen.push(Seen { content_type, body });
            send.send_response(
                Response::builder()
                    .status(e.status)
                    .body(Body::from(serde_json::to_vec(&e.reply).unwrap()))
                    .unwrap(),
            );
        }
        seen
    })
}

async fn finish(task: JoinHandle<Vec<Seen>>) -> Vec<Seen> {
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("scenario timed out: an expected request was not made")
        .expect("scenario assertion failed")
}

fn not_found(kind: &str, name: &str) -> Value {
    json!({"kind":"Status","apiVersion":"v1","status":"Failure","reason":"NotFound",
           "message": format!("{kind} \"{name}\" not found"),"code":404})
}

fn conflict() -> Value {
    json!({"kind":"Status","apiVersion":"v1","status":"Failure","reason":"Conflict",
           "message":"the object has been modified","code":409})
}

fn node(name: &str, labels: &[(&str, &str)], ip: &str) -> Node {
    let mut n = Node::default();
    n.metadata.name = Some(name.into());
    n.metadata.labels = Some(
        labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    );
    n.status = Some(NodeStatus {
        addresses: Some(vec![NodeAddress {
            type_: "InternalIP".into(),
            address: ip.into(),
        }]),
        ..Default::default()
    });
    n
}

fn host_json(name: &str, generation: i64) -> Value {
    json!({"apiVersion":"dogfw.io/v1alpha1","kind":"Host",
           "metadata":{"name":name,"generation":generation,"resourceVersion":"1","uid":"u-1"},
           "spec":{}})
}

const APPLY: &str = "application/apply-patch+yaml";

// ------------------------------------------------------------------------------------------
// Node → Host
// ------------------------------------------------------------------------------------------

#[tokio::test]
async fn node_becomes_host_by_server_side_apply_of_labels_and_spec_only() {
    let (client, handle) = mock();
    let srv = serve(
        handle,
        vec![expect(
            "PATCH",
            "/apis/dogfw.io/v1alpha1/hosts/worker-1?&force=true&fieldManager=dog-operator",
            200,
            host_json("worker-1", 1),
        )],
    );
    let mut sync = NodeSync::new(
        client.clone(),
        Arc::new(KubeStatusSink::new(client.clone())),
        Arc::new(LogEventSink),
    );
    let nodes: BTreeMap<_, _> = [(
        "worker-1".to_string(),
        std::sync::Arc::new(node(
            "worker-1",
            &[("role", "db"), ("kubernetes.io/os", "linux")],
            "10.1.2.3",
        )),
    )]
    .into();
    let report = sync.sync_once(&nodes, &BTreeMap::new()).await;
    assert_eq!(report.applied, vec!["worker-1"]);
    // The store has not caught up yet: the same desired state is not sent twice.
    let again = sync.sync_once(&nodes, &BTreeMap::new()).await;
    assert!(again.applied.is_empty() && again.failed.is_empty());
    let seen = finish(srv).await;
    assert_eq!(seen[0].content_type, APPLY);
    assert_eq!(
        seen[0].body,
        json!({
            "apiVersion": "dogfw.io/v1alpha1",
            "kind": "Host",
            "metadata": {"name": "worker-1",
                         "labels": {"role": "db", "kubernetes.io/os": "linux"}},
            "spec": {"nodeName": "worker-1", "addresses": ["10.1.2.3"]}
        })
    );
}

#[tokio::test]
async fn deleted_node_retires_its_host_with_status_and_event() {
    let (client, handle) = mock();
    let srv = serve(
        handle,
        vec![
            expect(
                "PATCH",
                "/apis/dogfw.io/v1alpha1/hosts/gone/status?&force=true&fieldManager=dog-operator",
                200,
                host_json("gone", 4),
            ),
            expect(
                "POST",
                "/apis/events.k8s.io/v1/namespaces/default/events?",
                201,
                json!({"apiVersion":"events.k8s.io/v1","kind":"Event",
                       "metadata":{"name":"gone.1","namespace":"default"},"eventTime":null}),
            ),
        ],
    );
    let mut sync = NodeSync::new(
        client.clone(),
        Arc::new(KubeStatusSink::new(client.clone())),
        Arc::new(KubeEventSink::new(
            client.clone(),
            Some("dog-operator-0".into()),
        )),
    );
    let mut host = Host::new(
        "gone",
        HostSpec {
            node_name: Some("gone".into()),
            ..Default::default()
        },
    );
    host.metadata.generation = Some(4);
    host.metadata.uid = Some("uid-gone".into());
    host.status = Some(HostStatus {
        state: HostState::Active,
        agent_version: Some("0.1.0".into()),
        last_keepalive: Some("2024-05-01T10:00:00Z".into()),
        ..Default::default()
    });
    let hosts: BTreeMap<_, _> = [("gone".to_string(), std::sync::Arc::new(host))].into();
    let report = sync.sync_once(&BTreeMap::new(), &hosts).await;
    assert_eq!(report.retired, vec!["gone"]);
    let seen = finish(srv).await;
    assert_eq!(seen[0].content_type, APPLY);
    assert_eq!(
        seen[0].body,
        json!({"apiVersion":"dogfw.io/v1alpha1","kind":"Host","status":{
            "state":"Retired","agentVersion":"0.1.0",
            "lastKeepalive":"2024-05-01T10:00:00Z","observedGeneration":4}})
    );
    let ev = &seen[1].body;
    assert_eq!(ev["reason"], "HostRetired");
    assert_eq!(ev["type"], "Warning");
    assert_eq!(ev["regarding"]["kind"], "Host");
    assert_eq!(ev["regarding"]["name"], "gone");
    assert_eq!(ev["regarding"]["uid"], "uid-gone");
}

#[tokio::test]
async fn agent_without_node_gets_a_host_with_pinned_keys() {
    let (client, handle) = mock();
    let srv = serve(
        handle,
        vec![
            expect(
                "GET",
                "/apis/dogfw.io/v1alpha1/hosts/vm-1",
                404,
                not_found("hosts", "vm-1"),
            ),
            expect(
                "POST",
                "/apis/dogfw.io/v1alpha1/hosts?&fieldManager=dog-operator",
                201,
                host_json("vm-1", 1),
            ),
            expect(
                "PATCH",
                "/apis/dogfw.io/v1alpha1/hosts/vm-1/status?&force=true&fieldManager=dog-operator",
                200,
                host_json("vm-1", 1),
            ),
        ],
    );
    let sync = NodeSync::new(
        client.clone(),
        Arc::new(KubeStatusSink::new(client.clone())),
        Arc::new(LogEventSink),
    );
    let keys = AgentPublicKeys {
        signing: format!("{}=", "A".repeat(43)),
        encryption: format!("{}=", "B".repeat(43)),
    };
    let ifaces = vec![InterfaceStatus {
        name: "eth0".into(),
        addresses: vec!["192.0.2.10/24".into()],
    }];
    let host = sync
        .ensure_host_for_agent("vm-1", &keys, &ifaces)
        .await
        .unwrap();
    assert_eq!(host.status.as_ref().unwrap().state, HostState::New);
    let seen = finish(srv).await;
    assert_eq!(seen[1].body["metadata"]["name"], "vm-1");
    assert_eq!(seen[1].body["spec"], json!({}));
    assert_eq!(
        seen[2].body["status"],
        json!({"state":"New",
               "interfaces":[{"name":"eth0","addresses":["192.0.2.10/24"]}],
               "pinnedKeys":{"signing":keys.signing,"encryption":keys.encryption},
               "observedGeneration":1})
    );
}

#[tokio::test]
async fn existing_agent_host_is_returned_untouched() {
    let (client, handle) = mock();
    let srv = serve(
        handle,
        vec![expect(
            "GET",
            "/apis/dogfw.io/v1alpha1/hosts/vm-2",
            200,
            host_json("vm-2", 7),
        )],
    );
    let sync = NodeSync::new(
        client.clone(),
        Arc::new(KubeStatusSink::new(client.clone())),
        Arc::new(LogEventSink),
    );
    let keys = AgentPublicKeys::default();
    let h = sync
        .ensure_host_for_agent("vm-2", &keys, &[])
        .await
        .unwrap();
    assert_eq!(h.metadata.generation, Some(7));
    finish(srv).await;
}

// ------------------------------------------------------------------------------------------
// Status
// ------------------------------------------------------------------------------------------

#[tokio::test]
async fn status_is_applied_on_the_subresource_and_unchanged_writes_are_skipped() {
    let (client, handle) = mock();
    let path = "/apis/dogfw.io/v1alpha1/hosts/n1/status?&force=true&fieldManager=dog-operator";
    let srv = serve(
        handle,
        vec![
            expect("PATCH", path, 200, host_json("n1", 2)),
            expect("PATCH", path, 200, host_json("n1", 3)),
            expect(
                "PATCH",
                "/apis/dogfw.io/v1alpha1/groups/web/status?&force=true&fieldManager=dog-operator",
                200,
                json!({"apiVersion":"dogfw.io/v1alpha1","kind":"Group","metadata":{"name":"web"},"spec":{}}),
            ),
        ],
    );
    let sink = KubeStatusSink::new(client);
    let status = HostStatus {
        state: HostState::Active,
        applied_revision: Some(12),
        ..Default::default()
    };
    sink.write_host("n1", Some(2), status.clone())
        .await
        .unwrap();
    // identical: no request (an extra request would fail, the mock serves only three)
    sink.write_host("n1", Some(2), status.clone())
        .await
        .unwrap();
    // a new generation is a change
    sink.write_host("n1", Some(3), status.clone())
        .await
        .unwrap();
    sink.write_group(
        "web",
        Some(1),
        GroupStatus {
            member_count: 2,
            members: vec!["n1".into(), "n2".into()],
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let seen = finish(srv).await;
    assert_eq!(seen[0].content_type, APPLY);
    assert_eq!(
        seen[0].body,
        json!({"apiVersion":"dogfw.io/v1alpha1","kind":"Host",
               "status":{"state":"Active","appliedRevision":12,"observedGeneration":2}})
    );
    assert_eq!(seen[1].body["status"]["observedGeneration"], 3);
    assert_eq!(seen[2].body["kind"], "Group");
    assert_eq!(seen[2].body["status"]["members"], json!(["n1", "n2"]));
    assert_eq!(seen[2].body["status"]["observedGeneration"], 1);
}

#[tokio::test]
async fn failed_status_write_is_retried_next_time() {
    let (client, handle) = mock();
    let path = "/apis/dogfw.io/v1alpha1/zones/z/status?&force=true&fieldManager=dog-operator";
    let srv = serve(
        handle,
        vec![
            expect("PATCH", path, 409, conflict()),
            expect(
                "PATCH",
                path,
                200,
                json!({"apiVersion":"dogfw.io/v1alpha1","kind":"Zone","metadata":{"name":"z"},"spec":{}}),
            ),
        ],
    );
    let sink = KubeStatusSink::new(client);
    let st = dog_operator::crd::ZoneStatus {
        ipv4_count: 3,
        ..Default::default()
    };
    let err = sink.write_zone("z", Some(1), st.clone()).await.unwrap_err();
    assert!(err.to_string().contains("Zone z"), "{err}");
    sink.write_zone("z", Some(1), st).await.unwrap();
    finish(srv).await;
}

// ------------------------------------------------------------------------------------------
// Events
// ------------------------------------------------------------------------------------------

#[tokio::test]
async fn host_transition_creates_an_event() {
    let (client, handle) = mock();
    let srv = serve(
        handle,
        vec![expect(
            "POST",
            "/apis/events.k8s.io/v1/namespaces/default/events?",
            201,
            json!({"apiVersion":"events.k8s.io/v1","kind":"Event",
                   "metadata":{"name":"n1.1","namespace":"default"},"eventTime":null}),
        )],
    );
    let sink = KubeEventSink::new(client, Some("dog-operator-abc".into()));
    sink.publish(DogEvent::host_state_changed(
        "n1",
        HostState::Active,
        HostState::Inactive,
    ))
    .await;
    let seen = finish(srv).await;
    let ev = &seen[0].body;
    assert_eq!(ev["reason"], "HostInactive");
    assert_eq!(ev["action"], "Lifecycle");
    assert_eq!(ev["type"], "Warning");
    assert_eq!(ev["note"], "host n1 went from Active to Inactive");
    assert_eq!(ev["reportingController"], "dog-operator");
    assert_eq!(ev["reportingInstance"], "dog-operator-abc");
    assert_eq!(
        ev["regarding"],
        json!({"apiVersion":"dogfw.io/v1alpha1","kind":"Host","name":"n1"})
    );
}

// ------------------------------------------------------------------------------------------
// Leader election
// ------------------------------------------------------------------------------------------

const LEASE: &str = "/apis/coordination.k8s.io/v1/namespaces/dog-system/leases/dog-operator-leader";
const LEASE_PUT: &str =
    "/apis/coordination.k8s.io/v1/namespaces/dog-system/leases/dog-operator-leader?";
const LEASES: &str = "/apis/coordination.k8s.io/v1/namespaces/dog-system/leases?";

fn lease(holder: Option<&str>, rv: &str, renew: &str, transitions: i32) -> Value {
    json!({"apiVersion":"coordination.k8s.io/v1","kind":"Lease",
           "metadata":{"name":"dog-operator-leader","namespace":"dog-system","resourceVersion":rv},
           "spec":{"holderIdentity":holder,"leaseDurationSeconds":10,
                   "renewTime":renew,"leaseTransitions":transitions}})
}

fn elector(client: Client, id: &str) -> LeaderElector {
    LeaderElector::new(client, LeaderConfig::new("dog-system", id))
}

#[tokio::test]
async fn absent_lease_is_created_and_then_renewed() {
    let (client, handle) = mock();
    let srv = serve(
        handle,
        vec![
            expect(
                "GET",
                LEASE,
                404,
                not_found("leases", "dog-operator-leader"),
            ),
            expect(
                "POST",
                LEASES,
                201,
                lease(Some("a"), "1", "2024-01-01T00:00:00.000000Z", 0),
            ),
            expect(
                "GET",
                LEASE,
                200,
                lease(Some("a"), "1", "2024-01-01T00:00:00.000000Z", 0),
            ),
            expect(
                "PUT",
                LEASE_PUT,
                200,
                lease(Some("a"), "2", "2024-01-01T00:00:02.000000Z", 0),
            ),
        ],
    );
    let mut el = elector(client, "a");
    let rx = el.subscribe();
    assert!(!*rx.borrow());
    assert!(el.step().await.unwrap());
    assert!(*rx.borrow());
    assert!(el.step().await.unwrap());
    let seen = finish(srv).await;
    assert_eq!(seen[1].body["spec"]["holderIdentity"], "a");
    assert_eq!(seen[1].body["spec"]["leaseDurationSeconds"], 10);
    assert_eq!(seen[1].body["metadata"]["name"], "dog-operator-leader");
    // renew: same holder, optimistic concurrency on the version read, fresh renewTime
    assert_eq!(seen[3].body["spec"]["holderIdentity"], "a");
    assert_eq!(seen[3].body["metadata"]["resourceVersion"], "1");
    assert_ne!(
        seen[3].body["spec"]["renewTime"],
        "2024-01-01T00:00:00.000000Z"
    );
    assert_eq!(seen[3].body["spec"]["leaseTransitions"], 0);
}

#[tokio::test(start_paused = true)]
async fn standby_waits_on_a_renewed_lease_and_takes_over_an_expired_one() {
    let (client, handle) = mock();
    let old = "2024-01-01T00:00:00.000000Z";
    let srv = serve(
        handle,
        vec![
            // the leader "a" renews: the record changes each time → standby waits
            expect("GET", LEASE, 200, lease(Some("a"), "5", old, 2)),
            expect(
                "GET",
                LEASE,
                200,
                lease(Some("a"), "6", "2024-01-01T00:00:08.000000Z", 2),
            ),
            expect(
                "GET",
                LEASE,
                200,
                lease(Some("a"), "7", "2024-01-01T00:00:16.000000Z", 2),
            ),
            // "a" died: the record stays the same
            expect(
                "GET",
                LEASE,
                200,
                lease(Some("a"), "7", "2024-01-01T00:00:16.000000Z", 2),
            ),
            expect(
                "GET",
                LEASE,
                200,
                lease(Some("a"), "7", "2024-01-01T00:00:16.000000Z", 2),
            ),
            expect(
                "PUT",
                LEASE_PUT,
                200,
                lease(Some("b"), "8", "2024-01-01T00:00:30.000000Z", 3),
            ),
        ],
    );
    let mut b = elector(client, "b");
    assert!(!b.step().await.unwrap());
    tokio::time::advance(Duration::from_secs(8)).await;
    assert!(!b.step().await.unwrap());
    tokio::time::advance(Duration::from_secs(8)).await;
    assert!(!b.step().await.unwrap(), "record changed: not expired");
    tokio::time::advance(Duration::from_secs(10)).await;
    assert!(
        !b.step().await.unwrap(),
        "unchanged for exactly 10 s: not yet"
    );
    tokio::time::advance(Duration::from_secs(2)).await;
    assert!(b.step().await.unwrap(), "unchanged for 12 s: taken over");
    let seen = finish(srv).await;
    let put = &seen[5].body;
    assert_eq!(put["spec"]["holderIdentity"], "b");
    assert_eq!(put["spec"]["leaseTransitions"], 3);
    assert_eq!(put["metadata"]["resourceVersion"], "7");
    assert!(put["spec"]["acquireTime"].is_string());
}

#[tokio::test]
async fn losing_the_race_for_a_lease_means_not_leader() {
    let (client, handle) = mock();
    let srv = serve(
        handle,
        vec![
            expect(
                "GET",
                LEASE,
                200,
                lease(None, "9", "2024-01-01T00:00:00.000000Z", 1),
            ),
            expect("PUT", LEASE_PUT, 409, conflict()),
        ],
    );
    let mut el = elector(client, "b");
    assert!(
        !el.step().await.unwrap(),
        "a released lease is free, but another replica won"
    );
    finish(srv).await;
}

#[tokio::test(start_paused = true)]
async fn leader_that_cannot_renew_steps_down_before_the_lease_expires() {
    let (client, handle) = mock();
    let srv = serve(
        handle,
        vec![
            expect(
                "GET",
                LEASE,
                404,
                not_found("leases", "dog-operator-leader"),
            ),
            expect(
                "POST",
                LEASES,
                201,
                lease(Some("a"), "1", "2024-01-01T00:00:00.000000Z", 0),
            ),
            expect(
                "GET",
                LEASE,
                500,
                json!({"kind":"Status","code":500,"reason":"InternalError","message":"etcd"}),
            ),
            expect(
                "GET",
                LEASE,
                500,
                json!({"kind":"Status","code":500,"reason":"InternalError","message":"etcd"}),
            ),
        ],
    );
    let mut el = elector(client, "a");
    assert!(el.step().await.unwrap());
    tokio::time::advance(Duration::from_secs(4)).await;
    assert!(el.step().await.is_err());
    assert!(el.is_leader(), "within the renew deadline");
    tokio::time::advance(Duration::from_secs(5)).await;
    assert!(el.step().await.is_err());
    assert!(!el.is_leader(), "9 s without renewal > 8 s deadline");
    finish(srv).await;
}

#[tokio::test]
async fn graceful_shutdown_releases_the_lease() {
    let (client, handle) = mock();
    let srv = serve(
        handle,
        vec![
            expect(
                "GET",
                LEASE,
                404,
                not_found("leases", "dog-operator-leader"),
            ),
            expect(
                "POST",
                LEASES,
                201,
                lease(Some("a"), "1", "2024-01-01T00:00:00.000000Z", 0),
            ),
            expect(
                "PUT",
                LEASE_PUT,
                200,
                lease(None, "2", "2024-01-01T00:00:01.000000Z", 0),
            ),
        ],
    );
    let el = elector(client, "a");
    let mut rx = el.subscribe();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(el.run(async move {
        let _ = stop_rx.await;
    }));
    rx.wait_for(|l| *l).await.unwrap();
    stop_tx.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(5), running)
        .await
        .unwrap()
        .unwrap();
    assert!(!*rx.borrow());
    let seen = finish(srv).await;
    let put = &seen[2].body;
    assert_eq!(put["spec"]["holderIdentity"], Value::Null);
    assert_eq!(put["spec"]["leaseDurationSeconds"], 1);
    assert_eq!(put["metadata"]["resourceVersion"], "1");
}
