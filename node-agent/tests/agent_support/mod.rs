//! Shared harness of the agent process tests: a throwaway netns, a temp state dir, the real
//! `dog-agent` binary, and the test playing the operator over the real broker
//! (127.0.0.1:5672) with a unique topology prefix that is deleted at the end.
#![allow(dead_code)]

use dog_agent::netns::NetNs;
use dog_protocol::broker::{BrokerConfig, Deliveries, MessageMeta, OperatorLink};
use dog_protocol::envelope::{Encryption, Opener, Sealer};
use dog_protocol::keys::pinning::Pins;
use dog_protocol::keys::{load_operator_key, write_new_operator_key, EncryptionPublicKey};
use dog_protocol::messages::{AgentMessage, Heartbeat, Request, RequestKind, Response};
use dog_protocol::ruleset::{rules_hash, HostFirewall};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use uuid::Uuid;

#[path = "../common/mod.rs"]
pub mod common;

pub const URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// One agent under test and the operator side of the conversation.
pub struct Harness {
    pub ns: NetNs,
    pub dir: tempfile::TempDir,
    pub host: String,
    pub prefix: String,
    pub operator: OperatorLink,
    pub from_agents: Deliveries,
    pub sealer: Sealer,
    pub opener: Opener,
    pub agent_key: Option<EncryptionPublicKey>,
    /// How requests are encrypted: as the operator does, by what the agent's heartbeat says.
    pub encryption: Encryption,
    pub child: Option<Child>,
    pub metrics_port: u16,
    pub extra_args: Vec<String>,
    /// `--drift-interval` of the agent (seconds).
    pub drift_interval: &'static str,
    cleaned: bool,
}

impl Harness {
    /// Netns, operator key + public keys file, operator link connected (exchanges declared).
    pub async fn new(name: &str) -> Option<Harness> {
        if !dog_agent::netns::available(name) {
            return None;
        }
        let host = dog_test_support::unique("agt");
        let prefix = format!("dogtest-{host}");
        let ns = NetNs::new().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let key_path = dir.path().join("operator.key");
        let public = write_new_operator_key(&key_path).unwrap();
        std::fs::write(
            dir.path().join("operator.pub"),
            format!("{} {}\n", public.fingerprint(), public.to_base64()),
        )
        .unwrap();
        let sealer = Sealer::new("dog-operator", load_operator_key(&key_path).unwrap());
        let mut cfg = BrokerConfig::new(URL, format!("{prefix}/operator"));
        cfg.topology_prefix = prefix.clone();
        let (operator, from_agents) = OperatorLink::start(cfg).unwrap();
        tokio::time::timeout(Duration::from_secs(20), operator.wait_connected())
            .await
            .expect("broker at 127.0.0.1:5672 not reachable")
            .unwrap();
        operator.declare_host_queue(&host).await.unwrap();
        Some(Harness {
            ns,
            dir,
            host,
            prefix,
            operator,
            from_agents,
            sealer,
            opener: Opener::for_operator("dog-operator", Pins::new(true)),
            agent_key: None,
            encryption: Encryption::PerMessage,
            child: None,
            metrics_port: dog_test_support::free_port(),
            extra_args: Vec::new(),
            drift_interval: "1",
            cleaned: false,
        })
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("agent.log")
    }

