//! dog never touches what is not its own: kube-proxy-, Docker- and CNI-like rules, the nat
//! table and foreign ipsets stay byte-identical through applies, changes, restarts and
//! removal, on both backends.

mod common;

use common::*;
use dog_agent::kernel::BackendChoice;
use dog_agent::netns::{self, NetNs};

fn install_foreign(ns: &NetNs, backend: BackendChoice) {
    let b = match backend {
        BackendChoice::Legacy => "legacy",
        _ => "nft",
    };
    let script = format!(
        r#"set -e
ipt() {{ iptables-{b} -w "$@"; }}
ip6t() {{ ip6tables-{b} -w "$@"; }}
ipt -N KUBE-FIREWALL
ipt -A KUBE-FIREWALL -m comment --comment "kube-proxy firewall" -m mark --mark 0x8000/0x8000 -j DROP
ipt -I INPUT -j KUBE-FIREWALL
ipt -N KUBE-SERVICES
ipt -A KUBE-SERVICES -d 10.96.0.10/32 -p udp -m udp --dport 53 -j ACCEPT
ipt -A INPUT -m conntrack --ctstate NEW -j KUBE-SERVICES
ipt -A OUTPUT -m conntrack --ctstate NEW -j KUBE-SERVICES
ipt -N DOCKER
ipt -N DOCKER-USER
ipt -A DOCKER -d 172.17.0.2/32 ! -i docker0 -o docker0 -p tcp -m tcp --dport 80 -j ACCEPT
ipt -A DOCKER-USER -j RETURN
ipt -A FORWARD -j DOCKER-USER
ipt -A FORWARD -o docker0 -j DOCKER
ipt -A FORWARD -s 10.244.0.0/16 -j ACCEPT
ipt -A FORWARD -m set --match-set KUBE-CLUSTER-IP dst,dst -j ACCEPT
ipt -t nat -N DOCKER
ipt -t nat -A PREROUTING -m addrtype --dst-type LOCAL -j DOCKER
ipt -t nat -A POSTROUTING -s 172.17.0.0/16 ! -o docker0 -j MASQUERADE
ipt -t nat -A DOCKER -p tcp -m tcp --dport 8080 -j DNAT --to-destination 172.17.0.2:80
ip6t -N KUBE-FIREWALL
ip6t -A KUBE-FIREWALL -j RETURN
ip6t -I INPUT -j KUBE-FIREWALL
ip6t -A FORWARD -s fd00:244::/64 -j ACCEPT
"#
    );
    ns.exec(&["ipset", "create", "KUBE-CLUSTER-IP", "hash:ip,port"])
        .unwrap();
    ns.exec(&["ipset", "add", "KUBE-CLUSTER-IP", "10.96.0.1,tcp:443"])
        .unwrap();
    ns.exec(&["ipset", "create", "cali40all-hosts", "hash:net"])
        .unwrap();
    ns.exec(&["ipset", "add", "cali40all-hosts", "192.0.2.0/24"])
        .unwrap();
    ns.shell(&script).unwrap();
}

#[test]
fn foreign_rules_chains_nat_and_sets_are_never_touched() {
    if !netns::available("foreign_rules_chains_nat_and_sets_are_never_touched") {
        return;
    }
    for backend in BACKENDS {
        let ns = NetNs::new().unwrap();
        install_foreign(&ns, backend);
        let original = full_state(&ns);
        let foreign = foreign_state(&ns);
        assert_eq!(original, foreign, "nothing of dog's yet");
        assert!(foreign.contains("MASQUERADE") && foreign.contains("KUBE-CLUSTER-IP"));

        let k = kernel(&ns, backend);
        for fw in [fw1(), fw2(), fw2(), fw1()] {
            k.apply(&fw).unwrap();
            assert_eq!(foreign_state(&ns), foreign, "{backend:?}");
            assert_eq!(k.live_hashes().unwrap(), fw.hashes());
        }
        // dog's jumps are first, foreign INPUT rules keep their order behind them
        let ipt = if backend == BackendChoice::Legacy {
            "iptables-legacy"
        } else {
            "iptables-nft"
        };
        let input = ns.exec(&[ipt, "-S", "INPUT"]).unwrap();
        let rules: Vec<&str> = input.lines().filter(|l| l.starts_with("-A")).collect();
        assert_eq!(rules[0], "-A INPUT -j DOG-INPUT", "{input}");
        assert_eq!(rules[1], "-A INPUT -j KUBE-FIREWALL");

        // a "restart": a new kernel handle re-verifies and keeps enforcing
        let restarted = kernel(&ns, backend);
        assert!(restarted.verify(&fw1()).unwrap().is_clean());
        assert!(!restarted.apply(&fw1()).unwrap().changed());
        // drift repair does not disturb the neighbours either
        ns.exec(&["ipset", "flush", "dogz4-web"]).unwrap();
        restarted.repair(&fw1()).unwrap();
        assert_eq!(foreign_state(&ns), foreign);

        restarted.remove_all().unwrap();
        assert_eq!(
            full_state(&ns),
            original,
            "{backend:?}: exactly as before dog"
        );
    }
}
