//! Kubernetes *structural schema* rules, checked on every generated CRD schema.
//!
//! The API server refuses (apiextensions.k8s.io/v1) or silently degrades CRDs whose schema is
//! not structural, so this checks the rules of
//! "Specifying a structural schema" (Kubernetes docs, CustomResourceDefinitions) plus the v1
//! restrictions, over the schemas as serialised JSON. It also checks that every constraint
//! `operator/src/crd.rs` declares actually reached the schema (enums, patterns, ranges,
//! defaults), and that every `default` validates against its own node.
//!
//! Long: the structural rules are one walk over the schema tree, each rule a branch of it.

use dog_operator::crd::{
    ADDRESS_PATTERN, API_GROUP, API_VERSION, INTERFACE_PATTERN, NAME_PATTERN, PORT_PATTERN,
};
use dog_operator::crdgen::{crd_schema, crds};
use serde_json::{json, Value};

const JUNCTORS: [&str; 4] = ["allOf", "anyOf", "oneOf", "not"];
/// Keys the Kubernetes docs forbid inside logical junctors.
const FORBIDDEN_IN_JUNCTORS: [&str; 5] = [
    "type",
    "additionalProperties",
    "default",
    "nullable",
    "description",
];
/// JSON-Schema keywords apiextensions v1 does not accept at all.
const FORBIDDEN_ANYWHERE: [&str; 6] = [
    "$ref",
    "definitions",
    "$defs",
    "$schema",
    "uniqueItems",
    "patternProperties",
];

/// Every violation of the structural rules in `schema`, each naming its JSON path.
fn structural_violations(schema: &Value) -> Vec<String> {
    let mut v = Vec::new();
    check_node(schema, "$", Ctx::Root, &mut v);
    v
}

#[derive(Clone, Copy, PartialEq)]
enum Ctx {
    Root,
    /// A property of an object, an array item or a map value: must carry a type.
    Field,
    /// Inside allOf/anyOf/oneOf/not.
    Junctor,
}

fn is_true(node: &Value, key: &str) -> bool {
    node.get(key).and_then(Value::as_bool) == Some(true)
}

fn check_node(node: &Value, path: &str, ctx: Ctx, v: &mut Vec<String>) {
    let Some(obj) = node.as_object() else {
        v.push(format!("{path}: schema node is not an object"));
        return;
    };
    for key in FORBIDDEN_ANYWHERE {
        if obj.contains_key(key) {
            v.push(format!("{path}: `{key}` is not allowed in a CRD schema"));
        }
    }
    let int_or_string = is_true(node, "x-kubernetes-int-or-string");
    let preserve = is_true(node, "x-kubernetes-preserve-unknown-fields");
    let ty = obj.get("type").and_then(Value::as_str);
    match ctx {
        Ctx::Root | Ctx::Field => {
            if ty.is_none_or(str::is_empty) && !int_or_string && !preserve {
                v.push(format!(
                    "{path}: no `type` (required for a structural schema)"
                ));
            }
            if int_or_string && ty.is_some() {
                v.push(format!(
                    "{path}: x-kubernetes-int-or-string must not set `type`"
                ));
            }
        }
        Ctx::Junctor => {
            for key in FORBIDDEN_IN_JUNCTORS {
                if obj.contains_key(key) {
                    v.push(format!("{path}: `{key}` inside a logical junctor"));
                }
            }
            for key in obj.keys().filter(|k| k.starts_with("x-kubernetes-")) {
                v.push(format!("{path}: `{key}` inside a logical junctor"));
            }
        }
    }
    if ctx == Ctx::Root && ty != Some("object") {
        v.push(format!("{path}: the root must be `type: object`"));
    }
    if let Some(t) = ty {
        if !["object", "array", "string", "integer", "number", "boolean"].contains(&t) {
            v.push(format!("{path}: unknown type `{t}`"));
        }
    }
    if obj.contains_key("properties") && obj.contains_key("additionalProperties") {
        v.push(format!(
            "{path}: `properties` and `additionalProperties` are mutually exclusive"
        ));
    }
    match obj.get("additionalProperties") {
        Some(Value::Bool(false)) => v.push(format!(
            "{path}: `additionalProperties: false` is not allowed (unknown fields are pruned)"
        )),
        Some(Value::Bool(true)) => v.push(format!(
            "{path}: `additionalProperties: true`; use x-kubernetes-preserve-unknown-fields"
        )),
        _ => {}
    }
    if ty == Some("array") && !obj.contains_key("items") && ctx != Ctx::Junctor {
        v.push(format!("{path}: array without `items`"));
    }
    if let Some(items) = obj.get("items") {
        if items.is_array() {
            v.push(format!("{path}: `items` must be one schema, not a tuple"));
        }
    }
    if obj.contains_key("properties") && ty.is_some_and(|t| t != "object") {
        v.push(format!("{path}: `properties` on a non-object"));
    }
    if is_true(node, "x-kubernetes-embedded-resource") && ty != Some("object") {
        v.push(format!("{path}: embedded resource must be an object"));
    }

    // metadata: only name/generateName restrictions.
    if ctx == Ctx::Root {
        if let Some(meta) = obj.get("properties").and_then(|p| p.get("metadata")) {
            check_metadata(meta, &format!("{path}.properties.metadata"), v);
        }
    }

    let child_ctx = if ctx == Ctx::Junctor {
        Ctx::Junctor
    } else {
        Ctx::Field
    };
    if let Some(props) = obj.get("properties").and_then(Value::as_object) {
        for (name, child) in props {
            check_node(child, &format!("{path}.properties.{name}"), child_ctx, v);
        }
    }
    if let Some(ap) = obj.get("additionalProperties").filter(|a| a.is_object()) {
        check_node(ap, &format!("{path}.additionalProperties"), child_ctx, v);
    }
    if let Some(items) = obj.get("items").filter(|i| i.is_object()) {
        check_node(items, &format!("{path}.items"), child_ctx, v);
    }
    for j in JUNCTORS {
        let Some(sub) = obj.get(j) else { continue };
        let subs: Vec<&Value> = match sub {
            Value::Array(a) => a.iter().collect(),
            other => vec![other],
        };
        for (i, s) in subs.into_iter().enumerate() {
            let p = format!("{path}.{j}[{i}]");
            check_node(s, &p, Ctx::Junctor, v);
            check_specified_outside(node, s, &p, v);
        }
    }
}

