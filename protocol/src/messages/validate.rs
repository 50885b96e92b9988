//! Validation of every message against the limits, before it is sealed or after it is opened

use super::*;

pub(super) fn check_hashes(prefix: &str, h: &Option<FirewallHashes>) -> Result<(), LimitError> {
    if let Some(h) = h {
        for (name, v) in [
            ("ipv4_rules", &h.ipv4_rules),
            ("ipv6_rules", &h.ipv6_rules),
            ("sets", &h.sets),
        ] {
            check(|| format!("{prefix}.{name}"), v.len(), limits::SHORT_TEXT)?;
        }
    }
    Ok(())
}

pub(super) fn check_set(prefix: &str, set: &IpSet) -> Result<(), LimitError> {
    check(|| format!("{prefix}.name"), set.name.len(), SET_NAME_MAX)?;
    check(
        || format!("{prefix}.members"),
        set.members.len(),
        limits::SET_MEMBERS,
    )
}

impl Heartbeat {
    pub fn validate(&self) -> Result<(), LimitError> {
        check(
            || "agent_version".into(),
            self.agent_version.len(),
            limits::AGENT_VERSION,
        )?;
        check(|| "hostname".into(), self.hostname.len(), limits::HOSTNAME)?;
        check(
            || "identity_token".into(),
            self.identity_token.as_ref().map_or(0, String::len),
            limits::IDENTITY_TOKEN,
        )?;
        // an AMQP short string; whether it is a broker-generated name the operator checks
        check(
            || "broker_reply_to".into(),
            self.broker_reply_to.as_ref().map_or(0, String::len),
            255,
        )?;
        check(
            || "interfaces".into(),
            self.interfaces.len(),
            limits::INTERFACES,
        )?;
        for (i, iface) in self.interfaces.iter().enumerate() {
            check(
                || format!("interfaces[{i}].name"),
                iface.name.len(),
                limits::INTERFACE_NAME,
            )?;
            check(
                || format!("interfaces[{i}].addresses"),
                iface.addresses.len(),
                limits::ADDRESSES_PER_INTERFACE,
            )?;
        }
        check_hashes("live_hashes", &self.live_hashes)?;
        check(
            || "drift.drifted".into(),
            self.drift.drifted.len(),
            limits::DRIFT_ITEMS,
        )?;
        for (i, d) in self.drift.drifted.iter().enumerate() {
            check(
                || format!("drift.drifted[{i}]"),
                d.len(),
                limits::SHORT_TEXT,
            )?;
        }
        Ok(())
    }
}

impl Keepalive {
    pub fn validate(&self) -> Result<(), LimitError> {
        check_hashes("live_hashes", &self.live_hashes)?;
        check(|| "drift".into(), self.drift.len(), limits::DRIFT_ITEMS)?;
        for (i, d) in self.drift.iter().enumerate() {
            for (name, v) in [
                ("part", &d.part),
                ("expected_hash", &d.expected_hash),
                ("found_hash", &d.found_hash),
            ] {
                check(|| format!("drift[{i}].{name}"), v.len(), limits::SHORT_TEXT)?;
            }
        }
        Ok(())
    }
}

impl Response {
    pub fn validate(&self) -> Result<(), LimitError> {
        match &self.result {
            Outcome::Ok {
                hashes,
                timings_ms,
                detail,
                ..
            } => {
                check_hashes("result.hashes", hashes)?;
                check(
                    || "result.timings_ms".into(),
                    timings_ms.len(),
                    limits::TIMINGS,
                )?;
                for name in timings_ms.keys() {
                    check(
                        || format!("result.timings_ms[{name:.32}]"),
                        name.len(),
                        limits::SHORT_TEXT,
                    )?;
                }
                match detail {
                    Some(Detail::Dump {
                        ipv4_save,
                        ipv6_save,
                        ipset_save,
                    }) => {
                        for (name, v) in [
                            ("ipv4_save", ipv4_save),
                            ("ipv6_save", ipv6_save),
                            ("ipset_save", ipset_save),
                        ] {
                            check(
                                || format!("result.detail.{name}"),
                                v.len(),
                                limits::DOCUMENT_TEXT,
                            )?;
                        }
                    }
                    Some(Detail::Text { text }) => check(
                        || "result.detail.text".into(),
                        text.len(),
                        limits::MESSAGE_TEXT,
                    )?,
                    None => {}
                }
                Ok(())
            }
            Outcome::Error { message, .. } => check(
                || "result.message".into(),
                message.len(),
                limits::MESSAGE_TEXT,
            ),
        }
    }
}

