//! The thin IO shell around the kernel's firewall tools: `iptables-*-save/-restore`,
//! `ip6tables-*`, `ipset`, `ip`. Every call can run inside a named network namespace: the child
//! joins it with `setns(2)` between fork and exec (what `ip netns exec NAME` does, without an
//! extra process and mount namespace per call), which is how the tests and benches use a
//! throwaway netns while the agent itself stays in its own namespace to reach the broker.
//!
//! Calls are blocking (`std::process`); an async caller wraps them in `spawn_blocking`.

use dog_protocol::ruleset::Family;
use serde::{Deserialize, Serialize};
use std::io::{BufRead, BufReader, BufWriter, Read, Write};
use std::process::{Command, Stdio};
use std::time::Instant;
use tracing::debug;

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
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum BackendChoice {
    /// Detect like kube-proxy's iptables wrapper does.
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

/// Agent settings the kernel layer needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KernelConfig {
    /// Run every tool inside this named network namespace (`/run/netns/NAME`, as `ip netns`
    /// creates it); `None` = the agent's own namespace.
    pub netns: Option<String>,
    pub backend: BackendChoice,
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
            broker_port: Some(5672),
            lock_wait_secs: 5,
        }
    }
}

/// Runs the firewall tools of one host (or one network namespace).
#[derive(Clone, Debug)]
pub struct Kernel {
    /// The namespace tools run in, opened once (`/run/netns/NAME`).
    netns: Option<std::sync::Arc<std::fs::File>>,
    backend: Backend,
    pub(crate) config: KernelConfig,
    pub(crate) cache: crate::live::StateCache,
}

