//! The applier: brings the kernel to a [`HostFirewall`] through [`Tools`], so that its order
//! of work, its rollback and its retry are tested against an in-memory kernel
//! (`apply/tests.rs`) and run unchanged against the real one.
//!
//! Sets first (create and fill, replace by fill-and-swap, or add and delete members), then
//! dog's chains per family atomically (IPv4 rolled back if IPv6 fails), then sets nothing
//! references any more are destroyed. Then the proof that the kernel holds what was sent,
//! which costs what changed, not what exists: each restored family is read back
//! (`iptables-save`) and hashed; each set written is checked by the kernel's own count of its
//! members, which together with the strict writes (a fresh set filled, or members added that
//! were not there and deleted that were) proves its content. The whole-state read stays for
//! planning without a cached state and for the drift check ([`Applier::verify`]).
//!
//! A plan made against the cached state of the last apply can meet a kernel changed behind
//! dog's back (a strict write fails): the apply is then planned once more from a fresh read.
//! Also observe-mode planning, drift verification and repair, set deltas and removal.

use crate::core::drift::{compute_drift, DriftReport};
use crate::core::firewall::Firewall;
use crate::core::live::{LiveState, StateCache};
use crate::core::members::SetContent;
use crate::core::rules::{
    plan_rules, render_remove_all, render_rollback, validate_document, DocumentError, FilterState,
    RulesPlan,
};
use crate::core::sets::SetOp;
use crate::core::sets::{plan_sets, temp_name, LiveSet, SetPlan, SetPlanError};
use crate::kernel::{Backend, KernelConfig, KernelError, SetBackend, SystemTools, Tools};
use dog_protocol::messages::SetDelta;
use dog_protocol::ruleset::{
    FailsafeError, Family, FirewallHashes, HostFirewall, PerFamily, SET_PREFIX,
};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Instant;
use tracing::{info, info_span, warn};

mod proof;

/// Why an apply did not happen or did not complete.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("refused: {0}")]
    Failsafe(#[from] FailsafeError),
    #[error("refused: {0}")]
    Document(#[from] DocumentError),
    #[error("refused: {0}")]
    Set(#[from] SetPlanError),
    #[error("refused: set delta names set {0}, which the base firewall does not have")]
    UnknownSet(String),
    #[error("{step}: {source}")]
    Tool {
        step: &'static str,
        #[source]
        source: KernelError,
    },
    #[error("read-back differs from the applied firewall: {}", differences.join("; "))]
    Readback { differences: Vec<String> },
}

impl ApplyError {
    /// True when the kernel was not touched because the firewall was refused.
    pub fn is_refusal(&self) -> bool {
        matches!(
            self,
            ApplyError::Failsafe(_)
                | ApplyError::Document(_)
                | ApplyError::Set(_)
                | ApplyError::UnknownSet(_)
        )
    }

    /// The failing tool's error text, if a tool failed.
    pub fn tool_stderr(&self) -> Option<&str> {
        match self {
            ApplyError::Tool { source, .. } => Some(source.stderr()),
            _ => None,
        }
    }
}

fn tool(step: &'static str) -> impl FnOnce(KernelError) -> ApplyError {
    move |source| ApplyError::Tool { step, source }
}

/// What an apply would change (observe mode) or changed.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
pub struct Plan {
    pub sets: SetPlan,
    /// Serialized as the `ipv4` and `ipv6` fields of the plan.
    #[serde(flatten)]
    pub rules: PerFamily<RulesPlan>,
    /// Hashes of the kernel state the plan was made against (read for it), so a caller that
    /// reports live hashes with the plan does not read the kernel a second time.
    pub live: FirewallHashes,
}

impl Plan {
    /// How many changes applying the plan would make: sets created, replaced or destroyed,
    /// members added or deleted, and rule lines restored (what observe mode reports).
    pub fn change_count(&self) -> u64 {
        let s = &self.sets;
        let sets = s.create.len() + s.swap.len() + s.destroy.len();
        let members: usize = s.delta.iter().map(|d| d.add.len() + d.remove.len()).sum();
        let rules: usize = self
            .rules
            .iter()
            .filter_map(|(_, r)| r.restore.as_deref())
            .map(|t| t.lines().filter(|l| l.starts_with("-A ")).count().max(1))
            .sum();
        (sets + members + rules) as u64
    }

    pub fn changes_anything(&self) -> bool {
        self.sets.changes_anything() || self.rules.iter().any(|(_, r)| r.restore.is_some())
    }
}

/// Duration of one apply step.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct StepTime {
    pub step: String,
    pub ms: f64,
}

/// The result of a successful apply.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct ApplyReport {
    /// What was done.
    pub plan: Plan,
    /// Live hashes after the apply (equal to the desired ones).
    pub hashes: FirewallHashes,
    pub steps: Vec<StepTime>,
    pub total_ms: f64,
}

