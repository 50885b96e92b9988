//! The agent's Prometheus metrics. Names and labels are a contract (docs/operations.md).

use crate::core::live::LiveState;
use dog_protocol::envelope::Rejection;
use prometheus::{
    Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
};

/// Every metric the agent exports, registered in [`AgentMetrics::registry`].
#[derive(Clone)]
pub struct AgentMetrics {
    pub registry: Registry,
    /// `result` = `applied` | `failed`.
    pub applies: IntCounterVec,
    pub apply_duration: Histogram,
    pub drift_repairs: IntCounter,
    pub drift_checks: IntCounterVec,
    pub last_applied_revision: IntGauge,
    /// `family` = `ipv4` | `ipv6`.
    pub rules_installed: IntGaugeVec,
    pub set_entries_installed: IntGauge,
    /// 1 for the way the agent reaches the kernel's sets (`backend` = `netlink` | `cli`).
    pub set_backend: IntGaugeVec,
    /// `reason` = [`Rejection::reason`] (and `malformed` for payloads that do not parse).
    pub rejected: IntCounterVec,
    pub broker_connected: IntGauge,
    pub broker_failures: IntCounter,
    /// 1 while the agent is logged in as the bootstrap user (waiting for its own).
    pub broker_bootstrap: IntGauge,
    /// `kind` = `heartbeat` | `keepalive` | `response`.
    pub sent: IntCounterVec,
    /// `kind` = request kind (`apply`, `shared_set`, …); `outcome` = `ok` | error kind.
    pub requests: IntCounterVec,
}

fn reg<T: prometheus::core::Collector + Clone + 'static>(r: &Registry, m: T) -> T {
    // Names are fixed and unique; a registration error is a programming error caught by the
    // unit test below, never data from outside.
    if let Err(e) = r.register(Box::new(m.clone())) {
        tracing::error!(error = %e, "metric registration failed");
    }
    m
}

