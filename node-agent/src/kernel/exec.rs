//! Runs the kernel's command-line tools (`iptables-*-save/-restore`, `ipset`, `ip`), each
//! inside the configured network namespace: the child joins it with `setns(2)` between fork
//! and exec (what `ip netns exec NAME` does, without an extra process and mount namespace per
//! call), so tests and benches use a throwaway namespace while the agent itself stays in its
//! own to reach the broker. Calls are blocking; an async caller wraps them in `spawn_blocking`.

use super::KernelError;
use std::io::{BufRead, BufReader, BufWriter, Read, Write};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Instant;
use tracing::debug;

/// Writes a tool's stdin (see [`Runner::run_feeding`]).
pub type Feed<'a> = dyn FnMut(&mut dyn Write) -> std::io::Result<()> + Send + 'a;

/// Runs tools in one network namespace.
#[derive(Clone, Debug, Default)]
pub struct Runner {
    /// The namespace tools run in, opened once (`/run/netns/NAME`).
    netns: Option<Arc<std::fs::File>>,
}

impl Runner {
    /// A runner for `netns` (`/run/netns/NAME`, as `ip netns` creates it), or for the agent's
    /// own namespace.
    pub fn new(netns: Option<&str>) -> Result<Self, KernelError> {
        let netns = match netns {
            Some(ns) => {
                let path = std::path::Path::new("/run/netns").join(ns);
                let file = std::fs::File::open(&path).map_err(|source| KernelError::Spawn {
                    command: format!("open network namespace {}", path.display()),
                    source,
                })?;
                Some(Arc::new(file))
            }
            None => None,
        };
        Ok(Runner { netns })
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

    /// The command for `program`, joining the configured namespace in the child.
    fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new(program);
        if let Some(ns) = &self.netns {
            use std::os::unix::process::CommandExt;
            let ns = ns.clone();
            // SAFETY: runs in the forked child before exec; setns(2) is a single system call
            // (async-signal-safe) on a descriptor this runner keeps open for its lifetime.
            unsafe {
                cmd.pre_exec(move || {
                    nix::sched::setns(&*ns, nix::sched::CloneFlags::CLONE_NEWNET)
                        .map_err(std::io::Error::from)
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
