//! Runs the kernel's command-line tools (`iptables-*-save/-restore`, `ipset`, `ip`), each
//! inside the configured network namespace, so tests and benches use a throwaway namespace
//! while the agent itself stays in its own to reach the broker. The children are started by a
//! thread that joined the namespace once (a child is born in its parent thread's namespace):
//! no extra process per call as with `ip netns exec`, and no `fork` of the whole agent as a
//! `setns` between fork and exec would need (which copies the agent's page tables, the most of
//! a tool call's cost for 200 agents on one machine); the standard library then uses
//! `posix_spawn`. Calls are blocking; an async caller wraps them in `spawn_blocking`.

use super::KernelError;
use std::io::{BufRead, BufReader, BufWriter, Read, Write};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Instant;
use tracing::debug;

/// Writes a tool's stdin (see [`Runner::run_feeding`]).
pub type Feed<'a> = dyn FnMut(&mut dyn Write) -> std::io::Result<()> + Send + 'a;

/// A command to start, and where to send the started child.
type SpawnJob = (Command, mpsc::Sender<std::io::Result<Child>>);

/// A thread living in the tools' namespace that starts their processes.
#[derive(Debug)]
struct Spawner {
    jobs: Mutex<mpsc::Sender<SpawnJob>>,
}

impl Spawner {
    /// Starts the thread and joins it to `ns`.
    fn start(ns: &std::fs::File) -> std::io::Result<Spawner> {
        let ns = ns.try_clone()?;
        let (jobs, rx) = mpsc::channel::<SpawnJob>();
        let (ready_tx, ready) = mpsc::channel();
        std::thread::Builder::new()
            .name("netns-spawner".into())
            .spawn(move || {
                let joined = nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)
                    .map_err(std::io::Error::from);
                let ok = joined.is_ok();
                let _ = ready_tx.send(joined);
                if !ok {
                    return;
                }
                // until every runner sharing it is gone
                for (mut cmd, reply) in rx {
                    let _ = reply.send(cmd.spawn());
                }
            })?;
        ready
            .recv()
            .map_err(|_| std::io::Error::other("the spawner thread ended"))??;
        Ok(Spawner {
            jobs: Mutex::new(jobs),
        })
    }

    fn spawn(&self, cmd: Command) -> std::io::Result<Child> {
        let (tx, rx) = mpsc::channel();
        self.jobs
            .lock()
            .map_err(|_| std::io::Error::other("spawner poisoned"))?
            .send((cmd, tx))
            .map_err(|_| std::io::Error::other("the spawner thread ended"))?;
        rx.recv()
            .map_err(|_| std::io::Error::other("the spawner thread ended"))?
    }
}

/// Runs tools in one network namespace.
#[derive(Clone, Debug, Default)]
pub struct Runner {
    /// The namespace tools run in, opened once (`/run/netns/NAME`).
    netns: Option<Arc<std::fs::File>>,
    /// Starts the tools inside `netns`.
    spawner: Option<Arc<Spawner>>,
}

impl Runner {
    /// A runner for `netns` (`/run/netns/NAME`, as `ip netns` creates it), or for the agent's
    /// own namespace.
    pub fn new(netns: Option<&str>) -> Result<Self, KernelError> {
        let Some(ns) = netns else {
            return Ok(Runner::default());
        };
        let path = std::path::Path::new("/run/netns").join(ns);
        let open_err = |source| KernelError::Spawn {
            command: format!("open network namespace {}", path.display()),
            source,
        };
        let file = std::fs::File::open(&path).map_err(open_err)?;
        let spawner = Spawner::start(&file).map_err(open_err)?;
        Ok(Runner {
            netns: Some(Arc::new(file)),
            spawner: Some(Arc::new(spawner)),
        })
    }

    /// The namespace, when one is configured.
    pub fn netns(&self) -> Option<&std::fs::File> {
        self.netns.as_deref()
    }

    /// Runs `program args…`, feeding `stdin`, returning stdout.
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

    /// Like [`Runner::run`], but `feed` writes the tool's stdin (buffered, on its own thread)
    /// so a large input is generated while the tool reads it instead of being built first.
    pub fn run_feeding(
        &self,
        program: &str,
        args: &[&str],
        feed: &mut Feed<'_>,
    ) -> Result<(), KernelError> {
        self.exec(program, args, Some(feed), None).map(drop)
    }

    /// Like [`Runner::run`], but hands stdout to `on_line` line by line (without the newline)
    /// instead of collecting it.
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

    /// Starts `cmd` inside the configured namespace.
    fn spawn(&self, mut cmd: Command) -> std::io::Result<Child> {
        match &self.spawner {
            Some(s) => s.spawn(cmd),
            None => cmd.spawn(),
        }
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
        let mut cmd = Command::new(program);
        cmd.args(args)
            .stdin(if feed.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = self.spawn(cmd).map_err(|source| KernelError::Spawn {
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
}

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
