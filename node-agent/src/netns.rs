//! Throwaway network namespaces for tests and benches (`ip netns add dogt-<pid>-<n>`), deleted
//! by a Drop guard even when a test fails. Never used by the agent itself.

use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// Whether netns tests can run: true as root; otherwise panics with a clear message unless
/// `DOG_SKIP_NETNS=1`, in which case it prints that the test is skipped and returns false.
pub fn available(test: &str) -> bool {
    let root = nix::unistd::geteuid().is_root();
    if root {
        return true;
    }
    if std::env::var("DOG_SKIP_NETNS").as_deref() == Ok("1") {
        eprintln!("{test}: skipped (needs root for network namespaces; DOG_SKIP_NETNS=1)");
        return false;
    }
    panic!("{test}: needs root to create network namespaces; run as root or set DOG_SKIP_NETNS=1 to skip");
}

/// A network namespace that is deleted when dropped.
#[derive(Debug)]
pub struct NetNs {
    name: String,
}

/// Runs a command, returning stdout, or an error naming the command and its stderr.
pub fn sh(args: &[&str]) -> Result<String, String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .map_err(|e| format!("{}: {e}", args.join(" ")))?;
    if !out.status.success() {
        return Err(format!(
            "{} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

impl NetNs {
    /// Creates `dogt-<pid>-<n>` with loopback up.
    pub fn new() -> Result<Self, String> {
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let name = format!("dogt-{}-{n}", std::process::id());
        sh(&["ip", "netns", "add", &name])?;
        let ns = NetNs { name };
        ns.exec(&["ip", "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs a command inside the namespace.
    pub fn exec(&self, args: &[&str]) -> Result<String, String> {
        let mut v = vec!["ip", "netns", "exec", &self.name];
        v.extend_from_slice(args);
        sh(&v)
    }

    /// Runs a shell snippet inside the namespace.
    pub fn shell(&self, script: &str) -> Result<String, String> {
        self.exec(&["sh", "-c", script])
    }

    /// Moves the calling thread into this namespace (children it spawns inherit it). Use on a
    /// dedicated thread.
    pub fn enter_current_thread(&self) -> std::io::Result<()> {
        let f = std::fs::File::open(format!("/run/netns/{}", self.name))?;
        nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET)?;
        Ok(())
    }

    /// Joins `self` and `other` with a veth pair, `self_addrs`/`other_addrs` in CIDR form.
    pub fn link(
        &self,
        other: &NetNs,
        self_addrs: &[&str],
        other_addrs: &[&str],
    ) -> Result<(), String> {
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let (a, b) = (format!("dva{n}"), format!("dvb{n}"));
        self.exec(&[
            "ip",
            "link",
            "add",
            &a,
            "type",
            "veth",
            "peer",
            "name",
            &b,
            "netns",
            &other.name,
        ])?;
        for (ns, dev, addrs) in [(self, &a, self_addrs), (other, &b, other_addrs)] {
            for addr in addrs {
                let extra: &[&str] = if addr.contains(':') { &["nodad"] } else { &[] };
                let mut cmd = vec!["ip", "addr", "add", addr, "dev", dev];
                cmd.extend_from_slice(extra);
                ns.exec(&cmd)?;
            }
            ns.exec(&["ip", "link", "set", dev, "up"])?;
        }
        Ok(())
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        if let Err(e) = sh(&["ip", "netns", "del", &self.name]) {
            eprintln!("could not delete netns {}: {e}", self.name);
        }
    }
}
