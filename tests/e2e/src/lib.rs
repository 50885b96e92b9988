//! Harness for the end-to-end tests: a fleet of network namespaces on a private bridge, the real
//! `dog-operator` (in `--from-dir` mode) and one real `dog-agent` per namespace, all against the
//! real RabbitMQ on 127.0.0.1:5672, and real TCP/UDP/ICMP between the namespaces.
//!
//! Everything a test creates is named with a unique prefix and removed on drop (processes,
//! namespaces, broker queues), also when the test fails.

pub mod attacker;
pub mod fixtures;
pub mod forwarder;

use dog_operator::dir::StatusFile;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

mod broker;

mod traffic;

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// Where cargo put the binaries (`scripts/test.sh` builds them before the tests run).
pub fn bin(name: &str) -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target"));
    let p = target.join("debug").join(name);
    assert!(
        p.exists(),
        "{} not found: run `cargo build --bins` first (scripts/test.sh does)",
        p.display()
    );
    p
}

pub fn sh(args: &[&str]) -> std::process::Output {
    Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("running {args:?}: {e}"))
}

fn must(args: &[&str]) {
    let out = sh(args);
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Skips (returns false) when not root and DOG_SKIP_NETNS=1; fails clearly when not root otherwise.
pub fn require_root() -> bool {
    let root = sh(&["id", "-u"]).stdout == b"0\n";
    if !root {
        if std::env::var("DOG_SKIP_NETNS").as_deref() == Ok("1") {
            eprintln!("skipping: needs root for network namespaces (DOG_SKIP_NETNS=1)");
            return false;
        }
        panic!("end-to-end tests need root (network namespaces); set DOG_SKIP_NETNS=1 to skip");
    }
    true
}

/// A third octet for a fleet's addresses that no other live fleet uses: the first of
/// 100..=250 whose lock file this process can lock. The kernel drops the lock with the file,
/// so a killed test leaves nothing claimed, and any number of fleets (up to 151 at once) in
/// any number of test processes get distinct subnets.
fn claim_net() -> (u32, std::fs::File) {
    for net in 100..=250u32 {
        let path = std::env::temp_dir().join(format!("dog-e2e-net-{net}.lock"));
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .unwrap_or_else(|e| panic!("opening {}: {e}", path.display()));
        if file.try_lock().is_ok() {
            return (net, file);
        }
    }
    panic!("every test subnet 198.18.100-250.0/24 is in use by a live fleet");
}

/// A running fleet. Node `i` (1-based, in the order given) has 198.18.<net>.<i>/24 and
/// fd00:d06:<net>::<i>/64 on eth0, where <net> is unique per fleet.
pub struct Fleet {
    pub prefix: String,
    pub net: u32,
    /// Holds `net` against every other fleet on the machine, in this process or another,
    /// until the fleet is dropped or its process dies (see [`claim_net`]).
    _net_claim: std::fs::File,
    pub nodes: Vec<String>,
    pub dir: tempfile::TempDir,
    pub operator: Option<Child>,
    /// Where the running operator serves /metrics.
    pub operator_metrics_port: Option<u16>,
    pub agents: Vec<Option<Child>>,
    pub extra: Vec<Child>,
}

impl Fleet {
    /// Creates namespaces for `nodes` (short names; host names become `<prefix>-<node>`).
    pub fn new(nodes: &[&str]) -> Fleet {
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let pid = std::process::id();
        let prefix = format!("de{}x{}", pid % 10000, n);
        let (net, net_claim) = claim_net();
        let dir = tempfile::tempdir().expect("tempdir");
        let fleet = Fleet {
            prefix: prefix.clone(),
            net,
            _net_claim: net_claim,
            nodes: nodes.iter().map(|s| s.to_string()).collect(),
            dir,
            operator: None,
            operator_metrics_port: None,
            agents: Vec::new(),
            extra: Vec::new(),
        };
        let lan = format!("{prefix}-lan");
        must(&["ip", "netns", "add", &lan]);
        must(&["ip", "-n", &lan, "link", "add", "br0", "type", "bridge"]);
        must(&["ip", "-n", &lan, "link", "set", "br0", "up"]);
        for (i, node) in nodes.iter().enumerate() {
            let ns = fleet.ns(node);
            let i = i + 1;
            let veth = format!("v{prefix}{i}");
            must(&["ip", "netns", "add", &ns]);
            must(&[
                "ip", "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &ns,
            ]);
            must(&["ip", "link", "set", &veth, "netns", &lan]);
            must(&[
                "ip", "-n", &lan, "link", "set", &veth, "master", "br0", "up",
            ]);
            must(&["ip", "-n", &ns, "link", "set", "lo", "up"]);
            must(&[
                "ip",
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{}/24", fleet.v4(node)),
                "dev",
                "eth0",
            ]);
            must(&[
                "ip",
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{}/64", fleet.v6(node)),
                "dev",
                "eth0",
                "nodad",
            ]);
            must(&["ip", "-n", &ns, "link", "set", "eth0", "up"]);
        }
        std::fs::create_dir_all(fleet.resources()).expect("mkdir");
        fleet
    }

    fn index(&self, node: &str) -> usize {
        self.nodes
            .iter()
            .position(|n| n == node)
            .unwrap_or_else(|| panic!("no node {node}"))
            + 1
    }
    pub fn ns(&self, node: &str) -> String {
        format!("{}-{node}", self.prefix)
    }
    /// The Host name of a node.
    pub fn host(&self, node: &str) -> String {
        format!("{}-{node}", self.prefix)
    }
    pub fn v4(&self, node: &str) -> String {
        format!("198.18.{}.{}", self.net, self.index(node))
    }
    pub fn v6(&self, node: &str) -> String {
        format!("fd00:d06:{}::{}", self.net, self.index(node))
    }
    /// The fleet's own networks (IPv4 and IPv6), comma-separated: where the operator believes
    /// what the agents report (`--trust-reported-addresses`).
    pub fn networks(&self) -> String {
        format!("198.18.{n}.0/24,fd00:d06:{n}::/64", n = self.net)
    }
    pub fn resources(&self) -> PathBuf {
        self.dir.path().join("fleet")
    }
    pub fn status_path(&self) -> PathBuf {
        self.resources().join(dog_operator::dir::STATUS_FILE)
    }

    /// Writes (replaces) one resource file; `{p}` in the text is replaced by the prefix.
    pub fn write(&self, file: &str, yaml: &str) {
        let text = yaml.replace("{p}", &self.prefix);
        let tmp = self.dir.path().join(format!(".{file}.tmp"));
        std::fs::write(&tmp, text).expect("write resource");
        std::fs::rename(&tmp, self.resources().join(file)).expect("rename resource");
    }

    /// The operator in `--from-dir` mode on [`Fleet::resources`].
    pub fn start_operator(&mut self) {
        self.start_operator_with(&[]);
    }

    /// The operator in `--from-dir` mode, trusting agents on first use (a fleet of VMs whose
    /// keys nobody pre-pinned), with further flags (e.g. `--cni flannel`).
    pub fn start_operator_with(&mut self, extra: &[&str]) {
        let mut flags = vec!["--trust-on-first-use"];
        flags.extend_from_slice(extra);
        self.start_operator_exactly(&flags);
    }

    /// The operator in `--from-dir` mode with exactly these flags (no trust on first use
    /// unless they say so).
    pub fn start_operator_exactly(&mut self, flags: &[&str]) {
        let mut mode = vec![std::ffi::OsString::from("--from-dir")];
        mode.push(self.resources().into_os_string());
        mode.extend(flags.iter().map(Into::into));
        self.spawn_operator(&mode, &[]);
    }

    /// The operator against a Kubernetes API server, as whoever `kubeconfig` names, leading
    /// through a Lease in `namespace`. `extra` are further flags.
    pub fn start_cluster_operator(&mut self, kubeconfig: &Path, namespace: &str, extra: &[&str]) {
        let mode: Vec<std::ffi::OsString> = extra.iter().map(Into::into).collect();
        let name = format!("{}-operator", self.prefix);
        self.spawn_operator(
            &mode,
            &[
                ("KUBECONFIG", kubeconfig.as_os_str()),
                ("POD_NAMESPACE", namespace.as_ref()),
                ("POD_NAME", name.as_ref()),
            ],
        );
    }

    fn spawn_operator(&mut self, mode: &[std::ffi::OsString], envs: &[(&str, &std::ffi::OsStr)]) {
        let key = self.dir.path().join("operator.key");
        let public = self.dir.path().join("operator.pub");
        if !key.exists() {
            must(&[
                bin("dog-operator").to_str().unwrap_or_default(),
                "keygen",
                "--out",
                key.to_str().unwrap_or_default(),
                "--public-out",
                public.to_str().unwrap_or_default(),
            ]);
        }
        // a new operator gets a new log (tests read what *it* did)
        let log = std::fs::File::create(self.dir.path().join("operator.log")).expect("log");
        let metrics_port = dog_test_support::free_port();
        self.operator_metrics_port = Some(metrics_port);
        let child = Command::new(bin("dog-operator"))
            .arg("run")
            .args(mode)
            .envs(envs.iter().map(|(k, v)| (*k, *v)))
            .arg("--signing-key")
            .arg(&key)
            .args([
                "--topology-prefix",
                &self.prefix,
                "--keepalive-interval",
                "1",
                "--resync-after",
                "3",
            ])
            .args(["--debounce", "0.1", "--log-format", "json"])
            .args(["--metrics-addr", &format!("127.0.0.1:{metrics_port}")])
            // the agents' reports are believed inside the fleet's own networks only
            .args(["--trust-reported-addresses", &self.networks()])
            .stdout(Stdio::from(log.try_clone().expect("log")))
            .stderr(Stdio::from(log))
            .spawn()
            .expect("spawn dog-operator");
        self.operator = Some(child);
    }

    pub fn agent_metrics_port(&self, node: &str) -> u16 {
        20000 + (self.net as u16 % 300) * 10 + self.index(node) as u16
    }

    /// One sample of the node's agent metrics, e.g.
    /// `dog_agent_messages_sent_total{kind="keepalive"}`; `None` when not (yet) exposed.
    pub fn agent_metric(&self, node: &str, series: &str) -> Option<f64> {
        let url = format!("http://127.0.0.1:{}/metrics", self.agent_metrics_port(node));
        let out = sh(&["curl", "-sf", "--max-time", "2", &url]);
        let text = String::from_utf8_lossy(&out.stdout);
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
    }

    pub fn start_agent(&mut self, node: &str) {
        self.start_agent_with(node, &[]);
    }

    /// One sample of the operator's metrics, e.g. `dog_hosts_drifted`.
    pub fn operator_metric(&self, series: &str) -> Option<f64> {
        let url = format!("http://127.0.0.1:{}/metrics", self.operator_metrics_port?);
        let out = sh(&["curl", "-sf", "--max-time", "2", &url]);
        let text = String::from_utf8_lossy(&out.stdout);
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
    }

    /// The node's agent running *inside* the node's namespace, as a host-network DaemonSet pod
    /// does: its metrics listen on the node's addresses (`metrics` port, all families), and
    /// the broker is reached through a forwarder on the node's loopback.
    pub fn start_agent_inside(&mut self, node: &str, metrics: u16, extra: &[&str]) {
        let ns = self.ns(node);
        let root_net = format!("--net=/proc/{}/ns/net", std::process::id());
        let forward = Command::new("ip")
            .args(["netns", "exec", &ns, "socat"])
            .arg("TCP-LISTEN:5672,bind=127.0.0.1,fork,reuseaddr")
            .arg(format!(
                "EXEC:nsenter {root_net} socat STDIO TCP\\:127.0.0.1\\:5672"
            ))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("socat broker forwarder");
        self.extra.push(forward);
        self.wait(&format!("broker forwarder in {node}"), 20, || {
            let out = sh(&["ip", "netns", "exec", &ns, "ss", "-Hlnt", "sport = :5672"]);
            out.status.success() && !out.stdout.is_empty()
        });
        let mut args: Vec<String> = vec![
            "netns".into(),
            "exec".into(),
            ns,
            bin("dog-agent").display().to_string(),
        ];
        args.extend(["--metrics-addr".to_string(), format!("[::]:{metrics}")]);
        args.extend(extra.iter().map(|s| s.to_string()));
        self.spawn_agent(node, "ip", &args);
    }

    /// The node's agent with further flags (e.g. `--mode observe`).
    pub fn start_agent_with(&mut self, node: &str, extra: &[&str]) {
        let mut args: Vec<String> = vec![
            "--netns".into(),
            self.ns(node),
            "--metrics-addr".into(),
            format!("127.0.0.1:{}", self.agent_metrics_port(node)),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        self.spawn_agent(node, &bin("dog-agent").display().to_string(), &args);
    }

    fn spawn_agent(&mut self, node: &str, program: &str, head: &[String]) {
        let i = self.index(node) - 1;
        while self.agents.len() <= i {
            self.agents.push(None);
        }
        let log = self.dir.path().join(format!("agent-{node}.log"));
        let state = self.dir.path().join("state").join(node);
        let child = self.agent_command(program, head, &self.host(node), &state, &log);
        self.agents[i] = Some(child);
    }

    /// A second, rogue agent in `node`'s namespace that claims to be `claims` (a host name),
    /// with keys of its own (`extra`: further flags). Its log is `impostor-<tag>.log` (see
    /// [`Self::log_of`]); it stops with the fleet.
    pub fn start_impostor(&mut self, node: &str, claims: &str, tag: &str, extra: &[&str]) {
        let mut head: Vec<String> = vec!["--netns".into(), self.ns(node)];
        head.extend([
            "--metrics-addr".into(),
            format!("127.0.0.1:{}", dog_test_support::free_port()),
        ]);
        head.extend(extra.iter().map(|s| s.to_string()));
        let log = self.dir.path().join(format!("impostor-{tag}.log"));
        let state = self
            .dir
            .path()
            .join("state")
            .join(format!("impostor-{tag}"));
        let program = bin("dog-agent").display().to_string();
        let child = self.agent_command(&program, &head, claims, &state, &log);
        self.extra.push(child);
    }

    /// What a process of the fleet logged so far (`agent-web`, `impostor-x`, `operator`).
    pub fn log_of(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("{name}.log"))).unwrap_or_default()
    }

    fn agent_command(
        &self,
        program: &str,
        head: &[String],
        hostname: &str,
        state: &Path,
        log: &Path,
    ) -> Child {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .expect("log");
        Command::new(program)
            .args(head)
            .args(["--hostname", hostname])
            .arg("--state-dir")
            .arg(state)
            .arg("--operator-public-keys")
            .arg(self.dir.path().join("operator.pub"))
            .args(["--topology-prefix", &self.prefix])
            .args([
                "--keepalive-interval",
                "1",
                "--drift-interval",
                "1",
                "--address-interval",
                "1",
            ])
            .args(["--log-format", "json"])
            .stdout(Stdio::from(log.try_clone().expect("log")))
            .stderr(Stdio::from(log))
            .spawn()
            .expect("spawn dog-agent")
    }

    pub fn kill_agent(&mut self, node: &str, signal: &str) {
        let i = self.index(node) - 1;
        if let Some(mut c) = self.agents.get_mut(i).and_then(|a| a.take()) {
            must(&["kill", signal, &c.id().to_string()]);
            let _ = c.wait();
        }
    }

    pub fn agent_pid(&self, node: &str) -> Option<u32> {
        self.agents
            .get(self.index(node) - 1)
            .and_then(|a| a.as_ref())
            .map(|c| c.id())
    }

    pub fn status(&self) -> StatusFile {
        StatusFile::read(&self.status_path()).unwrap_or_default()
    }

    /// Waits until `cond` holds for the status file, or panics with the logs.
    pub fn wait_status(
        &self,
        what: &str,
        secs: u64,
        cond: impl Fn(&StatusFile) -> bool,
    ) -> StatusFile {
        let mut last = StatusFile::default();
        let every = Duration::from_millis(200);
        let held = dog_test_support::poll_until(Duration::from_secs(secs), every, || {
            last = self.status();
            cond(&last)
        });
        if !held {
            self.dump_logs();
            panic!("timed out after {secs}s waiting for {what}; status: {last:#?}");
        }
        last
    }

    /// Polls `cond` until it holds; after `secs` seconds dumps the fleet's logs and panics
    /// naming `what`.
    pub fn wait(&self, what: &str, secs: u64, cond: impl Fn() -> bool) {
        let every = Duration::from_millis(200);
        if !dog_test_support::poll_until(Duration::from_secs(secs), every, cond) {
            self.dump_logs();
            panic!("timed out after {secs}s waiting for {what}");
        }
    }

    pub fn dump_logs(&self) {
        if let Ok(rd) = std::fs::read_dir(self.dir.path()) {
            for e in rd.flatten() {
                let p = e.path();
                if p.extension().is_some_and(|x| x == "log") {
                    let text = std::fs::read_to_string(&p).unwrap_or_default();
                    let tail: Vec<&str> = text.lines().rev().take(25).collect();
                    eprintln!("---- {} (last lines) ----", p.display());
                    for l in tail.into_iter().rev() {
                        eprintln!("{l}");
                    }
                }
            }
        }
    }

    /// Hosts (by node) whose InSync condition is True.
    pub fn in_sync(st: &StatusFile, host: &str) -> bool {
        st.hosts.get(host).is_some_and(|h| {
            h.conditions
                .iter()
                .any(|c| c.type_ == "InSync" && c.status == "True")
        })
    }

    pub fn all_in_sync(&self, st: &StatusFile) -> bool {
        self.nodes.iter().all(|n| Self::in_sync(st, &self.host(n)))
    }

    /// `iptables-save -t filter` (or ip6tables) inside a node.
    pub fn save(&self, node: &str, v6: bool) -> String {
        let tool = if v6 {
            "ip6tables-save"
        } else {
            "iptables-save"
        };
        String::from_utf8_lossy(
            &sh(&["ip", "netns", "exec", &self.ns(node), tool, "-t", "filter"]).stdout,
        )
        .to_string()
    }

    /// Runs a command inside a node.
    pub fn exec(&self, node: &str, args: &[&str]) -> std::process::Output {
        let ns = self.ns(node);
        let mut v = vec!["ip", "netns", "exec", ns.as_str()];
        v.extend_from_slice(args);
        sh(&v)
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        for c in self
            .extra
            .iter_mut()
            .chain(self.agents.iter_mut().flatten())
            .chain(self.operator.iter_mut())
        {
            let _ = c.kill();
            let _ = c.wait();
        }
        if std::thread::panicking() {
            self.dump_logs();
        }
        let list = sh(&["ip", "netns", "list"]);
        for line in String::from_utf8_lossy(&list.stdout).lines() {
            let name = line.split_whitespace().next().unwrap_or("");
            if name.starts_with(&format!("{}-", self.prefix)) {
                let pids = sh(&["ip", "netns", "pids", name]);
                for pid in String::from_utf8_lossy(&pids.stdout).split_whitespace() {
                    let _ = sh(&["kill", "-9", pid]);
                }
                let _ = sh(&["ip", "netns", "del", name]);
            }
        }
        let queues = sh(&["rabbitmqctl", "list_queues", "-q", "name"]);
        for q in String::from_utf8_lossy(&queues.stdout).lines() {
            let q = q.trim();
            if q.starts_with(&format!("{}.", self.prefix)) {
                let _ = sh(&["rabbitmqctl", "delete_queue", q]);
            }
        }
        let users = sh(&["rabbitmqctl", "list_users", "-q"]);
        for line in String::from_utf8_lossy(&users.stdout).lines() {
            let user = line.split_whitespace().next().unwrap_or("");
            if user.starts_with(&format!("{}.", self.prefix))
                || user.starts_with(&format!("{}-", self.prefix))
            {
                let _ = sh(&["rabbitmqctl", "delete_user", user]);
            }
        }
        for x in ["hosts", "sets", "operator"] {
            let _ = sh(&["rabbitmqctl", "eval", &format!(
                "rabbit_exchange:delete(rabbit_misc:r(<<\"/\">>, exchange, <<\"{}.{x}\">>), false, <<\"dog-e2e\">>).",
                self.prefix
            )]);
        }
    }
}