impl ApplyReport {
    pub fn changed(&self) -> bool {
        self.plan.changes_anything()
    }
}

/// What [`Applier::remove_all`] removed.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
pub struct RemoveReport {
    pub chains_v4: Vec<String>,
    pub chains_v6: Vec<String>,
    pub sets: Vec<String>,
}

struct Steps {
    started: Instant,
    steps: Vec<StepTime>,
}

impl Steps {
    fn new() -> Self {
        Steps {
            started: Instant::now(),
            steps: Vec::new(),
        }
    }
    fn time<T>(&mut self, step: &str, f: impl FnOnce() -> T) -> T {
        let span = info_span!("apply_step", step);
        let _g = span.enter();
        let t = Instant::now();
        let out = f();
        let ms = t.elapsed().as_secs_f64() * 1e3;
        tracing::debug!(step, ms, "step done");
        self.steps.push(StepTime {
            step: step.to_string(),
            ms,
        });
        out
    }
}

/// Applies firewalls to one kernel (see the module docs).
#[derive(Debug)]
pub struct Applier {
    tools: Arc<dyn Tools>,
    config: KernelConfig,
    cache: StateCache,
}

impl Applier {
    /// The applier over the real kernel ([`SystemTools`]).
    pub fn new(config: KernelConfig) -> Result<Self, KernelError> {
        let tools = SystemTools::new(&config)?;
        tracing::info!(
            backend = tools.backend().word(),
            sets = tools.set_backend().word(),
            "kernel tools ready"
        );
        Ok(Applier::with_tools(Arc::new(tools), config))
    }

    /// The applier over any [`Tools`] (tests use an in-memory kernel).
    pub fn with_tools(tools: Arc<dyn Tools>, config: KernelConfig) -> Self {
        Applier {
            tools,
            config,
            cache: StateCache::default(),
        }
    }

    pub fn tools(&self) -> &dyn Tools {
        &*self.tools
    }

    pub fn backend(&self) -> Backend {
        self.tools.backend()
    }

    pub fn set_backend(&self) -> SetBackend {
        self.tools.set_backend()
    }

    pub fn config(&self) -> &KernelConfig {
        &self.config
    }

    /// The host's interfaces and addresses (`ip -j addr`).
    pub fn ip_addr_json(&self) -> Result<String, KernelError> {
        self.tools.ip_addr_json()
    }

    /// Reads dog's chains (both families) and dog's sets.
    pub fn snapshot(&self) -> Result<LiveState, KernelError> {
        self.snapshot_against(&BTreeMap::new())
    }

    /// [`Applier::snapshot`]; sets whose members equal those in `known` share that content.
    pub fn snapshot_against(
        &self,
        known: &BTreeMap<String, Arc<SetContent>>,
    ) -> Result<LiveState, KernelError> {
        let mut st = LiveState::default();
        for f in Family::BOTH {
            st.set_rules(f, self.tools.save_rules(f)?);
        }
        st.sets = self.read_sets(&self.dog_sets()?, known)?;
        Ok(st)
    }

    /// Names of dog's sets in the kernel.
    fn dog_sets(&self) -> Result<Vec<String>, KernelError> {
        Ok(self
            .tools
            .set_names()?
            .into_iter()
            .filter(|n| n.starts_with(SET_PREFIX))
            .collect())
    }

    /// The named sets (which must exist), read whole.
    fn read_sets(
        &self,
        names: &[String],
        known: &BTreeMap<String, Arc<SetContent>>,
    ) -> Result<BTreeMap<String, LiveSet>, KernelError> {
        Ok(self
            .tools
            .read_sets(names)?
            .into_iter()
            .map(|r| (r.name.clone(), LiveSet::from_read(r, known)))
            .collect())
    }

    /// `ipset save` text of dog's sets (what a dump request shows).
    pub fn dump_sets(&self) -> Result<String, KernelError> {
        let sets = self.tools.read_sets(&self.dog_sets()?)?;
        Ok(crate::core::sets::render_save(&sets))
    }

    /// Checks a firewall without touching anything: failsafe, document shape.
    pub fn check(&self, fw: &Firewall) -> Result<(), ApplyError> {
        for f in Family::BOTH {
            let doc = fw.document(f);
            if doc.family != f {
                return Err(ApplyError::Document(DocumentError::Shape {
                    family: f,
                    why: "document carries the other family",
                }));
            }
            validate_document(doc)?;
            fw.failsafe.check(doc, self.config.broker_port)?;
        }
        Ok(())
    }

