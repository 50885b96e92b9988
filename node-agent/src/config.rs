//! The agent's configuration: every flag is also settable by an environment variable.

use crate::kernel::{BackendChoice, SetBackendChoice};
use clap::Parser;
use dog_protocol::broker::BrokerArgs;
pub use dog_protocol::messages::Mode;
use dog_protocol::telemetry::LogFormat;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// dog-agent: applies the firewall the dog operator sends to this node, keeps it in place,
/// repairs drift and reports.
#[derive(Parser, Debug, Clone)]
#[command(name = "dog-agent", version)]
pub struct Config {
    /// This host's name (the Host object and queue name). In a DaemonSet, NODE_NAME from the
    /// downward API; defaults to the kernel hostname.
    #[arg(long, env = "NODE_NAME")]
    pub hostname: Option<String>,

    /// Broker connection (the agent's own credentials and vhost in the URL).
    #[command(flatten)]
    pub broker: BrokerArgs,

    /// File with the operator's Ed25519 public key(s), one `key-id base64` per line (two lines
    /// during a key rotation).
    #[arg(
        long,
        env = "DOG_OPERATOR_PUBLIC_KEYS",
        default_value = "/etc/dog/operator.pub"
    )]
    pub operator_public_keys: PathBuf,
    /// The operator's sender name in message headers.
    #[arg(long, env = "DOG_OPERATOR_NAME", default_value = "dog-operator")]
    pub operator_name: String,

    /// Kubernetes: a projected ServiceAccount token (dog's own audience) that proves to the
    /// operator which node this agent runs on. Read again for every heartbeat (the kubelet
    /// rotates it). Without one, the operator admits this agent only if an administrator
    /// pinned its keys or the operator trusts on first use.
    #[arg(long, env = "DOG_IDENTITY_TOKEN_FILE")]
    pub identity_token_file: Option<PathBuf>,

    /// The broker user of `--broker-url` is the shared bootstrap user: ask the operator for
    /// this node's own broker user (sent encrypted once the host is admitted), keep it in the
    /// state directory and log in with it from then on. Falls back to the bootstrap user when
    /// the broker refuses the saved one.
    #[arg(long, env = "DOG_BROKER_BOOTSTRAP")]
    pub broker_bootstrap: bool,

    /// Print this agent's public keys as the `spec.keys` of its Host (creating the keys in the
    /// state directory if there are none yet) and exit: how an administrator pre-pins a VM.
    #[arg(long, env = "DOG_PRINT_KEYS")]
    pub print_keys: bool,

    /// Print the iptables backend this agent uses on this node (`nft` or `legacy`: detected
    /// like kube-proxy does, unless `--iptables-backend` fixes it) and exit. The image's
    /// `iptables`, `ip6tables` and their -save/-restore run that backend through it.
    #[arg(long, env = "DOG_PRINT_BACKEND")]
    pub print_backend: bool,

    /// Directory for the agent's keys and last applied state.
    #[arg(long, env = "DOG_STATE_DIR", default_value = "/var/lib/dog-agent")]
    pub state_dir: PathBuf,

    #[arg(long, env = "DOG_MODE", value_enum, default_value = "enforce")]
    pub mode: Mode,
    #[arg(long, env = "DOG_IPTABLES_BACKEND", value_enum, default_value = "auto")]
    pub iptables_backend: BackendChoice,
    /// How the agent reaches the kernel's sets: `netlink` (in process), `cli` (the `ipset`
    /// tool), or `auto` (netlink when the kernel answers on it). The choice is logged at start
    /// and exported as `dog_agent_set_backend`.
    #[arg(long, env = "DOG_SET_BACKEND", value_enum, default_value = "auto")]
    pub set_backend: SetBackendChoice,

    /// Seconds between keepalives.
    #[arg(long, env = "DOG_KEEPALIVE_INTERVAL", default_value = "30", value_parser = parse_secs)]
    pub keepalive_interval: Duration,
    /// Seconds between drift checks (read back dog's chains and sets, repair differences).
    #[arg(long, env = "DOG_DRIFT_INTERVAL", default_value = "60", value_parser = parse_secs)]
    pub drift_interval: Duration,
    /// Seconds between interface/address scans (a change is reported at once).
    #[arg(long, env = "DOG_ADDRESS_INTERVAL", default_value = "10", value_parser = parse_secs)]
    pub address_interval: Duration,

    /// Address of the /metrics, /healthz and /readyz endpoint.
    #[arg(long, env = "DOG_METRICS_ADDR", default_value = "[::]:10291")]
    pub metrics_addr: SocketAddr,
    #[arg(long, env = "DOG_LOG_FORMAT", value_enum, default_value = "auto")]
    pub log_format: LogFormat,
    /// Log filter: a level (`error`, `warn`, `info`, `debug`, `trace`) or directives such as
    /// `info,dog_agent=debug`. `RUST_LOG`, when set, wins.
    #[arg(long, env = "DOG_LOG_LEVEL", default_value = "info")]
    pub log_level: String,

    /// Run the kernel tools inside this network namespace (tests and the demo: one agent
    /// process per fake node). The broker connection stays in the agent's own namespace.
    #[arg(long, env = "DOG_NETNS", hide = true)]
    pub netns: Option<String>,
}

/// Seconds or a human duration (`30s`, `5m`), 10 ms to 7 days.
fn parse_secs(s: &str) -> Result<Duration, String> {
    dog_protocol::duration::parse(s, Duration::from_millis(10), Duration::from_secs(7 * 86400))
}

impl Config {
    /// How the kernel layer runs the tools: namespace, backend, the broker port to keep open.
    pub fn kernel_config(&self) -> crate::kernel::KernelConfig {
        crate::kernel::KernelConfig {
            netns: self.netns.clone(),
            backend: self.iptables_backend,
            sets: self.set_backend,
            broker_port: Some(self.broker.port()),
            lock_wait_secs: 5,
        }
    }

    /// The configured hostname or the kernel's.
    pub fn resolved_hostname(&self) -> std::io::Result<String> {
        if let Some(h) = &self.hostname {
            return Ok(h.clone());
        }
        let h = std::fs::read_to_string("/proc/sys/kernel/hostname")?;
        Ok(h.trim().to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(args: &[&str]) -> Config {
        let mut v = vec!["dog-agent"];
        v.extend_from_slice(args);
        Config::try_parse_from(v).unwrap()
    }

    #[test]
    fn broker_port_comes_from_the_url() {
        assert_eq!(cfg(&[]).broker.port(), 5672);
        assert_eq!(
            cfg(&["--broker-url", "amqps://u:p@mq.example:5999/v"])
                .broker
                .port(),
            5999
        );
        assert_eq!(
            cfg(&["--broker-url", "amqps://mq.example/v"]).broker.port(),
            5671
        );
        assert_eq!(
            cfg(&["--broker-url", "amqp://[::1]:5673/"]).broker.port(),
            5673
        );
    }

    #[test]
    fn intervals_parse_and_bad_values_are_refused() {
        assert_eq!(
            cfg(&["--drift-interval", "2.5"]).drift_interval,
            Duration::from_millis(2500)
        );
        assert_eq!(
            cfg(&["--keepalive-interval", "2m"]).keepalive_interval,
            Duration::from_secs(120)
        );
        let err = Config::try_parse_from(["dog-agent", "--keepalive-interval", "x"]).unwrap_err();
        assert!(err.to_string().contains("is not a duration"), "{err}");
    }
}