/// Fields and items named inside a junctor must also be specified outside it.
fn check_specified_outside(outside: &Value, inside: &Value, path: &str, v: &mut Vec<String>) {
    if let Some(props) = inside.get("properties").and_then(Value::as_object) {
        for (name, sub) in props {
            match outside.get("properties").and_then(|p| p.get(name)) {
                None => v.push(format!(
                    "{path}.properties.{name}: not specified outside the junctor"
                )),
                Some(out) => {
                    check_specified_outside(out, sub, &format!("{path}.properties.{name}"), v)
                }
            }
        }
    }
    if let Some(items) = inside.get("items") {
        match outside.get("items") {
            None => v.push(format!("{path}.items: not specified outside the junctor")),
            Some(out) => check_specified_outside(out, items, &format!("{path}.items"), v),
        }
    }
}

fn check_metadata(meta: &Value, path: &str, v: &mut Vec<String>) {
    let Some(obj) = meta.as_object() else { return };
    for key in obj.keys() {
        if !["type", "properties", "description"].contains(&key.as_str()) {
            v.push(format!(
                "{path}: only name/generateName may be restricted, found `{key}`"
            ));
        }
    }
    if let Some(props) = obj.get("properties").and_then(Value::as_object) {
        for (name, sub) in props {
            if name != "name" && name != "generateName" {
                v.push(format!(
                    "{path}.properties.{name}: only name/generateName may be restricted"
                ));
            }
            let allowed = ["type", "pattern", "maxLength", "minLength", "description"];
            if let Some(o) = sub.as_object() {
                for key in o.keys().filter(|k| !allowed.contains(&k.as_str())) {
                    v.push(format!(
                        "{path}.properties.{name}: `{key}` is not allowed on metadata"
                    ));
                }
            }
        }
    }
}