impl AgentMessage {
    pub fn validate(&self) -> Result<(), LimitError> {
        match self {
            AgentMessage::Heartbeat(h) => h.validate(),
            AgentMessage::Keepalive(k) => k.validate(),
            AgentMessage::Response(r) => r.validate(),
        }
    }
}

impl Request {
    pub fn validate(&self) -> Result<(), LimitError> {
        match &self.request {
            RequestKind::Apply {
                firewall,
                kept_sets,
                ..
            } => {
                check(
                    || "request.firewall.host".into(),
                    firewall.host.len(),
                    limits::HOSTNAME,
                )?;
                check(
                    || "request.firewall.ipv4.text".into(),
                    firewall.ipv4.text.len(),
                    limits::DOCUMENT_TEXT,
                )?;
                check(
                    || "request.firewall.ipv6.text".into(),
                    firewall.ipv6.text.len(),
                    limits::DOCUMENT_TEXT,
                )?;
                check(
                    || "request.firewall.sets".into(),
                    firewall.sets.len(),
                    limits::SETS,
                )?;
                check(|| "request.kept_sets".into(), kept_sets.len(), limits::SETS)?;
                for name in kept_sets.keys() {
                    check(|| "request.kept_sets".into(), name.len(), SET_NAME_MAX)?;
                }
                for (name, set) in &firewall.sets {
                    let prefix = format!("request.firewall.sets[{name:.32}]");
                    check(|| prefix.clone(), name.len(), SET_NAME_MAX)?;
                    check_set(&prefix, set)?;
                }
                Ok(())
            }
            RequestKind::ApplySetDeltas { deltas, .. } => {
                check(|| "request.deltas".into(), deltas.len(), limits::DELTAS)?;
                for (i, d) in deltas.iter().enumerate() {
                    check(
                        || format!("request.deltas[{i}].name"),
                        d.name.len(),
                        SET_NAME_MAX,
                    )?;
                    check(
                        || format!("request.deltas[{i}].add"),
                        d.add.len(),
                        limits::SET_MEMBERS,
                    )?;
                    check(
                        || format!("request.deltas[{i}].remove"),
                        d.remove.len(),
                        limits::SET_MEMBERS,
                    )?;
                }
                Ok(())
            }
            RequestKind::SharedSet { set, .. } => check_set("request.set", set),
            RequestKind::SharedSetDelta(SetChange {
                name,
                base_hash,
                hash,
                add,
                remove,
                ..
            }) => {
                check(|| "request.name".into(), name.len(), SET_NAME_MAX)?;
                check(
                    || "request.base_hash".into(),
                    base_hash.len(),
                    limits::SHORT_TEXT,
                )?;
                check(|| "request.hash".into(), hash.len(), limits::SHORT_TEXT)?;
                check(|| "request.add".into(), add.len(), limits::SET_MEMBERS)?;
                check(
                    || "request.remove".into(),
                    remove.len(),
                    limits::SET_MEMBERS,
                )
            }
            RequestKind::BrokerUser { username, password } => {
                check(|| "request.username".into(), username.len(), 255)?;
                check(|| "request.password".into(), password.0.len(), 255)
            }
            RequestKind::Status
            | RequestKind::DumpRules
            | RequestKind::Reapply
            | RequestKind::Unknown => Ok(()),
        }
    }
}

impl OperatorMessage {
    pub fn validate(&self) -> Result<(), LimitError> {
        match self {
            OperatorMessage::Request(r) => r.validate(),
        }
    }
}
