//! What every crate's tests need and used to write for themselves: names no other running test
//! uses ([`unique`]), a free loopback port ([`free_port`]), waiting for a condition with a
//! deadline instead of sleeping ([`poll_until`], [`wait_until`]), and child processes that get
//! SIGKILL when the test process dies ([`spawn_kept`]). Dev-only: no product crate depends on
//! it.

use std::process::{Child, Command};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{mpsc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// A name no other test of any running test process uses: `<stem>-<pid>-<n>`.
pub fn unique(stem: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "{stem}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    )
}

/// A loopback TCP port that was free a moment ago. The port is released before it is
/// returned, so another process can take it in between; use it only for a server the test
/// starts itself right away (and that fails loudly when the port is taken), never as proof.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// Checks `cond` every `every` until it holds (true) or `timeout` has passed (false). The
/// deadline is checked after the condition, so a condition that holds at the deadline counts.
pub fn poll_until(timeout: Duration, every: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(every);
    }
}

/// Polls `cond` every 100 ms until it holds; panics naming `what` after `secs` seconds.
pub fn wait_until(what: &str, secs: u64, cond: impl FnMut() -> bool) {
    assert!(
        poll_until(Duration::from_secs(secs), Duration::from_millis(100), cond),
        "timed out after {secs} s: {what}"
    );
}

type SpawnJob = Box<dyn FnOnce() -> std::io::Result<Child> + Send>;
type SpawnRequest = (SpawnJob, mpsc::Sender<std::io::Result<Child>>);

/// Spawns `cmd` so that it gets SIGKILL when the test process dies (`PR_SET_PDEATHSIG`).
/// Children are spawned from one thread that never ends, because the signal fires when the
/// spawning *thread* exits, and every test runs on a thread of its own.
pub fn spawn_kept(mut cmd: Command) -> std::io::Result<Child> {
    static SPAWNER: OnceLock<Mutex<mpsc::Sender<SpawnRequest>>> = OnceLock::new();
    let tx = SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<SpawnRequest>();
        std::thread::spawn(move || {
            for (job, reply) in rx {
                let _ = reply.send(job());
            }
            // keep the thread (and with it the children) alive until the process exits
            loop {
                std::thread::park();
            }
        });
        Mutex::new(tx)
    });
    let (reply_tx, reply_rx) = mpsc::channel();
    let job: SpawnJob = Box::new(move || {
        use std::os::unix::process::CommandExt;
        // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        cmd.spawn()
    });
    tx.lock()
        .unwrap_or_else(|p| p.into_inner())
        .send((job, reply_tx))
        .map_err(|_| std::io::Error::other("the spawner thread ended"))?;
    reply_rx
        .recv()
        .map_err(|_| std::io::Error::other("the spawner thread ended"))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unique_names_differ() {
        assert_ne!(unique("t"), unique("t"));
    }

    #[test]
    fn poll_until_reports_success_and_timeout() {
        let mut n = 0;
        assert!(poll_until(
            Duration::from_secs(5),
            Duration::from_millis(1),
            || {
                n += 1;
                n == 3
            }
        ));
        assert_eq!(n, 3);
        assert!(!poll_until(
            Duration::from_millis(20),
            Duration::from_millis(5),
            || false
        ));
    }

    #[test]
    fn a_kept_child_runs_and_is_reaped() {
        let mut c = spawn_kept(Command::new("true")).expect("spawn true");
        assert!(c.wait().expect("wait").success());
    }
}