/// Every node carrying `nullable: true`, as paths.
fn nullable_paths(node: &Value, path: &str, out: &mut Vec<(String, bool)>) {
    if is_true(node, "nullable") {
        out.push((path.to_string(), false));
    }
    if let Some(props) = node.get("properties").and_then(Value::as_object) {
        let required: Vec<&str> = node
            .get("required")
            .and_then(Value::as_array)
            .map(|r| r.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        for (name, child) in props {
            let p = format!("{path}.{name}");
            let before = out.len();
            nullable_paths(child, &p, out);
            // Mark whether the nullable node is an optional object property.
            if out.len() > before && out[before].0 == p {
                out[before].1 = !required.contains(&name.as_str());
            }
        }
    }
    if let Some(items) = node.get("items") {
        nullable_paths(items, &format!("{path}[]"), out);
    }
    if let Some(ap) = node.get("additionalProperties").filter(|a| a.is_object()) {
        nullable_paths(ap, &format!("{path}.<key>"), out);
    }
}

/// Checks `value` against the subset of OpenAPI the CRDs use (type, enum, pattern, ranges,
/// lengths, properties, items, required); returns the problems found.
fn validate(value: &Value, schema: &Value, path: &str, out: &mut Vec<String>) {
    if value.is_null() {
        if !is_true(schema, "nullable") {
            out.push(format!("{path}: null but not nullable"));
        }
        return;
    }
    let ty = schema.get("type").and_then(Value::as_str).unwrap_or("");
    let type_ok = match ty {
        "object" => value.is_object(),
        "array" => value.is_array(),
        "string" => value.is_string(),
        "integer" => value.is_i64() || value.is_u64(),
        "number" => value.is_number(),
        "boolean" => value.is_boolean(),
        _ => true,
    };
    if !type_ok {
        out.push(format!("{path}: {value} is not of type {ty}"));
        return;
    }
    if let Some(e) = schema.get("enum").and_then(Value::as_array) {
        if !e.contains(value) {
            out.push(format!("{path}: {value} not in enum"));
        }
    }
    if let (Some(p), Some(s)) = (
        schema.get("pattern").and_then(Value::as_str),
        value.as_str(),
    ) {
        let re = regex::Regex::new(p).unwrap();
        if !re.is_match(s) {
            out.push(format!("{path}: {s:?} does not match {p}"));
        }
    }
    if let Some(n) = value.as_f64() {
        if schema
            .get("minimum")
            .and_then(Value::as_f64)
            .is_some_and(|m| n < m)
        {
            out.push(format!("{path}: {n} below minimum"));
        }
        if schema
            .get("maximum")
            .and_then(Value::as_f64)
            .is_some_and(|m| n > m)
        {
            out.push(format!("{path}: {n} above maximum"));
        }
    }
    if let Some(a) = value.as_array() {
        if schema
            .get("maxItems")
            .and_then(Value::as_u64)
            .is_some_and(|m| a.len() as u64 > m)
        {
            out.push(format!("{path}: too many items"));
        }
        if let Some(items) = schema.get("items") {
            for (i, x) in a.iter().enumerate() {
                validate(x, items, &format!("{path}[{i}]"), out);
            }
        }
    }
    if let Some(o) = value.as_object() {
        for r in schema
            .get("required")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
        {
            if !o.contains_key(r) {
                out.push(format!("{path}: missing required `{r}`"));
            }
        }
        for (k, x) in o {
            match (schema.get("properties"), schema.get("additionalProperties")) {
                (Some(props), _) => match props.get(k) {
                    Some(s) => validate(x, s, &format!("{path}.{k}"), out),
                    None => out.push(format!("{path}.{k}: unknown field (would be pruned)")),
                },
                (None, Some(ap)) if ap.is_object() => validate(x, ap, &format!("{path}.{k}"), out),
                _ => {}
            }
        }
    }
}

/// Every `default` in the schema must validate against the node it sits on (the API server
/// refuses a CRD whose defaults do not, or whose defaults would be pruned).
fn default_violations(node: &Value, path: &str, out: &mut Vec<String>) {
    if let Some(d) = node.get("default") {
        validate(d, node, &format!("{path}(default)"), out);
    }
    if let Some(props) = node.get("properties").and_then(Value::as_object) {
        for (name, child) in props {
            default_violations(child, &format!("{path}.{name}"), out);
        }
    }
    if let Some(items) = node.get("items") {
        default_violations(items, &format!("{path}[]"), out);
    }
    if let Some(ap) = node.get("additionalProperties").filter(|a| a.is_object()) {
        default_violations(ap, &format!("{path}.<key>"), out);
    }
}

fn schema_of(kind: &str) -> Value {
    let crd = crds()
        .into_iter()
        .find(|c| c.spec.names.kind == kind)
        .unwrap_or_else(|| panic!("no CRD of kind {kind}"));
    crd_schema(&crd)
}

/// The schema node at a dotted path where `[]` steps into `items`.
fn at<'a>(schema: &'a Value, path: &str) -> &'a Value {
    let mut node = schema;
    for part in path.split('.') {
        let (name, arrays) = match part.find("[]") {
            Some(i) => (&part[..i], part[i..].matches("[]").count()),
            None => (part, 0),
        };
        node = node
            .get("properties")
            .and_then(|p| p.get(name))
            .unwrap_or_else(|| panic!("schema has no field `{name}` on the way to `{path}`"));
        for _ in 0..arrays {
            node = node
                .get("items")
                .unwrap_or_else(|| panic!("`{name}` in `{path}` is not an array"));
        }
    }
    node
}

