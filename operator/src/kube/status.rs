//! Writing the status of Hosts, Groups, Profiles and Zones through the API server:
//! [`KubeStatusSink`] writes through the status subresource with server-side apply (field
//! manager `dog-operator`, `force`), so the operator owns every status field it sends and
//! nothing in `spec`/`metadata`. It remembers the last status written per object and skips
//! identical writes, so a reconcile loop may call it on every pass without API churn.

use crate::crd::{Group, Host, Profile, Zone};
use crate::runtime::sinks::{ObjectStatus, StatusError, StatusSink};
use futures::future::BoxFuture;
use kube::api::{Api, Patch, PatchParams};
use kube::{Client, Resource};
use serde::Serialize;
use std::collections::HashMap;
use std::sync::Mutex;

/// The field manager of every write the operator makes.
pub const FIELD_MANAGER: &str = "dog-operator";

/// Server-side-apply status writer with a last-written cache.
pub struct KubeStatusSink {
    client: Client,
    /// (kind, name) → the exact apply body last written successfully.
    last: Mutex<HashMap<(&'static str, String), serde_json::Value>>,
}

impl KubeStatusSink {
    pub fn new(client: Client) -> Self {
        Self {
            client,
            last: Mutex::new(HashMap::new()),
        }
    }

    /// Drops the whole cache, e.g. after winning the leader election (another replica may
    /// have written since).
    pub fn clear_cache(&self) {
        self.lock().clear();
    }

    fn lock(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<(&'static str, String), serde_json::Value>> {
        // A panic while holding the lock cannot leave the map inconsistent (single inserts).
        self.last.lock().unwrap_or_else(|e| e.into_inner())
    }

    async fn apply<K, S>(&self, name: &str, status: &S) -> Result<(), StatusError>
    where
        K: Resource<DynamicType = (), Scope = kube::core::ClusterResourceScope>
            + Clone
            + serde::de::DeserializeOwned
            + std::fmt::Debug,
        S: Serialize,
    {
        let kind: &'static str = match K::kind(&()).as_ref() {
            "Host" => "Host",
            "Group" => "Group",
            "Profile" => "Profile",
            "Zone" => "Zone",
            _ => "Unknown",
        };
        let body = serde_json::json!({
            "apiVersion": K::api_version(&()),
            "kind": K::kind(&()),
            "status": serde_json::to_value(status).map_err(|source| StatusError::Serialize {
                kind,
                name: name.to_string(),
                source,
            })?,
        });
        let key = (kind, name.to_string());
        if self.lock().get(&key) == Some(&body) {
            tracing::trace!(kind, name, "status unchanged, not written");
            return Ok(());
        }
        let api: Api<K> = Api::all(self.client.clone());
        let pp = PatchParams::apply(FIELD_MANAGER).force();
        match api.patch_status(name, &pp, &Patch::Apply(&body)).await {
            Ok(_) => {
                tracing::debug!(kind, name, "status written");
                self.lock().insert(key, body);
                Ok(())
            }
            Err(source) => {
                self.lock().remove(&key);
                Err(StatusError::Kube {
                    kind,
                    name: name.to_string(),
                    source,
                })
            }
        }
    }
}

impl StatusSink for KubeStatusSink {
    fn write<'a>(
        &'a self,
        name: &'a str,
        status: ObjectStatus,
    ) -> BoxFuture<'a, Result<(), StatusError>> {
        Box::pin(async move {
            match &status {
                ObjectStatus::Host(s) => self.apply::<Host, _>(name, &**s).await,
                ObjectStatus::Group(s) => self.apply::<Group, _>(name, s).await,
                ObjectStatus::Profile(s) => self.apply::<Profile, _>(name, s).await,
                ObjectStatus::Zone(s) => self.apply::<Zone, _>(name, s).await,
            }
        })
    }
    fn forget(&self, kind: &'static str, name: &str) {
        self.lock().remove(&(kind, name.to_string()));
    }
}
