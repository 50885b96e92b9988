//! Resources several end-to-end tests share.

/// Groups `web` and `db` (by label `role`), each running the profile of its name.
pub const WEB_DB_GROUPS: &str = r#"
apiVersion: dogfw.io/v1alpha1
kind: Group
metadata: {name: web}
spec: {profile: web, selector: {matchLabels: {role: web}}}
---
apiVersion: dogfw.io/v1alpha1
kind: Group
metadata: {name: db}
spec: {profile: db, selector: {matchLabels: {role: db}}}
"#;

/// Profile `web` (nothing) and `db`: default DROP inbound, tcp 5432 from group web.
pub const WEB_DB_PROFILES: &str = r#"
apiVersion: dogfw.io/v1alpha1
kind: Profile
metadata: {name: web}
spec: {}
---
apiVersion: dogfw.io/v1alpha1
kind: Profile
metadata: {name: db}
spec:
  defaultInbound: DROP
  inbound:
    - {name: pg-web, action: ACCEPT, peer: {kind: Group, name: web}, protocol: tcp, ports: ["5432"]}
"#;
