//! The IO shell around the kernel: [`Tools`] is everything the applier ([`crate::apply`])
//! asks of the kernel, as a trait, so that apply order, rollback and retries are tested
//! against an in-memory kernel without root (the command shim of Calico Felix's `iptables` and
//! `ipsets` packages is the model). [`SystemTools`] does it for real: `iptables-*-save` and
//! `-restore` of the detected backend for rules, and for sets the kernel's ipset netlink
//! interface from inside the agent ([`netlink`]), or the `ipset` tool where that cannot be used
//! ([`cli_sets`]); which one is chosen at start and reported.

pub mod cli_sets;
pub mod exec;
#[cfg(test)]
pub mod fake;
pub mod netlink;

use crate::core::sets::{ReadSet, SetOp};
use dog_protocol::ruleset::Family;
use exec::Runner;
use serde::{Deserialize, Serialize};

/// Which iptables implementation the host uses.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    Nft,
    Legacy,
}

impl Backend {
    pub fn word(self) -> &'static str {
        match self {
            Backend::Nft => "nft",
            Backend::Legacy => "legacy",
        }
    }
    /// `iptables-nft-save`, `ip6tables-legacy-restore`, … for `tool` in `save`/`restore`/``.
    pub fn tool(self, family: Family, tool: &str) -> String {
        let base = match family {
            Family::V4 => "iptables",
            Family::V6 => "ip6tables",
        };
        if tool.is_empty() {
            format!("{base}-{}", self.word())
        } else {
            format!("{base}-{}-{tool}", self.word())
        }
    }
}

/// Backend selection from configuration.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum BackendChoice {
    /// Detect the backend the node uses, the way kube-proxy's iptables wrapper does.
    #[default]
    Auto,
    Nft,
    Legacy,
}

/// Chains kubelet / kube-proxy create in the mangle table to mark which backend they use.
const CANARY_CHAINS: [&str; 2] = ["KUBE-IPTABLES-HINT", "KUBE-KUBELET-CANARY"];

/// What backend detection saw, for the decision and for logging.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BackendEvidence {
    pub nft_mangle: String,
    pub legacy_mangle: String,
    /// Rule lines (`-…`) in all tables of both families.
    pub nft_rules: usize,
    pub legacy_rules: usize,
}

/// kube-proxy's rule: a kubelet canary chain decides first (nft, then legacy); otherwise the
/// backend holding more rules wins; nft when both are equal (e.g. both empty).
pub fn choose_backend(ev: &BackendEvidence) -> Backend {
    let has_canary = |text: &str| {
        text.lines().any(|l| {
            l.strip_prefix(':')
                .and_then(|d| d.split_whitespace().next())
                .is_some_and(|c| CANARY_CHAINS.contains(&c))
        })
    };
    if has_canary(&ev.nft_mangle) {
        Backend::Nft
    } else if has_canary(&ev.legacy_mangle) || ev.legacy_rules > ev.nft_rules {
        Backend::Legacy
    } else {
        Backend::Nft
    }
}

fn count_rules(text: &str) -> usize {
    text.lines().filter(|l| l.starts_with('-')).count()
}

/// A failed kernel tool call: the command line and what the tool said.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("cannot run `{command}`: {source}")]
    Spawn {
        command: String,
        #[source]
        source: std::io::Error,
    },
    #[error("`{command}` failed ({status}): {stderr}")]
    Failed {
        command: String,
        status: String,
        stderr: String,
    },
}

impl KernelError {
    /// The tool's error text (empty for a spawn failure).
    pub fn stderr(&self) -> &str {
        match self {
            KernelError::Failed { stderr, .. } => stderr,
            KernelError::Spawn { .. } => "",
        }
    }
}

/// How the agent reaches the kernel's sets.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum SetBackendChoice {
    /// Netlink when the kernel answers on it, else the `ipset` tool.
    #[default]
    Auto,
    Netlink,
    Cli,
}

/// How the agent reaches the kernel's sets, as chosen at start.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SetBackend {
    /// In process, through the kernel's ipset netlink interface.
    Netlink,
    /// Through `ipset` processes.
    Cli,
}

impl SetBackend {
    pub fn word(self) -> &'static str {
        match self {
            SetBackend::Netlink => "netlink",
            SetBackend::Cli => "cli",
        }
    }
}

