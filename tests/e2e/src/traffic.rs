//! Traffic between the fleet's namespaces: servers in a node, and TCP, UDP and ICMP probes from another.

use super::*;

impl Fleet {
    /// Runs `socat LISTEN ACTION` in `node` until the fleet is dropped, and returns once the
    /// socket listens (`ss` in the namespace shows it), so a check right after cannot race the
    /// listener's start on a loaded machine.
    pub(super) fn serve(
        &mut self,
        node: &str,
        listen: String,
        action: &str,
        proto: &str,
        port: u16,
    ) {
        self.serve_with(node, &["socat", &listen, action], proto, port);
    }

    pub(super) fn serve_with(&mut self, node: &str, command: &[&str], proto: &str, port: u16) {
        let child = Command::new("ip")
            .args(["netns", "exec", &self.ns(node)])
            .args(command)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("socat");
        self.extra.push(child);
        let ns = self.ns(node);
        let filter = format!("sport = :{port}");
        self.wait(&format!("{proto} listener on {node}:{port}"), 20, || {
            let out = sh(&["ip", "netns", "exec", &ns, "ss", "-Hln", proto, &filter]);
            out.status.success() && !out.stdout.is_empty()
        });
    }

    /// Starts a TCP listener in `node` on `port` (both families) that accepts and closes.
    pub fn serve_tcp(&mut self, node: &str, port: u16) {
        self.serve(
            node,
            format!("TCP6-LISTEN:{port},fork,reuseaddr,ipv6only=0"),
            "EXEC:/bin/true",
            "-t",
            port,
        );
    }

    /// Starts a UDP responder in `node` on `port` (both families) answering `pong` to every
    /// datagram, from one process: no fork per datagram that a loaded machine could delay, and
    /// no per-peer child that holds the port (socat's UDP-LISTEN does both).
    pub fn serve_udp(&mut self, node: &str, port: u16) {
        let port_text = port.to_string();
        self.serve_with(
            node,
            &[
                "python3",
                "-c",
                "import socket,sys\n\
                 s=socket.socket(socket.AF_INET6,socket.SOCK_DGRAM)\n\
                 s.setsockopt(socket.IPPROTO_IPV6,socket.IPV6_V6ONLY,0)\n\
                 s.bind(('::',int(sys.argv[1])))\n\
                 while True:\n _,a=s.recvfrom(65535)\n s.sendto(b'pong\\n',a)\n",
                &port_text,
            ],
            "-u",
            port,
        );
    }

    pub(super) fn target(addr: &str) -> String {
        if addr.contains(':') {
            format!("[{addr}]")
        } else {
            addr.to_string()
        }
    }

    pub(super) fn connect(&self, from: &str, addr: &str, port: u16) -> std::process::Output {
        sh(&[
            "ip",
            "netns",
            "exec",
            &self.ns(from),
            "socat",
            "-T1",
            "/dev/null",
            &format!("TCP:{}:{port},connect-timeout=1", Self::target(addr)),
        ])
    }

    /// Whether a TCP connection from `from` to `addr:port` is established within a second.
    pub fn tcp(&self, from: &str, addr: &str, port: u16) -> bool {
        self.connect(from, addr, port).status.success()
    }

    /// One TCP connection attempt, classified: `Accept` (established), `Reject` (refused by a
    /// RST or ICMP answer) or `Drop` (no answer). One attempt, because the kernel rate-limits
    /// the ICMP errors a REJECT sends (a second attempt within a second may see none).
    pub fn tcp_outcome(&self, from: &str, addr: &str, port: u16) -> &'static str {
        let out = self.connect(from, addr, port);
        if out.status.success() {
            "Accept"
        } else if String::from_utf8_lossy(&out.stderr).contains("Connection refused") {
            "Reject"
        } else {
            "Drop"
        }
    }

    /// Whether a TCP connection attempt is actively refused (a RST or ICMP answer, as a REJECT
    /// rule gives) rather than established or left to time out (as a DROP rule does).
    pub fn tcp_refused(&self, from: &str, addr: &str, port: u16) -> bool {
        let out = self.connect(from, addr, port);
        !out.status.success() && String::from_utf8_lossy(&out.stderr).contains("Connection refused")
    }

    /// Whether a UDP datagram from `from` to `addr:port` gets the responder's answer, over up
    /// to two datagrams. UDP has no retransmission and the responder forks a shell per
    /// datagram, so on a loaded machine one answer can come late; "no answer"
    /// therefore means two datagrams went unanswered for two seconds each.
    pub fn udp(&self, from: &str, addr: &str, port: u16) -> bool {
        (0..2).any(|_| self.udp_once(from, addr, port))
    }

    pub(super) fn udp_once(&self, from: &str, addr: &str, port: u16) -> bool {
        let out = Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.ns(from),
                "socat",
                // after stdin's end socat waits -t for the answer (0.5 s by default)
                "-t2",
                "-T2",
                "-",
                &format!("UDP:{}:{port}", Self::target(addr)),
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .and_then(|mut c| {
                use std::io::Write;
                if let Some(mut i) = c.stdin.take() {
                    let _ = i.write_all(b"ping\n");
                }
                c.wait_with_output()
            });
        out.map(|o| String::from_utf8_lossy(&o.stdout).contains("pong"))
            .unwrap_or(false)
    }

    /// Whether an ICMP/ICMPv6 echo from `from` to `addr` is answered.
    pub fn ping(&self, from: &str, addr: &str) -> bool {
        sh(&[
            "ip",
            "netns",
            "exec",
            &self.ns(from),
            "ping",
            "-c1",
            "-W1",
            addr,
        ])
        .status
        .success()
    }
}