impl Kernel {
    /// Builds a kernel handle, detecting the backend unless the configuration fixes it.
    pub fn new(config: KernelConfig) -> Result<Self, KernelError> {
        let netns = match &config.netns {
            Some(ns) => {
                let path = std::path::Path::new("/run/netns").join(ns);
                let file = std::fs::File::open(&path).map_err(|source| KernelError::Spawn {
                    command: format!("open network namespace {}", path.display()),
                    source,
                })?;
                Some(std::sync::Arc::new(file))
            }
            None => None,
        };
        let mut k = Kernel {
            netns,
            backend: Backend::Nft,
            config,
            cache: Default::default(),
        };
        k.backend = match k.config.backend {
            BackendChoice::Nft => Backend::Nft,
            BackendChoice::Legacy => Backend::Legacy,
            BackendChoice::Auto => {
                let ev = k.backend_evidence()?;
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
        Ok(k)
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    pub fn config(&self) -> &KernelConfig {
        &self.config
    }

    /// Reads what [`choose_backend`] needs. A missing tool counts as an empty backend.
    pub fn backend_evidence(&self) -> Result<BackendEvidence, KernelError> {
        let save = |b: Backend, f: Family, table: Option<&str>| -> String {
            let tool = b.tool(f, "save");
            let args: Vec<&str> = match table {
                Some(t) => vec!["-t", t],
                None => vec![],
            };
            self.run(&tool, &args, None).unwrap_or_default()
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

    /// Runs `program args…` (in the configured namespace), feeding `stdin`, returning stdout.
    pub fn run(
        &self,
        program: &str,
        args: &[&str],
        stdin: Option<&[u8]>,
    ) -> Result<String, KernelError> {
        match stdin {
            Some(data) => self.exec(program, args, Some(&mut |w| w.write_all(data)), None),
            None => self.exec(program, args, None, None),
        }
    }

    /// Like [`Kernel::run`], but `feed` writes the tool's stdin (buffered, on its own thread)
    /// so a large input is generated while the tool reads it instead of being built first.
    pub fn run_feeding(
        &self,
        program: &str,
        args: &[&str],
        feed: &mut Feed<'_>,
    ) -> Result<(), KernelError> {
        self.exec(program, args, Some(feed), None).map(drop)
    }

    /// Like [`Kernel::run`] without stdin, but hands stdout to `on_line` line by line (without
    /// the newline) instead of collecting it.
    pub fn run_lines(
        &self,
        program: &str,
        args: &[&str],
        stdin: Option<&[u8]>,
        on_line: &mut dyn FnMut(&str),
    ) -> Result<(), KernelError> {
        match stdin {
            Some(data) => self.exec(
                program,
                args,
                Some(&mut |w| w.write_all(data)),
                Some(on_line),
            ),
            None => self.exec(program, args, None, Some(on_line)),
        }
        .map(drop)
    }

    /// The command for `program`, joining the configured namespace in the child.
    fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new(program);
        if let Some(ns) = &self.netns {
            use std::os::fd::AsRawFd;
            use std::os::unix::process::CommandExt;
            let fd = ns.as_raw_fd();
            // SAFETY: runs in the forked child before exec; setns(2) is a single system call
            // (async-signal-safe) on a descriptor this Kernel keeps open for its lifetime.
            unsafe {
                cmd.pre_exec(move || {
                    if libc::setns(fd, libc::CLONE_NEWNET) == 0 {
                        Ok(())
                    } else {
                        Err(std::io::Error::last_os_error())
                    }
                });
            }
        }
        cmd
    }

    /// Runs a tool: `feed` writes its stdin, `on_line` takes its stdout line by line (else
    /// stdout is returned); stderr is collected for the error.
    fn exec(
        &self,
        program: &str,
        args: &[&str],
        feed: Option<&mut Feed<'_>>,
        on_line: Option<&mut dyn FnMut(&str)>,
    ) -> Result<String, KernelError> {
        let mut command = program.to_string();
        for a in args {
            command.push(' ');
            command.push_str(a);
        }
        let started = Instant::now();
        let mut cmd = self.command(program);
        cmd.args(args)
            .stdin(if feed.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().map_err(|source| KernelError::Spawn {
            command: command.clone(),
            source,
        })?;
        let spawn_err = |source| KernelError::Spawn {
            command: command.clone(),
            source,
        };
        let (stdin, stdout, stderr) =
            (child.stdin.take(), child.stdout.take(), child.stderr.take());
        let mut input_bytes = 0u64;
        let (collected, err_text, status) = std::thread::scope(|s| {
            let writer = match (feed, stdin) {
                (Some(feed), Some(pipe)) => Some(s.spawn(move || {
                    let mut w = Counting {
                        inner: BufWriter::with_capacity(1 << 16, pipe),
                        bytes: 0,
                    };
                    // A tool that exits early closes the pipe; its exit status reports why.
                    let _ = feed(&mut w).and_then(|()| w.flush());
                    w.bytes
                })),
                _ => None,
            };
            let errors = s.spawn(move || {
                let mut v = Vec::new();
                if let Some(mut e) = stderr {
                    let _ = e.read_to_end(&mut v);
                }
                v
            });
            let mut collected = Vec::new();
            let read = match (stdout, on_line) {
                (Some(out), Some(on_line)) => {
                    let mut r = BufReader::with_capacity(1 << 16, out);
                    let mut line = Vec::with_capacity(128);
                    loop {
                        line.clear();
                        match r.read_until(b'\n', &mut line) {
                            Ok(0) => break Ok(()),
                            Ok(_) => {
                                let text = String::from_utf8_lossy(&line);
                                on_line(text.trim_end_matches('\n'));
                            }
                            Err(e) => break Err(e),
                        }
                    }
                }
                (Some(mut out), None) => out.read_to_end(&mut collected).map(drop),
                (None, _) => Ok(()),
            };
            let status = child.wait();
            if let Some(w) = writer {
                input_bytes = w.join().unwrap_or(0);
            }
            let err_text = errors.join().unwrap_or_default();
            (read.map(|()| collected), err_text, status)
        });
        let collected = collected.map_err(spawn_err)?;
        let status = status.map_err(spawn_err)?;
        debug!(
            command = %command,
            input_bytes,
            elapsed_ms = started.elapsed().as_secs_f64() * 1e3,
            "ran"
        );
        if !status.success() {
            return Err(KernelError::Failed {
                command,
                status: status.to_string(),
                stderr: String::from_utf8_lossy(&err_text).trim().to_string(),
            });
        }
        Ok(String::from_utf8_lossy(&collected).into_owned())
    }

    /// `iptables-save -t filter` (or ip6tables) of the detected backend.
    pub fn save_filter(&self, family: Family) -> Result<String, KernelError> {
        self.run(&self.backend.tool(family, "save"), &["-t", "filter"], None)
    }

    /// Saves a whole table (used by tests and coexistence checks).
    pub fn save_table(&self, family: Family, table: &str) -> Result<String, KernelError> {
        self.run(&self.backend.tool(family, "save"), &["-t", table], None)
    }

    /// `iptables-restore --noflush -w N` of `text`: one atomic transaction.
    pub fn restore_noflush(&self, family: Family, text: &str) -> Result<(), KernelError> {
        let wait = self.config.lock_wait_secs.to_string();
        self.run(
            &self.backend.tool(family, "restore"),
            &["--noflush", "-w", &wait],
            Some(text.as_bytes()),
        )
        .map(drop)
    }

    /// Runs `iptables args…` (with `-w`) of the detected backend.
    pub fn iptables(&self, family: Family, args: &[&str]) -> Result<String, KernelError> {
        let wait = self.config.lock_wait_secs.to_string();
        let mut v = vec!["-w", &wait];
        v.extend_from_slice(args);
        self.run(&self.backend.tool(family, ""), &v, None)
    }

    /// `ipset restore` (with `-exist` when asked) of a script.
    pub fn ipset_restore(&self, script: &str, exist: bool) -> Result<(), KernelError> {
        self.ipset_restore_with(exist, &mut |w| w.write_all(script.as_bytes()))
    }

    /// `ipset restore` of a script that `feed` writes while ipset reads it.
    pub fn ipset_restore_with(&self, exist: bool, feed: &mut Feed<'_>) -> Result<(), KernelError> {
        let args: &[&str] = if exist {
            &["restore", "-exist"]
        } else {
            &["restore"]
        };
        self.run_feeding("ipset", args, feed)
    }

    /// Names of all sets in the namespace.
    pub fn ipset_names(&self) -> Result<Vec<String>, KernelError> {
        Ok(self
            .run("ipset", &["list", "-n"], None)?
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(str::to_string)
            .collect())
    }

    /// `ipset save` of the named sets only, in one call (ipset's batch mode).
    pub fn ipset_save(&self, names: &[String]) -> Result<String, KernelError> {
        let mut out = String::new();
        self.ipset_save_lines(names, &mut |l| {
            out.push_str(l);
            out.push('\n');
        })?;
        Ok(out)
    }

    /// [`Kernel::ipset_save`] handed over line by line, without holding the whole text (a
    /// 1,000,000-entry set prints about 30 MB).
    pub fn ipset_save_lines(
        &self,
        names: &[String],
        on_line: &mut dyn FnMut(&str),
    ) -> Result<(), KernelError> {
        match names {
            [] => Ok(()),
            [one] => self.run_lines("ipset", &["save", one], None, on_line),
            many => {
                let script: String = many.iter().map(|n| format!("save {n}\n")).collect();
                // batch mode prints a prompt before each command's output
                self.run_lines("ipset", &["-"], Some(script.as_bytes()), &mut |l| {
                    let mut l = l;
                    while let Some(rest) = l.strip_prefix("ipset> ") {
                        l = rest;
                    }
                    on_line(l)
                })
            }
        }
    }

    /// `ip -j addr` output.
    pub fn ip_addr_json(&self) -> Result<String, KernelError> {
        self.run("ip", &["-j", "addr"], None)
    }
}

/// Writes a tool's stdin (see [`Kernel::run_feeding`]).
pub type Feed<'a> = dyn FnMut(&mut dyn Write) -> std::io::Result<()> + Send + 'a;

/// Counts the bytes written through it (for the debug log).
struct Counting<W> {
    inner: W,
    bytes: u64,
}

impl<W: Write> Write for Counting<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.bytes += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
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