// ------------------------------------------------------------------------------------------

#[test]
fn every_generated_schema_is_structural() {
    let mut all = Vec::new();
    for crd in crds() {
        assert_eq!(crd.spec.group, API_GROUP);
        assert_eq!(crd.spec.versions.len(), 1, "one version per CRD");
        assert_eq!(crd.spec.versions[0].name, API_VERSION);
        let schema = crd_schema(&crd);
        assert!(
            schema.is_object(),
            "{} has no openAPIV3Schema",
            crd.spec.names.kind
        );
        for violation in structural_violations(&schema) {
            all.push(format!("{}: {violation}", crd.spec.names.kind));
        }
    }
    assert!(all.is_empty(), "non-structural schema:\n{}", all.join("\n"));
}

#[test]
fn every_default_validates_against_its_node() {
    let mut all = Vec::new();
    for crd in crds() {
        default_violations(&crd_schema(&crd), &crd.spec.names.kind, &mut all);
    }
    assert!(all.is_empty(), "invalid defaults:\n{}", all.join("\n"));
}

#[test]
fn nullable_only_on_optional_fields() {
    // `Option<T>` fields (never required, never list items or map values) and the top-level
    // `status` are the only places null is meaningful.
    for crd in crds() {
        let mut found = Vec::new();
        nullable_paths(&crd_schema(&crd), "", &mut found);
        for (path, optional_property) in found {
            assert!(
                optional_property,
                "{}: `nullable: true` on {path}, which is not an optional object property",
                crd.spec.names.kind
            );
        }
    }
    // And a few that must be nullable (Option<T>) versus must not (plain fields).
    let profile = schema_of("Profile");
    assert!(is_true(
        at(&profile, "spec.inbound[].connlimit"),
        "nullable"
    ));
    assert!(!is_true(at(&profile, "spec.inbound[].action"), "nullable"));
    assert!(!is_true(at(&profile, "spec.inbound[].ports"), "nullable"));
    assert!(!is_true(at(&profile, "spec"), "nullable"));
}

#[test]
fn declared_enums_reach_the_schema() {
    let profile = schema_of("Profile");
    let cases = [
        (
            "spec.inbound[].action",
            json!(["ACCEPT", "DROP", "REJECT", "LOG"]),
        ),
        (
            "spec.outbound[].action",
            json!(["ACCEPT", "DROP", "REJECT", "LOG"]),
        ),
        ("spec.defaultInbound", json!(["ACCEPT", "DROP", "REJECT"])),
        ("spec.defaultOutbound", json!(["ACCEPT", "DROP", "REJECT"])),
        ("spec.mode", json!(["Enforce", "Audit"])),
        (
            "spec.inbound[].protocol",
            json!(["any", "tcp", "udp", "icmp", "icmpv6", "sctp"]),
        ),
        (
            "spec.inbound[].peer.kind",
            json!(["Any", "Group", "Zone", "Cidrs", "Self"]),
        ),
        (
            "spec.inbound[].states[]",
            json!(["NEW", "ESTABLISHED", "RELATED", "INVALID", "UNTRACKED"]),
        ),
        (
            "spec.inbound[].type",
            json!(["basic", "connlimit", "recent"]),
        ),
    ];
    for (path, expected) in cases {
        assert_eq!(at(&profile, path)["enum"], expected, "Profile {path}");
    }
    assert_eq!(
        at(&schema_of("Host"), "status.state")["enum"],
        json!(["New", "Active", "Inactive", "Retired"])
    );
    assert_eq!(
        at(
            &schema_of("Group"),
            "spec.selector.matchExpressions[].operator"
        )["enum"],
        json!(["In", "NotIn", "Exists", "DoesNotExist"])
    );
}

