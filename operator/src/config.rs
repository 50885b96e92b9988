//! `dog-operator run` configuration: every flag is also settable by an environment variable.

use clap::Args;
use dog_protocol::broker::BrokerArgs;
use dog_protocol::ruleset::{ClusterNetwork, Failsafe, FailsafePort, FailsafeProtocol};
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
    /// Publish Applies and requests to classic host queues as transient messages: no journal
    /// file per queue and no disk write per message, at the price that a broker restart loses
    /// those still queued; each host then reconnects with hashes that are not the expected
    /// ones and is sent its full state again (`docs/broker.md`, "Delivery guarantees").
    /// Quorum queues persist every message regardless.
    #[arg(long, env = "DOG_TRANSIENT_HOST_MESSAGES")]
    pub transient_host_messages: bool,

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

    #[command(flatten)]
    pub firewall: FirewallArgs,

    #[command(flatten)]
    pub admission: AdmissionArgs,

    #[command(flatten)]
    pub management: ManagementArgs,

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
    /// Log filter: a level (`error`, `warn`, `info`, `debug`, `trace`) or directives such as
    /// `info,dog_agent=debug`. `RUST_LOG`, when set, wins.
    #[arg(long, env = "DOG_LOG_LEVEL", default_value = "info")]
    pub log_level: String,
}

/// The management flags (`docs/broker.md`, "Per-node users").
#[derive(Args, Debug, Clone, Default)]
pub struct ManagementArgs {
    /// RabbitMQ management API, e.g. `https://dog-operator:<password>@rabbit.example:15671`.
    /// With it the operator provisions each admitted host's own broker user for agents that
    /// start with the bootstrap user (`dog-agent --broker-bootstrap`). The user needs the
    /// `administrator` tag (creating users and setting permissions).
    #[arg(long = "broker-management-url", env = "DOG_BROKER_MANAGEMENT_URL")]
    pub management_url: Option<String>,
    /// A file holding the management password (one line), overriding the URL's.
    #[arg(
        long = "broker-management-password-file",
        env = "DOG_BROKER_MANAGEMENT_PASSWORD_FILE"
    )]
    pub management_password_file: Option<PathBuf>,
}

/// Who may become a host (docs/operations.md, "Admitting agents").
#[derive(Args, Debug, Clone)]
pub struct AdmissionArgs {
    /// Pin the keys of the first heartbeat of a host that has no pin and no identity token
    /// (trust on first use). Off: such an agent is refused until an administrator pins its keys
    /// in `spec.keys` of its Host, or (Kubernetes) it presents its ServiceAccount token.
    #[arg(long, env = "DOG_TRUST_ON_FIRST_USE", action = clap::ArgAction::Set, default_value_t = false, num_args = 0..=1, default_missing_value = "true")]
    pub trust_on_first_use: bool,
    /// No first-use registration of a new host name once this many hosts are known.
    #[arg(long, env = "DOG_MAX_HOSTS", default_value = "10000")]
    pub max_hosts: usize,
    /// First heartbeats of unpinned hosts considered per minute (beyond the burst).
    #[arg(long, env = "DOG_REGISTRATIONS_PER_MINUTE", default_value = "120")]
    pub registrations_per_minute: u32,
    /// First heartbeats of unpinned hosts considered at once.
    #[arg(long, env = "DOG_REGISTRATION_BURST", default_value = "60")]
    pub registration_burst: u32,
    /// Messages one agent key may send at once (beyond, they are dropped and counted as
    /// `rate_limited`).
    #[arg(long, env = "DOG_SENDER_BURST", default_value = "600")]
    pub sender_burst: u32,
    /// Messages one agent key may send per minute beyond the burst.
    #[arg(long, env = "DOG_SENDER_MESSAGES_PER_MINUTE", default_value = "1200")]
    pub sender_messages_per_minute: u32,
    /// Kubernetes mode: the ServiceAccount (`namespace/name`) whose Pod-bound tokens identify
    /// agents (default: `<--namespace>/dog-agent`).
    #[arg(long, env = "DOG_AGENT_SERVICE_ACCOUNT")]
    pub agent_service_account: Option<crate::kube::identity::AgentAccount>,
    /// Kubernetes mode: the audience of the agents' identity tokens.
    #[arg(long, env = "DOG_IDENTITY_AUDIENCE", default_value = "dogfw.io")]
    pub identity_audience: String,
}

impl AdmissionArgs {
    pub fn intake(&self) -> crate::core::intake::IntakePolicy {
        crate::core::intake::IntakePolicy {
            burst: self.sender_burst.max(1),
            per_minute: self.sender_messages_per_minute,
        }
    }

