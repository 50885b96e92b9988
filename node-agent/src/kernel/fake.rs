//! An in-memory kernel for tests of the applier without root: a filter table per family that
//! takes `iptables-restore --noflush` text the way the real one does (atomically: a bad line
//! changes nothing), and sets with the real ones' strict add/delete. It records every call,
//! and a test can make the next call of a kind fail.

use super::{Backend, KernelError, SetBackend, Tools};
use crate::core::members::Members;
use crate::core::sets::{ReadSet, SetOp};
use dog_protocol::ruleset::Family;
use ipnet::IpNet;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;

/// One family's filter table: chains in creation order with their rules.
#[derive(Clone, Debug)]
struct Table {
    chains: Vec<(String, Vec<String>)>,
}

impl Default for Table {
    fn default() -> Self {
        Table {
            chains: ["INPUT", "FORWARD", "OUTPUT"]
                .iter()
                .map(|c| (c.to_string(), Vec::new()))
                .collect(),
        }
    }
}

impl Table {
    fn chain(&mut self, name: &str) -> Result<&mut Vec<String>, String> {
        self.chains
            .iter_mut()
            .find(|(n, _)| n == name)
            .map(|(_, r)| r)
            .ok_or_else(|| format!("chain {name} does not exist"))
    }

    fn builtin(name: &str) -> bool {
        matches!(name, "INPUT" | "FORWARD" | "OUTPUT")
    }

    /// Applies a `--noflush` restore text; on error nothing changes.
    fn restore(&mut self, text: &str) -> Result<(), String> {
        let mut t = self.clone();
        for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
            if line.starts_with('*') || line == "COMMIT" || line.starts_with('#') {
                continue;
            }
            if let Some(decl) = line.strip_prefix(':') {
                let name = decl.split_whitespace().next().unwrap_or_default();
                match t.chain(name) {
                    // a declared chain is flushed (built-in ones keep their rules)
                    Ok(rules) if !Table::builtin(name) => rules.clear(),
                    Ok(_) => {}
                    Err(_) => t.chains.push((name.to_string(), Vec::new())),
                }
                continue;
            }
            let (op, rest) = line.split_once(' ').unwrap_or((line, ""));
            let (chain, spec) = rest.split_once(' ').unwrap_or((rest, ""));
            match op {
                "-A" => t.chain(chain)?.push(format!("-A {chain} {spec}")),
                "-I" => {
                    let (pos, spec) = spec.split_once(' ').unwrap_or(("1", spec));
                    let at = pos.parse::<usize>().map_err(|e| e.to_string())?.max(1) - 1;
                    let rules = t.chain(chain)?;
                    let at = at.min(rules.len());
                    rules.insert(at, format!("-A {chain} {spec}"));
                }
                "-D" => {
                    let want = format!("-A {chain} {spec}");
                    let rules = t.chain(chain)?;
                    let i = rules
                        .iter()
                        .position(|r| *r == want)
                        .ok_or_else(|| format!("no rule `{want}` to delete"))?;
                    rules.remove(i);
                }
                "-F" => t.chain(chain)?.clear(),
                "-X" => {
                    let target = format!("-j {chain}");
                    let used = t
                        .chains
                        .iter()
                        .flat_map(|(_, r)| r)
                        .any(|r| r.ends_with(&target));
                    if used || !t.chain(chain)?.is_empty() {
                        return Err(format!("chain {chain} is in use or not empty"));
                    }
                    t.chains.retain(|(n, _)| n != chain);
                }
                _ => return Err(format!("line not understood: {line}")),
            }
        }
        *self = t;
        Ok(())
    }

    fn save(&self) -> String {
        let mut out = String::from("*filter\n");
        for (name, _) in &self.chains {
            let policy = if Table::builtin(name) { "ACCEPT" } else { "-" };
            out.push_str(&format!(":{name} {policy} [0:0]\n"));
        }
        for (_, rules) in &self.chains {
            for r in rules {
                out.push_str(r);
                out.push('\n');
            }
        }
        out.push_str("COMMIT\n");
        out
    }
}

#[derive(Clone, Debug)]
struct Set {
    family: Family,
    maxelem: usize,
    members: BTreeSet<IpNet>,
}

#[derive(Debug, Default)]
struct State {
    tables: [Table; 2],
    sets: BTreeMap<String, Set>,
    calls: Vec<String>,
    /// Kinds of call (as recorded, e.g. `restore v6`) that fail the next time.
    failing: Vec<String>,
    /// Set names whose count the kernel gets wrong (a kernel that lies).
    miscounted: BTreeSet<String>,
}

/// See the module docs.
#[derive(Debug, Default)]
pub struct FakeKernel {
    state: Mutex<State>,
}

fn fam(f: Family) -> usize {
    match f {
        Family::V4 => 0,
        Family::V6 => 1,
    }
}

fn failed(call: &str, why: impl Into<String>) -> KernelError {
    KernelError::Failed {
        command: call.to_string(),
        status: "exit status: 1".into(),
        stderr: why.into(),
    }
}

impl FakeKernel {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records `call`; fails it if a test asked for that.
    fn enter(&self, call: String) -> Result<(), KernelError> {
        let mut st = self.state();
        st.calls.push(call.clone());
        if let Some(i) = st.failing.iter().position(|f| call.starts_with(f.as_str())) {
            st.failing.remove(i);
            return Err(failed(&call, "injected failure"));
        }
        Ok(())
    }

