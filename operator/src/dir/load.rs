//! Loading a [`Snapshot`] from a directory of YAML files (`--from-dir`): the same resources as
//! in a cluster (`dogfw.io/v1alpha1` Zone, Host, Group, Profile and `v1` ConfigMaps that Zones
//! reference), for VM fleets without Kubernetes, the local demo and `dog-operator compile`.
//!
//! Every `*.yaml` / `*.yml` file directly in the directory is read, each may hold several
//! documents. A document that cannot be understood becomes a [`LoadError`] naming the file,
//! the document's index and its kind/name; everything else still loads. A field the schema
//! does not know (`prots:` for `ports:`) is such an error: ignoring it could only make a rule
//! wider than written.
//!
//! A running operator keeps the last good version of whatever a broken file held
//! ([`keep_last_good`]): a YAML error never makes objects vanish as if deleted.

use crate::core::compile::{ObjectKind, Snapshot};
use crate::crd::{Group, Host, Profile, Zone};
use k8s_openapi::api::core::v1::ConfigMap;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// What one loaded object is, for [`Loaded::origins`].
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Origin {
    Object(ObjectKind, String),
    /// A ConfigMap key (`namespace/name/key`), as Zones read it.
    ConfigMapKey(String),
}

/// A loaded directory: the snapshot, the documents that failed, and the file every loaded
/// object came from.
#[derive(Debug, Clone, Default)]
pub struct Loaded {
    pub snapshot: Snapshot,
    pub errors: Vec<LoadError>,
    pub origins: BTreeMap<Origin, PathBuf>,
}

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
    load_dir_traced(dir).map(|l| (l.snapshot, l.errors))
}

/// [`load_dir`], also saying which file each object came from.
pub fn load_dir_traced(dir: &Path) -> Result<Loaded, DirError> {
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
    let mut loaded = Loaded::default();
    for file in files {
        match std::fs::read_to_string(&file) {
            Ok(text) => load_into(&file, &text, &mut loaded),
            Err(e) => loaded.errors.push(LoadError {
                file: file.clone(),
                index: 0,
                kind: String::new(),
                name: String::new(),
                message: format!("cannot read file: {e}"),
            }),
        }
    }
    Ok(loaded)
}

/// Adds the documents of one YAML text to `snap`.
pub fn load_text(file: &Path, text: &str, snap: &mut Snapshot, errors: &mut Vec<LoadError>) {
    let mut loaded = Loaded {
        snapshot: std::mem::take(snap),
        errors: std::mem::take(errors),
        origins: BTreeMap::new(),
    };
    load_into(file, text, &mut loaded);
    *snap = loaded.snapshot;
    *errors = loaded.errors;
}

/// Deserializes `value` as `T`, refusing any field `T` does not know (named by its path,
/// e.g. `spec.inbound[0].prots`). `apiVersion` and `kind` are checked by the caller.
fn strict<T: serde::de::DeserializeOwned>(value: serde_yaml::Value) -> Result<T, String> {
    let mut unknown: Vec<String> = Vec::new();
    let parsed: T = serde_ignored::deserialize(value, |path| {
        let p = field_path(&path);
        if p != "apiVersion" && p != "kind" {
            unknown.push(p);
        }
    })
    .map_err(|e| e.to_string())?;
    if unknown.is_empty() {
        Ok(parsed)
    } else {
        Err(format!(
            "unknown field{} {}: refused (an unknown field is never ignored; ignoring it could only make a rule wider than written)",
            if unknown.len() == 1 { "" } else { "s" },
            unknown
                .iter()
                .map(|u| format!("`{u}`"))
                .collect::<Vec<_>>()
                .join(", ")
        ))
    }
}

/// `spec.inbound[0].prots` for serde_ignored's path.
fn field_path(path: &serde_ignored::Path<'_>) -> String {
    use serde_ignored::Path as P;
    match path {
        P::Root => String::new(),
        P::Seq { parent, index } => format!("{}[{index}]", field_path(parent)),
        P::Map { parent, key } => {
            let head = field_path(parent);
            if head.is_empty() {
                key.clone()
            } else {
                format!("{head}.{key}")
            }
        }
        P::Some { parent } | P::NewtypeStruct { parent } | P::NewtypeVariant { parent } => {
            field_path(parent)
        }
    }
}

