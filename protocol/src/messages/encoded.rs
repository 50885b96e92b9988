//! An `apply` request's firewall serialized once for every host that runs it.
//!
//! The operator sends the same rule documents and sets to every host of a group; only the
//! request id, the host's name, the revision and the sets the host already holds differ.
//! Serializing the owned [`Request`] per host copied and re-encoded every member of every set
//! for each host (a group of N hosts whose set holds their N addresses: N² members encoded).
//! [`EncodedFirewall`] holds the documents encoded once and each set as an [`EncodedSet`], which
//! the firewalls of several groups share (a zone used by every profile is encoded once, not once
//! per group), and puts the pieces together per host; the bytes are exactly those of the owned
//! request (the tests hold it to that).

use super::validate::check_set;
use super::*;
use crate::ruleset::{Failsafe, RulesDocument};
use serde::ser::Serializer;
use serde_json::value::{to_raw_value, RawValue};
use std::sync::Arc;

/// The shared part of an `apply`: the documents, the sets and the failsafe, each already JSON,
/// checked against the same limits as [`Request::validate`].
#[derive(Debug)]
pub struct EncodedFirewall {
    ipv4: Box<RawValue>,
    ipv6: Box<RawValue>,
    sets: BTreeMap<String, Arc<EncodedSet>>,
    failsafe: Box<RawValue>,
}

/// One set's JSON, checked against the set limits under the name a firewall gives it.
#[derive(Debug)]
pub struct EncodedSet(Box<RawValue>);

impl EncodedSet {
    /// Encodes `set`, which firewalls list under `name`.
    pub fn new(name: &str, set: &IpSet) -> Result<Self, EncodeError> {
        let prefix = format!("request.firewall.sets[{name:.32}]");
        check(|| prefix.clone(), name.len(), SET_NAME_MAX)?;
        check_set(&prefix, set)?;
        Ok(EncodedSet(to_raw_value(set)?))
    }
}

/// Why a firewall could not be encoded.
#[derive(Debug, thiserror::Error)]
pub enum EncodeError {
    #[error(transparent)]
    Limit(#[from] LimitError),
    #[error("serializing: {0}")]
    Json(#[from] serde_json::Error),
}

impl EncodedFirewall {
    /// Encodes the parts every host of a firewall shares; `sets` by the names the documents
    /// use.
    pub fn new(
        ipv4: &RulesDocument,
        ipv6: &RulesDocument,
        sets: BTreeMap<String, Arc<EncodedSet>>,
        failsafe: &Failsafe,
    ) -> Result<Self, EncodeError> {
        for (family, doc) in [("ipv4", ipv4), ("ipv6", ipv6)] {
            check(
                || format!("request.firewall.{family}.text"),
                doc.text.len(),
                limits::DOCUMENT_TEXT,
            )?;
        }
        Ok(EncodedFirewall {
            ipv4: to_raw_value(ipv4)?,
            ipv6: to_raw_value(ipv6)?,
            sets,
            failsafe: to_raw_value(failsafe)?,
        })
    }

    /// The payload of `{"type":"request","id":id,"request":{"kind":"apply",…}}` for `host`,
    /// leaving out the sets named in `kept_sets`: byte for byte what serializing the owned
    /// request gives, with the per-host limits of [`Request::validate`] checked.
    pub fn apply_payload(
        &self,
        id: Uuid,
        host: &str,
        revision: u64,
        kept_sets: &BTreeMap<String, String>,
    ) -> Result<Vec<u8>, EncodeError> {
        check(
            || "request.firewall.host".into(),
            host.len(),
            limits::HOSTNAME,
        )?;
        let sent = self
            .sets
            .keys()
            .filter(|n| !kept_sets.contains_key(*n))
            .count();
        check(|| "request.firewall.sets".into(), sent, limits::SETS)?;
        check(|| "request.kept_sets".into(), kept_sets.len(), limits::SETS)?;
        for name in kept_sets.keys() {
            check(|| "request.kept_sets".into(), name.len(), SET_NAME_MAX)?;
        }
        let wire = WireRequest {
            kind_of_message: "request",
            id,
            request: WireApply {
                kind: "apply",
                revision,
                firewall: WireFirewall {
                    host,
                    ipv4: &self.ipv4,
                    ipv6: &self.ipv6,
                    sets: WireSets {
                        all: &self.sets,
                        kept: kept_sets,
                    },
                    failsafe: &self.failsafe,
                },
                kept_sets,
            },
        };
        let size = self.ipv4.get().len()
            + self.ipv6.get().len()
            + self.failsafe.get().len()
            + self.sets.values().map(|s| s.0.get().len()).sum::<usize>()
            + 512;
        let mut out = Vec::with_capacity(size);
        serde_json::to_writer(&mut out, &wire)?;
        Ok(out)
    }
}

// The shape of `OperatorMessage::Request(Request { id, request: RequestKind::Apply {…} })`
// (internally tagged enums put the tag first, then the fields in declaration order).

#[derive(Serialize)]
struct WireRequest<'a> {
    #[serde(rename = "type")]
    kind_of_message: &'static str,
    id: Uuid,
    request: WireApply<'a>,
}

#[derive(Serialize)]
struct WireApply<'a> {
    kind: &'static str,
    revision: u64,
    firewall: WireFirewall<'a>,
    #[serde(skip_serializing_if = "no_sets")]
    kept_sets: &'a BTreeMap<String, String>,
}