    fn plan_against(&self, fw: &Firewall, live: &LiveState) -> Result<Plan, ApplyError> {
        let mut sets = plan_sets(&fw.sets, &live.sets)?;
        // A set still referenced by a desired document is never destroyed.
        let referenced: BTreeSet<String> = Family::BOTH
            .iter()
            .flat_map(|f| fw.document(*f).referenced_sets())
            .collect();
        sets.destroy.retain(|s| !referenced.contains(s));
        Ok(Plan {
            sets,
            rules: PerFamily::from_fn(|f| plan_rules(fw.document(f), live.filter(f))),
            live: live.hashes(),
        })
    }

    /// Observe mode: what [`Applier::apply`] would change, reading the kernel only.
    pub fn plan(&self, fw: &HostFirewall) -> Result<Plan, ApplyError> {
        self.plan_firewall(&Firewall::from(fw))
    }

    /// [`Applier::plan`] of the agent's form of a firewall.
    pub fn plan_firewall(&self, fw: &Firewall) -> Result<Plan, ApplyError> {
        self.check(fw)?;
        let live = self
            .snapshot_against(&fw.sets)
            .map_err(tool("read live state"))?;
        self.plan_against(fw, &live)
    }

    /// Applies `fw` (packing and hashing its sets first; the agent itself holds
    /// [`Firewall`]s and calls [`Applier::apply_firewall`]).
    pub fn apply(&self, fw: &HostFirewall) -> Result<ApplyReport, ApplyError> {
        self.apply_firewall(&Firewall::from(fw))
    }

    /// Applies `fw`. On error the previous rules stay in force (see module docs).
    pub fn apply_firewall(&self, fw: &Firewall) -> Result<ApplyReport, ApplyError> {
        let span = info_span!("apply", host = %fw.host);
        let _g = span.enter();
        let result = self.apply_inner(fw);
        match &result {
            Ok(r) => info!(
                changed = r.changed(),
                total_ms = r.total_ms,
                "applied firewall"
            ),
            Err(e) => {
                self.cache.put(None);
                warn!(error = %e, "apply failed");
            }
        }
        result
    }

    fn apply_inner(&self, fw: &Firewall) -> Result<ApplyReport, ApplyError> {
        let mut steps = Steps::new();
        steps.time("check", || self.check(fw))?;
        let read = |steps: &mut Steps| {
            steps
                .time("read", || self.snapshot_against(&fw.sets))
                .map_err(tool("read live state"))
        };
        let (live, cached) = match self.cache.take() {
            Some(c) => (c, true),
            None => (read(&mut steps)?, false),
        };
        let plan = match self.apply_against(fw, live, &mut steps) {
            Err(e) if cached && !e.is_refusal() => {
                warn!(error = %e, "the kernel changed since dog last read it; planning again from a fresh read");
                let live = read(&mut steps)?;
                self.apply_against(fw, live, &mut steps)?
            }
            r => r?,
        };
        let hashes = fw.hashes();
        Ok(ApplyReport {
            plan,
            hashes,
            steps: steps.steps,
            total_ms: steps.started.elapsed().as_secs_f64() * 1e3,
        })
    }

