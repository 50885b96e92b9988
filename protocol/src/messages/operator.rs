//! Operator to agent: requests

use super::*;

/// Members to add to and remove from one set.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
pub struct SetDelta {
    pub name: String,
    #[serde(default)]
    pub add: Vec<IpNet>,
    #[serde(default)]
    pub remove: Vec<IpNet>,
}

/// A change of shared set `name` to `version`, for the hosts whose copy has hash `base_hash`:
/// remove `remove`, add `add`, and the result must hash to `hash`. A host whose copy is another
/// answers `base_mismatch` and gets its full state.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct SetChange {
    pub name: String,
    pub version: u64,
    pub base_hash: String,
    pub hash: String,
    #[serde(default)]
    pub add: Vec<IpNet>,
    #[serde(default)]
    pub remove: Vec<IpNet>,
}

/// A secret that never reaches a log: its `Debug` prints nothing of it.
#[derive(Serialize, Deserialize, Clone, PartialEq, Eq)]
#[serde(transparent)]
pub struct Password(pub String);

impl std::fmt::Debug for Password {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Password(<redacted>)")
    }
}

/// What a request asks for. Internally tagged by `kind`; unknown kinds become
/// [`RequestKind::Unknown`].
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum RequestKind {
    /// Apply this full desired state. The sets named in `kept_sets` are not in
    /// `firewall.sets`: the agent holds them already (the value is the hash its copy must
    /// have) and takes them from the state it holds; a copy with another hash is answered
    /// `base_mismatch`, and the operator sends the sets in full. A rule change of a host
    /// whose sets did not change then costs the rules, not every member of every set.
    Apply {
        revision: u64,
        firewall: HostFirewall,
        #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
        kept_sets: BTreeMap<String, String>,
    },
    /// Patch the sets of the state at `base_revision`, giving `revision`.
    ApplySetDeltas {
        base_revision: u64,
        revision: u64,
        deltas: Vec<SetDelta>,
    },
    /// A set shared by many hosts, sent once (multi-recipient envelope).
    SharedSet { set: IpSet, version: u64 },
    /// A change of a shared set ([`SetChange`]), sent once to the hosts whose copy it was
    /// computed against.
    SharedSetDelta(SetChange),
    /// Report applied revision and live hashes.
    Status,
    /// Return the live rules and sets ([`Detail::Dump`]).
    DumpRules,
    /// Re-apply the last applied state.
    Reapply,
    /// The agent's own broker user (`<prefix>.node.<host>`), provisioned by the operator once
    /// the host was admitted; sent encrypted to the agent's bootstrap queue. The agent keeps
    /// it in its state directory and logs in with it from then on.
    BrokerUser {
        username: String,
        password: Password,
    },
    /// A kind this reader does not know.
    #[serde(other)]
    Unknown,
}

impl RequestKind {
    /// The revision an envelope header carries for this request (`Apply`, `ApplySetDeltas`).
    pub fn revision(&self) -> Option<u64> {
        match self {
            RequestKind::Apply { revision, .. } | RequestKind::ApplySetDeltas { revision, .. } => {
                Some(*revision)
            }
            _ => None,
        }
    }
}

/// One request to one agent (or, for `SharedSet`, to each listed agent).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Request {
    /// Correlates the response. The typed sealer also uses it as the envelope message id, so
    /// an agent can answer even a payload that does not parse.
    pub id: Uuid,
    pub request: RequestKind,
}

/// Everything the operator sends.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum OperatorMessage {
    Request(Request),
}
