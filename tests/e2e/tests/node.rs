//! A realistic Kubernetes node, in network namespaces: two nodes, each with a pod behind a
//! `cni0` bridge, a VXLAN overlay (flannel's port 8472) carrying pod-to-pod traffic between the
//! nodes, a kube-proxy-like NodePort DNAT chain, a "Prometheus" namespace scraping the agents'
//! metrics port, and a deny-all Profile (default DROP both ways) on both nodes. The agents run
//! inside the node namespaces, as a host-network DaemonSet pod does.
//!
//! What the cluster profile must keep working: pod to pod across nodes, NodePort (to a pod and
//! to a host-network backend), the metrics scrape over IPv4 and IPv6, kubelet and ssh, the
//! node's own pods reaching the host. What the profile denies stays denied. Both iptables
//! backends.

use dog_e2e::{require_root, Fleet};

const METRICS: u16 = 10291;

fn must(f: &Fleet, node: &str, cmd: &str) {
    let out = f.exec(node, &["sh", "-c", cmd]);
    assert!(
        out.status.success(),
        "{node}: `{cmd}` failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Pod `pod` of node `node` (index `i`): 10.244.<i>.2 behind the node's cni0 (10.244.<i>.1).
fn wire_pod(f: &Fleet, node: &str, pod: &str, i: u32) {
    // the pod namespace came with a LAN interface: a pod has none
    must(f, pod, "ip link del eth0");
    let veth = format!("vp{}{i}", f.net);
    let pod_ns = f.ns(pod);
    must(
        f,
        node,
        &format!(
            "ip link add cni0 type bridge && ip addr add 10.244.{i}.1/24 dev cni0 && ip link set cni0 up && \
             ip link add {veth} type veth peer name eth0 netns {pod_ns} && ip link set {veth} master cni0 up && \
             sysctl -qw net.ipv4.ip_forward=1"
        ),
    );
    must(
        f,
        pod,
        &format!("ip addr add 10.244.{i}.2/24 dev eth0 && ip link set eth0 up && ip route add default via 10.244.{i}.1"),
    );
}

/// The overlay: a point-to-point VXLAN on udp 8472 between the nodes' LAN addresses.
fn wire_overlay(f: &Fleet, node: &str, i: u32, peer: &str, j: u32) {
    must(
        f,
        node,
        &format!(
            "ip link add flannel.1 type vxlan id 1 local {} remote {} dstport 8472 dev eth0 && \
             ip addr add 10.245.0.{i}/24 dev flannel.1 && ip link set flannel.1 up && \
             ip route add 10.244.{j}.0/24 via 10.245.0.{j} dev flannel.1",
            f.v4(node),
            f.v4(peer)
        ),
    );
}

/// kube-proxy's shape: a NodePort chain in the nat table jumping to DNAT rules.
fn wire_node_ports(f: &Fleet, node: &str, i: u32, iptables: &str) {
    let host = f.v4(node);
    must(
        f,
        node,
        &format!(
            "{iptables} -t nat -N KUBE-NODEPORTS && \
             {iptables} -t nat -A PREROUTING -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS && \
             {iptables} -t nat -A KUBE-NODEPORTS -p tcp --dport 30080 -j DNAT --to-destination 10.244.{i}.2:80 && \
             {iptables} -t nat -A KUBE-NODEPORTS -p tcp --dport 30081 -j DNAT --to-destination {host}:8081"
        ),
    );
}

fn resources(f: &Fleet) {
    f.write(
        "fleet.yaml",
        &format!(
            r#"apiVersion: dogfw.io/v1alpha1
kind: Group
metadata: {{name: nodes}}
spec:
  profile: deny-all
  hosts: ["{n1}", "{n2}"]
---
apiVersion: dogfw.io/v1alpha1
kind: Profile
metadata: {{name: deny-all}}
spec:
  defaultInbound: DROP
  defaultOutbound: DROP
  # rules that try to lock the node out come after the failsafe and cluster rules: no effect
  inbound:
    - {{name: no-ssh, action: DROP, protocol: tcp, ports: ["22", "10250"]}}
  outbound:
    - {{name: no-broker, action: REJECT, protocol: tcp, ports: ["5671", "5672"]}}
"#,
            n1 = f.host("n1"),
            n2 = f.host("n2"),
        ),
    );
}

fn scrape(f: &Fleet, from: &str, addr: &str) -> bool {
    let url = if addr.contains(':') {
        format!("http://[{addr}]:{METRICS}/metrics")
    } else {
        format!("http://{addr}:{METRICS}/metrics")
    };
    let out = f.exec(from, &["curl", "-sf", "--max-time", "2", &url]);
    out.status.success() && String::from_utf8_lossy(&out.stdout).contains("dog_agent_")
}

#[test]
fn a_deny_all_profile_keeps_a_realistic_node_working_on_both_backends() {
    if !require_root() {
        return;
    }
    for (backend, iptables) in [("nft", "iptables-nft"), ("legacy", "iptables-legacy")] {
        let mut f = Fleet::new(&["n1", "n2", "prom", "p1", "p2"]);
        wire_pod(&f, "n1", "p1", 1);
        wire_pod(&f, "n2", "p2", 2);
        wire_overlay(&f, "n1", 1, "n2", 2);
        wire_overlay(&f, "n2", 2, "n1", 1);
        wire_node_ports(&f, "n2", 2, iptables);
        for node in ["n1", "n2"] {
            f.serve_tcp(node, 22);
            f.serve_tcp(node, 10250);
            f.serve_tcp(node, 8080); // a host service the profile does not allow
        }
        f.serve_tcp("n2", 8081); // a host-network NodePort backend
        f.serve_tcp("p2", 80);
        f.serve_tcp("prom", 9999);

        // the plumbing works before dog is there (so a failure below is dog's)
        assert!(f.tcp("p1", "10.244.2.2", 80), "{backend}: overlay");
        let n2 = f.v4("n2");
        assert!(f.tcp("prom", &n2, 30080), "{backend}: NodePort");

        resources(&f);
        f.start_operator_with(&[
            "--cni",
            "flannel",
            "--agent-metrics-port",
            &METRICS.to_string(),
        ]);
        for node in ["n1", "n2"] {
            f.start_agent_inside(node, METRICS, &["--iptables-backend", backend]);
        }
        let hosts = [f.host("n1"), f.host("n2")];
        f.wait_status(&format!("{backend}: both nodes run deny-all"), 60, |st| {
            hosts.iter().all(|h| Fleet::in_sync(st, h))
        });
        let save = String::from_utf8_lossy(
            &f.exec("n1", &[&format!("{iptables}-save"), "-t", "filter"])
                .stdout,
        )
        .to_string();
        assert!(
            save.contains("dog:cluster:inbound")
                && save
                    .contains("-A DOG-INPUT -m comment --comment \"dog:deny-all:default\" -j DROP"),
            "{backend}: {save}"
        );

        let (n1, n1_v6) = (f.v4("n1"), f.v6("n1"));
        // what the node needs
        assert!(
            f.tcp("p1", "10.244.2.2", 80),
            "{backend}: pod to pod over VXLAN"
        );
        assert!(
            f.tcp("p1", "10.244.1.1", 8080),
            "{backend}: own pod to host (podToHost)"
        );
        assert!(f.tcp("prom", &n2, 30080), "{backend}: NodePort to a pod");
        assert!(
            f.tcp("prom", &n2, 30081),
            "{backend}: NodePort to a host-network backend"
        );
        assert!(scrape(&f, "prom", &n1), "{backend}: metrics over IPv4");
        assert!(scrape(&f, "prom", &n1_v6), "{backend}: metrics over IPv6");
        for port in [22, 10250] {
            assert!(f.tcp("prom", &n1, port), "{backend}: failsafe port {port}");
            assert!(
                f.tcp("prom", &n1_v6, port),
                "{backend}: failsafe port {port} (IPv6)"
            );
        }
        // what the profile denies
        assert!(
            !f.tcp("prom", &n1, 8080),
            "{backend}: inbound 8080 is denied"
        );
        assert!(
            !f.tcp("prom", &n1_v6, 8080),
            "{backend}: inbound 8080 is denied (IPv6)"
        );
        assert!(
            !f.tcp("prom", &n2, 8081),
            "{backend}: 8081 only through the NodePort"
        );
        let prom = f.v4("prom");
        assert!(!f.tcp("n1", &prom, 9999), "{backend}: outbound is denied");
        assert!(
            !f.tcp("p2", "10.244.1.1", 8080),
            "{backend}: another node's pod is not the node's own"
        );

        // the broker connection survived the profile: a change still reaches both agents
        let text = std::fs::read_to_string(f.resources().join("fleet.yaml")).unwrap();
        f.write(
            "fleet.yaml",
            &text.replace(
                "    - {name: no-ssh",
                "    - {name: web, action: ACCEPT, protocol: tcp, ports: [\"8080\"]}\n    - {name: no-ssh",
            ),
        );
        f.wait_status(
            &format!("{backend}: the edit reaches both nodes"),
            60,
            |st| {
                hosts.iter().all(|h| Fleet::in_sync(st, h))
                    && st
                        .profiles
                        .get("deny-all")
                        .is_some_and(|p| p.inbound_rules == 2)
            },
        );
        assert!(f.tcp("prom", &n1, 8080), "{backend}: the new rule applies");
    }
}
