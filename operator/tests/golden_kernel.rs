//! Golden kernel tests: what the compiler renders is exactly what iptables-save / ipset save
//! print back, for both the nft and the legacy iptables backends, and loading dog's documents
//! leaves every foreign chain, table and set untouched.
//!
//! Each test works in its own throwaway network namespace (deleted by a Drop guard) and never
//! touches the root namespace's firewall. Needs root; with DOG_SKIP_NETNS=1 the tests skip.

use dog_operator::core::compile::{compile, CompileOptions, Compiled, HostOutcome};
use dog_operator::dir::load::load_dir;
use dog_protocol::ruleset::{
    owned_lines, parse_ipset_save, rules_hash, Family, IpSet, RulesDocument,
};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// A network namespace that is deleted when dropped.
struct Netns(String);

impl Netns {
    /// None when the test should be skipped (not root and DOG_SKIP_NETNS=1).
    fn new() -> Option<Netns> {
        let root = Command::new("id")
            .arg("-u")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
            .unwrap_or(false);
        if !root {
            if std::env::var("DOG_SKIP_NETNS").as_deref() == Ok("1") {
                eprintln!("skipped: needs root for network namespaces (DOG_SKIP_NETNS=1)");
                return None;
            }
            panic!(
                "this test needs root to create network namespaces; set DOG_SKIP_NETNS=1 to skip"
            );
        }
        let name = dog_test_support::unique("dogt-c");
        let st = Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .expect("run ip");
        assert!(st.success(), "ip netns add {name} failed");
        Some(Netns(name))
    }