    /// One attempt: plans against `live`, writes, verifies, and caches the verified state.
    fn apply_against(
        &self,
        fw: &Firewall,
        live: LiveState,
        steps: &mut Steps,
    ) -> Result<Plan, ApplyError> {
        let plan = steps.time("plan", || self.plan_against(fw, &live))?;
        let t = &*self.tools;

        // 1. sets: leftover temporaries, new sets, swaps, member changes
        let stale: Vec<SetOp<'_>> = plan
            .sets
            .stale_temps
            .iter()
            .map(|n| SetOp::Destroy(n))
            .collect();
        if !stale.is_empty() {
            steps
                .time("sets.stale", || t.write_sets(&stale))
                .map_err(tool("destroy leftover temporary sets"))?;
        }
        let temps: Vec<String> = plan.sets.swap.iter().map(|n| temp_name(n)).collect();
        let mut fill: Vec<SetOp<'_>> = Vec::new();
        for name in &plan.sets.create {
            fill.push(SetOp::Fill {
                name,
                set: &fw.sets[name],
            });
        }
        for (name, tmp) in plan.sets.swap.iter().zip(&temps) {
            fill.push(SetOp::Fill {
                name: tmp,
                set: &fw.sets[name],
            });
            fill.push(SetOp::Swap(tmp, name));
            fill.push(SetOp::Destroy(tmp));
        }
        if !fill.is_empty() {
            if let Err(e) = steps.time("sets.fill", || t.write_sets(&fill)) {
                let undo: Vec<&String> = plan.sets.create.iter().chain(&temps).collect();
                self.destroy_if_present(&undo);
                return Err(tool("create and fill sets")(e));
            }
        }
        let mut delta: Vec<SetOp<'_>> = Vec::new();
        for d in &plan.sets.delta {
            if !d.remove.is_empty() {
                delta.push(SetOp::Del {
                    name: &d.name,
                    members: &d.remove,
                });
            }
            if !d.add.is_empty() {
                delta.push(SetOp::Add {
                    name: &d.name,
                    members: &d.add,
                });
            }
        }
        if !delta.is_empty() {
            if let Err(e) = steps.time("sets.delta", || t.write_sets(&delta)) {
                self.destroy_if_present(&plan.sets.create.iter().collect::<Vec<_>>());
                return Err(tool("change sets")(e));
            }
        }

        // 2. rules, one atomic restore per family; roll IPv4 back if IPv6 fails
        let mut restored: Vec<Family> = Vec::new();
        for f in Family::BOTH {
            let Some(text) = &plan.rules.get(f).restore else {
                continue;
            };
            let step = match f {
                Family::V4 => "rules.v4",
                Family::V6 => "rules.v6",
            };
            if let Err(e) = steps.time(step, || t.restore_rules(f, text)) {
                for done in &restored {
                    let back = render_rollback(live.filter(*done), fw.document(*done));
                    if let Err(re) = t.restore_rules(*done, &back) {
                        warn!(family = %done, error = %re, "rollback of rules failed");
                    }
                }
                self.destroy_if_present(&plan.sets.create.iter().collect::<Vec<_>>());
                return Err(tool(match f {
                    Family::V4 => "restore IPv4 rules",
                    Family::V6 => "restore IPv6 rules",
                })(e));
            }
            restored.push(f);
        }

        // 3. sets nothing references any more
        if !plan.sets.destroy.is_empty() {
            let ops: Vec<SetOp<'_>> = plan
                .sets
                .destroy
                .iter()
                .map(|n| SetOp::Destroy(n))
                .collect();
            steps
                .time("sets.destroy", || t.write_sets(&ops))
                .map_err(tool("destroy unreferenced sets"))?;
        }

        // 4. the proof: restored rules read back, written sets counted
        let after = steps
            .time("verify", || self.verified(fw, &plan, live, &restored))
            .map_err(tool("read back"))??;
        self.cache.put(Some(after));
        Ok(plan)
    }

    /// Best-effort clean-up of sets this apply created (never referenced by rules in force).
    fn destroy_if_present(&self, names: &[&String]) {
        let Ok(live) = self.tools.set_names() else {
            return;
        };
        let ops: Vec<SetOp<'_>> = names
            .iter()
            .filter(|n| live.contains(n))
            .map(|n| SetOp::Destroy(n.as_str()))
            .collect();
        if let Err(e) = self.tools.write_sets(&ops) {
            warn!(error = %e, "could not remove sets created by a failed apply");
        }
    }

    /// Applies set deltas (the operator's small-change messages) on top of `base`, which must be
    /// the firewall currently applied. Returns the resulting firewall and the report.
    pub fn apply_set_deltas(
        &self,
        base: &HostFirewall,
        deltas: &[SetDelta],
    ) -> Result<(HostFirewall, ApplyReport), ApplyError> {
        let next = Firewall::from(base)
            .with_deltas(deltas)
            .map_err(ApplyError::UnknownSet)?;
        let report = self.apply_firewall(&next)?;
        Ok((next.to_host_firewall(), report))
    }

    /// Re-applies `expected` from a fresh read of the kernel.
    pub fn repair(&self, expected: &HostFirewall) -> Result<ApplyReport, ApplyError> {
        self.repair_firewall(&Firewall::from(expected))
    }

    /// [`Applier::repair`] of the agent's form of a firewall.
    pub fn repair_firewall(&self, expected: &Firewall) -> Result<ApplyReport, ApplyError> {
        self.cache.put(None);
        self.apply_firewall(expected)
    }

    /// Explicit uninstall: removes the hook jumps, flushes and deletes dog's chains, destroys
    /// dog's sets. Never called on shutdown.
    pub fn remove_all(&self) -> Result<RemoveReport, ApplyError> {
        self.cache.put(None);
        let mut report = RemoveReport::default();
        for f in Family::BOTH {
            let text = self.tools.save_rules(f).map_err(tool("read rules"))?;
            let live = FilterState::parse(&text);
            let chains: Vec<String> = live.owned.keys().cloned().collect();
            if let Some(text) = render_remove_all(&live) {
                self.tools
                    .restore_rules(f, &text)
                    .map_err(tool("remove dog's chains"))?;
            }
            match f {
                Family::V4 => report.chains_v4 = chains,
                Family::V6 => report.chains_v6 = chains,
            }
        }
        let sets = self.dog_sets().map_err(tool("list sets"))?;
        let ops: Vec<SetOp<'_>> = sets.iter().map(|s| SetOp::Destroy(s)).collect();
        self.tools
            .write_sets(&ops)
            .map_err(tool("destroy dog's sets"))?;
        report.sets = sets;
        info!(?report, "removed dog's firewall");
        Ok(report)
    }
}

#[cfg(test)]
mod tests;
