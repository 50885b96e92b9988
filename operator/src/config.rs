//! `dog-operator run` configuration: every flag is also settable by an environment variable.

use clap::Args;
use dog_protocol::broker::BrokerArgs;
use dog_protocol::ruleset::{Failsafe, FailsafePort, FailsafeProtocol};
use dog_protocol::telemetry::LogFormat;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Args, Debug, Clone)]
pub struct RunArgs {
    /// Run on YAML files in this directory instead of the Kubernetes API (VM fleets, the demo).
    /// The directory is watched for changes; status is written to `--status-file`.
    #[arg(long, env = "DOG_FROM_DIR")]
    pub from_dir: Option<PathBuf>,
    /// Status file for --from-dir mode (default: `.dog-status.yaml` inside the directory; dot
    /// files are not read as resources).
    #[arg(long, env = "DOG_STATUS_FILE")]
    pub status_file: Option<PathBuf>,

    #[command(flatten)]
    pub broker: BrokerArgs,

    /// The operator's Ed25519 signing key (see `dog-operator keygen`).
    #[arg(long, env = "DOG_SIGNING_KEY", default_value = "/etc/dog/operator.key")]
    pub signing_key: PathBuf,
    /// The operator's sender name in message headers (agents check it).
    #[arg(long, env = "DOG_OPERATOR_NAME", default_value = "dog-operator")]
    pub operator_name: String,

    /// Keepalive interval the agents use, in seconds.
    #[arg(long, env = "DOG_KEEPALIVE_INTERVAL", default_value = "30", value_parser = parse_secs)]
    pub keepalive_interval: Duration,
    /// Silence after which a host becomes Inactive (default 3 × keepalive interval).
    #[arg(long, env = "DOG_INACTIVE_AFTER", value_parser = parse_secs)]
    pub inactive_after: Option<Duration>,
    /// Silence after which a host becomes Retired.
    #[arg(long, env = "DOG_RETIRE_AFTER", default_value = "86400", value_parser = parse_secs)]
    pub retire_after: Duration,
    /// Freeze lifecycle transitions when no agent at all was heard for this many keepalive
    /// intervals (the operator's own connectivity is the likelier fault).
    #[arg(long, env = "DOG_SAFETY_VALVE_INTERVALS", default_value = "3")]
    pub safety_valve_intervals: u32,
    /// Seconds an expected-vs-reported hash mismatch may last before the full state is resent.
    #[arg(long, env = "DOG_RESYNC_AFTER", default_value = "10", value_parser = parse_secs)]
    pub resync_after: Duration,
    /// A Retired host from which nothing was heard for this long (seconds; default 7 days) is
    /// deleted, with an Event. 0 keeps Retired hosts forever.
    #[arg(long, env = "DOG_RETIRED_RETENTION", default_value = "604800", value_parser = parse_secs)]
    pub retired_retention: Duration,
    /// How often a live host's `status.lastKeepalive` is rewritten, in seconds. Liveness is
    /// kept in memory; the status is written when something a user can see changes, and the
    /// keepalive stamp at most this often (the Node-heartbeat/Lease split of Kubernetes).
    #[arg(long, env = "DOG_LIVENESS_WRITE_INTERVAL", default_value = "300", value_parser = parse_secs)]
    pub liveness_write_interval: Duration,
    /// Changes arriving within this window are compiled and published together.
    #[arg(long, env = "DOG_DEBOUNCE", default_value = "0.2", value_parser = parse_secs)]
    pub debounce: Duration,

    /// Inbound failsafe ports, e.g. `tcp:22,tcp:6443,tcp:2379-2380,udp:68`.
    #[arg(long, env = "DOG_FAILSAFE_INBOUND", default_value = "tcp:22,tcp:6443,tcp:10250,tcp:2379-2380,udp:68", value_parser = parse_ports)]
    pub failsafe_inbound: PortList,
    /// Outbound failsafe ports (DNS, DHCP, API server, etcd, the broker).
    #[arg(long, env = "DOG_FAILSAFE_OUTBOUND", default_value = "udp:53,tcp:53,udp:67,tcp:6443,tcp:2379-2380,tcp:5671,tcp:5672", value_parser = parse_ports)]
    pub failsafe_outbound: PortList,