/// Agent settings the kernel layer needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KernelConfig {
    /// Run every tool inside this named network namespace (`/run/netns/NAME`, as `ip netns`
    /// creates it); `None` = the agent's own namespace.
    pub netns: Option<String>,
    pub backend: BackendChoice,
    pub sets: SetBackendChoice,
    /// The agent's broker port; a document whose failsafe list does not keep it open is refused.
    pub broker_port: Option<u16>,
    /// Seconds to wait for the xtables lock (`-w`).
    pub lock_wait_secs: u32,
}

impl Default for KernelConfig {
    fn default() -> Self {
        KernelConfig {
            netns: None,
            backend: BackendChoice::Auto,
            sets: SetBackendChoice::Auto,
            broker_port: Some(5672),
            lock_wait_secs: 5,
        }
    }
}

/// What the applier asks of the kernel (see the module docs).
pub trait Tools: Send + Sync + std::fmt::Debug {
    /// The iptables backend rules go to.
    fn backend(&self) -> Backend;
    /// How sets are read and written.
    fn set_backend(&self) -> SetBackend;
    /// The filter table of `family` as `iptables-save -t filter` prints it.
    fn save_rules(&self, family: Family) -> Result<String, KernelError>;
    /// `iptables-restore --noflush` of `text`: one atomic transaction.
    fn restore_rules(&self, family: Family, text: &str) -> Result<(), KernelError>;
    /// Names of all sets (dog's and others').
    fn set_names(&self) -> Result<Vec<String>, KernelError>;
    /// The named sets (which must exist) with their members.
    fn read_sets(&self, names: &[String]) -> Result<Vec<ReadSet>, KernelError>;
    /// How many members set `name` holds (`None`: there is no such set).
    fn set_count(&self, name: &str) -> Result<Option<usize>, KernelError>;
    /// Runs `ops` in order, stopping at the first that fails.
    fn write_sets(&self, ops: &[SetOp<'_>]) -> Result<(), KernelError>;
    /// The host's interfaces and addresses as `ip -j addr` prints them.
    fn ip_addr_json(&self) -> Result<String, KernelError>;
}

/// The real kernel of one host (or one network namespace).
#[derive(Debug)]
pub struct SystemTools {
    runner: Runner,
    backend: Backend,
    lock_wait_secs: u32,
    netlink: Option<netlink::NetlinkSets>,
}

impl SystemTools {
    /// Detects the iptables backend unless `config` fixes it, and opens the ipset netlink
    /// socket unless `config` asks for the tool (with `auto`, a kernel that does not answer
    /// on it means the tool).
    pub fn new(config: &KernelConfig) -> Result<Self, KernelError> {
        let runner = Runner::new(config.netns.as_deref())?;
        let netlink = match config.sets {
            SetBackendChoice::Cli => None,
            SetBackendChoice::Netlink => Some(netlink::NetlinkSets::open(runner.netns())?),
            SetBackendChoice::Auto => match netlink::NetlinkSets::open(runner.netns()) {
                Ok(n) => Some(n),
                Err(e) => {
                    tracing::warn!(error = %e, "the kernel's ipset netlink interface is not usable; sets go through the ipset tool");
                    None
                }
            },
        };
        let mut t = SystemTools {
            runner,
            backend: Backend::Nft,
            lock_wait_secs: config.lock_wait_secs,
            netlink,
        };
        t.backend = match config.backend {
            BackendChoice::Nft => Backend::Nft,
            BackendChoice::Legacy => Backend::Legacy,
            BackendChoice::Auto => {
                let ev = t.backend_evidence()?;
                let b = choose_backend(&ev);
                tracing::info!(
                    backend = b.word(),
                    nft_rules = ev.nft_rules,
                    legacy_rules = ev.legacy_rules,
                    "detected iptables backend"
                );
                b
            }
        };
        Ok(t)
    }

    /// The process runner (the tools' namespace).
    pub fn runner(&self) -> &Runner {
        &self.runner
    }

    /// Reads what [`choose_backend`] needs. A missing tool counts as an empty backend.
    pub fn backend_evidence(&self) -> Result<BackendEvidence, KernelError> {
        let save = |b: Backend, f: Family, table: Option<&str>| -> String {
            let tool = b.tool(f, "save");
            let args: Vec<&str> = match table {
                Some(t) => vec!["-t", t],
                None => vec![],
            };
            self.runner.run(&tool, &args, None).unwrap_or_default()
        };
        let mut ev = BackendEvidence {
            nft_mangle: save(Backend::Nft, Family::V4, Some("mangle")),
            legacy_mangle: save(Backend::Legacy, Family::V4, Some("mangle")),
            ..Default::default()
        };
        for f in Family::BOTH {
            ev.nft_rules += count_rules(&save(Backend::Nft, f, None));
            ev.legacy_rules += count_rules(&save(Backend::Legacy, f, None));
        }
        Ok(ev)
    }

    /// Saves a whole table (coexistence checks and tests).
    pub fn save_table(&self, family: Family, table: &str) -> Result<String, KernelError> {
        self.runner
            .run(&self.backend.tool(family, "save"), &["-t", table], None)
    }

    /// Runs `iptables args…` (with `-w`) of the detected backend.
    pub fn iptables(&self, family: Family, args: &[&str]) -> Result<String, KernelError> {
        let wait = self.lock_wait_secs.to_string();
        let mut v = vec!["-w", &wait];
        v.extend_from_slice(args);
        self.runner.run(&self.backend.tool(family, ""), &v, None)
    }
}

impl Tools for SystemTools {
    fn backend(&self) -> Backend {
        self.backend
    }

    fn set_backend(&self) -> SetBackend {
        match self.netlink {
            Some(_) => SetBackend::Netlink,
            None => SetBackend::Cli,
        }
    }

    fn save_rules(&self, family: Family) -> Result<String, KernelError> {
        self.save_table(family, "filter")
    }

    fn restore_rules(&self, family: Family, text: &str) -> Result<(), KernelError> {
        let wait = self.lock_wait_secs.to_string();
        self.runner
            .run(
                &self.backend.tool(family, "restore"),
                &["--noflush", "-w", &wait],
                Some(text.as_bytes()),
            )
            .map(drop)
    }

    fn set_names(&self) -> Result<Vec<String>, KernelError> {
        match &self.netlink {
            Some(n) => n.names(),
            None => cli_sets::names(&self.runner),
        }
    }

    fn read_sets(&self, names: &[String]) -> Result<Vec<ReadSet>, KernelError> {
        match &self.netlink {
            Some(n) => n.read(names),
            None => cli_sets::read(&self.runner, names),
        }
    }

    fn set_count(&self, name: &str) -> Result<Option<usize>, KernelError> {
        match &self.netlink {
            Some(n) => n.count(name),
            None => cli_sets::count(&self.runner, name),
        }
    }

    fn write_sets(&self, ops: &[SetOp<'_>]) -> Result<(), KernelError> {
        if ops.is_empty() {
            return Ok(());
        }
        match &self.netlink {
            Some(n) => ops.iter().try_for_each(|op| n.write(op)),
            None => cli_sets::write(&self.runner, ops),
        }
    }

    fn ip_addr_json(&self) -> Result<String, KernelError> {
        self.runner.run("ip", &["-j", "addr"], None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backend_choice_follows_kube_proxy() {
        let mut ev = BackendEvidence::default();
        assert_eq!(choose_backend(&ev), Backend::Nft);
        ev.legacy_rules = 3;
        assert_eq!(choose_backend(&ev), Backend::Legacy);
        ev.nft_mangle = "*mangle\n:KUBE-KUBELET-CANARY - [0:0]\nCOMMIT\n".into();
        assert_eq!(choose_backend(&ev), Backend::Nft);
        ev.nft_mangle.clear();
        ev.nft_rules = 10;
        ev.legacy_mangle = ":KUBE-IPTABLES-HINT - [0:0]\n".into();
        assert_eq!(choose_backend(&ev), Backend::Legacy);
        ev.legacy_mangle.clear();
        assert_eq!(choose_backend(&ev), Backend::Nft);
        assert_eq!(
            Backend::Legacy.tool(Family::V6, "save"),
            "ip6tables-legacy-save"
        );
        assert_eq!(Backend::Nft.tool(Family::V4, ""), "iptables-nft");
    }
}
