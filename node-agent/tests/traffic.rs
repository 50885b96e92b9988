//! Real traffic through an applied firewall: two namespaces joined by a veth pair; the server
//! side accepts tcp port A from the client's set and drops port B, IPv4 and IPv6.

mod common;

use common::*;
use dog_agent::kernel::BackendChoice;
use dog_agent::netns::{self, NetNs};
use dog_protocol::ruleset::Family;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

const OPEN: u16 = 18001;
const CLOSED: u16 = 18002;

fn in_ns<T: Send>(ns: &NetNs, f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|s| {
        s.spawn(|| {
            ns.enter_current_thread().unwrap();
            f()
        })
        .join()
        .unwrap()
    })
}

fn connects(client: &NetNs, addr: &str) -> bool {
    let addr: SocketAddr = addr.parse().unwrap();
    in_ns(client, || {
        TcpStream::connect_timeout(&addr, Duration::from_millis(700)).is_ok()
    })
}

#[test]
fn firewall_accepts_port_a_and_drops_port_b_for_real() {
    if !netns::available("firewall_accepts_port_a_and_drops_port_b_for_real") {
        return;
    }
    for backend in BACKENDS {
        let server = NetNs::new().unwrap();
        let client = NetNs::new().unwrap();
        server
            .link(
                &client,
                &["198.18.0.1/24", "fd00:d06::1/64"],
                &["198.18.0.2/24", "fd00:d06::2/64"],
            )
            .unwrap();
        // listeners live in the server namespace (the kernel completes handshakes from the
        // backlog; nothing needs to accept)
        let _listeners: Vec<TcpListener> = in_ns(&server, || {
            [OPEN, CLOSED]
                .iter()
                // dual-stack: takes IPv4 (mapped) and IPv6
                .map(|p| TcpListener::bind(("::", *p)).unwrap())
                .collect()
        });
        let targets = [
            (format!("198.18.0.1:{OPEN}"), true),
            (format!("198.18.0.1:{CLOSED}"), false),
            (format!("[fd00:d06::1]:{OPEN}"), true),
            (format!("[fd00:d06::1]:{CLOSED}"), false),
        ];
        for (t, _) in &targets {
            assert!(
                connects(&client, t),
                "{backend:?}: {t} reachable before dog"
            );
        }
        let fw = firewall(
            &[&format!("-A DOG-INPUT -p tcp -m set --match-set dogz4-client src -m tcp --dport {OPEN} -j ACCEPT"), "-A DOG-INPUT -j DROP"],
            &[&format!("-A DOG-INPUT -p tcp -m set --match-set dogz6-client src -m tcp --dport {OPEN} -j ACCEPT"), "-A DOG-INPUT -j DROP"],
            vec![
                set("dogz4-client", Family::V4, &["198.18.0.2"]),
                set("dogz6-client", Family::V6, &["fd00:d06::2"]),
            ],
        );
        let k = kernel(&server, backend);
        k.apply(&fw).unwrap();
        for (t, open) in &targets {
            assert_eq!(connects(&client, t), *open, "{backend:?}: {t}");
        }
        // the client leaves the set: port A closes too (a set delta, no rule change)
        let mut moved = fw.clone();
        moved.sets.insert(
            "dogz4-client".into(),
            set("dogz4-client", Family::V4, &["198.18.0.99"]),
        );
        let r = k.apply(&moved).unwrap();
        assert_eq!(r.plan.sets.delta.len(), 1);
        assert!(!connects(&client, &format!("198.18.0.1:{OPEN}")));
        assert!(connects(&client, &format!("[fd00:d06::1]:{OPEN}")));
        if backend == BackendChoice::Nft {
            k.remove_all().unwrap();
            assert!(
                connects(&client, &format!("198.18.0.1:{CLOSED}")),
                "open again after removal"
            );
        }
    }
}
