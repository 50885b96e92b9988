//! Loading a [`Snapshot`] from a directory of YAML files (`--from-dir`): the same resources as
//! in a cluster (`dogfw.io/v1alpha1` Zone, Host, Group, Profile and `v1` ConfigMaps that Zones
//! reference), for VM fleets without Kubernetes, the local demo and `dog-operator compile`.
//!
//! Every `*.yaml` / `*.yml` file directly in the directory is read, each may hold several
//! documents. A document that cannot be understood becomes a [`LoadError`] naming the file,
//! the document's index and its kind/name; everything else still loads.

use crate::compile::Snapshot;
use crate::crd::{Group, Host, Profile, Zone};
use k8s_openapi::api::core::v1::ConfigMap;
use serde::Deserialize;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// One document that could not be loaded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{file}: document {index} ({kind}/{name}): {message}")]
pub struct LoadError {
    pub file: PathBuf,
    /// 0-based index of the document in the file.
    pub index: usize,
    pub kind: String,
    pub name: String,
    pub message: String,
}

/// The directory itself could not be read.
#[derive(Debug, thiserror::Error)]
pub enum DirError {
    #[error("cannot read directory {dir}: {source}")]
    ReadDir {
        dir: PathBuf,
        source: std::io::Error,
    },
}

/// Loads every resource in `dir` (`*.yaml` / `*.yml`; dot files such as the local-mode status
/// file are skipped). Unreadable files and bad documents are returned as [`LoadError`]s beside
/// the snapshot.
pub fn load_dir(dir: &Path) -> Result<(Snapshot, Vec<LoadError>), DirError> {
    let read = std::fs::read_dir(dir).map_err(|source| DirError::ReadDir {
        dir: dir.to_path_buf(),
        source,
    })?;
    let mut files: Vec<PathBuf> = read
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.is_file()
                && !p
                    .file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with('.'))
                && matches!(
                    p.extension().and_then(|e| e.to_str()),
                    Some("yaml") | Some("yml")
                )
        })
        .collect();
    files.sort();
    let mut snap = Snapshot::default();
    let mut errors = Vec::new();
    for file in files {
        match std::fs::read_to_string(&file) {
            Ok(text) => load_text(&file, &text, &mut snap, &mut errors),
            Err(e) => errors.push(LoadError {
                file: file.clone(),
                index: 0,
                kind: String::new(),
                name: String::new(),
                message: format!("cannot read file: {e}"),
            }),
        }
    }
    Ok((snap, errors))
}

/// Adds the documents of one YAML text to `snap`.
pub fn load_text(file: &Path, text: &str, snap: &mut Snapshot, errors: &mut Vec<LoadError>) {
    for (index, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let value = match serde_yaml::Value::deserialize(doc) {
            Ok(v) => v,
            Err(e) => {
                errors.push(LoadError {
                    file: file.to_path_buf(),
                    index,
                    kind: String::new(),
                    name: String::new(),
                    message: format!("not YAML: {e}"),
                });
                // a syntax error ends the stream: later documents cannot be delimited
                break;
            }
        };
        if value.is_null() {
            continue;
        }
        let s = |k: &str| {
            value
                .get(k)
                .and_then(|v| v.as_str())
                .unwrap_or("")
                .to_string()
        };
        let api = s("apiVersion");
        let kind = s("kind");
        let name = value
            .get("metadata")
            .and_then(|m| m.get("name"))
            .and_then(|v| v.as_str())
            .unwrap_or("")
            .to_string();
        let mut fail = |message: String| {
            errors.push(LoadError {
                file: file.to_path_buf(),
                index,
                kind: kind.clone(),
                name: name.clone(),
                message,
            })
        };
        if name.is_empty() {
            fail("metadata.name is missing".into());
            continue;
        }
        let dog_api = format!("{}/{}", crate::crd::API_GROUP, crate::crd::API_VERSION);
        match (api.as_str(), kind.as_str()) {
            (a, "Zone") if a == dog_api => match serde_yaml::from_value::<Zone>(value) {
                Ok(z) => {
                    snap.zones.insert(name, z);
                }
                Err(e) => fail(e.to_string()),
            },
            (a, "Host") if a == dog_api => match serde_yaml::from_value::<Host>(value) {
                Ok(h) => {
                    snap.hosts.insert(name, h);
                }
                Err(e) => fail(e.to_string()),
            },
            (a, "Group") if a == dog_api => match serde_yaml::from_value::<Group>(value) {
                Ok(g) => {
                    snap.groups.insert(name, g);
                }
                Err(e) => fail(e.to_string()),
            },
            (a, "Profile") if a == dog_api => match serde_yaml::from_value::<Profile>(value) {
                Ok(p) => {
                    snap.profiles.insert(name, p);
                }
                Err(e) => fail(e.to_string()),
            },
            ("v1", "ConfigMap") => match serde_yaml::from_value::<ConfigMap>(value) {
                Ok(cm) => {
                    let ns = cm.metadata.namespace.as_deref().unwrap_or("default");
                    for (key, data) in cm.data.unwrap_or_default() {
                        let lines: Vec<String> = data.lines().map(str::to_string).collect();
                        snap.config_map_addresses
                            .insert(format!("{ns}/{name}/{key}"), Arc::new(lines));
                    }
                }
                Err(e) => fail(e.to_string()),
            },
            // the namespace a ConfigMap of the same directory lives in (so the directory also
            // applies to a cluster as it is); it carries nothing to compile
            ("v1", "Namespace") => {}
            _ => fail(format!(
                "unsupported resource {api} {kind} (expected {dog_api} Zone/Host/Group/Profile, v1 ConfigMap or v1 Namespace)"
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loads_all_kinds_and_reports_bad_documents_without_losing_others() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("a.yaml"),
            r#"
apiVersion: dogfw.io/v1alpha1
kind: Zone
metadata: {name: office}
spec:
  addresses: ["203.0.113.0/24"]
  configMapRefs: [{name: big, namespace: dog}]
---
apiVersion: dogfw.io/v1alpha1
kind: Profile
metadata: {name: bad}
spec:
  inbound: [{action: MAYBE}]
---
apiVersion: dogfw.io/v1alpha1
kind: Host
metadata: {name: h1, labels: {role: web}}
spec: {addresses: ["198.18.0.1"]}
status:
  interfaces: [{name: eth0, addresses: ["198.18.0.2/24"]}]
"#,
        )
        .unwrap();
        std::fs::write(
            dir.path().join("b.yml"),
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: big, namespace: dog}\ndata:\n  addresses: |\n    # c\n    10.0.0.1\n---\napiVersion: dogfw.io/v1alpha1\nkind: Group\nmetadata: {name: web}\nspec: {profile: p}\n",
        )
        .unwrap();
        std::fs::write(dir.path().join("ignored.txt"), "junk").unwrap();
        let (snap, errors) = load_dir(dir.path()).unwrap();
        assert_eq!(snap.zones.len(), 1);
        assert_eq!(snap.groups.len(), 1);
        assert_eq!(
            snap.hosts["h1"].status.as_ref().unwrap().interfaces.len(),
            1
        );
        assert_eq!(
            snap.config_map_addresses["dog/big/addresses"].as_slice(),
            &["# c".to_string(), "10.0.0.1".to_string()]
        );
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert_eq!(errors[0].index, 1);
        assert_eq!(errors[0].kind, "Profile");
        assert_eq!(errors[0].name, "bad");
        assert!(errors[0].file.ends_with("a.yaml"));
    }

    #[test]
    fn missing_directory_is_an_error() {
        assert!(load_dir(Path::new("/nonexistent/dog")).is_err());
    }
}
