//! The operator's Prometheus metrics (names documented in docs/operations.md).

use prometheus::{
    Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
};

#[derive(Clone)]
pub struct OperatorMetrics {
    pub registry: Registry,
    pub reconciles: IntCounterVec,
    pub compile_duration: Histogram,
    pub publishes: IntCounter,
    /// `kind` = `apply` | `shared_set`.
    pub published_bytes: IntCounterVec,
    pub publish_failures: IntCounter,
    pub confirm_latency: Histogram,
    pub hosts: IntGaugeVec,
    pub hosts_drifted: IntGauge,
    pub rejected: IntCounterVec,
    /// `kind` = `heartbeat` | `keepalive` | `response`.
    pub agent_messages: IntCounterVec,
    pub hosts_registered: IntCounterVec,
    /// `result` = `ok` | `not_configured` | `management_api` | `publish`.
    pub broker_users: IntCounterVec,
    pub safety_valve_frozen: IntGauge,
    pub leader: IntGauge,
    pub apply_failures: IntCounter,
    pub broker_connected: IntGauge,
    pub broker_failures: IntCounter,
    pub inbox_messages: IntGauge,
    pub build_info: IntGaugeVec,
}

impl OperatorMetrics {
    /// Every metric with its name and help text, registered. Long by nature: one declaration
    /// per metric, a list to read rather than logic to follow.
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let m = OperatorMetrics {
            reconciles: IntCounterVec::new(
                Opts::new("dog_operator_reconciles_total", "Reconcile passes (compile, publish, status) by result"),
                &["result"],
            )?,
            compile_duration: Histogram::with_opts(
                HistogramOpts::new("dog_operator_compile_duration_seconds", "Time to compile a snapshot").buckets(vec![
                    0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                ]),
            )?,
            publishes: IntCounter::new(
                "dog_operator_publishes_total",
                "Messages published and confirmed by the broker (host applies and shared set updates)",
            )?,
            published_bytes: IntCounterVec::new(
                Opts::new("dog_operator_published_bytes_total", "Bytes of the sealed messages the broker confirmed, by kind (apply, shared_set); the broker copies a shared_set message into each recipient's queue"),
                &["kind"],
            )?,
            publish_failures: IntCounter::new(
                "dog_operator_publish_failures_total",
                "Publishes that could not be sealed or confirmed (retried on the next pass)",
            )?,
            confirm_latency: Histogram::with_opts(
                HistogramOpts::new("dog_operator_confirm_latency_seconds", "Publish to broker confirm").buckets(vec![
                    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0,
                ]),
            )?,
            hosts: IntGaugeVec::new(Opts::new("dog_hosts", "Hosts per lifecycle state"), &["state"])?,
            hosts_drifted: IntGauge::new(
                "dog_hosts_drifted",
                "Hosts whose reported hashes differ from the expected ones",
            )?,
            rejected: IntCounterVec::new(
                Opts::new("dog_operator_rejected_messages_total", "Agent messages refused, by reason"),
                &["reason"],
            )?,
            agent_messages: IntCounterVec::new(
                Opts::new("dog_operator_agent_messages_total", "Agent messages opened (signature and sender checked), by kind (heartbeat, keepalive, response)"),
                &["kind"],
            )?,
            hosts_registered: IntCounterVec::new(
                Opts::new("dog_operator_hosts_registered_total", "Hosts whose agent keys were pinned on a first heartbeat, by how the agent was admitted (service_account, broker_user, first_use)"),
                &["how"],
            )?,
            broker_users: IntCounterVec::new(
                Opts::new("dog_operator_broker_users_provisioned_total", "Node broker users asked for by bootstrap agents, by result (ok, not_configured, management_api, publish)"),
                &["result"],
            )?,
            safety_valve_frozen: IntGauge::new(
                "dog_operator_safety_valve_frozen",
                "1 while lifecycle transitions are frozen because no agent at all was heard",
            )?,
            leader: IntGauge::new("dog_operator_leader", "1 while this replica is the active one")?,
            apply_failures: IntCounter::new(
                "dog_operator_host_apply_failures_total",
                "Apply failures reported by agents",
            )?,
            broker_connected: IntGauge::new(
                "dog_operator_broker_connected",
                "1 while the operator's broker connection is up (topology declared, consuming)",
            )?,
            broker_failures: IntCounter::new(
                "dog_operator_broker_connection_failures_total",
                "Failed broker connection attempts plus lost connections (logged once per minute while one failure repeats)",
            )?,
            inbox_messages: IntGauge::new(
                "dog_operator_inbox_messages",
                "Agent messages waiting in the operator's inbox queue (read every 5 s; -1 until first read)",
            )?,
            build_info: IntGaugeVec::new(
                Opts::new("dog_operator_build_info", "Always 1; the running version in its labels"),
                &["version"],
            )?,
            registry,
        };
        for c in [
            Box::new(m.reconciles.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(m.compile_duration.clone()),
            Box::new(m.publishes.clone()),
            Box::new(m.published_bytes.clone()),
            Box::new(m.publish_failures.clone()),
            Box::new(m.confirm_latency.clone()),
            Box::new(m.hosts.clone()),
            Box::new(m.hosts_drifted.clone()),
            Box::new(m.rejected.clone()),
            Box::new(m.agent_messages.clone()),
            Box::new(m.hosts_registered.clone()),
            Box::new(m.broker_users.clone()),
            Box::new(m.safety_valve_frozen.clone()),
            Box::new(m.leader.clone()),
            Box::new(m.apply_failures.clone()),
            Box::new(m.broker_connected.clone()),
            Box::new(m.broker_failures.clone()),
            Box::new(m.inbox_messages.clone()),
            Box::new(m.build_info.clone()),
            // process_cpu_seconds_total, process_resident_memory_bytes, process_open_fds, …
            Box::new(prometheus::process_collector::ProcessCollector::for_self()),
        ] {
            m.registry.register(c)?;
        }
        m.build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        m.inbox_messages.set(-1);
        // every reason is exposed from the start, so a rate() alert sees the first rejection
        for r in dog_protocol::envelope::Rejection::ALL {
            m.rejected.with_label_values(&[r.reason()]);
        }
        for r in crate::core::admission::Refusal::REASONS
            .iter()
            .chain(&["rate_limited"])
        {
            m.rejected.with_label_values(&[r]);
        }
        for how in [
            crate::core::admission::Admitted::ServiceAccount,
            crate::core::admission::Admitted::FirstUse,
            crate::core::admission::Admitted::BrokerUser,
        ] {
            m.hosts_registered.with_label_values(&[how.label()]);
        }
        for state in ["New", "Active", "Inactive", "Retired"] {
            m.hosts.with_label_values(&[state]).set(0);
        }
        for result in ["ok", "error"] {
            m.reconciles.with_label_values(&[result]);
        }
        for result in ["ok", "not_configured", "management_api", "publish"] {
            m.broker_users.with_label_values(&[result]);
        }
        for kind in ["apply", "shared_set"] {
            m.published_bytes.with_label_values(&[kind]);
        }
        for kind in ["heartbeat", "keepalive", "response"] {
            m.agent_messages.with_label_values(&[kind]);
        }
        Ok(m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// docs/operations.md is the metrics contract: every metric the operator registers is
    /// documented there.
    #[test]
    fn every_metric_is_documented() {
        let docs = include_str!("../../docs/operations.md");
        let m = OperatorMetrics::new().unwrap();
        m.reconciles.with_label_values(&["ok"]).inc();
        m.rejected.with_label_values(&["expired"]).inc();
        let text = prometheus::TextEncoder::new()
            .encode_to_string(&m.registry.gather())
            .unwrap();
        for needed in [
            "dog_operator_rejected_messages_total{reason=\"key_changed\"} 0",
            "dog_operator_broker_connected 0",
            "dog_operator_published_bytes_total{kind=\"shared_set\"} 0",
            "dog_operator_agent_messages_total{kind=\"keepalive\"} 0",
            "dog_operator_build_info{version=",
            "process_cpu_seconds_total",
        ] {
            assert!(text.contains(needed), "{needed} missing from\n{text}");
        }
        for family in m.registry.gather() {
            if family.name().starts_with("process_") {
                assert!(
                    docs.contains("`process_*`"),
                    "process metrics are not in the docs"
                );
                continue;
            }
            assert!(
                docs.contains(&format!("`{}`", family.name())),
                "{} is not in docs/operations.md",
                family.name()
            );
        }
    }
}