fn load_into(file: &Path, text: &str, loaded: &mut Loaded) {
    let Loaded {
        snapshot: snap,
        errors,
        origins,
    } = loaded;
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
        let mut origin = |o: Origin| {
            origins.insert(o, file.to_path_buf());
        };
        match (api.as_str(), kind.as_str()) {
            (a, "Zone") if a == dog_api => match strict::<Zone>(value) {
                Ok(z) => {
                    origin(Origin::Object(ObjectKind::Zone, name.clone()));
                    snap.zones.insert(name, Arc::new(z));
                }
                Err(e) => fail(e),
            },
            (a, "Host") if a == dog_api => match strict::<Host>(value) {
                Ok(h) => {
                    origin(Origin::Object(ObjectKind::Host, name.clone()));
                    snap.hosts.insert(name, Arc::new(h));
                }
                Err(e) => fail(e),
            },
            (a, "Group") if a == dog_api => match strict::<Group>(value) {
                Ok(g) => {
                    origin(Origin::Object(ObjectKind::Group, name.clone()));
                    snap.groups.insert(name, Arc::new(g));
                }
                Err(e) => fail(e),
            },
            (a, "Profile") if a == dog_api => match strict::<Profile>(value) {
                Ok(p) => {
                    origin(Origin::Object(ObjectKind::Profile, name.clone()));
                    snap.profiles.insert(name, Arc::new(p));
                }
                Err(e) => fail(e),
            },
            ("v1", "ConfigMap") => match strict::<ConfigMap>(value) {
                Ok(cm) => {
                    let ns = cm.metadata.namespace.as_deref().unwrap_or("default");
                    for (key, data) in cm.data.unwrap_or_default() {
                        let lines: Vec<String> = data.lines().map(str::to_string).collect();
                        let k = format!("{ns}/{name}/{key}");
                        origin(Origin::ConfigMapKey(k.clone()));
                        snap.config_map_addresses.insert(k, Arc::new(lines));
                    }
                }
                Err(e) => fail(e),
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

/// Carries over, from the previous load, every object a now-failing file held that did not load
/// this time, and marks it stale in `next.snapshot.stale` (its status then says the file does
/// not load and the last good version is used). A file that is gone takes its objects with it:
/// deleting a file is deliberate, a typo is not.
pub fn keep_last_good(prev: &Loaded, next: &mut Loaded) {
    let mut failing: BTreeMap<&Path, &LoadError> = BTreeMap::new();
    for e in &next.errors {
        failing.entry(e.file.as_path()).or_insert(e);
    }
    for (origin, file) in &prev.origins {
        let Some(err) = failing.get(file.as_path()) else {
            continue;
        };
        if next.origins.contains_key(origin) {
            continue;
        }
        let message = format!("{err}; the last good version is used until the file loads");
        let (p, n) = (&prev.snapshot, &mut next.snapshot);
        let kept = match origin {
            Origin::Object(ObjectKind::Zone, name) => p.zones.get(name).map(|o| {
                n.zones.insert(name.clone(), o.clone());
            }),
            Origin::Object(ObjectKind::Host, name) => p.hosts.get(name).map(|o| {
                n.hosts.insert(name.clone(), o.clone());
            }),
            Origin::Object(ObjectKind::Group, name) => p.groups.get(name).map(|o| {
                n.groups.insert(name.clone(), o.clone());
            }),
            Origin::Object(ObjectKind::Profile, name) => p.profiles.get(name).map(|o| {
                n.profiles.insert(name.clone(), o.clone());
            }),
            Origin::ConfigMapKey(key) => p.config_map_addresses.get(key).map(|o| {
                n.config_map_addresses.insert(key.clone(), o.clone());
            }),
        };
        if kept.is_some() {
            if let Origin::Object(kind, name) = origin {
                n.stale.insert((*kind, name.clone()), message);
            }
            next.origins.insert(origin.clone(), file.clone());
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
    fn unknown_fields_are_errors_naming_file_document_and_field() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("p.yaml");
        std::fs::write(
            &file,
            r#"apiVersion: dogfw.io/v1alpha1
kind: Zone
metadata: {name: ok}
spec: {addresses: ["192.0.2.1"]}
---
apiVersion: dogfw.io/v1alpha1
kind: Profile
metadata: {name: typo-ports}
spec:
  inbound:
    - {action: ACCEPT, protocol: tcp, prots: ["7000"]}
---
apiVersion: dogfw.io/v1alpha1
kind: Profile
metadata: {name: typo-peer}
spec:
  inbound:
    - {action: ACCEPT, peers: {kind: Zone, name: ok}, protocol: tcp, ports: ["22"]}
---
apiVersion: dogfw.io/v1alpha1
kind: Profile
metadata: {name: typo-iface}
spec:
  outbound:
    - {action: ACCEPT, iface: eth9}
---
apiVersion: dogfw.io/v1alpha1
kind: Group
metadata: {name: g, labelz: {a: b}}
spec: {profile: typo-ports, selectr: {}}
---
apiVersion: v1
kind: ConfigMap
metadata: {name: cm, namespace: dog}
dataa: {addresses: "10.0.0.1"}
"#,
        )
        .unwrap();
        let (snap, errors) = load_dir(dir.path()).unwrap();
        assert_eq!(snap.zones.len(), 1, "the good document still loads");
        assert!(
            snap.profiles.is_empty(),
            "no profile is applied wider than written"
        );
        assert!(snap.groups.is_empty() && snap.config_map_addresses.is_empty());
        let got: Vec<(usize, String, String)> = errors
            .iter()
            .map(|e| (e.index, e.name.clone(), e.message.clone()))
            .collect();
        let want = [
            (1, "typo-ports", "`spec.inbound[0].prots`"),
            (2, "typo-peer", "`spec.inbound[0].peers`"),
            (3, "typo-iface", "`spec.outbound[0].iface`"),
            (4, "g", "`metadata.labelz`, `spec.selectr`"),
            (5, "cm", "`dataa`"),
        ];
        assert_eq!(got.len(), want.len(), "{got:#?}");
        for ((i, n, m), (wi, wn, wm)) in got.iter().zip(want) {
            assert_eq!((*i, n.as_str()), (wi, wn));
            assert!(m.contains(wm) && m.contains("unknown field"), "{m}");
        }
        let shown = errors[0].to_string();
        assert!(
            shown.contains("p.yaml: document 1 (Profile/typo-ports)"),
            "{shown}"
        );
    }

    #[test]
    fn a_broken_file_keeps_the_last_good_version_of_its_objects_and_marks_them_stale() {
        let dir = tempfile::tempdir().unwrap();
        let zones = dir.path().join("zones.yaml");
        let good = "apiVersion: dogfw.io/v1alpha1\nkind: Zone\nmetadata: {name: blocklist}\nspec: {addresses: [\"192.0.2.1\"], configMapRefs: [{name: big, namespace: dog}]}\n---\napiVersion: v1\nkind: ConfigMap\nmetadata: {name: big, namespace: dog}\ndata: {addresses: \"192.0.2.2\"}\n---\napiVersion: dogfw.io/v1alpha1\nkind: Zone\nmetadata: {name: office}\nspec: {addresses: [\"198.51.100.0/24\"]}\n";
        std::fs::write(&zones, good).unwrap();
        let other = dir.path().join("other.yaml");
        std::fs::write(&other, "apiVersion: dogfw.io/v1alpha1\nkind: Zone\nmetadata: {name: lab}\nspec: {addresses: [\"203.0.113.0/24\"]}\n").unwrap();
        let first = load_dir_traced(dir.path()).unwrap();
        assert!(first.errors.is_empty(), "{:?}", first.errors);

        // a syntax error in the first document, and the other file deleted
        std::fs::write(&zones, format!("{{{{ not yaml\n{good}")).unwrap();
        std::fs::remove_file(&other).unwrap();
        let mut next = load_dir_traced(dir.path()).unwrap();
        assert!(next.snapshot.zones.is_empty());
        keep_last_good(&first, &mut next);
        let s = &next.snapshot;
        assert_eq!(s.zones.keys().collect::<Vec<_>>(), ["blocklist", "office"]);
        assert_eq!(
            s.zones["blocklist"].spec,
            first.snapshot.zones["blocklist"].spec
        );
        assert!(s.config_map_addresses.contains_key("dog/big/addresses"));
        let stale = &s.stale[&(ObjectKind::Zone, "blocklist".to_string())];
        assert!(
            stale.contains("zones.yaml") && stale.contains("last good version"),
            "{stale}"
        );
        assert!(
            !s.zones.contains_key("lab"),
            "a deleted file takes its objects with it"
        );
        let compiled = crate::core::compile::compile(s, &Default::default());
        let valid = crate::core::report::zone_status(&compiled, "blocklist").conditions[0].clone();
        assert_eq!(
            (valid.type_.as_str(), valid.status.as_str()),
            ("Valid", "False")
        );
        assert_eq!(valid.reason, "LoadFailed");
        assert_eq!(compiled.zones["blocklist"].ipv4_count, 2, "still in force");

        // and a later load still carries them while the file stays broken
        let mut again = load_dir_traced(dir.path()).unwrap();
        keep_last_good(&next, &mut again);
        assert_eq!(again.snapshot.zones.len(), 2);

        // once it loads again, nothing is stale
        std::fs::write(&zones, good).unwrap();
        let mut fixed = load_dir_traced(dir.path()).unwrap();
        keep_last_good(&again, &mut fixed);
        assert!(fixed.snapshot.stale.is_empty());
    }

    #[test]
    fn missing_directory_is_an_error() {
        assert!(load_dir(Path::new("/nonexistent/dog")).is_err());
    }
}