    /// The calls so far, in order (`save v4`, `restore v6`, `fill dogz4-a`, `add dogz4-a`, …).
    pub fn calls(&self) -> Vec<String> {
        self.state().calls.clone()
    }

    pub fn clear_calls(&self) {
        self.state().calls.clear();
    }

    /// The next call starting with `call` fails.
    pub fn fail_next(&self, call: &str) {
        self.state().failing.push(call.to_string());
    }

    /// The kernel reports a wrong member count for `set` from now on.
    pub fn miscount(&self, set: &str) {
        self.state().miscounted.insert(set.to_string());
    }

    /// Someone other than dog changes a set (`add: true`) or removes a member.
    pub fn tamper(&self, set: &str, member: IpNet, add: bool) {
        if let Some(s) = self.state().sets.get_mut(set) {
            if add {
                s.members.insert(member);
            } else {
                s.members.remove(&member);
            }
        }
    }

    /// Someone other than dog runs a restore (e.g. flushes a chain).
    pub fn tamper_rules(&self, family: Family, text: &str) {
        let _ = self.state().tables[fam(family)].restore(text);
    }

    pub fn set_members(&self, set: &str) -> Option<Vec<IpNet>> {
        self.state()
            .sets
            .get(set)
            .map(|s| s.members.iter().copied().collect())
    }

    pub fn rules(&self, family: Family) -> String {
        self.state().tables[fam(family)].save()
    }
}

impl Tools for FakeKernel {
    fn backend(&self) -> Backend {
        Backend::Nft
    }

    fn set_backend(&self) -> SetBackend {
        SetBackend::Netlink
    }

    fn save_rules(&self, family: Family) -> Result<String, KernelError> {
        self.enter(format!("save {}", family_word(family)))?;
        Ok(self.state().tables[fam(family)].save())
    }

    fn restore_rules(&self, family: Family, text: &str) -> Result<(), KernelError> {
        let call = format!("restore {}", family_word(family));
        self.enter(call.clone())?;
        self.state().tables[fam(family)]
            .restore(text)
            .map_err(|e| failed(&call, e))
    }

    fn set_names(&self) -> Result<Vec<String>, KernelError> {
        self.enter("list".into())?;
        Ok(self.state().sets.keys().cloned().collect())
    }

    fn read_sets(&self, names: &[String]) -> Result<Vec<ReadSet>, KernelError> {
        self.enter(format!("read {}", names.join(",")))?;
        let st = self.state();
        names
            .iter()
            .map(|n| {
                let s = st
                    .sets
                    .get(n)
                    .ok_or_else(|| failed("read", format!("set {n} does not exist")))?;
                Ok(ReadSet {
                    name: n.clone(),
                    kind: "hash:net".into(),
                    maxelem: s.maxelem,
                    elements: Some(s.members.len()),
                    members: Members::new(s.family, s.members.iter().copied()),
                })
            })
            .collect()
    }

    fn set_count(&self, name: &str) -> Result<Option<usize>, KernelError> {
        self.enter(format!("count {name}"))?;
        let st = self.state();
        let lie = usize::from(st.miscounted.contains(name));
        Ok(st.sets.get(name).map(|s| s.members.len() + lie))
    }

    fn write_sets(&self, ops: &[SetOp<'_>]) -> Result<(), KernelError> {
        for op in ops {
            let call = match op {
                SetOp::Fill { name, .. } => format!("fill {name}"),
                SetOp::Add { name, .. } => format!("add {name}"),
                SetOp::Del { name, .. } => format!("del {name}"),
                SetOp::Swap(a, b) => format!("swap {a} {b}"),
                SetOp::Destroy(n) => format!("destroy {n}"),
            };
            self.enter(call.clone())?;
            let mut st = self.state();
            let sets = &mut st.sets;
            let missing = |n: &str| failed(&call, format!("set {n} does not exist"));
            match op {
                SetOp::Fill { name, set } => {
                    if sets.contains_key(*name) {
                        return Err(failed(&call, "set already exists"));
                    }
                    sets.insert(
                        name.to_string(),
                        Set {
                            family: set.family(),
                            maxelem: set.maxelem(),
                            members: set.members.iter().collect(),
                        },
                    );
                }
                SetOp::Add { name, members } => {
                    let s = sets.get_mut(*name).ok_or_else(|| missing(name))?;
                    for m in members.iter() {
                        if !s.members.insert(*m) {
                            return Err(failed(&call, format!("{m} is already added")));
                        }
                    }
                }
                SetOp::Del { name, members } => {
                    let s = sets.get_mut(*name).ok_or_else(|| missing(name))?;
                    for m in members.iter() {
                        if !s.members.remove(m) {
                            return Err(failed(&call, format!("{m} is not added")));
                        }
                    }
                }
                SetOp::Swap(a, b) => {
                    let x = sets.remove(*a).ok_or_else(|| missing(a))?;
                    let Some(y) = sets.remove(*b) else {
                        sets.insert(a.to_string(), x);
                        return Err(missing(b));
                    };
                    sets.insert(a.to_string(), y);
                    sets.insert(b.to_string(), x);
                }
                SetOp::Destroy(n) => {
                    sets.remove(*n).ok_or_else(|| missing(n))?;
                }
            }
        }
        Ok(())
    }

    fn ip_addr_json(&self) -> Result<String, KernelError> {
        Ok("[]".into())
    }
}

fn family_word(f: Family) -> &'static str {
    match f {
        Family::V4 => "v4",
        Family::V6 => "v6",
    }
}