#[test]
fn declared_patterns_match_the_published_constants() {
    let profile = schema_of("Profile");
    let zone = schema_of("Zone");
    let group = schema_of("Group");
    let host = schema_of("Host");
    let cases: [(&Value, &str, &str); 11] = [
        (&profile, "spec.inbound[].ports[]", PORT_PATTERN),
        (&profile, "spec.outbound[].ports[]", PORT_PATTERN),
        (&profile, "spec.inbound[].interface", INTERFACE_PATTERN),
        (&profile, "spec.inbound[].peer.name", NAME_PATTERN),
        (&profile, "spec.inbound[].peer.cidrs[]", ADDRESS_PATTERN),
        (&zone, "spec.addresses[]", ADDRESS_PATTERN),
        (&zone, "spec.configMapRefs[].name", NAME_PATTERN),
        (&group, "spec.extraAddresses[]", ADDRESS_PATTERN),
        (&group, "spec.profile", NAME_PATTERN),
        (&host, "spec.addresses[]", ADDRESS_PATTERN),
        (&host, "spec.group", NAME_PATTERN),
    ];
    for (schema, path, expected) in cases {
        assert_eq!(
            at(schema, path)["pattern"].as_str(),
            Some(expected),
            "pattern of {path} differs from the constant in crd.rs"
        );
    }
    assert!(at(&host, "spec.keys.signing")["pattern"].is_string());
    assert!(at(&host, "spec.keys.encryption")["pattern"].is_string());
    assert!(at(&profile, "spec.inbound[].logPrefix")["pattern"].is_string());
}

#[test]
fn declared_patterns_accept_and_refuse_what_they_should() {
    let ok = |p: &str, s: &str| regex::Regex::new(p).unwrap().is_match(s);
    for good in [
        "10.0.0.1",
        "10.0.0.0/8",
        "2001:db8::/32",
        "::1",
        "fe80::1/128",
    ] {
        assert!(ok(ADDRESS_PATTERN, good), "{good}");
    }
    for bad in ["10.0.0.0/33", "example.com", "", "2001:db8::/129"] {
        assert!(!ok(ADDRESS_PATTERN, bad), "{bad}");
    }
    assert!(ok(PORT_PATTERN, "443") && ok(PORT_PATTERN, "8000-8100"));
    assert!(!ok(PORT_PATTERN, "http") && !ok(PORT_PATTERN, "1-2-3"));
    assert!(ok(INTERFACE_PATTERN, "eth+") && !ok(INTERFACE_PATTERN, "averyveryverylongname0"));
}

#[test]
fn declared_ranges_and_lengths_reach_the_schema() {
    let profile = schema_of("Profile");
    let num = |path: &str, key: &str| at(&profile, path)[key].as_f64();
    assert_eq!(num("spec.inbound[].connlimit.above", "minimum"), Some(1.0));
    assert_eq!(
        num("spec.inbound[].connlimit.above", "maximum"),
        Some(1_000_000.0)
    );
    assert_eq!(
        num("spec.inbound[].connlimit.maskV4", "maximum"),
        Some(32.0)
    );
    assert_eq!(
        num("spec.inbound[].connlimit.maskV6", "maximum"),
        Some(128.0)
    );
    assert_eq!(num("spec.inbound[].recent.seconds", "minimum"), Some(1.0));
    assert_eq!(
        num("spec.inbound[].recent.seconds", "maximum"),
        Some(86400.0)
    );
    assert_eq!(
        num("spec.inbound[].recent.hitCount", "maximum"),
        Some(255.0)
    );
    assert_eq!(num("spec.inbound[].icmpType", "maximum"), Some(255.0));
    assert_eq!(at(&profile, "spec.inbound")["maxItems"], json!(2000));
    assert_eq!(at(&profile, "spec.outbound")["maxItems"], json!(2000));
    // Required fields the compiler relies on.
    assert_eq!(
        at(&profile, "spec.inbound[]")["required"],
        json!(["action"])
    );
    assert_eq!(
        at(&profile, "spec.inbound[].connlimit")["required"],
        json!(["above"])
    );
    // Defaults documented in the spec: inbound DROP, outbound ACCEPT. Inside the (atomic) rule
    // lists the schema defaults nothing, so that the same manifest applies cleanly from any
    // field manager; the operator reads an absent `enabled` as true.
    assert_eq!(
        at(&profile, "spec.defaultInbound")["default"],
        json!("DROP")
    );
    assert_eq!(
        at(&profile, "spec.defaultOutbound")["default"],
        json!("ACCEPT")
    );
    assert_eq!(
        at(&profile, "spec.inbound[].enabled")["default"],
        json!(null)
    );
    assert_eq!(
        at(&profile, "spec.inbound[].peer.kind")["default"],
        json!(null)
    );
}

// The checker itself must catch what it claims to catch.