    pub fn policy(&self) -> crate::core::admission::AdmissionPolicy {
        crate::core::admission::AdmissionPolicy {
            trust_on_first_use: self.trust_on_first_use,
            max_hosts: self.max_hosts,
            per_minute: self.registrations_per_minute,
            burst: self.registration_burst.max(1),
        }
    }
}

/// What every host's chains start with: the failsafe ports and the cluster profile. Shared by
/// `run` and `compile`, so a preview shows exactly what is published.
#[derive(Args, Debug, Clone)]
pub struct FirewallArgs {
    /// Inbound failsafe ports, e.g. `tcp:22,tcp:6443,tcp:2379-2380,udp:68`.
    #[arg(long, env = "DOG_FAILSAFE_INBOUND", default_value = "tcp:22,tcp:6443,tcp:10250,tcp:2379-2380,udp:68", value_parser = parse_ports)]
    pub failsafe_inbound: PortList,
    /// Outbound failsafe ports (DNS, DHCP, API server, etcd, the broker).
    #[arg(long, env = "DOG_FAILSAFE_OUTBOUND", default_value = "udp:53,tcp:53,udp:67,tcp:6443,tcp:2379-2380,tcp:5671,tcp:5672", value_parser = parse_ports)]
    pub failsafe_outbound: PortList,

    /// The cluster profile: what a Kubernetes node needs to stay a working node, accepted after
    /// the failsafe ports and before any Profile rule. `none` (VMs), `generic` (the union of
    /// what the common CNIs use), or one CNI: `flannel`, `calico`, `cilium`, `bridge`.
    /// docs/operations.md has the table of what each one opens.
    #[arg(long, env = "DOG_CNI", value_enum, default_value = "none")]
    pub cni: Cni,
    /// Further inbound ports of the cluster profile (same syntax as --failsafe-inbound).
    #[arg(long, env = "DOG_CLUSTER_INBOUND", default_value = "", value_parser = parse_ports)]
    pub cluster_inbound: PortList,
    /// Further outbound ports of the cluster profile.
    #[arg(long, env = "DOG_CLUSTER_OUTBOUND", default_value = "", value_parser = parse_ports)]
    pub cluster_outbound: PortList,
    /// Interfaces of the node's own pods (comma-separated, `+` is a wildcard); default: the
    /// CNI's (`cni0`, `cali+`, `lxc+`, …).
    #[arg(long, env = "DOG_POD_INTERFACES", value_delimiter = ',')]
    pub pod_interfaces: Option<Vec<String>>,
    /// The NodePort range kube-proxy serves (`30000-32767`; empty for none). Only with a CNI.
    #[arg(long, env = "DOG_NODE_PORTS", default_value = "30000-32767")]
    pub node_ports: String,
    /// The agents' metrics port, kept open for Prometheus (0 for none). Only with a CNI.
    #[arg(long, env = "DOG_AGENT_METRICS_PORT", default_value = "10291")]
    pub agent_metrics_port: u16,
    /// Ranges (comma-separated CIDRs) within which every agent's reported addresses are
    /// believed. Empty (the default): a reported address counts only inside its Host's or
    /// Groups' `spec.trustReportedAddresses`; `spec.addresses` (and a Node's) always count.
    #[arg(long, env = "DOG_TRUST_REPORTED_ADDRESSES", default_value = "", value_parser = parse_nets)]
    pub trust_reported_addresses: NetList,
}

/// A parsed list of CIDRs.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct NetList(pub Vec<ipnet::IpNet>);

fn parse_nets(s: &str) -> Result<NetList, String> {
    s.split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(|t| {
            let n: ipnet::IpNet = t.parse().map_err(|e| format!("`{t}` is not a CIDR: {e}"))?;
            if n.trunc() != n {
                return Err(format!(
                    "`{t}` has host bits set (did you mean {}?)",
                    n.trunc()
                ));
            }
            Ok(n)
        })
        .collect::<Result<Vec<_>, _>>()
        .map(NetList)
}

/// A parsed failsafe port list.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortList(pub Vec<FailsafePort>);

/// A CNI preset of the cluster profile.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cni {
    None,
    Generic,
    Flannel,
    Calico,
    Cilium,
    Bridge,
}

