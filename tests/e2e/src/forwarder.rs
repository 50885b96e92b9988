//! A TCP forwarder in front of the broker that a test can stall in one direction: while it is
//! held, what the client sends (publishes, acknowledgements, its heartbeats) waits in the
//! forwarder, and what the broker sends (deliveries) still arrives. A client behind it sees a
//! broker that takes its messages and never confirms them.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};

/// Whether the client → broker direction is held, and the condition its pumps wait on.
type Gate = Arc<(Mutex<bool>, Condvar)>;

/// One forwarder on a loopback port of its own; stops accepting when dropped (the connections
/// it carries end with their client).
pub struct Forwarder {
    port: u16,
    gate: Gate,
    stopped: Arc<AtomicBool>,
}

impl Forwarder {
    /// Forwards every connection to `upstream` (`host:port`).
    pub fn start(upstream: &str) -> Forwarder {
        let listener = TcpListener::bind("127.0.0.1:0").expect("a loopback port for the forwarder");
        let port = listener.local_addr().expect("forwarder address").port();
        let gate: Gate = Arc::new((Mutex::new(false), Condvar::new()));
        let stopped = Arc::new(AtomicBool::new(false));
        let (upstream, accept_gate, accept_stopped) =
            (upstream.to_string(), gate.clone(), stopped.clone());
        std::thread::spawn(move || {
            for client in listener.incoming() {
                if accept_stopped.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(client) = client else { continue };
                let Ok(server) = TcpStream::connect(&upstream) else {
                    let _ = client.shutdown(Shutdown::Both);
                    continue;
                };
                let (Ok(client_in), Ok(server_out)) = (client.try_clone(), server.try_clone())
                else {
                    continue;
                };
                let gate = accept_gate.clone();
                std::thread::spawn(move || pump(client_in, server_out, Some(gate)));
                std::thread::spawn(move || pump(server, client, None));
            }
        });
        Forwarder {
            port,
            gate,
            stopped,
        }
    }

    /// The loopback port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The AMQP URL that reaches the broker (as its default user) through the forwarder.
    pub fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    /// From now on, what clients send waits here (a write already under way completes).
    pub fn hold(&self) {
        *self.gate.0.lock().expect("forwarder gate") = true;
    }

    /// Lets everything held, and everything after it, through.
    pub fn release(&self) {
        *self.gate.0.lock().expect("forwarder gate") = false;
        self.gate.1.notify_all();
    }
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        self.stopped.store(true, Ordering::SeqCst);
        self.release();
        // wakes the accept loop so that it sees the flag
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

/// Copies `from` to `to` until either side closes; with a gate, each chunk waits while the gate
/// is held.
fn pump(mut from: TcpStream, mut to: TcpStream, gate: Option<Gate>) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if let Some(gate) = &gate {
            let (held, changed) = &**gate;
            let mut is_held = held.lock().expect("forwarder gate");
            while *is_held {
                is_held = changed.wait(is_held).expect("forwarder gate");
            }
        }
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = to.shutdown(Shutdown::Write);
    let _ = from.shutdown(Shutdown::Read);
}