#[test]
fn checker_flags_missing_types_refs_and_junctor_misuse() {
    let bad = json!({
        "type": "object",
        "properties": {
            "a": {"description": "no type"},
            "b": {"$ref": "#/definitions/B", "type": "object"},
            "c": {"type": "array"},
            "d": {"type": "string", "nullable": true, "anyOf": [{"type": "string", "nullable": true}]},
            "e": {"type": "object", "properties": {"x": {"type": "string"}},
                   "additionalProperties": {"type": "string"}},
            "f": {"type": "object", "oneOf": [{"properties": {"y": {"type": "string"}}}]},
            "g": {"x-kubernetes-int-or-string": true},
            "h": {"type": "object", "x-kubernetes-preserve-unknown-fields": true},
            "i": {"type": "object", "additionalProperties": false}
        },
        "definitions": {}
    });
    let v = structural_violations(&bad);
    let has = |needle: &str| v.iter().any(|x| x.contains(needle));
    assert!(has("$.properties.a: no `type`"), "{v:#?}");
    assert!(has("$.properties.b: `$ref`"), "{v:#?}");
    assert!(has("$: `definitions`"), "{v:#?}");
    assert!(has("$.properties.c: array without `items`"), "{v:#?}");
    assert!(has("$.properties.d.anyOf[0]: `type` inside"), "{v:#?}");
    assert!(has("$.properties.d.anyOf[0]: `nullable` inside"), "{v:#?}");
    assert!(
        has("$.properties.e: `properties` and `additionalProperties`"),
        "{v:#?}"
    );
    assert!(
        has("oneOf[0].properties.y: not specified outside"),
        "{v:#?}"
    );
    assert!(
        has("$.properties.i: `additionalProperties: false`"),
        "{v:#?}"
    );
    assert!(!has("properties.g"), "int-or-string needs no type: {v:#?}");
    assert!(
        !has("properties.h:"),
        "preserve-unknown-fields object is fine: {v:#?}"
    );
}

#[test]
fn checker_flags_metadata_restrictions_and_bad_defaults() {
    let bad = json!({
        "type": "object",
        "properties": {
            "metadata": {"type": "object", "properties": {
                "name": {"type": "string", "maxLength": 63},
                "labels": {"type": "object"}
            }},
            "n": {"type": "integer", "minimum": 1, "default": 0},
            "s": {"type": "string", "enum": ["A"], "default": "B"}
        }
    });
    let v = structural_violations(&bad);
    assert!(
        v.iter().any(|x| x.contains("metadata.properties.labels")),
        "{v:#?}"
    );
    assert!(
        !v.iter().any(|x| x.contains("metadata.properties.name")),
        "{v:#?}"
    );
    let mut d = Vec::new();
    default_violations(&bad, "X", &mut d);
    assert!(d.iter().any(|x| x.contains("X.n(default)")), "{d:#?}");
    assert!(d.iter().any(|x| x.contains("X.s(default)")), "{d:#?}");
    let mut nulls = Vec::new();
    nullable_paths(
        &json!({"type": "object", "required": ["r"], "properties": {
            "r": {"type": "string", "nullable": true},
            "o": {"type": "string", "nullable": true}
        }}),
        "",
        &mut nulls,
    );
    assert_eq!(
        nulls,
        vec![(".o".to_string(), true), (".r".to_string(), false)]
    );
}

#[test]
fn cel_rules_sit_on_rules_and_peers_of_both_directions() {
    // Evaluated by a real API server in tests/e2e/tests/apiserver.rs; here: present where crd.rs declares them,
    // well-formed, and never on a node the structural rules forbid.
    let profile = schema_of("Profile");
    for path in [
        "spec.inbound[]",
        "spec.outbound[]",
        "spec.inbound[].peer",
        "spec.outbound[].peer",
    ] {
        let rules = at(&profile, path)["x-kubernetes-validations"]
            .as_array()
            .unwrap_or_else(|| panic!("no CEL rules on Profile {path}"));
        assert!(!rules.is_empty());
        for r in rules {
            assert!(
                r["rule"].as_str().is_some_and(|s| s.contains("self.")),
                "{r}"
            );
            assert!(r["message"].as_str().is_some_and(|s| !s.is_empty()), "{r}");
        }
    }
    let peer_rules = at(&profile, "spec.inbound[].peer")["x-kubernetes-validations"].to_string();
    assert!(
        peer_rules.contains("only allowed when peer.kind is Group or Zone"),
        "a named peer without kind must be refused (it would default to Any)"
    );
}