impl Cni {
    /// (inbound and outbound node-to-node ports, pod interfaces) of the preset.
    fn preset(self) -> (&'static str, &'static [&'static str]) {
        match self {
            Cni::None => ("", &[]),
            // VXLAN (Linux and IANA ports), Geneve, WireGuard, BGP, Typha, Cilium health
            Cni::Generic => (
                "udp:8472,udp:4789,udp:6081,udp:51820,udp:51821,udp:51871,tcp:179,tcp:5473,tcp:4240",
                &["cni0", "cali+", "lxc+", "veth+"],
            ),
            Cni::Flannel => ("udp:8472,udp:51820,udp:51821", &["cni0"]),
            Cni::Calico => ("udp:4789,udp:51820,udp:51821,tcp:179,tcp:5473", &["cali+"]),
            Cni::Cilium => ("udp:8472,udp:6081,udp:51871,tcp:4240", &["lxc+"]),
            Cni::Bridge => ("", &["cni0"]),
        }
    }
}

impl RunArgs {
    pub fn failsafe(&self) -> Failsafe {
        self.firewall.failsafe()
    }
    pub fn compile_options(&self) -> crate::core::compile::CompileOptions {
        self.firewall.compile_options()
    }
    pub fn inactive_after(&self) -> Duration {
        self.inactive_after.unwrap_or(self.keepalive_interval * 3)
    }
}

impl FirewallArgs {
    /// What the compiler needs of these flags (shared by `run`, `compile` and `explain`).
    pub fn compile_options(&self) -> crate::core::compile::CompileOptions {
        crate::core::compile::CompileOptions {
            failsafe: self.failsafe(),
            trust_reported_addresses: self.trust_reported_addresses.0.clone(),
        }
    }

    pub fn failsafe(&self) -> Failsafe {
        Failsafe {
            inbound: self.failsafe_inbound.0.clone(),
            outbound: self.failsafe_outbound.0.clone(),
            cluster: self.cluster().unwrap_or_default(),
        }
    }

    /// The cluster profile these flags describe (see [`Cni`]).
    pub fn cluster(&self) -> Result<ClusterNetwork, String> {
        let (ports, interfaces) = self.cni.preset();
        let node_ports = |proto: &str| -> Result<Vec<FailsafePort>, String> {
            if self.node_ports.trim().is_empty() {
                return Ok(Vec::new());
            }
            parse_ports(&format!("{proto}:{}", self.node_ports.trim()))
                .map(|p| p.0)
                .map_err(|e| format!("--node-ports: {e}"))
        };
        let mut inbound = parse_ports(ports)?.0;
        let mut outbound = inbound.clone();
        if self.cni != Cni::None {
            // kube-proxy's health check (load balancers probe it)
            inbound.push(FailsafePort::one(FailsafeProtocol::Tcp, 10256));
            inbound.extend(node_ports("tcp")?);
            inbound.extend(node_ports("udp")?);
            if self.agent_metrics_port != 0 {
                inbound.push(FailsafePort::one(
                    FailsafeProtocol::Tcp,
                    self.agent_metrics_port,
                ));
            }
        }
        inbound.extend(self.cluster_inbound.0.iter().copied());
        outbound.extend(self.cluster_outbound.0.iter().copied());
        let pod_interfaces: Vec<String> = match &self.pod_interfaces {
            Some(list) => list
                .iter()
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
                .collect(),
            None => interfaces.iter().map(|s| s.to_string()).collect(),
        };
        for i in &pod_interfaces {
            if !crate::core::compile::validate::is_interface_name(i) {
                return Err(format!(
                    "--pod-interfaces: `{i}` is not a Linux interface name"
                ));
            }
        }
        Ok(ClusterNetwork {
            inbound,
            outbound,
            pod_interfaces,
            services: self.cni != Cni::None,
        })
    }