impl AgentMetrics {
    /// Every metric with its name and help text, registered. Long by nature: one declaration
    /// per metric, a list to read rather than logic to follow.
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let r = &registry;
        let m = AgentMetrics {
            applies: reg(
                r,
                IntCounterVec::new(
                    Opts::new(
                        "dog_agent_applies_total",
                        "Apply attempts by result (a failed apply leaves the previous rules in force)",
                    ),
                    &["result"],
                )?,
            ),
            apply_duration: reg(
                r,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "dog_agent_apply_duration_seconds",
                        "Duration of an apply: sets, both rule families and the read-back",
                    )
                    .buckets(vec![
                        0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                    ]),
                )?,
            ),
            drift_repairs: reg(
                r,
                IntCounter::new(
                    "dog_agent_drift_repairs_total",
                    "Times the drift check found dog's chains or sets edited and restored them",
                )?,
            ),
            drift_checks: reg(
                r,
                IntCounterVec::new(
                    Opts::new(
                        "dog_agent_drift_checks_total",
                        "Drift checks by result (clean, drift, error)",
                    ),
                    &["result"],
                )?,
            ),
            last_applied_revision: reg(
                r,
                IntGauge::new(
                    "dog_agent_last_applied_revision",
                    "Revision of the ruleset in force",
                )?,
            ),
            rules_installed: reg(
                r,
                IntGaugeVec::new(
                    Opts::new("dog_agent_rules_installed", "Rules in dog's chains"),
                    &["family"],
                )?,
            ),
            set_entries_installed: reg(
                r,
                IntGauge::new(
                    "dog_agent_set_entries_installed",
                    "Entries across dog's ipsets",
                )?,
            ),
            set_backend: reg(
                r,
                IntGaugeVec::new(
                    Opts::new(
                        "dog_agent_set_backend",
                        "How the agent reaches the kernel's sets, chosen at start: netlink (in process) or cli (the ipset tool); 1 for the one in use",
                    ),
                    &["backend"],
                )?,
            ),
            rejected: reg(
                r,
                IntCounterVec::new(
                    Opts::new(
                        "dog_agent_rejected_messages_total",
                        "Operator messages refused before parsing, by reason",
                    ),
                    &["reason"],
                )?,
            ),
            broker_connected: reg(
                r,
                IntGauge::new(
                    "dog_agent_broker_connected",
                    "1 while the agent is connected to the broker",
                )?,
            ),
            broker_failures: reg(
                r,
                IntCounter::new(
                    "dog_agent_broker_connection_failures_total",
                    "Failed broker connection attempts plus lost connections (logged once per minute while one failure repeats)",
                )?,
            ),
            broker_bootstrap: reg(
                r,
                IntGauge::new(
                    "dog_agent_broker_bootstrap",
                    "1 while the agent is logged in as the bootstrap broker user, waiting for the node's own user from the operator",
                )?,
            ),
            sent: reg(
                r,
                IntCounterVec::new(
                    Opts::new(
                        "dog_agent_messages_sent_total",
                        "Messages confirmed by the broker, by kind",
                    ),
                    &["kind"],
                )?,
            ),
            requests: reg(
                r,
                IntCounterVec::new(
                    Opts::new(
                        "dog_agent_requests_total",
                        "Operator requests answered, by kind and outcome",
                    ),
                    &["kind", "outcome"],
                )?,
            ),
            registry,
        };
        for rej in Rejection::ALL {
            m.rejected.with_label_values(&[rej.reason()]);
        }
        for res in ["applied", "failed"] {
            m.applies.with_label_values(&[res]);
        }
        Ok(m)
    }

    pub fn reject(&self, reason: &str) {
        self.rejected.with_label_values(&[reason]).inc();
    }

    /// Sets the installed-rules and set-entries gauges from a snapshot of the kernel.
    pub fn observe_live(&self, live: &LiveState) {
        let count = |text: &str| {
            dog_protocol::ruleset::owned_lines(text)
                .iter()
                .filter(|l| l.starts_with("-A DOG-"))
                .count() as i64
        };
        self.rules_installed
            .with_label_values(&["ipv4"])
            .set(count(&live.rules.v4));
        self.rules_installed
            .with_label_values(&["ipv6"])
            .set(count(&live.rules.v6));
        self.set_entries_installed.set(
            live.sets
                .values()
                .map(|s| s.content.members.len() as i64)
                .sum(),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus::Encoder;

    #[test]
    fn all_metrics_register_and_render_with_contract_names() {
        let m = AgentMetrics::new().unwrap();
        m.reject("replayed");
        m.rules_installed.with_label_values(&["ipv4"]).set(3);
        let mut buf = Vec::new();
        prometheus::TextEncoder::new()
            .encode(&m.registry.gather(), &mut buf)
            .unwrap();
        let text = String::from_utf8(buf).unwrap();
        for name in [
            "dog_agent_applies_total{result=\"applied\"} 0",
            "dog_agent_apply_duration_seconds_count 0",
            "dog_agent_drift_repairs_total 0",
            "dog_agent_last_applied_revision 0",
            "dog_agent_rules_installed{family=\"ipv4\"} 3",
            "dog_agent_set_entries_installed 0",
            "dog_agent_rejected_messages_total{reason=\"replayed\"} 1",
            "dog_agent_rejected_messages_total{reason=\"bad_signature\"} 0",
            "dog_agent_broker_connected 0",
        ] {
            assert!(text.contains(name), "missing {name} in\n{text}");
        }
    }
}

#[cfg(test)]
mod docs_tests {
    use super::*;

    /// docs/operations.md is the metrics contract: every metric the agent registers is
    /// documented there.
    #[test]
    fn every_metric_is_documented() {
        let docs = include_str!("../../docs/operations.md");
        let m = AgentMetrics::new().unwrap();
        // a labelled metric is only gathered once it has a series
        m.set_backend.with_label_values(&["netlink"]).set(1);
        for family in m.registry.gather() {
            assert!(
                docs.contains(&format!("`{}`", family.name())),
                "{} is not in docs/operations.md",
                family.name()
            );
        }
    }
}