fn no_sets(kept: &&BTreeMap<String, String>) -> bool {
    kept.is_empty()
}

#[derive(Serialize)]
struct WireFirewall<'a> {
    host: &'a str,
    ipv4: &'a RawValue,
    ipv6: &'a RawValue,
    sets: WireSets<'a>,
    failsafe: &'a RawValue,
}

struct WireSets<'a> {
    all: &'a BTreeMap<String, Arc<EncodedSet>>,
    kept: &'a BTreeMap<String, String>,
}

impl Serialize for WireSets<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_map(
            self.all
                .iter()
                .filter(|(n, _)| !self.kept.contains_key(*n))
                .map(|(n, v)| (n, &*v.0)),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ruleset::{Family, HostFirewall};
    use proptest::prelude::*;

    fn firewall(host: &str, sets: &[(String, Vec<String>)], rules: &str) -> HostFirewall {
        let sets = sets
            .iter()
            .map(|(name, members)| {
                let set = IpSet::new(
                    name,
                    Family::V4,
                    members.iter().map(|m| m.parse().expect("test member")),
                );
                (name.clone(), set)
            })
            .collect();
        HostFirewall {
            host: host.into(),
            ipv4: RulesDocument {
                family: Family::V4,
                text: format!("*filter\n-A DOG-IN {rules}\nCOMMIT\n"),
            },
            ipv6: RulesDocument {
                family: Family::V6,
                text: "*filter\nCOMMIT\n".into(),
            },
            sets,
            failsafe: Failsafe::default(),
        }
    }

    fn owned(
        id: Uuid,
        fw: &HostFirewall,
        revision: u64,
        kept: &BTreeMap<String, String>,
    ) -> Vec<u8> {
        let mut fw = fw.clone();
        fw.sets.retain(|n, _| !kept.contains_key(n));
        let req = Request {
            id,
            request: RequestKind::Apply {
                revision,
                firewall: fw,
                kept_sets: kept.clone(),
            },
        };
        req.validate().expect("valid request");
        serde_json::to_vec(&OperatorMessage::Request(req)).expect("serializes")
    }

    fn encoded(fw: &HostFirewall) -> EncodedFirewall {
        let sets = fw
            .sets
            .iter()
            .map(|(n, s)| (n.clone(), Arc::new(EncodedSet::new(n, s).expect("encodes"))))
            .collect();
        EncodedFirewall::new(&fw.ipv4, &fw.ipv6, sets, &fw.failsafe).expect("encodes")
    }

    proptest! {
        #[test]
        fn an_encoded_apply_is_byte_for_byte_the_owned_request(
            host in "[a-z][a-z0-9.-]{0,40}",
            rules in "[ -~\\t\"\\\\é]{0,60}",
            sets in proptest::collection::vec(
                ("[a-z][a-z0-9-]{0,12}", proptest::collection::vec(
                    (0u8..=255, 0u8..=255).prop_map(|(a, b)| format!("10.{a}.{b}.1/32")), 0..20)),
                0..5),
            keep in proptest::collection::vec(any::<bool>(), 5),
            revision in any::<u64>(),
        ) {
            let fw = firewall(&host, &sets, &rules);
            let kept: BTreeMap<String, String> = fw
                .sets
                .iter()
                .zip(&keep)
                .filter(|(_, k)| **k)
                .map(|((n, s), _)| (n.clone(), s.hash()))
                .collect();
            let id = Uuid::new_v4();
            let got = encoded(&fw).apply_payload(id, &host, revision, &kept).expect("encodes");
            let want = owned(id, &fw, revision, &kept);
            prop_assert_eq!(String::from_utf8_lossy(&got), String::from_utf8_lossy(&want));
        }
    }

    #[test]
    fn the_same_limits_name_the_same_fields() {
        let fw = firewall("node-1", &[], "-j ACCEPT");
        let enc = encoded(&fw);
        let long = "h".repeat(limits::HOSTNAME + 1);
        let err = enc
            .apply_payload(Uuid::new_v4(), &long, 1, &BTreeMap::new())
            .expect_err("a host name over the limit");
        assert!(err.to_string().contains("request.firewall.host"), "{err}");

        let kept: BTreeMap<String, String> = [("s".repeat(SET_NAME_MAX + 1), "h".to_string())]
            .into_iter()
            .collect();
        let err = enc
            .apply_payload(Uuid::new_v4(), "node-1", 1, &kept)
            .expect_err("a kept set name over the limit");
        assert!(err.to_string().contains("request.kept_sets"), "{err}");

        let big = RulesDocument {
            family: Family::V4,
            text: "x".repeat(limits::DOCUMENT_TEXT + 1),
        };
        let err = EncodedFirewall::new(&big, &fw.ipv6, BTreeMap::new(), &fw.failsafe)
            .expect_err("a document over the limit");
        assert!(
            err.to_string().contains("request.firewall.ipv4.text"),
            "{err}"
        );

        let long = "s".repeat(SET_NAME_MAX + 1);
        let set = IpSet::new(long.clone(), Family::V4, []);
        let err = EncodedSet::new(&long, &set).expect_err("a set name over the limit");
        assert!(err.to_string().contains("request.firewall.sets["), "{err}");
    }
}