    /// Starts the real binary (appending to the agent log).
    pub fn spawn_agent(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_dog-agent"))
            .args([
                "--hostname",
                &self.host,
                "--broker-url",
                URL,
                "--topology-prefix",
                &self.prefix,
                "--operator-public-keys",
                self.dir.path().join("operator.pub").to_str().unwrap(),
                "--state-dir",
                self.state_dir().to_str().unwrap(),
                "--metrics-addr",
                &format!("127.0.0.1:{}", self.metrics_port),
                "--log-format",
                "json",
                "--netns",
                self.ns.name(),
                "--keepalive-interval",
                "1",
                "--drift-interval",
                self.drift_interval,
                "--address-interval",
                "1",
            ])
            .args(&self.extra_args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }

    /// SIGTERM and wait for the exit; returns whether it exited successfully.
    pub fn sigterm(&mut self) -> bool {
        let mut c = self.child.take().unwrap();
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(st) = c.try_wait().unwrap() {
                return st.success();
            }
            if Instant::now() > deadline {
                c.kill().unwrap();
                c.wait().unwrap();
                return false;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The next agent message matching `want` (opened and verified; heartbeats pin the
    /// agent's keys), within `secs`.
    pub async fn next(
        &mut self,
        secs: u64,
        mut want: impl FnMut(&AgentMessage) -> bool,
    ) -> AgentMessage {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
        loop {
            let d = match tokio::time::timeout_at(deadline, self.from_agents.recv()).await {
                Ok(Some(d)) => d,
                Ok(None) => panic!("operator link closed"),
                Err(_) => panic!(
                    "no matching agent message within {secs} s; agent log:\n{}",
                    self.log()
                ),
            };
            d.acker.ack().await;
            let opened = self
                .opener
                .open(&d.body, now())
                .expect("agent message opens");
            let msg = opened.agent_message().unwrap();
            if let AgentMessage::Heartbeat(hb) = &msg {
                self.opener.pin_heartbeat(&opened, hb).unwrap();
                self.agent_key = Some(hb.encryption_key);
                self.encryption = if hb.session_envelopes {
                    Encryption::Session
                } else {
                    Encryption::PerMessage
                };
            }
            if want(&msg) {
                return msg;
            }
        }
    }

    /// Whether a message matching `want` arrives within `secs` (other messages are consumed).
    pub async fn arrives(
        &mut self,
        secs: u64,
        mut want: impl FnMut(&AgentMessage) -> bool,
    ) -> bool {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
        while let Ok(Some(d)) = tokio::time::timeout_at(deadline, self.from_agents.recv()).await {
            d.acker.ack().await;
            let opened = self
                .opener
                .open(&d.body, now())
                .expect("agent message opens");
            if want(&opened.agent_message().unwrap()) {
                return true;
            }
        }
        false
    }

    pub async fn heartbeat(&mut self, secs: u64) -> Heartbeat {
        match self
            .next(secs, |m| matches!(m, AgentMessage::Heartbeat(_)))
            .await
        {
            AgentMessage::Heartbeat(h) => h,
            _ => unreachable!(),
        }
    }

    /// Seals a request to the agent.
    pub fn seal(&self, kind: RequestKind) -> (Uuid, Vec<u8>) {
        let req = Request {
            id: Uuid::new_v4(),
            request: kind,
        };
        let key = self.agent_key.expect("heartbeat seen first");
        let bytes = self
            .sealer
            .request(&self.host, &key, self.encryption, &req, now(), 300)
            .unwrap();
        (req.id, bytes)
    }

    pub async fn publish(&self, id: Uuid, bytes: &[u8]) {
        self.operator
            .publish_to_host(
                &self.host,
                bytes,
                &MessageMeta::new(id.to_string(), "request"),
            )
            .await
            .unwrap();
    }

    /// Sends a request and waits for its response.
    pub async fn request(&mut self, kind: RequestKind) -> Response {
        let (id, bytes) = self.seal(kind);
        self.publish(id, &bytes).await;
        self.response(id, 20).await
    }

    pub async fn response(&mut self, id: Uuid, secs: u64) -> Response {
        match self
            .next(
                secs,
                |m| matches!(m, AgentMessage::Response(r) if r.request_id == id),
            )
            .await
        {
            AgentMessage::Response(r) => r,
            _ => unreachable!(),
        }
    }

    /// GET on the agent's metrics endpoint.
    pub fn http(&self, path: &str) -> (u16, String) {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", self.metrics_port)).unwrap();
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        let code = out.split_whitespace().nth(1).unwrap().parse().unwrap();
        (code, out)
    }

    /// The value of one metric line (`name{labels}`), if present.
    pub fn metric(&self, series: &str) -> Option<f64> {
        let (_, body) = self.http("/metrics");
        body.lines().find_map(|l| {
            l.strip_prefix(series)?
                .strip_prefix(' ')?
                .trim()
                .parse()
                .ok()
        })
    }

    /// Hash of the netns' live `iptables-save` / `ip6tables-save` filter table.
    pub fn live_rules_hashes(&self) -> (String, String) {
        (
            rules_hash(&self.ns.exec(&["iptables-save", "-t", "filter"]).unwrap()),
            rules_hash(&self.ns.exec(&["ip6tables-save", "-t", "filter"]).unwrap()),
        )
    }

    /// Waits until the live rules hash equal the firewall's.
    pub async fn wait_rules(&self, fw: &HostFirewall, secs: u64) {
        let want = fw.hashes();
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let (v4, v6) = self.live_rules_hashes();
            if v4 == want.ipv4_rules && v6 == want.ipv6_rules {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "rules not restored within {secs} s; agent log:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Removes the broker topology of this test.
    pub async fn cleanup(mut self) {
        self.kill9();
        let _ = self.operator.delete_host_queue(&self.host).await;
        let _ = self.operator.delete_topology().await;
        self.operator.close();
        self.cleaned = true;
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if std::thread::panicking() {
            eprintln!("--- agent log ---\n{}", self.log());
        }
        if !self.cleaned {
            // A failed test still removes its broker topology (on a fresh runtime: the test's
            // runtime may be the one unwinding).
            let (prefix, host) = (self.prefix.clone(), self.host.clone());
            let _ = std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                rt.block_on(async {
                    let mut cfg = BrokerConfig::new(URL, format!("{prefix}/cleanup"));
                    cfg.topology_prefix = prefix;
                    let Ok((op, _d)) = OperatorLink::start(cfg) else {
                        return;
                    };
                    let _ = tokio::time::timeout(Duration::from_secs(10), async {
                        let _ = op.delete_host_queue(&host).await;
                        let _ = op.delete_topology().await;
                    })
                    .await;
                    op.close();
                });
            })
            .join();
        }
    }
}

/// The test firewall for `host`: a set referenced by a v4 rule, a v6 set and rule, both
/// families with the failsafe prologue.
pub fn test_firewall(host: &str) -> HostFirewall {
    use dog_protocol::ruleset::Family;
    let mut fw = common::firewall(
        &[
            "-A DOG-INPUT -p tcp -m set --match-set dogz4-web src -m tcp --dport 80 -j ACCEPT",
            "-A DOG-INPUT -s 198.18.0.0/15 -p udp -m udp --dport 53 -j ACCEPT",
        ],
        &["-A DOG-INPUT -p tcp -m set --match-set dogz6-web src -m tcp --dport 80 -j ACCEPT"],
        vec![
            common::set("dogz4-web", Family::V4, &["198.18.1.0/24", "198.18.2.5"]),
            common::set("dogz6-web", Family::V6, &["fd00:d06:1::/64"]),
        ],
    );
    fw.host = host.to_string();
    fw
}

/// The rule the tests delete by hand to cause drift.
pub const HAND_EDIT: &[&str] = &[
    "iptables",
    "-D",
    "DOG-INPUT",
    "-p",
    "tcp",
    "-m",
    "set",
    "--match-set",
    "dogz4-web",
    "src",
    "-m",
    "tcp",
    "--dport",
    "80",
    "-j",
    "ACCEPT",
];

pub fn file_exists(p: &Path) -> bool {
    p.exists()
}