    /// Refuses a configuration that would cut the agents off: the broker port (of the
    /// operator's own broker URL, which the agents share) must be open outbound to any address.
    pub fn check_lockout(&self, broker_port: u16) -> Result<(), String> {
        self.cluster()?;
        if !self.failsafe().keeps_broker_open(broker_port) {
            return Err(format!(
                "--failsafe-outbound (DOG_FAILSAFE_OUTBOUND) does not keep tcp port {broker_port} (the broker) open to every address: every agent would refuse every firewall, and a Profile whose outbound default is DROP would cut the agents off"
            ));
        }
        Ok(())
    }
}

/// Seconds or a human duration (`30s`, `5m`, `7d`), up to a year.
pub fn parse_secs(s: &str) -> Result<Duration, String> {
    dog_protocol::duration::parse(s, Duration::ZERO, Duration::from_secs(365 * 86400))
}

pub fn parse_ports(s: &str) -> Result<PortList, String> {
    let mut out = Vec::new();
    for item in s.split(',').map(str::trim).filter(|i| !i.is_empty()) {
        let (spec, net) = match item.split_once('@') {
            Some((spec, net)) => {
                let n: ipnet::IpNet = net.parse().map_err(|e| {
                    format!("`{item}`: `{net}` is not a network (e.g. 10.0.0.0/8): {e}")
                })?;
                if n.trunc() != n {
                    return Err(format!(
                        "`{item}`: `{net}` has host bits set (did you mean {}?)",
                        n.trunc()
                    ));
                }
                (spec, Some(n))
            }
            None => (item, None),
        };
        let (proto, ports) = spec
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
        let port = FailsafePort::range(protocol, from, to);
        out.push(match net {
            Some(n) => port.from_net(n),
            None => port,
        });
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

    fn parse(args: &[&str]) -> FirewallArgs {
        #[derive(clap::Parser)]
        struct T {
            #[command(flatten)]
            run: RunArgs,
        }
        let mut v = vec!["x"];
        v.extend_from_slice(args);
        <T as clap::Parser>::try_parse_from(v).unwrap().run.firewall
    }

    #[test]
    fn the_cluster_profile_follows_the_cni_and_the_flags() {
        assert!(parse(&[]).failsafe().cluster.is_empty(), "none by default");
        let flannel = parse(&["--cni", "flannel"]).cluster().unwrap();
        let has = |list: &[FailsafePort], proto, port| {
            list.iter()
                .any(|p| p.protocol == proto && p.from <= port && port <= p.to)
        };
        use FailsafeProtocol::{Tcp, Udp};
        assert!(has(&flannel.inbound, Udp, 8472) && has(&flannel.outbound, Udp, 8472));
        assert!(has(&flannel.inbound, Tcp, 10256), "kube-proxy health");
        assert!(has(&flannel.inbound, Tcp, 31000) && has(&flannel.inbound, Udp, 31000));
        assert!(has(&flannel.inbound, Tcp, 10291), "agent metrics");
        assert_eq!(flannel.pod_interfaces, ["cni0"]);
        assert!(flannel.services);
        let custom = parse(&[
            "--cni",
            "calico",
            "--node-ports",
            "",
            "--agent-metrics-port",
            "0",
            "--pod-interfaces",
            "pod0,veth+",
            "--cluster-inbound",
            "tcp:9100@10.0.0.0/8",
        ])
        .cluster()
        .unwrap();
        assert!(!has(&custom.inbound, Tcp, 31000) && !has(&custom.inbound, Tcp, 10291));
        assert!(has(&custom.inbound, Tcp, 179));
        assert_eq!(custom.pod_interfaces, ["pod0", "veth+"]);
        assert!(custom
            .inbound
            .iter()
            .any(|p| p.from == 9100 && p.net.is_some()));
        let bad = parse(&["--cni", "bridge", "--pod-interfaces", "no spaces"]);
        assert!(bad.cluster().unwrap_err().contains("--pod-interfaces"));
    }

    #[test]
    fn a_failsafe_without_the_broker_port_is_refused_at_start() {
        assert!(parse(&[]).check_lockout(5672).is_ok());
        let err = parse(&[]).check_lockout(5673).unwrap_err();
        assert!(
            err.contains("--failsafe-outbound") && err.contains("5673"),
            "{err}"
        );
        let narrowed = parse(&["--failsafe-outbound", "udp:53,tcp:5672@10.0.0.0/8"]);
        assert!(narrowed.check_lockout(5672).is_err());
    }

    #[test]
    fn bad_port_lists_name_the_item() {
        assert!(parse_ports("tcp:22@10.0.0.1/8")
            .unwrap_err()
            .contains("host bits"));
        assert!(parse_ports("tcp:22@nowhere")
            .unwrap_err()
            .contains("nowhere"));
        assert_eq!(
            parse_ports("tcp:22@fd00::/8").unwrap().0[0].net,
            Some("fd00::/8".parse().unwrap())
        );
        assert!(parse_ports("tcp:0").unwrap_err().contains("tcp:0"));
        assert!(parse_ports("icmp:8").unwrap_err().contains("icmp"));
        assert!(parse_ports("tcp:9-2").unwrap_err().contains("range"));
        assert_eq!(
            parse_ports("udp:1-2").unwrap().0,
            vec![FailsafePort::range(FailsafeProtocol::Udp, 1, 2)]
        );
    }
}
