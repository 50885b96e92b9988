//! A one-shot snapshot of dog's resources from the Kubernetes API (what `dog-operator explain`
//! reads when it is not given a directory): every Zone, Host, Group and Profile, the ConfigMap
//! keys Zones read, and the names of the Nodes. An IO shell; the running operator watches
//! instead (`store`).

use crate::core::compile::config_map_key;
use crate::core::compile::Snapshot;
use crate::crd::{Group, Host, Profile, Zone};
use k8s_openapi::api::core::v1::{ConfigMap, Node};
use kube::api::{Api, ListParams};
use kube::{Client, ResourceExt};
use std::sync::Arc;

/// Lists everything the compiler reads, with the client's own credentials.
pub async fn snapshot(client: Client) -> Result<Snapshot, kube::Error> {
    let lp = ListParams::default();
    let mut snap = Snapshot::default();
    for z in Api::<Zone>::all(client.clone()).list(&lp).await? {
        snap.zones.insert(z.name_any(), Arc::new(z));
    }
    for h in Api::<Host>::all(client.clone()).list(&lp).await? {
        snap.hosts.insert(h.name_any(), Arc::new(h));
    }
    for g in Api::<Group>::all(client.clone()).list(&lp).await? {
        snap.groups.insert(g.name_any(), Arc::new(g));
    }
    for p in Api::<Profile>::all(client.clone()).list(&lp).await? {
        snap.profiles.insert(p.name_any(), Arc::new(p));
    }
    let refs: Vec<_> = snap
        .zones
        .values()
        .flat_map(|z| z.spec.config_map_refs.clone())
        .collect();
    for r in refs {
        let api = Api::<ConfigMap>::namespaced(client.clone(), &r.namespace);
        if let Some(cm) = api.get_opt(&r.name).await? {
            let key = r.key.as_deref().unwrap_or("addresses");
            if let Some(text) = cm.data.as_ref().and_then(|d| d.get(key)) {
                snap.config_map_addresses.insert(
                    config_map_key(&r),
                    Arc::new(text.lines().map(str::to_string).collect()),
                );
            }
        }
    }
    let nodes = Api::<Node>::all(client).list_metadata(&lp).await?;
    snap.nodes = Some(nodes.into_iter().map(|n| n.name_any()).collect());
    Ok(snap)
}
