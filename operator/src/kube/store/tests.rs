//! The snapshot store: relists, status-only updates, ConfigMap lines, change signals.

use super::*;
use crate::crd::{ConfigMapAddressSource, HostSpec, HostStatus, ZoneSpec};

fn zone(name: &str, refs: &[(&str, &str, Option<&str>)]) -> Zone {
    Zone::new(
        name,
        ZoneSpec {
            addresses: vec![],
            config_map_refs: refs
                .iter()
                .map(|(ns, n, k)| ConfigMapAddressSource {
                    namespace: ns.to_string(),
                    name: n.to_string(),
                    key: k.map(String::from),
                })
                .collect(),
        },
    )
}

fn cm(ns: &str, name: &str, data: &[(&str, &str)]) -> ConfigMap {
    let mut c = ConfigMap::default();
    c.metadata.namespace = Some(ns.into());
    c.metadata.name = Some(name.into());
    c.data = Some(
        data.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    );
    c
}

fn sync_all(st: &mut SnapshotState) {
    st.apply(Update::Zone(watcher::Event::InitDone));
    st.apply(Update::Host(watcher::Event::InitDone));
    st.apply(Update::Group(watcher::Event::InitDone));
    st.apply(Update::Profile(watcher::Event::InitDone));
    st.apply(Update::Node(watcher::Event::InitDone));
}

#[test]
fn relist_replaces_contents_atomically() {
    let mut st = SnapshotState::default();
    let h = |n: &str| Host::new(n, HostSpec::default());
    st.apply(Update::Host(watcher::Event::Init));
    st.apply(Update::Host(watcher::Event::InitApply(h("a"))));
    assert!(st.hosts().is_empty(), "buffered until InitDone");
    assert!(st.apply(Update::Host(watcher::Event::InitDone)));
    assert_eq!(st.hosts().len(), 1);
    // relist without "a" but with "b": a is gone
    st.apply(Update::Host(watcher::Event::Init));
    st.apply(Update::Host(watcher::Event::InitApply(h("b"))));
    assert!(st.apply(Update::Host(watcher::Event::InitDone)));
    assert_eq!(st.hosts().keys().collect::<Vec<_>>(), vec!["b"]);
    // identical relist is not a change
    st.apply(Update::Host(watcher::Event::Init));
    st.apply(Update::Host(watcher::Event::InitApply(h("b"))));
    assert!(!st.apply(Update::Host(watcher::Event::InitDone)));
}

#[test]
fn keepalive_only_status_updates_are_not_changes() {
    let mut st = SnapshotState::default();
    let mut h = Host::new("a", HostSpec::default());
    assert!(st.apply(Update::Host(watcher::Event::Apply(h.clone()))));
    h.status = Some(HostStatus {
        last_keepalive: Some("2024-01-01T00:00:00Z".into()),
        ..Default::default()
    });
    h.metadata.resource_version = Some("9".into());
    assert!(!st.apply(Update::Host(watcher::Event::Apply(h.clone()))));
    assert_eq!(
        st.hosts()["a"]
            .status
            .as_ref()
            .unwrap()
            .last_keepalive
            .as_deref(),
        Some("2024-01-01T00:00:00Z"),
        "stored anyway"
    );
    h.metadata.labels = Some([("role".to_string(), "db".to_string())].into());
    assert!(st.apply(Update::Host(watcher::Event::Apply(h.clone()))));
    assert!(st.apply(Update::Host(watcher::Event::Delete(h))));
}

#[test]
fn config_map_lines_follow_zone_references() {
    let mut st = SnapshotState::default();
    sync_all(&mut st);
    assert!(st.is_synced());
    st.apply(Update::Zone(watcher::Event::Apply(zone(
        "block",
        &[("ops", "bl", None), ("ops", "bl", Some("v6"))],
    ))));
    assert!(!st.is_synced(), "referenced ConfigMap not read yet");
    assert_eq!(
        st.referenced_config_maps(),
        [("ops".to_string(), "bl".to_string())].into()
    );
    assert!(st.apply(Update::ConfigMap {
        namespace: "ops".into(),
        name: "bl".into(),
        object: Some(cm(
            "ops",
            "bl",
            &[("addresses", "# c\n10.0.0.1\n\n10.0.0.0/8")]
        )),
    }));
    assert!(st.is_synced());
    let snap = st.snapshot();
    assert_eq!(
        snap.config_map_addresses["ops/bl/addresses"].as_slice(),
        ["# c", "10.0.0.1", "", "10.0.0.0/8"]
    );
    assert!(
        !snap.config_map_addresses.contains_key("ops/bl/v6"),
        "missing key stays absent"
    );
    // an unreferenced ConfigMap is ignored
    assert!(!st.apply(Update::ConfigMap {
        namespace: "ops".into(),
        name: "other".into(),
        object: Some(cm("ops", "other", &[("addresses", "1.1.1.1")])),
    }));
    // dropping the reference drops the lines
    st.apply(Update::Zone(watcher::Event::Apply(zone("block", &[]))));
    assert!(st.snapshot().config_map_addresses.is_empty());
    assert!(st.referenced_config_maps().is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_burst_of_changes_wakes_consumers_once() {
    let store = SnapshotStore::new(Duration::from_millis(200));
    let mut rx = store.changes();
    tokio::spawn(store.clone().coalesce());
    tokio::task::yield_now().await;
    store.apply(Update::Zone(watcher::Event::InitDone));
    store.apply(Update::Host(watcher::Event::InitDone));
    store.apply(Update::Group(watcher::Event::InitDone));
    store.apply(Update::Profile(watcher::Event::InitDone));
    store.apply(Update::Node(watcher::Event::InitDone));
    for i in 0..1000 {
        store.apply(Update::Host(watcher::Event::Apply(Host::new(
            &format!("h{i}"),
            HostSpec::default(),
        ))));
    }
    rx.changed().await.unwrap();
    rx.borrow_and_update();
    assert_eq!(store.snapshot().hosts.len(), 1000);
    // nothing more arrives: no second wake-up
    let more = tokio::time::timeout(Duration::from_secs(5), rx.changed()).await;
    assert!(more.is_err(), "exactly one wake-up for the burst");
    // a later change wakes again
    store.apply(Update::Host(watcher::Event::Delete(Host::new(
        "h1",
        HostSpec::default(),
    ))));
    tokio::time::timeout(Duration::from_secs(1), rx.changed())
        .await
        .unwrap()
        .unwrap();
}

#[tokio::test(start_paused = true)]
async fn nothing_is_signalled_before_the_initial_lists() {
    let store = SnapshotStore::new(Duration::from_millis(50));
    let mut rx = store.changes();
    tokio::spawn(store.clone().coalesce());
    store.apply(Update::Host(watcher::Event::Apply(Host::new(
        "a",
        HostSpec::default(),
    ))));
    store.apply(Update::Zone(watcher::Event::InitDone));
    assert!(tokio::time::timeout(Duration::from_secs(1), rx.changed())
        .await
        .is_err());
    assert!(!store.is_synced());
}