    /// Namespace of the leader-election Lease (Kubernetes mode).
    #[arg(long, env = "POD_NAMESPACE", default_value = "dog-system")]
    pub namespace: String,
    /// This replica's identity in the Lease.
    #[arg(long, env = "POD_NAME")]
    pub pod_name: Option<String>,

    #[arg(long, env = "DOG_METRICS_ADDR", default_value = "[::]:9090")]
    pub metrics_addr: SocketAddr,
    #[arg(long, env = "DOG_LOG_FORMAT", value_enum, default_value = "auto")]
    pub log_format: LogFormat,
}

/// A parsed failsafe port list.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortList(pub Vec<FailsafePort>);

impl RunArgs {
    pub fn failsafe(&self) -> Failsafe {
        Failsafe {
            inbound: self.failsafe_inbound.0.clone(),
            outbound: self.failsafe_outbound.0.clone(),
        }
    }
    pub fn inactive_after(&self) -> Duration {
        self.inactive_after.unwrap_or(self.keepalive_interval * 3)
    }
}

pub fn parse_secs(s: &str) -> Result<Duration, String> {
    let v: f64 = s
        .parse()
        .map_err(|e| format!("`{s}` is not a number of seconds: {e}"))?;
    if !(0.0..=86400.0 * 365.0).contains(&v) {
        return Err(format!("`{s}` seconds is out of range"));
    }
    Ok(Duration::from_secs_f64(v))
}

pub fn parse_ports(s: &str) -> Result<PortList, String> {
    let mut out = Vec::new();
    for item in s.split(',').map(str::trim).filter(|i| !i.is_empty()) {
        let (proto, ports) = item
            .split_once(':')
            .ok_or_else(|| format!("`{item}`: expected PROTOCOL:PORT or PROTOCOL:FROM-TO"))?;
        let protocol = match proto {
            "tcp" => FailsafeProtocol::Tcp,
            "udp" => FailsafeProtocol::Udp,
            other => return Err(format!("`{item}`: protocol `{other}` is not tcp or udp")),
        };
        let port = |p: &str| -> Result<u16, String> {
            match p.parse::<u16>() {
                Ok(n) if n > 0 => Ok(n),
                _ => Err(format!("`{item}`: `{p}` is not a port 1-65535")),
            }
        };
        let (from, to) = match ports.split_once('-') {
            Some((a, b)) => (port(a)?, port(b)?),
            None => (port(ports)?, port(ports)?),
        };
        if from > to {
            return Err(format!("`{item}`: range start is above its end"));
        }
        out.push(FailsafePort { protocol, from, to });
    }
    Ok(PortList(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_failsafe_flags_equal_the_spec_defaults() {
        #[derive(clap::Parser)]
        struct T {
            #[command(flatten)]
            run: RunArgs,
        }
        let t = <T as clap::Parser>::try_parse_from(["x"]).unwrap();
        assert_eq!(t.run.failsafe(), Failsafe::default());
        assert_eq!(t.run.inactive_after(), Duration::from_secs(90));
    }

    #[test]
    fn bad_port_lists_name_the_item() {
        assert!(parse_ports("tcp:0").unwrap_err().contains("tcp:0"));
        assert!(parse_ports("icmp:8").unwrap_err().contains("icmp"));
        assert!(parse_ports("tcp:9-2").unwrap_err().contains("range"));
        assert_eq!(
            parse_ports("udp:1-2").unwrap().0,
            vec![FailsafePort::range(FailsafeProtocol::Udp, 1, 2)]
        );
    }
}