    /// Runs `cmd args` inside the namespace with `stdin`, returns stdout; panics on failure.
    fn run(&self, cmd: &str, args: &[&str], stdin: &str) -> String {
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.0, cmd])
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {cmd}: {e}"));
        child
            .stdin
            .take()
            .unwrap()
            .write_all(stdin.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{cmd} {args:?} failed: {}\ninput:\n{stdin}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

#[derive(Clone, Copy, Debug)]
enum Backend {
    Nft,
    Legacy,
}

impl Backend {
    fn tool(self, family: Family, what: &str) -> String {
        let b = match self {
            Backend::Nft => "nft",
            Backend::Legacy => "legacy",
        };
        let fam = match family {
            Family::V4 => "iptables",
            Family::V6 => "ip6tables",
        };
        format!("{fam}-{b}-{what}")
    }
}

fn ipset_script(sets: &[&IpSet]) -> String {
    let mut s = String::new();
    for set in sets {
        s.push_str(&format!(
            "create {} hash:net family {} maxelem {}\n",
            set.name,
            set.family.ipset_family(),
            set.maxelem()
        ));
        for m in &set.members {
            s.push_str(&format!(
                "add {} {}\n",
                set.name,
                dog_protocol::ruleset::member_text(m)
            ));
        }
    }
    s
}

fn example(dir: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(dir)
}

fn compiled(dir: &Path) -> Compiled {
    let (snap, errors) = load_dir(dir).unwrap();
    assert!(errors.is_empty(), "{errors:?}");
    let c = compile(&snap, &CompileOptions::default());
    assert!(c.diagnostics.is_empty(), "{:#?}", c.diagnostics);
    c
}

/// Loads every firewall of `c` in turn into a fresh namespace per backend and asserts the
/// read-back hashes equal the compiler's.
fn assert_round_trip(c: &Compiled, backend: Backend) {
    let mut checked = 0;
    for (host, outcome) in &c.hosts {
        let HostOutcome::Firewall { firewall, .. } = outcome else {
            panic!("{host}: {outcome:?}");
        };
        let Some(ns) = Netns::new() else { return };
        let sets: Vec<&IpSet> = firewall.sets.values().map(|s| &**s).collect();
        ns.run("ipset", &["restore"], &ipset_script(&sets));
        let saved = parse_ipset_save(&ns.run("ipset", &["save"], ""));
        assert_eq!(saved.len(), sets.len());
        for set in &sets {
            assert_eq!(
                saved[&set.name].hash(),
                set.hash(),
                "{host}: set {}",
                set.name
            );
        }
        for family in Family::BOTH {
            let doc: &RulesDocument = firewall.document(family);
            ns.run(&backend.tool(family, "restore"), &["--noflush"], &doc.text);
            let back = ns.run(&backend.tool(family, "save"), &["-t", "filter"], "");
            assert_eq!(
                owned_lines(&back),
                owned_lines(&doc.text),
                "{host} {family} {backend:?}: read-back differs"
            );
            assert_eq!(rules_hash(&back), doc.hash());
            assert_eq!(rules_hash(&back), firewall.hashes.rules(family));
        }
        checked += 1;
    }
    assert!(checked > 0);
}

#[test]
fn example_fleet_round_trips_through_nft_and_legacy() {
    for dir in ["../examples/fleet", "../examples/fleet-change"] {
        let c = compiled(&example(dir));
        assert_eq!(c.hosts.len(), 4);
        assert_round_trip(&c, Backend::Nft);
        assert_round_trip(&c, Backend::Legacy);
    }
}

#[test]
fn every_rule_form_round_trips_through_nft_and_legacy() {
    let c = compiled(&example("tests/data/all-forms"));
    assert_eq!(c.hosts.len(), 2);
    assert_round_trip(&c, Backend::Nft);
    assert_round_trip(&c, Backend::Legacy);
}

#[test]
fn foreign_chains_tables_and_sets_are_untouched() {
    let c = compiled(&example("../examples/fleet"));
    let Some(HostOutcome::Firewall { firewall, .. }) = c.hosts.get("db-1") else {
        panic!("db-1 has no firewall");
    };
    for backend in [Backend::Nft, Backend::Legacy] {
        let Some(ns) = Netns::new() else { return };
        ns.run(
            "ipset",
            &["restore"],
            "create KUBE-CLUSTER-IP hash:ip,port family inet\nadd KUBE-CLUSTER-IP 10.96.0.1,tcp:443\n",
        );
        let foreign4 = "*nat\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\n:DOCKER - [0:0]\n-A PREROUTING -m addrtype --dst-type LOCAL -j DOCKER\n-A POSTROUTING -s 172.17.0.0/16 ! -o docker0 -j MASQUERADE\n-A DOCKER -i docker0 -j RETURN\nCOMMIT\n*filter\n:INPUT ACCEPT [0:0]\n:FORWARD DROP [0:0]\n:OUTPUT ACCEPT [0:0]\n:DOCKER - [0:0]\n:KUBE-SERVICES - [0:0]\n-A INPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n-A FORWARD -o docker0 -j DOCKER\n-A KUBE-SERVICES -d 10.96.0.10/32 -p udp -m comment --comment \"kube-system/kube-dns:dns cluster IP\" -m udp --dport 53 -j ACCEPT\n-A KUBE-SERVICES -m set --match-set KUBE-CLUSTER-IP dst,dst -j ACCEPT\nCOMMIT\n";
        let foreign6 = "*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:KUBE-SERVICES - [0:0]\n-A INPUT -j KUBE-SERVICES\n-A KUBE-SERVICES -d fd00::10/128 -p tcp -m tcp --dport 53 -j ACCEPT\nCOMMIT\n";
        ns.run(&backend.tool(Family::V4, "restore"), &[], foreign4);
        ns.run(&backend.tool(Family::V6, "restore"), &[], foreign6);
        let snapshot = |ns: &Netns| {
            let strip = |t: String| -> String {
                t.lines()
                    .filter(|l| !l.starts_with('#'))
                    .filter(|l| !l.contains("DOG-"))
                    .map(|l| {
                        // counters of built-in chains change as packets flow; policies must not
                        if l.starts_with(':') {
                            l.split(" [").next().unwrap_or(l).to_string()
                        } else {
                            l.to_string()
                        }
                    })
                    .collect::<Vec<_>>()
                    .join("\n")
            };
            let sets = ns
                .run("ipset", &["save"], "")
                .lines()
                .filter(|l| !l.split_whitespace().nth(1).unwrap_or("").starts_with("dog"))
                .collect::<Vec<_>>()
                .join("\n");
            (
                strip(ns.run(&backend.tool(Family::V4, "save"), &[], "")),
                strip(ns.run(&backend.tool(Family::V6, "save"), &[], "")),
                sets,
            )
        };
        let before = snapshot(&ns);
        assert!(before.0.contains("KUBE-SERVICES") && before.0.contains("*nat"));
        for _round in 0..2 {
            let sets: Vec<&IpSet> = firewall.sets.values().map(|s| &**s).collect();
            // -exist so the second round reuses the sets
            let script = ipset_script(&sets).replace(" hash:net ", " hash:net -exist ");
            ns.run("ipset", &["-exist", "restore"], &script);
            for family in Family::BOTH {
                let doc = firewall.document(family);
                ns.run(&backend.tool(family, "restore"), &["--noflush"], &doc.text);
                let back = ns.run(&backend.tool(family, "save"), &["-t", "filter"], "");
                assert_eq!(rules_hash(&back), doc.hash(), "{backend:?} {family}");
            }
        }
        let after = snapshot(&ns);
        assert_eq!(before.0, after.0, "{backend:?}: foreign IPv4 state changed");
        assert_eq!(before.1, after.1, "{backend:?}: foreign IPv6 state changed");
        assert_eq!(before.2, after.2, "{backend:?}: foreign ipsets changed");
    }
}
